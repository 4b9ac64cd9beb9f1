//! `cellar verify` against a real Garage: every planted inconsistency is found with its key,
//! `--repair` leaves a bucket on which a second `verify` exits 0, and the intact closure (built
//! by the real nix) survives. Also covers S3 listing pagination (over 1000 keys).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod gc_support;

use futures::StreamExt as _;

use common::{
    debug_info_cache, fixture, netrc, nix, run, run_ok, s3_client, s3_env, s3_exists, s3_put,
    s3_store_env, s3_upload_dir, substitute_and_verify, token, unique_prefix, walk, App, Fixture,
};
use gc_support::{assert_readable_by_all, cellar, text, Path};

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_planted_inconsistencies_and_repair_fixes_them() {
    let f = fixture();
    let s3 = s3_env();
    let prefix = unique_prefix("verify");
    s3_upload_dir(&s3, &prefix, &f.xz_dir).await;

    // Over 1000 intact synthetic paths (2 keys each), so listings span several pages.
    let filler: Vec<Path> = (0..600)
        .map(|i| Path::new(&format!("filler-{i}"), 64, &[]))
        .collect();
    futures::stream::iter(filler.iter().map(|p| {
        let (s3, prefix) = (&s3, &prefix);
        async move {
            s3_put(s3, &format!("{prefix}{}", p.nar_key()), p.nar.clone()).await;
            s3_put(s3, &format!("{prefix}{}", p.narinfo_key()), p.narinfo()).await;
        }
    }))
    .buffer_unordered(16)
    .collect::<Vec<()>>()
    .await;

    let put = |key: String, body: Vec<u8>| {
        let (s3, prefix) = (s3.clone(), prefix.clone());
        async move { s3_put(&s3, &format!("{prefix}{key}"), body).await }
    };
    // Missing NAR: the narinfo only. A path referring to it can then not be served whole.
    let missing_nar = Path::new("missing-nar", 100, &[]);
    put(missing_nar.narinfo_key(), missing_nar.narinfo().into()).await;
    let above_missing = Path::new("above-missing", 100, &[&missing_nar]);
    put(above_missing.nar_key(), above_missing.nar.clone()).await;
    put(above_missing.narinfo_key(), above_missing.narinfo().into()).await;
    // Short NAR: FileSize says more than the object has.
    let short = Path::new("short-nar", 100, &[]);
    put(short.nar_key(), short.nar[..50].to_vec()).await;
    put(short.narinfo_key(), short.narinfo_with_size(100).into()).await;
    // Missing reference.
    let ghost = Path::new("never-uploaded", 10, &[]);
    let dangling = Path::new("dangling", 100, &[&ghost]);
    put(dangling.nar_key(), dangling.nar.clone()).await;
    put(dangling.narinfo_key(), dangling.narinfo().into()).await;
    // Garbage narinfo.
    let garbage_key = format!("{}.narinfo", gc_support::hash("garbage"));
    put(garbage_key.clone(), b"this is not a narinfo\n".to_vec()).await;
    // A narinfo stored under another path's hash.
    let misplaced = Path::new("misplaced", 100, &[]);
    let wrong_key = format!("{}.narinfo", gc_support::hash("somewhere-else"));
    put(misplaced.nar_key(), misplaced.nar.clone()).await;
    put(wrong_key.clone(), misplaced.narinfo().into()).await;
    // Orphan NAR.
    let orphan = Path::new("orphan", 77, &[]);
    put(orphan.nar_key(), orphan.nar.clone()).await;
    // Stale multipart upload.
    let client = s3_client(&s3);
    let stale_key = format!("{prefix}nar/{}", Path::new("stale", 5, &[]).nar_file);
    client
        .create_multipart_upload()
        .bucket(&s3.bucket)
        .key(&stale_key)
        .send()
        .await
        .unwrap();
    // Garbage under the reserved prefix.
    put("_cellar/pins/broken".into(), b"not a pin".to_vec()).await;

    let mut env = s3_store_env(&s3, &s3.endpoint, &prefix);
    // Everything planted is seconds old: with the default grace period of a day, orphans and
    // unfinished uploads would be taken for uploads in progress.
    env.push(("CELLAR_GC__GRACE_SECS".into(), "0".into()));

    let metrics = tempfile::tempdir().unwrap();
    let prom_file = metrics.path().join("cellar-verify.prom");
    let out = cellar(
        &["verify", "--metrics-file", prom_file.to_str().unwrap()],
        &env,
    );
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    // The findings for Prometheus too, by kind, in a file node_exporter can read.
    assert_readable_by_all(&prom_file);
    let prom = std::fs::read_to_string(&prom_file).unwrap();
    for kind in [
        "missing_nar",
        "nar_size",
        "missing_reference",
        "orphan_nar",
        "bad_reserved",
    ] {
        assert!(
            prom.contains(&format!("cellar_verify_findings{{kind=\"{kind}\"}} 1\n")),
            "{kind}:\n{prom}"
        );
    }
    for expected in [
        format!("missing-nar {}", missing_nar.narinfo_key()),
        format!("broken-reference {}", above_missing.narinfo_key()),
        format!("nar-size {}", short.narinfo_key()),
        format!(
            "missing-reference {}: {}",
            dangling.narinfo_key(),
            ghost.hash
        ),
        format!("unparseable {garbage_key}"),
        format!("wrong-hash {wrong_key}"),
        format!("orphan-nar {}", orphan.nar_key()),
        format!("unfinished-upload multipart upload of {stale_key}"),
        "bad-reserved _cellar/pins/broken".to_owned(),
    ] {
        assert!(
            report.contains(&expected),
            "{expected:?} not reported:\n{report}"
        );
    }
    let checked = 600 + f.closure.len() + 6;
    assert!(
        report.contains(&format!("checked {checked} narinfos")),
        "{report}"
    );

    // A sample checks only what it is asked to.
    let out = cellar(&["verify", "--sample", "5"], &env);
    assert!(text(&out).contains("checked 5 narinfos"), "{}", text(&out));

    // A pin that does not parse is left for a human: deleting it would let gc collect what
    // it was meant to keep. The repair fails on it, everything else repaired.
    let out = cellar(&["verify", "--repair"], &env);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let repaired = text(&out);
    let failed: Vec<&str> = repaired
        .lines()
        .filter(|l| l.starts_with("repair failed: "))
        .collect();
    assert_eq!(failed.len(), 1, "{repaired}");
    assert!(failed[0].contains("_cellar/pins/broken"), "{repaired}");
    assert!(s3_exists(&s3, &format!("{prefix}_cellar/pins/broken")).await);
    let out = cellar(&["pin", "rm", "broken"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let out = cellar(
        &["verify", "--metrics-file", prom_file.to_str().unwrap()],
        &env,
    );
    assert!(out.status.success(), "second verify:\n{}", text(&out));
    let prom = std::fs::read_to_string(&prom_file).unwrap();
    assert!(
        prom.contains("cellar_verify_findings{kind=\"any\"} 0\n"),
        "{prom}"
    );

    // What was whole is still there.
    for path in &f.closure {
        let key = format!("{prefix}{}.narinfo", Fixture::hash(path));
        assert!(s3_exists(&s3, &key).await, "{key} was removed");
    }
    for p in filler.iter().take(20) {
        assert!(s3_exists(&s3, &format!("{prefix}{}", p.narinfo_key())).await);
    }
    for gone in [&missing_nar, &above_missing, &short, &dangling] {
        assert!(!s3_exists(&s3, &format!("{prefix}{}", gone.narinfo_key())).await);
    }
    assert!(!s3_exists(&s3, &format!("{prefix}{}", orphan.nar_key())).await);
}

/// What Nix writes beside the paths: realisations (content-addressed derivations) and debug
/// info links (`index-debug-info=true`). An expiry rule that takes a narinfo or a NAR leaves
/// them naming nothing: `verify` finds them by key, and `--repair` removes them with the
/// broken path, keeping what is whole.
#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_what_realisations_and_debug_info_links_lost() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cache");
    let salt = format!("cellar-verify-named-{}", std::process::id());
    let debug = debug_info_cache(work.path(), &salt, &dir);
    let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ca.nix");
    let mut copy = nix("nix", &work.path().join("xdg-ca"));
    copy.args(["copy", "--extra-experimental-features", "ca-derivations"])
        .args(["--to", &format!("file://{}", dir.display()), "-f"])
        .arg(&ca)
        .args(["--argstr", "salt", &salt]);
    run_ok(copy);
    let s3 = s3_env();
    let prefix = unique_prefix("verify-named");
    s3_upload_dir(&s3, &prefix, &dir).await;

    let keys: Vec<String> = walk(&dir)
        .iter()
        .map(|p| p.strip_prefix(&dir).unwrap().to_str().unwrap().to_owned())
        .collect();
    let links: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with("debuginfo/"))
        .collect();
    assert_eq!(links.len(), 2, "{keys:?}");
    // Each realisation and the path it names.
    let realisations: Vec<(&String, String)> = keys
        .iter()
        .filter(|k| k.starts_with("realisations/"))
        .map(|k| {
            let doc: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join(k)).unwrap()).unwrap();
            (k, doc["outPath"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(realisations.len(), 2, "{keys:?}");
    // The top path, which nothing refers to.
    let (top_realisation, top) = realisations
        .iter()
        .find(|(_, out)| out.ends_with("-ca-top"))
        .unwrap();
    let (leaf_realisation, leaf) = realisations
        .iter()
        .find(|(_, out)| out.ends_with("-ca-leaf"))
        .unwrap();

    // Expired by a bucket rule: the top path's narinfo, and the NAR of the debug path.
    let client = s3_client(&s3);
    let debug_narinfo = format!("{}.narinfo", Fixture::hash(&debug));
    let debug_nar = std::fs::read_to_string(dir.join(&debug_narinfo))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .unwrap();
    let top_narinfo = format!("{}.narinfo", &top[..32]);
    for key in [&top_narinfo, &debug_nar] {
        client
            .delete_object()
            .bucket(&s3.bucket)
            .key(format!("{prefix}{key}"))
            .send()
            .await
            .unwrap();
    }

    let mut env = s3_store_env(&s3, &s3.endpoint, &prefix);
    env.push(("CELLAR_GC__GRACE_SECS".into(), "0".into()));
    let out = cellar(&["verify"], &env);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let mut expected = vec![
        format!(
            "dangling-realisation {top_realisation}: {} has no narinfo",
            &top[..32]
        ),
        format!("missing-nar {debug_narinfo}"),
    ];
    expected.extend(
        links
            .iter()
            .map(|l| format!("dangling-debuginfo {l}: {debug_nar} does not exist")),
    );
    for e in &expected {
        assert!(report.contains(e.as_str()), "{e:?} not reported:\n{report}");
    }
    assert!(!report.contains(leaf_realisation.as_str()), "{report}");

    let out = cellar(&["verify", "--repair"], &env);
    assert!(out.status.success(), "{}", text(&out));
    for gone in [top_realisation, &debug_narinfo, links[0], links[1]] {
        assert!(
            !s3_exists(&s3, &format!("{prefix}{gone}")).await,
            "{gone} kept:\n{}",
            text(&out)
        );
    }
    for kept in [
        leaf_realisation.to_string(),
        format!("{}.narinfo", &leaf[..32]),
    ] {
        assert!(
            s3_exists(&s3, &format!("{prefix}{kept}")).await,
            "{kept} went"
        );
    }
    let out = cellar(&["verify"], &env);
    assert!(out.status.success(), "second verify:\n{}", text(&out));
}

/// A NAR whose bytes changed in the bucket (bit rot, an overwrite by another tool) keeps its
/// size, so only its hash tells: the real client refuses it, plain `verify` cannot see it,
/// `verify --hashes` finds it and what stands on it, and `--repair` removes them, so that the
/// builder's next `nix copy --to` uploads them again and clients substitute the closure whole.
#[tokio::test(flavor = "multi_thread")]
async fn verify_hashes_finds_a_nar_the_client_would_refuse() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("cache");
    run_ok({
        let mut c = std::process::Command::new("cp");
        c.arg("-r").arg(&f.xz_dir).arg(&dir);
        c
    });
    // A path below the top, its NAR changed in the middle, same size.
    let below = f.closure.iter().find(|p| **p != f.top).unwrap();
    let narinfo_key = format!("{}.narinfo", Fixture::hash(below));
    let nar_key = std::fs::read_to_string(dir.join(&narinfo_key))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .unwrap();
    let mut nar = std::fs::read(dir.join(&nar_key)).unwrap();
    let mid = nar.len() / 2;
    nar[mid] ^= 0x55;
    std::fs::write(dir.join(&nar_key), &nar).unwrap();
    // The real client refuses it.
    let xdg = work.path().join("xdg-client");
    let mut c = nix("nix", &xdg);
    c.args(["copy", "--no-check-sigs", "--from"])
        .arg(format!("file://{}", dir.display()))
        .arg("--store")
        .arg(work.path().join("store-refused"))
        .arg(below);
    let out = run(c);
    assert!(!out.status.success(), "the client took a changed NAR");

    let (w, wcfg) = token("builder", "write");
    // Uploads are re-encoded: what cellar stores then is checked too.
    let app = App::s3("verify-hashes")
        .config(&format!("{wcfg}\n[upload]\ncompression = \"zstd\"\n"))
        .seed_dir(&dir)
        .spawn()
        .await;
    let mut env = s3_store_env(&app.s3, &app.s3.endpoint, &app.prefix);
    env.push(("CELLAR_GC__GRACE_SECS".into(), "0".into()));
    let out = cellar(&["verify"], &env);
    assert!(
        out.status.success(),
        "same size, nothing to see:\n{}",
        text(&out)
    );
    let out = cellar(&["verify", "--hashes"], &env);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains(&format!("nar-hash {narinfo_key}: {nar_key} ")),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "broken-reference {}.narinfo",
            Fixture::hash(&f.top)
        )),
        "{report}"
    );
    let out = cellar(&["verify", "--hashes", "--repair"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let at = |key: &str| format!("{}{key}", app.prefix);
    assert!(!s3_exists(&app.s3, &at(&narinfo_key)).await);
    assert!(!s3_exists(&app.s3, &at(&nar_key)).await);
    let out = cellar(&["verify", "--hashes"], &env);
    assert!(out.status.success(), "after the repair:\n{}", text(&out));

    // The builder uploads what went again; the client gets the whole closure.
    let srv = &app.srv;
    let n = netrc(work.path(), srv, &w);
    let mut up = nix("nix", &work.path().join("xdg-builder"));
    up.args([
        "copy",
        "--to",
        &format!("{}/upload", srv.url),
        "--option",
        "netrc-file",
    ])
    .arg(&n)
    .arg(&f.top);
    run_ok(up);
    substitute_and_verify(&srv.url, &srv.public_key, &f.top, work.path());
    let out = cellar(&["verify", "--hashes"], &env);
    assert!(out.status.success(), "after the upload:\n{}", text(&out));
}
