//! What the serving side sends back beyond the status: headers by kind of object, ranges,
//! signatures kept or replaced, which NARs go through memory, and the size limits at the
//! door, exactly at their bounds.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;

use super::tests::{authed, get, send, state, with_tokens};
use crate::config::{Config, Scope};
use crate::error::{Error, UploadError};
use crate::nix::Sha256;
use crate::store::memory::MemoryStore;
use crate::store::Store as _;

const NARINFO: &str = include_str!("../../tests/fixtures/narinfo/top.narinfo");
const HASH: &str = "f904kp3djilk732cgbnxhpy7vzykbqsh";
const NAR_FILE: &str = "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7";
const DRV: &str = "5g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-top.drv";
const REALISATION: &str =
    "realisations/sha256:1h86vccx9vgcyrkj3zv4b7j3r8rrc0z0r4r6q4jp1bz4g4jcv7vb!out.doi";

async fn get_with(
    st: &super::AppState,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let res = send(st, req).await;
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes().to_vec();
    (parts.status, parts.headers, body)
}

/// `cfg` with the NAR disk cache on, in `dir`.
fn disk_cached(mut cfg: Config, dir: &tempfile::TempDir) -> Config {
    cfg.cache.nar_dir = Some(dir.path().join("nars"));
    cfg
}
#[tokio::test]
async fn each_kind_of_object_has_its_type_and_cache_lifetime() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("nar/{NAR_FILE}.nar"), vec![1u8; 100]);
    mem.insert(&format!("{HASH}.ls"), r#"{"version":1}"#);
    mem.insert(&format!("log/{DRV}"), "building\n");
    mem.insert(
        REALISATION,
        format!(r#"{{"outPath":"{HASH}-top","signatures":[]}}"#),
    );
    let st = state(Config::default(), &mem);
    let year = "public, max-age=31536000, immutable";
    let hour = "public, max-age=3600";
    for (path, content_type, cache_control) in [
        (
            format!("/nar/{NAR_FILE}.nar"),
            "application/x-nix-nar",
            year,
        ),
        (format!("/{HASH}.ls"), "application/json", hour),
        (format!("/log/{DRV}"), "text/plain; charset=utf-8", hour),
        (format!("/{REALISATION}"), "application/json", hour),
    ] {
        let req = Request::get(&path).body(Body::empty()).unwrap();
        let (status, headers, _) = get_with(&st, req).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers["content-type"], content_type, "{path}");
        assert_eq!(headers["cache-control"], cache_control, "{path}");
        // A realisation is made for each request (signed), and sent whole.
        let ranges = (!path.starts_with("/realisations/")).then_some("bytes");
        assert_eq!(
            headers.get("accept-ranges").map(|v| v.to_str().unwrap()),
            ranges,
            "{path}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
    }
    // Errors too: a browser is never to guess a type.
    let req = Request::get("/log/5g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-other.drv")
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = get_with(&st, req).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["x-content-type-options"], "nosniff");
}

/// Nix resumes a broken NAR download with a range.
#[tokio::test]
async fn a_range_of_a_nar_is_answered_with_206_and_those_bytes() {
    let mem = Arc::new(MemoryStore::new());
    let nar: Vec<u8> = (0..=255u8).collect();
    mem.insert(&format!("nar/{NAR_FILE}.nar"), nar.clone());
    let st = state(Config::default(), &mem);
    let req = Request::get(format!("/nar/{NAR_FILE}.nar"))
        .header("range", "bytes=10-19")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = get_with(&st, req).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body, nar[10..20]);
    assert_eq!(headers["content-range"], "bytes 10-19/256");
}

/// A range asked for under `If-Range` is answered with the whole object: cellar gives no
/// validator a client could hold, so a log replaced since the first part was read is not
/// spliced onto it.
#[tokio::test]
async fn a_range_under_if_range_is_answered_with_the_whole_object() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("log/{DRV}"), "building, second try\n");
    let st = state(Config::default(), &mem);
    let req = Request::get(format!("/log/{DRV}"))
        .header("range", "bytes=9-")
        .header("if-range", "\"v1\"")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = get_with(&st, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"building, second try\n");
    assert!(headers.get("content-range").is_none(), "{headers:?}");
}

/// A NAR no narinfo announced as small is streamed: read from the store once, not first
/// loaded whole for the memory cache and then read again.
#[tokio::test]
async fn a_nar_not_known_to_be_small_is_read_from_the_store_once() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("nar/{NAR_FILE}.nar"), vec![1u8; 300]);
    let mut cfg = Config::default();
    cfg.cache.nar_memory_max_object = 100;
    let st = state(cfg, &mem);
    let (status, body) = get(&st, &format!("/nar/{NAR_FILE}.nar")).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 300));
    assert_eq!(mem.gets_under("nar/"), 1);
}

/// The narinfo's own signatures are kept next to cellar's by default
/// (`signing.keep_existing_signatures`), and dropped when that is off.
#[tokio::test]
async fn existing_signatures_are_kept_or_dropped_as_configured() {
    let theirs = NARINFO
        .lines()
        .find(|l| l.starts_with("Sig: test-1:"))
        .unwrap();
    for keep in [true, false] {
        let mem = Arc::new(MemoryStore::new());
        mem.insert(&format!("{HASH}.narinfo"), NARINFO);
        let mut cfg = Config::default();
        cfg.signing.keep_existing_signatures = keep;
        let st = state(cfg, &mem);
        let (status, body) = get(&st, &format!("/{HASH}.narinfo")).await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body).unwrap();
        let sigs: Vec<&str> = text.lines().filter(|l| l.starts_with("Sig: ")).collect();
        assert!(
            sigs.iter().any(|l| l.starts_with("Sig: test-cellar-1:")),
            "{text}"
        );
        assert_eq!(sigs.contains(&theirs), keep, "keep = {keep}: {text}");
        assert_eq!(sigs.len(), if keep { 2 } else { 1 }, "{text}");
    }
}

fn nar_of(len: usize) -> (String, Vec<u8>) {
    let mut nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
    nar.resize(len, 7);
    (format!("{}.nar", Sha256::digest(&nar).to_nix32()), nar)
}

/// `upload.max_nar_bytes` is the largest NAR accepted, to the byte, by its declared length.
#[tokio::test]
async fn a_nar_of_exactly_the_size_limit_is_accepted() {
    let (small_file, small) = nar_of(500);
    let (file, nar) = nar_of(2000);
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    cfg.upload.max_nar_bytes = nar.len() as u64;
    let st = state(cfg, &mem);
    for (file, nar) in [(small_file, small), (file, nar)] {
        let req = authed("PUT", &format!("/upload/nar/{file}"), "wtok")
            .header("content-length", nar.len())
            .body(Body::from(nar.clone()))
            .unwrap();
        assert_eq!(
            send(&st, req).await.status(),
            StatusCode::CREATED,
            "{}",
            nar.len()
        );
    }
}

fn chunks(sizes: &[usize]) -> Body {
    let parts: Vec<Result<bytes::Bytes, std::io::Error>> = sizes
        .iter()
        .map(|&n| Ok(bytes::Bytes::from(vec![b'x'; n])))
        .collect();
    Body::from_stream(futures::stream::iter(parts))
}

/// A body read into memory (a narinfo) may be as long as its limit, in one chunk or many,
/// and not a byte longer.
#[tokio::test]
async fn bodies_read_whole_are_bounded_to_the_byte() {
    let st = state(Config::default(), &Arc::new(MemoryStore::new()));
    let read = |sizes: &'static [usize]| {
        let st = st.clone();
        async move {
            super::object::read_body(&st, chunks(sizes), 10)
                .await
                .map(|(bytes, _room)| bytes)
        }
    };
    assert_eq!(read(&[10]).await.unwrap().len(), 10);
    assert_eq!(read(&[4, 6]).await.unwrap().len(), 10);
    for over in [&[11][..], &[6, 6][..], &[10, 1][..]] {
        let sizes: &'static [usize] = over;
        let e = read(sizes).await.unwrap_err();
        assert!(
            matches!(e, Error::Upload(UploadError::TooLarge { limit: 10 })),
            "{sizes:?}: {e:?}"
        );
    }
}

/// A body read into memory whole that trickles in (a byte just before each idle timeout)
/// is cut off once it has taken longer than its size allows, and lets its room go: the
/// memory it holds is what other uploads wait for. (Paused time.)
#[tokio::test(start_paused = true)]
async fn a_whole_body_trickling_in_is_cut_off() {
    let st = state(Config::default(), &Arc::new(MemoryStore::new()));
    let idle = st.config.upload.body_idle_timeout;
    let trickle = futures::stream::unfold(0u32, move |n| async move {
        tokio::time::sleep(idle - std::time::Duration::from_secs(1)).await;
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")),
            n + 1,
        ))
    });
    let body = Body::from_stream(trickle);
    let started = tokio::time::Instant::now();
    let e = super::object::read_body(&st, body, 1000)
        .await
        .map(|(bytes, _room)| bytes)
        .unwrap_err();
    assert!(
        matches!(e, Error::Upload(UploadError::TooSlow { secs: 60 })),
        "{e:?}"
    );
    assert_eq!(e.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(started.elapsed(), std::time::Duration::from_secs(60));
    // A body that keeps coming, a byte a second, arrives within the minute.
    let slow = futures::stream::unfold(0u32, |n| async move {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        (n < 50).then(|| {
            (
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")),
                n + 1,
            )
        })
    });
    let (got, _room) = super::object::read_body(&st, Body::from_stream(slow), 1000)
        .await
        .unwrap();
    assert_eq!(got.len(), 50);
}

/// `/build-trace/<drv>/<output>` and `/build-trace-v2/<drv>/<output>.doi` (the realisations
/// of later Nix) are each stored as sent under their own key once the path they name is in the
/// cache, and served as stored; HEAD of them, and of `/realisations/…`, gives the length. Sent
/// again it is 200 (nothing written); naming another path too (the published one is kept).
#[tokio::test]
async fn build_traces_are_stored_as_sent_and_found_by_head() {
    for key in [
        format!("build-trace/{DRV}/out"),
        format!("build-trace-v2/{DRV}/out.doi"),
    ] {
        let mem = Arc::new(MemoryStore::new());
        let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
        let st = state(cfg, &mem);
        let doc = format!(r#"{{"outPath":"{HASH}-top","signatures":[]}}"#).into_bytes();
        let put = |doc: Vec<u8>| {
            authed("PUT", &format!("/upload/{key}"), "wtok")
                .header("content-length", doc.len())
                .body(Body::from(doc))
                .unwrap()
        };
        // Its output not in the cache yet: refused, nothing stored.
        assert_eq!(
            send(&st, put(doc.clone())).await.status(),
            StatusCode::BAD_REQUEST,
            "{key}"
        );
        assert!(mem.keys().is_empty(), "{:?}", mem.keys());
        mem.insert(&format!("{HASH}.narinfo"), NARINFO);
        assert_eq!(
            send(&st, put(doc.clone())).await.status(),
            StatusCode::CREATED,
            "{key}"
        );
        assert_eq!(send(&st, put(doc.clone())).await.status(), StatusCode::OK);
        let other = br#"{"outPath":"0d71ygfwbmy1xjlbj1v027dfmy9cqavy-other"}"#.to_vec();
        // Another build's: the published one is kept, the upload succeeds.
        assert_eq!(send(&st, put(other)).await.status(), StatusCode::OK);
        let stored = mem
            .get(&key, None)
            .await
            .unwrap()
            .expect("stored under its own key");
        let mut body = Vec::new();
        let mut s = stored.body;
        while let Some(c) = futures::StreamExt::next(&mut s).await {
            body.extend_from_slice(&c.unwrap());
        }
        assert_eq!(body, doc);
        let (status, got) = get(&st, &format!("/{key}")).await;
        assert_eq!((status, got), (StatusCode::OK, doc.clone()), "{key}");
        mem.insert(REALISATION, doc.clone());
        for path in [
            format!("/{key}"),
            format!("/upload/{key}"),
            format!("/{REALISATION}"),
        ] {
            let req = authed("HEAD", &path, "wtok").body(Body::empty()).unwrap();
            let res = send(&st, req).await;
            assert_eq!(res.status(), StatusCode::OK, "{path}");
            assert_eq!(
                res.headers()["content-length"],
                doc.len().to_string(),
                "{path}"
            );
        }
    }
}

/// A build trace of Nix 2.35's layout names its output as `<output>.doi`; without the suffix
/// (or with the other layout's name) it is no build trace: 400, the store not asked.
#[tokio::test]
async fn a_build_trace_v2_without_its_suffix_is_refused() {
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("build-trace-v2/{DRV}/out"), "{}");
    let st = state(Config::default(), &mem);
    let (status, _) = get(&st, &format!("/build-trace-v2/{DRV}/out")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(mem.gets_under(""), 0, "the store was asked");
}

/// A request head larger than a connection buffers is refused (431) without being held
/// whole; one of a few KiB is answered.
#[tokio::test]
async fn a_request_head_over_the_buffer_is_refused() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let st = state(Config::default(), &Arc::new(MemoryStore::new()));
    tokio::spawn(super::server::serve(listener, st, std::future::pending()));
    for (len, expected) in [
        (4 << 10, "HTTP/1.1 200"),
        (super::server::MAX_BUF_BYTES * 2, "HTTP/1.1 431"),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(len)
        );
        // The server may answer before it has read it all.
        let _ = tcp.write_all(head.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with(expected), "{len}: {answer}");
    }
}

/// The connection loop serves requests on its listener until told to stop, then returns.
#[tokio::test]
async fn the_server_answers_on_its_listener_and_stops_when_told() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let st = state(Config::default(), &Arc::new(MemoryStore::new()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(super::server::serve(listener, st.clone(), async {
        let _ = stopped.await;
    }));
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!st.draining.load(std::sync::atomic::Ordering::SeqCst));
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    // What `/readyz` (on `metrics_listen`, still open) now says.
    assert!(st.draining.load(std::sync::atomic::Ordering::SeqCst));
}

/// With `shutdown_delay`, a server told to stop answers 503 on `/readyz` at once and goes on
/// accepting connections and serving them (a load balancer stops sending clients before the
/// port closes).
#[tokio::test]
async fn a_server_told_to_stop_accepts_for_the_delay_while_not_ready() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = Config {
        shutdown_delay: std::time::Duration::from_secs(3600),
        ..Config::default()
    };
    let st = state(cfg, &Arc::new(MemoryStore::new()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(super::server::serve(listener, st.clone(), async {
        let _ = stopped.await;
    }));
    let ask = |path: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        answer
    };
    assert!(ask("/readyz").await.starts_with("HTTP/1.1 200"));
    stop.send(()).unwrap();
    // Until the server has taken the word (yields, no wait on the clock).
    for _ in 0..100_000 {
        if st.draining.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        tokio::task::yield_now().await;
    }
    let ready = ask("/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    let served = ask("/nix-cache-info").await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    // A request on a kept-alive connection (a proxy's pool) is answered, and the connection
    // closed with it, so that the proxy stops using it before the delay ends.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tcp.read_to_string(&mut answer),
    )
    .await;
    assert!(closed.is_ok(), "the connection stayed open: {answer}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(!server.is_finished());
    server.abort();
}

/// A request whose answer takes longer than `idle_timeout` to start (a slow store here; an
/// upload's NAR read back and checked in life) keeps its connection: nothing moves on it
/// meanwhile, but it is not idle.
#[tokio::test]
async fn a_slow_answer_is_not_an_idle_connection() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mem = Arc::new(MemoryStore::new());
    mem.set_latency(std::time::Duration::from_millis(2500));
    let cfg = Config {
        idle_timeout: std::time::Duration::from_secs(1),
        ..Config::default()
    };
    let st = state(cfg, &mem);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(super::server::serve(listener, st, async {
        let _ = stopped.await;
    }));
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let ask = format!("GET /{HASH}.narinfo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    tcp.write_all(ask.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer:?}");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// `/status` reports each upstream as up until it fails (three times in a row), then as down.
#[tokio::test]
async fn status_reports_an_upstream_up_then_down_once_it_fails() {
    let mem = Arc::new(MemoryStore::new());
    let cfg = Config {
        upstreams: vec![super::tests::dead_upstream()],
        ..Config::default()
    };
    let st = state(cfg, &mem);
    let up = |st: super::AppState| async move {
        let (status, body) = get(&st, "/status").await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["upstreams"][0]["up"].as_bool().unwrap()
    };
    assert!(up(st.clone()).await);
    for _ in 0..crate::upstream::FAILURES_IN_A_ROW {
        assert_eq!(
            get(&st, &format!("/{HASH}.narinfo")).await.0,
            StatusCode::NOT_FOUND
        );
    }
    assert!(!up(st.clone()).await);
}

/// `/status` says whether the store answers, as `/readyz` does: `ready`, or why not.
#[tokio::test(start_paused = true)]
async fn status_says_whether_the_store_answers() {
    let mem = Arc::new(MemoryStore::new());
    let st = state(Config::default(), &mem);
    let state_of = |st: super::AppState| async move {
        let (status, body) = get(&st, "/status").await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["store_state"].as_str().unwrap().to_owned()
    };
    assert_eq!(state_of(st.clone()).await, "ready");
    mem.set_down(true);
    tokio::time::advance(super::health::SHARED * 2).await;
    assert_eq!(state_of(st.clone()).await, "store unavailable");
    // Up, but refusing the credentials (a bad rotation): for the operator to fix.
    mem.set_down(false);
    mem.set_misconfigured(true);
    tokio::time::advance(super::health::SHARED * 2).await;
    assert_eq!(state_of(st.clone()).await, "store misconfigured");
    assert_eq!(
        get(&st, "/readyz").await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            b"store misconfigured\n".to_vec()
        )
    );
}

/// `/status` counts the requests the store's failures made 5xx since the start, and names the
/// last one's kind: a replica whose reads all fail does not look idle there. A miss is no
/// failure.
#[tokio::test]
async fn status_counts_the_stores_failures() {
    let mem = Arc::new(MemoryStore::new());
    let cfg = Config {
        upstreams: vec![super::tests::dead_upstream()],
        ..Config::default()
    };
    let st = state(cfg, &mem);
    let failures = |st: super::AppState| async move {
        let (_, body) = get(&st, "/status").await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["store_failures"].clone()
    };
    assert_eq!(
        get(&st, &format!("/{HASH}.narinfo")).await.0,
        StatusCode::NOT_FOUND
    );
    // Not the store's: a NAR the store lacks while the upstream cannot be asked.
    assert_eq!(
        get(&st, &format!("/nar/{NAR_FILE}.nar.xz")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(failures(st.clone()).await["count"], 0);
    assert!(failures(st.clone()).await["last"].is_null());
    mem.set_down(true);
    let (status, _) = get(&st, "/nix-cache-info").await;
    assert_eq!(status, StatusCode::OK, "answered from memory");
    let other = "g904kp3djilk732cgbnxhpy7vzykbqsh";
    assert_eq!(
        get(&st, &format!("/{other}.narinfo")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    mem.set_down(false);
    let third = "h904kp3djilk732cgbnxhpy7vzykbqsh";
    mem.insert(&format!("{third}.narinfo"), "not a narinfo");
    assert_eq!(
        get(&st, &format!("/{third}.narinfo")).await.0,
        StatusCode::BAD_GATEWAY
    );
    let f = failures(st.clone()).await;
    assert_eq!(f["count"], 2, "{f}");
    assert_eq!(f["last"], "corrupt_object");
    assert!(f["last_secs_ago"].as_u64().is_some());
}

/// A narinfo missed while an upstream could not be asked is a 404 that is not kept: not in
/// memory (the next request looks again), not by caches in front (`no-store`).
#[tokio::test]
async fn a_miss_while_an_upstream_is_down_is_not_remembered() {
    let mem = Arc::new(MemoryStore::new());
    let cfg = Config {
        upstreams: vec![super::tests::dead_upstream()],
        ..Config::default()
    };
    let st = state(cfg, &mem);
    let url = format!("/{HASH}.narinfo");
    let req = Request::get(&url).body(Body::empty()).unwrap();
    let (status, headers, _) = get_with(&st, req).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["cache-control"], "no-store");
    // The path arrives (another replica's upload, the upstream back): found at once, not
    // after the negative TTL.
    mem.insert(&format!("{HASH}.narinfo"), NARINFO);
    mem.insert(&format!("nar/{NAR_FILE}.nar.xz"), vec![0u8; 10]);
    assert_eq!(get(&st, &url).await.0, StatusCode::OK);
}

/// The upload address reads the store directly, for each kind of object: `nix copy --to`
/// probes with HEAD (404 when absent, so it uploads; the stored length when present), and
/// GET returns what is stored.
#[tokio::test]
async fn the_upload_address_reads_every_kind_of_object_from_the_store() {
    let mem = Arc::new(MemoryStore::new());
    let st = state(
        with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
        &mem,
    );
    let ask = |method: &'static str, path: String| {
        let st = st.clone();
        async move {
            let res = send(
                &st,
                authed(method, &path, "wtok").body(Body::empty()).unwrap(),
            )
            .await;
            let status = res.status();
            let len = res
                .headers()
                .get("content-length")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
            (status, len, body)
        }
    };
    let keys = [
        format!("{HASH}.narinfo"),
        format!("{HASH}.ls"),
        format!("nar/{NAR_FILE}.nar"),
        format!("log/{DRV}"),
        REALISATION.to_owned(),
        format!("build-trace/{DRV}/out"),
        format!("build-trace-v2/{DRV}/out.doi"),
    ];
    for key in &keys {
        let path = format!("/upload/{key}");
        for method in ["HEAD", "GET"] {
            assert_eq!(
                ask(method, path.clone()).await.0,
                StatusCode::NOT_FOUND,
                "{method} {path}"
            );
        }
    }
    for (i, key) in keys.iter().enumerate() {
        let path = format!("/upload/{key}");
        // A narinfo must be one (a broken one is a 502 here too).
        let body = if key.ends_with(".narinfo") {
            NARINFO.as_bytes().to_vec()
        } else {
            vec![b'x'; 10 + i]
        };
        mem.insert(key, body.clone());
        let len = Some(body.len().to_string());
        // A NAR stored as sent is probed from memory: "absent" (see
        // upload_nar_probes_ask_the_store_only_for_nars_seen_or_re_encoded).
        let head = if key.starts_with("nar/") {
            (StatusCode::NOT_FOUND, Some("10".into()), b"".to_vec())
        } else {
            (StatusCode::OK, len.clone(), Vec::new())
        };
        assert_eq!(ask("HEAD", path.clone()).await, head, "HEAD {path}");
        assert_eq!(
            ask("GET", path.clone()).await,
            (StatusCode::OK, len, body),
            "GET {path}"
        );
    }
}

/// A NAR served is a use of the paths whose narinfo names it, for `cellar gc` (a client whose
/// own cache holds the narinfo asks for the NAR alone): recorded; a NAR not found is not.
#[tokio::test]
async fn a_nar_served_is_recorded_as_a_use() {
    use crate::gc::access::{parse, Entry};
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("nar/{NAR_FILE}.nar"), vec![1u8; 100]);
    let st = state(Config::default(), &mem);
    let (status, _) = get(&st, &format!("/nar/{NAR_FILE}.nar")).await;
    assert_eq!(status, StatusCode::OK);
    let absent = format!("{}.nar", "1".repeat(52));
    let (status, _) = get(&st, &format!("/nar/{absent}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    st.access.flush().await.unwrap();
    let records: Vec<String> = mem
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("_cellar/access/"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let text = String::from_utf8(mem.bytes(&records[0]).unwrap().to_vec()).unwrap();
    assert_eq!(
        parse(&text).unwrap(),
        [Entry::Nar(format!("{NAR_FILE}.nar").into())]
    );
}

/// `nix copy --to`'s probes of the upload address are named by the record its first NAR
/// writes, so the narinfo that follows is accepted without a record of its own.
#[tokio::test]
async fn upload_probes_are_named_by_the_next_nar_record() {
    let (file, nar) = nar_of(600);
    let hash = "6bxnj2gfflqa529lddzh3zhcn45nn86r";
    let narinfo = format!(
        "StorePath: /nix/store/{hash}-probed\nURL: nar/{file}\nCompression: none\n\
         NarHash: {}\nNarSize: {}\nReferences: \n",
        Sha256::digest(&nar),
        nar.len()
    );
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let records = || -> Vec<String> {
        mem.keys()
            .into_iter()
            .filter(|k| k.starts_with("_cellar/access/"))
            .collect()
    };
    let probe = authed("HEAD", &format!("/upload/{hash}.narinfo"), "wtok")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&st, probe).await.status(), StatusCode::NOT_FOUND);
    assert!(records().is_empty(), "a probe alone writes nothing");
    let put = authed("PUT", &format!("/upload/nar/{file}"), "wtok")
        .header("content-length", nar.len())
        .body(Body::from(nar.clone()))
        .unwrap();
    assert_eq!(send(&st, put).await.status(), StatusCode::CREATED);
    let after_nar = records();
    assert_eq!(after_nar.len(), 1, "{after_nar:?}");
    let record = mem
        .get_bytes(&after_nar[0], 1 << 20)
        .await
        .unwrap()
        .unwrap();
    let record = String::from_utf8(record.to_vec()).unwrap();
    assert!(record.lines().any(|l| l == hash), "{record}");
    let put = authed("PUT", &format!("/upload/{hash}.narinfo"), "wtok")
        .body(Body::from(narinfo))
        .unwrap();
    assert_eq!(send(&st, put).await.status(), StatusCode::CREATED);
    assert_eq!(records(), after_nar, "the narinfo was covered");
}

/// A push of a closure the cache already has (the upload address finds every narinfo, and
/// nothing is uploaded) is a use of it, as a read is: the next access record names it.
#[tokio::test]
async fn pushing_what_the_cache_has_is_a_use() {
    let hash = "6bxnj2gfflqa529lddzh3zhcn45nn86r";
    let mem = Arc::new(MemoryStore::new());
    mem.insert(
        &format!("{hash}.narinfo"),
        format!(
            "StorePath: /nix/store/{hash}-present\nURL: nar/{}.nar\nCompression: none\n\
             NarHash: sha256:{}\nNarSize: 1\nReferences: \n",
            "1".repeat(52),
            "1".repeat(52)
        ),
    );
    let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let probe = authed("HEAD", &format!("/upload/{hash}.narinfo"), "wtok")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&st, probe).await.status(), StatusCode::OK);
    st.access.flush().await.unwrap();
    let records: Vec<String> = mem
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("_cellar/access/") && !k.ends_with("-upload"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = mem.bytes(&records[0]).unwrap();
    let record = String::from_utf8(record.to_vec()).unwrap();
    assert!(record.lines().any(|l| l == hash), "{record}");
}

/// A stored narinfo of `hash` naming a NAR of one byte.
fn present_narinfo(hash: &str) -> String {
    format!(
        "StorePath: /nix/store/{hash}-present\nURL: nar/{}.nar\nCompression: none\n\
         NarHash: sha256:{}\nNarSize: 1\nReferences: \n",
        "1".repeat(52),
        "1".repeat(52)
    )
}

/// A builder's probe that finds a path present is answered only once an upload record names
/// it (the builder skips the path and relies on it): a collection running meanwhile sees the
/// record and writes the path back. (Before, it was named only by the next use record,
/// minutes later, and gc deleted the closure of a `nix copy` that had just succeeded.)
#[tokio::test]
async fn a_probe_finding_a_path_present_is_recorded_as_an_uploads_before_it_is_answered() {
    let hashes = [
        "6bxnj2gfflqa529lddzh3zhcn45nn86r",
        "7bxnj2gfflqa529lddzh3zhcn45nn86r",
    ];
    let mem = Arc::new(MemoryStore::new());
    for h in hashes {
        mem.insert(&format!("{h}.narinfo"), present_narinfo(h));
    }
    let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let gate = mem.hold_writes("_cellar/access/");
    let probes = hashes.map(|h| {
        let st = st.clone();
        tokio::spawn(async move {
            let probe = authed("HEAD", &format!("/upload/{h}.narinfo"), "wtok")
                .body(Body::empty())
                .unwrap();
            send(&st, probe).await.status()
        })
    });
    gate.reached().await;
    assert!(
        probes.iter().all(|p| !p.is_finished()),
        "answered before its record was written"
    );
    gate.open();
    for p in probes {
        assert_eq!(p.await.unwrap(), StatusCode::OK);
    }
    let records: Vec<String> = mem
        .keys()
        .into_iter()
        .filter(|k| k.starts_with("_cellar/access/") && k.ends_with("-upload"))
        .collect();
    let named: String = records
        .iter()
        .map(|k| String::from_utf8(mem.bytes(k).unwrap().to_vec()).unwrap())
        .collect();
    for h in hashes {
        assert!(named.lines().any(|l| l == h), "{h} not in {named}");
    }
}

/// A path found deleted when the probe looks again after its record (a collection's batch
/// deleted it between the probe's read and the record) is absent to the builder, which
/// uploads it again.
#[tokio::test]
async fn a_path_gone_when_its_probe_looks_again_is_absent() {
    let hash = "6bxnj2gfflqa529lddzh3zhcn45nn86r";
    let mem = Arc::new(MemoryStore::new());
    mem.insert(&format!("{hash}.narinfo"), present_narinfo(hash));
    let collector = mem.clone();
    mem.after_write("_cellar/access/", move |_| {
        collector.remove(&format!("{hash}.narinfo"));
    });
    let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let probe = authed("HEAD", &format!("/upload/{hash}.narinfo"), "wtok")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&st, probe).await.status(), StatusCode::NOT_FOUND);
}

/// Small NARs live in memory and reach the disk cache only when memory lets them go for room;
/// one let go is then read back from disk, not from the store.
#[tokio::test]
async fn small_nars_reach_the_disk_only_when_memory_lets_them_go() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = disk_cached(Config::default(), &dir);
    // Room for about two of the NARs below.
    cfg.cache.nar_memory_bytes = 2500;
    cfg.cache.nar_memory_max_object = 1000;
    let st = state(cfg, &mem);
    let sized: Vec<(String, u64)> = (0..6)
        .map(|i| {
            let (file, nar) = nar_of(900 + i);
            let size = nar.len() as u64;
            mem.insert(&format!("nar/{file}"), nar);
            (file, size)
        })
        .collect();
    let names: Vec<String> = sized.iter().map(|(f, _)| f.clone()).collect();
    for (n, size) in &sized {
        // What its narinfo's FileSize says.
        st.nar_memory.hint(n, Some(*size)).await;
        let (status, _) = get(&st, &format!("/nar/{n}")).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(mem.gets_under("nar/"), 6);
    st.nar_memory.settle().await;
    let mut held = Vec::new();
    for n in &names {
        if st.nar_memory.contains(n).await {
            held.push(n.clone());
        }
    }
    assert!(held.len() < 6, "memory let some go");
    let disk = st.nars.clone().unwrap();
    disk.wait_until(|d| d.usage().0 == 6 - held.len()).await;
    // Those in memory first: a hit adds nothing, so none of them can be let go (and be on
    // its way to disk) before it is read; those let go are on disk already.
    let (on_disk, in_memory): (Vec<&String>, Vec<&String>) =
        names.iter().partition(|n| !held.contains(n));
    for n in in_memory.into_iter().chain(on_disk) {
        let (status, body) = get(&st, &format!("/nar/{n}")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.len() >= 900);
    }
    assert_eq!(mem.gets_under("nar/"), 6, "every NAR from memory or disk");
}

/// A NAR named after its store path, on disk, that a new narinfo gives another size (the
/// upstream rebuilt the path): HEAD and GET answer the new NAR, not the file on disk.
#[tokio::test]
async fn a_nar_on_disk_that_its_narinfo_now_sizes_otherwise_is_fetched_again() {
    use super::tests::head;
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let st = state(disk_cached(Config::default(), &dir), &mem);
    let file = format!("{HASH}.nar");
    let key = format!("nar/{file}");
    let old = vec![1u8; 200_000];
    mem.insert(&key, old.clone());
    st.nar_memory.hint(&file, Some(200_000)).await;
    assert_eq!(get(&st, &format!("/nar/{file}")).await.1, old);
    let disk = st.nars.clone().unwrap();
    disk.wait_until(|d| d.usage().0 == 1).await;
    mem.set_down(true);
    let held = head(&st, &format!("/nar/{file}")).await;
    assert_eq!(held, (StatusCode::OK, Some("200000".into())));
    mem.set_down(false);

    let new = vec![2u8; 150_000];
    mem.insert(&key, new.clone());
    st.nar_memory.hint(&file, Some(150_000)).await;
    let fresh = head(&st, &format!("/nar/{file}")).await;
    assert_eq!(fresh, (StatusCode::OK, Some("150000".into())));
    assert_eq!(get(&st, &format!("/nar/{file}")).await.1, new);
}

/// A NAR uploaded under a name this replica holds a copy of (from an earlier life of the NAR:
/// a bad copy, deleted from the store by a repair since) is served as uploaded, from memory
/// and from disk; before, the held copy was served for good.
#[tokio::test]
async fn an_uploaded_nar_replaces_the_copies_held_under_its_name() {
    for small in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(MemoryStore::new());
        let st = state(
            disk_cached(
                with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]),
                &dir,
            ),
            &mem,
        );
        let (file, good) = nar_of(if small { 900 } else { 300_000 });
        let key = format!("nar/{file}");
        let mut bad = good.clone();
        bad[7] ^= 1;
        mem.insert(&key, bad.clone());
        if small {
            st.nar_memory.hint(&file, Some(good.len() as u64)).await;
        }
        assert_eq!(get(&st, &format!("/{key}")).await.1, bad);
        if !small {
            let disk = st.nars.clone().unwrap();
            disk.wait_until(|d| d.usage().0 == 1).await;
        }
        mem.remove(&key);
        let put = authed("PUT", &format!("/{key}"), "wtok")
            .body(Body::from(good.clone()))
            .unwrap();
        assert_eq!(send(&st, put).await.status(), StatusCode::CREATED);
        assert_eq!(get(&st, &format!("/{key}")).await.1, good, "small: {small}");
    }
}

/// A NAR named after its store path, rebuilt at the same size (a timestamp's digits changed):
/// once a narinfo gives it another NarHash, the copies held in memory and on disk are dropped
/// and the new NAR is served. Before, the old build's bytes were served for as long as they
/// stayed in the cache, and every client failed on the hash.
#[tokio::test]
async fn a_nar_named_after_its_store_path_rebuilt_at_the_same_size_is_fetched_again() {
    for small in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(MemoryStore::new());
        let st = state(disk_cached(Config::default(), &dir), &mem);
        let file = format!("{HASH}.nar");
        let key = format!("nar/{file}");
        let size = if small { 900 } else { 200_000 };
        let (old, new) = (vec![1u8; size], vec![2u8; size]);
        let narinfo = |nar: &[u8]| {
            format!(
                "StorePath: /nix/store/{HASH}-x\nURL: {key}\nCompression: none\n\
                 FileSize: {size}\nNarHash: {}\nNarSize: {size}\nReferences: \n",
                Sha256::digest(nar)
            )
        };
        let narinfo_key = format!("{HASH}.narinfo");
        mem.insert(&key, old.clone());
        mem.insert(&narinfo_key, narinfo(&old));
        assert_eq!(get(&st, &format!("/{narinfo_key}")).await.0, StatusCode::OK);
        assert_eq!(get(&st, &format!("/{key}")).await.1, old);
        if !small {
            let disk = st.nars.clone().unwrap();
            disk.wait_until(|d| d.usage().0 == 1).await;
        }
        mem.insert(&key, new.clone());
        mem.insert(&narinfo_key, narinfo(&new));
        // Its narinfo's time in memory is up.
        st.live().narinfos.invalidate(HASH.parse().unwrap()).await;
        assert_eq!(get(&st, &format!("/{narinfo_key}")).await.0, StatusCode::OK);
        assert_eq!(get(&st, &format!("/{key}")).await.1, new, "small: {small}");
    }
}

/// A NAR named after its bytes never changes under its name: its copy on disk from before a
/// restart is served after the narinfo naming it is read again, not fetched again.
#[tokio::test]
async fn a_nar_named_after_its_bytes_stays_on_disk_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let cfg = disk_cached(Config::default(), &dir);
    let (file, nar) = nar_of(200_000);
    mem.insert(&format!("nar/{file}"), nar.clone());
    mem.insert(
        &format!("{HASH}.narinfo"),
        format!(
            "StorePath: /nix/store/{HASH}-x\nURL: nar/{file}\nCompression: none\n\
             FileSize: {n}\nNarHash: {}\nNarSize: {n}\nReferences: \n",
            Sha256::digest(&nar),
            n = nar.len()
        ),
    );
    for start in ["first", "after a restart"] {
        let st = state(cfg.clone(), &mem);
        assert_eq!(
            get(&st, &format!("/{HASH}.narinfo")).await.0,
            StatusCode::OK
        );
        assert_eq!(get(&st, &format!("/nar/{file}")).await.1, nar, "{start}");
        let disk = st.nars.clone().unwrap();
        disk.wait_until(|d| d.usage().0 == 1).await;
        // Stopped, its cache directory let go, as by a process that exits.
        let gone = Arc::downgrade(&disk);
        drop((st, disk));
        let_go(gone).await;
    }
    assert_eq!(mem.gets_under("nar/"), 1, "fetched again after the restart");
}

/// A small NAR asked for without its narinfo (a client that had the narinfo from its own
/// cache) goes to memory too, not to a file of the disk cache: served from memory next time.
#[tokio::test]
async fn a_small_nar_asked_for_without_its_narinfo_is_kept_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let st = state(disk_cached(Config::default(), &dir), &mem);
    let (file, nar) = nar_of(900);
    mem.insert(&format!("nar/{file}"), nar.clone());
    let (status, body) = get(&st, &format!("/nar/{file}")).await;
    assert_eq!((status, body.len()), (StatusCode::OK, nar.len()));
    let kept = async {
        while !st.nar_memory.contains(&file).await {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), kept)
        .await
        .expect("the NAR never reached memory");
    assert!(st.nar_memory.is_small(&file).await, "its size is known now");
    let (status, body) = get(&st, &format!("/nar/{file}")).await;
    assert_eq!((status, body.len()), (StatusCode::OK, nar.len()));
    assert_eq!(mem.gets_under("nar/"), 1, "the second GET came from memory");
    let disk = st.nars.clone().unwrap();
    assert_eq!(disk.usage(), (0, 0), "no file written");
    assert!(!dir.path().join("nars").join(&file).exists());
}

/// Waits until nothing holds the disk cache `disk` any more (its last writes done), as after
/// its process exits; fails if it stays held.
async fn let_go(disk: std::sync::Weak<crate::cache::nar::NarCache>) {
    let gone = async {
        while disk.strong_count() > 0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), gone)
        .await
        .expect("the NAR disk cache was kept alive");
}

/// The disk cache and the memory cache refer to each other (spills one way, small NARs the
/// other): a state that goes away lets its disk cache go too, with the lock on its directory.
#[tokio::test]
async fn a_dropped_state_lets_its_nar_disk_cache_go() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let cfg = disk_cached(Config::default(), &dir);
    let st = state(cfg.clone(), &mem);
    let disk = Arc::downgrade(st.nars.as_ref().unwrap());
    drop(st);
    let_go(disk).await;
    // Its directory can be opened again in this process.
    let again = state(cfg, &mem);
    assert!(again.nars.is_some());
}

/// A client resuming a NAR download that cellar served with its narinfo's size (so ranges
/// were offered) from a source that sends NARs whole and without a length (nix-serve,
/// harmonia) gets the part it asked for: curl fails a resume answered with the whole body.
#[tokio::test]
async fn a_resumed_download_from_a_source_without_lengths_gets_its_part() {
    let mem = Arc::new(MemoryStore::new());
    let file = format!("{NAR_FILE}.nar");
    let nar: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    mem.insert(&format!("nar/{file}"), nar.clone());
    mem.serve_unsized();
    let st = state(Config::default(), &mem);
    st.nar_memory.hint(&file, Some(200_000)).await;
    let req = Request::get(format!("/nar/{file}"))
        .header("range", "bytes=150000-")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = get_with(&st, req).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(headers["content-range"], "bytes 150000-199999/200000");
    assert_eq!(headers["content-length"], "50000");
    assert_eq!(body, nar[150_000..]);
    // Past the end the narinfo gives: 416 with the size, as from any other source.
    let req = Request::get(format!("/nar/{file}"))
        .header("range", "bytes=200000-")
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = get_with(&st, req).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(headers["content-range"], "bytes */200000");
    // A body that goes on past the narinfo's size is not that NAR: the transfer fails.
    st.nar_memory.set_hint(&file, 199_000).await;
    let req = Request::get(format!("/nar/{file}"))
        .header("range", "bytes=150000-")
        .body(Body::empty())
        .unwrap();
    let res = send(&st, req).await;
    assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT);
    assert!(res.into_body().collect().await.is_err());
}

/// A whole NAR from a source that sends it without a length (nix-serve, harmonia) and not
/// through a fill (no disk cache) goes out with its narinfo's size as its length: a body that
/// ends early (the upstream's `nix-store --dump` died, and it ended its chunked answer
/// cleanly) or goes on past it fails the transfer, which Nix retries, instead of handing it a
/// NAR cut short as if whole.
#[tokio::test]
async fn a_whole_nar_without_a_length_is_held_to_its_narinfo_size() {
    let mem = Arc::new(MemoryStore::new());
    let file = format!("{NAR_FILE}.nar");
    let nar: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    mem.insert(&format!("nar/{file}"), nar.clone());
    mem.serve_unsized();
    let st = state(Config::default(), &mem);
    assert!(
        st.nars.is_none(),
        "no fill: the store's body goes out as it comes"
    );
    let whole = || {
        Request::get(format!("/nar/{file}"))
            .body(Body::empty())
            .unwrap()
    };
    // Without a narinfo's size: as the source sends it.
    let res = send(&st, whole()).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(!res.headers().contains_key("content-length"));
    st.nar_memory.hint(&file, Some(200_000)).await;
    let (status, headers, body) = get_with(&st, whole()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], "200000");
    assert_eq!(headers["accept-ranges"], "bytes");
    assert_eq!(body, nar);
    for announced in [200_001, 199_999] {
        st.nar_memory.set_hint(&file, announced).await;
        let res = send(&st, whole()).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-length"], announced.to_string());
        assert!(
            res.into_body().collect().await.is_err(),
            "a body of 200000 bytes sent as {announced}"
        );
    }
}

/// The same with a disk cache that does not keep the NAR (too large for its budget): the
/// object the cache opened is handed on as it is, and held to the narinfo's size all the
/// same. And a NAR named after its bytes that the store holds with another length than its
/// narinfo's is broken (truncated, foreign): a 502, with or without a disk cache, not a 200
/// that proxies keep for a year.
#[tokio::test]
async fn a_nar_the_disk_cache_does_not_keep_is_held_to_its_narinfo_size() {
    let dir = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let file = format!("{NAR_FILE}.nar");
    let len = 3 << 19; // 1.5 MiB: not small, and over half the budget below
    let nar: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    mem.insert(&format!("nar/{file}"), nar.clone());
    let mut cfg = disk_cached(Config::default(), &dir);
    cfg.cache.nar_max_bytes = 2 << 20;
    let st = state(cfg, &mem);
    assert!(st.nars.is_some());
    let whole = || {
        Request::get(format!("/nar/{file}"))
            .body(Body::empty())
            .unwrap()
    };
    mem.serve_unsized();
    st.nar_memory.hint(&file, Some(len as u64)).await;
    let (status, headers, body) = get_with(&st, whole()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], len.to_string());
    assert_eq!(body, nar);
    st.nar_memory.set_hint(&file, len as u64 + 1).await;
    let res = send(&st, whole()).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.into_body().collect().await.is_err(),
        "ended early, as if whole"
    );

    // Sent with its length, which is not the narinfo's.
    for st in [st, state(Config::default(), &mem)] {
        mem.serve_sized();
        for wrong in [len as u64 - 1, len as u64 + 1] {
            st.nar_memory.set_hint(&file, wrong).await;
            let res = send(&st, whole()).await;
            assert_eq!(res.status(), StatusCode::BAD_GATEWAY, "{wrong}");
        }
    }
}

/// A NAR named after its store path hash (32 characters, as attic and old nix-serve name
/// them) changes when the path is rebuilt: it lives in caches as long as a narinfo does.
#[tokio::test]
async fn a_nar_named_after_its_store_path_is_not_immutable() {
    let mem = Arc::new(MemoryStore::new());
    let file = format!("{HASH}.nar");
    mem.insert(&format!("nar/{file}"), vec![1u8; 100]);
    let cfg = Config {
        narinfo_max_age: std::time::Duration::from_secs(1234),
        ..Config::default()
    };
    let st = state(cfg, &mem);
    let req = Request::get(format!("/nar/{file}"))
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = get_with(&st, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["cache-control"], "public, max-age=1234");
    let req = Request::head(format!("/nar/{file}"))
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = get_with(&st, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["cache-control"], "public, max-age=1234");
    // nix-serve's and harmonia's names hold the NAR's hash: immutable.
    for file in [
        format!("{HASH}-{NAR_FILE}.nar"),
        format!("{NAR_FILE}.nar?hash={HASH}"),
    ] {
        mem.insert(&format!("nar/{file}"), vec![1u8; 100]);
        let req = Request::get(format!("/nar/{file}"))
            .body(Body::empty())
            .unwrap();
        let (status, headers, _) = get_with(&st, req).await;
        assert_eq!(status, StatusCode::OK, "{file}");
        assert_eq!(
            headers["cache-control"], "public, max-age=31536000, immutable",
            "{file}"
        );
    }
}

/// Every PUT whose `Content-Length` is over its limit is refused with 413 before its body is
/// read: no `100 Continue` is sent, so the client never sends it (a 2 GiB "log" would
/// otherwise stream 1 GiB into the store holding an upload slot), and nothing is written.
#[tokio::test]
async fn puts_declared_over_their_limit_are_refused_before_the_body() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    // Without the check, the body that never comes is given up soon.
    cfg.upload.body_idle_timeout = std::time::Duration::from_secs(1);
    let st = state(cfg, &mem);
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(super::server::serve(listener, st, async {
        let _ = stopped.await;
    }));
    for path in [
        format!("/upload/log/{DRV}"),
        format!("/upload/{HASH}.ls"),
        format!("/upload/{HASH}.narinfo"),
        format!("/upload/{REALISATION}"),
        format!("/upload/build-trace/{DRV}/out"),
        format!("/upload/build-trace-v2/{DRV}/out.doi"),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer wtok\r\n\
             Content-Length: 2147483648\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
    }
    assert!(mem.keys().is_empty(), "{:?}", mem.keys());
}

/// A burst of readiness probes (`/readyz` needs no token) asks the store once, not once per
/// probe; a probe after the burst asks again, so a store gone down is seen at once.
#[tokio::test(start_paused = true)]
async fn readiness_probes_arriving_together_ask_the_store_once() {
    let mem = Arc::new(MemoryStore::new());
    mem.set_latency(std::time::Duration::from_millis(50));
    let st = state(Config::default(), &mem);
    let probes = (0..20).map(|_| get(&st, "/readyz"));
    for (status, body) in futures::future::join_all(probes).await {
        assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"ready\n"[..]));
    }
    assert_eq!(mem.pings(), 1);
    mem.set_down(true);
    assert_eq!(get(&st, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(mem.pings(), 2);
}

/// `/readyz` answers within `store.ready_timeout_secs` of the probe's arrival, even when it
/// waited for another probe's request to the store; a probe arriving shortly after another
/// (load balancers probing a moment apart) takes its answer; and 503 once the server drains.
#[tokio::test(start_paused = true)]
async fn a_readiness_probe_answers_within_its_timeout_and_not_while_draining() {
    let mem = Arc::new(MemoryStore::new());
    let mut cfg = Config::default();
    cfg.store.ready_timeout = std::time::Duration::from_secs(2);
    let st = state(cfg, &mem);
    // A store answering in 1.6 s, slow but within the timeout.
    mem.set_latency(std::time::Duration::from_millis(1600));
    let probe_after = |delay: std::time::Duration| {
        let (st, mem) = (st.clone(), mem.clone());
        async move {
            let first = tokio::spawn({
                let st = st.clone();
                async move { get(&st, "/readyz").await }
            });
            // Once the first probe is asking the store, the clock moves on.
            let pings = mem.pings();
            while mem.pings() == pings {
                tokio::task::yield_now().await;
            }
            tokio::time::advance(delay).await;
            let started = tokio::time::Instant::now();
            let answer = get(&st, "/readyz").await;
            assert_eq!(first.await.unwrap().0, StatusCode::OK);
            (answer, started.elapsed())
        }
    };
    // Arriving 1 s into the other's request: its answer, 0.6 s later.
    let ((status, body), took) = probe_after(super::health::SHARED).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"ready\n"[..]));
    assert_eq!(took, std::time::Duration::from_millis(600));
    // Arriving 1.1 s into it: too old an answer; it waits 0.5 s, then 1.6 s for its own,
    // past its 2 s.
    let ((status, body), took) = probe_after(std::time::Duration::from_millis(1100)).await;
    assert_eq!(took, std::time::Duration::from_secs(2));
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::SERVICE_UNAVAILABLE, &b"store timed out\n"[..])
    );

    st.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    let pings = mem.pings();
    let (status, body) = get(&st, "/readyz").await;
    assert_eq!(
        (status, body.as_slice()),
        (StatusCode::SERVICE_UNAVAILABLE, &b"shutting down\n"[..])
    );
    assert_eq!(mem.pings(), pings, "the store is not asked");
}

/// A request whose client goes away before the answer (a lookup held up by a slow store) is
/// counted, as `aborted`, with its latency, not left out of the metrics.
#[tokio::test]
async fn a_request_its_client_gave_up_on_is_counted_as_aborted() {
    use crate::metrics::HttpLabels;
    use tokio::io::AsyncWriteExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mem = Arc::new(MemoryStore::new());
    let gate = mem.hold_reads("");
    let st = state(Config::default(), &mem);
    let server = tokio::spawn(super::server::serve(listener, st, std::future::pending()));
    let m = crate::metrics::get();
    let aborted = || {
        m.http_requests
            .get_or_create(&HttpLabels {
                route: "narinfo",
                method: "GET",
                status: "aborted",
            })
            .get()
    };
    let before = aborted();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let path = format!("/{}.narinfo", "a".repeat(32));
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    gate.reached().await;
    drop(tcp);
    let counted = async {
        while aborted() == before {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), counted)
        .await
        .expect("the request given up on was not counted");
    server.abort();
}

/// A NAR whose bytes in the store are not what its narinfo's `FileHash` says (rotted in the
/// bucket at the same size) is not served whole nor kept, from memory (a small one: a 502)
/// or through the disk cache (a large one: its body fails before its last bytes, its
/// headers being sent), nor streamed whole by a server without a disk cache, nor when it is
/// too large for it; the next request reads the store again, and the object, fixed, is
/// served and kept.
#[tokio::test]
async fn a_nar_whose_bytes_are_not_its_narinfos_is_refused_and_not_kept() {
    for (len, disk, budget) in [
        (500usize, true, None),
        (3_000_000, true, None),
        (3_000_000, false, None),
        (3_000_000, true, Some(4_000_000)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(MemoryStore::new());
        let mut cfg = Config::default();
        if disk {
            cfg = disk_cached(cfg, &dir);
        }
        if let Some(b) = budget {
            cfg.cache.nar_max_bytes = b;
        }
        let st = state(cfg, &mem);
        let good: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8).collect();
        let sha = Sha256::digest(&good);
        let file = format!("{}.nar", sha.to_nix32());
        mem.insert(
            &format!("{HASH}.narinfo"),
            format!(
                "StorePath: /nix/store/{HASH}-x\nURL: nar/{file}\nCompression: none\n\
                 FileHash: {sha}\nFileSize: {len}\nNarHash: {sha}\nNarSize: {len}\nReferences: \n"
            ),
        );
        let mut rotted = good.clone();
        rotted[len / 2] ^= 0x55;
        mem.insert(&format!("nar/{file}"), rotted);
        assert_eq!(
            get(&st, &format!("/{HASH}.narinfo")).await.0,
            StatusCode::OK
        );
        let req = Request::get(format!("/nar/{file}"))
            .body(Body::empty())
            .unwrap();
        let res = send(&st, req).await;
        let status = res.status();
        let whole = res.into_body().collect().await.is_ok();
        assert!(
            status == StatusCode::BAD_GATEWAY || (status == StatusCode::OK && !whole),
            "{len} (disk {disk}, {budget:?}): {status}, whole: {whole}"
        );
        mem.insert(&format!("nar/{file}"), good.clone());
        let (status, body) = get(&st, &format!("/nar/{file}")).await;
        assert_eq!((status, body == good), (StatusCode::OK, true), "{len}");
    }
}

/// A realisation is served signed by the server's keys, as a narinfo is (Nix 2.8's
/// `nix copy --from` refuses one without a signature it trusts, and clients trust the
/// server's key alone): the builder's signature it was uploaded with stays beside. HEAD says
/// the length of that GET. One in the store that is no realisation is a 502, not passed on.
#[tokio::test]
async fn realisations_are_served_signed_by_the_server() {
    use crate::nix::realisation::tests::{NIX_KEY, SIGNED_BY_NIX};
    use crate::nix::{PublicKey, Realisation};
    let mem = Arc::new(MemoryStore::new());
    let doc: serde_json::Value = serde_json::from_str(SIGNED_BY_NIX).unwrap();
    let id = doc["id"].as_str().unwrap().to_owned();
    let key = format!("realisations/{id}.doi");
    mem.insert(&key, SIGNED_BY_NIX);
    let st = state(Config::default(), &mem);
    let server = st.live().signing_keys[0].public();
    let (status, body) = get(&st, &format!("/{key}")).await;
    assert_eq!(status, StatusCode::OK);
    let served = Realisation::parse(&body).unwrap();
    assert!(served.is_signed_by_any(std::slice::from_ref(&server)));
    let builder: PublicKey = NIX_KEY.parse().unwrap();
    assert!(served.is_signed_by_any(&[builder]));
    let req = Request::head(format!("/{key}"))
        .body(Body::empty())
        .unwrap();
    let (status, headers, empty) = get_with(&st, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], body.len().to_string());
    assert!(empty.is_empty());

    // Under a build trace's name (the layouts of later Nix), served as stored, unsigned by
    // the server: what is signed is bound to the output its name says, and a build trace's
    // name does not say the id.
    let trace = format!("build-trace/{DRV}/out");
    mem.insert(&trace, SIGNED_BY_NIX);
    let (status, body) = get(&st, &format!("/{trace}")).await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::OK, SIGNED_BY_NIX.as_bytes())
    );
    // Whatever it holds: cellar reads none of it.
    mem.insert(&trace, "{}");
    assert_eq!(
        get(&st, &format!("/{trace}")).await,
        (StatusCode::OK, b"{}".to_vec())
    );

    // Another output's (`nix copy --to s3://` wrote it, or the bucket was tampered with):
    // Nix does not compare ids, so it is not signed and passed on.
    let dev = id.replace("!out", "!dev");
    mem.insert(&format!("realisations/{dev}.doi"), SIGNED_BY_NIX);
    assert_eq!(
        get(&st, &format!("/realisations/{dev}.doi")).await.0,
        StatusCode::BAD_GATEWAY
    );
    mem.insert(&key, "{}");
    assert_eq!(
        get(&st, &format!("/{key}")).await.0,
        StatusCode::BAD_GATEWAY
    );
}

/// A `PUT` refused on its headers while its body is on its way anyway (no
/// `Expect: 100-continue`: how nginx passes uploads on) is answered once the body is read:
/// closed with the body unread, the connection was reset under the writer, and nginx, still
/// writing, answered its own 502 instead of the refusal. The same connection serves on.
#[tokio::test]
async fn a_refused_body_sent_anyway_is_read_before_the_answer() {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    cfg.upload.max_nar_bytes = 1 << 20;
    let st = state(cfg, &Arc::new(MemoryStore::new()));
    tokio::spawn(super::server::serve(listener, st, std::future::pending()));
    // More than the socket buffers of both ends hold: written whole only if it is read.
    let body = vec![7u8; 16 << 20];
    let nar = format!("/upload/nar/{NAR_FILE}.nar");
    for (path, auth, expected) in [
        (nar.as_str(), "", "HTTP/1.1 401"),
        (
            nar.as_str(),
            "Authorization: Bearer nope\r\n",
            "HTTP/1.1 403",
        ),
        (
            "/upload/nar/not-a-nar-name",
            "Authorization: Bearer wtok\r\n",
            "HTTP/1.1 400",
        ),
        (
            nar.as_str(),
            "Authorization: Bearer wtok\r\n",
            "HTTP/1.1 413",
        ),
    ] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (read, mut write) = tcp.into_split();
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {}\r\n\r\n",
            body.len()
        );
        write.write_all(head.as_bytes()).await.unwrap();
        write
            .write_all(&body)
            .await
            .unwrap_or_else(|e| panic!("{path} {auth}: the body was not read: {e}"));
        let mut read = tokio::io::BufReader::new(read);
        let mut status = String::new();
        read.read_line(&mut status).await.unwrap();
        assert!(status.starts_with(expected), "{path} {auth}: {status}");
        // The rest of that answer, then another request on the same connection.
        let mut line = String::new();
        let mut length = 0usize;
        loop {
            line.clear();
            read.read_line(&mut line).await.unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut rest = vec![0u8; length];
        read.read_exact(&mut rest).await.unwrap();
        write
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        read.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{path} {auth}: {answer}"
        );
    }
}

/// A NAR's error answers offer ranges too: Nix resumes a download cut off midway with a range
/// only while the last answer it got offered them, so a 503 to its first resumption without
/// the offer failed the copy at the second ("Requested range was not delivered").
#[tokio::test]
async fn a_nars_error_answers_keep_offering_ranges() {
    let mem = Arc::new(MemoryStore::new());
    let st = state(Config::default(), &mem);
    mem.set_down(true);
    let req = Request::get(format!("/nar/{NAR_FILE}.nar"))
        .header("range", "bytes=100-")
        .body(Body::empty())
        .unwrap();
    let (status, headers, _) = get_with(&st, req).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["accept-ranges"], "bytes");
}

/// The bounds of reading an unread body before the answer: not with more than 64 MiB left
/// (as `Content-Length` says: the connection is closed instead), nor for longer than 5 s (a
/// body trickling in is answered then); and a client waiting for `100 Continue` is not made
/// to send its body unless the handler asked for it first (then it is sending, and its rest
/// is read: a NAR with `Expect` refused midway).
#[tokio::test(start_paused = true)]
async fn an_unread_body_is_read_within_bounds() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mem = Arc::new(MemoryStore::new());
    let cfg = with_tokens(Config::default(), &[("w", "wtok", Scope::Write)]);
    let st = state(cfg, &mem);
    let counted = |chunks: usize, first: &'static [u8]| {
        let read = Arc::new(AtomicUsize::new(0));
        let r = read.clone();
        let body = futures::StreamExt::map(futures::stream::iter(0..chunks), move |i: usize| {
            r.fetch_add(1, Ordering::SeqCst);
            let mut chunk = vec![7u8; 64 << 10];
            if i == 0 {
                chunk[..first.len()].copy_from_slice(first);
            }
            Ok::<_, std::io::Error>(bytes::Bytes::from(chunk))
        });
        (read, Body::from_stream(body))
    };
    let nar = format!("/upload/nar/{NAR_FILE}.nar");
    // 80 MiB declared, refused on its headers (no token): not read.
    let (read, body) = counted(1280, b"");
    let req = Request::put(&nar)
        .header("content-length", (80u64 << 20).to_string())
        .body(body)
        .unwrap();
    assert_eq!(send(&st, req).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        read.load(Ordering::SeqCst),
        0,
        "more than 64 MiB was to be read"
    );
    // 2 MiB declared: read to its end.
    let (read, body) = counted(32, b"");
    let req = Request::put(&nar)
        .header("content-length", (2u64 << 20).to_string())
        .body(body)
        .unwrap();
    assert_eq!(send(&st, req).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(read.load(Ordering::SeqCst), 32);
    // Trickling in: answered after 5 s.
    let trickle = futures::StreamExt::chain(
        futures::stream::once(async { Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")) }),
        futures::stream::pending(),
    );
    let req = Request::put(&nar)
        .header("content-length", "1000")
        .body(Body::from_stream(trickle))
        .unwrap();
    let asked = tokio::time::Instant::now();
    assert_eq!(send(&st, req).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(asked.elapsed(), super::drain::DRAIN_TIME);
    // Waiting for `100 Continue`, refused before the body was asked for: not read.
    let (read, body) = counted(32, b"");
    let req = Request::put(&nar)
        .header("content-length", (2u64 << 20).to_string())
        .header("expect", "100-continue")
        .body(body)
        .unwrap();
    assert_eq!(send(&st, req).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(read.load(Ordering::SeqCst), 0);
    // Waiting for `100 Continue`, refused after the upload asked for the body (no NAR): the
    // rest is read.
    let (read, body) = counted(32, b"\x1f\x00\x08");
    let req = authed("PUT", &nar, "wtok")
        .header("content-length", (2u64 << 20).to_string())
        .header("expect", "100-continue")
        .body(body)
        .unwrap();
    assert_eq!(send(&st, req).await.status(), StatusCode::BAD_REQUEST);
    assert_eq!(read.load(Ordering::SeqCst), 32);
}
