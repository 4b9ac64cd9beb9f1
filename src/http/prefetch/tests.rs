//! Prefetching over the in-memory store: after one narinfo miss, the closure below it and its
//! small NARs are served with the store down.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;

use crate::config::Config;
use crate::http::tests::get;
use crate::http::AppState;
use crate::nix::{base32, SecretKey, Sha256};
use crate::store::memory::MemoryStore;
use crate::store::Store;

struct P {
    hash: String,
    base: String,
    nar_url: String,
    nar: Vec<u8>,
}

/// A path whose NAR is `nar_len` bytes (stored uncompressed), referring to `refs`. The
/// narinfo's `FileSize` says `file_size` (the real size unless a test makes it lie).
fn path(mem: &MemoryStore, seed: &str, refs: &[&P], nar_len: usize, file_size: usize) -> P {
    let hash = base32::encode(&Sha256::digest(seed.as_bytes()).as_bytes()[..20]);
    let base = format!("{hash}-{seed}");
    let nar: Vec<u8> = seed.bytes().cycle().take(nar_len).collect();
    let file = Sha256::digest(&nar).to_nix32();
    let refs: Vec<&str> = refs.iter().map(|r| r.base.as_str()).collect();
    let narinfo = format!(
        "StorePath: /nix/store/{base}\nURL: nar/{file}.nar\nCompression: none\n\
         FileSize: {file_size}\nNarHash: sha256:{file}\nNarSize: {nar_len}\nReferences: {}\n",
        refs.join(" ")
    );
    mem.insert(&format!("{hash}.narinfo"), narinfo);
    mem.insert(&format!("nar/{file}.nar"), nar.clone());
    P {
        hash,
        base,
        nar_url: format!("/nar/{file}.nar"),
        nar,
    }
}

fn state(cfg: Config, mem: &Arc<MemoryStore>) -> AppState {
    let store: Arc<dyn Store> = mem.clone();
    AppState::new(cfg, store, vec![SecretKey::generate("test-1").unwrap()]).unwrap()
}

/// 12 paths, each referring to the two before it: a closure with many routes to each path.
fn ladder(mem: &MemoryStore) -> Vec<P> {
    let mut ladder: Vec<P> = Vec::new();
    for i in 0..12 {
        let refs: Vec<&P> = ladder.iter().rev().take(2).collect();
        let p = path(mem, &format!("p{i}"), &refs, 100, 100);
        ladder.push(p);
    }
    ladder
}

/// A → B → C, and D beside B under A.
fn closure(mem: &MemoryStore) -> [P; 4] {
    let c = path(mem, "c", &[], 300, 300);
    let b = path(mem, "b", &[&c], 200, 200);
    let d = path(mem, "d", &[], 100, 100);
    let a = path(mem, "a", &[&b, &d], 400, 400);
    [a, b, c, d]
}

#[tokio::test]
async fn one_miss_brings_the_closure_and_its_small_nars_into_memory() {
    let mem = Arc::new(MemoryStore::new());
    let [a, b, c, d] = closure(&mem);
    let st = state(Config::default(), &mem);
    assert_eq!(
        get(&st, &format!("/{}.narinfo", a.hash)).await.0,
        StatusCode::OK
    );
    st.prefetch.settled().await;
    let reads = mem.requests();
    // What the client asks next is in memory: nothing reaches the store, even when it is down.
    mem.set_down(true);
    for p in [&b, &c, &d] {
        let (s, _) = get(&st, &format!("/{}.narinfo", p.hash)).await;
        assert_eq!(s, StatusCode::OK, "{} was not prefetched", p.base);
    }
    for p in [&a, &b, &c, &d] {
        let (s, body) = get(&st, &p.nar_url).await;
        assert_eq!(
            s,
            StatusCode::OK,
            "the NAR of {} was not prefetched",
            p.base
        );
        assert_eq!(body, p.nar);
    }
    assert_eq!(mem.requests(), reads);
}

/// The NARs loaded ahead hold at most the memory budget between them: without room (taken
/// by others loading), a NAR is not loaded ahead, and its client's own request loads it.
#[tokio::test]
async fn small_nars_are_loaded_ahead_only_within_the_memory_budget() {
    let mem = Arc::new(MemoryStore::new());
    let [a, b, c, d] = closure(&mem);
    let cfg = Config::default();
    let budget = cfg.cache.nar_memory_bytes;
    let st = state(cfg, &mem);
    let taken = st.nar_memory.room_ahead(budget).expect("all the room");
    assert_eq!(
        get(&st, &format!("/{}.narinfo", a.hash)).await.0,
        StatusCode::OK
    );
    st.prefetch.settled().await;
    assert_eq!(mem.gets_under("nar/"), 0, "no NAR loaded ahead");
    drop(taken);
    for p in [&a, &b, &c, &d] {
        let (s, body) = get(&st, &p.nar_url).await;
        assert_eq!((s, body == p.nar), (StatusCode::OK, true));
    }
}

/// A small NAR the prefetch finds missing hides its narinfo from then on, as a client's own
/// GET of the NAR would: the next client is not sent after a NAR that is not there.
#[tokio::test]
async fn a_nar_the_prefetch_finds_missing_hides_its_narinfo() {
    let mem = Arc::new(MemoryStore::new());
    let [a, b, _c, _d] = closure(&mem);
    mem.remove(&b.nar_url[1..]);
    let st = state(Config::default(), &mem);
    assert_eq!(
        get(&st, &format!("/{}.narinfo", a.hash)).await.0,
        StatusCode::OK
    );
    st.prefetch.settled().await;
    assert_eq!(
        get(&st, &format!("/{}.narinfo", b.hash)).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&st, &format!("/{}.narinfo", a.hash)).await.0,
        StatusCode::OK,
        "only the path whose NAR is missing"
    );
}

#[tokio::test]
async fn without_prefetching_only_what_was_asked_is_read() {
    let mem = Arc::new(MemoryStore::new());
    let [a, b, ..] = closure(&mem);
    let mut cfg = Config::default();
    cfg.cache.prefetch_concurrency = 0;
    let st = state(cfg, &mem);
    assert_eq!(
        get(&st, &format!("/{}.narinfo", a.hash)).await.0,
        StatusCode::OK
    );
    st.prefetch.settled().await;
    assert_eq!(mem.requests(), 1);
    // The NAR is kept in memory once read, all the same.
    assert_eq!(get(&st, &a.nar_url).await.0, StatusCode::OK);
    mem.set_down(true);
    assert_eq!(get(&st, &a.nar_url).await.0, StatusCode::OK);
    assert_eq!(
        get(&st, &format!("/{}.narinfo", b.hash)).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn large_nars_are_streamed_and_not_kept_even_when_the_narinfo_says_small() {
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = Config::default();
    cfg.cache.nar_memory_max_object = 1000;
    let big = path(&mem, "big", &[], 5000, 5000);
    // Its narinfo claims 10 bytes.
    let liar = path(&mem, "liar", &[], 4000, 10);
    let top = path(&mem, "top", &[&big, &liar], 100, 100);
    let st = state(cfg, &mem);
    for p in [&top, &big, &liar] {
        let (s, _) = get(&st, &format!("/{}.narinfo", p.hash)).await;
        assert_eq!(s, StatusCode::OK);
    }
    st.prefetch.settled().await;
    // Prefetched: the NARs whose narinfo says small (top's, and the liar's, which turns out
    // large once read). Not the one known to be large.
    assert_eq!(mem.gets_under("nar/"), 2);
    let (s, body) = get(&st, &big.nar_url).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, big.nar);
    // The liar's NAR is named after its bytes: of another size than its narinfo says, it is
    // broken, a 502 (not streamed as a whole NAR that proxies keep for a year).
    assert_eq!(get(&st, &liar.nar_url).await.0, StatusCode::BAD_GATEWAY);
    mem.set_down(true);
    for p in [&big, &liar] {
        assert_eq!(
            get(&st, &p.nar_url).await.0,
            StatusCode::SERVICE_UNAVAILABLE,
            "{} was kept in memory",
            p.base
        );
    }
    assert_eq!(get(&st, &top.nar_url).await.0, StatusCode::OK);
}

/// The other tests wait for prefetching with `settled`: it must wait for a job that is still
/// running and return once the last one ends (a guard turns a missed wake-up into a failure
/// instead of a hang).
#[tokio::test]
async fn settled_waits_for_the_last_running_job() {
    let p = Arc::new(super::Prefetch::new(2, 0));
    let (release, held) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    p.spawn("narinfo", async move {
        let _ = started_tx.send(());
        let _ = held.await;
    });
    p.spawn("narinfo", async {});
    started.await.unwrap();
    let waiter = tokio::spawn({
        let p = p.clone();
        async move { p.settled().await }
    });
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!waiter.is_finished(), "settled returned while a job ran");
    // The gauge is the process's (other tests' prefetches count too): at least this one.
    assert!(crate::metrics::get().prefetches_pending.get() >= 1);
    release.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
        .await
        .expect("settled missed the last job's end")
        .unwrap();
}

/// Nothing is prefetched twice: not the path itself (a self-reference), not a reference
/// already held in memory.
#[tokio::test]
async fn what_is_held_or_the_path_itself_is_not_prefetched() {
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = Config::default();
    // No NAR prefetching: every job counted is a narinfo's.
    cfg.cache.nar_memory_max_object = 0;
    let held = path(&mem, "held", &[], 100, 100);
    let new = path(&mem, "new", &[], 100, 100);
    let hash = base32::encode(&Sha256::digest(b"self").as_bytes()[..20]);
    let me = format!("{hash}-self");
    let file = Sha256::digest(b"x").to_nix32();
    mem.insert(
        &format!("{hash}.narinfo"),
        format!(
            "StorePath: /nix/store/{me}\nURL: nar/{file}.nar\nCompression: none\n\
             NarHash: sha256:{file}\nNarSize: 1\nReferences: {me} {} {}\n",
            held.base, new.base
        ),
    );
    let st = state(cfg, &mem);
    assert_eq!(
        get(&st, &format!("/{}.narinfo", held.hash)).await.0,
        StatusCode::OK
    );
    st.prefetch.settled().await;
    let before = st.prefetch.started();
    assert_eq!(
        get(&st, &format!("/{hash}.narinfo")).await.0,
        StatusCode::OK
    );
    st.prefetch.settled().await;
    assert_eq!(
        st.prefetch.started() - before,
        1,
        "only {} is new",
        new.base
    );
}

/// The default config with a NAR disk cache in `dir`, and memory taking NARs up to 1000 bytes.
fn with_disk_cache(dir: &tempfile::TempDir) -> Config {
    let mut cfg = Config::default();
    cfg.cache.nar_dir = Some(dir.path().join("nars"));
    cfg.cache.nar_memory_max_object = 1000;
    cfg
}

/// A client's GET of a narinfo starts filling the disk cache with its NAR when memory would not
/// take it, so the NAR is then served with the store down: through a tailed fill (over 1 MiB)
/// or read whole. A HEAD (is the path there?) starts nothing, nor does a NAR over
/// `cache.prefetch_nar_max_bytes`; a NAR memory takes is prefetched into memory only.
#[tokio::test]
async fn a_narinfo_get_fills_the_disk_cache_with_its_nar() {
    use tower::ServiceExt as _;
    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = with_disk_cache(&dir);
    cfg.cache.prefetch_nar_max_bytes = 3 << 20;
    let tailed = path(&mem, "tailed", &[], 2 << 20, 2 << 20);
    // Exactly at the limit: filled ahead too.
    let edge = path(&mem, "edge", &[], 3 << 20, 3 << 20);
    let whole = path(&mem, "whole", &[], 5000, 5000);
    let probed = path(&mem, "probed", &[], 5000, 5000);
    let huge = path(&mem, "huge", &[], 4 << 20, 4 << 20);
    let small = path(&mem, "small", &[], 100, 100);
    let st = state(cfg, &mem);
    for p in [&tailed, &edge, &whole, &huge, &small] {
        let (s, _) = get(&st, &format!("/{}.narinfo", p.hash)).await;
        assert_eq!(s, StatusCode::OK);
    }
    let head = axum::http::Request::head(format!("/{}.narinfo", probed.hash))
        .body(axum::body::Body::empty())
        .unwrap();
    let res = crate::http::app(st.clone()).oneshot(head).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    st.prefetch.settled().await;
    assert_eq!(
        mem.gets_under("nar/"),
        4,
        "each NAR fetched once, but the unasked ones"
    );
    mem.set_down(true);
    for p in [&tailed, &edge, &whole, &small] {
        let (s, body) = get(&st, &p.nar_url).await;
        assert_eq!(
            s,
            StatusCode::OK,
            "the NAR of {} was not prefetched",
            p.base
        );
        assert!(body == p.nar, "{}", p.base);
    }
    for p in [&probed, &huge] {
        let (s, _) = get(&st, &p.nar_url).await;
        assert_eq!(
            s,
            StatusCode::SERVICE_UNAVAILABLE,
            "{} was prefetched",
            p.base
        );
    }
}

/// With prefetching off, a narinfo GET does not fill the disk cache either.
#[tokio::test]
async fn without_prefetching_no_nar_is_filled_ahead() {
    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = with_disk_cache(&dir);
    cfg.cache.prefetch_concurrency = 0;
    let p = path(&mem, "p", &[], 5000, 5000);
    let st = state(cfg, &mem);
    assert_eq!(
        get(&st, &format!("/{}.narinfo", p.hash)).await.0,
        StatusCode::OK
    );
    st.prefetch.settled().await;
    assert_eq!(mem.gets_under("nar/"), 0);
}

#[test]
fn a_narinfo_names_its_nar_and_size() {
    let file = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s.nar.zst";
    let body = format!("StorePath: /nix/store/x\nURL: nar/{file}\nFileSize: 42\nNarSize: 7\n");
    let (nar, size) = super::nar_of(body.as_bytes()).unwrap();
    assert_eq!((nar.as_str(), size), (file, 42));
    let no_size = format!("URL: nar/{file}\nNarSize: 7\n");
    assert!(super::nar_of(no_size.as_bytes()).is_none());
    assert!(super::nar_of(b"URL: elsewhere/x.nar\nFileSize: 42\n").is_none());
}

/// `GET /nar/…` of `url` through the whole router: status, `Location`, `Cache-Control`, body.
async fn get_nar(
    st: &AppState,
    url: &str,
) -> (StatusCode, Option<String>, Option<String>, Vec<u8>) {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let req = axum::http::Request::get(url)
        .body(axum::body::Body::empty())
        .unwrap();
    let res = crate::http::app(st.clone()).oneshot(req).await.unwrap();
    let header = |h| {
        res.headers()
            .get(h)
            .map(|v: &axum::http::HeaderValue| v.to_str().unwrap().to_owned())
    };
    let (location, cache) = (
        header(axum::http::header::LOCATION),
        header(axum::http::header::CACHE_CONTROL),
    );
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, location, cache, body)
}

/// With redirects on (`store.redirect_nars`), a large NAR in the store is answered with a
/// redirect to the store's presigned URL, never read through cellar nor filled ahead by its
/// narinfo's GET; a small one is still served from memory, and one the store lacks is a 404.
#[tokio::test]
async fn large_nars_are_redirected_to_the_store_and_not_filled_ahead() {
    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let big = path(&mem, "big", &[], 5000, 5000);
    let small = path(&mem, "small", &[], 100, 100);
    mem.presign_to("http://s3.example/b");
    let st = state(with_disk_cache(&dir), &mem);
    for p in [&big, &small] {
        assert_eq!(
            get(&st, &format!("/{}.narinfo", p.hash)).await.0,
            StatusCode::OK
        );
    }
    st.prefetch.settled().await;
    assert_eq!(
        mem.gets_under("nar/"),
        1,
        "only the small NAR was read ahead"
    );

    let (status, location, cache, body) = get_nar(&st, &big.nar_url).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(
        location.as_deref(),
        Some(format!("http://s3.example/b{}", big.nar_url).as_str())
    );
    assert_eq!(cache.as_deref(), Some("no-store"), "the URL expires");
    assert!(body.is_empty());

    let (status, location, _, body) = get_nar(&st, &small.nar_url).await;
    assert_eq!((status, location), (StatusCode::OK, None));
    assert!(body == small.nar);
    assert_eq!(
        mem.gets_under("nar/"),
        1,
        "nothing more read through cellar"
    );

    // A small NAR asked for without its narinfo (its size unknown until the HEAD).
    let lone = path(&mem, "lone", &[], 200, 200);
    let (status, location, _, body) = get_nar(&st, &lone.nar_url).await;
    assert_eq!((status, location), (StatusCode::OK, None));
    assert!(body == lone.nar);

    let absent = format!("/nar/{}.nar", "0".repeat(52));
    assert_eq!(get_nar(&st, &absent).await.0, StatusCode::NOT_FOUND);
    assert_eq!(st.nars.as_ref().unwrap().usage(), (0, 0), "nothing on disk");
}

/// A NAR whose stored size is not the one its narinfo gives (cut short) is not redirected,
/// where the client would download bytes its hash check refuses, with nothing logged: served
/// as usual, it is a 502 cellar logs.
#[tokio::test]
async fn a_nar_of_another_size_than_its_narinfo_gives_is_not_redirected() {
    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let cut = path(&mem, "cut", &[], 5000, 5000);
    mem.insert(&cut.nar_url[1..], cut.nar[..4000].to_vec());
    mem.presign_to("http://s3.example/b");
    let st = state(with_disk_cache(&dir), &mem);
    let (status, location, _, _) = get_nar(&st, &cut.nar_url).await;
    assert_eq!(
        status,
        StatusCode::FOUND,
        "its narinfo not read: redirected"
    );
    assert!(location.is_some());
    assert_eq!(
        get(&st, &format!("/{}.narinfo", cut.hash)).await.0,
        StatusCode::OK
    );
    let (status, location, _, _) = get_nar(&st, &cut.nar_url).await;
    assert_eq!((status, location), (StatusCode::BAD_GATEWAY, None));
}

/// A NAR already on cellar's disk is served from there: faster than the store.
#[tokio::test]
async fn a_nar_on_disk_is_served_rather_than_redirected() {
    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let big = path(&mem, "big", &[], 5000, 5000);
    let st = state(with_disk_cache(&dir), &mem);
    let (status, _, _, body) = get_nar(&st, &big.nar_url).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == big.nar);
    let disk = st.nars.clone().unwrap();
    disk.wait_until(|d| d.usage().0 == 1).await;
    mem.presign_to("http://s3.example/b");
    let (status, location, _, body) = get_nar(&st, &big.nar_url).await;
    assert_eq!((status, location), (StatusCode::OK, None));
    assert!(body == big.nar);
    assert_eq!(mem.gets_under("nar/"), 1, "the second GET came from disk");
}

/// What is not redirected even with redirects on: a NAR only an upstream has (passed through,
/// and filled ahead by its narinfo's GET as usual), a HEAD; a `Range` goes with the redirect.
#[tokio::test]
async fn upstream_nars_and_heads_are_not_redirected_and_ranges_are() {
    use tower::ServiceExt as _;
    let upstream_nar: Vec<u8> = b"upstream".iter().copied().cycle().take(5000).collect();
    let served = upstream_nar.clone();
    let upstream = axum::Router::new().route(
        "/nar/{file}",
        axum::routing::get(move || {
            let body = served.clone();
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, upstream).await });

    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let big = path(&mem, "big", &[], 5000, 5000);
    mem.presign_to("http://s3.example/b");
    let mut cfg = with_disk_cache(&dir);
    cfg.upstreams = vec![crate::config::UpstreamConfig {
        url,
        public_keys: Vec::new(),
        timeout: std::time::Duration::from_secs(5),
        mirror: false,
    }];
    let st = state(cfg, &mem);
    let big_key = big.nar_url.trim_start_matches('/');

    let only_upstream = format!("/nar/{}.nar", Sha256::digest(b"elsewhere").to_nix32());
    let (status, location, _, body) = get_nar(&st, &only_upstream).await;
    assert_eq!((status, location), (StatusCode::OK, None));
    assert!(body == upstream_nar);

    let head = axum::http::Request::head(&big.nar_url)
        .body(axum::body::Body::empty())
        .unwrap();
    let res = crate::http::app(st.clone()).oneshot(head).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    let ranged = axum::http::Request::get(&big.nar_url)
        .header(axum::http::header::RANGE, "bytes=100-")
        .body(axum::body::Body::empty())
        .unwrap();
    let res = crate::http::app(st.clone()).oneshot(ranged).await.unwrap();
    assert_eq!(res.status(), StatusCode::FOUND);
    assert_eq!(
        mem.gets_under(big_key),
        0,
        "the big NAR never read through cellar"
    );
}

/// Without a narinfo memory cache, references' narinfos are not prefetched: there is nowhere
/// to keep them, and each load would walk the closure below it again (here a ladder of 12
/// paths, each referring to the next two: thousands of reads for one request).
#[tokio::test]
async fn without_a_narinfo_cache_no_narinfo_is_prefetched() {
    let mem = Arc::new(MemoryStore::new());
    let ladder = ladder(&mem);
    let top = ladder.last().unwrap();
    let mut cfg = Config::default();
    cfg.cache.narinfo_memory_bytes = 0;
    let st = state(cfg, &mem);
    assert_eq!(
        get(&st, &format!("/{}.narinfo", top.hash)).await.0,
        StatusCode::OK
    );
    st.prefetch.settled().await;
    assert_eq!(
        mem.gets_under("") - mem.gets_under("nar/"),
        1,
        "narinfos read"
    );
}

/// Disk-cache fills ahead of their request have a queue of their own, bounded by
/// [`super::FILLS_QUEUED`] (beyond, the client asks for the NAR before the fill would run),
/// and a NAR already queued is not queued again: a walk over a large closure cannot fill the
/// queue the narinfos' prefetch uses.
#[tokio::test]
async fn fills_ahead_are_queued_once_each_and_apart() {
    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let st = state(with_disk_cache(&dir), &mem);
    let paths: Vec<P> = (0..100)
        .map(|i| path(&mem, &format!("f{i}"), &[], 5000, 5000))
        .collect();
    // The NAR reads wait: every fill stays queued or running.
    let gate = mem.hold_reads("nar/");
    let before = st.prefetch.started();
    for _ in 0..3 {
        assert_eq!(
            get(&st, &format!("/{}.narinfo", paths[0].hash)).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(st.prefetch.started() - before, 1, "queued once");
    for p in &paths[1..] {
        assert_eq!(
            get(&st, &format!("/{}.narinfo", p.hash)).await.0,
            StatusCode::OK
        );
    }
    // Those running (up to NAR_FILLS, as their tasks got to run) and those queued.
    let started = st.prefetch.started() - before;
    assert!(
        (super::FILLS_QUEUED..=super::NAR_FILLS + super::FILLS_QUEUED).contains(&started),
        "{started}"
    );
    gate.open();
    st.prefetch.settled().await;
}

/// A narinfo the cache no longer holds (evicted from a full cache, or expired) is not
/// prefetched again for a while: each load would otherwise walk the closure below it again,
/// by every route through it (a ladder of 12 paths, each referring to the next two).
#[tokio::test]
async fn a_closure_prefetched_lately_is_not_walked_again() {
    let mem = Arc::new(MemoryStore::new());
    let ladder = ladder(&mem);
    let top = ladder.last().unwrap();
    let st = state(Config::default(), &mem);
    let narinfo_reads = || mem.gets_under("") - mem.gets_under("nar/");
    // The top asked for, and what it prefetches done: the narinfos read so far.
    let ask_top = || async {
        assert_eq!(
            get(&st, &format!("/{}.narinfo", top.hash)).await.0,
            StatusCode::OK
        );
        st.prefetch.settled().await;
        narinfo_reads()
    };
    // The whole closure gone from memory.
    let forget = || async {
        for p in &ladder {
            st.live().narinfos.invalidate(p.hash.parse().unwrap()).await;
        }
    };
    assert_eq!(ask_top().await, 12);
    // Gone from memory, the whole closure; the top asked for again.
    forget().await;
    assert_eq!(ask_top().await, 13);
    // A reload that changes nothing the narinfo cache holds keeps it...
    st.reload(Config::default(), st.live().signing_keys.clone())
        .unwrap();
    assert_eq!(ask_top().await, 13);
    // ...and what it prefetched lately: the closure is not walked again.
    forget().await;
    assert_eq!(ask_top().await, 14);
    // ...one that changes its settings starts an empty one: the closure is prefetched into it.
    let mut shorter = Config::default();
    shorter.cache.narinfo_ttl = Duration::from_secs(300);
    st.reload(shorter, st.live().signing_keys.clone()).unwrap();
    assert_eq!(ask_top().await, 26);
}

/// With a narinfo TTL of 0 nothing prefetched would be kept: nothing is prefetched.
#[tokio::test]
async fn without_a_narinfo_ttl_no_narinfo_is_prefetched() {
    let mem = Arc::new(MemoryStore::new());
    let [a, ..] = closure(&mem);
    let mut cfg = Config::default();
    cfg.cache.narinfo_ttl = std::time::Duration::ZERO;
    let st = state(cfg, &mem);
    assert_eq!(
        get(&st, &format!("/{}.narinfo", a.hash)).await.0,
        StatusCode::OK
    );
    st.prefetch.settled().await;
    assert_eq!(
        mem.gets_under("") - mem.gets_under("nar/"),
        1,
        "narinfos read"
    );
}

/// A large NAR found in the bucket and redirected to it is asked about once, not at every GET
/// of its narinfo (each a billed request to the store).
#[tokio::test]
async fn a_redirected_nar_is_not_asked_about_again() {
    let mem = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let big = path(&mem, "big", &[], 5000, 5000);
    mem.presign_to("http://s3.example/b");
    let st = state(with_disk_cache(&dir), &mem);
    for _ in 0..3 {
        assert_eq!(
            get(&st, &format!("/{}.narinfo", big.hash)).await.0,
            StatusCode::OK
        );
        st.prefetch.settled().await;
    }
    assert_eq!(mem.heads_under("nar/"), 1);
    assert_eq!(mem.gets_under("nar/"), 0);
}

/// Reloads `change` while prefetches are queued behind the only slot (b's or d's narinfo
/// holding it); the narinfos and the NARs then read.
async fn reload_with_prefetches_queued(change: impl FnOnce(&mut Config)) -> (usize, usize) {
    let mem = Arc::new(MemoryStore::new());
    let [a, b, _, d] = closure(&mem);
    let mut cfg = Config::default();
    cfg.cache.prefetch_concurrency = 1;
    let st = state(cfg.clone(), &mem);
    let gate = mem.hold_reads(&format!("{}.narinfo", b.hash));
    let gate_d = mem.hold_reads(&format!("{}.narinfo", d.hash));
    assert_eq!(
        get(&st, &format!("/{}.narinfo", a.hash)).await.0,
        StatusCode::OK
    );
    tokio::select! {
        () = gate.reached() => {}
        () = gate_d.reached() => {}
    }
    change(&mut cfg);
    st.reload(cfg, st.live().signing_keys.clone()).unwrap();
    gate.open();
    gate_d.open();
    st.prefetch.settled().await;
    (
        mem.gets_under("") - mem.gets_under("nar/"),
        mem.gets_under("nar/"),
    )
}

/// Prefetches queued before a reload that changes the upstreams are dropped: the old state's
/// narinfo cache is no longer read, and its upstreams may be gone from the configuration.
#[tokio::test]
async fn prefetches_queued_before_a_reload_of_the_upstreams_are_dropped() {
    let read = reload_with_prefetches_queued(|c| {
        // Never asked: the prefetches that would are dropped.
        c.upstreams = vec![crate::config::UpstreamConfig {
            url: "http://127.0.0.1:9".into(),
            public_keys: Vec::new(),
            timeout: Duration::from_secs(5),
            mirror: false,
        }];
    })
    .await;
    // a's, then one of b's and d's: the other was queued before the reload, as were the
    // NARs' prefetches.
    assert_eq!(read, (2, 0), "narinfos and NARs read");
}

/// Narinfo prefetches queued before a reload that replaces the narinfo cache are dropped: they
/// would load into the old one.
#[tokio::test]
async fn narinfo_prefetches_queued_before_a_reload_of_the_narinfo_cache_are_dropped() {
    let read = reload_with_prefetches_queued(|c| {
        c.cache.narinfo_ttl = Duration::from_secs(300);
    })
    .await;
    assert_eq!(read.0, 2, "a's, then one of b's and d's");
}

/// A reload of what prefetches do not depend on (the tokens) lets those queued run.
#[tokio::test]
async fn prefetches_queued_before_a_reload_of_tokens_run() {
    let read = reload_with_prefetches_queued(|c| {
        *c = crate::http::tests::with_tokens(
            c.clone(),
            &[("ci", "ci-token", crate::config::Scope::Write)],
        );
    })
    .await;
    assert_eq!(read.0, 4, "the whole closure's narinfos");
}
