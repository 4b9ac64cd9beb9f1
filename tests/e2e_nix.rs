//! End to end with the real nix client: a bucket laid out by `nix copy --to file://` (unsigned)
//! in a real Garage, served through cellar, substituted into fresh stores trusting only
//! cellar's key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;

fn realise_with_substituter(url: &str, key: &str, top: &str, work: &Path) {
    let store = work.join("store-realise");
    let mut r = nix("nix-store", &work.join("xdg-realise"));
    r.arg("--store")
        .arg(&store)
        .args(["--realise", top])
        .args(["--option", "substituters", url])
        .args(["--option", "trusted-public-keys", key]);
    let out = run_ok(r);
    assert_eq!(out.trim(), top);
    assert!(store.join(top.trim_start_matches('/')).exists());
}

fn wrong_key_is_refused(url: &str, top: &str, work: &Path) {
    // Same key name as the server's, other key material: signature check must fail.
    let other = std::process::Command::new(CELLAR)
        .args(["keygen", "cellar-test-1", "--out"])
        .arg(work.join("other.sec"))
        .output()
        .unwrap();
    let other_pub = String::from_utf8(other.stdout).unwrap().trim().to_owned();
    let mut c = nix("nix", &work.join("xdg-wrong"));
    c.args(["copy", "--from", url, "--store"])
        .arg(work.join("store-wrong"))
        .args(["--trusted-public-keys", &other_pub, top]);
    let out = run(c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "copy with a wrong key succeeded");
    assert!(err.contains("lacks a valid signature"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_xz_closure_substitutes_trusting_only_cellar() {
    let f = fixture();
    let app = App::s3("e2e-xz").seed_dir(&f.xz_dir).spawn().await;
    let srv = &app.srv;
    let work = tempfile::tempdir().unwrap();

    substitute_and_verify(&srv.url, &srv.public_key, &f.top, work.path());
    realise_with_substituter(&srv.url, &srv.public_key, &f.top, work.path());
    wrong_key_is_refused(&srv.url, &f.top, work.path());

    // `nix log --store` reads Deriver: then GET /log/<drv>.
    let mut l = nix("nix", &work.path().join("xdg-log"));
    l.args(["log", "--store", &srv.url, &f.top]);
    assert!(run_ok(l).contains("building top"));

    // path-info over the whole closure, through HEAD + GET narinfo.
    let mut p = nix("nix", &work.path().join("xdg-pi"));
    p.args(["path-info", "-r", "--store", &srv.url, &f.top]);
    let listed = run_ok(p);
    for path in &f.closure {
        assert!(
            listed.contains(path.as_str()),
            "{path} missing from {listed}"
        );
    }
}

/// A log Nix's S3 store wrote xz-compressed (`log-compression=xz`): `nix log` (Nix 2.8 sends
/// no `Accept-Encoding`, and decodes xz itself) reads it, and a client with curl's
/// `Accept-Encoding` (Lix has curl decode logs, which knows no xz) gets it decoded, on cellar's
/// own read path and the SDK's. (Brotli, as cache.nixos.org's logs are, is passed on encoded.)
#[tokio::test(flavor = "multi_thread")]
async fn a_log_stored_compressed_is_decoded_by_nix_log() {
    use std::io::Write as _;
    let f = fixture();
    let app = App::s3("e2e-log-encoding")
        .seed_dir(&f.xz_dir)
        .spawn()
        .await;
    let drv = f.top_drv.rsplit('/').next().unwrap();
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(b"the compressed log of top\n").unwrap();
    let xz = xz.finish().unwrap();
    s3_client(&app.s3)
        .put_object()
        .bucket(&app.s3.bucket)
        .key(format!("{}log/{drv}", app.prefix))
        .content_type("text/plain; charset=utf-8")
        .content_encoding("xz")
        .body(xz.into())
        .send()
        .await
        .unwrap();
    let mut env = s3_store_env(&app.s3, &app.s3.endpoint, &app.prefix);
    env.push(("CELLAR_STORE__DIRECT_REQUESTS".into(), "false".into()));
    let sdk = Server::start(env);
    let work = tempfile::tempdir().unwrap();
    for (name, url) in [("direct", &app.srv.url), ("sdk", &sdk.url)] {
        let mut l = nix("nix", &work.path().join(format!("xdg-{name}")));
        l.args(["log", "--store", url, &f.top]);
        let log = run_ok(l);
        assert!(log.contains("the compressed log of top"), "{name}: {log:?}");
        let res = reqwest::Client::new()
            .get(format!("{url}/log/{drv}"))
            .header("accept-encoding", "deflate, gzip, br, zstd")
            .send()
            .await
            .unwrap();
        assert!(
            !res.headers().contains_key("content-encoding"),
            "{name}: {:?}",
            res.headers()
        );
        assert_eq!(res.text().await.unwrap(), "the compressed log of top\n");
    }
}

/// A bucket whose narinfos Nix's S3 store wrote compressed (`narinfo-compression=xz`, or zstd)
/// and marked so in `Content-Encoding`: cellar decodes each as it reads it, on its own read
/// path and the SDK's, and the real client substitutes the closure (it was a 502).
#[tokio::test(flavor = "multi_thread")]
async fn narinfos_stored_compressed_are_decoded_and_substitute() {
    use std::io::Write as _;
    let f = fixture();
    let app = App::s3("e2e-narinfo-encoding")
        .seed_dir(&f.xz_dir)
        .spawn()
        .await;
    let s3 = s3_client(&app.s3);
    let mut narinfos = 0;
    for (i, entry) in std::fs::read_dir(&f.xz_dir).unwrap().enumerate() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if !name.ends_with(".narinfo") {
            continue;
        }
        let plain = std::fs::read(&path).unwrap();
        // Two codings, by turns.
        let (coding, body) = if i % 2 == 0 {
            let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
            xz.write_all(&plain).unwrap();
            ("xz", xz.finish().unwrap())
        } else {
            ("zstd", zstd::encode_all(&plain[..], 3).unwrap())
        };
        assert_ne!(body, plain);
        s3.put_object()
            .bucket(&app.s3.bucket)
            .key(format!("{}{name}", app.prefix))
            .content_type("text/x-nix-narinfo")
            .content_encoding(coding)
            .body(body.into())
            .send()
            .await
            .unwrap();
        narinfos += 1;
    }
    assert_eq!(narinfos, f.closure.len());
    let mut env = s3_store_env(&app.s3, &app.s3.endpoint, &app.prefix);
    env.push(("CELLAR_STORE__DIRECT_REQUESTS".into(), "false".into()));
    let sdk = Server::start(env);
    let work = tempfile::tempdir().unwrap();
    for (name, srv) in [("direct", &app.srv), ("sdk", &sdk)] {
        substitute_and_verify(&srv.url, &srv.public_key, &f.top, &work.path().join(name));
    }
}

/// Also the reads through the AWS SDK (`store.direct_requests = false`, here by the name it
/// had before, which is still accepted; the other tests use the default, cellar's own signed
/// requests).
#[tokio::test(flavor = "multi_thread")]
async fn s3_zstd_closure_substitutes_with_reads_through_the_sdk() {
    let f = fixture();
    let app = App::s3("e2e-zstd")
        .seed_dir(&f.zstd_dir)
        .env("CELLAR_STORE__DIRECT_READS", "false")
        .spawn()
        .await;
    let srv = &app.srv;
    let work = tempfile::tempdir().unwrap();
    substitute_and_verify(&srv.url, &srv.public_key, &f.top, work.path());
    realise_with_substituter(&srv.url, &srv.public_key, &f.top, work.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn local_directory_backend_substitutes() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let mut cp = std::process::Command::new("cp");
    cp.arg("-r").arg(&f.xz_dir).arg(&data);
    run_ok(cp);
    let srv = Server::start(vec![
        ("CELLAR_STORE__KIND".into(), "local".into()),
        ("CELLAR_STORE__PATH".into(), data.to_str().unwrap().into()),
    ]);
    substitute_and_verify(&srv.url, &srv.public_key, &f.top, work.path());
    realise_with_substituter(&srv.url, &srv.public_key, &f.top, work.path());
    wrong_key_is_refused(&srv.url, &f.top, work.path());
    let mut l = nix("nix", &work.path().join("xdg-log"));
    l.args(["log", "--store", &srv.url, &f.top]);
    assert!(run_ok(l).contains("building top"));
}

/// Substitutes `f`'s closure through `srv` into a fresh store under `work`, and waits until its
/// large NARs are on the disk cache: the names of those NARs. Small NARs (up to 64 KiB, the
/// default `cache.nar_memory_max_object_bytes`) stay in memory; the others go to the disk
/// cache, whose fills finish in the background right after the last byte went out.
fn substitute_filling_the_disk_cache(srv: &Server, f: &Fixture, work: &Path) -> Vec<String> {
    substitute_and_verify(&srv.url, &srv.public_key, &f.top, work);
    let large: Vec<String> = std::fs::read_dir(f.xz_dir.join("nar"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.metadata().unwrap().len() > 64 << 10)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !large.is_empty(),
        "the fixture has a NAR over the memory limit"
    );
    for name in &large {
        srv.wait_for_log(&format!("NAR cache: stored nar={name}"), 1);
    }
    large
}

/// With the memory and disk caches, a second client substitutes the whole closure without a
/// single byte reaching S3: small NARs from memory, the others from disk.
#[tokio::test(flavor = "multi_thread")]
async fn hot_closure_is_served_without_touching_s3() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let app = App::s3("e2e-hot")
        .through_proxy()
        .seed_dir(&f.xz_dir)
        .env(
            "CELLAR_CACHE__NAR_DIR",
            work.path().join("nar-cache").to_str().unwrap(),
        )
        .spawn()
        .await;
    let (srv, proxy) = (&app.srv, app.proxy());
    substitute_filling_the_disk_cache(srv, f, &work.path().join("first"));
    let before = proxy.bytes_to_store();
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &f.top,
        &work.path().join("second"),
    );
    assert_eq!(
        proxy.bytes_to_store(),
        before,
        "the second substitution reached S3:\n{}",
        srv.log()
    );
    // And while S3 is unreachable, the hot closure is still served.
    proxy.set_down(true);
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &f.top,
        &work.path().join("third"),
    );
}

/// A restarted server answers at once and serves the NARs its disk cache kept: the real nix
/// substitutes the closure again with the large NARs read from disk, not S3, while the files
/// from before the restart are indexed in the background.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_server_serves_the_nars_its_disk_cache_kept() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let nar_dir = work.path().join("nar-cache");
    let nar_dir = nar_dir.to_str().unwrap();
    let mut app = App::s3("e2e-restart")
        .seed_dir(&f.xz_dir)
        .env("CELLAR_CACHE__NAR_DIR", nar_dir)
        .spawn()
        .await;
    let large = substitute_filling_the_disk_cache(&app.srv, f, &work.path().join("first"));
    app.srv.stop_in_place();
    app.srv = app
        .another_server(&[("CELLAR_CACHE__NAR_DIR", nar_dir)])
        .await;
    let srv = &app.srv;
    srv.wait_for_log("NAR cache: looking at the files from before the restart", 1);
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &f.top,
        &work.path().join("second"),
    );
    let hits = metric_sum(
        srv,
        "cellar_cache_lookups_total",
        &[r#"layer="nar_disk""#, r#"result="hit""#],
    );
    assert_eq!(hits.await, large.len() as f64, "{}", srv.log());
    // (Small NARs were only in memory, lost with the restart: one the client asks for before
    // its narinfo's load brings it may count as a miss of the disk cache.)
    for name in &large {
        let miss = format!("NAR cache: miss nar={name}");
        assert_eq!(srv.log_count(&miss), 0, "{}", srv.log());
    }
    srv.wait_for_log(
        "NAR cache: the files from before the restart are indexed",
        1,
    );
}

/// `cellar_store_requests_total{op="GetObject"}` as the server reports it.
async fn store_gets(srv: &Server) -> f64 {
    metric_sum(srv, "cellar_store_requests_total", &["GetObject"]).await
}

/// Default config (with S3: small NARs in memory, the others on the default disk cache): a cold
/// substitution reads each object once (prefetching and the client's own requests share their
/// loads), and a warm one reads nothing.
#[tokio::test(flavor = "multi_thread")]
async fn prefetching_reads_each_object_once_and_a_warm_closure_nothing() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let app = App::s3("e2e-prefetch").seed_dir(&f.xz_dir).spawn().await;
    let srv = &app.srv;
    let paths = f.closure.len() as f64;
    substitute_and_verify(&srv.url, &srv.public_key, &f.top, &work.path().join("cold"));
    assert_eq!(
        store_gets(srv).await,
        2.0 * paths,
        "one narinfo and one NAR per path:\n{}",
        srv.log()
    );
    substitute_and_verify(&srv.url, &srv.public_key, &f.top, &work.path().join("warm"));
    // The fixture's `big` path (2 MiB of random data) is over the 64 KiB memory limit: it
    // comes from the disk cache.
    assert_eq!(store_gets(srv).await, 2.0 * paths, "{}", srv.log());
}

/// With `store.redirect_nars`, the client downloads large NARs from the bucket itself: cellar
/// answers their GETs with a redirect to a presigned URL of Garage (its public endpoint here
/// is Garage's own port, while cellar reaches it through a proxy), and the real nix follows
/// it, checks what it got and substitutes the closure. Small NARs still come from cellar.
#[tokio::test(flavor = "multi_thread")]
async fn large_nars_are_downloaded_from_the_bucket_through_presigned_urls() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let s3 = s3_env();
    let app = App::s3("e2e-redirect")
        .through_proxy()
        .seed_dir(&f.xz_dir)
        .env("CELLAR_STORE__REDIRECT_NARS", "true")
        .env("CELLAR_STORE__PUBLIC_ENDPOINT", s3.endpoint.clone())
        .env(
            "CELLAR_CACHE__NAR_DIR",
            work.path().join("nar-cache").to_str().unwrap(),
        )
        .spawn()
        .await;
    let srv = &app.srv;
    let large = std::fs::read_dir(f.xz_dir.join("nar"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().metadata().unwrap().len() > 64 << 10)
        .count();
    assert!(large > 0, "the fixture has a NAR over the memory limit");
    substitute_and_verify(&srv.url, &srv.public_key, &f.top, work.path());
    assert_eq!(
        srv.log_count("NAR redirected to the store"),
        large,
        "{}",
        srv.log()
    );
    assert_eq!(srv.log_count("NAR cache: miss"), 0, "{}", srv.log());
    // The redirect itself, as a client without redirects sees it.
    let nar = std::fs::read_dir(f.xz_dir.join("nar"))
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.metadata().unwrap().len() > 64 << 10)
        .unwrap();
    let name = nar.file_name().to_string_lossy().into_owned();
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c
        .get(format!("{}/nar/{name}", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let to = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(to.starts_with(&s3.endpoint), "{to}");
    assert!(to.contains("X-Amz-Signature="), "{to}");
    // The presigned URL alone (no credentials) reads the NAR from Garage.
    let body = reqwest::get(&to).await.unwrap().error_for_status().unwrap();
    assert!(body.bytes().await.unwrap() == std::fs::read(nar.path()).unwrap());
}
