//! Uploads with the real nix client (`nix copy --to http://cellar`) into a real Garage, then
//! substitution from cellar into fresh stores; and the refusals (auth, bad uploads) with both
//! nix and raw HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::path::Path;

use common::*;

fn copy_to(
    url: &str,
    netrc: Option<&Path>,
    paths: &[&str],
    work: &Path,
    tag: &str,
) -> std::process::Output {
    let mut c = nix("nix", &work.join(format!("xdg-up-{tag}")));
    c.args(["copy", "--to", url, "--option", "download-attempts", "1"]);
    if let Some(n) = netrc {
        c.arg("--option").arg("netrc-file").arg(n);
    }
    c.args(paths);
    run(c)
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nix_copy_to_cellar_then_substitute_xz_and_zstd() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    for (tag, query) in [("xz", ""), ("zstd", "?compression=zstd")] {
        let app = App::s3(&format!("up-{tag}")).config(&wcfg).spawn().await;
        let srv = &app.srv;
        let netrc = netrc(work.path(), srv, &w);
        let out = copy_to(
            &format!("{}{query}", srv.url),
            Some(&netrc),
            &[&f.top],
            work.path(),
            tag,
        );
        assert_ok(&out, "nix copy --to");
        // The narinfos went up last and are served signed by cellar.
        let body = reqwest::get(format!("{}/{}.narinfo", srv.url, Fixture::hash(&f.top)))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let want = if tag == "xz" {
            "Compression: xz"
        } else {
            "Compression: zstd"
        };
        assert!(body.contains(want), "{body}");
        substitute_and_verify(&srv.url, &srv.public_key, &f.top, &work.path().join(tag));

        // A second copy finds everything present and uploads nothing.
        let out = copy_to(
            &srv.url,
            Some(&netrc),
            &[&f.top],
            work.path(),
            &format!("{tag}-again"),
        );
        assert_ok(&out, "second nix copy --to");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("copying path"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_need_a_write_token() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let (r, rcfg) = token("reader", "read");
    let app = App::s3("up-auth")
        .config(&format!("{wcfg}{rcfg}"))
        .spawn()
        .await;
    let srv = &app.srv;
    let work = tempfile::tempdir().unwrap();
    let leaf = f.closure.iter().find(|p| p.ends_with("-leaf")).unwrap();

    // nix without credentials: refused, and the server said 401.
    let out = copy_to(&srv.url, None, &[leaf], work.path(), "none");
    assert!(!out.status.success(), "upload without a token succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A wrong token: 403. A read-only token: 403.
    for (tag, tok) in [("wrong", "cellar_not-a-token"), ("reader", r.as_str())] {
        let n = netrc(work.path(), srv, tok);
        let out = copy_to(&srv.url, Some(&n), &[leaf], work.path(), tag);
        assert!(
            !out.status.success(),
            "upload with the {tag} token succeeded"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("403"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Nothing became visible.
    let st = reqwest::get(format!("{}/{}.narinfo", srv.url, Fixture::hash(leaf)))
        .await
        .unwrap()
        .status();
    assert_eq!(st, 404);

    // With raw HTTP: 401 carries WWW-Authenticate; Bearer works as well as Basic.
    let client = reqwest::Client::new();
    let res = client
        .put(format!("{}/log/{}", srv.url, Fixture::basename(&f.top_drv)))
        .body("log text")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().get("www-authenticate").is_some());
    let res = client
        .put(format!("{}/log/{}", srv.url, Fixture::basename(&f.top_drv)))
        .bearer_auth(&w)
        .body("log text")
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let got = reqwest::get(format!("{}/log/{}", srv.url, Fixture::basename(&f.top_drv)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(got, "log text");

    // The right token through nix works.
    let n = netrc(work.path(), srv, &w);
    assert_ok(
        &copy_to(&srv.url, Some(&n), &[leaf], work.path(), "ok"),
        "copy with write token",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn private_mode_needs_a_token_to_read() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let (r, rcfg) = token("reader", "read");
    let config = format!("[auth]\nprivate = true\n{wcfg}{rcfg}");
    let app = App::s3("up-private").config(&config).spawn().await;
    let srv = &app.srv;
    let work = tempfile::tempdir().unwrap();
    let wn = netrc(work.path(), srv, &w);
    assert_ok(
        &copy_to(&srv.url, Some(&wn), &[&f.top], work.path(), "w"),
        "upload",
    );
    let url = format!("{}/{}.narinfo", srv.url, Fixture::hash(&f.top));
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 401);
    assert_eq!(
        reqwest::get(format!("{}/healthz", srv.url))
            .await
            .unwrap()
            .status(),
        200
    );
    // A reader substitutes with its netrc.
    let rn = netrc(work.path(), srv, &r);
    let store = work.path().join("store-private");
    let mut c = nix("nix", &work.path().join("xdg-private"));
    c.args(["copy", "--from", &srv.url, "--store"])
        .arg(&store)
        .args([
            "--trusted-public-keys",
            &srv.public_key,
            "--option",
            "netrc-file",
        ])
        .arg(&rn)
        .arg(&f.top);
    run_ok(c);
}

#[tokio::test(flavor = "multi_thread")]
async fn recompression_to_zstd_round_trips() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let config = format!("[upload]\ncompression = \"zstd\"\ncompression_level = 5\n{wcfg}");
    let app = App::s3("up-recompress").config(&config).spawn().await;
    let srv = &app.srv;
    let work = tempfile::tempdir().unwrap();
    let n = netrc(work.path(), srv, &w);
    assert_ok(
        &copy_to(&srv.url, Some(&n), &[&f.top], work.path(), "1"),
        "upload xz",
    );
    let body = reqwest::get(format!("{}/{}.narinfo", srv.url, Fixture::hash(&f.top)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("Compression: zstd\n"), "{body}");
    assert!(body.contains(".nar.zst\n"), "{body}");
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &f.top,
        &work.path().join("recompressed"),
    );
    // The client's HEAD for its xz name finds the re-encoded NAR...
    let xz = fixture_upload(&f.xz_dir, &f.top);
    let head = reqwest::Client::new()
        .head(format!("{}/nar/{}", srv.url, xz.nar_name))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    // ...and nothing is uploaded again.
    let out = copy_to(&srv.url, Some(&n), &[&f.top], work.path(), "2");
    assert_ok(&out, "second upload");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("copying path"));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clients_uploading_the_same_closure_at_once() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("up-concurrent").config(&wcfg).spawn().await;
    let srv = &app.srv;
    let work = tempfile::tempdir().unwrap();
    let n = netrc(work.path(), srv, &w);
    let spawn = |tag: &str| {
        let mut c = nix("nix", &work.path().join(format!("xdg-c-{tag}")));
        c.args(["copy", "--to", &srv.url, "--option", "netrc-file"])
            .arg(&n)
            .arg(&f.top);
        c.stderr(std::process::Stdio::piped()).spawn().unwrap()
    };
    let (a, b) = (spawn("a"), spawn("b"));
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert_ok(&out, "concurrent nix copy --to");
    }
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &f.top,
        &work.path().join("concurrent"),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn local_backend_accepts_uploads() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let srv = Server::start_with_config(
        &wcfg,
        vec![
            ("CELLAR_STORE__KIND".into(), "local".into()),
            ("CELLAR_STORE__PATH".into(), data.to_str().unwrap().into()),
        ],
    );
    let n = netrc(work.path(), &srv, &w);
    assert_ok(
        &copy_to(&srv.url, Some(&n), &[&f.top], work.path(), "local"),
        "upload",
    );
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &f.top,
        &work.path().join("local"),
    );
    // No temporary files are left behind.
    let staging = data.join(".staging");
    let left = std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0);
}

// ---------------------------------------------------------------------------------------------
// Refusals over raw HTTP, against a fixture written by `nix copy --to file://`.

struct Upload {
    narinfo: String,
    nar_name: String,
    nar: Vec<u8>,
}

fn fixture_upload(dir: &Path, path: &str) -> Upload {
    let narinfo =
        std::fs::read_to_string(dir.join(format!("{}.narinfo", Fixture::hash(path)))).unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();
    let nar = std::fs::read(dir.join(&url)).unwrap();
    Upload {
        narinfo,
        nar_name: url.trim_start_matches("nar/").to_owned(),
        nar,
    }
}

async fn put(client: &reqwest::Client, url: String, token: &str, body: Vec<u8>) -> (u16, String) {
    let res = client
        .put(url)
        .basic_auth("b", Some(token))
        .body(body)
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

async fn status(url: String) -> u16 {
    reqwest::get(url).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_uploads_are_refused_and_leave_nothing_visible() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("up-bad").config(&wcfg).spawn().await;
    let srv = &app.srv;
    let c = reqwest::Client::new();
    let leaf_path = f.closure.iter().find(|p| p.ends_with("-leaf")).unwrap();
    let mid_path = f.closure.iter().find(|p| p.ends_with("-mid")).unwrap();
    let leaf = fixture_upload(&f.xz_dir, leaf_path);
    let mid = fixture_upload(&f.xz_dir, mid_path);
    let u = &srv.url;

    // A narinfo whose NAR was never uploaded.
    let (s, msg) = put(
        &c,
        format!("{u}/{}.narinfo", Fixture::hash(leaf_path)),
        &w,
        leaf.narinfo.clone().into(),
    )
    .await;
    assert_eq!(s, 400, "{msg}");
    assert!(msg.contains("has not been uploaded"), "{msg}");

    // A NAR whose bytes do not match its name (the name is its FileHash).
    let mut corrupt = leaf.nar.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let (s, msg) = put(&c, format!("{u}/nar/{}", leaf.nar_name), &w, corrupt).await;
    assert_eq!(s, 400, "{msg}");
    assert_eq!(status(format!("{u}/nar/{}", leaf.nar_name)).await, 404);

    // A name that is not the file's sha256 (a 32-character store-path hash).
    let (s, msg) = put(
        &c,
        format!("{u}/nar/{}.nar.xz", Fixture::hash(leaf_path)),
        &w,
        leaf.nar.clone(),
    )
    .await;
    assert_eq!(s, 400, "{msg}");
    assert!(msg.contains("52 characters"), "{msg}");

    // Something that is not a NAR at all.
    let (s, msg) = put(
        &c,
        format!("{u}/nar/{}", mid.nar_name),
        &w,
        b"hello".to_vec(),
    )
    .await;
    assert_eq!(s, 400, "{msg}");

    // The real NAR, then a narinfo that lies about NarHash / NarSize: refused.
    let (s, msg) = put(
        &c,
        format!("{u}/nar/{}", leaf.nar_name),
        &w,
        leaf.nar.clone(),
    )
    .await;
    assert!(s == 200 || s == 201, "{s} {msg}");
    let lying = leaf.narinfo.replace("NarSize: ", "NarSize: 1");
    let (s, msg) = put(
        &c,
        format!("{u}/{}.narinfo", Fixture::hash(leaf_path)),
        &w,
        lying.into(),
    )
    .await;
    assert_eq!(s, 400, "{msg}");
    assert!(msg.contains("NarSize"), "{msg}");
    let other_hash = mid
        .narinfo
        .lines()
        .find_map(|l| l.strip_prefix("NarHash: "))
        .unwrap();
    let lying = leaf
        .narinfo
        .lines()
        .map(|l| {
            if l.starts_with("NarHash: ") {
                format!("NarHash: {other_hash}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    let (s, msg) = put(
        &c,
        format!("{u}/{}.narinfo", Fixture::hash(leaf_path)),
        &w,
        lying.into(),
    )
    .await;
    assert_eq!(s, 400, "{msg}");
    assert!(msg.contains("NarHash"), "{msg}");
    assert_eq!(
        status(format!("{u}/{}.narinfo", Fixture::hash(leaf_path))).await,
        404
    );

    // mid references leaf, which is not in the cache yet: refused even with its NAR present.
    let (s, _) = put(&c, format!("{u}/nar/{}", mid.nar_name), &w, mid.nar.clone()).await;
    assert!(s == 200 || s == 201);
    let (s, msg) = put(
        &c,
        format!("{u}/{}.narinfo", Fixture::hash(mid_path)),
        &w,
        mid.narinfo.clone().into(),
    )
    .await;
    assert_eq!(s, 400, "{msg}");
    assert!(msg.contains("reference") && msg.contains("-leaf"), "{msg}");
    assert_eq!(
        status(format!("{u}/{}.narinfo", Fixture::hash(mid_path))).await,
        404
    );

    // References first, then it works.
    let (s, msg) = put(
        &c,
        format!("{u}/{}.narinfo", Fixture::hash(leaf_path)),
        &w,
        leaf.narinfo.clone().into(),
    )
    .await;
    assert!(s == 200 || s == 201, "{s} {msg}");
    let (s, msg) = put(
        &c,
        format!("{u}/{}.narinfo", Fixture::hash(mid_path)),
        &w,
        mid.narinfo.clone().into(),
    )
    .await;
    assert!(s == 200 || s == 201, "{s} {msg}");
    assert_eq!(
        status(format!("{u}/{}.narinfo", Fixture::hash(mid_path))).await,
        200
    );
}

/// The client dies mid-body: nothing appears, not even under a staging name.
#[tokio::test(flavor = "multi_thread")]
async fn truncated_upload_leaves_no_trace() {
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("up-trunc").config(&wcfg).spawn().await;
    let (srv, s3, prefix) = (&app.srv, &app.s3, &app.prefix);
    // A 20 MiB body so the server is already in a multipart upload when the client dies.
    let name = "0000000000000000000000000000000000000000000000000000.nar";
    let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("b:{w}"))
    };
    let mut nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
    nar.resize(12 << 20, 7);
    write!(
        s,
        "PUT /nar/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nContent-Length: {}\r\n\r\n",
        20 << 20
    )
    .unwrap();
    s.write_all(&nar).unwrap();
    s.flush().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(s);
    // Give the server a moment to notice and clean up, then look everywhere.
    let client = s3_client(s3);
    let mut clean = false;
    for _ in 0..50 {
        let objects = client
            .list_objects_v2()
            .bucket(&s3.bucket)
            .prefix(prefix)
            .send()
            .await
            .unwrap();
        let uploads = client
            .list_multipart_uploads()
            .bucket(&s3.bucket)
            .prefix(prefix)
            .send()
            .await
            .unwrap();
        if objects.contents().is_empty() && uploads.uploads().is_empty() {
            clean = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        clean,
        "the aborted upload left objects or multipart uploads behind"
    );
    assert_eq!(status(format!("{}/nar/{name}", srv.url)).await, 404);
    // The server is fine afterwards.
    let mut r = std::net::TcpStream::connect(srv.addr).unwrap();
    write!(
        r,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    r.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
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
    assert!(
        text.contains("rejected") && text.contains("-leaf"),
        "{text}"
    );
    assert!(
        text.contains("-mid") && text.contains("reference"),
        "{text}"
    );
}
