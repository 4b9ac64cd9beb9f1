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

fn state(cfg: Config, mem: &Arc<MemoryStore>) -> AppState {
    let store: Arc<dyn Store> = mem.clone();
    AppState::new(
        cfg,
        store,
        vec![SecretKey::generate("test-cellar-1").unwrap()],
    )
    .unwrap()
}

async fn get(st: &AppState, path: &str) -> (StatusCode, Vec<u8>) {
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
}

#[tokio::test]
async fn misses_are_remembered_for_the_negative_ttl_only() {
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = Config::default();
    cfg.cache.narinfo_negative_ttl = Duration::from_secs(1);
    let st = state(cfg, &mem);
    let path = format!("/{HASH}.narinfo");
    assert_eq!(get(&st, &path).await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(&st, &path).await.0, StatusCode::NOT_FOUND);
    assert_eq!(mem.requests(), 1, "the second miss comes from memory");
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(get(&st, &path).await.0, StatusCode::OK);
    assert_eq!(mem.requests(), 2);
}

#[tokio::test]
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
    mem.set_latency(Duration::from_millis(300));
    let st = state(Config::default(), &mem);
    let lookup = {
        let st = st.clone();
        tokio::spawn(async move { get(&st, &format!("/{HASH}.narinfo")).await })
    };
    // The lookup is waiting on the store when the upload lands.
    tokio::time::sleep(Duration::from_millis(100)).await;
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    st.narinfos.invalidate(HASH.parse().unwrap()).await;
    assert_eq!(lookup.await.unwrap().0, StatusCode::OK);
    assert_eq!(
        get(&st, &format!("/{HASH}.narinfo")).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
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

async fn head(st: &AppState, path: &str) -> (StatusCode, Option<String>) {
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

#[tokio::test]
async fn head_of_a_nar_finds_it_re_encoded_on_upload() {
    let mem = Arc::new(MemoryStore::new());
    // Uploaded as .nar.xz, stored re-encoded as .nar.zst.
    mem.insert(&format!("nar/{NAR_FILE}.nar.zst"), vec![1u8; 200]);
    let mut cfg = Config::default();
    cfg.upload.recompress = Some(crate::config::Recompression {
        compression: crate::nix::Compression::Zstd,
        level: None,
    });
    let st = state(cfg, &mem);
    assert_eq!(
        head(&st, &format!("/nar/{NAR_FILE}.nar.xz")).await,
        (StatusCode::OK, Some("200".into()))
    );
    // Without recompression, the name the client used is all there is.
    let st = state(Config::default(), &mem);
    assert_eq!(
        head(&st, &format!("/nar/{NAR_FILE}.nar.xz")).await.0,
        StatusCode::NOT_FOUND
    );
}
