//! Router tests without a socket, over the in-memory store: what reaches the store.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use super::{app, AppState};
use crate::config::Config;
use crate::nix::SecretKey;
use crate::store::memory::MemoryStore;
use crate::store::Store;

const NARINFO: &str = include_str!("../../tests/fixtures/narinfo/top.narinfo");
const HASH: &str = "f904kp3djilk732cgbnxhpy7vzykbqsh";

/// The fixture's narinfo without its `FileHash`: for tests that serve made-up bytes as its NAR
/// (with it, they are refused as not the NAR it describes).
fn narinfo_unhashed() -> String {
    NARINFO
        .lines()
        .filter(|l| !l.starts_with("FileHash:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Without prefetching, so that store requests counted are the client's own (prefetching is
/// tested in `prefetch/tests.rs`).
pub(super) fn state(mut cfg: Config, mem: &Arc<MemoryStore>) -> AppState {
    cfg.cache.prefetch_concurrency = 0;
    let store: Arc<dyn Store> = mem.clone();
    AppState::new(
        cfg,
        store,
        vec![SecretKey::generate("test-cellar-1").unwrap()],
    )
    .unwrap()
}

/// GET `path` in process: the status and the whole body (the prefetch tests use it too).
pub(super) async fn get(st: &AppState, path: &str) -> (StatusCode, Vec<u8>) {
    let res = app(st.clone())
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    (
        status,
        res.into_body().collect().await.unwrap().to_bytes().to_vec(),
    )
}

/// A cache Nix wrote with a compression cellar does not decode, as libarchive's `lzip` (or
/// `lzop`, `grzip`, `lrzip`, `compress` under a bare `.nar`): its narinfos are served signed
/// and its NARs as stored, as Nix itself reads them (the narinfo was a 502).
#[tokio::test]
async fn a_cache_in_a_compression_cellar_does_not_decode_is_served() {
    let f = "0l74sag416b7yzqh28bm87pdp102zcgslqmm73y4qr1rn0rmqsyx";
    for (compression, ext) in [("lzip", ".lzip"), ("lzop", ""), ("compress", "")] {
        let mem = Arc::new(MemoryStore::new());
        let narinfo = narinfo_unhashed()
            .replace(".nar.xz", &format!(".nar{ext}"))
            .replace("Compression: xz", &format!("Compression: {compression}"));
        mem.insert(&format!("{HASH}.narinfo"), narinfo);
        mem.insert(&format!("nar/{f}.nar{ext}"), vec![7u8; 288]);
        let st = state(Config::default(), &mem);
        let (s, body) = get(&st, &format!("/{HASH}.narinfo")).await;
        assert_eq!(s, StatusCode::OK, "{compression}");
        let body = String::from_utf8(body).unwrap();
        assert!(
            body.contains(&format!("Compression: {compression}\n"))
                && body.contains(&format!("URL: nar/{f}.nar{ext}\n"))
                && body.contains("Sig: test-cellar-1:"),
            "{body}"
        );
        let (s, nar) = get(&st, &format!("/nar/{f}.nar{ext}")).await;
        assert_eq!((s, nar), (StatusCode::OK, vec![7u8; 288]), "{compression}");
    }
}

#[tokio::test]
async fn narinfo_hits_come_from_memory() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    let st = state(Config::default(), &mem);
    let (s, first) = get(&st, &format!("/{HASH}.narinfo")).await;
    assert_eq!(s, StatusCode::OK);
    let after_first = mem.requests();
    assert_eq!(after_first, 1);
    for _ in 0..10 {
        let (s, again) = get(&st, &format!("/{HASH}.narinfo")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(again, first);
    }
    assert_eq!(mem.requests(), after_first, "hits must not touch the store");
    // What /status reports and prefetch asks: one entry, of about the narinfo's size.
    let narinfos = &st.live().narinfos;
    let h = HASH.parse().unwrap();
    assert!(narinfos.contains(h));
    assert!(!narinfos.contains("0l74sag416b7yzqh28bm87pdp102zcgs".parse().unwrap()));
    let (entries, bytes) = narinfos.usage().await;
    assert_eq!(entries, 1);
    assert!(bytes >= NARINFO.len() as u64, "{bytes}");
}

#[tokio::test]
async fn nix_cache_info_is_generated_and_a_put_of_it_changes_nothing() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("ci", "wtok", Scope::Write)]);
    cfg.priority = 41;
    let st = state(cfg, &mem);
    let (status, body) = get(&st, "/nix-cache-info").await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    assert!(text.starts_with("StoreDir: /nix/store\n"), "{text}");
    assert!(text.contains("Priority: 41\n"), "{text}");
    let req = authed("PUT", "/nix-cache-info", "wtok").body(Body::from("StoreDir: /x\n"));
    assert_eq!(
        send(&st, req.unwrap()).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(get(&st, "/nix-cache-info").await.1, text.as_bytes());
    assert!(mem.keys().is_empty(), "nothing was stored");
}

#[tokio::test]
async fn misses_are_remembered_for_the_negative_ttl_only() {
    let path = format!("/{HASH}.narinfo");
    for (ttl, requests) in [(Duration::from_secs(60), 1), (Duration::ZERO, 2)] {
        let mem = Arc::new(MemoryStore::new());
        let mut cfg = Config::default();
        cfg.cache.narinfo_negative_ttl = ttl;
        let st = state(cfg, &mem);
        assert_eq!(get(&st, &path).await.0, StatusCode::NOT_FOUND);
        mem.insert(&format!("{HASH}.narinfo"), NARINFO);
        let expected = if requests == 1 {
            StatusCode::NOT_FOUND // the miss, from memory
        } else {
            StatusCode::OK
        };
        assert_eq!(get(&st, &path).await.0, expected, "negative TTL {ttl:?}");
        assert_eq!(mem.requests(), requests, "negative TTL {ttl:?}");
    }
}

// The store's latency is on tokio's paused clock: it passes only once every request is
// waiting, so all of them are there before the first store read returns.
#[tokio::test(start_paused = true)]
async fn concurrent_misses_cost_one_store_get() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    mem.set_latency(Duration::from_millis(200));
    let st = state(Config::default(), &mem);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let st = st.clone();
            tokio::spawn(async move { get(&st, &format!("/{HASH}.narinfo")).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(mem.requests(), 1);
}

/// A narinfo whose body breaks off while it is read (the store restarted, a reset connection)
/// is a 503 like a store that cannot be reached, which Nix retries: not a 502 for a broken
/// object. The same for a small NAR read whole.
#[tokio::test]
async fn a_body_broken_off_is_the_store_unavailable() {
    use crate::store::memory::FailOp;
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    let st = state(Config::default(), &mem);
    mem.fail(FailOp::Body, &format!("{HASH}.narinfo"), 0, 1);
    let (status, body) = get(&st, &format!("/{HASH}.narinfo")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(
        get(&st, &format!("/{HASH}.narinfo")).await.0,
        StatusCode::OK
    );
    // A small NAR read whole into memory (its narinfo said how small), and one read whole by
    // the disk cache (no memory cache): a 503 too, then served once the store answers.
    let dir = tempfile::tempdir().unwrap();
    let mut on_disk = Config::default();
    on_disk.cache.nar_dir = Some(dir.path().join("nars"));
    on_disk.cache.nar_memory_bytes = 0;
    // (The disk cache asks for a part again four times before it gives up, over 3.5 s: 5
    // failures.)
    for (cfg, hinted, failures) in [(Config::default(), true, 1), (on_disk, false, 5)] {
        let st = state(cfg, &mem);
        let key = format!("nar/{NAR_FILE}.nar.xz");
        mem.insert(&key, vec![1u8; 300]);
        if hinted {
            st.nar_memory
                .hint(&format!("{NAR_FILE}.nar.xz"), Some(300))
                .await;
        }
        mem.fail(FailOp::Body, &key, 0, failures);
        let (status, body) = get(&st, &format!("/{key}")).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{hinted}: {body:?}"
        );
        let (status, body) = get(&st, &format!("/{key}")).await;
        assert_eq!((status, body.len()), (StatusCode::OK, 300), "{hinted}");
    }
}

/// A NAR streamed from the store whose body breaks off once its 200 is sent is cut off, and
/// said in the log with its request (hyper cuts it without a word: a walk found an
/// upstream's broken-off NARs silent, counted as served).
#[tokio::test]
async fn a_streamed_answer_broken_off_is_logged_with_its_request() {
    use crate::store::memory::FailOp;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = Config::default();
    cfg.cache.nar_memory_bytes = 0;
    let st = state(cfg, &mem);
    let key = format!("nar/{NAR_FILE}.nar.xz");
    mem.insert(&key, vec![1u8; 4 << 20]);
    mem.fail(FailOp::Body, &key, 0, 1);
    let logs = crate::test_logs::capture();
    let res = send(
        &st,
        Request::get(format!("/{key}")).body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.into_body().collect().await.is_err(), "not cut off");
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("broke off part-way"))
        .unwrap_or_else(|| panic!("not logged: {text}"));
    assert!(line.contains(&key) && line.contains("WARN"), "{line}");
}

/// The server asks its upstreams' store directory when it builds them (at start, at a
/// reload that changes them), and says one that is not `store_dir`.
#[tokio::test]
async fn an_upstream_of_another_store_directory_is_said_at_start() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = axum::Router::new().route(
        "/nix-cache-info",
        axum::routing::get(|| async { "StoreDir: /gnu/store\n" }),
    );
    tokio::spawn(async move { axum::serve(listener, upstream).await });
    let cfg = Config {
        upstreams: vec![crate::config::UpstreamConfig {
            url,
            public_keys: Vec::new(),
            timeout: Duration::from_secs(5),
            mirror: false,
        }],
        ..Config::default()
    };
    let logs = crate::test_logs::capture();
    let _st = state(cfg, &Arc::new(MemoryStore::new()));
    // The check runs on this (current-thread) runtime: given turns until it has said it.
    let said = tokio::time::timeout(Duration::from_secs(10), async {
        while !logs.text().contains("another store directory") {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(said.is_ok(), "{}", logs.text());
}

#[tokio::test]
async fn store_errors_are_not_cached() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    let st = state(Config::default(), &mem);
    mem.set_down(true);
    assert_eq!(
        get(&st, &format!("/{HASH}.narinfo")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    mem.set_down(false);
    assert_eq!(
        get(&st, &format!("/{HASH}.narinfo")).await.0,
        StatusCode::OK
    );
}

/// A stored narinfo that is broken is a 502 (a corrupt object, logged) at the root, and one
/// whose URL leads elsewhere than `nar/<file>` is not signed and served; at the upload address
/// both are absent (a builder's Nix would choke on the bytes, "illegal character", or skip the
/// path for ever), so that the builder uploads the path, which replaces them.
#[tokio::test]
async fn a_broken_stored_narinfo_is_a_bad_gateway_and_absent_to_builders() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let key = format!("{HASH}.narinfo");
    let url = NARINFO.lines().find(|l| l.starts_with("URL:")).unwrap();
    let elsewhere = [
        NARINFO.replace(url, "URL: http://elsewhere.example/x.nar.xz"),
        NARINFO.replace(url, &format!("URL: nar/../{HASH}.narinfo")),
    ];
    for broken in [
        NARINFO.replace('\n', "\r\n"),
        String::new(),
        elsewhere[0].clone(),
        elsewhere[1].clone(),
    ] {
        mem.insert(&key, broken.clone());
        for method in ["GET", "HEAD"] {
            let req = authed(method, &format!("/upload/{key}"), "wtok").body(Body::empty());
            let upload = send(&st, req.unwrap()).await.status();
            assert_eq!(upload, StatusCode::NOT_FOUND, "{method} {broken:?}");
        }
        let root = get(&st, &format!("/{key}")).await.0;
        assert_eq!(root, StatusCode::BAD_GATEWAY, "{broken:?}");
    }
    mem.insert(&key, NARINFO);
    assert_eq!(get(&st, &format!("/{key}")).await.0, StatusCode::OK);
    let req = authed("GET", &format!("/upload/{key}"), "wtok").body(Body::empty());
    assert_eq!(send(&st, req.unwrap()).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn invalid_names_never_reach_the_store() {
    let mem = Arc::new(MemoryStore::new());
    let st = state(Config::default(), &mem);
    for p in [
        "/nar/..%2F..%2Fetc%2Fpasswd",
        "/nar/abc.nar.gz",
        "/log/notapath",
        "/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo",
        "/favicon.ico",
        "/realisations/x.doi",
    ] {
        let (s, _) = get(&st, p).await;
        assert!(
            s == StatusCode::NOT_FOUND || s == StatusCode::BAD_REQUEST,
            "{p}: {s}"
        );
    }
    assert_eq!(mem.requests(), 0);
}

#[tokio::test]
async fn an_upload_during_a_lookup_is_not_hidden_by_a_cached_miss() {
    let mem = Arc::new(MemoryStore::new());
    let st = state(Config::default(), &mem);
    let gate = mem.hold_reads(&format!("{HASH}.narinfo"));
    let mut lookup = {
        let st = st.clone();
        tokio::spawn(async move { get(&st, &format!("/{HASH}.narinfo")).await })
    };
    // The lookup has found nothing and not answered yet when the upload lands. (A lookup
    // that answers without reading the store fails here instead of leaving the test waiting.)
    tokio::select! {
        () = gate.reached() => {}
        r = &mut lookup => panic!("the lookup answered {:?} without reading the store", r.unwrap().0),
    }
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    st.live().narinfos.invalidate(HASH.parse().unwrap()).await;
    gate.open();
    // The lookup's miss crossed the upload: it looks again instead of remembering the miss.
    assert_eq!(lookup.await.unwrap().0, StatusCode::OK);
    assert_eq!(
        get(&st, &format!("/{HASH}.narinfo")).await.0,
        StatusCode::OK
    );
    assert_eq!(mem.requests(), 2, "one read before the upload, one after");
}

// The store's latency is on tokio's paused clock: it passes only once every request is
// waiting, so all of them are there before the first store read returns.
#[tokio::test(start_paused = true)]
async fn without_a_memory_cache_concurrent_misses_still_coalesce() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    mem.set_latency(Duration::from_millis(200));
    let mut cfg = Config::default();
    cfg.cache.narinfo_memory_bytes = 0;
    let st = state(cfg, &mem);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let st = st.clone();
            tokio::spawn(async move { get(&st, &format!("/{HASH}.narinfo")).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(mem.requests(), 1);
}

pub(super) async fn head(st: &AppState, path: &str) -> (StatusCode, Option<String>) {
    let res = app(st.clone())
        .oneshot(Request::head(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let len = res
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .map(|v| v.to_str().unwrap().to_owned());
    (res.status(), len)
}

const NAR_FILE: &str = "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7";

#[tokio::test]
async fn head_of_a_nar_has_the_length_of_its_get() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("nar/{NAR_FILE}.nar.xz"), vec![1u8; 300]);
    let st = state(Config::default(), &mem);
    let path = format!("/nar/{NAR_FILE}.nar.xz");
    let (s, body) = get(&st, &path).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        head(&st, &path).await,
        (StatusCode::OK, Some(body.len().to_string()))
    );
    let missing = format!("/nar/{NAR_FILE}.nar.zst");
    assert_eq!(head(&st, &missing).await.0, StatusCode::NOT_FOUND);
}

/// HEAD of a NAR says whether the store has it (`nix copy --to` the root URL uploads the NAR
/// only on a 404): a NAR a collection deleted is a 404 though memory still holds it. While the
/// store cannot be asked, what memory holds answers.
#[tokio::test]
async fn head_of_a_nar_asks_the_store_before_memory() {
    let mem = Arc::new(MemoryStore::new());
    let nar = "0l74sag416b7yzqh28bm87pdp102zcgslqmm73y4qr1rn0rmqsyx.nar.xz";
    mem.insert(&format!("{HASH}.narinfo"), narinfo_unhashed());
    mem.insert(&format!("nar/{nar}"), vec![1u8; 288]);
    let st = state(Config::default(), &mem);
    // The narinfo says the NAR is small; its GET keeps it in memory.
    assert_eq!(
        get(&st, &format!("/{HASH}.narinfo")).await.0,
        StatusCode::OK
    );
    assert_eq!(get(&st, &format!("/nar/{nar}")).await.0, StatusCode::OK);
    mem.set_down(true);
    assert_eq!(
        head(&st, &format!("/nar/{nar}")).await,
        (StatusCode::OK, Some("288".into()))
    );
    mem.set_down(false);
    mem.remove(&format!("nar/{nar}"));
    assert_eq!(
        head(&st, &format!("/nar/{nar}")).await.0,
        StatusCode::NOT_FOUND,
        "deleted from the store, answered from memory"
    );
}

/// A builder's HEAD at the root finds a NAR stored re-encoded under the name it uploads (so it
/// is not sent again); a reader's does not, as its GET of that name would not.
#[tokio::test]
async fn head_of_a_nar_finds_it_re_encoded_on_upload() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    // Uploaded as .nar.xz, stored re-encoded as .nar.zst.
    mem.insert(&format!("nar/{NAR_FILE}.nar.zst"), vec![1u8; 200]);
    let tokens = |cfg| with_tokens(cfg, &[("w", "wtok", Scope::Write)]);
    let mut cfg = tokens(Config::default());
    cfg.upload.recompress = zstd_on_upload();
    let st = state(cfg, &mem);
    let builder = |st: AppState| async move {
        let req = authed("HEAD", &format!("/nar/{NAR_FILE}.nar.xz"), "wtok");
        let res = send(&st, req.body(Body::empty()).unwrap()).await;
        (res.status(), res.headers().get("content-length").cloned())
    };
    assert_eq!(
        builder(st.clone()).await,
        (StatusCode::OK, Some("200".parse().unwrap()))
    );
    assert_eq!(
        head(&st, &format!("/nar/{NAR_FILE}.nar.xz")).await.0,
        StatusCode::NOT_FOUND,
        "a reader"
    );
    // Without recompression, the name the client used is all there is.
    let st = state(tokens(Config::default()), &mem);
    assert_eq!(builder(st).await.0, StatusCode::NOT_FOUND);
}

/// Uploads re-encoded to zstd at its default level (`upload.compression = "zstd"`).
fn zstd_on_upload() -> Option<crate::config::Recompression> {
    Some(crate::config::Recompression {
        compression: crate::nix::Compression::Zstd,
        level: None,
    })
}

/// An upstream that fails at once: nothing listens on the discard port here, so the
/// connection is refused.
pub(super) fn dead_upstream() -> crate::config::UpstreamConfig {
    crate::config::UpstreamConfig {
        url: "http://127.0.0.1:9".into(),
        public_keys: vec![crate::nix::SecretKey::generate("up-1").unwrap().public()],
        timeout: std::time::Duration::from_secs(5),
        mirror: false,
    }
}

/// With an upstream that cannot be asked, a log, listing or realisation the store lacks is not
/// found for now: 404 to GET and HEAD alike, kept by no cache (`no-store`), as a narinfo is;
/// `nix log` then says it has none instead of failing after its retries. A NAR's GET stays a
/// 503 (its narinfo said it is there, and Nix retries). HEAD of a NAR stays a 404 (uploads to
/// the root URL send it before each NAR, and a 503 would fail the copy) and finds a re-encoded
/// NAR first for a builder, under the name it uploads; not for a reader, whose GET of that
/// name is a 404.
#[tokio::test]
async fn lookups_while_an_upstream_is_down_are_not_found_for_now() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("nar/{NAR_FILE}.nar.zst"), vec![1u8; 200]);
    let cfg = Config {
        upstreams: vec![dead_upstream()],
        ..Config::default()
    };
    let mut cfg = with_tokens(cfg, &[("w", "wtok", Scope::Write)]);
    cfg.upload.recompress = zstd_on_upload();
    let st = state(cfg, &mem);
    let drv = "5g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-top.drv";
    let drv_hash = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
    for path in [
        format!("/log/{drv}"),
        format!("/{HASH}.ls"),
        format!("/realisations/sha256:{drv_hash}!out.doi"),
    ] {
        for method in ["GET", "HEAD"] {
            let res = app(st.clone())
                .oneshot(
                    Request::builder()
                        .method(method)
                        .uri(&path)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::NOT_FOUND, "{method} {path}");
            assert_eq!(
                res.headers()["cache-control"],
                "no-store",
                "{method} {path}"
            );
        }
        // The upstream's failure is not remembered: with the object in the store now, found.
        mem.insert(&path[1..], format!(r#"{{"outPath":"{HASH}-top"}}"#));
        assert_eq!(get(&st, &path).await.0, StatusCode::OK, "{path}");
    }
    // A build trace is never taken from an upstream (its signatures cannot be checked): a
    // plain miss, whatever the upstreams' state.
    let trace = format!("/build-trace-v2/{drv}/out.doi");
    let res = send(&st, Request::get(&trace).body(Body::empty()).unwrap()).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_ne!(res.headers()["cache-control"], "no-store");
    let absent = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
    assert_eq!(
        get(&st, &format!("/nar/{absent}.nar.xz")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let builder = authed("HEAD", &format!("/nar/{NAR_FILE}.nar.xz"), "wtok");
    let res = send(&st, builder.body(Body::empty()).unwrap()).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-length"], "200");
    assert_eq!(
        head(&st, &format!("/nar/{NAR_FILE}.nar.xz")).await.0,
        StatusCode::NOT_FOUND,
        "a reader's HEAD says what its GET does"
    );
    assert_eq!(
        head(&st, &format!("/nar/{absent}.nar.xz")).await.0,
        StatusCode::NOT_FOUND
    );
}

/// An upstream serving the fixture's narinfo signed by `key` with its NAR at `nar/<file>`
/// (`Compression` as the name says), and that NAR as `nar` answers; another narinfo is a 500
/// (asking for one counts as its failure), anything else a 404. The second value counts
/// the requests it was sent for its NAR.
async fn upstream_naming(
    key: &SecretKey,
    file: &str,
    nar: impl Fn() -> axum::response::Response + Clone + Send + Sync + 'static,
) -> (
    crate::config::UpstreamConfig,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use axum::response::IntoResponse as _;
    let compression = if file.ends_with(".zst") { "zstd" } else { "xz" };
    let text = NARINFO
        .lines()
        .filter(|l| !l.starts_with("Sig:") && !l.starts_with("FileHash:"))
        .map(|l| match l {
            l if l.starts_with("URL:") => format!("URL: nar/{file}"),
            l if l.starts_with("Compression:") => format!("Compression: {compression}"),
            l => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut info = crate::nix::NarInfo::parse(&text, "/nix/store").unwrap();
    info.sign(key, "/nix/store");
    let narinfo = info.render("/nix/store");
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = asked.clone();
    let app = axum::Router::new()
        .route(
            &format!("/{HASH}.narinfo"),
            axum::routing::get(move || async move { narinfo.into_response() }),
        )
        .route(
            &format!("/nar/{file}"),
            axum::routing::get(move || async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                nar()
            }),
        )
        .fallback(|uri: axum::http::Uri| async move {
            if uri.path().ends_with(".narinfo") {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::NOT_FOUND
            }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = crate::config::UpstreamConfig {
        url,
        public_keys: vec![key.public()],
        timeout: Duration::from_secs(5),
        mirror: false,
    };
    (config, asked)
}

fn nar_not_found() -> axum::response::Response {
    use axum::response::IntoResponse as _;
    StatusCode::NOT_FOUND.into_response()
}

fn nar_failing() -> axum::response::Response {
    use axum::response::IntoResponse as _;
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

/// The NAR at the size the fixture's narinfo gives.
fn nar_served() -> axum::response::Response {
    use axum::response::IntoResponse as _;
    vec![7u8; 288].into_response()
}

/// The URL line of the narinfo of the fixture's path as `st` serves it, or its status.
async fn served_url(st: &AppState) -> Result<String, StatusCode> {
    let (s, body) = get(st, &format!("/{HASH}.narinfo")).await;
    if s != StatusCode::OK {
        return Err(s);
    }
    let text = String::from_utf8(body).unwrap();
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned())
}

/// A server over an empty store, with `upstreams`.
fn through(upstreams: Vec<crate::config::UpstreamConfig>) -> AppState {
    state(
        Config {
            upstreams,
            ..Config::default()
        },
        &Arc::new(MemoryStore::new()),
    )
}

const XZ_NAR: &str = "0l74sag416b7yzqh28bm87pdp102zcgslqmm73y4qr1rn0rmqsyx.nar.xz";
const ZST_NAR: &str = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s.nar.zst";

/// A server over two upstreams serving the fixture's path: the first names [`XZ_NAR`],
/// answered as `first_nar` says (and counts the requests for it), the second [`ZST_NAR`],
/// served.
async fn first_then_second(
    first_nar: fn() -> axum::response::Response,
) -> (AppState, Arc<std::sync::atomic::AtomicUsize>) {
    let (first, asked) =
        upstream_naming(&SecretKey::generate("a-1").unwrap(), XZ_NAR, first_nar).await;
    let (second, _) =
        upstream_naming(&SecretKey::generate("b-1").unwrap(), ZST_NAR, nar_served).await;
    (through(vec![first, second]), asked)
}

/// The first upstream's narinfo names a NAR it turns out not to have: the path is then the
/// next upstream's, which has it whole (under another name), not a 404 for the narinfo's TTL.
#[tokio::test]
async fn a_nar_the_first_upstream_lacks_leaves_the_path_to_the_next() {
    let (st, _) = first_then_second(nar_not_found).await;
    assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
    assert_eq!(
        get(&st, &format!("/nar/{XZ_NAR}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(served_url(&st).await, Ok(format!("nar/{ZST_NAR}")));
    assert_eq!(
        get(&st, &format!("/nar/{ZST_NAR}")).await,
        (StatusCode::OK, vec![7u8; 288])
    );
    // With no other source, the path stays hidden (a 404, not a NAR that fails).
    let (only, _) =
        upstream_naming(&SecretKey::generate("a-1").unwrap(), XZ_NAR, nar_not_found).await;
    let st = through(vec![only]);
    assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
    assert_eq!(
        get(&st, &format!("/nar/{XZ_NAR}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(served_url(&st).await, Err(StatusCode::NOT_FOUND));
}

/// A narinfo in memory from an upstream that has since failed enough to be skipped, whose NAR
/// is nowhere here: looked up again, and the next upstream's served, rather than one whose
/// NAR fails until its TTL ends. While the upstream answers, it is served from memory.
#[tokio::test]
async fn a_narinfo_from_a_skipped_upstream_is_looked_up_again() {
    let (st, nar_asked) = first_then_second(nar_failing).await;
    assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
    // One failure does not skip the upstream: its narinfo stays.
    assert_eq!(
        get(&st, &format!("/nar/{XZ_NAR}")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
    while !st.live().upstreams.any_skipped() {
        assert_eq!(
            get(&st, &format!("/nar/{XZ_NAR}")).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(nar_asked.load(std::sync::atomic::Ordering::SeqCst) < 10);
    }
    assert_eq!(served_url(&st).await, Ok(format!("nar/{ZST_NAR}")));
    // With no other upstream to ask, it stays: looked up again it would be a 404, which
    // clients keep for an hour, for an outage of seconds.
    let (only, _) =
        upstream_naming(&SecretKey::generate("a-1").unwrap(), XZ_NAR, nar_failing).await;
    let st = through(vec![only]);
    assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
    while !st.live().upstreams.any_skipped() {
        get(&st, &format!("/nar/{XZ_NAR}")).await;
    }
    assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
}

/// The store's narinfo names a NAR the store turns out not to have: the path is then an
/// upstream's, if one has it whole.
#[tokio::test]
async fn a_nar_the_store_lacks_leaves_the_path_to_an_upstream() {
    let (up, _) = upstream_naming(&SecretKey::generate("b-1").unwrap(), ZST_NAR, nar_served).await;
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    let st = state(
        Config {
            upstreams: vec![up],
            ..Config::default()
        },
        &mem,
    );
    assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
    assert_eq!(
        get(&st, &format!("/nar/{XZ_NAR}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(served_url(&st).await, Ok(format!("nar/{ZST_NAR}")));
}

/// A path an upstream served, stored since under the same NAR name (mirrored, uploaded): its
/// narinfo, the store's now, is served from memory while that upstream is skipped (its NAR
/// is the store's first), not read again on every request.
#[tokio::test]
async fn a_stored_narinfo_is_not_looked_up_again_for_an_upstream_skipped() {
    let (up, _) = upstream_naming(&SecretKey::generate("a-1").unwrap(), XZ_NAR, nar_served).await;
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        Config {
            upstreams: vec![up],
            ..Config::default()
        },
        &mem,
    );
    let h = HASH.parse().unwrap();
    assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    mem.insert(&format!("nar/{XZ_NAR}"), vec![7u8; 288]);
    st.live().narinfos.invalidate(h).await;
    assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
    let other = "1b8m03r63zqhnjf7l5wnldhh7c134ap5";
    while !st.live().upstreams.any_skipped() {
        get(&st, &format!("/{other}.narinfo")).await;
    }
    let read = mem.gets_under(&format!("{HASH}.narinfo"));
    assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
    assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
    assert_eq!(mem.gets_under(&format!("{HASH}.narinfo")), read);
}

/// A narinfo from an upstream skipped now whose NAR is at hand here (in memory, or in the
/// disk cache) is still served: its NAR is.
#[tokio::test]
async fn a_narinfo_from_a_skipped_upstream_whose_nar_is_here_stays() {
    let dir = tempfile::tempdir().unwrap();
    let mut on_disk = Config::default();
    on_disk.cache.nar_dir = Some(dir.path().join("nars"));
    on_disk.cache.nar_memory_bytes = 0;
    for (cfg, place) in [(Config::default(), "memory"), (on_disk, "disk")] {
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = failing.clone();
        let nar = move || {
            if f.load(std::sync::atomic::Ordering::SeqCst) {
                nar_failing()
            } else {
                nar_served()
            }
        };
        let (first, _) = upstream_naming(&SecretKey::generate("a-1").unwrap(), XZ_NAR, nar).await;
        let (second, _) =
            upstream_naming(&SecretKey::generate("b-1").unwrap(), ZST_NAR, nar_served).await;
        let st = state(
            Config {
                upstreams: vec![first, second],
                ..cfg
            },
            &Arc::new(MemoryStore::new()),
        );
        assert_eq!(served_url(&st).await, Ok(format!("nar/{XZ_NAR}")));
        assert_eq!(
            get(&st, &format!("/nar/{XZ_NAR}")).await,
            (StatusCode::OK, vec![7u8; 288]),
            "{place}"
        );
        failing.store(true, std::sync::atomic::Ordering::SeqCst);
        // The first upstream fails every narinfo asked of it now: skipped after a few.
        let other = "1b8m03r63zqhnjf7l5wnldhh7c134ap5";
        while !st.live().upstreams.any_skipped() {
            assert_eq!(
                get(&st, &format!("/{other}.narinfo")).await.0,
                StatusCode::NOT_FOUND
            );
        }
        assert_eq!(
            served_url(&st).await,
            Ok(format!("nar/{XZ_NAR}")),
            "{place}"
        );
        assert_eq!(
            get(&st, &format!("/nar/{XZ_NAR}")).await,
            (StatusCode::OK, vec![7u8; 288]),
            "{place}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The upload address, bounds at the door, reloads.

pub(super) fn with_tokens(
    mut cfg: Config,
    tokens: &[(&str, &str, crate::config::Scope)],
) -> Config {
    cfg.auth.tokens = tokens
        .iter()
        .map(|(name, token, scope)| crate::config::TokenConfig {
            name: (*name).into(),
            hash: crate::config::TokenHash::of(token),
            scopes: vec![*scope],
        })
        .collect();
    cfg
}

pub(super) async fn send(st: &AppState, req: Request<Body>) -> axum::response::Response {
    app(st.clone()).oneshot(req).await.unwrap()
}

pub(super) fn authed(method: &str, path: &str, token: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {token}"))
}

/// A read refused for a token that matches none (Nix then builds what it would have
/// substituted, without an error) is logged, at most once a minute; a read without a token
/// (curl's first try before it sends netrc credentials, a browser) is not.
#[tokio::test(start_paused = true)]
async fn reads_refused_for_an_unknown_token_are_logged_once_a_minute() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("r", "rtok", Scope::Read)]);
    cfg.auth.private = true;
    let st = state(cfg, &mem);
    let logs = crate::test_logs::capture();
    let narinfo = format!("/{}.narinfo", "0".repeat(32));
    let warned = || logs.text().matches("matches none configured").count();
    let res = send(&st, Request::get(&narinfo).body(Body::empty()).unwrap()).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(warned(), 0);
    for expected in [1, 1] {
        let res = send(
            &st,
            authed("GET", &narinfo, "revoked")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(warned(), expected);
    }
    tokio::time::advance(std::time::Duration::from_secs(61)).await;
    let res = send(
        &st,
        authed("GET", &narinfo, "revoked")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(warned(), 2);
}

/// An upload refused for its token (one that matches none, a read token) is logged with what
/// to check, at most once a minute: `nix copy --to` says only that the upload URL does not
/// appear to be a binary cache. One without a token (curl's first try) is not.
#[tokio::test(start_paused = true)]
async fn uploads_refused_for_their_token_are_logged_once_a_minute() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(
        Config::default(),
        &[("w", "wtok", Scope::Write), ("r", "rtok", Scope::Read)],
    );
    let st = state(cfg, &mem);
    let logs = crate::test_logs::capture();
    let info = "/upload/nix-cache-info";
    let warned = || logs.text().matches("an upload with").count();
    let res = send(&st, Request::get(info).body(Body::empty()).unwrap()).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(warned(), 0);
    let res = send(
        &st,
        authed("GET", info, "wtok").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(warned(), 0);
    // An unknown token and a known one without the scope are said apart (one does not hide
    // the other), each at most once a minute; the known one by its name.
    for (token, expected) in [("revoked", 1), ("rtok", 2), ("revoked", 2), ("rtok", 2)] {
        let res = send(&st, authed("GET", info, token).body(Body::empty()).unwrap()).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(warned(), expected);
    }
    assert!(logs.text().contains("a token that matches none configured"));
    assert!(logs
        .text()
        .contains("an upload with token \"r\", which has no write scope"));
    tokio::time::advance(std::time::Duration::from_secs(61)).await;
    let res = send(
        &st,
        authed("GET", info, "rtok").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(warned(), 3);
}

/// A method no route takes (`DELETE`, `POST`, `OPTIONS`) is a 405, as docs/http-api.md says,
/// with or without credentials, private mode or not; it is not taken for an upload sent to
/// the root (no 401, no warning used up), while a `PUT` there still needs its write token.
#[tokio::test]
async fn other_methods_are_not_allowed_rather_than_unauthorized() {
    use crate::config::Scope;
    use std::sync::atomic::Ordering;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("r", "rtok", Scope::Read)]);
    cfg.auth.private = true;
    let st = state(cfg, &mem);
    let narinfo = format!("/{}.narinfo", "0".repeat(32));
    for (method, path, allow) in [
        ("DELETE", narinfo.as_str(), "GET,HEAD,PUT"),
        ("POST", "/nix-cache-info", "GET,HEAD,PUT"),
        ("OPTIONS", "/nix-cache-info", "GET,HEAD,PUT"),
        ("DELETE", "/nar/x.nar", "GET,HEAD,PUT"),
        // The route's own methods, not all the cache's.
        ("DELETE", "/status", "GET,HEAD"),
        ("DELETE", "/metrics", "GET,HEAD"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty());
        let res = send(&st, req.unwrap()).await;
        assert_eq!(
            res.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        // One line of text, as every error; kept by no cache.
        assert_eq!(res.headers()["allow"], allow, "{method} {path}");
        assert_eq!(res.headers()["content-type"], "text/plain; charset=utf-8");
        assert_eq!(res.headers()["cache-control"], "no-store");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"method not allowed\n");
        let req = authed(method, path, "rtok").body(Body::empty());
        let res = send(&st, req.unwrap()).await;
        assert_eq!(
            res.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}, read token"
        );
    }
    assert!(!st.root_upload_warned.load(Ordering::Relaxed));
    let req = Request::builder()
        .method("PUT")
        .uri(&narinfo)
        .body(Body::empty());
    assert_eq!(
        send(&st, req.unwrap()).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let req = authed("PUT", &narinfo, "rtok").body(Body::empty());
    let res = send(&st, req.unwrap()).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    // A failed write is kept by no cache: refused, a bad name, a name no route has.
    assert_eq!(res.headers()["cache-control"], "no-store");
    let wst = state(
        with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
        &mem,
    );
    for (path, status) in [
        ("/nar/bad", StatusCode::BAD_REQUEST),
        ("/foo.txt", StatusCode::NOT_FOUND),
    ] {
        let req = authed("PUT", path, "wtok").body(Body::empty());
        let res = send(&wst, req.unwrap()).await;
        assert_eq!(res.status(), status, "{path}");
        assert_eq!(res.headers()["cache-control"], "no-store", "{path}");
    }
    // Refused uploads are not warned of either (an allowed one is).
    assert!(!st.root_upload_warned.load(Ordering::Relaxed));
    // Reads still need the token in private mode.
    let req = Request::builder()
        .uri("/nix-cache-info")
        .body(Body::empty());
    assert_eq!(
        send(&st, req.unwrap()).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn the_upload_address_needs_a_write_token_even_to_read() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(
        Config::default(),
        &[("w", "wtok", Scope::Write), ("r", "rtok", Scope::Read)],
    );
    let st = state(cfg, &mem);
    let path = "/upload/nix-cache-info";
    let none = send(&st, Request::get(path).body(Body::empty()).unwrap()).await;
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    let reader = send(
        &st,
        authed("GET", path, "rtok").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(reader.status(), StatusCode::FORBIDDEN);
    let writer = send(
        &st,
        authed("GET", path, "wtok").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(writer.status(), StatusCode::OK);
    let probe = format!("/upload/{HASH}.narinfo");
    let none = send(&st, Request::head(&probe).body(Body::empty()).unwrap()).await;
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
}

/// A probe of the upload address reads the store, whatever the read side remembers, and
/// answers with the narinfo as stored (not re-signed).
#[tokio::test]
async fn upload_probes_answer_from_the_store_not_the_read_side_cache() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
        &mem,
    );
    let probe = format!("/upload/{HASH}.narinfo");
    let root = format!("/{HASH}.narinfo");
    assert_eq!(get(&st, &root).await.0, StatusCode::NOT_FOUND); // now a remembered miss
    let res = send(
        &st,
        authed("GET", &probe, "wtok").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    // The path appears in the store behind the read side's back (another replica).
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    assert_eq!(
        get(&st, &root).await.0,
        StatusCode::NOT_FOUND,
        "still cached"
    );
    let res = send(
        &st,
        authed("GET", &probe, "wtok").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, NARINFO.as_bytes(), "as stored, not re-signed");
    let res = send(
        &st,
        authed("HEAD", &probe, "wtok").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
}

/// A path whose NAR was found missing is absent to the builders' probe, so that the next
/// `nix copy --to` uploads it again (its NAR first, which makes it whole); found present, it
/// was skipped by every copy until `cellar verify --repair`.
#[tokio::test]
async fn the_upload_probe_finds_absent_a_path_whose_nar_is_missing() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
        &mem,
    );
    let (nar, file) = tiny_nar();
    mem.insert(&format!("{HASH}.narinfo"), narinfo_of("gone", &nar));
    let probe = |method: &'static str| {
        let st = st.clone();
        async move {
            let req = authed(method, &format!("/upload/{HASH}.narinfo"), "wtok")
                .body(Body::empty())
                .unwrap();
            send(&st, req).await.status()
        }
    };
    assert_eq!(probe("GET").await, StatusCode::OK);
    assert_eq!(
        get(&st, &format!("/nar/{file}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(probe("GET").await, StatusCode::NOT_FOUND);
    assert_eq!(probe("HEAD").await, StatusCode::NOT_FOUND);
    let put = authed("PUT", &format!("/upload/nar/{file}"), "wtok")
        .body(Body::from(nar))
        .unwrap();
    assert!(send(&st, put).await.status().is_success());
    assert_eq!(probe("HEAD").await, StatusCode::OK, "whole again");
}

/// Nix probes a NAR with HEAD right before uploading it: the probe starts the NAR's upload
/// record, before the store is asked (see `Uploader::nar_expected`).
#[tokio::test]
async fn a_nar_probe_starts_its_upload_record() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
        &mem,
    );
    let probe = format!("/upload/{HASH}.narinfo");
    let res = send(
        &st,
        authed("GET", &probe, "wtok").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let missing: crate::nix::NarFileName = format!("{}.nar", "1".repeat(52)).parse().unwrap();
    let path = format!("/upload/nar/{missing}");
    let res = send(
        &st,
        authed("HEAD", &path, "wtok").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(st.uploader.early_record(&missing).await, Some(true));
    assert!(mem
        .keys()
        .iter()
        .any(|k| k.starts_with("_cellar/access/") && k.ends_with("-upload")));
}

/// (Paused time: the wait for an upload slot passes without taking it.)
#[tokio::test(start_paused = true)]
async fn nar_puts_over_the_limits_are_refused_before_the_body() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    cfg.upload.max_nar_bytes = 1 << 20;
    cfg.upload.max_concurrent = 1;
    let st = state(cfg, &mem);
    let path = format!("/upload/nar/{NAR_FILE}.nar");
    // The body is a stream that fails if read: neither refusal may touch it.
    let unread = || {
        Body::from_stream(futures::stream::once(async {
            Err::<bytes::Bytes, _>(std::io::Error::other("the body was read"))
        }))
    };
    let res = send(
        &st,
        authed("PUT", &path, "wtok")
            .header("content-length", (2u64 << 20).to_string())
            .body(unread())
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let _running = st.uploader.admit().await.unwrap();
    let res = send(&st, authed("PUT", &path, "wtok").body(unread()).unwrap()).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    // So are listings and logs, with slots of their own.
    let _other = st.uploader.admit_other().await.unwrap();
    for other in [
        format!("/upload/{HASH}.ls"),
        format!("/upload/log/{HASH}-x.drv"),
    ] {
        let res = send(&st, authed("PUT", &other, "wtok").body(unread()).unwrap()).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{other}");
    }
    assert_eq!(mem.requests(), 0, "nothing reached the store");
}

/// A NAR named after its bytes that the store holds at another size than its narinfo says (a
/// copy into the bucket cut short) is a 502, and then as good as missing: its narinfo answers
/// 404 at the root (clients build the path rather than fail on it) and to a builder's probe
/// (whose next copy stores the NAR over it), also after the store is looked at again while the
/// short copy stays; the NAR whole again, the narinfo is served. Small NARs (read into memory)
/// and large ones (streamed) alike.
#[tokio::test(start_paused = true)]
async fn a_nar_cut_short_in_the_store_hides_its_narinfo_until_it_is_whole() {
    use crate::config::Scope;
    for size in [100usize, 200 << 10] {
        let mem = Arc::new(MemoryStore::new());
        let st = state(
            with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
            &mem,
        );
        let mut nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
        nar.extend(std::iter::repeat_n(9u8, size));
        let file = format!("{}.nar", crate::nix::Sha256::digest(&nar).to_nix32());
        mem.insert(&format!("{HASH}.narinfo"), narinfo_of("cut", &nar));
        mem.insert(&format!("nar/{file}"), nar[..nar.len() / 2].to_vec());
        let narinfo = format!("/{HASH}.narinfo");
        assert_eq!(get(&st, &narinfo).await.0, StatusCode::OK, "{size}");
        assert_eq!(
            get(&st, &format!("/nar/{file}")).await.0,
            StatusCode::BAD_GATEWAY,
            "{size}"
        );
        assert_eq!(get(&st, &narinfo).await.0, StatusCode::NOT_FOUND, "{size}");
        let probe = || {
            authed("GET", &format!("/upload/{HASH}.narinfo"), "wtok")
                .body(Body::empty())
                .unwrap()
        };
        assert_eq!(send(&st, probe()).await.status(), StatusCode::NOT_FOUND);
        // Looked at again after the negative TTL: still short, still hidden.
        tokio::time::advance(st.config.cache.narinfo_negative_ttl * 2).await;
        assert_eq!(get(&st, &narinfo).await.0, StatusCode::NOT_FOUND, "{size}");
        // Whole again (a builder's upload through another replica).
        mem.insert(&format!("nar/{file}"), nar.clone());
        tokio::time::advance(st.config.cache.narinfo_negative_ttl * 2).await;
        assert_eq!(get(&st, &narinfo).await.0, StatusCode::OK, "{size}");
        let (status, body) = get(&st, &format!("/nar/{file}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, nar);
    }
}

/// A failing store that refuses connections (restarting) is asked again every 0.25 s while a
/// PUT whose body is on its way waits: back within the wait, the upload goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_refusing_connections_is_asked_again_before_the_body() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let st = s3_state_at(addr, true).await;
    st.note_store_failed();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let bucket = empty_bucket(seen.clone());
    tokio::spawn(async move {
        // The store's restart: not a wait for anything.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        axum::serve(l, bucket).await
    });
    let (nar, _) = tiny_nar();
    let req = authed("PUT", &format!("/upload/{HASH}.narinfo"), "wtok")
        .body(Body::from(narinfo_of("up", &nar)))
        .unwrap();
    // Its NAR is not in the store: the upload itself was answered.
    assert_eq!(send(&st, req).await.status(), StatusCode::BAD_REQUEST);
    assert!(!st.store_failing());
}

/// A derivation whose name holds a `?` (allowed in store path names): Nix 2.8 sends its log's
/// URL without encoding it, so the name's rest arrives as a query. The log is stored and read
/// under its whole name, as `file://` and `s3://` caches (and `cellar import`) store it, and
/// found by a client that does encode it.
#[tokio::test]
async fn a_log_whose_derivation_name_holds_a_question_mark_keeps_its_name() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
        &mem,
    );
    for (sent, stored, encoded) in [
        ("a+b=c?d._-x.drv", "a+b=c?d._-x.drv", "a+b=c%3Fd._-x.drv"),
        ("a?b%2Bc.drv", "a?b+c.drv", "a%3Fb%2Bc.drv"),
        ("?=+.drv", "?=+.drv", "%3F=+.drv"),
        ("x.drv?", "x.drv?", "x.drv%3F"),
    ] {
        let put = authed("PUT", &format!("/upload/log/{HASH}-{sent}"), "wtok")
            .body(Body::from(format!("log of {stored}")))
            .unwrap();
        assert_eq!(send(&st, put).await.status(), StatusCode::CREATED, "{sent}");
        let key = format!("log/{HASH}-{stored}");
        assert_eq!(
            mem.bytes(&key).as_deref(),
            Some(format!("log of {stored}").as_bytes()),
            "{sent}"
        );
        for read in [sent, encoded] {
            for at in ["/log", "/upload/log"] {
                let req = authed("GET", &format!("{at}/{HASH}-{read}"), "wtok")
                    .body(Body::empty())
                    .unwrap();
                let res = send(&st, req).await;
                assert_eq!(res.status(), StatusCode::OK, "{at}/{read}");
                let body = res.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, format!("log of {stored}").as_bytes());
            }
        }
    }
    // Another name than the one stored is not its log.
    let res = get(&st, &format!("/log/{HASH}-a+b=c?zzz")).await;
    assert_eq!(res.0, StatusCode::NOT_FOUND);
}

/// A listing that is taken but not kept (another of the path came at once) is answered 201
/// all the same (Nix fails a whole copy on a refused listing), and counted as `dropped`, not
/// `accepted`, in the upload metrics.
#[tokio::test]
async fn a_listing_taken_and_dropped_is_counted_apart() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
        &mem,
    );
    let put = |body: &'static str| {
        authed("PUT", &format!("/upload/{HASH}.ls"), "wtok")
            .body(Body::from(body))
            .unwrap()
    };
    let verdict = |res: &axum::response::Response| {
        res.extensions()
            .get::<crate::error::ErrorLabel>()
            .map(|l| l.0)
    };
    let res = send(&st, put(r#"{"version":1}"#)).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(verdict(&res), None);
    let res = send(&st, put(r#"{"version":1,"other":1}"#)).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(verdict(&res), Some("dropped"));
}

/// Long NAR uploads holding every slot do not keep a listing, a log, a realisation or a debug
/// info link waiting: those have slots of their own, as many, and wait only for each other.
/// (Paused time: a wait for a slot passes without taking it, and ends in 503.)
#[tokio::test(start_paused = true)]
async fn nar_uploads_holding_every_slot_leave_small_uploads_their_own() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    cfg.upload.max_concurrent = 1;
    let st = state(cfg, &mem);
    // The realisation's output is in the cache.
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    let id = format!("sha256:{}!out", "1".repeat(64));
    let realisation = serde_json::json!({
        "dependentRealisations": {},
        "id": id,
        "outPath": format!("{HASH}-top"),
        "signatures": [],
    })
    .to_string();
    let uploads = [
        (
            format!("/upload/{HASH}.ls"),
            r#"{"version":1,"root":{"type":"regular"}}"#.to_owned(),
        ),
        (
            format!("/upload/log/{HASH}-x.drv"),
            "a build log".to_owned(),
        ),
        (format!("/upload/realisations/{id}.doi"), realisation),
        (
            format!("/upload/debuginfo/{}.debug", "ab".repeat(20)),
            format!(
                r#"{{"archive":"../nar/{NAR_FILE}.nar.xz","member":"lib/debug/.build-id/ab/{}.debug"}}"#,
                "ab".repeat(19)
            ),
        ),
    ];
    let nar = st.uploader.admit().await.unwrap();
    for (path, body) in &uploads {
        let req = authed("PUT", path, "wtok")
            .body(Body::from(body.clone()))
            .unwrap();
        let res = send(&st, req).await;
        assert!(res.status().is_success(), "{path}: {}", res.status());
    }
    drop(nar);
    let _other = st.uploader.admit_other().await.unwrap();
    for (path, body) in &uploads {
        let req = authed("PUT", path, "wtok")
            .body(Body::from(body.clone()))
            .unwrap();
        let res = send(&st, req).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(res.headers()["retry-after"], "1");
    }
    // The NARs' slot is free meanwhile.
    let started = tokio::time::Instant::now();
    let nar = st.uploader.admit().await;
    assert!(nar.is_ok() && started.elapsed().is_zero());
}

/// A handler that panics (a bug) is answered 500 and logged with the cause, not a connection
/// dropped without an answer; the server goes on answering.
#[tokio::test]
async fn a_handler_that_panics_is_answered_500_and_logged() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    mem.after_write("log/", |_| panic!("a bug the test put there"));
    let logs = crate::test_logs::capture();
    let path = format!("/upload/log/{HASH}-x.drv");
    let res = send(
        &st,
        authed("PUT", &path, "wtok")
            .body(Body::from("hello"))
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let text = logs.text();
    assert!(
        text.contains("panicked") && text.contains("a bug the test put there"),
        "{text}"
    );
    let res = send(
        &st,
        Request::get("/nix-cache-info").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
}

/// The upload address's NAR probe (`HEAD`, which Nix sends right before each NAR upload)
/// answers "absent" without asking the store when the NAR would be stored as sent, and asks
/// it for a NAR this process stored and when uploads are re-encoded. Nothing on the way may
/// keep the answer.
#[tokio::test]
async fn upload_nar_probes_ask_the_store_only_for_nars_seen_or_re_encoded() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("nar/{NAR_FILE}.nar.xz"), vec![1u8; 300]);
    mem.insert(&format!("nar/{NAR_FILE}.nar.zst"), vec![1u8; 200]);
    let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    let probe = |st: AppState, file: String| async move {
        let req = authed("HEAD", &format!("/upload/nar/{file}"), "wtok");
        let res = send(&st, req.body(Body::empty()).unwrap()).await;
        let name: crate::nix::NarFileName = file.parse().unwrap();
        st.uploader.early_record(&name).await;
        res
    };
    let st = state(cfg.clone(), &mem);
    let before = mem.requests();
    let res = probe(st.clone(), format!("{NAR_FILE}.nar.xz")).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(res.headers()["cache-control"], "no-store");
    assert_eq!(mem.requests(), before, "the probe asked the store");
    // What the store holds is still what a GET of the upload address reads.
    let path = format!("/upload/nar/{NAR_FILE}.nar.xz");
    let res = send(
        &st,
        authed("GET", &path, "wtok").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["cache-control"], "no-store");
    // A NAR this process stored: the store is asked (a retried upload skips it).
    let (nar, file) = tiny_nar();
    let req = authed("PUT", &format!("/upload/nar/{file}"), "wtok")
        .header("content-length", nar.len().to_string())
        .body(Body::from(nar.clone()));
    assert_eq!(send(&st, req.unwrap()).await.status(), StatusCode::CREATED);
    let before = mem.requests();
    let res = probe(st.clone(), file).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-length"], nar.len().to_string());
    assert!(mem.requests() > before, "the store was not asked");

    let mut cfg = cfg;
    cfg.upload.recompress = zstd_on_upload();
    let st = state(cfg, &mem);
    mem.remove(&format!("nar/{NAR_FILE}.nar.xz"));
    let before = mem.requests();
    // Stored re-encoded as .nar.zst: found under the name the client uploads.
    let res = probe(st.clone(), format!("{NAR_FILE}.nar.xz")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-length"], "200");
    assert!(mem.requests() > before, "the store was not asked");
}

/// While the store fails (a request was just answered 503 for it, or the readiness probe
/// found it down), the upload address's NAR probe asks the store and answers its failure
/// instead of "absent" from memory: a proxy in front of replicas then sends the builder's
/// upload to another replica, rather than the PUT failing here after its body was sent. Once
/// the store answers again (a while after the last failure, or the next probe), "absent" comes
/// from memory again.
#[tokio::test(start_paused = true)]
async fn upload_nar_probes_answer_the_stores_failure_while_it_fails() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let probe = || async {
        let req = authed("HEAD", &format!("/upload/nar/{NAR_FILE}.nar.xz"), "wtok");
        let before = mem.requests();
        let status = send(&st, req.body(Body::empty()).unwrap()).await.status();
        (status, mem.requests() > before)
    };
    assert_eq!(probe().await, (StatusCode::NOT_FOUND, false));
    mem.set_down(true);
    let req = authed("GET", &format!("/upload/{HASH}.narinfo"), "wtok");
    let res = send(&st, req.body(Body::empty()).unwrap()).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(probe().await.0, StatusCode::SERVICE_UNAVAILABLE);
    mem.set_down(false);
    assert_eq!(probe().await, (StatusCode::NOT_FOUND, true));
    tokio::time::advance(super::state::STORE_FAILED_FOR).await;
    assert_eq!(probe().await, (StatusCode::NOT_FOUND, false));
    // Found down by the readiness probe, until the next probe finds it up.
    mem.set_down(true);
    let ready = || async {
        send(&st, Request::get("/readyz").body(Body::empty()).unwrap())
            .await
            .status()
    };
    assert_eq!(ready().await, StatusCode::SERVICE_UNAVAILABLE);
    mem.set_down(false);
    assert_eq!(probe().await, (StatusCode::NOT_FOUND, true));
    tokio::time::advance(super::health::SHARED * 2).await;
    assert_eq!(ready().await, StatusCode::OK);
    assert_eq!(probe().await, (StatusCode::NOT_FOUND, false));
    // A probe's finding is not kept for ever: no probe may come again.
    mem.set_down(true);
    tokio::time::advance(super::health::SHARED * 2).await;
    assert_eq!(ready().await, StatusCode::SERVICE_UNAVAILABLE);
    mem.set_down(false);
    tokio::time::advance(super::state::STORE_FAILED_FOR).await;
    assert_eq!(probe().await, (StatusCode::NOT_FOUND, false));
}

/// A NAR refused early (bytes that are no NAR) has the rest of its body read
/// before the 400 is answered: answered over a body still coming, the connection would be
/// reset, and the client still sending could see the reset instead of the refusal (Nix then
/// retries without the body and stalls for minutes).
#[tokio::test]
async fn a_refused_nar_has_its_body_read_before_the_answer() {
    use crate::config::Scope;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let read = Arc::new(AtomicUsize::new(0));
    let chunks = 40;
    let body = {
        let read = read.clone();
        futures::StreamExt::map(futures::stream::iter(0..chunks), move |i: usize| {
            read.fetch_add(1, Ordering::SeqCst);
            let mut chunk = vec![7u8; 64 << 10];
            if i == 0 {
                chunk[..3].copy_from_slice(b"\x1f\x00\x08"); // neither a NAR nor gzip
            }
            Ok::<_, std::io::Error>(bytes::Bytes::from(chunk))
        })
    };
    let req = authed("PUT", &format!("/upload/nar/{NAR_FILE}.nar"), "wtok")
        .header("content-length", (chunks * (64 << 10)).to_string())
        .body(Body::from_stream(body))
        .unwrap();
    let res = send(&st, req).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        read.load(Ordering::SeqCst),
        chunks,
        "the body was not read to its end"
    );
    assert!(mem.keys().is_empty(), "{:?}", mem.keys());

    // Refused once read to its end (its sha256 is not its name): nothing is left to read,
    // and the body is not polled past its end.
    let (nar, file) = tiny_nar();
    let req = authed("PUT", &format!("/upload/nar/{NAR_FILE}.nar"), "wtok")
        .header("content-length", nar.len().to_string())
        .body(Body::from(nar))
        .unwrap();
    let res = send(&st, req).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.contains("but its name says"), "{text} ({file})");
    assert!(mem.keys().is_empty(), "{:?}", mem.keys());

    // Refused before the upload asked for its body (the store cannot be written): the body is
    // not asked for here either (a client waiting for `100 Continue` is not made to send it).
    read.store(0, Ordering::SeqCst);
    let name = format!("{NAR_FILE}.nar");
    mem.fail(
        crate::store::memory::FailOp::Write,
        &format!("nar/{name}"),
        0,
        1,
    );
    let body = {
        let read = read.clone();
        futures::StreamExt::map(futures::stream::iter(0..chunks), move |_| {
            read.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; 64 << 10]))
        })
    };
    let req = authed("PUT", &format!("/upload/nar/{name}"), "wtok")
        .header("content-length", (chunks * (64 << 10)).to_string())
        .header("expect", "100-continue")
        .body(Body::from_stream(body))
        .unwrap();
    let res = send(&st, req).await;
    assert!(res.status().is_server_error(), "{}", res.status());
    assert_eq!(read.load(Ordering::SeqCst), 0, "the body was read");
}

/// A NAR of 100 bytes of contents (its header alone is checked) and its file name.
/// The narinfo of path `{HASH}-<name>` whose NAR, uncompressed, is `nar`.
fn narinfo_of(name: &str, nar: &[u8]) -> String {
    let sha = crate::nix::Sha256::digest(nar);
    format!(
        "StorePath: /nix/store/{HASH}-{name}\nURL: nar/{}.nar\nCompression: none\n\
         NarHash: {sha}\nNarSize: {}\nReferences: \n",
        sha.to_nix32(),
        nar.len()
    )
}

fn tiny_nar() -> (Vec<u8>, String) {
    let mut nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
    nar.extend_from_slice(&[7u8; 100]);
    let file = format!("{}.nar", crate::nix::Sha256::digest(&nar).to_nix32());
    (nar, file)
}

/// A NAR name no upload may use (a compression cellar cannot verify, a 32-character name) is
/// refused with 400 also when the store holds a NAR under it (Nix's S3 store wrote it), not
/// taken as sent; and a narinfo naming such a NAR is refused with 400, not a 502 from reading
/// it back.
#[tokio::test]
async fn a_stored_nar_under_a_name_uploads_may_not_use_is_refused() {
    use crate::config::Scope;
    use crate::upload::STORED_AGAIN_MAX;
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let size = STORED_AGAIN_MAX + 1;
    for name in [format!("{NAR_FILE}.nar.lz4"), format!("{HASH}.nar.xz")] {
        mem.insert(&format!("nar/{name}"), vec![1u8; size as usize]);
        let req = authed("PUT", &format!("/upload/nar/{name}"), "wtok")
            .header("content-length", size.to_string())
            .header("expect", "100-continue")
            .body(Body::empty())
            .unwrap();
        let res = send(&st, req).await;
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{name}");
    }
    let narinfo = format!(
        "StorePath: /nix/store/{HASH}-up\nURL: nar/{NAR_FILE}.nar.lz4\nCompression: lz4\n\
         FileSize: {size}\nNarHash: sha256:{NAR_FILE}\nNarSize: {size}\nReferences: \n"
    );
    let req = authed("PUT", &format!("/upload/{HASH}.narinfo"), "wtok")
        .body(Body::from(narinfo))
        .unwrap();
    let res = send(&st, req).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let text = res.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("cannot be verified"), "{text}");
    assert!(!mem.keys().iter().any(|k| k.ends_with(".narinfo")));
}

/// A path `HASH`-up to upload: its NAR (a NAR header is all the pipeline checks;
/// uncompressed, so its file hash is its NarHash), the NAR's file name, and its narinfo.
fn uploadable_path() -> (Vec<u8>, String, String) {
    let mut nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
    nar.extend_from_slice(&[7u8; 1000]);
    let sha = crate::nix::Sha256::digest(&nar);
    let file = format!("{}.nar", sha.to_nix32());
    let narinfo = narinfo_of("up", &nar);
    (nar, file, narinfo)
}

/// The server's own signatures (under its signing keys' names, as they are now: at the start
/// and after a reload) sent with an upload are not stored; those of a key it no longer has are.
#[tokio::test]
async fn uploads_store_no_signature_under_the_servers_key_names() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    // As `state` sets it (a reload to another value would need a restart).
    cfg.cache.prefetch_concurrency = 0;
    let st = state(cfg.clone(), &mem);
    let (nar, file, narinfo) = uploadable_path();
    let mut info = crate::nix::NarInfo::parse(&narinfo, "/nix/store").unwrap();
    for name in ["test-cellar-1", "builder-1", "rotated-1"] {
        info.sign(&SecretKey::generate(name).unwrap(), "/nix/store");
    }
    let signed = info.render("/nix/store");
    let put = |path: String, body: Vec<u8>| authed("PUT", &path, "wtok").body(Body::from(body));
    let req = put(format!("/upload/nar/{file}"), nar);
    assert_eq!(send(&st, req.unwrap()).await.status(), StatusCode::CREATED);
    let at = format!("/upload/{HASH}.narinfo");
    let req = put(at.clone(), signed.clone().into_bytes());
    assert_eq!(send(&st, req.unwrap()).await.status(), StatusCode::CREATED);
    let names = || {
        let raw = mem.bytes(&format!("{HASH}.narinfo")).unwrap();
        let stored = crate::nix::NarInfo::parse(std::str::from_utf8(&raw).unwrap(), "/nix/store");
        let mut n: Vec<String> = stored
            .unwrap()
            .sigs
            .iter()
            .map(|s| s.key_name().to_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(), ["builder-1", "rotated-1"]);
    // Rotated: the old key's name is no longer the server's, the new one's is.
    st.reload(cfg, vec![SecretKey::generate("rotated-1").unwrap()])
        .unwrap();
    let req = put(at, signed.into_bytes());
    assert_eq!(send(&st, req.unwrap()).await.status(), StatusCode::OK);
    assert_eq!(names(), ["builder-1", "rotated-1", "test-cellar-1"]);
}

/// A builder's probe of a NAR whose stored copy was found bad (read back for its narinfo,
/// its bytes are not its name's) is answered "absent", at the upload address and at the root,
/// so that the builder's next `nix copy` sends the NAR and mends the path. Before, the root's
/// probe found the copy in the store and the client skipped the NAR on every run. Readers
/// still see what the store holds.
#[tokio::test]
async fn a_nar_found_bad_is_absent_to_builders() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
        &mem,
    );
    let (nar, file, narinfo) = uploadable_path();
    mem.insert(&format!("nar/{file}"), b"not a NAR".to_vec());
    let head = |path: &str, token: Option<&str>| {
        let req = match token {
            Some(t) => authed("HEAD", path, t),
            None => Request::builder().method("HEAD").uri(path),
        };
        let st = st.clone();
        async move { send(&st, req.body(Body::empty()).unwrap()).await.status() }
    };
    let root = format!("/nar/{file}");
    let upload = format!("/upload/nar/{file}");
    assert_eq!(head(&root, Some("wtok")).await, StatusCode::OK);
    let put = authed("PUT", &format!("/upload/{HASH}.narinfo"), "wtok")
        .body(Body::from(narinfo.clone()))
        .unwrap();
    assert_eq!(send(&st, put).await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(head(&root, Some("wtok")).await, StatusCode::NOT_FOUND);
    assert_eq!(head(&upload, Some("wtok")).await, StatusCode::NOT_FOUND);
    // Also while the store fails (when the upload address's probe asks the store).
    st.note_store_failed();
    assert_eq!(head(&upload, Some("wtok")).await, StatusCode::NOT_FOUND);
    assert_eq!(head(&root, None).await, StatusCode::OK, "a reader");
    // Sent again, it mends the path.
    let put = authed("PUT", &upload, "wtok")
        .body(Body::from(nar))
        .unwrap();
    assert_eq!(send(&st, put).await.status(), StatusCode::CREATED);
    assert_eq!(head(&root, Some("wtok")).await, StatusCode::OK);
    let put = authed("PUT", &format!("/upload/{HASH}.narinfo"), "wtok")
        .body(Body::from(narinfo))
        .unwrap();
    assert!(send(&st, put).await.status().is_success());
}

/// The root's NAR HEAD answers a builder otherwise than a reader (above), so where some token
/// may upload it says it varies by `Authorization`, found or not: a caching proxy in front
/// would otherwise answer a builder's probe with a reader's 200.
#[tokio::test]
async fn root_nar_probes_vary_by_token_where_builders_upload() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let (_, file, _) = uploadable_path();
    mem.insert(&format!("nar/{file}"), b"a NAR".to_vec());
    let missing = format!("/nar/{}.nar", "1".repeat(52));
    for (cfg, varies) in [
        (
            with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
            true,
        ),
        (
            with_tokens(Config::default(), &[("r", "rtok", Scope::Read)]),
            false,
        ),
        (Config::default(), false),
    ] {
        let st = state(cfg, &mem);
        for (path, status) in [
            (format!("/nar/{file}"), StatusCode::OK),
            (missing.clone(), StatusCode::NOT_FOUND),
        ] {
            let req = Request::builder().method("HEAD").uri(&path);
            let res = send(&st, req.body(Body::empty()).unwrap()).await;
            assert_eq!(res.status(), status, "{path}");
            let vary: Vec<_> = res
                .headers()
                .get_all(axum::http::header::VARY)
                .iter()
                .collect();
            assert_eq!(vary == ["authorization"], varies, "{path}: {vary:?}");
        }
    }
}

/// With uploads re-encoded, a NAR whose re-encoded copy the store holds is not stored again
/// (200): a new encoding (another level, another zstd) need not be byte for byte the copy
/// published narinfos name by hash and size. Sent right after a builder's probe (at the
/// upload address or the root) that found it absent, it is not looked up again, once.
#[tokio::test]
async fn a_small_nar_stored_re_encoded_is_not_encoded_again() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    cfg.upload.recompress = zstd_on_upload();
    let st = state(cfg, &mem);
    let (nar, file) = tiny_nar();
    let nar = bytes::Bytes::from(nar);
    let reencoded = format!("nar/{file}.zst");
    // The copy stored once, with an encoding this process would not make.
    mem.insert(&reencoded, vec![1u8; 300]);
    let put = |nar: bytes::Bytes| {
        let req = authed("PUT", &format!("/upload/nar/{file}"), "wtok")
            .header("content-length", nar.len().to_string())
            .body(Body::from(nar))
            .unwrap();
        let st = st.clone();
        async move { send(&st, req).await.status() }
    };
    assert_eq!(put(nar.clone()).await, StatusCode::OK);
    assert_eq!(mem.bytes(&reencoded).as_deref(), Some(&[1u8; 300][..]));
    // Probed absent: sent without another look.
    for probe in [format!("/upload/nar/{file}"), format!("/nar/{file}")] {
        mem.remove(&reencoded);
        let req = authed("HEAD", &probe, "wtok").body(Body::empty()).unwrap();
        assert_eq!(send(&st, req).await.status(), StatusCode::NOT_FOUND);
        let heads = mem.heads_under("nar/");
        assert_eq!(put(nar.clone()).await, StatusCode::CREATED, "{probe}");
        assert_eq!(mem.heads_under("nar/"), heads, "{probe}: looked up again");
        let written = mem.bytes(&reencoded).expect("written");
        // Once: sent again, it is looked up, found, and kept.
        mem.insert(&reencoded, vec![2u8; 300]);
        assert_eq!(put(nar.clone()).await, StatusCode::OK, "{probe}");
        assert_eq!(mem.bytes(&reencoded).as_deref(), Some(&[2u8; 300][..]));
        assert_ne!(written.as_ref(), &[2u8; 300][..]);
    }
}

/// A PUT of a NAR over `STORED_AGAIN_MAX` the store holds is answered 200 without its body
/// when the client waits for `100 Continue` before sending it; one the store lacks, or a small
/// one, is received (and a small one is not looked up first), and so is one sent with
/// another length than the stored copy's (cut short). One sent without `Expect` (a proxy
/// answered it) has its body read to the end and dropped, and is not stored again.
#[tokio::test]
async fn a_large_nar_already_stored_is_not_received_again() {
    use crate::config::Scope;
    use crate::upload::STORED_AGAIN_MAX;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    cfg.upload.max_nar_bytes = 3 << 20;
    let st = state(cfg, &mem);
    let stored = format!("{NAR_FILE}.nar.xz");
    let large = 3u64 << 20;
    mem.insert(&format!("nar/{stored}"), vec![1u8; large as usize]);
    let absent = format!("{}.nar.xz", "1".repeat(52));
    // A body that fails if read: a status other than the error's says it was not.
    let unread = || {
        Body::from_stream(futures::stream::once(async {
            Err::<bytes::Bytes, _>(std::io::Error::other("the body was read"))
        }))
    };
    let put = |name: &str, len: u64| {
        let req = authed("PUT", &format!("/upload/nar/{name}"), "wtok")
            .header("content-length", len.to_string())
            .header("expect", "100-continue")
            .body(unread())
            .unwrap();
        let st = st.clone();
        async move { send(&st, req).await.status() }
    };
    assert_eq!(put(&stored, large).await, StatusCode::OK);
    let read = put(&absent, large).await;
    assert!(read.is_client_error(), "{read}");
    let read = put(&stored, STORED_AGAIN_MAX + 1).await;
    assert!(read.is_client_error(), "another length: {read}");
    let before = mem.requests();
    let read = put(&stored, STORED_AGAIN_MAX).await;
    assert!(read.is_client_error(), "{read}");
    assert_eq!(mem.requests(), before, "a small NAR was looked up");

    // Through a proxy that took `Expect` for itself: the body comes, and is read whole (up
    // to `upload.max_nar_bytes`, here exactly that).
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mebibytes = |n: usize, taken: Arc<std::sync::atomic::AtomicUsize>| {
        Body::from_stream(futures::stream::iter((0..n).map(move |_| {
            taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0u8; 1 << 20]))
        })))
    };
    let req = authed("PUT", &format!("/upload/nar/{stored}"), "wtok")
        .header("content-length", (3u64 << 20).to_string())
        .body(mebibytes(3, taken.clone()))
        .unwrap();
    let before = mem.requests();
    assert_eq!(send(&st, req).await.status(), StatusCode::OK);
    assert_eq!(
        taken.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "not read to the end"
    );
    assert_eq!(
        mem.requests(),
        before + 1,
        "only the lookup: nothing stored"
    );
    // Without a length, a body past the limit is refused as it comes.
    let req = authed("PUT", &format!("/upload/nar/{stored}"), "wtok")
        .body(mebibytes(5, taken.clone()))
        .unwrap();
    assert_eq!(send(&st, req).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        mem.get_bytes(&format!("nar/{stored}"), large)
            .await
            .unwrap()
            .unwrap()
            .len() as u64,
        large
    );
}

/// Whole bodies read into memory (narinfos, realisations, debug info links) share a budget
/// (`WHOLE_BODIES_BYTES`), each counted by its declared length: with no room left for it, a
/// narinfo PUT waits, then is refused as busy (503) without being read; room given back lets
/// the next one in. Before, any number of 16 MiB narinfo bodies were held at once.
#[tokio::test(start_paused = true)]
async fn whole_bodies_wait_for_room_in_memory() {
    use crate::config::Scope;
    use crate::upload::WHOLE_BODIES_BYTES;
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
        &mem,
    );
    let put = |len: usize| {
        let req = authed("PUT", &format!("/upload/{HASH}.narinfo"), "wtok")
            .header("content-length", len.to_string())
            .body(Body::from(vec![b'x'; len]))
            .unwrap();
        let st = st.clone();
        async move { send(&st, req).await.status() }
    };
    let held = st
        .uploader
        .body_room(WHOLE_BODIES_BYTES - (4 << 10))
        .await
        .unwrap();
    // Read and refused as no narinfo: there was room for it.
    assert_eq!(put(1 << 10).await, StatusCode::BAD_REQUEST);
    // The paused clock runs through the wait.
    assert_eq!(put(8 << 10).await, StatusCode::SERVICE_UNAVAILABLE);
    drop(held);
    assert_eq!(put(8 << 10).await, StatusCode::BAD_REQUEST);
}

/// A compressed whole body (newer Nix's `narinfo-compression`) takes room for at most 64
/// times its length decoded, not its limit (16 MiB: a fleet's compressed narinfos would wait
/// four at a time); one decoding to more is refused as too large.
#[tokio::test(start_paused = true)]
async fn a_compressed_body_takes_room_for_what_it_may_decode_to() {
    use crate::config::Scope;
    use crate::upload::WHOLE_BODIES_BYTES;
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
        &mem,
    );
    let put = |plain: Vec<u8>| {
        let body = zstd::encode_all(&plain[..], 3).unwrap();
        let req = authed("PUT", &format!("/upload/{HASH}.narinfo"), "wtok")
            .header("content-length", body.len().to_string())
            .header("content-encoding", "zstd")
            .body(Body::from(body))
            .unwrap();
        let st = st.clone();
        async move { send(&st, req).await.status() }
    };
    let _held = st
        .uploader
        .body_room(WHOLE_BODIES_BYTES - (256 << 10))
        .await
        .unwrap();
    // Read, decoded and refused as no narinfo: there was room for it.
    assert_eq!(
        put(b"not a narinfo\n".repeat(10)).await,
        StatusCode::BAD_REQUEST
    );
    // A small body may decode to 64 KiB whatever its length (10 KiB of one byte is a few
    // dozen compressed); beyond that, to at most 64 times its length.
    assert_eq!(put(vec![b'x'; 10 << 10]).await, StatusCode::BAD_REQUEST);
    assert_eq!(put(vec![0u8; 1 << 20]).await, StatusCode::PAYLOAD_TOO_LARGE);
}

/// A client that sent `Expect: 100-continue` sends its body anyway after a second: once an
/// upload has waited that long for a slot, a NAR already stored has its body read and dropped
/// rather than left unread (the connection would be reset). And a store that cannot say
/// whether it holds the NAR does not fail the upload: its body is taken.
#[tokio::test(start_paused = true)]
async fn an_upload_that_waited_for_a_slot_has_its_body_read() {
    use crate::config::Scope;
    use crate::store::memory::FailOp;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    cfg.upload.max_nar_bytes = 3 << 20;
    cfg.upload.max_concurrent = 1;
    let st = state(cfg, &mem);
    let stored = format!("{NAR_FILE}.nar.xz");
    mem.insert(&format!("nar/{stored}"), vec![1u8; 2 << 20]);
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let body = {
        let taken = taken.clone();
        Body::from_stream(futures::stream::iter((0..2).map(move |_| {
            taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0u8; 1 << 20]))
        })))
    };
    let req = authed("PUT", &format!("/upload/nar/{stored}"), "wtok")
        .header("content-length", (2u64 << 20).to_string())
        .header("expect", "100-continue")
        .body(body)
        .unwrap();
    let slot = st.uploader.admit().await.unwrap();
    let put = tokio::spawn({
        let st = st.clone();
        async move { send(&st, req).await.status() }
    });
    // A scenario step on the paused clock: the upload waits two seconds for its slot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(slot);
    assert_eq!(put.await.unwrap(), StatusCode::OK);
    assert_eq!(
        taken.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the body was left unread"
    );

    mem.fail(FailOp::Read, &format!("nar/{stored}"), 0, 1);
    let req = authed("PUT", &format!("/upload/nar/{stored}"), "wtok")
        .header("content-length", (2u64 << 20).to_string())
        .header("expect", "100-continue")
        .body(Body::from_stream(futures::stream::once(async {
            Err::<bytes::Bytes, _>(std::io::Error::other("the body was read"))
        })))
        .unwrap();
    let res = send(&st, req).await;
    assert!(
        res.status().is_client_error(),
        "{}: the body was not taken",
        res.status()
    );
}

#[tokio::test]
async fn a_reload_swaps_tokens_and_refuses_changes_that_need_a_restart() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let key = SecretKey::generate("test-cellar-1").unwrap();
    let old = with_tokens(Config::default(), &[("a", "atok", Scope::Write)]);
    let st = AppState::new(old.clone(), mem.clone(), vec![key.clone()]).unwrap();
    let status = |st: &AppState, token: &'static str| {
        let st = st.clone();
        async move {
            send(
                &st,
                authed("GET", "/upload/nix-cache-info", token)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .status()
        }
    };
    assert_eq!(status(&st, "btok").await, StatusCode::FORBIDDEN);
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    let signed_by = |st: &AppState| {
        let st = st.clone();
        async move {
            let (_, body) = get(&st, &format!("/{HASH}.narinfo")).await;
            let body = String::from_utf8(body).unwrap();
            // The last signature is cellar's (the fixture carries its builder's).
            let sig = body
                .lines()
                .filter_map(|l| l.strip_prefix("Sig: "))
                .next_back();
            sig.unwrap().split(':').next().unwrap().to_owned()
        }
    };
    assert_eq!(signed_by(&st).await, "test-cellar-1");

    // New tokens, the same key: the narinfo cache stays (the narinfo is not read again).
    let new = with_tokens(old.clone(), &[("b", "btok", Scope::Write)]);
    st.reload(new.clone(), vec![key.clone()]).unwrap();
    assert_eq!(status(&st, "btok").await, StatusCode::OK);
    assert_eq!(status(&st, "atok").await, StatusCode::FORBIDDEN);
    let reads = mem.requests();
    assert_eq!(signed_by(&st).await, "test-cellar-1");
    assert_eq!(mem.requests(), reads, "served from memory");
    // A new key: narinfos are signed with it from now on, those in memory too.
    let rotated = SecretKey::generate("test-cellar-2").unwrap();
    st.reload(new.clone(), vec![rotated.clone()]).unwrap();
    assert_eq!(signed_by(&st).await, "test-cellar-2");
    // A key added: every narinfo carries its signature too.
    st.reload(new.clone(), vec![rotated.clone(), key.clone()])
        .unwrap();
    assert_eq!(signed_by(&st).await, "test-cellar-1");

    let mut moved = new.clone();
    moved.listen = "127.0.0.1:1".parse().unwrap();
    let e = st.reload(moved, vec![key]).unwrap_err();
    assert!(e.to_string().contains("`listen`"), "{e}");
    assert_eq!(status(&st, "btok").await, StatusCode::OK, "nothing changed");
}

#[tokio::test]
async fn a_reload_keeps_the_narinfo_cache_unless_its_settings_change() {
    let mem = Arc::new(MemoryStore::new());
    let st = state(Config::default(), &mem);
    let changes: [fn(&mut Config); 5] = [
        |_| {},
        |c| c.cache.narinfo_memory_bytes /= 2,
        |c| c.cache.narinfo_ttl /= 2,
        |c| c.cache.narinfo_negative_ttl /= 2,
        |c| c.signing.keep_existing_signatures = !c.signing.keep_existing_signatures,
    ];
    for (i, change) in changes.into_iter().enumerate() {
        let mut cfg = st.live().config.clone();
        change(&mut cfg);
        let before = st.live();
        st.reload(cfg, before.signing_keys.clone()).unwrap();
        let kept = Arc::ptr_eq(&before.narinfos, &st.live().narinfos);
        assert_eq!(kept, i == 0, "change {i}");
        assert!(Arc::ptr_eq(&before.upstreams, &st.live().upstreams));
    }
}

#[tokio::test]
async fn a_reload_swaps_upstreams_and_max_ages() {
    let upstream = axum::Router::new().route(
        "/log/{drv}",
        axum::routing::get(|| async { "built by the upstream\n" }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, upstream).await });

    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    let mut old = Config::default();
    old.cache.prefetch_concurrency = 0;
    let st = state(old.clone(), &mem);
    let cache_control = |st: &AppState| {
        let st = st.clone();
        async move {
            let req = Request::get(format!("/{HASH}.narinfo")).body(Body::empty());
            let res = send(&st, req.unwrap()).await;
            res.headers()["cache-control"].to_str().unwrap().to_owned()
        }
    };
    let log = format!("/log/{HASH}-top.drv");
    assert_eq!(get(&st, &log).await.0, StatusCode::NOT_FOUND);
    assert_ne!(cache_control(&st).await, "public, max-age=7");

    let mut new = old.clone();
    new.narinfo_max_age = Duration::from_secs(7);
    new.upstreams = vec![crate::config::UpstreamConfig {
        url,
        public_keys: Vec::new(),
        timeout: Duration::from_secs(5),
        mirror: false,
    }];
    let before = st.live();
    st.reload(
        new.clone(),
        vec![SecretKey::generate("test-cellar-1").unwrap()],
    )
    .unwrap();
    // The mirror of the upstreams as they were copies nothing more.
    assert!(before.mirror.is_retired());
    let (status, body) = get(&st, &log).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"built by the upstream\n");
    assert_eq!(cache_control(&st).await, "public, max-age=7");
    // A reload that keeps the upstreams keeps their mirror, and its queue.
    let before = st.live();
    new.narinfo_max_age = Duration::from_secs(8);
    st.reload(new, vec![SecretKey::generate("test-cellar-1").unwrap()])
        .unwrap();
    assert!(!before.mirror.is_retired());
}

// ---------------------------------------------------------------------------------------------
// A path uploaded through the root URL, then read back; the cache headers every answer gets.

#[tokio::test]
async fn a_path_uploaded_through_the_root_is_served_and_heads_match_gets() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(Config::default(), &[("ci", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let put = |path: String, body: Vec<u8>| {
        let st = st.clone();
        async move {
            // As a client sends it: with its length, which the limits look at first.
            let req = authed("PUT", &path, "wtok")
                .header("content-length", body.len())
                .body(Body::from(body))
                .unwrap();
            let res = send(&st, req).await;
            assert!(
                !res.headers().contains_key("cache-control"),
                "{path}: an upload's answer is no cacheable page"
            );
            res.status()
        }
    };
    let (nar, file, narinfo) = uploadable_path();
    let nar_len = nar.len();
    assert_eq!(put(format!("/nar/{file}"), nar).await, StatusCode::CREATED);
    // The listing before the narinfo, as Nix sends them: held until the narinfo is accepted.
    let listing_path = format!("/{HASH}.ls");
    let listing = br#"{"version":1,"root":{"type":"regular","size":1000}}"#.to_vec();
    assert_eq!(
        put(listing_path.clone(), listing).await,
        StatusCode::CREATED
    );
    assert_eq!(get(&st, &listing_path).await.0, StatusCode::NOT_FOUND);
    let narinfo_path = format!("/{HASH}.narinfo");
    assert_eq!(
        put(narinfo_path.clone(), narinfo.into_bytes()).await,
        StatusCode::CREATED
    );
    let log_path = format!("/log/{HASH}-up.drv");
    assert_eq!(
        put(log_path.clone(), b"built\n".to_vec()).await,
        StatusCode::CREATED
    );

    for path in [&narinfo_path, &listing_path, &log_path] {
        let (status, body) = get(&st, path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(
            head(&st, path).await,
            (StatusCode::OK, Some(body.len().to_string())),
            "{path}"
        );
    }
    assert_eq!(
        head(&st, &format!("/nar/{file}")).await,
        (StatusCode::OK, Some(nar_len.to_string()))
    );
}

/// Newer Nix compresses the narinfos, listings and logs it uploads when asked to
/// (`narinfo-compression=xz&ls-compression=br&log-compression=gzip`) and names the method in
/// `Content-Encoding`: they are stored decoded, and read back as plain text. A coding cellar
/// does not decode is 415 before the body is read; a body that does not decode as its header
/// says is 400, and nothing is stored.
#[tokio::test]
async fn uploads_sent_compressed_are_stored_decoded() {
    use std::io::Write as _;

    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(Config::default(), &[("ci", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let put = |path: String, encoding: &'static str, body: Vec<u8>| {
        let st = st.clone();
        async move {
            let req = authed("PUT", &path, "wtok")
                .header("content-length", body.len())
                .header("content-encoding", encoding)
                .body(Body::from(body))
                .unwrap();
            let res = send(&st, req).await;
            let status = res.status();
            let text = res.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&text).into_owned())
        }
    };
    let (nar, file, narinfo) = uploadable_path();
    assert_eq!(
        put(format!("/nar/{file}"), "identity", nar).await.0,
        StatusCode::CREATED
    );

    // What Nix would send: a listing in brotli (Python's `brotli.compress` of `listing`)...
    let listing = b"{\"version\":1,\"root\":{\"type\":\"regular\",\"size\":5,\"narOffset\":96}}\n";
    let listing_br = b"\x8b\x1f\x80\x7b\x22\x76\x65\x72\x73\x69\x6f\x6e\x22\x3a\x31\x2c\x22\x72\x6f\x6f\x74\x22\x3a\x7b\x22\x74\x79\x70\x65\x22\x3a\x22\x72\x65\x67\x75\x6c\x61\x72\x22\x2c\x22\x73\x69\x7a\x65\x22\x3a\x35\x2c\x22\x6e\x61\x72\x4f\x66\x66\x73\x65\x74\x22\x3a\x39\x36\x7d\x7d\x0a\x03";
    let listing_path = format!("/{HASH}.ls");
    assert_eq!(
        put(listing_path.clone(), "br", listing_br.to_vec()).await.0,
        StatusCode::CREATED
    );
    // ... the narinfo in xz ...
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(narinfo.as_bytes()).unwrap();
    let narinfo_path = format!("/{HASH}.narinfo");
    assert_eq!(
        put(narinfo_path.clone(), "xz", xz.finish().unwrap())
            .await
            .0,
        StatusCode::CREATED
    );
    // ... and the log in gzip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"building up\nbuilt\n").unwrap();
    let log_path = format!("/log/{HASH}-up.drv");
    assert_eq!(
        put(log_path.clone(), "gzip", gz.finish().unwrap()).await.0,
        StatusCode::CREATED
    );

    let (status, body) = get(&st, &narinfo_path).await;
    assert_eq!(status, StatusCode::OK);
    let served = String::from_utf8(body).unwrap();
    assert!(
        served.starts_with(&format!("StorePath: /nix/store/{HASH}-up\n")),
        "{served}"
    );
    assert!(served.contains("\nSig: test-cellar-1:"), "{served}");
    assert_eq!(
        get(&st, &listing_path).await,
        (StatusCode::OK, listing.to_vec())
    );
    assert_eq!(
        get(&st, &log_path).await,
        (StatusCode::OK, b"building up\nbuilt\n".to_vec())
    );
    assert_eq!(
        mem.get_bytes(&format!("log/{HASH}-up.drv"), 1 << 20)
            .await
            .unwrap()
            .as_deref(),
        Some(&b"building up\nbuilt\n"[..]),
        "stored decoded"
    );

    // A coding cellar does not decode, and a body that is not what its header says.
    let other_log = format!("/log/{HASH}-other.drv");
    let (status, text) = put(other_log.clone(), "lz4", b"whatever".to_vec()).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{text}");
    assert!(text.contains("\"lz4\""), "{text}");
    let (status, text) = put(other_log.clone(), "zstd", b"not zstd".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("Content-Encoding zstd"), "{text}");
    assert_eq!(get(&st, &other_log).await.0, StatusCode::NOT_FOUND);
    let (status, _) = put(format!("/{HASH}.narinfo"), "br", b"not brotli".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// A narinfo PUT whose client goes away once its body is read runs to its end: the write
/// and the check after it (its NAR still there) are not cut off half-way.
#[tokio::test]
async fn a_narinfo_upload_whose_client_went_away_runs_to_its_end() {
    use crate::config::Scope;
    use crate::nix::Sha256;
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(Config::default(), &[("ci", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let mut nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
    nar.extend_from_slice(&[7u8; 1000]);
    let sha = Sha256::digest(&nar);
    let file = format!("{}.nar", sha.to_nix32());
    let narinfo = narinfo_of("up", &nar);
    let req = authed("PUT", &format!("/nar/{file}"), "wtok")
        .header("content-length", nar.len())
        .body(Body::from(nar))
        .unwrap();
    assert_eq!(send(&st, req).await.status(), StatusCode::CREATED);

    let key = format!("{HASH}.narinfo");
    let (tx, mut written) = tokio::sync::mpsc::unbounded_channel();
    mem.after_write(&key, move |_| {
        let _ = tx.send(());
    });
    let gate = mem.hold_writes(&key);
    let req = authed("PUT", &format!("/{HASH}.narinfo"), "wtok")
        .header("content-length", narinfo.len())
        .body(Body::from(narinfo))
        .unwrap();
    {
        let put = send(&st, req);
        tokio::pin!(put);
        tokio::select! {
            _ = &mut put => panic!("the narinfo was written through the gate"),
            () = gate.reached() => {}
        }
        // Dropped here, as hyper drops a handler whose client has gone.
    }
    gate.open();
    tokio::time::timeout(Duration::from_secs(60), written.recv())
        .await
        .expect("the narinfo write was cut off with its request")
        .unwrap();
    let (status, _) = get(&st, &format!("/{HASH}.narinfo")).await;
    assert_eq!(status, StatusCode::OK);
}

/// An object stored encoded goes out with its `Content-Encoding` and without `Accept-Ranges`
/// (Nix resumes an encoded download from the start); a plain one offers ranges.
#[tokio::test]
async fn an_encoded_object_is_served_with_its_encoding_and_no_ranges() {
    use super::object::{object_response, Kind};
    let mut obj = crate::store::Object::from_bytes(bytes::Bytes::from_static(b"x"), None).unwrap();
    obj.encoding = Some("br".into());
    let res = object_response(obj, Kind::Log);
    assert_eq!(res.headers()["content-encoding"], "br");
    assert!(!res.headers().contains_key("accept-ranges"));
    let plain = crate::store::Object::from_bytes(bytes::Bytes::from_static(b"x"), None).unwrap();
    let res = object_response(plain, Kind::Log);
    assert!(!res.headers().contains_key("content-encoding"));
    assert_eq!(res.headers()["accept-ranges"], "bytes");
}

/// Logs and listings stored xz- or bzip2-encoded (Nix's `log-compression=xz`) are served
/// decoded to a client whose `Accept-Encoding` does not name the coding (Lix has curl decode
/// them, which knows neither), and as stored to one that sent none (Nix 2.8, which decodes
/// them itself) or names it. HEAD says what GET sends; proxies are told the answer varies.
#[tokio::test]
async fn logs_and_listings_in_codings_curl_lacks_are_decoded_for_clients_that_need_it() {
    use std::io::Write as _;
    let text = b"building '/nix/store/x.drv'...\nall good\n".repeat(50);
    let xz = {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(&text).unwrap();
        e.finish().unwrap()
    };
    let bz2 = {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        e.write_all(&text).unwrap();
        e.finish().unwrap()
    };
    let mem = Arc::new(MemoryStore::new());
    let drv = "5g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-top.drv";
    mem.insert(&format!("log/{drv}"), xz.clone());
    mem.set_encoding(&format!("log/{drv}"), "xz");
    mem.insert(&format!("{HASH}.ls"), bz2.clone());
    mem.set_encoding(&format!("{HASH}.ls"), "bzip2");
    let st = state(Config::default(), &mem);
    let request = |method: &str, path: &str, accept: Option<&str>| {
        let mut r = Request::builder().method(method).uri(path);
        if let Some(a) = accept {
            r = r.header("accept-encoding", a);
        }
        r.body(Body::empty()).unwrap()
    };
    for (path, stored, coding) in [
        (format!("/log/{drv}"), &xz, "xz"),
        (format!("/{HASH}.ls"), &bz2, "bzip2"),
    ] {
        // curl's own list (Lix), and one refusing the stored coding: decoded.
        let refusing = format!("{coding};q=0, gzip");
        for accept in ["deflate, gzip, br, zstd", refusing.as_str()] {
            let get = send(&st, request("GET", &path, Some(accept))).await;
            let head = send(&st, request("HEAD", &path, Some(accept))).await;
            assert_eq!(get.status(), StatusCode::OK, "{path}");
            assert_eq!(get.headers()["vary"], "accept-encoding");
            for name in ["content-encoding", "content-length", "accept-ranges"] {
                assert!(!get.headers().contains_key(name), "{path} {accept}: {name}");
                assert!(
                    !head.headers().contains_key(name),
                    "{path} {accept}: {name}"
                );
            }
            let body = get.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], &text[..], "{path}");
        }
        // None sent (Nix 2.8), the coding named, or any: as stored.
        let naming = "zstd, br, gzip, deflate, bzip2, xz";
        for accept in [None, Some(naming), Some("*")] {
            let get = send(&st, request("GET", &path, accept)).await;
            let head = send(&st, request("HEAD", &path, accept)).await;
            assert_eq!(
                get.headers()["content-encoding"],
                coding,
                "{path} {accept:?}"
            );
            assert_eq!(
                head.headers()["content-encoding"],
                coding,
                "{path} {accept:?}"
            );
            assert_eq!(get.headers()["vary"], "accept-encoding");
            let body = get.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], &stored[..], "{path} {accept:?}");
        }
    }
}

/// A stored log that does not decode as its `Content-Encoding` says is a 502 naming it for a
/// client it is decoded for (not a 200 cut off at once); one that breaks off mid-way is cut
/// off, logged with its key.
#[tokio::test]
async fn a_stored_log_that_does_not_decode_is_a_502_or_logged() {
    use std::io::Write as _;
    let logs = crate::test_logs::capture();
    let text = b"building '/nix/store/x.drv'...\n".repeat(20_000);
    let xz = {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 0);
        e.write_all(&text).unwrap();
        e.finish().unwrap()
    };
    let mem = Arc::new(MemoryStore::new());
    let junk = "5g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-junk.drv";
    mem.insert(&format!("log/{junk}"), b"not xz at all".to_vec());
    mem.set_encoding(&format!("log/{junk}"), "xz");
    let cut = "6g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-cut.drv";
    mem.insert(&format!("log/{cut}"), xz[..xz.len() - 8].to_vec());
    mem.set_encoding(&format!("log/{cut}"), "xz");
    let st = state(Config::default(), &mem);
    let get = |drv: &str| {
        Request::get(format!("/log/{drv}"))
            .header("accept-encoding", "gzip")
            .body(Body::empty())
            .unwrap()
    };
    let res = send(&st, get(junk)).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert!(
        logs.text().contains(&format!("log/{junk}")),
        "{}",
        logs.text()
    );
    // The store's body cut off before anything decoded: the store's failure (503).
    let broken = "7g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-broken.drv";
    // (One byte: the test fault passes half of it, nothing, then the reset.)
    mem.insert(&format!("log/{broken}"), b"x".to_vec());
    mem.set_encoding(&format!("log/{broken}"), "xz");
    mem.fail(
        crate::store::memory::FailOp::Body,
        &format!("log/{broken}"),
        0,
        1,
    );
    let res = send(&st, get(broken)).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let res = send(&st, get(cut)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.into_body().collect().await.is_err(),
        "the cut was not passed on"
    );
    let text = logs.text();
    assert!(
        text.contains("stopped decoding") && text.contains(&format!("log/{cut}")),
        "{text}"
    );
}

/// Decodes of served logs and listings are bounded: with every slot taken, the next waits
/// for one (it is not answered the encoded bytes, which a proxy would keep for everyone), and
/// after 30 s is told to retry (503).
#[tokio::test(start_paused = true)]
async fn served_decodes_are_bounded_and_wait_for_a_slot() {
    use super::object::{decoded_for, Kind};
    use futures::{FutureExt as _, TryStreamExt as _};
    use std::io::Write as _;
    let xz = {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(b"a log").unwrap();
        e.finish().unwrap()
    };
    let encoded = || {
        let mut o = crate::store::Object::from_bytes(bytes::Bytes::from(xz.clone()), None).unwrap();
        o.encoding = Some("xz".into());
        o
    };
    let mut lix = axum::http::HeaderMap::new();
    lix.insert(
        "accept-encoding",
        "deflate, gzip, br, zstd".parse().unwrap(),
    );
    let slots = Arc::new(tokio::sync::Semaphore::new(1));
    let first = decoded_for(encoded(), Kind::Log, &lix, &slots)
        .await
        .unwrap();
    assert_eq!(first.encoding, None);
    let started = tokio::time::Instant::now();
    let refused = decoded_for(encoded(), Kind::Log, &lix, &slots).await;
    assert!(
        matches!(refused, Err(crate::error::Error::Busy(_))),
        "{:?}",
        refused.err()
    );
    assert_eq!(started.elapsed(), std::time::Duration::from_secs(30));
    let mut second = Box::pin(decoded_for(encoded(), Kind::Log, &lix, &slots));
    assert!(
        (&mut second).now_or_never().is_none(),
        "no slot left: it waits"
    );
    let text: Vec<u8> = first.body.try_collect::<Vec<_>>().await.unwrap().concat();
    assert_eq!(text, b"a log");
    let second = second.await.unwrap();
    assert_eq!(
        second.encoding, None,
        "the slot is back once the body is done"
    );
}

/// Which `Accept-Encoding` takes a log stored in xz as it is (RFC 9110 12.5.3): none sent, the
/// coding named (in any case, on any of several header lines), or `*`, unless refused with
/// `q=0` (`Q=0` too), by name first; `identity` or an empty value ask for it decoded.
#[tokio::test]
async fn accept_encoding_is_read_as_the_rfc_says() {
    use super::object::{decoded_for, Kind};
    let slots = Arc::new(tokio::sync::Semaphore::new(8));
    for (lines, as_stored) in [
        (&[][..], true),
        (&["xz"][..], true),
        (&["gzip", "XZ"][..], true),
        (&["*"][..], true),
        (&["gzip, xz;q=0.5"][..], true),
        (&["xz;q=0, *"][..], false),
        (&["*;q=0"][..], false),
        (&["xz; Q=0"][..], false),
        (&["identity"][..], false),
        (&[""][..], false),
    ] {
        let mut req = axum::http::HeaderMap::new();
        for l in lines {
            req.append("accept-encoding", l.parse().unwrap());
        }
        let mut obj =
            crate::store::Object::from_bytes(bytes::Bytes::from_static(b"x"), None).unwrap();
        obj.encoding = Some("xz".into());
        let got = decoded_for(obj, Kind::Log, &req, &slots).await.unwrap();
        assert_eq!(got.encoding.is_some(), as_stored, "{lines:?}");
    }
    // Only whole logs and listings are decoded: not a NAR, not a range of a log.
    let mut lix = axum::http::HeaderMap::new();
    lix.insert("accept-encoding", "gzip".parse().unwrap());
    let xz = |range| {
        let mut o =
            crate::store::Object::from_bytes(bytes::Bytes::from_static(b"xyz"), range).unwrap();
        o.encoding = Some("xz".into());
        o
    };
    let nar = decoded_for(xz(None), Kind::Nar, &lix, &slots)
        .await
        .unwrap();
    assert_eq!(nar.encoding.as_deref(), Some("xz"));
    let part = Some(crate::store::ByteRange::From {
        start: 1,
        end: None,
    });
    let part = decoded_for(xz(part), Kind::Log, &lix, &slots)
        .await
        .unwrap();
    assert_eq!(part.encoding.as_deref(), Some("xz"));
}

/// A HEAD of a log, listing or realisation has the headers its GET has: an encoded one's
/// `Content-Encoding`, and no `Accept-Ranges` then.
#[tokio::test]
async fn a_head_of_an_encoded_object_says_its_encoding_as_its_get_does() {
    let mem = Arc::new(MemoryStore::new());
    let drv = "5g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-top.drv";
    mem.insert(&format!("log/{drv}"), vec![9u8; 40]);
    mem.set_encoding(&format!("log/{drv}"), "br");
    mem.insert(&format!("{HASH}.ls"), b"{}".to_vec());
    let st = state(Config::default(), &mem);
    for (path, encoded) in [
        (format!("/log/{drv}"), true),
        (format!("/{HASH}.ls"), false),
    ] {
        let get = send(&st, Request::get(&path).body(Body::empty()).unwrap()).await;
        let head = send(&st, Request::head(&path).body(Body::empty()).unwrap()).await;
        assert_eq!(
            (get.status(), head.status()),
            (StatusCode::OK, StatusCode::OK)
        );
        for name in [
            "content-length",
            "content-encoding",
            "accept-ranges",
            "content-type",
        ] {
            assert_eq!(
                get.headers().get(name),
                head.headers().get(name),
                "{path}: {name}"
            );
        }
        assert_eq!(
            head.headers().contains_key("content-encoding"),
            encoded,
            "{path}"
        );
        assert!(head
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
    }
    let missing = format!("/log/{}", drv.replace("top", "gone"));
    let head = send(&st, Request::head(&missing).body(Body::empty()).unwrap()).await;
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
}

/// A NAR seen missing hides the narinfos naming it (a NAR 404 fails the client), until it is
/// back: a narinfo uploaded for it here shows it is, even when its NAR came another way (a
/// replica stored it, the client found it there and sent only the narinfo).
#[tokio::test]
async fn a_narinfo_uploaded_for_a_nar_seen_missing_is_served_at_once() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        with_tokens(Config::default(), &[("ci", "wtok", Scope::Write)]),
        &mem,
    );
    let (nar, file) = tiny_nar();
    assert_eq!(
        get(&st, &format!("/nar/{file}")).await.0,
        StatusCode::NOT_FOUND
    );
    mem.insert(&format!("nar/{file}"), nar.clone());
    let narinfo = narinfo_of("back", &nar);
    let req = authed("PUT", &format!("/{HASH}.narinfo"), "wtok")
        .body(Body::from(narinfo))
        .unwrap();
    assert_eq!(send(&st, req).await.status(), StatusCode::CREATED);
    assert_eq!(
        get(&st, &format!("/{HASH}.narinfo")).await.0,
        StatusCode::OK
    );
}

/// A NAR seen missing, then served (another replica had it uploaded since), no longer hides
/// the narinfo naming it; without upstreams, that narinfo stays in memory meanwhile.
#[tokio::test]
async fn a_nar_seen_missing_then_served_shows_its_narinfo_again() {
    let mem = Arc::new(MemoryStore::new());
    let st = state(Config::default(), &mem);
    let (nar, file) = tiny_nar();
    mem.insert(
        &format!("{HASH}.narinfo"),
        narinfo_of("back", &nar).into_bytes(),
    );
    let narinfo = format!("/{HASH}.narinfo");
    assert_eq!(
        get(&st, &format!("/nar/{file}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(&st, &narinfo).await.0, StatusCode::NOT_FOUND, "hidden");
    // From memory (there is no other source to look in).
    let read = mem.gets_under(&narinfo[1..]);
    assert_eq!(get(&st, &narinfo).await.0, StatusCode::NOT_FOUND);
    assert_eq!(mem.gets_under(&narinfo[1..]), read);
    mem.insert(&format!("nar/{file}"), nar.clone());
    assert_eq!(get(&st, &format!("/nar/{file}")).await.0, StatusCode::OK);
    assert_eq!(get(&st, &narinfo).await.0, StatusCode::OK);
}

/// A NAR seen missing, then brought back by another path of the same contents uploaded
/// through another replica: that path (new to this replica) and the first are served once
/// the NAR is looked for again, at most a negative TTL after it was found missing, not only
/// once the miss is forgotten (`narinfo_ttl_secs`, ten minutes). Meanwhile it is looked for
/// once per negative TTL, not for every request.
#[tokio::test(start_paused = true)]
async fn a_nar_seen_missing_is_looked_for_again_once_per_negative_ttl() {
    let mem = Arc::new(MemoryStore::new());
    let st = state(Config::default(), &mem);
    let every = st.config.cache.narinfo_negative_ttl;
    let (nar, file) = tiny_nar();
    mem.insert(
        &format!("{HASH}.narinfo"),
        narinfo_of("p", &nar).into_bytes(),
    );
    assert_eq!(
        get(&st, &format!("/nar/{file}")).await.0,
        StatusCode::NOT_FOUND
    );
    let p = format!("/{HASH}.narinfo");
    assert_eq!(get(&st, &p).await.0, StatusCode::NOT_FOUND, "hidden");
    // Another path, the same NAR, uploaded elsewhere.
    let other = "1b8m03r63zqhnjf7l5wnldhh7c134ap5";
    let q_text = narinfo_of("q", &nar).replace(HASH, other);
    mem.insert(&format!("{other}.narinfo"), q_text.into_bytes());
    mem.insert(&format!("nar/{file}"), nar.clone());
    let q = format!("/{other}.narinfo");
    let heads = mem.heads_under("nar/");
    assert_eq!(
        get(&st, &q).await.0,
        StatusCode::NOT_FOUND,
        "looked for too soon"
    );
    assert_eq!(get(&st, &p).await.0, StatusCode::NOT_FOUND);
    assert_eq!(mem.heads_under("nar/"), heads, "looked for before its time");
    tokio::time::advance(every).await;
    assert_eq!(get(&st, &q).await.0, StatusCode::OK);
    assert_eq!(get(&st, &p).await.0, StatusCode::OK);
    assert_eq!(mem.heads_under("nar/"), heads + 1, "looked for once");
}

/// An upload that finds the stored narinfo's NAR gone removes that narinfo and is refused;
/// the narinfo is then not served from memory either.
#[tokio::test]
async fn a_narinfo_removed_by_a_refused_upload_is_not_served_from_memory() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        with_tokens(Config::default(), &[("ci", "wtok", Scope::Write)]),
        &mem,
    );
    let (nar, _) = tiny_nar();
    let narinfo = narinfo_of("gone", &nar);
    mem.insert(&format!("{HASH}.narinfo"), narinfo.clone().into_bytes());
    let path = format!("/{HASH}.narinfo");
    assert_eq!(
        get(&st, &path).await.0,
        StatusCode::OK,
        "held in memory now"
    );
    let req = authed("PUT", &path, "wtok")
        .body(Body::from(narinfo))
        .unwrap();
    assert_eq!(send(&st, req).await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(get(&st, &path).await.0, StatusCode::NOT_FOUND);
}

/// What the NARs seen missing are remembered for is `cache.narinfo_ttl_secs`, reloadable: a
/// reload starts them afresh with the new TTL, as it does the narinfo memory cache.
#[tokio::test]
async fn a_reload_starts_the_nars_seen_missing_afresh() {
    let mem = Arc::new(MemoryStore::new());
    let st = state(Config::default(), &mem);
    let (nar, file) = tiny_nar();
    mem.insert(
        &format!("{HASH}.narinfo"),
        narinfo_of("gone", &nar).into_bytes(),
    );
    let narinfo = format!("/{HASH}.narinfo");
    assert_eq!(
        get(&st, &format!("/nar/{file}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(&st, &narinfo).await.0, StatusCode::NOT_FOUND, "hidden");
    // The NAR comes back (a repair in the bucket); the TTL is lowered and reloaded.
    mem.insert(&format!("nar/{file}"), nar.clone());
    let mut lower = st.live().config.clone();
    lower.cache.narinfo_ttl = Duration::from_secs(60);
    st.reload(lower, st.live().signing_keys.clone()).unwrap();
    assert_eq!(get(&st, &narinfo).await.0, StatusCode::OK);
}

#[tokio::test]
async fn not_found_answers_carry_the_negative_max_age_others_their_own() {
    let mem = Arc::new(MemoryStore::new());
    let cfg = Config {
        not_found_max_age: Duration::from_secs(7),
        ..Config::default()
    };
    let st = state(cfg, &mem);
    let cache_control = |path: &'static str| {
        let st = st.clone();
        async move {
            let res = send(&st, Request::get(path).body(Body::empty()).unwrap()).await;
            let v = res
                .headers()
                .get("cache-control")
                .map(|v| v.to_str().unwrap().to_owned());
            (res.status(), v)
        }
    };
    assert_eq!(
        cache_control("/f904kp3djilk732cgbnxhpy7vzykbqsh.narinfo").await,
        (StatusCode::NOT_FOUND, Some("public, max-age=7".into()))
    );
    assert_eq!(
        cache_control("/nix-cache-info").await,
        (StatusCode::OK, Some("public, max-age=3600".into()))
    );
}

#[tokio::test]
async fn root_uploads_warn_once_and_carry_the_token_name() {
    use crate::config::Scope;
    let logs = crate::test_logs::capture();
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(
        Config::default(),
        &[
            ("ci-builder", "wtok", Scope::Write),
            ("fleet", "rtok", Scope::Read),
        ],
    );
    let st = state(cfg, &mem);
    let log = format!("/log/{HASH}-up.drv");
    let req = authed("GET", &log, "rtok").body(Body::empty()).unwrap();
    assert_eq!(send(&st, req).await.status(), StatusCode::NOT_FOUND);
    assert!(
        !logs.text().contains("upload was sent to the root"),
        "a read warned"
    );
    let (nar, file) = tiny_nar();
    let path = format!("/nar/{file}");
    let warnings = || {
        logs.text()
            .matches("an upload was sent to the root URL")
            .count()
    };
    // Refused (no token, a read token): not an upload, and the warning is not used up.
    let req = Request::builder()
        .method("PUT")
        .uri(&path)
        .body(Body::empty());
    assert_eq!(
        send(&st, req.unwrap()).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let req = authed("PUT", &path, "rtok").body(Body::empty());
    assert_eq!(
        send(&st, req.unwrap()).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(warnings(), 0, "{}", logs.text());
    for _ in 0..3 {
        let req = authed("PUT", &path, "wtok")
            .header("content-length", nar.len().to_string())
            .body(Body::from(nar.clone()));
        assert_eq!(send(&st, req.unwrap()).await.status(), StatusCode::CREATED);
        assert_eq!(warnings(), 1, "{}", logs.text());
    }
    // The line that records a path published names the token too.
    let (nar, file, narinfo) = uploadable_path();
    let req = authed("PUT", &format!("/nar/{file}"), "wtok").body(Body::from(nar));
    assert_eq!(send(&st, req.unwrap()).await.status(), StatusCode::CREATED);
    let req = authed("PUT", &format!("/{HASH}.narinfo"), "wtok").body(Body::from(narinfo));
    assert_eq!(send(&st, req.unwrap()).await.status(), StatusCode::CREATED);
    let text = logs.text();
    let published = text.lines().find(|l| l.contains("narinfo uploaded"));
    assert!(
        published.is_some_and(|l| l.contains("upload{token=ci-builder}")),
        "{text}"
    );
    // The upload's own lines name the token (never the token itself); a read's lines do not
    // (the store failing makes it log).
    mem.set_down(true);
    let req = authed("GET", &format!("/{HASH}.narinfo"), "rtok");
    let status = send(&st, req.body(Body::empty()).unwrap()).await.status();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let text = logs.text();
    assert!(text.contains("upload{token=ci-builder}"), "{text}");
    assert!(!text.contains("wtok"), "{text}");
    assert!(text.contains("GET"), "{text}");
    assert!(!text.contains("token=fleet"), "{text}");
}

#[tokio::test]
async fn the_metrics_listener_serves_metrics_and_health_checks_alone() {
    let st = state(Config::default(), &Arc::new(MemoryStore::new()));
    let ask = |path: &'static str| {
        let st = st.clone();
        async move {
            let req = Request::get(path).body(Body::empty()).unwrap();
            super::metrics_app(st).oneshot(req).await.unwrap()
        }
    };
    let res = ask("/metrics").await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["content-type"],
        crate::metrics::CLASSIC_CONTENT_TYPE
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(!body.ends_with(b"# EOF\n"), "{body:?}");
    // What Prometheus asks for.
    let req = Request::get("/metrics")
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,*/*;q=0.1",
        )
        .body(Body::empty())
        .unwrap();
    let res = super::metrics_app(st.clone()).oneshot(req).await.unwrap();
    assert_eq!(res.headers()["content-type"], crate::metrics::CONTENT_TYPE);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b"# EOF\n"), "{body:?}");
    assert_eq!(ask("/healthz").await.status(), StatusCode::OK);
    assert_eq!(ask("/readyz").await.status(), StatusCode::OK);
    assert_eq!(ask("/nix-cache-info").await.status(), StatusCode::NOT_FOUND);
}

/// `cellar_uploads_total{kind,verdict}` as /metrics shows it (the registry is process-wide, so
/// tests compare label sets no other test touches).
async fn uploads_counted(st: &AppState, labels: &str) -> f64 {
    let (_, body) = get(st, "/metrics").await;
    let prefix = format!("cellar_uploads_total{{{labels}}} ");
    String::from_utf8(body)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn puts_are_counted_by_kind_and_verdict_and_reads_are_not() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(Config::default(), &[("ci", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let accepted = r#"kind="realisation",verdict="accepted""#;
    let other = r#"kind="health",verdict="other""#;
    let (a0, o0) = (
        uploads_counted(&st, accepted).await,
        uploads_counted(&st, other).await,
    );
    let id = "/realisations/sha256:0l74sag416b7yzqh28bm87pdp102zcgslqmm73y4qr1rn0rmqsyx!out.doi";
    let out = "0d71ygfwbmy1xjlbj1v027dfmy9cqavy-other";
    mem.insert(
        &format!("{}.narinfo", &out[..32]),
        crate::nix::narinfo::stub(out),
    );
    let doc = format!(r#"{{"outPath":"{out}"}}"#);
    let req = authed("PUT", id, "wtok").body(Body::from(doc));
    assert_eq!(send(&st, req.unwrap()).await.status(), StatusCode::CREATED);
    assert_eq!(get(&st, id).await.0, StatusCode::OK);
    // Refused by the router, with no error of cellar's own: counted as "other".
    let req = authed("PUT", "/healthz", "wtok").body(Body::empty());
    assert_eq!(
        send(&st, req.unwrap()).await.status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    // At least (the registry is the process's: a test running beside may count too).
    assert!(uploads_counted(&st, accepted).await >= a0 + 1.0);
    assert!(uploads_counted(&st, other).await >= o0 + 1.0);
}

/// A debug info link is checked when it comes (a build id as its name, a NAR of the layout as
/// its archive, a file under `lib/debug/.build-id/` as its member), then held: written only
/// once a narinfo naming its NAR is accepted, naming the NAR as the store holds it when
/// uploads are re-encoded. Until then the upload address does not find it (Nix's `HEAD`
/// before each link: a client whose upload broke off sends it again) and the root does not
/// serve it; a refused narinfo publishes nothing, nor does one for a path already present.
/// The root serves it under the build id with and without `.debug`.
#[tokio::test]
async fn debug_info_links_wait_for_their_narinfo_and_name_the_stored_nar() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    cfg.upload.recompress = zstd_on_upload();
    let st = state(cfg, &mem);
    let (nar, file, narinfo) = uploadable_path();
    let id = "abcdef0123456789abcdef0123456789abcdef01";
    let member = "lib/debug/.build-id/ab/cdef0123456789abcdef0123456789abcdef01.debug";
    let link = |archive: &str| format!(r#"{{"archive":"{archive}","member":"{member}"}}"#);
    let put = |path: String, body: Body| {
        let st = st.clone();
        async move {
            let req = authed("PUT", &path, "wtok").body(body).unwrap();
            send(&st, req).await.status()
        }
    };
    let put_link =
        |name: String, body: String| put(format!("/upload/debuginfo/{name}"), body.into());
    let probe = |name: String| {
        let st = st.clone();
        async move {
            let req = authed("HEAD", &format!("/upload/debuginfo/{name}"), "wtok")
                .body(Body::empty())
                .unwrap();
            send(&st, req).await.status()
        }
    };
    let sent = link(&format!("../nar/{file}"));
    for (name, body) in [
        ("not-a-build-id".to_owned(), sent.clone()),
        (format!("{id}.debug"), "{}".to_owned()),
        (format!("{id}.debug"), link("../nar/x.nar.xz")),
        (format!("{id}.debug"), sent.replace(member, "etc/passwd")),
    ] {
        assert_eq!(put_link(name, body).await, StatusCode::BAD_REQUEST);
    }
    assert_eq!(
        put_link(format!("{id}.debug"), sent.clone()).await,
        StatusCode::CREATED
    );
    // Another link names a NAR whose narinfo never comes.
    let other = "0".repeat(40);
    let nowhere = link(&format!("../nar/{NAR_FILE}.nar.xz"));
    assert_eq!(put_link(other.clone(), nowhere).await, StatusCode::CREATED);
    assert_eq!(probe(format!("{id}.debug")).await, StatusCode::NOT_FOUND);
    assert_eq!(
        get(&st, &format!("/debuginfo/{id}.debug")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        mem.keys(),
        Vec::<String>::new(),
        "a link was stored before its narinfo"
    );

    let size = nar.len();
    let upload = format!("/upload/nar/{file}");
    assert_eq!(put(upload, Body::from(nar)).await, StatusCode::CREATED);
    // A narinfo refused (its NarSize wrong) publishes nothing; the link waits on.
    let wrong = narinfo.replace(
        &format!("NarSize: {size}"),
        &format!("NarSize: {}", size + 1),
    );
    assert_ne!(wrong, narinfo);
    let narinfo_at = format!("/upload/{HASH}.narinfo");
    assert_eq!(
        put(narinfo_at.clone(), wrong.into()).await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        get(&st, &format!("/debuginfo/{id}.debug")).await.0,
        StatusCode::NOT_FOUND
    );
    assert!(put(narinfo_at.clone(), narinfo.clone().into())
        .await
        .is_success());

    assert_eq!(probe(format!("{id}.debug")).await, StatusCode::OK);
    let stored = link(&format!("../nar/{file}.zst"));
    let (status, body) = get(&st, &format!("/debuginfo/{id}.debug")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        stored,
        "not the name the re-encoded NAR is stored under"
    );
    assert_eq!(
        head(&st, &format!("/debuginfo/{id}.debug")).await,
        (StatusCode::OK, Some(stored.len().to_string()))
    );
    let req = authed("GET", &format!("/upload/debuginfo/{id}.debug"), "wtok")
        .body(Body::empty())
        .unwrap();
    let res = send(&st, req).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, stored.as_bytes());
    // dwarffs asks for the bare build id: it finds the link Nix named `<build id>.debug`.
    assert_eq!(
        get(&st, &format!("/debuginfo/{id}")).await,
        (StatusCode::OK, stored.clone().into_bytes())
    );
    assert_eq!(
        head(&st, &format!("/debuginfo/{id}")).await,
        (StatusCode::OK, Some(stored.len().to_string()))
    );
    assert_eq!(
        get(&st, &format!("/debuginfo/{other}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        head(&st, &format!("/debuginfo/{other}")).await.0,
        StatusCode::NOT_FOUND
    );

    // Sent again with a narinfo for the path already present and the same NAR (its NAR
    // was missing, two builders pushed it at once): the path's links, written.
    let moved = sent.replace("/ab/cdef", "/ab/0def");
    assert_eq!(
        put_link(format!("{id}.debug"), moved.clone()).await,
        StatusCode::CREATED
    );
    assert!(put(narinfo_at.clone(), narinfo.into()).await.is_success());
    let moved_stored = moved.replace(&file, &format!("{file}.zst"));
    assert_eq!(
        get(&st, &format!("/debuginfo/{id}.debug")).await,
        (StatusCode::OK, moved_stored.clone().into_bytes())
    );
    // With another build of the path (not reproducible, another NAR): dropped, the path
    // keeps what it has.
    let mut other_nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
    other_nar.extend_from_slice(&[8u8; 1000]);
    let other_narinfo = narinfo_of("up", &other_nar);
    let other_file = format!("{}.nar", crate::nix::Sha256::digest(&other_nar).to_nix32());
    let upload = format!("/upload/nar/{other_file}");
    assert_eq!(
        put(upload, Body::from(other_nar)).await,
        StatusCode::CREATED
    );
    let elsewhere = link(&format!("../nar/{other_file}"));
    assert_eq!(
        put_link(format!("{id}.debug"), elsewhere.clone()).await,
        StatusCode::CREATED
    );
    let held = st.uploader.debuginfo_held_bytes();
    assert!(put(narinfo_at, other_narinfo.into()).await.is_success());
    assert_eq!(
        get(&st, &format!("/debuginfo/{id}.debug")).await,
        (StatusCode::OK, moved_stored.into_bytes())
    );
    assert_eq!(st.uploader.debuginfo_held_bytes(), held - elsewhere.len());

    // Build ids Nix does not index (lld's 8 bytes, md5's 16): not here, a 404 (a fetcher takes
    // a 400 as a hard error); the store is not asked.
    let asked = mem.requests();
    for short in ["ab".repeat(8), "cd".repeat(16)] {
        assert_eq!(
            get(&st, &format!("/debuginfo/{short}")).await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            head(&st, &format!("/debuginfo/{short}")).await.0,
            StatusCode::NOT_FOUND
        );
    }
    assert_eq!(mem.requests(), asked);
}

/// A narinfo kept in memory holds an allocation of its own size, which is what the cache's
/// budget counts (the rendering reserves more).
#[tokio::test]
async fn a_loaded_narinfo_is_held_at_its_size() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    let st = state(Config::default(), &mem);
    let live = st.live();
    let loaded = super::narinfo::load_from_store(&st, &live, HASH.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    let len = loaded.len();
    let held = loaded.try_into_mut().unwrap_or_else(|_| panic!("shared"));
    assert_eq!(held.capacity(), len);
}

/// A `HEAD` of a NAR at the root that only an upstream has: found for a reader, but a 404 for
/// a builder (a write token), which uploads the NAR only on a 404 and whose narinfo is
/// accepted only if the NAR is in the store.
#[tokio::test]
async fn a_builder_is_not_told_of_a_nar_only_an_upstream_has() {
    use crate::config::Scope;
    let upstream = axum::Router::new().route(
        "/nar/{file}",
        axum::routing::get(|| async { "upstream's nar" }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, upstream).await });
    let mut cfg = with_tokens(
        Config::default(),
        &[
            ("ci", "wtok", Scope::Write),
            ("reader", "rtok", Scope::Read),
        ],
    );
    cfg.upstreams = vec![crate::config::UpstreamConfig {
        url,
        public_keys: Vec::new(),
        timeout: Duration::from_secs(5),
        mirror: false,
    }];
    let st = state(cfg, &Arc::new(MemoryStore::new()));
    let path = format!("/nar/{NAR_FILE}.nar.xz");
    let head = |token: Option<&'static str>| {
        let st = st.clone();
        let path = path.clone();
        async move {
            let req = match token {
                Some(t) => authed("HEAD", &path, t),
                None => Request::builder().method("HEAD").uri(&path),
            };
            send(&st, req.body(Body::empty()).unwrap()).await.status()
        }
    };
    assert_eq!(head(None).await, StatusCode::OK);
    assert_eq!(head(Some("rtok")).await, StatusCode::OK);
    assert_eq!(head(Some("wtok")).await, StatusCode::NOT_FOUND);
}

/// A store that cannot be connected to for a moment (restarting) while a PUT is served does
/// not fail it: the upload's reads are made again for seconds, as its writes are (Nix 2.8
/// retries a failed PUT without its body, which fails the copy). The store here is away for
/// the first moments of a narinfo's upload, whose NAR it then does not have: the answer is
/// that refusal, not the store's failure. On the direct requests' path (away 0.6 s) and the
/// SDK's (away 3.5 s: longer than the SDK's own three tries, which last 3 s at most).
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_waits_out_a_store_restarting() {
    upload_through_a_restart(true, Duration::from_millis(600)).await;
    upload_through_a_restart(false, Duration::from_millis(3500)).await;
}

async fn upload_through_a_restart(direct_requests: bool, outage: Duration) {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let st = s3_state_at(addr, direct_requests).await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let fake = empty_bucket(seen.clone());
    tokio::spawn(async move {
        // The store's outage: not a wait for anything.
        tokio::time::sleep(outage).await;
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        axum::serve(l, fake).await
    });
    let (nar, _) = tiny_nar();
    let req = authed("PUT", &format!("/upload/{HASH}.narinfo"), "wtok")
        .body(Body::from(narinfo_of("up", &nar)))
        .unwrap();
    let res = send(&st, req).await;
    let status = res.status();
    let text = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "direct requests {direct_requests}: {}",
        String::from_utf8_lossy(&text)
    );
    assert!(!seen.lock().unwrap().is_empty());
}

/// A server with a write token `wtok` over an S3 store at `addr` (no prefetch).
async fn s3_state_at(addr: std::net::SocketAddr, direct_requests: bool) -> AppState {
    use crate::config::{S3Credentials, S3StoreConfig, Scope, Secret};
    let s3 = S3StoreConfig {
        bucket: "b".into(),
        endpoint: Some(format!("http://{addr}")),
        region: "us-east-1".into(),
        prefix: String::new(),
        force_path_style: true,
        direct_requests,
        credentials: Some(S3Credentials {
            access_key_id: "k".into(),
            secret_access_key: Secret("s".into()),
        }),
        connect_timeout: Duration::from_secs(2),
        redirect: None,
        upload_part_concurrency: 1,
    };
    let store: Arc<dyn Store> =
        Arc::new(crate::store::s3::S3Store::new(&s3, Duration::from_secs(20)).await);
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    cfg.cache.prefetch_concurrency = 0;
    AppState::new(
        cfg,
        store,
        vec![SecretKey::generate("test-cellar-1").unwrap()],
    )
    .unwrap()
}

/// An empty S3 bucket that takes every write, noting each request's method and query in
/// `seen`.
fn empty_bucket(seen: Arc<std::sync::Mutex<Vec<(axum::http::Method, String)>>>) -> axum::Router {
    axum::Router::new().fallback(move |method: axum::http::Method, uri: axum::http::Uri| {
        let query = uri.query().unwrap_or_default().to_owned();
        seen.lock().unwrap().push((method.clone(), query.clone()));
        async move {
            if method == axum::http::Method::PUT {
                (StatusCode::OK, String::new())
            } else if query.contains("list-type=2") {
                let empty = "<ListBucketResult><IsTruncated>false</IsTruncated>\
                             </ListBucketResult>";
                (StatusCode::OK, empty.to_owned())
            } else {
                let missing = "<Error><Code>NoSuchKey</Code></Error>";
                (StatusCode::NOT_FOUND, missing.to_owned())
            }
        }
    })
}

/// A request body that notes whether it was read.
fn watched_body(bytes: String, read: Arc<std::sync::atomic::AtomicBool>) -> Body {
    let chunk = futures::stream::once(async move {
        read.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok::<_, std::io::Error>(bytes::Bytes::from(bytes))
    });
    Body::from_stream(chunk)
}

/// While the store has been failing, an upload's PUT asks it whether it answers before the
/// body is read. A client that waits for `100 Continue` is answered 503 within a second, its
/// body unread (Nix 2.8 has not sent it, and sends it with its retries); a client sending its
/// body anyway (through nginx) gets the store waited for seconds: back, the upload goes on,
/// and the store is no longer taken for failing. While the store works, nothing is asked.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_while_the_store_fails_is_refused_before_its_body() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let st = s3_state_at(addr, true).await;
    let (nar, _) = tiny_nar();
    let put = |read: &Arc<AtomicBool>, waits: bool| {
        let body = narinfo_of("up", &nar);
        let mut req = authed("PUT", &format!("/upload/{HASH}.narinfo"), "wtok")
            .header(axum::http::header::CONTENT_LENGTH, body.len());
        if waits {
            req = req.header(axum::http::header::EXPECT, "100-continue");
        }
        req.body(watched_body(body, read.clone())).unwrap()
    };
    st.note_store_failed();
    // A store that takes connections and answers nothing for 2 s (its outage: not a wait for
    // anything), longer than a waiting client waits, shorter than one sending its body.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let bucket = empty_bucket(seen.clone());
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        axum::serve(l, bucket).await
    });

    // nix-cache-info, which Nix sends first, is not the store's.
    let info = authed("PUT", "/upload/nix-cache-info", "wtok")
        .header(axum::http::header::EXPECT, "100-continue")
        .body(Body::from("StoreDir: /nix/store\n"))
        .unwrap();
    assert_eq!(send(&st, info).await.status(), StatusCode::NO_CONTENT);
    let read = Arc::new(AtomicBool::new(false));
    let res = send(&st, put(&read, true)).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res
        .extensions()
        .get::<crate::error::StoreFailed>()
        .is_none());
    assert!(!read.load(Ordering::SeqCst), "the body was read");
    assert!(st.store_failing());

    let read = Arc::new(AtomicBool::new(false));
    let res = send(&st, put(&read, false)).await;
    // Its NAR is not in the store: the upload itself was answered.
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert!(read.load(Ordering::SeqCst));
    assert!(!st.store_failing());
    let probes = |seen: &std::sync::Mutex<Vec<(axum::http::Method, String)>>| {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(_, q)| q.contains("max-keys=1"))
            .count()
    };
    let asked = probes(&seen);
    assert!(asked >= 1);

    let read = Arc::new(AtomicBool::new(false));
    assert_eq!(
        send(&st, put(&read, true)).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert!(read.load(Ordering::SeqCst));
    assert_eq!(probes(&seen), asked, "the store was asked while it worked");
}

/// One sample of the `/metrics` page (`name{labels}` as shown), if there is one.
async fn sample(st: &AppState, series: &str) -> Option<f64> {
    let (_, body) = get(st, "/metrics").await;
    let prefix = format!("{series} ");
    String::from_utf8(body)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
}

/// `/metrics` shows what each cache layer holds against its budget, read from the caches at
/// the scrape (the registry is process-wide; these gauges are this server's own).
#[tokio::test]
async fn metrics_show_what_each_cache_layer_holds() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("{HASH}.narinfo"), narinfo_unhashed());
    let mut cfg = Config::default();
    cfg.cache.narinfo_memory_bytes = 12_345_678;
    let st = state(cfg, &mem);
    let layer = |name: &str, layer: &str| format!("cellar_{name}{{layer=\"{layer}\"}}");
    assert_eq!(
        sample(&st, &layer("cache_entries", "narinfo_memory")).await,
        Some(0.0)
    );
    assert_eq!(
        get(&st, &format!("/{HASH}.narinfo")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        sample(&st, &layer("cache_entries", "narinfo_memory")).await,
        Some(1.0)
    );
    let bytes = sample(&st, &layer("cache_bytes", "narinfo_memory")).await;
    assert!(
        bytes.is_some_and(|b| b > narinfo_unhashed().len() as f64),
        "{bytes:?}"
    );
    assert_eq!(
        sample(&st, &layer("cache_max_bytes", "narinfo_memory")).await,
        Some(12_345_678.0)
    );
    // The NAR memory cache is shown with its budget; no disk cache, no series for it.
    assert!(sample(&st, &layer("cache_max_bytes", "nar_memory"))
        .await
        .is_some_and(|b| b > 0.0));
    assert_eq!(sample(&st, &layer("cache_bytes", "nar_disk")).await, None);
}

/// What a server remembers of uploads is let go once nothing relies on it, though no upload
/// comes to make room (a server gone quiet), and `/metrics` shows how much there is.
#[tokio::test(start_paused = true)]
async fn what_uploads_left_in_memory_is_let_go_when_the_server_is_quiet() {
    use crate::config::Scope;
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    cfg.cache.prefetch_concurrency = 0;
    let st = state(cfg, &mem);
    let upkeep = st.spawn_upkeep();
    let (nar, file, narinfo) = uploadable_path();
    let put = |path: String, body: Vec<u8>| authed("PUT", &path, "wtok").body(Body::from(body));
    // A builder's probes, then its upload; and probes of a path it then did not upload.
    let other = "1".repeat(32);
    let missing: crate::nix::NarFileName = format!("{}.nar", "1".repeat(52)).parse().unwrap();
    for probe in [
        format!("/upload/{HASH}.narinfo"),
        format!("/upload/{other}.narinfo"),
        format!("/upload/nar/{missing}"),
    ] {
        let req = authed("HEAD", &probe, "wtok");
        let res = send(&st, req.body(Body::empty()).unwrap()).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{probe}");
    }
    assert_eq!(st.uploader.early_record(&missing).await, Some(true));
    let req = put(format!("/upload/nar/{file}"), nar);
    assert_eq!(send(&st, req.unwrap()).await.status(), StatusCode::CREATED);
    let req = put(format!("/upload/{HASH}.narinfo"), narinfo.into_bytes());
    assert_eq!(send(&st, req.unwrap()).await.status(), StatusCode::CREATED);
    let remembered = || sample(&st, "cellar_upload_memory_entries");
    // The NAR received, the narinfo written, the probes of the other path and NAR, and what
    // the upload records named.
    let before = remembered().await;
    assert!(before.is_some_and(|n| n >= 5.0), "{before:?}");
    // Within the longest time an entry here is relied on (a NAR found bad: a day), all but
    // those go; nothing else is sent to the server meanwhile.
    tokio::time::advance(Duration::from_secs(31 * 60)).await;
    // The upkeep task, woken by the advance, runs before this one goes on.
    tokio::task::yield_now().await;
    assert_eq!(remembered().await, Some(0.0));
    upkeep.abort();
}
