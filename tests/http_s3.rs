//! The HTTP read path against the real Garage S3 server: every endpoint with GET and HEAD,
//! 404s, ranges, names refused before the store is asked, an unreachable store, corrupt objects
//! in the bucket, a store failing mid-body, and what happens to existing signatures.
//!
//! Every test has its own key prefix (and its own cellar process), so they run in parallel.
//! Where a test cuts the store or counts store traffic, the S3 endpoint sits behind a [`Proxy`].
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod common;
mod replicas_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cellar::nix::{NarInfo, PublicKey, Sha256};
use futures::StreamExt as _;
use reqwest::header::{
    HeaderName, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE,
};
use reqwest::{Method, StatusCode};

use common::*;

const STORE_DIR: &str = "/nix/store";
/// `not_found_max_age_secs`' default.
const NOT_FOUND_CC: &str = "public, max-age=10";
const NAR_CC: &str = "public, max-age=31536000, immutable";

// ---------------------------------------------------------------------------------------------
// Helpers

async fn the_fixture() -> &'static Fixture {
    tokio::task::spawn_blocking(fixture).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        // A guard against a hung server, never an assertion about timing.
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn send(
    c: &reqwest::Client,
    method: Method,
    url: &str,
    range: Option<&str>,
) -> reqwest::Response {
    let mut r = c.request(method.clone(), url);
    if let Some(range) = range {
        r = r.header(RANGE, range);
    }
    r.send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

async fn get(c: &reqwest::Client, url: &str) -> reqwest::Response {
    send(c, Method::GET, url, None).await
}

async fn head(c: &reqwest::Client, url: &str) -> reqwest::Response {
    send(c, Method::HEAD, url, None).await
}

fn hdr(r: &reqwest::Response, name: HeaderName) -> &str {
    r.headers()
        .get(&name)
        .unwrap_or_else(|| panic!("{} has no {name} header: {:?}", r.url(), r.headers()))
        .to_str()
        .unwrap()
}

fn content_length(r: &reqwest::Response) -> u64 {
    hdr(r, CONTENT_LENGTH).parse().unwrap()
}

/// A successful GET: status 200, the headers, the body.
async fn get_ok(c: &reqwest::Client, url: &str) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let r = get(c, url).await;
    assert_eq!(r.status(), StatusCode::OK, "GET {url}");
    let h = r.headers().clone();
    let body = r.bytes().await.unwrap().to_vec();
    (h, body)
}

/// A HEAD that must answer 200 with an empty body; returns its headers.
async fn head_ok(c: &reqwest::Client, url: &str) -> reqwest::header::HeaderMap {
    let r = head(c, url).await;
    assert_eq!(r.status(), StatusCode::OK, "HEAD {url}");
    let h = r.headers().clone();
    assert!(r.bytes().await.unwrap().is_empty(), "HEAD {url} has a body");
    h
}

fn h(m: &reqwest::header::HeaderMap, name: HeaderName) -> &str {
    m.get(&name)
        .unwrap_or_else(|| panic!("no {name} header in {m:?}"))
        .to_str()
        .unwrap()
}

/// Deterministic incompressible bytes (xorshift64).
fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A valid 52-character nix-base32 file hash for `data`.
fn nix32_of(data: &[u8]) -> String {
    Sha256::digest(data).to_nix32()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn parse_narinfo(bytes: &[u8]) -> NarInfo {
    NarInfo::parse(std::str::from_utf8(bytes).unwrap(), STORE_DIR).unwrap()
}

/// Files directly in `dir` whose names end in `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.to_str().unwrap().ends_with(suffix))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no *{suffix} in {}", dir.display());
    v
}

fn file_name(p: &Path) -> &str {
    p.file_name().unwrap().to_str().unwrap()
}

/// The largest NAR of the fixture's xz cache (the 2 MiB `big` path): name and bytes.
fn biggest_nar(dir: &Path) -> (String, Vec<u8>) {
    let p = files_ending(&dir.join("nar"), ".nar.xz")
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    (file_name(&p).to_owned(), read(&p))
}

/// The signed narinfo from the tests' fixtures (key `test-1`), its hash and the public key.
const TOP_NARINFO: &str = include_str!("fixtures/narinfo/top.narinfo");
const TOP_HASH: &str = "f904kp3djilk732cgbnxhpy7vzykbqsh";
const TEST1_PUB: &str = include_str!("fixtures/narinfo/test-1.pub");

/// `TOP_NARINFO` with its StorePath moved to hash `hash` (its Sig no longer verifies, but
/// parses).
fn narinfo_for(hash: &str) -> String {
    TOP_NARINFO.replace(TOP_HASH, hash)
}

/// A syntactically valid store path hash, different per `n`.
fn some_hash(n: u8) -> String {
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    (0..32)
        .map(|i| alphabet[(usize::from(n) * 7 + i * 3) % 32] as char)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Every endpoint, GET and HEAD

#[tokio::test(flavor = "multi_thread")]
async fn cache_info_and_health() {
    let app = App::s3("info").spawn().await;
    let srv = &app.srv;
    let c = client();

    let url = format!("{}/nix-cache-info", srv.url);
    let (hd, body) = get_ok(&c, &url).await;
    assert_eq!(h(&hd, CONTENT_TYPE), "text/x-nix-cache-info");
    let text = String::from_utf8(body.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        ["StoreDir: /nix/store", "WantMassQuery: 1", "Priority: 40"],
        "{text:?}"
    );
    assert!(text.ends_with('\n'));
    assert_eq!(h(&hd, CONTENT_LENGTH), body.len().to_string());
    let hh = head_ok(&c, &url).await;
    assert_eq!(h(&hh, CONTENT_TYPE), "text/x-nix-cache-info");
    assert_eq!(h(&hh, CONTENT_LENGTH), body.len().to_string());

    for (path, text) in [("healthz", "ok\n"), ("readyz", "ready\n")] {
        let url = format!("{}/{path}", srv.url);
        let (hd, body) = get_ok(&c, &url).await;
        assert_eq!(body, text.as_bytes(), "{path}");
        assert_eq!(h(&hd, CACHE_CONTROL), "no-store", "{path}");
        let hh = head_ok(&c, &url).await;
        assert_eq!(h(&hh, CACHE_CONTROL), "no-store", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn narinfos_are_served_signed_by_the_server_key() {
    let f = the_fixture().await;
    let app = App::s3("narinfo").seed_dir(&f.xz_dir).spawn().await;
    let srv = &app.srv;
    let server_key: PublicKey = srv.public_key.parse().unwrap();
    let c = client();

    for path in &f.closure {
        let hash = Fixture::hash(path);
        let original = parse_narinfo(&read(&f.xz_dir.join(format!("{hash}.narinfo"))));

        let url = format!("{}/{hash}.narinfo", srv.url);
        let (hd, body) = get_ok(&c, &url).await;
        assert_eq!(h(&hd, CONTENT_TYPE), "text/x-nix-narinfo");
        assert_eq!(h(&hd, CACHE_CONTROL), "public, max-age=60");
        assert_eq!(h(&hd, CONTENT_LENGTH), body.len().to_string());
        let served = parse_narinfo(&body);
        assert_eq!(format!("{STORE_DIR}/{}", served.store_path), *path);
        // The store's own signatures (if any: the fixture's paths are usually unsigned) are
        // kept, and the server's is added last.
        let text = String::from_utf8_lossy(&body);
        let (ours, theirs) = served.sigs.split_last().unwrap();
        assert_eq!(theirs, original.sigs, "{text}");
        assert_eq!(ours.key_name(), "cellar-test-1", "{text}");
        assert!(served.is_signed_by_any(std::slice::from_ref(&server_key), STORE_DIR));
        // Everything but the signatures is what the store holds.
        let (mut a, mut b) = (served.clone(), original);
        a.sigs.clear();
        b.sigs.clear();
        assert_eq!(a, b);

        let hh = head_ok(&c, &url).await;
        assert_eq!(h(&hh, CONTENT_TYPE), "text/x-nix-narinfo");
        assert_eq!(h(&hh, CONTENT_LENGTH), body.len().to_string());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nars_are_streamed_as_stored() {
    let f = the_fixture().await;
    let app = App::s3("nar").seed_dir(&f.xz_dir).spawn().await;
    let srv = &app.srv;
    let c = client();

    let nars = files_ending(&f.xz_dir.join("nar"), ".nar.xz");
    assert_eq!(nars.len(), f.closure.len());
    for p in &nars {
        let want = read(p);
        let url = format!("{}/nar/{}", srv.url, file_name(p));
        let (hd, body) = get_ok(&c, &url).await;
        assert_eq!(h(&hd, CONTENT_TYPE), "application/x-nix-nar");
        assert_eq!(h(&hd, CONTENT_LENGTH), want.len().to_string());
        assert_eq!(h(&hd, ACCEPT_RANGES), "bytes");
        assert_eq!(h(&hd, CACHE_CONTROL), NAR_CC);
        assert!(hd.get("content-encoding").is_none());
        assert!(body == want, "{url}: body differs from {}", p.display());

        let hh = head_ok(&c, &url).await;
        assert_eq!(h(&hh, CONTENT_TYPE), "application/x-nix-nar");
        assert_eq!(h(&hh, CONTENT_LENGTH), want.len().to_string());
        assert_eq!(h(&hh, ACCEPT_RANGES), "bytes");
        assert_eq!(h(&hh, CACHE_CONTROL), NAR_CC);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_are_served() {
    let f = the_fixture().await;
    let app = App::s3("ls").seed_dir(&f.zstd_dir).spawn().await;
    let srv = &app.srv;
    let c = client();

    let listings = files_ending(&f.zstd_dir, ".ls");
    assert_eq!(listings.len(), f.closure.len());
    for p in &listings {
        let want = read(p);
        let url = format!("{}/{}", srv.url, file_name(p));
        let (hd, body) = get_ok(&c, &url).await;
        assert_eq!(h(&hd, CONTENT_TYPE), "application/json");
        assert_eq!(h(&hd, CONTENT_LENGTH), want.len().to_string());
        assert_eq!(body, want, "{url}");
        let hh = head_ok(&c, &url).await;
        assert_eq!(h(&hh, CONTENT_TYPE), "application/json");
        assert_eq!(h(&hh, CONTENT_LENGTH), want.len().to_string());
    }
    // The zstd cache's NARs are served as they are too.
    let p = &files_ending(&f.zstd_dir.join("nar"), ".nar.zst")[0];
    let (_, body) = get_ok(&c, &format!("{}/nar/{}", srv.url, file_name(p))).await;
    assert_eq!(body, read(p));
}

#[tokio::test(flavor = "multi_thread")]
async fn build_logs_are_served() {
    let f = the_fixture().await;
    let app = App::s3("log").seed_dir(&f.xz_dir).spawn().await;
    let srv = &app.srv;
    let c = client();

    let drv = Fixture::basename(&f.top_drv);
    let want = read(&f.xz_dir.join("log").join(drv));
    let url = format!("{}/log/{drv}", srv.url);
    let (hd, body) = get_ok(&c, &url).await;
    assert_eq!(h(&hd, CONTENT_TYPE), "text/plain; charset=utf-8");
    assert_eq!(h(&hd, CONTENT_LENGTH), want.len().to_string());
    assert_eq!(body, want);
    assert!(String::from_utf8_lossy(&body).contains("building top"));
    let hh = head_ok(&c, &url).await;
    assert_eq!(h(&hh, CONTENT_TYPE), "text/plain; charset=utf-8");
    assert_eq!(h(&hh, CONTENT_LENGTH), want.len().to_string());
}

/// An endpoint written as people write host names (`http://LOCALHOST:3900`, an IPv6 address
/// in full) reaches the store: requests are signed for the URL as it is sent, which the HTTP
/// client normalises, not as it was written.
#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_spelled_in_capitals_is_signed_as_sent() {
    let f = the_fixture().await;
    let s3 = s3_env();
    let endpoint = s3.endpoint.replace("127.0.0.1", "LOCALHOST");
    assert_ne!(endpoint, s3.endpoint, "S3_ENDPOINT is not on 127.0.0.1");
    let app = App::s3("spelled")
        .seed_dir(&f.xz_dir)
        .env("CELLAR_STORE__ENDPOINT", endpoint)
        .spawn()
        .await;
    let c = client();
    let drv = Fixture::basename(&f.top_drv);
    let (_, body) = get_ok(&c, &format!("{}/log/{drv}", app.srv.url)).await;
    assert_eq!(body, read(&f.xz_dir.join("log").join(drv)));
    let hash = Fixture::hash(&f.closure[0]);
    get_ok(&c, &format!("{}/{hash}.narinfo", app.srv.url)).await;
}

/// A store whose endpoint is given as `AWS_ENDPOINT_URL` alone (as the AWS tools take it), with
/// no `store.endpoint`, is read, with cellar's own signed requests as with the key.
#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_from_aws_endpoint_url_is_read() {
    let s3 = s3_env();
    reads_a_narinfo_with_the_endpoint_from(vec![("AWS_ENDPOINT_URL", s3.endpoint.clone())]).await;
}

/// S3's own endpoint variable wins over the shared one, for cellar's own requests as for the
/// SDK's: with `AWS_ENDPOINT_URL` naming a port where nothing listens (a setting for other AWS
/// services), the store named by `AWS_ENDPOINT_URL_S3` is read.
#[tokio::test(flavor = "multi_thread")]
async fn aws_endpoint_url_s3_wins_over_aws_endpoint_url() {
    let s3 = s3_env();
    let nothing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", nothing.local_addr().unwrap());
    drop(nothing);
    reads_a_narinfo_with_the_endpoint_from(vec![
        ("AWS_ENDPOINT_URL", nowhere),
        ("AWS_ENDPOINT_URL_S3", s3.endpoint.clone()),
    ])
    .await;
}

/// Starts cellar on the test bucket with no `store.endpoint`, the endpoint in `endpoint_env`
/// instead, and reads a narinfo through it.
async fn reads_a_narinfo_with_the_endpoint_from(endpoint_env: Vec<(&str, String)>) {
    let s3 = s3_env();
    let prefix = unique_prefix("env-endpoint");
    let hash = some_hash(40);
    s3_put(&s3, &format!("{prefix}{hash}.narinfo"), narinfo_for(&hash)).await;
    let mut env: Vec<(String, String)> = s3_store_env(&s3, &s3.endpoint, &prefix)
        .into_iter()
        .filter(|(k, _)| k != "CELLAR_STORE__ENDPOINT")
        .collect();
    env.extend(endpoint_env.into_iter().map(|(k, v)| (k.to_owned(), v)));
    env.push(("CELLAR_STORE__ACCESS_KEY_ID".into(), s3.key_id.clone()));
    env.push(("CELLAR_STORE__SECRET_ACCESS_KEY".into(), s3.secret.clone()));
    let srv = tokio::task::spawn_blocking(move || Server::start(env))
        .await
        .unwrap();
    let (_, body) = get_ok(&client(), &format!("{}/{hash}.narinfo", srv.url)).await;
    assert!(
        String::from_utf8_lossy(&body).contains(&format!("StorePath: /nix/store/{hash}")),
        "{}",
        String::from_utf8_lossy(&body)
    );
}

/// A store reached only through an HTTP proxy named by `HTTP_PROXY` (a network whose way out
/// is a proxy) is read through it by cellar's own requests as by the SDK's: both take the
/// proxy from the environment. Before, cellar's own requests went to the store directly and
/// failed (every narinfo a 502) while `/readyz`, answered by the SDK, said all was well.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_behind_an_http_proxy_is_read_through_it() {
    let f = the_fixture().await;
    let s3 = s3_env();
    let garage = s3.endpoint.trim_start_matches("http://").to_owned();
    let location = to_garage(&garage);
    let proxy = replicas_support::Nginx::serving("http", |listen| {
        format!(
            r#"
    server {{
        listen {listen};
        client_max_body_size 0;
{location}    }}
"#,
        )
    });
    // A name that resolves nowhere: the store is reached through the proxy or not at all.
    let port = garage.rsplit(':').next().unwrap();
    let app = App::s3("proxy")
        .seed_dir(&f.xz_dir)
        .env(
            "CELLAR_STORE__ENDPOINT",
            format!("http://s3.cellar-test.invalid:{port}"),
        )
        .env("HTTP_PROXY", proxy.url.clone())
        .spawn()
        .await;
    reads_the_top_path_through(&app, f, &proxy).await;
}

/// An nginx `location` passing every request on to Garage at `garage` as it came (its
/// `Host`, which requests are signed with), streamed both ways.
fn to_garage(garage: &str) -> String {
    format!(
        r#"        location / {{
            proxy_pass http://{garage};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
"#
    )
}

/// Reads the fixture's top narinfo and its NAR through `app`, whose store is reached through
/// `nginx` (its logs shown if the narinfo fails).
async fn reads_the_top_path_through(app: &App, f: &Fixture, nginx: &replicas_support::Nginx) {
    let c = client();
    let hash = Fixture::hash(&f.top);
    let res = get(&c, &format!("{}/{hash}.narinfo", app.srv.url)).await;
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "cellar:\n{}\nnginx:\n{}\n{}",
        app.srv.log(),
        nginx.access_log(),
        nginx.error_log()
    );
    let body = res.bytes().await.unwrap();
    let nar = parse_narinfo(&body).url;
    let (_, got) = get_ok(&c, &format!("{}/{nar}", app.srv.url)).await;
    assert_eq!(got, read(&f.xz_dir.join(&nar)));
}

/// A store reached over TLS (nginx with a certificate of its own in front of Garage, as S3
/// behind Caddy, MinIO with TLS, R2): read through cellar, with the certificate trusted
/// through `SSL_CERT_FILE`; and though the store offers HTTP/2, cellar's reads use HTTP/1.1,
/// where a NAR read slowly holds only its own connection (over HTTP/2 every read would share
/// one connection's flow-control window).
#[tokio::test(flavor = "multi_thread")]
async fn a_store_behind_tls_is_read_over_http_1_1() {
    let f = the_fixture().await;
    let s3 = s3_env();
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_certs(certs.path());
    let garage = s3.endpoint.trim_start_matches("http://").to_owned();
    let location = to_garage(&garage);
    let nginx = replicas_support::Nginx::serving("https", |listen| {
        format!(
            r#"
    server {{
        listen {listen} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        client_max_body_size 0;
{location}    }}
"#,
        )
    });
    let endpoint = nginx.url.replace("127.0.0.1", "localhost");
    let app = App::s3("tls")
        .seed_dir(&f.xz_dir)
        .env("CELLAR_STORE__ENDPOINT", endpoint)
        .env("SSL_CERT_FILE", ca)
        .spawn()
        .await;
    reads_the_top_path_through(&app, f, &nginx).await;
    let c = client();
    // The SDK's own HTTPS client (its HeadBucket answers `/readyz`) trusts the certificate too.
    let ready = get(&c, &format!("{}/readyz", app.srv.url)).await;
    assert_eq!(
        ready.status(),
        StatusCode::OK,
        "cellar:\n{}\nnginx:\n{}",
        app.srv.log(),
        nginx.access_log()
    );
    // nginx logs a request once it has sent the answer, which may be after cellar has the
    // bytes and has answered: wait for the NAR's line.
    wait_for_in_file(&nginx.access_log_path(), ".nar.xz ", 1);
    let log = nginx.access_log();
    // The objects' reads (the SDK, which cellar uses for deletes and multipart uploads, and
    // at start, offers HTTP/2 as it likes).
    let reads: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(".narinfo ") || l.contains(".nar.xz "))
        .collect();
    assert!(reads.len() >= 2, "{log}");
    for l in reads {
        assert!(l.ends_with("proto=HTTP/1.1"), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn realisations_and_build_traces_are_served() {
    let drv_hash = nix32_of(b"a CA derivation");
    let id = format!("sha256:{drv_hash}!out");
    let out_path = format!("{}-ca-out", some_hash(1));
    let doi = format!(
        r#"{{"dependentRealisations":{{}},"id":"{id}","outPath":"{out_path}","signatures":[]}}"#
    );
    let drv = format!("{}-ca.drv", some_hash(2));
    let trace = format!(r#"{{"outPath":"{out_path}","signatures":[]}}"#);
    let app = App::s3("ca")
        .seed(format!("realisations/{id}.doi"), doi.clone())
        .seed(format!("build-trace/{drv}/out"), trace.clone())
        .seed(format!("build-trace-v2/{drv}/out.doi"), trace.clone())
        .spawn()
        .await;
    let srv = &app.srv;
    let c = client();

    for (url, want) in [
        // Served signed by the server (see below).
        (format!("{}/realisations/{id}.doi", srv.url), None),
        (format!("{}/build-trace/{drv}/out", srv.url), Some(&trace)),
        (
            format!("{}/build-trace-v2/{drv}/out.doi", srv.url),
            Some(&trace),
        ),
    ] {
        let (hd, body) = get_ok(&c, &url).await;
        assert_eq!(h(&hd, CONTENT_TYPE), "application/json", "{url}");
        assert_eq!(h(&hd, CONTENT_LENGTH), body.len().to_string(), "{url}");
        match want {
            Some(want) => assert_eq!(body, want.as_bytes(), "{url}"),
            None => {
                let served: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let stored: serde_json::Value = serde_json::from_str(&doi).unwrap();
                assert_eq!(served["outPath"], stored["outPath"], "{url}");
                assert_eq!(served["id"], stored["id"], "{url}");
                let sigs = served["signatures"].as_array().unwrap();
                assert_eq!(sigs.len(), 1, "{url}: {served}");
                let by = sigs[0].as_str().unwrap().split(':').next().unwrap();
                assert_eq!(format!("{by}:"), srv.public_key[..by.len() + 1], "{url}");
            }
        }
        let hh = head_ok(&c, &url).await;
        assert_eq!(h(&hh, CONTENT_TYPE), "application/json", "{url}");
        assert_eq!(h(&hh, CONTENT_LENGTH), body.len().to_string(), "{url}");
    }
    // Other outputs of the same derivation are not there.
    for url in [
        format!("{}/realisations/sha256:{drv_hash}!dev.doi", srv.url),
        format!("{}/build-trace/{drv}/dev", srv.url),
        format!("{}/build-trace-v2/{drv}/dev.doi", srv.url),
    ] {
        assert_eq!(get(&c, &url).await.status(), StatusCode::NOT_FOUND, "{url}");
        assert_eq!(
            head(&c, &url).await.status(),
            StatusCode::NOT_FOUND,
            "{url}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Missing objects

#[tokio::test(flavor = "multi_thread")]
async fn missing_objects_are_404_with_a_short_max_age() {
    // Something in the prefix, so the store is not just empty.
    let app = App::s3("missing")
        .seed(format!("{TOP_HASH}.narinfo"), TOP_NARINFO)
        .spawn()
        .await;
    let srv = &app.srv;
    let c = client();

    let hash = some_hash(3);
    let nar = nix32_of(b"no such nar");
    for path in [
        format!("{hash}.narinfo"),
        format!("{hash}.ls"),
        format!("nar/{nar}.nar.xz"),
        format!("nar/{nar}.nar"),
        format!("log/{hash}-missing.drv"),
        format!("realisations/sha256:{nar}!out.doi"),
        format!("build-trace/{hash}-missing.drv/out"),
    ] {
        let url = format!("{}/{path}", srv.url);
        for method in [Method::GET, Method::HEAD] {
            let r = send(&c, method.clone(), &url, None).await;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method} {path}");
            assert_eq!(hdr(&r, CACHE_CONTROL), NOT_FOUND_CC, "{method} {path}");
        }
    }
    // The one that is there still is.
    get_ok(&c, &format!("{}/{TOP_HASH}.narinfo", srv.url)).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Ranges

#[tokio::test(flavor = "multi_thread")]
async fn nar_ranges() {
    let f = the_fixture().await;
    let app = App::s3("range").seed_dir(&f.xz_dir).spawn().await;
    let srv = &app.srv;
    let c = client();

    let (name, want) = biggest_nar(&f.xz_dir);
    let size = want.len();
    assert!(size > 1 << 20, "the big NAR has {size} bytes");
    let url = format!("{}/nar/{name}", srv.url);

    for (range, start, end) in [
        ("bytes=0-99".to_owned(), 0, 99),
        ("bytes=100-".to_owned(), 100, size - 1),
        ("bytes=-50".to_owned(), size - 50, size - 1),
        ("bytes=1000-1000".to_owned(), 1000, 1000),
        // An end past the object is clamped.
        (
            format!("bytes={}-{}", size - 10, size + 1000),
            size - 10,
            size - 1,
        ),
    ] {
        let r = send(&c, Method::GET, &url, Some(&range)).await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            hdr(&r, CONTENT_RANGE),
            format!("bytes {start}-{end}/{size}"),
            "{range}"
        );
        assert_eq!(content_length(&r), (end - start + 1) as u64, "{range}");
        assert_eq!(hdr(&r, CONTENT_TYPE), "application/x-nix-nar", "{range}");
        assert_eq!(hdr(&r, ACCEPT_RANGES), "bytes", "{range}");
        let body = r.bytes().await.unwrap();
        assert!(body[..] == want[start..=end], "{range}: wrong bytes");
    }

    for range in [
        format!("bytes={size}-"),
        format!("bytes={}-", size + 100),
        "bytes=-0".to_owned(),
    ] {
        let r = send(&c, Method::GET, &url, Some(&range)).await;
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(hdr(&r, CONTENT_RANGE), format!("bytes */{size}"), "{range}");
    }

    // Not a single byte range: the whole object (HTTP allows ignoring Range).
    for range in ["bytes=0-1,5-6", "items=0-1", "bytes=9-3"] {
        let r = send(&c, Method::GET, &url, Some(range)).await;
        assert_eq!(r.status(), StatusCode::OK, "{range}");
        assert!(r.headers().get(CONTENT_RANGE).is_none(), "{range}");
        assert_eq!(content_length(&r), size as u64, "{range}");
        assert!(r.bytes().await.unwrap()[..] == want[..], "{range}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Invalid names never reach the store

#[tokio::test(flavor = "multi_thread")]
async fn invalid_names_never_reach_the_store() {
    let app = App::s3("names")
        .through_proxy()
        // Prefetches would reach the store in the background while invalid names are counted.
        .env("CELLAR_CACHE__PREFETCH_CONCURRENCY", "0")
        .seed(format!("{TOP_HASH}.narinfo"), TOP_NARINFO)
        .spawn()
        .await;
    let (srv, proxy) = (&app.srv, app.proxy());
    let c = client();

    // A valid request goes through the proxy (and shows that it counts).
    let before = proxy.bytes_to_store();
    get_ok(&c, &format!("{}/{TOP_HASH}.narinfo", srv.url)).await;
    assert!(proxy.bytes_to_store() > before, "the proxy saw no request");

    let e_hash = format!("e{}", &TOP_HASH[1..]);
    let drv = format!("{TOP_HASH}-x.drv");
    let cases: Vec<(String, StatusCode)> = vec![
        ("nar/..%2F..%2Fetc%2Fpasswd".into(), StatusCode::BAD_REQUEST),
        ("nar/..%2F.nar".into(), StatusCode::BAD_REQUEST),
        ("nar/xyz.nar.gz".into(), StatusCode::BAD_REQUEST),
        (
            format!("nar/{}.nar.gz", nix32_of(b"gz")),
            StatusCode::BAD_REQUEST,
        ),
        (format!("nar/{e_hash}.nar"), StatusCode::BAD_REQUEST),
        ("log/notapath".into(), StatusCode::BAD_REQUEST),
        (
            format!("log/{TOP_HASH}-..%2F..%2Fx"),
            StatusCode::BAD_REQUEST,
        ),
        (format!("log/{TOP_HASH}"), StatusCode::BAD_REQUEST),
        ("realisations/foo.doi".into(), StatusCode::BAD_REQUEST),
        (
            format!("realisations/sha256:{}!..%2Fx.doi", nix32_of(b"r")),
            StatusCode::BAD_REQUEST,
        ),
        ("build-trace/notapath/out".into(), StatusCode::BAD_REQUEST),
        (format!("build-trace/{drv}/..%2Fx"), StatusCode::BAD_REQUEST),
        (
            format!("{}.narinfo", &TOP_HASH[..31]),
            StatusCode::NOT_FOUND,
        ),
        (format!("{e_hash}.narinfo"), StatusCode::NOT_FOUND),
        (
            format!("{}.narinfo", TOP_HASH.to_uppercase()),
            StatusCode::NOT_FOUND,
        ),
        (format!("{TOP_HASH}.narinfo.bak"), StatusCode::NOT_FOUND),
        (format!("{TOP_HASH}.ls%2F..%2Fx"), StatusCode::NOT_FOUND),
        ("favicon.ico".into(), StatusCode::NOT_FOUND),
        ("robots.txt".into(), StatusCode::NOT_FOUND),
        ("nar".into(), StatusCode::NOT_FOUND),
        ("a/b/c".into(), StatusCode::NOT_FOUND),
    ];

    // The start-up cleanup of unfinished uploads lists them through the proxy in the
    // background: counted from when it is done.
    let listed = || {
        metric_sum(
            srv,
            "cellar_store_requests_total",
            &[r#"op="ListMultipartUploads""#],
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while listed().await < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no start-up cleanup");
    }
    let before = proxy.bytes_to_store();
    for (path, want) in &cases {
        for method in [Method::GET, Method::HEAD] {
            let r = send(&c, method.clone(), &format!("{}/{path}", srv.url), None).await;
            assert_eq!(r.status(), *want, "{method} /{path}");
        }
    }
    assert_eq!(
        proxy.bytes_to_store(),
        before,
        "an invalid name reached the store"
    );

    // And the store is still asked for valid names (one not yet in the memory cache).
    let other = format!("0{}", &TOP_HASH[1..]);
    let r = send(
        &c,
        Method::GET,
        &format!("{}/{other}.narinfo", srv.url),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(proxy.bytes_to_store() > before);
}

// ---------------------------------------------------------------------------------------------
// 5. Store down

#[tokio::test(flavor = "multi_thread")]
async fn store_down_is_503_and_recovers() {
    let f = the_fixture().await;
    let app = App::s3("down")
        .through_proxy()
        // A cold narinfo must stay cold: no prefetch of the references of the one asked.
        .env("CELLAR_CACHE__PREFETCH_CONCURRENCY", "0")
        .seed_dir(&f.xz_dir)
        .spawn()
        .await;
    let (srv, proxy) = (&app.srv, app.proxy());
    let c = client();

    let hash = Fixture::hash(&f.top);
    let narinfo = format!("{}/{hash}.narinfo", srv.url);
    let (nar_name, nar) = biggest_nar(&f.xz_dir);
    let readyz = format!("{}/readyz", srv.url);
    let healthz = format!("{}/healthz", srv.url);

    get_ok(&c, &narinfo).await;
    let (_, body) = get_ok(&c, &format!("{}/nar/{nar_name}", srv.url)).await;
    assert!(body == nar);
    get_ok(&c, &readyz).await;
    // A narinfo not yet asked for (so not in the memory cache).
    let cold_hash = f
        .closure
        .iter()
        .map(|p| Fixture::hash(p))
        .find(|h| *h != hash)
        .unwrap();
    let cold = format!("{}/{cold_hash}.narinfo", srv.url);
    // And a NAR not yet asked for (the one asked for is on local disk now: the NAR disk cache
    // is on by default with S3, and serves it while the store is down).
    let cold_nar_path = files_ending(&f.xz_dir.join("nar"), ".nar.xz")
        .into_iter()
        .find(|p| file_name(p) != nar_name)
        .unwrap();
    let cold_nar = read(&cold_nar_path);
    let nar_url = format!("{}/nar/{}", srv.url, file_name(&cold_nar_path));

    proxy.set_down(true);
    // What is in memory is still served while the store is down.
    let (_, body) = get_ok(&c, &narinfo).await;
    assert!(parse_narinfo(&body).is_signed_by_any(&[srv.public_key.parse().unwrap()], STORE_DIR));
    let narinfo = cold;
    for url in [&narinfo, &nar_url, &readyz] {
        for method in [Method::GET, Method::HEAD] {
            let r = send(&c, method.clone(), url, None).await;
            assert_eq!(
                r.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{method} {url}\nserver log:\n{}",
                srv.log()
            );
            assert_eq!(hdr(&r, CACHE_CONTROL), "no-store", "{method} {url}");
        }
    }
    let r = get(&c, &narinfo).await;
    assert_eq!(r.text().await.unwrap(), "store unavailable\n");
    // Range requests and the config-only endpoints are no different.
    let r = send(&c, Method::GET, &nar_url, Some("bytes=0-9")).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (_, body) = get_ok(&c, &healthz).await;
    assert_eq!(body, b"ok\n");
    get_ok(&c, &format!("{}/nix-cache-info", srv.url)).await;

    proxy.set_down(false);
    get_ok(&c, &readyz).await;
    let (_, body) = get_ok(&c, &narinfo).await;
    assert!(parse_narinfo(&body).is_signed_by_any(&[srv.public_key.parse().unwrap()], STORE_DIR));
    let (_, body) = get_ok(&c, &nar_url).await;
    assert!(body == cold_nar, "NAR after recovery differs");
}

/// A store that refuses cellar (a wrong secret) or cannot be reached (nothing listening at
/// the endpoint) is said in the log right after start-up, with the keys to check, before any
/// client asks; the server serves anyway, and `/readyz` says it is not ready.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_refusing_or_unreachable_at_start_up_is_logged_at_once() {
    let s3 = s3_env();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    // (endpoint, secret, region, what the log says, and why)
    for (endpoint, secret, region, said, why) in [
        (
            s3.endpoint.clone(),
            "not-the-secret",
            None,
            "the store refuses cellar at start-up",
            "store.endpoint",
        ),
        (
            closed,
            s3.secret.as_str(),
            None,
            "the store cannot be reached at start-up",
            "store.endpoint",
        ),
        // Garage answers the probe's listing signed for another region 400
        // `AuthorizationHeaderMalformed`.
        (
            s3.endpoint.clone(),
            s3.secret.as_str(),
            Some("eu-west-3"),
            "the store refuses cellar at start-up",
            "another region or at another endpoint; check store.region",
        ),
    ] {
        let mut env = s3_store_env(&s3, &endpoint, &unique_prefix("start-check"));
        env.retain(|(k, _)| region.is_none() || k != "CELLAR_STORE__REGION");
        if let Some(r) = region {
            env.push(("CELLAR_STORE__REGION".into(), r.into()));
        }
        env.push(("CELLAR_STORE__ACCESS_KEY_ID".into(), s3.key_id.clone()));
        env.push(("CELLAR_STORE__SECRET_ACCESS_KEY".into(), secret.into()));
        let srv = tokio::task::spawn_blocking(move || {
            let srv = Server::start(env);
            srv.wait_for_log(said, 1);
            srv
        })
        .await
        .unwrap();
        let log = srv.log();
        assert!(log.contains(why), "{log}");
        let r = get(&client(), &format!("{}/readyz", srv.url)).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{said}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Corrupt narinfos in the bucket

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_narinfos_are_502() {
    let no_narhash = some_hash(10);
    let crlf = some_hash(11);
    let bad_sig = some_hash(12);
    let not_utf8 = some_hash(13);
    let mut not_utf8_body = narinfo_for(&not_utf8).into_bytes();
    not_utf8_body.extend_from_slice(b"System: \xff\xfe\n");
    let no_store_path = some_hash(14);
    let mismatch = some_hash(15);
    let key = |hash: &str| format!("{hash}.narinfo");
    let app = App::s3("corrupt")
        .seed(
            key(&no_narhash),
            narinfo_for(&no_narhash)
                .lines()
                .filter(|l| !l.starts_with("NarHash:"))
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        )
        .seed(key(&crlf), narinfo_for(&crlf).replace('\n', "\r\n"))
        .seed(
            key(&bad_sig),
            format!("{}Sig: test-1:notbase64!\n", narinfo_for(&bad_sig)),
        )
        .seed(key(&not_utf8), not_utf8_body)
        .seed(
            key(&no_store_path),
            narinfo_for(&no_store_path).replace("StorePath: ", "Path: "),
        )
        // A valid narinfo, but under another path's name.
        .seed(key(&mismatch), TOP_NARINFO)
        // A valid one.
        .seed(key(TOP_HASH), TOP_NARINFO)
        // Their NARs are not seeded: a prefetch would find them missing and hide them.
        .env("CELLAR_CACHE__PREFETCH_CONCURRENCY", "0")
        .spawn()
        .await;
    let srv = &app.srv;
    let c = client();

    for hash in [&no_narhash, &crlf, &not_utf8, &no_store_path, &mismatch] {
        let url = format!("{}/{hash}.narinfo", srv.url);
        for method in [Method::GET, Method::HEAD] {
            let r = send(&c, method.clone(), &url, None).await;
            assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{method} {hash}");
            assert_eq!(hdr(&r, CACHE_CONTROL), "no-store", "{method} {hash}");
            if method == Method::GET {
                let body = r.text().await.unwrap();
                assert_eq!(body, "corrupt object in the store\n", "{hash}");
            }
        }
    }

    // A signature no key can verify (Nix throws on it under a trusted name) is dropped; the
    // narinfo is served with the server's own.
    let (_, body) = get_ok(&c, &format!("{}/{bad_sig}.narinfo", srv.url)).await;
    let text = std::str::from_utf8(&body).unwrap();
    assert!(!text.contains("notbase64"), "{text}");
    let names: Vec<_> = parse_narinfo(&body)
        .sigs
        .iter()
        .map(|s| s.key_name().to_owned())
        .collect();
    assert_eq!(names, ["test-1", "cellar-test-1"], "{text}");

    // The server still answers everything else.
    let (_, body) = get_ok(&c, &format!("{}/{TOP_HASH}.narinfo", srv.url)).await;
    let served = parse_narinfo(&body);
    assert_eq!(served.hash().as_str(), TOP_HASH);
    get_ok(&c, &format!("{}/nix-cache-info", srv.url)).await;
    get_ok(&c, &format!("{}/readyz", srv.url)).await;
    let r = get(&c, &format!("{}/{}.narinfo", srv.url, some_hash(16))).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------------------------
// 7. The store failing mid-body

#[tokio::test(flavor = "multi_thread")]
async fn store_cut_mid_body_fails_the_download() {
    const SIZE: usize = 32 << 20;
    let data = pseudo_random(SIZE, 0x5eed);
    let name = format!("{}.nar", nix32_of(&data));
    let app = App::s3("midbody")
        .through_proxy()
        .seed(format!("nar/{name}"), data.clone())
        .spawn()
        .await;
    let (srv, proxy) = (&app.srv, app.proxy());
    let c = client();
    // The fill reads from the store at its own pace, not the client's: held after 1 MiB a
    // connection, it cannot have the whole NAR before the store is cut.
    proxy.hold_after(1 << 20);

    let r = get(&c, &format!("{}/nar/{name}", srv.url)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let length = content_length(&r);
    assert_eq!(length, SIZE as u64);
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    assert!(first[..] == data[..first.len()]);
    let mut received = first.len() as u64;

    proxy.set_down(true);
    let mut error = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(b) => {
                let at = received as usize;
                assert!(b[..] == data[at..at + b.len()], "wrong bytes at {at}");
                received += b.len() as u64;
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    assert!(
        received < length,
        "received all {received} bytes although the store was cut"
    );
    let error = error.unwrap_or_else(|| {
        panic!("the body ended cleanly after {received} of {length} bytes: a short body")
    });
    assert!(!error.is_timeout(), "the download hung instead: {error}");
    assert!(
        error.is_body() || error.is_decode(),
        "not a failed body: {error:?}"
    );

    // The server itself is fine, and serves the NAR again once the store is back.
    let (_, health) = get_ok(&c, &format!("{}/healthz", srv.url)).await;
    assert_eq!(health, b"ok\n");
    proxy.release();
    proxy.set_down(false);
    let r = send(
        &c,
        Method::GET,
        &format!("{}/nar/{name}", srv.url),
        Some("bytes=-1000"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert!(r.bytes().await.unwrap()[..] == data[SIZE - 1000..]);
}

// ---------------------------------------------------------------------------------------------
// 8. Existing signatures

#[tokio::test(flavor = "multi_thread")]
async fn existing_signatures_are_kept_unless_configured_otherwise() {
    let test1: PublicKey = TEST1_PUB.trim().parse().unwrap();
    let original = parse_narinfo(TOP_NARINFO.as_bytes());
    assert!(original.is_signed_by_any(std::slice::from_ref(&test1), STORE_DIR));
    let c = client();

    // Default: the store's signature stays, ours is added. (The narinfo alone is seeded: no
    // prefetch, which would find its NAR missing and hide it.)
    let app = App::s3("sigs")
        .seed(format!("{TOP_HASH}.narinfo"), TOP_NARINFO)
        .env("CELLAR_CACHE__PREFETCH_CONCURRENCY", "0")
        .spawn()
        .await;
    let keep = &app.srv;
    let ours: PublicKey = keep.public_key.parse().unwrap();
    let (_, body) = get_ok(&c, &format!("{}/{TOP_HASH}.narinfo", keep.url)).await;
    let served = parse_narinfo(&body);
    let names: Vec<&str> = served.sigs.iter().map(|s| s.key_name()).collect();
    assert_eq!(names, ["test-1", "cellar-test-1"]);
    assert_eq!(served.sigs[0], original.sigs[0]);
    assert!(served.is_signed_by_any(std::slice::from_ref(&test1), STORE_DIR));
    assert!(served.is_signed_by_any(&[ours], STORE_DIR));

    // keep_existing_signatures = false: only ours.
    let drop = app
        .another_server(&[
            ("CELLAR_SIGNING__KEEP_EXISTING_SIGNATURES", "false"),
            ("CELLAR_CACHE__PREFETCH_CONCURRENCY", "0"),
        ])
        .await;
    let ours: PublicKey = drop.public_key.parse().unwrap();
    let (_, body) = get_ok(&c, &format!("{}/{TOP_HASH}.narinfo", drop.url)).await;
    let served = parse_narinfo(&body);
    let names: Vec<&str> = served.sigs.iter().map(|s| s.key_name()).collect();
    assert_eq!(names, ["cellar-test-1"]);
    assert!(!served.is_signed_by_any(&[test1], STORE_DIR));
    assert!(served.is_signed_by_any(&[ours], STORE_DIR));
    let hh = head_ok(&c, &format!("{}/{TOP_HASH}.narinfo", drop.url)).await;
    assert_eq!(h(&hh, CONTENT_LENGTH), body.len().to_string());
}

// ---------------------------------------------------------------------------------------------
// 9. NAR disk cache over S3

/// Cold NARs through the disk cache arrive whole, for every concurrent client, and warm ones
/// come from disk (nothing reaches S3) with ranges served too.
#[tokio::test(flavor = "multi_thread")]
async fn disk_cached_nars_are_complete_cold_and_warm() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = App::s3("nar-cache")
        .through_proxy()
        .env("CELLAR_CACHE__NAR_DIR", dir.path().to_str().unwrap());
    let mut nars = Vec::new();
    for seed in 0..3u64 {
        let data = pseudo_random((9 << 20) + seed as usize * 4099, seed + 100);
        let name = format!("{}.nar", nix32_of(&data));
        app = app.seed(format!("nar/{name}"), data.clone());
        nars.push((name, data));
    }
    let app = app.spawn().await;
    let (srv, proxy) = (&app.srv, app.proxy());
    let c = client();

    // Cold: four clients at once per NAR, all three NARs at once.
    let mut tasks = Vec::new();
    for (name, data) in &nars {
        for _ in 0..4 {
            let (c, url, data) = (c.clone(), format!("{}/nar/{name}", srv.url), data.clone());
            tasks.push(tokio::spawn(async move {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                let body = r.bytes().await.expect("a cold NAR was cut short");
                assert!(body == data, "a cold NAR differs");
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Fills end right after the last byte: wait for the server to log each NAR stored.
    for (name, _) in &nars {
        srv.wait_for_log(&format!("NAR cache: stored nar={name}"), 1);
    }
    let before = proxy.bytes_to_store();
    for (name, data) in &nars {
        let (_, body) = get_ok(&c, &format!("{}/nar/{name}", srv.url)).await;
        assert!(body == *data, "a warm NAR differs");
        let r = send(
            &c,
            Method::GET,
            &format!("{}/nar/{name}", srv.url),
            Some("bytes=1000-1999"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(r.bytes().await.unwrap().as_ref(), &data[1000..2000]);
    }
    assert_eq!(proxy.bytes_to_store(), before, "warm NARs reached S3");
}
