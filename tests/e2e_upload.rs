//! Uploads with the real nix client (`nix copy --to http://cellar`) into a real Garage, then
//! substitution from cellar into fresh stores; and the refusals (auth, bad uploads) with both
//! nix and raw HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "replicas_support/mod.rs"]
mod replicas_support;

use std::io::{Read as _, Write as _};

use futures::StreamExt as _;
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

/// The PUT requests the server has answered, from its /metrics (every route, every status).
async fn puts_answered(srv: &Server) -> f64 {
    metric_sum(srv, "cellar_http_requests_total", &["method=\"PUT\""]).await
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The xz round writes, reads and lists through the AWS SDK (`store.direct_requests =
/// false`), the zstd round with cellar's own signed requests (the default).
#[tokio::test(flavor = "multi_thread")]
async fn nix_copy_to_cellar_then_substitute_xz_and_zstd() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    for (tag, query, direct) in [("xz", "", "false"), ("zstd", "?compression=zstd", "true")] {
        let app = App::s3(&format!("up-{tag}"))
            .config(&wcfg)
            .env("CELLAR_STORE__DIRECT_REQUESTS", direct)
            .spawn()
            .await;
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
        let n = f.closure.len();
        assert_eq!(srv.log_count("NAR uploaded"), n, "every NAR went up");
        assert_eq!(srv.log_count("narinfo uploaded"), n);
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

        // Two PUTs a path at least (its NAR and narinfo; the .ls and log come along too).
        let first_puts = puts_answered(srv).await;
        assert!(
            first_puts >= 2.0 * n as f64,
            "{first_puts} PUTs for {n} paths"
        );

        // A second copy finds everything present and uploads nothing: not one PUT.
        let out = copy_to(
            &srv.url,
            Some(&netrc),
            &[&f.top],
            work.path(),
            &format!("{tag}-again"),
        );
        assert_ok(&out, "second nix copy --to");
        assert_eq!(srv.log_count("NAR uploaded"), n, "a NAR went up again");
        assert_eq!(
            srv.log_count("narinfo uploaded"),
            n,
            "a narinfo went up again"
        );
        assert_eq!(
            puts_answered(srv).await,
            first_puts,
            "the second copy sent PUTs"
        );
    }
}

/// NARs compressed with br or gzip (`nix copy --to 'http://…?compression=br'`, `=gzip`,
/// which Nix uploads as `<hash>.nar`, with no extension of its own) are verified as xz and
/// zstd ones are, and substitute. They were refused with 400 before.
#[tokio::test(flavor = "multi_thread")]
async fn nars_compressed_with_br_or_gzip_round_trip() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    for (tag, want) in [("br", "Compression: br"), ("gzip", "Compression: gzip")] {
        let app = App::s3(&format!("up-{tag}")).config(&wcfg).spawn().await;
        let srv = &app.srv;
        let netrc = netrc(work.path(), srv, &w);
        let out = copy_to(
            &format!("{}/upload?compression={tag}", srv.url),
            Some(&netrc),
            &[&f.top],
            work.path(),
            tag,
        );
        assert_ok(&out, "nix copy --to");
        assert_eq!(srv.log_count("narinfo uploaded"), f.closure.len());
        let body = reqwest::get(format!("{}/{}.narinfo", srv.url, Fixture::hash(&f.top)))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(body.contains(want), "{body}");
        substitute_and_verify(&srv.url, &srv.public_key, &f.top, &work.path().join(tag));
    }
}

/// `nix store sign --store http://cellar/upload` adds a signature to published paths: a
/// client trusting only that key (not the server's) substitutes them afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn nix_store_sign_adds_signatures_to_published_paths() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    let app = App::s3("sign").config(&wcfg).spawn().await;
    let srv = &app.srv;
    let netrc = netrc(work.path(), srv, &w);
    let upload = format!("{}/upload", srv.url);
    let out = copy_to(&upload, Some(&netrc), &[&f.top], work.path(), "sign");
    assert_ok(&out, "nix copy --to");
    let public = nix_key(
        "release-1",
        &work.path().join("release.sec"),
        &work.path().join("xdg-key"),
    );
    let mut sign = nix("nix", &work.path().join("xdg-sign"));
    sign.args(["store", "sign", "--store", &upload, "-r", "--key-file"])
        .arg(work.path().join("release.sec"))
        .arg("--option")
        .arg("netrc-file")
        .arg(&netrc)
        .arg(&f.top);
    run_ok(sign);
    substitute_and_verify(
        &srv.url,
        &public,
        &f.top,
        &work.path().join("trusting-release"),
    );
}

/// Content-addressed derivations: `nix copy --to` uploads their realisations
/// (`realisations/sha256:<hex>!out.doi`, as Nix names them), and a fresh store that may not
/// build (`--max-jobs 0`) gets the outputs by looking their realisations up through cellar.
#[tokio::test(flavor = "multi_thread")]
async fn content_addressed_derivations_round_trip_through_their_realisations() {
    ca_round_trip("up-ca", false).await;
}

/// With `upload.trusted_keys`, content-addressed outputs built by a builder that signs
/// (`secret-key-files`) go up whole: Nix 2.8's signatures on their realisations check out
/// against cellar's reading of what Nix signs, and a fresh store gets the outputs through them.
/// Realisations nobody signed are refused (the check in `e2e_upload_checks`).
#[tokio::test(flavor = "multi_thread")]
async fn content_addressed_outputs_signed_by_a_trusted_builder_are_accepted() {
    ca_round_trip("up-ca-signed", true).await;
}

/// A `file://` cache Nix wrote with content-addressed derivations (`realisations/`) moved into
/// S3 with `cellar import`: its realisations come along, so a fresh store that may not build
/// gets the outputs through cellar's lookups of them.
#[tokio::test(flavor = "multi_thread")]
async fn import_brings_the_realisations_of_content_addressed_outputs() {
    let work = tempfile::tempdir().unwrap();
    let salt = format!("cellar-import-ca-{}", std::process::id());
    let top = ca_build(work.path(), &salt, None);
    let dir = work.path().join("file-cache");
    let mut copy = nix("nix", &work.path().join("xdg-copy"));
    copy.args(["copy", "--to", &format!("file://{}", dir.display())]);
    ca_expr(&mut copy, &salt);
    run_ok(copy);
    let written = std::fs::read_dir(dir.join("realisations")).unwrap().count();
    assert_eq!(written, 2, "one for each derivation");

    let app = App::s3("import-ca");
    let said = cellar_import(&dir, app.direct_store_env());
    assert!(said.contains(", 2 realisation(s) written"), "{said}");
    let app = app.spawn().await;
    ca_substitute(work.path(), &salt, &app.srv, &top);
}

const CA: &str = "--extra-experimental-features";

/// `c` made to evaluate tests/fixtures/ca.nix with `salt` (so that its paths are new to every
/// store), with content-addressed derivations on.
fn ca_expr(c: &mut std::process::Command, salt: &str) {
    c.args([CA, "ca-derivations", "-f"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ca.nix"))
        .args(["--argstr", "salt", salt]);
}

/// tests/fixtures/ca.nix built with `salt` (signed with the key in `sec`, if given): its top
/// output's path.
fn ca_build(work: &Path, salt: &str, sec: Option<&Path>) -> String {
    let mut b = nix("nix-build", &work.join("xdg-build"));
    b.args([CA, "ca-derivations", "--no-out-link"]);
    if let Some(sec) = sec {
        b.args(["--option", "secret-key-files"]).arg(sec);
    }
    b.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ca.nix"))
        .args(["--argstr", "salt", salt]);
    run_ok(b).trim().to_owned()
}

/// A fresh store that may not build (`--max-jobs 0`) gets the outputs of tests/fixtures/ca.nix
/// (built with `salt`, top output `top`) from `srv`, through their realisations.
fn ca_substitute(work: &Path, salt: &str, srv: &Server, top: &str) {
    let store = work.join("store-ca");
    let mut sub = nix("nix", &work.join("xdg-sub"));
    sub.args(["build", "--no-link", "--max-jobs", "0", "--store"])
        .arg(&store)
        .args([
            "--substituters",
            &srv.url,
            "--trusted-public-keys",
            &srv.public_key,
        ]);
    ca_expr(&mut sub, salt);
    run_ok(sub);
    assert!(store.join(top.trim_start_matches('/')).exists());
}

/// tests/fixtures/ca.nix built (`signed`: by a builder with `secret-key-files`, whose key
/// is cellar's `upload.trusted_keys`), copied to cellar, and substituted into a fresh store
/// through its realisations.
async fn ca_round_trip(bucket: &str, signed: bool) {
    let work = tempfile::tempdir().unwrap();
    let sec = work.path().join("builder.sec");
    let mut config = String::new();
    if signed {
        let public = nix_key("ca-builder-1", &sec, &work.path().join("xdg-keys"));
        config = format!("[upload]\ntrusted_keys = [\"{public}\"]\n");
    }
    let salt = format!("cellar-{bucket}-{}", std::process::id());
    let top = ca_build(work.path(), &salt, signed.then_some(sec.as_path()));

    let (w, wcfg) = token("builder", "write");
    let app = App::s3(bucket)
        .config(&format!("{config}{wcfg}"))
        .spawn()
        .await;
    let srv = &app.srv;
    let n = netrc(work.path(), srv, &w);
    let mut up = nix("nix", &work.path().join("xdg-up"));
    up.args(["copy", "--to", &srv.url, "--option", "netrc-file"])
        .arg(&n);
    ca_expr(&mut up, &salt);
    run_ok(up);
    // The derivations too, as a CI caching its evaluations does (a client's `nix copy --from`
    // of the expression needs them in the cache, see `ca_copy_from`). With trusted_keys: they
    // are text content-addressed paths, which the builder's `secret-key-files` does not sign,
    // taken unsigned on their `CA:`, as Nix takes them.
    {
        let mut drvs = nix("nix", &work.path().join("xdg-up"));
        drvs.args([
            "copy",
            "--derivation",
            "--to",
            &srv.url,
            "--option",
            "netrc-file",
        ])
        .arg(&n);
        ca_expr(&mut drvs, &salt);
        run_ok(drvs);
        let mut inst = nix("nix-instantiate", &work.path().join("xdg-up"));
        inst.args([CA, "ca-derivations"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ca.nix"))
            .args(["--argstr", "salt", &salt]);
        let drv = run_ok(inst).trim().to_owned();
        let hash = &drv.trim_start_matches("/nix/store/")[..32];
        let served = status(format!("{}/{hash}.narinfo", srv.url)).await;
        assert_eq!(served, 200, "{drv}");
    }
    let realisations = |method: &'static str, status: &'static str| {
        let labels = [
            "route=\"realisation\"".to_owned(),
            format!("method=\"{method}\""),
            format!("status=\"{status}\""),
        ];
        async move {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            metric_sum(srv, "cellar_http_requests_total", &labels).await
        }
    };
    assert_eq!(
        realisations("PUT", "2xx").await,
        2.0,
        "one for each derivation"
    );
    assert_eq!(realisations("PUT", "4xx").await, 0.0);

    ca_substitute(work.path(), &salt, srv, &top);
    assert!(
        realisations("GET", "2xx").await >= 2.0,
        "looked up through cellar"
    );
    ca_copy_from(work.path(), &salt, srv, &top);
}

/// `nix copy --from` cellar of tests/fixtures/ca.nix's outputs (built with `salt`, top output
/// `top`) into a fresh store trusting cellar's key alone: Nix 2.8 registers their realisations
/// only with a signature it trusts (the builder's key, if any, is not trusted here), so cellar
/// signs them as it serves them ("cannot register realisation … because it lacks a valid
/// signature" before).
fn ca_copy_from(work: &Path, salt: &str, srv: &Server, top: &str) {
    let store = work.join("store-ca-copy");
    let mut copy = nix("nix", &work.join("xdg-copy-ca"));
    // Nix evaluates into the store it copies from, where the derivations are already.
    copy.args(["copy", "--from", &srv.url, "--store"])
        .arg(&store)
        .args(["--trusted-public-keys", &srv.public_key]);
    ca_expr(&mut copy, salt);
    run_ok(copy);
    assert!(store.join(top.trim_start_matches('/')).exists());
}

/// A new store path of 30 MiB that zstd cannot shrink (four multipart parts), and its
/// contents. The contents are the test run's own, so the path is new to the client's store.
fn large_path(work: &Path) -> (String, Vec<u8>) {
    let file = work.join("large-blob");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut x = seed | 1;
    let blob: Vec<u8> = (0..(30 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&file, &blob).unwrap();
    let mut add = nix("nix-store", &work.join("xdg-add"));
    add.arg("--add").arg(&file);
    (run_ok(add).trim().to_owned(), blob)
}

/// Two builders upload one large NAR at once (two `nix copy` of one closure): Garage ends the
/// slower one's multipart upload when the first completes. The slower upload still succeeds,
/// its body checked against its name (the object stands with the same bytes), nothing is
/// logged as an error, and the path, its narinfo checked against the stored NAR, substitutes
/// whole with the real nix.
#[tokio::test(flavor = "multi_thread")]
async fn two_uploads_of_one_large_nar_at_once_both_succeed() {
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    let (path, _) = large_path(work.path());
    let mut dump = nix("nix-store", &work.path().join("xdg-dump"));
    dump.args(["--dump", &path]);
    let nar = run(dump).stdout;
    let sha = cellar::nix::Sha256::digest(&nar);
    let name = format!("{}.nar", sha.to_nix32());
    let app = App::s3("up-same-nar-twice").config(&wcfg).spawn().await;
    let srv = &app.srv;
    let url = format!("{}/upload/nar/{name}", srv.url);
    // The slower builder: a part and a bit, then the rest once the other is answered.
    let (go, went) = tokio::sync::oneshot::channel::<()>();
    let (head, tail) = nar.split_at(9 << 20);
    let (head, tail) = (
        bytes::Bytes::copy_from_slice(head),
        bytes::Bytes::copy_from_slice(tail),
    );
    let slow_body = futures::stream::once(async move { Ok::<_, std::io::Error>(head) }).chain(
        futures::stream::once(async move {
            let _ = went.await;
            Ok(tail)
        }),
    );
    let client = reqwest::Client::new();
    let slow = tokio::spawn(
        client
            .put(&url)
            .basic_auth("b", Some(&w))
            .header("content-length", nar.len())
            .body(reqwest::Body::wrap_stream(slow_body))
            .send(),
    );
    tokio::task::block_in_place(|| srv.wait_for_log("multipart upload begun", 1));
    let (status, text) = put(&client, url.clone(), &w, nar.clone()).await;
    assert_eq!(status, 201, "{text}");
    go.send(()).unwrap();
    let res = slow.await.unwrap().unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    assert!(status.is_success(), "{status}: {text}\n{}", srv.log());
    assert!(
        srv.log_count("NAR stored meanwhile by another upload of the same name") == 1,
        "{}",
        srv.log()
    );
    assert!(!srv.log().contains(" ERROR "), "{}", srv.log());
    let narinfo = format!(
        "StorePath: {path}\nURL: nar/{name}\nCompression: none\nNarHash: {sha}\n\
         NarSize: {}\nReferences: \n",
        nar.len()
    );
    let hash = Fixture::hash(&path);
    let (status, text) = put(
        &client,
        format!("{}/upload/{hash}.narinfo", srv.url),
        &w,
        narinfo.into_bytes(),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    substitute_and_verify(&srv.url, &srv.public_key, &path, &work.path().join("back"));
}

/// S3 completes a multipart upload but its answer is lost on the way (the connection closes
/// first). The SDK's retry then finds no such upload: the object stands, so the NAR's upload
/// succeeds, and the client does not send its 30 MiB again.
#[tokio::test(flavor = "multi_thread")]
async fn a_completed_upload_whose_answer_was_lost_stands() {
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    let (path, blob) = large_path(work.path());
    let app = App::s3("up-lost-answer")
        .config(&wcfg)
        .through_proxy()
        .spawn()
        .await;
    let srv = &app.srv;
    app.proxy().lose_answer_to("POST ", "uploadId=");
    let netrc = netrc(work.path(), srv, &w);
    let upload = format!("{}/upload?compression=zstd", srv.url);
    let out = copy_to(&upload, Some(&netrc), &[&path], work.path(), "lost");
    assert_ok(&out, "nix copy --to");
    assert_eq!(
        srv.log_count("the upload was completed by a try whose answer was lost"),
        1
    );
    let completes = |result: &str| {
        let labels = [
            "op=\"CompleteMultipartUpload\"".to_owned(),
            format!("result=\"{result}\""),
        ];
        async move {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            metric_sum(srv, "cellar_store_requests_total", &labels).await
        }
    };
    assert_eq!(
        completes("not_found").await,
        1.0,
        "the retry found no upload"
    );
    assert_eq!(completes("ok").await, 0.0);
    assert_eq!(srv.log_count("NAR uploaded"), 1);
    let parts = metric_sum(srv, "cellar_store_requests_total", &["op=\"UploadPart\""]).await;
    assert_eq!(parts, 4.0, "the NAR went up once");
    let back = work.path().join("back");
    substitute_and_verify(&srv.url, &srv.public_key, &path, &back);
    let copied = back.join("store-copy").join(path.trim_start_matches('/'));
    assert!(
        std::fs::read(copied).unwrap() == blob,
        "the path came back different"
    );
}

/// The store going away while a builder uploads: the PUT that met it fails after its body was
/// sent, and Nix 2.8 retries it without its body; those retries are answered 503 at once, the
/// store still not answering (not after a minute each, waiting for a body that never comes),
/// so `nix copy --to` fails within seconds saying 503. The store back, the same builder's copy
/// goes through, and the closure comes back whole. Straight to cellar, then through nginx
/// (which answers `Expect: 100-continue` itself, so cellar waits for the store a few seconds
/// before each 503).
#[tokio::test(flavor = "multi_thread")]
async fn a_store_gone_during_an_upload_fails_the_copy_at_once() {
    store_gone_during_an_upload(false).await;
    store_gone_during_an_upload(true).await;
}

async fn store_gone_during_an_upload(through_nginx: bool) {
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    let f = fixture();
    let app = App::s3("up-store-gone")
        .config(&wcfg)
        .through_proxy()
        .spawn()
        .await;
    let srv = &app.srv;
    let nginx = through_nginx.then(|| replicas_support::Nginx::start(&[srv]));
    let url = nginx.as_ref().map_or(&srv.url, |n| &n.url);
    app.proxy().down_on("PUT ", ".narinfo");
    let netrc = netrc(work.path(), srv, &w);
    let upload = format!("{url}/upload?compression=zstd");
    let copy = || {
        // Nix's own retries (`download-attempts`), as a builder has them.
        let mut c = nix("nix", &work.path().join("xdg-builder"));
        c.args(["copy", "--to", &upload, "--option", "netrc-file"])
            .arg(&netrc)
            .arg(&f.top);
        run(c)
    };
    let out = copy();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the copy succeeded:\n{err}");
    let failure = err
        .rsplit("error: while uploading")
        .next()
        .unwrap_or_default();
    assert!(failure.contains("HTTP error 503"), "{err}");
    assert!(srv.log_count("asked before the upload's body") >= 1);
    app.proxy().set_down(false);
    assert_ok(&copy(), "nix copy --to, the store back");
    substitute_and_verify(&srv.url, &srv.public_key, &f.top, &work.path().join("back"));
}

/// A derivation whose name holds a `?` (Nix allows it in store path names): Nix 2.8 sends its
/// log's URL without encoding it (`/log/<hash>-?what.drv`, whose path alone names no
/// derivation). `nix store copy-log --to` stores the log under the whole name, and `nix log`
/// reads it back through the root URL.
#[tokio::test(flavor = "multi_thread")]
async fn the_log_of_a_derivation_named_with_a_question_mark_round_trips() {
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    let expr = work.path().join("q.nix");
    std::fs::write(
        &expr,
        format!(
            "builtins.derivation {{ name = \"?what\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; salt = \"{}\"; \
             args = [ \"-c\" \"echo building what-now; echo done > $out\" ]; }}",
            unique_prefix("q")
        ),
    )
    .unwrap();
    let mut b = nix("nix-build", &work.path().join("xdg-build"));
    b.arg("--no-out-link").arg(&expr);
    let out = run_ok(b).trim().to_owned();
    assert!(out.ends_with("-?what"), "{out}");
    let app = App::s3("up-question").config(&wcfg).spawn().await;
    let srv = &app.srv;
    let netrc = netrc(work.path(), srv, &w);
    let upload = format!("{}/upload", srv.url);
    assert_ok(
        &copy_to(&upload, Some(&netrc), &[&out], work.path(), "q"),
        "nix copy --to",
    );
    let mut c = nix("nix", &work.path().join("xdg-up-q"));
    c.args([
        "store",
        "copy-log",
        "--to",
        &upload,
        "--option",
        "netrc-file",
    ])
    .arg(&netrc)
    .arg(&out);
    run_ok(c);
    // Under its whole name, as `nix copy --to s3://` and `file://` store it.
    let mut q = nix("nix-store", &work.path().join("xdg-build"));
    q.args(["--query", "--deriver", &out]);
    let drv = run_ok(q).trim().to_owned();
    let key = format!("{}log/{}", app.prefix, Fixture::basename(&drv));
    assert!(key.ends_with("-?what.drv"), "{key}");
    assert!(s3_exists(&app.s3, &key).await, "{key}");
    let mut l = nix("nix", &work.path().join("xdg-log"));
    l.args(["log", "--store", &srv.url, &out]);
    assert!(run_ok(l).contains("building what-now"));
}

/// A path whose NAR spans several multipart parts goes up with `nix copy --to` (its 8 MiB
/// parts sent to Garage several at once, `store.upload_part_concurrency`) and comes back whole
/// into a fresh store; through another cellar, which did not receive it, its narinfo is
/// checked by the digest record stored beside it, not by reading the NAR back.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_path_goes_up_in_parts_and_comes_back_whole() {
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    let (path, blob) = large_path(work.path());

    let app = App::s3("up-parts").config(&wcfg).spawn().await;
    let srv = &app.srv;
    let netrc = netrc(work.path(), srv, &w);
    let upload = format!("{}/upload?compression=zstd", srv.url);
    let out = copy_to(&upload, Some(&netrc), &[&path], work.path(), "parts");
    assert_ok(&out, "nix copy --to");
    let parts = metric_sum(srv, "cellar_store_requests_total", &["op=\"UploadPart\""]).await;
    assert!(parts >= 4.0, "{parts} parts sent for a 30 MiB NAR");
    let back = |srv: &Server, dir: &str| {
        let work = work.path().join(dir);
        substitute_and_verify(&srv.url, &srv.public_key, &path, &work);
        let copied = work.join("store-copy").join(path.trim_start_matches('/'));
        assert!(
            std::fs::read(copied).unwrap() == blob,
            "the path came back different"
        );
    };
    back(srv, "first");

    // Its narinfo lost (an upload that broke off before it, say), the path is uploaded again
    // and its 30 MiB are not: this process stored the NAR, so the client's probe finds it.
    let lose_narinfo = || async {
        let key = format!("{}{}.narinfo", app.prefix, Fixture::hash(&path));
        let s3 = s3_client(&app.s3);
        s3.delete_object()
            .bucket(&app.s3.bucket)
            .key(&key)
            .send()
            .await
            .unwrap();
    };
    let already = "NAR already stored: its body was not asked for";
    let received =
        |srv| async move { metric_sum(srv, "cellar_http_request_bytes_total", &[]).await };
    lose_narinfo().await;
    let before = received(srv).await;
    let out = copy_to(&upload, Some(&netrc), &[&path], work.path(), "again");
    assert_ok(&out, "nix copy --to, again");
    assert_eq!(srv.log_count("NAR uploaded"), 1);
    assert_eq!(srv.log_count(already), 0);
    assert_eq!(srv.log_count("narinfo uploaded"), 2);
    let sent = received(srv).await - before;
    assert!(sent < (1 << 20) as f64, "{sent} bytes received");
    back(srv, "again");

    // Through another cellar (a replica, or this one restarted), which has not seen the NAR:
    // the probe says "absent" without asking, and the NAR's PUT is answered before its body.
    lose_narinfo().await;
    let env = s3_store_env(&app.s3, &app.s3.endpoint, &app.prefix);
    let other = tokio::task::spawn_blocking(move || Server::start_with_config(&wcfg, env))
        .await
        .unwrap();
    let upload = format!("{}/upload?compression=zstd", other.url);
    let out = copy_to(&upload, Some(&netrc), &[&path], work.path(), "other");
    assert_ok(&out, "nix copy --to, through another cellar");
    assert_eq!(other.log_count("NAR uploaded"), 0);
    assert_eq!(other.log_count(already), 1);
    assert_eq!(other.log_count("narinfo uploaded"), 1);
    // Its narinfo is checked by the digest record the first cellar wrote beside the NAR, not
    // by reading the 30 MiB back.
    assert_eq!(other.log_count("NAR checked by its digest record"), 1);
    assert_eq!(other.log_count("read back to check its narinfo"), 0);
    let checks = |how: &'static str| {
        let label = format!("how=\"{how}\"");
        let other = &other;
        async move { metric_sum(other, "cellar_upload_nar_checks_total", &[label.as_str()]).await }
    };
    assert_eq!(checks("record").await, 1.0);
    assert_eq!(checks("read_back").await, 0.0);
    let sent = received(&other).await;
    assert!(sent < (1 << 20) as f64, "{sent} bytes received");
    back(&other, "other");
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

    // nix without credentials, with a wrong token, with a read-only token: refused.
    let out = copy_to(&srv.url, None, &[leaf], work.path(), "none");
    assert!(!out.status.success(), "upload without a token succeeded");
    for (tag, tok) in [("wrong", "cellar_not-a-token"), ("reader", r.as_str())] {
        let n = netrc(work.path(), srv, tok);
        let out = copy_to(&srv.url, Some(&n), &[leaf], work.path(), tag);
        assert!(
            !out.status.success(),
            "upload with the {tag} token succeeded"
        );
    }
    // The statuses, as nix's requests get them: 401 without credentials, 403 otherwise,
    // at the root and at the upload address (where reads need the write token too).
    let c = reqwest::Client::new();
    let up = fixture_upload(&f.xz_dir, leaf);
    for base in [srv.url.clone(), format!("{}/upload", srv.url)] {
        let url = format!("{base}/nar/{}", up.nar_name);
        let res = c.put(&url).body(up.nar.clone()).send().await.unwrap();
        assert_eq!(res.status(), 401, "{url}");
        for tok in ["cellar_not-a-token", r.as_str()] {
            let res = c
                .put(&url)
                .basic_auth("b", Some(tok))
                .body(up.nar.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 403, "{url}");
        }
    }
    let probe = format!("{}/upload/{}.narinfo", srv.url, Fixture::hash(leaf));
    assert_eq!(c.head(&probe).send().await.unwrap().status(), 401);
    let res = c
        .head(&probe)
        .basic_auth("b", Some(&r))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
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
    // Every read of the cache needs the token (the NAR and realisation are refused before
    // any lookup, so their names need not exist); the load balancer's probes do not.
    let h = Fixture::hash(&f.top);
    let nar = "nar/0000000000000000000000000000000000000000000000000000.nar.xz";
    let realisation = format!("realisations/sha256:{}!out.doi", &nar[4..56]);
    let drv = Fixture::basename(&f.top_drv);
    for (path, want) in [
        (format!("{h}.narinfo"), 401),
        (format!("{h}.ls"), 401),
        ("nix-cache-info".into(), 401),
        (nar.into(), 401),
        (format!("log/{drv}"), 401),
        (realisation, 401),
        ("healthz".into(), 200),
        ("readyz".into(), 200),
    ] {
        let got = reqwest::get(format!("{}/{path}", srv.url)).await.unwrap();
        assert_eq!(got.status(), want, "/{path}");
    }
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
    // The builder's HEAD for its xz name finds the re-encoded NAR (a reader's does not, as
    // its GET of that name would not)...
    let xz = fixture_upload(&f.xz_dir, &f.top);
    let head = |token: Option<&str>| {
        let mut req = reqwest::Client::new().head(format!("{}/nar/{}", srv.url, xz.nar_name));
        if let Some(t) = token {
            req = req.basic_auth("builder", Some(t));
        }
        async move { req.send().await.unwrap().status() }
    };
    assert_eq!(head(Some(&w)).await, 200);
    assert_eq!(head(None).await, 404);
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

/// A path whose NAR went from the bucket (deleted by hand, a lifecycle rule): once a client
/// has found the NAR missing, the next builder's `nix copy --to` uploads the path again
/// instead of taking it for present, and clients substitute it whole. (The first builder's
/// own Nix remembers the path as uploaded, for 30 days: a second builder, as in a fleet; and
/// another cellar, a replica or this one restarted, as one that uploaded the NAR within the
/// last minute does not take a miss of it for missing.)
#[tokio::test(flavor = "multi_thread")]
async fn a_path_whose_nar_went_missing_is_uploaded_again() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("up-nar-missing").config(&wcfg).spawn().await;
    let first = &app.srv;
    let work = tempfile::tempdir().unwrap();
    let n = netrc(work.path(), first, &w);
    let upload = format!("{}/upload", first.url);
    assert_ok(
        &copy_to(&upload, Some(&n), &[&f.top], work.path(), "first"),
        "nix copy --to",
    );
    let s3 = s3_client(&app.s3);
    let narinfo_key = format!("{}{}.narinfo", app.prefix, Fixture::hash(&f.top));
    let narinfo = s3_get(&app.s3, &narinfo_key).await;
    let url = String::from_utf8_lossy(&narinfo)
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .unwrap();
    s3.delete_object()
        .bucket(&app.s3.bucket)
        .key(format!("{}{url}", app.prefix))
        .send()
        .await
        .unwrap();
    let env = s3_store_env(&app.s3, &app.s3.endpoint, &app.prefix);
    let srv = tokio::task::spawn_blocking(move || Server::start_with_config(&wcfg, env))
        .await
        .unwrap();
    // A client fails on the NAR.
    let mut c = nix("nix", &work.path().join("xdg-broken"));
    c.args(["copy", "--from", &srv.url, "--store"])
        .arg(work.path().join("broken-store"))
        .args(["--trusted-public-keys", &srv.public_key, &f.top]);
    let out = c.output().unwrap();
    assert!(!out.status.success(), "substituted without its NAR");

    let upload = format!("{}/upload", srv.url);
    let out = copy_to(&upload, Some(&n), &[&f.top], work.path(), "second");
    assert_ok(&out, "nix copy --to by a second builder");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("copying path"),
        "nothing uploaded again: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    substitute_and_verify(
        &srv.url,
        &srv.public_key,
        &f.top,
        &work.path().join("whole"),
    );
}

/// The fixture's `-big` path, and its NAR as `nix copy` compresses and names it (xz, the
/// default): its `URL:` and its bytes.
fn big_nar_as_copied(f: &Fixture) -> (&String, String, Vec<u8>) {
    let big = f.closure.iter().find(|p| p.ends_with("-big")).unwrap();
    let narinfo =
        std::fs::read_to_string(f.xz_dir.join(format!("{}.narinfo", Fixture::hash(big)))).unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();
    let nar = std::fs::read(f.xz_dir.join(&url)).unwrap();
    (big, url, nar)
}

/// A NAR cut short in the bucket (an interrupted `cp` or `mc mirror` into it, a broken
/// restore), with no narinfo naming it yet, is replaced by the first upload of its path: its
/// size differs from the one the client sends, so the body is taken and stored over it. Before,
/// a NAR over 1 MiB found under its name was taken for stored (answered without its body), its
/// narinfo refused, and the path could not be pushed until `cellar verify --repair` deleted it.
#[tokio::test(flavor = "multi_thread")]
async fn a_nar_cut_short_in_the_bucket_is_replaced_by_an_upload() {
    let f = fixture();
    let (big, url, nar) = big_nar_as_copied(f);
    assert!(nar.len() > 1 << 20, "not over the 1 MiB shortcut");
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("up-nar-cut").config(&wcfg).spawn().await;
    let nar_key = format!("{}{url}", app.prefix);
    s3_put(&app.s3, &nar_key, nar[..nar.len() / 2].to_vec()).await;

    let work = tempfile::tempdir().unwrap();
    let n = netrc(work.path(), &app.srv, &w);
    let upload = format!("{}/upload", app.srv.url);
    assert_ok(
        &copy_to(&upload, Some(&n), &[big.as_str()], work.path(), "cut"),
        "nix copy --to over a NAR cut short",
    );
    let stored = s3_get(
        &app.s3,
        &format!("{}{}.narinfo", app.prefix, Fixture::hash(big)),
    )
    .await;
    assert!(
        String::from_utf8_lossy(&stored).contains(&format!("URL: {url}\n")),
        "uploaded under another name than the cut copy's: {}",
        String::from_utf8_lossy(&stored)
    );
    assert!(
        s3_get(&app.s3, &nar_key).await == nar,
        "the cut copy is still stored"
    );
    substitute_and_verify(
        &app.srv.url,
        &app.srv.public_key,
        big,
        &work.path().join("whole"),
    );
}

/// A published path whose NAR is then cut short in the bucket (an interrupted `cp` over it):
/// a client's substitution fails on the NAR (502, retried), and from then on the path's
/// narinfo answers 404, at the root and to builders' probes: another client is told the cache
/// lacks the path (and builds it) rather than failing, and a builder's `nix copy --to` sends
/// the path again, which stores the NAR over the short one; the path is then whole to clients.
#[tokio::test(flavor = "multi_thread")]
async fn a_published_nar_cut_short_hides_its_path_until_a_builder_sends_it_again() {
    let f = fixture();
    let (big, url, nar) = big_nar_as_copied(f);
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("up-published-cut").config(&wcfg).spawn().await;
    let work = tempfile::tempdir().unwrap();
    let n = netrc(work.path(), &app.srv, &w);
    let first = format!("{}/upload", app.srv.url);
    assert_ok(
        &copy_to(&first, Some(&n), &[big.as_str()], work.path(), "first"),
        "nix copy --to",
    );
    let nar_key = format!("{}{url}", app.prefix);
    assert!(s3_get(&app.s3, &nar_key).await == nar);
    s3_put(&app.s3, &nar_key, nar[..nar.len() / 2].to_vec()).await;

    // A replica that did not receive the upload (the one that did takes a miss of a NAR it
    // stored a minute ago for a read begun before its upload, and does not remember it).
    let (config, env) = (wcfg.clone(), app.direct_store_env());
    let srv = &tokio::task::spawn_blocking(move || Server::start_with_config(&config, env))
        .await
        .unwrap();
    let store = work.path().join("store-failed");
    let mut c = nix("nix", &work.path().join("xdg-client"));
    c.args(["copy", "--from", &srv.url, "--store"])
        .arg(&store)
        .args(["--trusted-public-keys", &srv.public_key, big]);
    let out = run(c);
    assert!(!out.status.success(), "substituted a NAR cut short");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("502"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let narinfo = format!("{}/{}.narinfo", srv.url, Fixture::hash(big));
    assert_eq!(reqwest::get(&narinfo).await.unwrap().status(), 404);

    // Another builder (whose own cache does not remember the path as uploaded).
    let again = format!("{}/upload", srv.url);
    let n = netrc(work.path(), srv, &w);
    assert_ok(
        &copy_to(&again, Some(&n), &[big.as_str()], work.path(), "again"),
        "nix copy --to, again",
    );
    assert!(
        s3_get(&app.s3, &nar_key).await == nar,
        "the short copy is still stored"
    );
    assert_eq!(reqwest::get(&narinfo).await.unwrap().status(), 200);
    substitute_and_verify(&srv.url, &srv.public_key, big, &work.path().join("whole"));
}

/// A NAR in the bucket of the right size whose bytes are not what its name says (a disk's
/// corruption, a bad restore), with no narinfo naming it yet: the first `nix copy` is taken
/// for stored, its narinfo's read-back finds the copy bad and refuses it with a 4xx that says
/// to run the copy again (a 5xx would be retried by Nix without its body, stalling minutes a
/// try); the second copy sends the NAR again, which replaces the bad one, and the path is
/// whole. The same Nix user throughout.
#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_nar_in_the_bucket_is_replaced_by_the_next_copy() {
    let f = fixture();
    let (big, url, nar) = big_nar_as_copied(f);
    let mut corrupt = nar.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0xff;
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("up-nar-corrupt").config(&wcfg).spawn().await;
    let nar_key = format!("{}{url}", app.prefix);
    s3_put(&app.s3, &nar_key, corrupt).await;

    let work = tempfile::tempdir().unwrap();
    let n = netrc(work.path(), &app.srv, &w);
    let upload = format!("{}/upload", app.srv.url);
    let first = copy_to(&upload, Some(&n), &[big.as_str()], work.path(), "corrupt");
    let said = String::from_utf8_lossy(&first.stderr);
    assert!(
        !first.status.success(),
        "accepted over a corrupt NAR: {said}"
    );
    assert!(said.contains("run the copy again"), "{said}");
    assert!(said.contains("400"), "{said}");
    assert_ok(
        &copy_to(&upload, Some(&n), &[big.as_str()], work.path(), "corrupt"),
        "the copy run again",
    );
    assert!(
        s3_get(&app.s3, &nar_key).await == nar,
        "the corrupt copy is still stored"
    );
    substitute_and_verify(
        &app.srv.url,
        &app.srv.public_key,
        big,
        &work.path().join("whole"),
    );
}

/// A narinfo in the bucket that cannot be served (here another path's, as a botched copy by
/// hand leaves; clients get a 502 for it) is absent to builders: the next `nix copy --to`
/// uploads the path, its narinfo replaces the broken one, and clients substitute it whole.
/// Before, the upload address answered 502 too and only `cellar verify --repair` mended it.
#[tokio::test(flavor = "multi_thread")]
async fn a_narinfo_in_the_bucket_that_cannot_be_served_is_replaced_by_an_upload() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("up-narinfo-broken").config(&wcfg).spawn().await;
    let leaf = f.closure.iter().find(|p| p.ends_with("-leaf")).unwrap();
    let other = std::fs::read(f.xz_dir.join(format!("{}.narinfo", Fixture::hash(&f.top)))).unwrap();
    let key = format!("{}.narinfo", Fixture::hash(leaf));
    s3_put(&app.s3, &format!("{}{key}", app.prefix), other).await;
    assert_eq!(status(format!("{}/{key}", app.srv.url)).await, 502);

    let work = tempfile::tempdir().unwrap();
    let n = netrc(work.path(), &app.srv, &w);
    let upload = format!("{}/upload", app.srv.url);
    let out = copy_to(&upload, Some(&n), &[leaf.as_str()], work.path(), "broken");
    assert_ok(&out, "nix copy --to over a narinfo that cannot be served");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("copying path"),
        "not uploaded: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    substitute_and_verify(
        &app.srv.url,
        &app.srv.public_key,
        leaf,
        &work.path().join("whole"),
    );
}

/// A cellar over a local directory (`WORK/data`) with `config` (plus a write token), into
/// which the real client has copied the fixture's closure: the directory and the server.
fn local_cellar_with_the_closure(work: &Path, config: &str) -> (std::path::PathBuf, Server) {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let data = work.join("data");
    let srv = Server::start_with_config(
        &format!("{config}{wcfg}"),
        vec![
            ("CELLAR_STORE__KIND".into(), "local".into()),
            ("CELLAR_STORE__PATH".into(), data.to_str().unwrap().into()),
        ],
    );
    let n = netrc(work, &srv, &w);
    assert_ok(
        &copy_to(&srv.url, Some(&n), &[&f.top], work, "local"),
        "upload",
    );
    (data, srv)
}

#[tokio::test(flavor = "multi_thread")]
async fn local_backend_accepts_uploads() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let (data, srv) = local_cellar_with_the_closure(work.path(), "");
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

/// A homelab's cache moved to S3: a local-directory cellar that re-encoded uploads to zstd
/// (its NARs keep the names they were uploaded under, their bytes are what `FileHash` says),
/// imported with `cellar import` of its directory into a bucket; every path comes along, and
/// a client substitutes the closure from the bucket's cellar. Before, each re-encoded NAR was
/// refused (`the body's sha256 is …, but its name says …`).
#[tokio::test(flavor = "multi_thread")]
async fn a_re_encoding_local_cellar_is_imported_into_s3() {
    let f = fixture();
    let work = tempfile::tempdir().unwrap();
    let (data, srv) =
        local_cellar_with_the_closure(work.path(), "[upload]\ncompression = \"zstd\"\n");
    drop(srv);
    let app = App::s3("import-reencoded");
    let said = cellar_import(&data, app.direct_store_env());
    assert!(
        said.contains(&format!("imported {}", f.closure.len())),
        "{said}"
    );
    let app = app.spawn().await;
    substitute_and_verify(
        &app.srv.url,
        &app.srv.public_key,
        &f.top,
        &work.path().join("from-s3"),
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals over raw HTTP, against a fixture written by `nix copy --to file://`.

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

    // A NAR whose bytes do not match its name (the name is its FileHash): a valid xz NAR
    // (mid's), so only the sha256-vs-name check can refuse it.
    let (s, msg) = put(
        &c,
        format!("{u}/nar/{}", leaf.nar_name),
        &w,
        mid.nar.clone(),
    )
    .await;
    assert_eq!(s, 400, "{msg}");
    let want = format!(
        "but its name says {}",
        leaf.nar_name.trim_end_matches(".nar.xz")
    );
    assert!(msg.contains(&want), "{msg}");
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
    let app = App::s3("up-trunc")
        .config(&wcfg)
        .env("RUST_LOG", "info,cellar=debug,cellar::store=trace")
        .spawn()
        .await;
    let (srv, s3, prefix) = (&app.srv, &app.s3, &app.prefix);
    let (s, name) = nar_upload_under_way(srv, &w);
    drop(s);
    // The server notices and aborts it; then nothing is left anywhere.
    srv.wait_for_log("multipart upload aborted", 1);
    assert_no_trace(s3, prefix).await;
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

/// A NAR upload of 20 MiB whose first 12 MiB were sent (by `token`), once the server is in
/// its multipart upload (it logs each S3 request at trace level); the NAR's name.
fn nar_upload_under_way(srv: &Server, token: &str) -> (std::net::TcpStream, &'static str) {
    let name = "0000000000000000000000000000000000000000000000000000.nar";
    let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("b:{token}"))
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
    srv.wait_for_log("op=\"CreateMultipartUpload\"", 1);
    (s, name)
}

/// No object and no multipart upload under `prefix`.
async fn assert_no_trace(s3: &S3Env, prefix: &str) {
    let client = s3_client(s3);
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
    assert!(
        objects.contents().is_empty() && uploads.uploads().is_empty(),
        "the aborted upload left objects or multipart uploads behind: {:?} {:?}",
        objects.contents(),
        uploads.uploads()
    );
}

/// A NAR upload under way when the server is told to stop (`systemctl restart` during a
/// builder's copy), longer than its `shutdown_timeout_secs`: cut off, and its S3 multipart
/// upload aborted before the process exits (the task that aborts a dropped upload would not
/// outlive the process), so nothing is left in the bucket.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_a_shutdown_cuts_off_leaves_no_trace() {
    let (w, wcfg) = token("builder", "write");
    let mut app = App::s3("up-cut")
        .config(&wcfg)
        .env("RUST_LOG", "info,cellar=debug,cellar::store=trace")
        .env("CELLAR_SHUTDOWN_TIMEOUT_SECS", "1")
        .spawn()
        .await;
    let (s, _) = nar_upload_under_way(&app.srv, &w);
    app.srv.stop_in_place();
    assert_no_trace(&app.s3, &app.prefix).await;
    let said = app.srv.log();
    assert!(said.contains("removed=1"), "{said}");
    drop(s);
}

/// Through nginx as the README sets it up (`proxy_request_buffering off`: nginx answers
/// `Expect: 100-continue` itself, so the client has sent its body before cellar sees the
/// request), an upload that arrives while all `upload.max_concurrent` slots are taken waits
/// for one, and the real client's `nix copy` succeeds. Refused at once (503), Nix 2.8 would
/// retry the PUT without its body.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_through_nginx_waits_for_a_slot() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let work = tempfile::tempdir().unwrap();
    let app = App::s3("up-wait")
        .config(&format!("{wcfg}[upload]\nmax_concurrent = 1\n"))
        .spawn()
        .await;
    let srv = &app.srv;
    let nginx = replicas_support::Nginx::start(&[srv]);

    // Another NAR's upload holds the one slot: admitted once cellar asks for its body (100
    // Continue), it sends half of it, the rest when the test says. (The pipeline checks a
    // NAR's header, and its sha256 against its name.)
    let mut nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
    nar.extend_from_slice(&[7u8; 1000]);
    let name = cellar::nix::Sha256::digest(&nar).to_nix32();
    let mut held = std::net::TcpStream::connect(srv.addr).unwrap();
    write!(
        held,
        "PUT /upload/nar/{name}.nar HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {w}\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        nar.len()
    )
    .unwrap();
    let mut head = [0u8; 64];
    let n = held.read(&mut head).unwrap();
    let cont = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(cont.starts_with("HTTP/1.1 100"), "{cont}");
    held.write_all(&nar[..500]).unwrap();

    let leaf = f.closure.iter().find(|p| p.ends_with("-leaf")).unwrap();
    let netrc = netrc(work.path(), srv, &w);
    let mut c = nix("nix", &work.path().join("xdg-up-wait"));
    c.args(["copy", "--option", "download-attempts", "1", "--to"])
        .arg(format!("{}/upload", nginx.url))
        .arg("--option")
        .arg("netrc-file")
        .arg(&netrc)
        .arg(leaf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let copy = c.spawn().unwrap();
    // Its NAR upload waits for the slot...
    srv.wait_for_log("upload waits for one of upload.max_concurrent", 1);
    assert_eq!(metric_sum(srv, "cellar_uploads_waiting", &[]).await, 1.0);
    // ...which it gets when the other ends.
    held.write_all(&nar[500..]).unwrap();
    let mut answer = String::new();
    held.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let out = copy.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nix copy failed:\n{}\nnginx:\n{}",
        String::from_utf8_lossy(&out.stderr),
        nginx.access_log()
    );
    let narinfo = format!("{}/{}.narinfo", srv.url, Fixture::hash(leaf));
    assert_eq!(reqwest::get(&narinfo).await.unwrap().status(), 200);
    // Both gauges are back down (every upload's answer has come: its slot is let go first).
    assert_eq!(metric_sum(srv, "cellar_uploads_waiting", &[]).await, 0.0);
    assert_eq!(metric_sum(srv, "cellar_uploads_running", &[]).await, 0.0);
}

/// Newer Nix compresses the narinfos, listings and logs it uploads when the store URL asks
/// (`narinfo-compression=xz&log-compression=gzip`) and says so in `Content-Encoding`; Nix 2.8
/// cannot, so the test sends the closure as newer Nix would (NARs plain, narinfos in xz, the
/// log in gzip, references first) into Garage. The real client then substitutes the closure
/// from cellar, checking cellar's signatures over what was decoded, and `nix log` reads the
/// log as text.
#[tokio::test(flavor = "multi_thread")]
async fn a_closure_uploaded_compressed_as_newer_nix_sends_it_substitutes() {
    let f = fixture();
    let (w, wcfg) = token("builder", "write");
    let app = App::s3("up-encoded").config(&wcfg).spawn().await;
    let srv = &app.srv;
    let http = reqwest::Client::new();
    let put = |path: String, encoding: Option<&'static str>, body: Vec<u8>| {
        let mut req = http
            .put(format!("{}/upload/{path}", srv.url))
            .bearer_auth(&w)
            .body(body);
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    let xz = |text: &[u8]| {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(text).unwrap();
        e.finish().unwrap()
    };

    let mut pending = Vec::new();
    for entry in std::fs::read_dir(&f.xz_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "narinfo") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let url = text
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_owned();
        let nar = std::fs::read(f.xz_dir.join(&url)).unwrap();
        let (status, body) = put(url.clone(), None, nar).await;
        assert_eq!(status, 201, "{url}: {body}");
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        pending.push((name, text));
    }
    assert_eq!(pending.len(), f.closure.len());
    // References first: a narinfo whose references are not in yet is refused, and sent again
    // in the next round.
    for _round in 0..=f.closure.len() {
        let mut later = Vec::new();
        for (name, text) in pending {
            let (status, body) = put(name.clone(), Some("xz"), xz(text.as_bytes())).await;
            match status {
                201 => {}
                400 if body.contains("reference") => later.push((name, text)),
                _ => panic!("{name}: {status} {body}"),
            }
        }
        pending = later;
        if pending.is_empty() {
            break;
        }
    }
    assert!(pending.is_empty(), "never accepted: {pending:?}");

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"building top, as uploaded in gzip\n")
        .unwrap();
    let log = format!("log/{}", Fixture::basename(&f.top_drv));
    let (status, body) = put(log, Some("gzip"), gz.finish().unwrap()).await;
    assert_eq!(status, 201, "{body}");

    let work = tempfile::tempdir().unwrap();
    substitute_and_verify(&srv.url, &srv.public_key, &f.top, work.path());
    let mut l = nix("nix", &work.path().join("xdg-log"));
    l.args(["log", "--store", &srv.url, &f.top]);
    assert!(run_ok(l).contains("building top, as uploaded in gzip"));
}

/// `nix copy --to '…/upload?index-debug-info=true'` uploads a link for each debug file of a
/// path (`debuginfo/<build id>.debug`, before the NAR), which cellar serves: it names the NAR
/// that holds the file, which cellar serves too. A copy whose NAR is refused (a compression
/// cellar cannot verify) leaves no link behind: the next copy, with another compression and
/// so another NAR name, sends the links again, and they lead to its NAR.
#[tokio::test(flavor = "multi_thread")]
async fn debug_info_links_go_up_with_their_path_and_lead_to_its_nar() {
    let work = tempfile::tempdir().unwrap();
    let salt = format!("cellar-debug-{}", std::process::id());
    let path = debug_info_path(work.path(), &salt);

    let (w, wcfg) = token("builder", "write");
    let app = App::s3("up-debuginfo").config(&wcfg).spawn().await;
    let srv = &app.srv;
    let n = netrc(work.path(), srv, &w);
    let refused = format!("{}/upload?index-debug-info=true&compression=lz4", srv.url);
    let out = copy_to(&refused, Some(&n), &[&path], work.path(), "1");
    assert!(!out.status.success(), "an lz4 NAR was taken");
    let to = format!("{}/upload?index-debug-info=true&compression=zstd", srv.url);
    assert_ok(
        &copy_to(&to, Some(&n), &[&path], work.path(), "1"),
        "nix copy --to with index-debug-info",
    );
    let link_puts = || async {
        metric_sum(
            srv,
            "cellar_http_requests_total",
            &["route=\"debuginfo\"", "method=\"PUT\"", "status=\"2xx\""],
        )
        .await
    };
    assert_eq!(
        link_puts().await,
        4.0,
        "one link for each build id, each copy"
    );

    let narinfo = reqwest::get(format!("{}/{}.narinfo", srv.url, Fixture::hash(&path)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();
    for (id, symbols) in [
        ("abcdef0123456789abcdef0123456789abcdef01", "symbols-1"),
        ("cd0123456789abcdef0123456789abcdef012345", "symbols-2"),
    ] {
        let res = reqwest::get(format!("{}/debuginfo/{id}.debug", srv.url))
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{id}");
        assert_eq!(res.headers()["content-type"], "application/json");
        let raw = res.bytes().await.unwrap();
        // As dwarffs asks for it: the bare build id.
        let bare = reqwest::get(format!("{}/debuginfo/{id}", srv.url))
            .await
            .unwrap();
        assert_eq!(bare.status(), 200, "{id}");
        assert_eq!(bare.bytes().await.unwrap(), raw);
        let link: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(link["archive"], format!("../{url}"), "{link}");
        let member = link["member"].as_str().unwrap();
        assert_eq!(
            member,
            format!("lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..])
        );
        // The NAR it leads to, through cellar, holds the file.
        let nar = reqwest::get(format!("{}/{url}", srv.url))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let nar = zstd::decode_all(&nar[..]).unwrap();
        let holds = |needle: &[u8]| nar.windows(needle.len()).any(|w| w == needle);
        // The file's name (after `lib/debug/.build-id/ab/`) and its contents.
        assert!(holds(symbols.as_bytes()) && holds(&member.as_bytes()[23..]));
    }
    let missing = reqwest::get(format!("{}/debuginfo/{}", srv.url, "0".repeat(40)))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // A name Nix never indexes (an 8-byte build id, as lld makes) is not here either: a 404,
    // which a fetcher of debug symbols takes for "not in this cache" (a 400 would be final).
    let short = reqwest::get(format!("{}/debuginfo/{}", srv.url, "ab".repeat(8)))
        .await
        .unwrap();
    assert_eq!(short.status(), 404);

    substitute_and_verify(&srv.url, &srv.public_key, &path, &work.path().join("sub"));
}
