//! What an upload must pass, on a real cellar over Garage: narinfo checks (name, FileHash,
//! FileSize, duplicate references, `upload.trusted_keys`), immutability (another build of a
//! published path changes nothing), listings and
//! realisations, the bounds (413 before the body, 408 for an idle body, 503 that the real nix
//! client retries, truncated zstd), and `cellar import` of a `file://` cache.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::path::Path;

use common::*;

fn path_of<'a>(f: &'a Fixture, suffix: &str) -> &'a str {
    f.closure.iter().find(|p| p.ends_with(suffix)).unwrap()
}

fn replace_line(narinfo: &str, field: &str, value: &str) -> String {
    narinfo
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{field}: ")) {
                format!("{field}: {value}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[tokio::test(flavor = "multi_thread")]
async fn narinfo_checks_and_immutability() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("up-checks").config(&wcfg).spawn().await;
    let u = format!("{}/upload", app.srv.url);
    let c = reqwest::Client::new();
    let (leaf_p, mid_p) = (path_of(f, "-leaf"), path_of(f, "-mid"));
    let leaf = fixture_upload(&f.xz_dir, leaf_p);
    let mid = fixture_upload(&f.xz_dir, mid_p);
    let (s, m) = put(
        &c,
        format!("{u}/nar/{}", leaf.nar_name),
        &w,
        leaf.nar.clone(),
    )
    .await;
    assert_eq!(s, 201, "{m}");
    let at = |p: &str| format!("{u}/{}.narinfo", Fixture::hash(p));

    // Uploaded under another path's hash.
    let (s, m) = put(&c, at(mid_p), &w, leaf.narinfo.clone().into()).await;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("does not match the name"), "{m}");
    // FileHash and FileSize must be those of the NAR that was uploaded.
    let other_file = mid.nar_name.trim_end_matches(".nar.xz");
    let bad = replace_line(&leaf.narinfo, "FileHash", &format!("sha256:{other_file}"));
    let (s, m) = put(&c, at(leaf_p), &w, bad.into()).await;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("FileHash"), "{m}");
    let bad = replace_line(&leaf.narinfo, "FileSize", "1");
    let (s, m) = put(&c, at(leaf_p), &w, bad.into()).await;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("FileSize"), "{m}");
    // Duplicate references.
    let name = Fixture::basename(leaf_p);
    let bad = replace_line(&leaf.narinfo, "References", &format!("{name} {name}"));
    let (s, m) = put(&c, at(leaf_p), &w, bad.into()).await;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("listed twice"), "{m}");
    assert_eq!(
        status(format!("{}/{}.narinfo", app.srv.url, Fixture::hash(leaf_p))).await,
        404
    );

    // Published; the same narinfo again is a success that changes nothing.
    let (s, m) = put(&c, at(leaf_p), &w, leaf.narinfo.clone().into()).await;
    assert_eq!(s, 201, "{m}");
    let (s, m) = put(&c, at(leaf_p), &w, leaf.narinfo.clone().into()).await;
    assert_eq!(s, 200, "{m}");
    // Other contents for the published path (another builder's build, not reproducible):
    // a success, as `nix copy` to a store that has the path skips it, and the published
    // narinfo stays.
    let nar_hash = |n: &str| {
        n.lines()
            .find_map(|l| l.strip_prefix("NarHash: "))
            .unwrap()
            .to_owned()
    };
    let other = replace_line(&leaf.narinfo, "NarHash", &nar_hash(&mid.narinfo));
    let (s, m) = put(&c, at(leaf_p), &w, other.into()).await;
    assert_eq!(s, 200, "{m}");
    let served = reqwest::get(format!("{}/{}.narinfo", app.srv.url, Fixture::hash(leaf_p)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(nar_hash(&served), nar_hash(&leaf.narinfo), "{served}");
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_keys_listings_and_realisations() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let xdg = work.path().join("xdg");
    let sec = work.path().join("builder.sec");
    let public = nix_key("builder-1", &sec, &xdg);
    let (w, wcfg) = token("builder", "write");
    let config = format!("[upload]\ntrusted_keys = [\"{public}\"]\n{wcfg}");
    let app = App::s3("up-trusted").config(&config).spawn().await;
    let srv = &app.srv;
    let n = netrc(work.path(), srv, &w);
    let leaf = path_of(f, "-leaf");
    let copy = |query: &str, tag: &str| {
        let mut c = nix("nix", &work.path().join(format!("xdg-{tag}")));
        c.args(["copy", "--option", "download-attempts", "1", "--to"])
            .arg(format!("{}/upload{query}", srv.url))
            .args(["--option", "netrc-file"])
            .arg(&n)
            .arg(leaf);
        run(c)
    };
    // Unsigned: refused, with the reason in the server's answer.
    let out = copy("", "unsigned");
    assert!(!out.status.success(), "an unsigned upload was accepted");
    let up = fixture_upload(&f.xz_dir, leaf);
    let c = reqwest::Client::new();
    let at = format!("{}/upload/{}.narinfo", srv.url, Fixture::hash(leaf));
    let (s, m) = put(&c, at, &w, up.narinfo.clone().into()).await;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("upload.trusted_keys"), "{m}");
    // Signed while uploading, with a listing: accepted.
    let query = format!("?secret-key={}&write-nar-listing=true", sec.display());
    let out = copy(&query, "signed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ls = reqwest::get(format!("{}/{}.ls", srv.url, Fixture::hash(leaf)))
        .await
        .unwrap();
    assert_eq!(ls.status(), 200);
    assert!(ls.text().await.unwrap().contains("\"version\""));

    // A realisation, under both names Nix uses, read back from the root: refused unsigned
    // (the trusted keys hold for realisations too) and while the path it names is not in the
    // cache, stored once it is, kept when sent again (200) and when another names another
    // path (200 too: another build's, which Nix sends on every copy). Signed as Nix signs
    // them: the object without its signatures, keys sorted, compact.
    let builder: cellar::nix::SecretKey = std::fs::read_to_string(&sec)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let doi = format!("sha256:{}!out", "1".repeat(52));
    let realisation = |out: &str, signed: bool| {
        let fingerprint =
            format!(r#"{{"dependentRealisations":{{}},"id":"{doi}","outPath":"{out}"}}"#);
        let sigs = match signed {
            true => format!(r#"["{}"]"#, builder.sign(fingerprint.as_bytes())),
            false => "[]".to_owned(),
        };
        format!(
            r#"{{"id":"{doi}","outPath":"{out}","signatures":{sigs},"dependentRealisations":{{}}}}"#
        )
        .into_bytes()
    };
    let body = realisation(Fixture::basename(leaf), true);
    let absent = realisation(Fixture::basename(&f.top), true);
    let unsigned = realisation(Fixture::basename(leaf), false);
    for key in [
        format!("realisations/{doi}.doi"),
        format!("build-trace/{}/out", Fixture::basename(&f.top_drv)),
    ] {
        let at = format!("{}/upload/{key}", srv.url);
        let (s, m) = put(&c, at.clone(), &w, unsigned.clone()).await;
        assert_eq!(s, 400, "{key}: {m}");
        assert!(m.contains("upload.trusted_keys"), "{key}: {m}");
        let (s, m) = put(&c, at.clone(), &w, absent.clone()).await;
        assert_eq!(s, 400, "{key}: {m}");
        assert!(m.contains("not in the cache"), "{key}: {m}");
        let (s, m) = put(&c, at.clone(), &w, body.clone()).await;
        assert_eq!(s, 201, "{key}: {m}");
        let (s, m) = put(&c, at.clone(), &w, body.clone()).await;
        assert_eq!(s, 200, "{key}: {m}");
        let (s, m) = put(&c, at, &w, absent.clone()).await;
        assert_eq!(s, 200, "{key}: {m}");
        let got = reqwest::get(format!("{}/{key}", srv.url)).await.unwrap();
        assert_eq!(got.status(), 200, "{key}");
        let got = got.bytes().await.unwrap();
        if key.starts_with("build-trace/") {
            assert_eq!(got.as_ref(), body.as_slice(), "{key}: served as stored");
        } else {
            // Served signed by the server too, beside the builder's signature.
            let served: serde_json::Value = serde_json::from_slice(&got).unwrap();
            let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(served["outPath"], sent["outPath"], "{key}");
            let sigs = served["signatures"].as_array().unwrap();
            assert!(sigs.contains(&sent["signatures"][0]), "{key}: {served}");
            assert_eq!(sigs.len(), 2, "{key}: {served}");
        }
    }
}

/// Raw HTTP/1.1 on one connection, for what reqwest hides: `Expect: 100-continue`, a body
/// that stops half-way.
fn raw_put(srv: &Server, path: &str, token: &str, extra: &str, body: &[u8]) -> std::net::TcpStream {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("b:{token}"));
    let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n{extra}\r\n"
    )
    .unwrap();
    s.write_all(body).unwrap();
    s.flush().unwrap();
    s
}

fn status_line(s: &mut std::net::TcpStream) -> String {
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn bounds_413_408_and_a_wait_for_the_upload_slot() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let config = format!(
        "[upload]\nmax_nar_bytes = 8388608\nmax_concurrent = 1\nbody_idle_timeout_secs = 2\n{wcfg}"
    );
    let app = App::s3("up-bounds").config(&config).spawn().await;
    let srv = &app.srv;
    let name = "2222222222222222222222222222222222222222222222222222.nar";
    let nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();

    // 413 from Content-Length alone: the body is never asked for.
    let mut s = raw_put(
        srv,
        &format!("/upload/nar/{name}"),
        &w,
        "Content-Length: 9000000\r\nExpect: 100-continue\r\n",
        b"",
    );
    let r = status_line(&mut s);
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");

    // A body that stops: 408 after the idle timeout, and its slot is free again.
    let mut s = raw_put(
        srv,
        &format!("/upload/nar/{name}"),
        &w,
        "Content-Length: 1000\r\n",
        &nar,
    );
    let r = status_line(&mut s);
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");

    // One upload holds the only slot; nix's upload waits for it, and goes through when the
    // holder ends (refused, after curl sent its body unasked, Nix 2.8 would retry the PUT
    // without it). The holder is admitted once cellar asks for its body (100 Continue), and
    // keeps its slot by sending a byte at a time, as a slow client does, well within the idle
    // timeout, until the test lets it finish.
    let mut holder = raw_put(
        srv,
        &format!("/upload/nar/{name}"),
        &w,
        "Content-Length: 1000\r\nExpect: 100-continue\r\n",
        b"",
    );
    let r = status_line(&mut holder);
    assert!(r.starts_with("HTTP/1.1 100"), "{r}");
    holder.write_all(&nar).unwrap();
    let finish = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let finish = finish.clone();
        let mut out = holder.try_clone().unwrap();
        let total = 1000 - nar.len();
        std::thread::spawn(move || {
            let mut sent = 0;
            while !finish.load(std::sync::atomic::Ordering::SeqCst) && sent < total - 1 {
                out.write_all(&[0u8]).unwrap();
                sent += 1;
                // The pace of a slow client, not a synchronisation.
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            out.write_all(&vec![0u8; total - sent]).unwrap();
        })
    };
    let work = tempfile::tempdir().unwrap();
    let netrc = netrc(work.path(), srv, &w);
    let leaf = path_of(f, "-leaf");
    let mut c = nix("nix", &work.path().join("xdg"));
    c.args([
        "copy",
        "--to",
        &format!("{}/upload", srv.url),
        "--option",
        "netrc-file",
    ])
    .arg(&netrc)
    .arg(leaf)
    .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    srv.wait_for_log("upload waits for one of upload.max_concurrent", 1); // nix waits
    finish.store(true, std::sync::atomic::Ordering::SeqCst);
    trickle.join().unwrap();
    let _ = status_line(&mut holder);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        status(format!("{}/{}.narinfo", srv.url, Fixture::hash(leaf))).await,
        200
    );

    // A truncated zstd NAR: 400, nothing visible.
    let zst = zstd::encode_all(&[nar.clone(), vec![1u8; 100_000]].concat()[..], 3).unwrap();
    let cut = zst[..zst.len() - 3].to_vec();
    let file = format!("{}.nar.zst", "3".repeat(52));
    let (s, m) = put(
        &reqwest::Client::new(),
        format!("{}/upload/nar/{file}", srv.url),
        &w,
        cut,
    )
    .await;
    assert_eq!(s, 400, "{m}");
    assert!(m.contains("incomplete frame"), "{m}");
    assert_eq!(status(format!("{}/nar/{file}", srv.url)).await, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn import_a_file_cache_twice_then_substitute() {
    let f = fixture();
    let app = App::s3("import");
    let env = app.direct_store_env();
    let import = |dir: &Path| {
        let mut c = std::process::Command::new(CELLAR);
        c.arg("import").arg(dir).envs(env.iter().cloned());
        c.output().unwrap()
    };
    let first = import(&f.xz_dir);
    let out1 = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{out1}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        out1.contains(&format!("imported {}, skipped 0", f.closure.len())),
        "{out1}"
    );
    let second = import(&f.xz_dir);
    let out2 = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{out2}");
    assert!(
        out2.contains(&format!("imported 0, skipped {}", f.closure.len())),
        "{out2}"
    );

    let app = app.spawn().await;
    // Each imported path was recorded for garbage collection before it was written (as an
    // upload is), so a collector running meanwhile keeps it and its references; the second
    // import wrote nothing.
    let records = s3_client(&app.s3)
        .list_objects_v2()
        .bucket(&app.s3.bucket)
        .prefix(format!("{}_cellar/access/", app.prefix))
        .send()
        .await
        .unwrap();
    assert_eq!(
        records.key_count(),
        Some(f.closure.len() as i32),
        "{records:?}"
    );
    let srv = &app.srv;
    let work = tempfile::tempdir().unwrap();
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &f.top,
        &work.path().join("imported"),
    );
    // The build log came along.
    let mut l = nix("nix", &work.path().join("xdg-log"));
    l.args(["log", "--store", &srv.url, &f.top]);
    assert!(run_ok(l).contains("building top"));

    // A directory with a corrupt NAR: that path and what depends on it are rejected, with
    // reasons, and the command fails.
    let bad = work.path().join("bad-cache");
    let mut cp = std::process::Command::new("cp");
    cp.arg("-r").arg(&f.zstd_dir).arg(&bad);
    run_ok(cp);
    let leaf = f.closure.iter().find(|p| p.ends_with("-leaf")).unwrap();
    let up = fixture_upload(&bad, leaf);
    let nar_path = bad.join("nar").join(&up.nar_name);
    let mut bytes = std::fs::read(&nar_path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    std::fs::write(&nar_path, bytes).unwrap();
    let env2 = App::s3("import-bad").direct_store_env();
    let mut c = std::process::Command::new(CELLAR);
    c.arg("import").arg(&bad).envs(env2);
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    // One line per rejected path, `  rejected <path>: <why>`: the corrupt one for its own
    // reason, and each path above it for the reference it lacks.
    let rejected: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("  rejected "))
        .filter_map(|l| l.split_once(": "))
        .collect();
    let why = |path: &str| {
        rejected
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, why)| *why)
            .unwrap_or_else(|| panic!("{path} not rejected:\n{text}"))
    };
    let leaf_why = why(leaf);
    assert!(!leaf_why.contains("reference"), "{leaf_why}");
    let mid = f.closure.iter().find(|p| p.ends_with("-mid")).unwrap();
    let mid_why = why(mid);
    assert!(
        mid_why.contains("reference") && mid_why.contains(leaf.as_str()),
        "{mid_why}"
    );
    let top_why = why(&f.top);
    assert!(top_why.contains(mid.as_str()), "{top_why}");
    assert_eq!(
        rejected.len(),
        3,
        "only the corrupt path and those above it:\n{text}"
    );

    // Import applies the upload limits: with upload.max_nar_bytes at 1 MiB, the 2 MiB path
    // is refused for its size (and top for lacking it); the rest is imported.
    let mut env3 = App::s3("import-limit").direct_store_env();
    env3.push(("CELLAR_UPLOAD__MAX_NAR_BYTES".into(), "1048576".into()));
    let mut c = std::process::Command::new(CELLAR);
    c.arg("import").arg(&f.xz_dir).envs(env3);
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    let big = f.closure.iter().find(|p| p.ends_with("-big")).unwrap();
    let big_line = format!("  rejected {big}: ");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&big_line) && l.contains("larger than 1048576 bytes")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "imported {}, skipped 0 (already present), rejected 2",
            f.closure.len() - 2
        )),
        "{text}"
    );
}

/// A team moving its `file://` cache, signed with its own key, to cellar, where builders
/// already pushed some of the same paths (unsigned): `cellar import` adds the old key's
/// signatures to those paths, so clients that still trust only that key substitute the whole
/// closure through cellar.
#[tokio::test(flavor = "multi_thread")]
async fn import_adds_the_old_keys_signatures_to_paths_already_pushed() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let sec = work.path().join("team.sec");
    let team = nix_key("team-cache-1", &sec, &work.path().join("xdg-key"));
    let signed = work.path().join("signed-cache");
    let mut c = nix("nix", &work.path().join("xdg-signed"));
    c.args(["copy", "--to"])
        .arg(format!(
            "file://{}?secret-key={}",
            signed.display(),
            sec.display()
        ))
        .arg(&f.top);
    run_ok(c);

    let (w, wcfg) = token("builder", "write");
    let app = App::s3("import-sigs").config(&wcfg).spawn().await;
    let n = netrc(work.path(), &app.srv, &w);
    let mut up = nix("nix", &work.path().join("xdg-up"));
    up.args(["copy", "--to", &format!("{}/upload", app.srv.url)])
        .arg("--option")
        .arg("netrc-file")
        .arg(&n)
        .arg(&f.top);
    run_ok(up);

    let said = cellar_import(&signed, app.direct_store_env());
    let all = f.closure.len();
    assert!(
        said.contains(&format!(
            "imported 0, skipped {all} (already present; {all} of them mended"
        )),
        "{said}"
    );
    // A server started since (the first one's memory holds the narinfos as they were).
    let fresh = app.another_server(&[]).await;
    substitute_and_verify(&fresh.url, &team, &f.top, &work.path().join("team-client"));
}

/// `cellar import` brings the debug info links of a directory `nix copy --to
/// 'file://DIR?index-debug-info=true'` wrote, after the paths; a link whose NAR the store
/// does not hold, or a file that is no link, is rejected with its reason.
#[tokio::test(flavor = "multi_thread")]
async fn import_brings_debug_info_links_whose_nars_it_holds() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cache");
    debug_info_cache(work.path(), "cellar-import-debug", &dir);
    let id = "abcdef0123456789abcdef0123456789abcdef01";
    let links = dir.join("debuginfo");
    let sent = std::fs::read_to_string(links.join(format!("{id}.debug"))).unwrap();
    assert!(sent.contains("\"../nar/"), "{sent}");
    // A link to a NAR the directory lacks, and a file that is no link.
    let nowhere = "0000000000000000000000000000000000000000000000000000";
    let mut stray: serde_json::Value = serde_json::from_str(&sent).unwrap();
    stray["archive"] = format!("../nar/{nowhere}.nar.xz").into();
    std::fs::write(
        links.join(format!("{}.debug", "1".repeat(40))),
        stray.to_string(),
    )
    .unwrap();
    std::fs::write(links.join("notes.txt"), "x").unwrap();

    let app = App::s3("import-debug");
    let mut c = std::process::Command::new(CELLAR);
    c.arg("import").arg(&dir).envs(app.direct_store_env());
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("imported 1, skipped 0"), "{text}");
    let rejected: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("  rejected "))
        .collect();
    assert_eq!(rejected.len(), 2, "{text}");
    assert!(
        rejected
            .iter()
            .any(|l| l.starts_with("debuginfo/1111") && l.contains(&format!("its NAR {nowhere}"))),
        "{text}"
    );
    assert!(
        rejected
            .iter()
            .any(|l| l.starts_with("debuginfo/notes.txt: ")),
        "{text}"
    );

    let app = app.spawn().await;
    let srv = &app.srv;
    for name in [
        format!("{id}.debug"),
        "cd0123456789abcdef0123456789abcdef012345.debug".into(),
    ] {
        let res = reqwest::get(format!("{}/debuginfo/{name}", srv.url))
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{name}");
    }
    assert_eq!(
        status(format!("{}/debuginfo/{}.debug", srv.url, "1".repeat(40))).await,
        404
    );
    assert_eq!(
        reqwest::get(format!("{}/debuginfo/{id}.debug", srv.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        sent
    );
}
