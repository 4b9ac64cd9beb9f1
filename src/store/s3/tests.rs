use super::*;

#[test]
fn content_range_header() {
    assert_eq!(
        ContentRange::parse_header("bytes 0-99/1234"),
        Some(ContentRange {
            start: 0,
            end: 99,
            total: 1234
        })
    );
    assert_eq!(ContentRange::parse_header("bytes */1234"), None);
    // Spans a part cannot have: a length computed from them would be wrong or overflow.
    for bad in [
        "bytes 0-99/*",
        "bytes 5-2/10",
        "bytes 0-99/50",
        "bytes 0-18446744073709551615/18446744073709551615",
    ] {
        assert_eq!(ContentRange::parse_header(bad), None, "{bad}");
    }
    assert_eq!(
        ContentRange::parse_header("bytes 9-9/10").map(|r| (r.start, r.end)),
        Some((9, 9))
    );
}

/// /readyz asks once: a store refusing connections is reported after one attempt, not
/// after the SDK's retries.
#[tokio::test]
async fn ping_makes_one_attempt() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    // A "store" that accepts connections and closes them at once.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let store = store_at(format!("http://{addr}"), 4).await;
    assert!(store.ping().await.is_err());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Requests other than the probe keep the SDK's retries.
    let _ = store.head("x").await;
    assert!(accepted.load(Ordering::SeqCst) > 2);
}

/// A store nobody listens for: the direct path's error says why (the connection refused), as
/// the SDK's does, not only reqwest's "error sending request".
#[tokio::test]
async fn an_unreachable_store_says_why_on_both_paths() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    for direct in [true, false] {
        let store = store_with(format!("http://{addr}"), 4, direct).await;
        let e = store.get_bytes("x.narinfo", 1 << 20).await.unwrap_err();
        assert!(
            matches!(&e, StoreError::Unavailable(m) if m.to_lowercase().contains("connection refused")),
            "direct {direct}: {e}"
        );
        let e = futures::StreamExt::next(&mut store.list(""))
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            e.to_string().to_lowercase().contains("connection refused"),
            "direct {direct}: {e}"
        );
    }
}

/// A store that keeps answering 429 (too many requests) is unavailable (503 to clients, a
/// pause for the caller), on the SDK's path as on the direct one, not a client error.
#[tokio::test]
async fn a_store_asking_to_slow_down_is_unavailable() {
    let app = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "<Error><Code>SlowDown</Code></Error>",
        )
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    for direct in [false, true] {
        let store = store_with(endpoint.clone(), 4, direct).await;
        let got = store.head("x").await;
        assert!(
            matches!(got, Err(StoreError::Unavailable(_))),
            "direct {direct}: {got:?}"
        );
    }
}

/// The SDK's retries are not rationed by its shared budget (500 tokens, 5 a retry after a
/// 5xx and 10 after a connection error, regained one per request that succeeds at once): 120
/// requests failing together are each tried three times, as they would be one by one. With the budget, a store restarting under load
/// left every later request without its retries.
#[tokio::test(flavor = "multi_thread")]
async fn sdk_retries_are_not_rationed_by_a_shared_budget() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async { axum::http::StatusCode::INTERNAL_SERVER_ERROR }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    let store = store_with(endpoint, 4, false).await;
    let answers = futures::future::join_all((0..120).map(|i| {
        let store = &store;
        async move { store.head(&format!("k{i}")).await }
    }))
    .await;
    assert!(answers.iter().all(Result::is_err));
    assert_eq!(hits.load(Ordering::SeqCst), 360);
}

/// A store's error codes count whatever their status: a 400 `RequestTimeout` (a body that
/// arrived too slowly) is the store failing, a 503 to clients; a bucket in another region
/// (301 `PermanentRedirect`, 400 `AuthorizationHeaderMalformed`) is a misconfiguration naming
/// the keys to fix; another 400 is a broken answer. On the SDK's path and the direct one.
#[tokio::test]
async fn error_codes_say_what_failed_whatever_their_status() {
    for (status, code, want) in [
        (400, "RequestTimeout", "unavailable"),
        (400, "OperationAborted", "unavailable"),
        (301, "PermanentRedirect", "misconfigured"),
        (400, "AuthorizationHeaderMalformed", "misconfigured"),
        (400, "InvalidArgument", "other"),
    ] {
        let app = axum::Router::new().fallback(move || async move {
            (
                axum::http::StatusCode::from_u16(status).unwrap(),
                format!("<Error><Code>{code}</Code></Error>"),
            )
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        for direct in [false, true] {
            let store = store_with(endpoint.clone(), 4, direct).await;
            // The readiness probe (a listing) says the same.
            let probed = store.ping().await.map(|()| true);
            let got = store.get("x", None).await.map(|o| o.is_some());
            let kind = |r: &Result<bool, StoreError>| {
                format!("{r:?}").split('(').nth(1).map(str::to_owned)
            };
            assert_eq!(
                kind(&probed),
                kind(&got),
                "{status} {code}: ping {probed:?}, get {got:?}"
            );
            let ok = match (want, &got) {
                ("unavailable", Err(StoreError::Unavailable(m))) => m.contains(code),
                ("misconfigured", Err(StoreError::Misconfigured(m))) => {
                    m.contains(code) && m.contains("store.region")
                }
                ("other", Err(StoreError::Other(m))) => m.contains(code),
                _ => false,
            };
            assert!(ok, "{status} {code}, direct {direct}: {got:?}");
        }
    }
}

/// A 400 to a HEAD has no body to say why: taken for what it most often is, a request signed
/// for another region than the store's (S3, MinIO and Garage answer so), and said with the key
/// to check. The readiness probe (a listing, a GET) is told by the code in the body, as a
/// GET is (`error_codes_say_what_failed_whatever_their_status`): one without a code is a
/// broken answer.
#[tokio::test]
async fn a_head_refused_without_a_reason_points_at_the_region() {
    use axum::response::IntoResponse as _;
    let app = axum::Router::new()
        .fallback(|| async { axum::http::StatusCode::BAD_REQUEST.into_response() });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    let region = |got: Result<(), StoreError>| match got {
        Err(StoreError::Misconfigured(m)) => m.contains("check store.region"),
        _ => false,
    };
    for direct in [false, true] {
        let store = store_with(endpoint.clone(), 4, direct).await;
        let got = store.head("x").await.map(|_| ());
        assert!(region(got.clone()), "HEAD, direct {direct}: {got:?}");
        let got = store.ping().await;
        assert!(
            matches!(&got, Err(StoreError::Other(m)) if m.contains("400")),
            "ping, direct {direct}: {got:?}"
        );
        // A GET's 400 without a code (a proxy's page, say) is a broken answer, not a region.
        let got = store.get("x", None).await.map(|_| ());
        assert!(
            matches!(&got, Err(StoreError::Other(m)) if !m.contains("store.region")),
            "GET, direct {direct}: {got:?}"
        );
    }
}

/// What a fake S3 saw of one multipart upload.
#[derive(Default)]
struct Seen {
    /// Part bodies by number.
    parts: std::collections::BTreeMap<u32, bytes::Bytes>,
    /// The most parts in flight at once.
    most_at_once: usize,
    /// The body of CompleteMultipartUpload.
    completed: Option<String>,
    aborted: bool,
}

/// A fake S3 endpoint for multipart uploads that answers no part before `gate` parts have
/// arrived (so a writer sending one part at a time never gets an answer), and refuses part
/// `refuse` (403).
async fn multipart_s3(
    gate: usize,
    refuse: Option<u32>,
) -> (
    String,
    Arc<std::sync::Mutex<Seen>>,
    Arc<tokio::sync::Notify>,
) {
    multipart_s3_after_a_lost_answer(gate, refuse, None).await
}

/// [`multipart_s3`], where with `lost` the completion of the upload is answered as a retry
/// after a lost answer is (404 NoSuchUpload), and a HEAD of the object with `lost`: its
/// length, ETag and age if the first try completed it, `None` if it did not.
async fn multipart_s3_after_a_lost_answer(
    gate: usize,
    refuse: Option<u32>,
    lost: Option<Option<(usize, &'static str, Duration)>>,
) -> (
    String,
    Arc<std::sync::Mutex<Seen>>,
    Arc<tokio::sync::Notify>,
) {
    use axum::extract::{Query, State};
    use axum::http::{Method, StatusCode};
    use axum::response::{IntoResponse as _, Response};
    use std::collections::HashMap;

    #[derive(Clone)]
    struct Fake {
        seen: Arc<std::sync::Mutex<Seen>>,
        arrived: Arc<tokio::sync::watch::Sender<usize>>,
        in_flight: Arc<std::sync::atomic::AtomicUsize>,
        gate: usize,
        refuse: Option<u32>,
        deleted: Arc<tokio::sync::Notify>,
        lost: Option<Option<(usize, &'static str, Duration)>>,
    }
    async fn handle(
        State(f): State<Fake>,
        method: Method,
        Query(q): Query<HashMap<String, String>>,
        body: bytes::Bytes,
    ) -> Response {
        answer(f, method, q, body).await.into_response()
    }
    async fn answer(
        f: Fake,
        method: Method,
        q: HashMap<String, String>,
        body: bytes::Bytes,
    ) -> Response {
        use std::sync::atomic::Ordering;
        if method == Method::HEAD {
            return match f.lost.flatten() {
                Some((len, etag, age)) => {
                    let modified = std::time::SystemTime::now() - age;
                    let modified = aws_smithy_types::DateTime::from(modified)
                        .fmt(aws_smithy_types::date_time::Format::HttpDate)
                        .unwrap();
                    (
                        StatusCode::OK,
                        [
                            ("etag", etag.to_owned()),
                            ("content-length", len.to_string()),
                            ("last-modified", modified),
                        ],
                    )
                        .into_response()
                }
                None => StatusCode::NOT_FOUND.into_response(),
            };
        }
        let etag = |s: String| (StatusCode::OK, [("etag", "\"e\"".to_owned())], s);
        if q.contains_key("uploads") {
            let xml = "<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>\
                       <UploadId>u1</UploadId></InitiateMultipartUploadResult>";
            return etag(xml.into()).into_response();
        }
        if let Some(n) = q.get("partNumber") {
            let n: u32 = n.parse().unwrap();
            let now = f.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            {
                let mut s = f.seen.lock().unwrap();
                s.most_at_once = s.most_at_once.max(now);
            }
            f.arrived.send_modify(|a| *a += 1);
            let mut arrived = f.arrived.subscribe();
            let _ = arrived.wait_for(|a| *a >= f.gate).await;
            f.in_flight.fetch_sub(1, Ordering::SeqCst);
            if f.refuse == Some(n) {
                let xml = "<Error><Code>AccessDenied</Code><Message>no</Message></Error>";
                return (StatusCode::FORBIDDEN, [("etag", String::new())], xml).into_response();
            }
            f.seen.lock().unwrap().parts.insert(n, body);
            return (StatusCode::OK, [("etag", format!("\"p{n}\""))]).into_response();
        }
        if method == Method::DELETE {
            f.seen.lock().unwrap().aborted = true;
            f.deleted.notify_one();
            return StatusCode::NO_CONTENT.into_response();
        }
        if f.lost.is_some() {
            let xml = "<Error><Code>NoSuchUpload</Code><Message>no</Message></Error>";
            return (StatusCode::NOT_FOUND, xml).into_response();
        }
        f.seen.lock().unwrap().completed = Some(String::from_utf8_lossy(&body).into_owned());
        etag(
            "<CompleteMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>\
              <ETag>\"all\"</ETag></CompleteMultipartUploadResult>"
                .into(),
        )
        .into_response()
    }
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let deleted = Arc::new(tokio::sync::Notify::new());
    let fake = Fake {
        deleted: deleted.clone(),
        seen: seen.clone(),
        arrived: Arc::new(tokio::sync::watch::channel(0).0),
        in_flight: Arc::default(),
        gate,
        refuse,
        lost,
    };
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(fake)
        .layer(axum::extract::DefaultBodyLimit::disable());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    (format!("http://{addr}"), seen, deleted)
}

async fn store_at(endpoint: String, upload_part_concurrency: usize) -> S3Store {
    store_with(endpoint, upload_part_concurrency, true).await
}

/// [`store_at`], with the SDK for every request unless `direct_requests`.
async fn store_with(
    endpoint: String,
    upload_part_concurrency: usize,
    direct_requests: bool,
) -> S3Store {
    store_timed(
        endpoint,
        upload_part_concurrency,
        direct_requests,
        Duration::from_secs(5),
    )
    .await
}

/// [`store_with`], with `timeout` as `store.timeout_secs`.
async fn store_timed(
    endpoint: String,
    upload_part_concurrency: usize,
    direct_requests: bool,
    timeout: Duration,
) -> S3Store {
    let cfg = config_for(endpoint, upload_part_concurrency, direct_requests);
    S3Store::new(&cfg, timeout).await
}

/// The configuration of a store at `endpoint`, bucket `b`, no prefix.
fn config_for(
    endpoint: String,
    upload_part_concurrency: usize,
    direct_requests: bool,
) -> S3StoreConfig {
    use crate::config::{S3Credentials, Secret};
    S3StoreConfig {
        bucket: "b".into(),
        endpoint: Some(endpoint),
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
        upload_part_concurrency,
    }
}

/// Writes `body` through a writer in chunks that straddle the parts' boundaries, then
/// commits (or aborts on a failure).
async fn write_all(store: &S3Store, body: &[u8]) -> Result<(), StoreError> {
    let mut w = store.writer("nar/x.nar").await?;
    for chunk in body.chunks((3 << 20) + 7) {
        if let Err(e) = w.write(bytes::Bytes::copy_from_slice(chunk)).await {
            w.abort().await;
            return Err(e);
        }
    }
    w.commit().await
}

fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// The parts of a multipart upload travel together (here three at once: the fake S3 answers
/// none before three have arrived), and are completed in order, whole.
#[tokio::test(flavor = "multi_thread")]
async fn multipart_parts_are_sent_concurrently_and_completed_in_order() {
    let (endpoint, seen, _) = multipart_s3(3, None).await;
    let store = store_at(endpoint, 3).await;
    let data = body(3 * PART_SIZE + 12345);
    tokio::time::timeout(Duration::from_secs(20), write_all(&store, &data))
        .await
        .expect("the parts were sent one at a time: the fake S3 answers none before three")
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.most_at_once, 3,
        "at most store.upload_part_concurrency at once"
    );
    assert_eq!(seen.parts.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
    let joined: Vec<u8> = seen
        .parts
        .values()
        .flat_map(|b| b.iter().copied())
        .collect();
    assert!(joined == data, "the parts do not add up to the body");
    let completed = seen.completed.as_deref().expect("completed");
    let numbers: Vec<usize> = (1..=4)
        .map(|n| {
            completed
                .find(&format!("<PartNumber>{n}</PartNumber>"))
                .unwrap_or_else(|| panic!("part {n} missing from {completed}"))
        })
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "parts out of order: {completed}"
    );
    assert!(
        completed.contains("&quot;p4&quot;"),
        "the parts' ETags: {completed}"
    );
    assert!(!seen.aborted);
}

/// With `store.upload_part_concurrency = 1`, one part at a time.
#[tokio::test(flavor = "multi_thread")]
async fn multipart_parts_one_at_a_time_when_so_configured() {
    let (endpoint, seen, _) = multipart_s3(1, None).await;
    let store = store_at(endpoint, 1).await;
    write_all(&store, &body(2 * PART_SIZE + 1)).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.most_at_once, 1);
    assert_eq!(seen.parts.len(), 3);
}

/// A part refused while others are in flight fails the upload, which is aborted, before the
/// error is returned, and never completed. (One thread: an abort left to the writer's drop,
/// which runs in the background, would not have happened yet when the test looks.)
#[tokio::test]
async fn a_refused_part_fails_the_upload_and_it_is_aborted() {
    let (endpoint, seen, _) = multipart_s3(2, Some(2)).await;
    let store = store_at(endpoint, 2).await;
    let r = write_all(&store, &body(4 * PART_SIZE)).await;
    assert!(r.is_err(), "a refused part must fail the upload");
    let seen = seen.lock().unwrap();
    assert!(seen.completed.is_none(), "completed despite a refused part");
    assert!(seen.aborted, "the multipart upload was not aborted");
}

/// A TCP proxy in front of `to` on a port of its own, which can go down as a restarting
/// store does: its port refuses connections and those open are cut.
struct Restarting {
    addr: std::net::SocketAddr,
    to: std::net::SocketAddr,
    serving: Option<tokio::task::JoinHandle<()>>,
}

impl Restarting {
    async fn new(to: &str) -> Self {
        let to = to.trim_start_matches("http://").parse().unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut r = Self {
            addr,
            to,
            serving: None,
        };
        r.serve(l);
        r
    }

    fn serve(&mut self, l: tokio::net::TcpListener) {
        let to = self.to;
        self.serving = Some(tokio::spawn(async move {
            let mut open = tokio::task::JoinSet::new();
            while let Ok((mut c, _)) = l.accept().await {
                open.spawn(async move {
                    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                });
            }
        }));
    }

    /// Down: the listener and every connection through it dropped.
    fn down(&mut self) {
        if let Some(s) = self.serving.take() {
            s.abort();
        }
    }

    async fn up(&mut self) {
        let l = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(l);
    }
}

/// A store at `endpoint` reached through a [`Restarting`] port, `parts` parts in flight.
async fn behind_a_restarting_port(endpoint: &str, parts: usize) -> (Restarting, S3Store) {
    let port = Restarting::new(endpoint).await;
    let at = format!("http://{}", port.addr);
    let store = store_timed(at, parts, true, Duration::from_secs(5)).await;
    (port, store)
}

/// A store that refuses connections for longer than the SDK's own tries (3 s at most) while
/// a large NAR is written (its second part sent while it is down) does not fail the upload:
/// the part is sent again while the store cannot be connected to, within its deadline. Nix
/// 2.8 retries a failed PUT without its body, so a failed part failed the whole `nix copy
/// --to`.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_restarting_for_seconds_mid_upload_does_not_fail_it() {
    let (endpoint, seen, _) = multipart_s3(1, None).await;
    let (mut store_port, store) = behind_a_restarting_port(&endpoint, 2).await;
    let data = body(2 * PART_SIZE + 1);
    let mut w = store.writer("nar/x.nar").await.unwrap();
    // The upload is created and its first part on its way; then the store goes away.
    w.write(bytes::Bytes::copy_from_slice(&data[..PART_SIZE]))
        .await
        .unwrap();
    store_port.down();
    let writing = tokio::spawn(async move {
        w.write(bytes::Bytes::copy_from_slice(&data[PART_SIZE..]))
            .await?;
        w.commit().await
    });
    // The store's outage: not a wait for anything.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    store_port.up().await;
    writing.await.unwrap().unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.parts.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    assert!(seen.completed.is_some());
    assert!(!seen.aborted);
}

/// An upload aborted while the store cannot be connected to is not waited for beyond the
/// SDK's own tries (3 s at most): its failure is answered after the abort, and an upload
/// left behind is the staging cleanup's. (Waited for, the five tries take 3.75 s at least.)
#[tokio::test(flavor = "multi_thread")]
async fn an_abort_does_not_wait_for_a_store_that_is_away() {
    let (endpoint, _, _) = multipart_s3(1, None).await;
    let (mut store_port, store) = behind_a_restarting_port(&endpoint, 1).await;
    let mut w = store.writer("nar/x.nar").await.unwrap();
    w.write(bytes::Bytes::from(body(PART_SIZE))).await.unwrap();
    store_port.down();
    let started = std::time::Instant::now();
    w.abort().await;
    assert!(
        started.elapsed() < Duration::from_millis(3750),
        "{:?}",
        started.elapsed()
    );
}

/// A completion retried after its answer was lost finds no such upload: the upload stands if
/// the object is there as it would have left it, and fails (aborted) if it is not, or is
/// another object.
#[tokio::test]
async fn a_completion_whose_answer_was_lost_stands_if_the_object_does() {
    let len = 2 * PART_SIZE + 1;
    let now = Duration::ZERO;
    let cases = [
        (Some((len, "\"abc-3\"", now)), true),
        (None, false),
        (Some((len + 1, "\"abc-3\"", now)), false),
        (Some((len, "\"abc-2\"", now)), false),
        // An object of that key from an hour before (the upload was aborted, not completed).
        (Some((len, "\"abc-3\"", Duration::from_secs(3600))), false),
    ];
    for (head, stands) in cases {
        let (endpoint, seen, _) = multipart_s3_after_a_lost_answer(1, None, Some(head)).await;
        let store = store_at(endpoint, 2).await;
        let r = write_all(&store, &body(len)).await;
        assert_eq!(r.is_ok(), stands, "{head:?}: {r:?}");
        assert_eq!(seen.lock().unwrap().aborted, !stands, "{head:?}");
    }
}

/// A writer dropped mid-upload (the client went away) aborts its multipart upload in the
/// background, and never completes it.
#[tokio::test]
async fn a_writer_dropped_mid_upload_aborts_it() {
    let (endpoint, seen, deleted) = multipart_s3(1, None).await;
    let store = store_at(endpoint, 2).await;
    let mut w = store.writer("nar/x.nar").await.unwrap();
    w.write(bytes::Bytes::from(body(PART_SIZE + 1)))
        .await
        .unwrap();
    drop(w);
    tokio::time::timeout(Duration::from_secs(20), deleted.notified())
        .await
        .expect("the dropped writer's upload was not aborted");
    assert!(seen.lock().unwrap().completed.is_none());
}

/// A writer dropped while the store is still creating its multipart upload (the client went
/// away just then) aborts the upload once the store has created it: it never learnt the id
/// otherwise, and the upload stayed until the periodic staging cleanup.
#[tokio::test]
async fn a_writer_dropped_while_its_upload_is_created_aborts_it() {
    use axum::http::{Method, StatusCode};
    use axum::response::IntoResponse as _;
    use tokio::sync::Notify;
    let (asked, answer, deleted) = (
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let (a, g, d) = (asked.clone(), answer.clone(), deleted.clone());
    let app = axum::Router::new().fallback(move |method: Method, uri: axum::http::Uri| {
        let (a, g, d) = (a.clone(), g.clone(), d.clone());
        async move {
            if method == Method::DELETE {
                d.notify_one();
                return StatusCode::NO_CONTENT.into_response();
            }
            if uri.query().is_some_and(|q| q.contains("uploads")) {
                a.notify_one();
                g.notified().await;
                let xml = "<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>\
                               <UploadId>u1</UploadId></InitiateMultipartUploadResult>";
                return (StatusCode::OK, xml).into_response();
            }
            // Parts: never answered here (the writer is gone by then).
            std::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    let store = store_at(endpoint, 2).await;
    let writing = tokio::spawn(async move {
        let mut w = store.writer("nar/x.nar").await.unwrap();
        let _ = w.write(bytes::Bytes::from(body(PART_SIZE + 1))).await;
    });
    asked.notified().await;
    writing.abort();
    assert!(writing.await.is_err_and(|e| e.is_cancelled()));
    answer.notify_one();
    tokio::time::timeout(Duration::from_secs(20), deleted.notified())
        .await
        .expect("the upload created after its writer was dropped was not aborted");
}

/// A listing entry without a date is an error on the SDK's path as on the direct one: dated
/// 1970 it would look expired to gc's grace and retention. So is a page that says more follow
/// without saying where: ending there would pass a part of the listing for the whole.
#[tokio::test]
async fn a_listed_object_without_a_date_is_refused() {
    use futures::StreamExt as _;
    let listing = |dated: bool, truncated: bool| {
        let date = if dated {
            "<LastModified>2026-11-30T10:00:00.000Z</LastModified>"
        } else {
            ""
        };
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
             <ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
             <Name>b</Name><Prefix></Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys>\
             <IsTruncated>{truncated}</IsTruncated>\
             <Contents><Key>x.narinfo</Key>{date}<Size>5</Size></Contents>\
             </ListBucketResult>"
        )
    };
    // The listing a store answering every request with `body` gives.
    let listed = |body: String, direct: bool| async move {
        let app = axum::Router::new().fallback(move || {
            let body = body.clone();
            async move { ([("content-type", "application/xml")], body) }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        let store = store_with(format!("http://{addr}"), 4, direct).await;
        store.list("").collect::<Vec<_>>().await
    };
    for direct in [false, true] {
        let listed_truncated = listed(listing(true, true), direct).await;
        assert!(
            listed_truncated.iter().any(|r| r
                .as_ref()
                .is_err_and(|e| e.to_string().contains("NextContinuationToken"))),
            "direct {direct}: {listed_truncated:?}"
        );
        for dated in [true, false] {
            let listed = listed(listing(dated, false), direct).await;
            assert_eq!(listed.len(), 1, "direct {direct}, dated {dated}");
            match (&listed[0], dated) {
                (Ok(o), true) => assert_eq!(o.key, "x.narinfo"),
                (Err(e), false) => assert!(e.to_string().contains("LastModified"), "{e}"),
                (other, _) => panic!("direct {direct}, dated {dated}: {other:?}"),
            }
        }
    }
}

/// A body the store stops sending (the connection open, nothing more on it) fails once it has
/// been quiet for the idle limit, on the direct path and the SDK's alike, instead of holding
/// its reader forever. The wait is on virtual time (the runtime moves the clock on while
/// every task waits); what comes before it, real requests, on real time.
#[tokio::test]
async fn a_body_the_store_stops_sending_fails() {
    use futures::StreamExt as _;
    let app = axum::Router::new().fallback(|| async {
        let head = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
            b"0123456789",
        ))]);
        let body = axum::body::Body::from_stream(head.chain(futures::stream::pending()));
        ([("content-length", "100")], body)
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    for direct in [true, false] {
        let store = store_with(format!("http://{addr}"), 4, direct).await;
        let obj = store.get("nar/x.nar", None).await.unwrap().unwrap();
        let mut body = obj.body;
        assert_eq!(&body.next().await.unwrap().unwrap()[..], b"0123456789");
        tokio::time::pause();
        // A guard on the virtual clock: without the idle limit nothing else would end the wait.
        let next = tokio::time::timeout(std::time::Duration::from_secs(3600), body.next());
        let e = next
            .await
            .expect("the body waited on")
            .unwrap()
            .unwrap_err();
        tokio::time::resume();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "direct {direct}: {e}"
        );
    }
}

/// What cellar reads itself (a narinfo, a record, a pin) stored with a `Content-Encoding`
/// (Nix's `narinfo-compression`) is decoded, on both read paths, and bounded by the limit as
/// decoded too; one in a coding cellar does not decode, or that does not decode as its coding
/// says, is refused with that reason instead of being parsed as if it were plain.
#[tokio::test]
async fn an_encoded_object_cellar_reads_itself_is_decoded() {
    use std::io::Write as _;
    let plain = b"StorePath: /nix/store/x\n".repeat(100);
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(&plain).unwrap();
    let xz = xz.finish().unwrap();
    assert!(xz.len() < plain.len() / 4);
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let xz = xz.clone();
        async move {
            match uri.path().rsplit('/').next().unwrap_or("") {
                "xz.narinfo" => ([("content-encoding", "xz")], xz),
                "lz4.narinfo" => ([("content-encoding", "lz4")], xz),
                _ => ([("content-encoding", "xz")], b"\xfd7zXZ".to_vec()),
            }
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    for direct in [false, true] {
        let store = store_with(format!("http://{addr}"), 4, direct).await;
        let got = store.get_bytes("xz.narinfo", 1 << 20).await.unwrap();
        assert_eq!(got.as_deref(), Some(&plain[..]), "direct {direct}");
        let exact = store.get_bytes("xz.narinfo", plain.len() as u64).await;
        assert_eq!(
            exact.unwrap().as_deref(),
            Some(&plain[..]),
            "direct {direct}"
        );
        // Small as stored, too large as decoded.
        let e = store
            .get_bytes("xz.narinfo", plain.len() as u64 - 1)
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::TooLarge { .. }),
            "direct {direct}: {e}"
        );
        for (key, why) in [
            ("lz4.narinfo", "Content-Encoding lz4"),
            ("broken.narinfo", "Content-Encoding xz"),
        ] {
            let e = store.get_bytes(key, 1 << 20).await.unwrap_err();
            assert!(
                matches!(e, StoreError::Encoded { .. }) && e.to_string().contains(why),
                "direct {direct}: {key}: {e}"
            );
        }
    }
}

/// A small object read whole is refused once over the caller's limit, to the byte, by its
/// stated length (S3 states one; an object without is refused as a broken answer).
#[tokio::test]
async fn a_small_object_over_the_limit_is_refused_to_the_byte() {
    let app = axum::Router::new().fallback(|| async { vec![b'x'; 100] });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    for direct in [false, true] {
        let store = store_with(format!("http://{addr}"), 4, direct).await;
        let got = store.get_bytes("sized", 100).await.unwrap().unwrap();
        assert_eq!(got.len(), 100, "direct {direct}");
        let e = store.get_bytes("sized", 99).await.unwrap_err();
        assert!(
            matches!(e, StoreError::TooLarge { limit: 99, .. }),
            "direct {direct}: {e}"
        );
    }
}

/// `bytes=-0` (no byte of any object) is answered from the object's size, never sent: a store
/// that ignores it sends the whole object, which is no answer to a range.
#[tokio::test]
async fn an_empty_suffix_range_is_unsatisfiable_on_a_store_that_ignores_ranges() {
    let app = axum::Router::new().fallback(|uri: axum::http::Uri| async move {
        if uri.path().ends_with("/gone") {
            (axum::http::StatusCode::NOT_FOUND, Vec::new())
        } else {
            (axum::http::StatusCode::OK, vec![b'x'; 100])
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    for direct in [false, true] {
        let store = store_with(format!("http://{addr}"), 4, direct).await;
        let e = store
            .get("nar/x.nar", Some(ByteRange::Suffix(0)))
            .await
            .err();
        assert!(
            matches!(e, Some(StoreError::RangeNotSatisfiable { size: 100 })),
            "direct {direct}: {e:?}"
        );
        let gone = store.get("gone", Some(ByteRange::Suffix(0))).await;
        assert!(matches!(gone, Ok(None)), "direct {direct}");
    }
}

/// A fake S3 that takes `delay` to answer each PUT (an object or a part), after reading its
/// body, and answers the rest of a multipart upload at once.
async fn slow_put_s3(delay: Duration) -> String {
    use axum::extract::Query;
    use axum::http::Method;
    use axum::response::IntoResponse as _;
    use std::collections::HashMap;
    let app =
        axum::Router::new()
            .fallback(
                move |method: Method,
                      Query(q): Query<HashMap<String, String>>,
                      _body: bytes::Bytes| async move {
                    if q.contains_key("uploads") {
                        return "<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>\
                            <UploadId>u1</UploadId></InitiateMultipartUploadResult>"
                            .into_response();
                    }
                    if method == Method::POST {
                        return "<CompleteMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>\
                            <ETag>\"all\"</ETag></CompleteMultipartUploadResult>"
                            .into_response();
                    }
                    // Simulated store latency, not synchronisation.
                    tokio::time::sleep(delay).await;
                    [("etag", "\"e\"")].into_response()
                },
            )
            .layer(axum::extract::DefaultBodyLimit::disable());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}")
}

/// A write's deadline grows with its body: over a slow uplink a part of 8 MiB takes minutes,
/// and was given up after six request timeouts, however steadily it went. A stuck write is
/// still given up.
#[tokio::test]
async fn a_write_is_given_time_for_its_body() {
    assert_eq!(
        writer::write_deadline(Duration::from_secs(10), 0),
        Duration::from_secs(60)
    );
    assert_eq!(
        writer::write_deadline(Duration::from_secs(10), PART_SIZE),
        Duration::from_secs(60 + 256)
    );
    // Parts sent together share the uplink: each is given its share of the slowest pace.
    assert_eq!(
        writer::write_deadline_sharing(Duration::from_secs(10), PART_SIZE, 4),
        Duration::from_secs(60 + 4 * 256)
    );
    assert_eq!(
        writer::write_deadline_sharing(Duration::from_secs(10), PART_SIZE, 0),
        writer::write_deadline(Duration::from_secs(10), PART_SIZE)
    );
    // Completing a multipart upload: a second a part on top (S3 assembles the object first).
    assert_eq!(
        writer::complete_deadline(Duration::from_secs(10), 1000),
        Duration::from_secs(60 + 1000)
    );
    let endpoint = slow_put_s3(Duration::from_millis(1500)).await;
    for direct in [true, false] {
        // Six request timeouts are 0.6 s: less than the store takes to answer.
        let store = store_timed(endpoint.clone(), 4, direct, Duration::from_millis(100)).await;
        // 64 KiB: 2 s more at the slowest pace waited for.
        write_all(&store, &body(64 << 10))
            .await
            .unwrap_or_else(|e| panic!("direct: {direct}: {e}"));
        // Two parts of 8 MiB, through the SDK's UploadPart: 256 s more each.
        write_all(&store, &body(2 * PART_SIZE))
            .await
            .unwrap_or_else(|e| panic!("parts, direct: {direct}: {e}"));
        // 1 KiB: 31 ms more, and the store is still too slow.
        assert!(
            matches!(
                write_all(&store, &body(1 << 10)).await,
                Err(StoreError::Timeout(_))
            ),
            "direct: {direct}"
        );
    }
}

/// A store whose clock is two days ahead of this machine's, refusing signatures more than
/// 15 minutes off its time (400, as Garage words it; AWS says 403 RequestTimeTooSkewed), and
/// counting requests in `hits`. Every object is 5 bytes, except `…/denied`, refused (403), ,
/// `…/archived`, whose GET is refused as AWS refuses an archived object's (403), and
/// `…/empty` and `…/minio-empty`, empty objects whose ranged GET AWS and MinIO answer.
pub(super) async fn store_two_days_ahead(
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> String {
    use aws_smithy_types::date_time::{DateTime, Format};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse as _;
    let app = axum::Router::new().fallback(
        move |method: axum::http::Method, uri: axum::http::Uri, h: HeaderMap| async move {
            hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let theirs = std::time::SystemTime::now() + Duration::from_secs(2 * 86400);
            let date = DateTime::from(theirs).fmt(Format::HttpDate).unwrap();
            let signed = h
                .get("x-amz-date")
                .and_then(|v| v.to_str().ok())
                .and_then(crate::store::clock::signing_time)
                .unwrap();
            let off = theirs
                .duration_since(signed)
                .unwrap_or_else(|e| e.duration());
            if off > Duration::from_secs(900) {
                let body =
                    "<Error><Code>InvalidRequest</Code><Message>Date is too old</Message></Error>";
                (StatusCode::BAD_REQUEST, [("date", date)], body).into_response()
            } else if uri.path().ends_with("/denied") {
                let body = "<Error><Code>AccessDenied</Code></Error>";
                (StatusCode::FORBIDDEN, [("date", date)], body).into_response()
            } else if uri.path().ends_with("/empty") && method == axum::http::Method::GET {
                // AWS: a range of an empty object is answered with the whole object.
                (
                    StatusCode::OK,
                    [("date", date), ("content-length", "0".into())],
                )
                    .into_response()
            } else if uri.path().ends_with("/minio-empty") && method == axum::http::Method::GET {
                let told = ("content-range", "bytes 0--1/0".to_owned());
                (StatusCode::PARTIAL_CONTENT, [("date", date), told]).into_response()
            } else if uri.path().ends_with("empty") {
                (
                    StatusCode::OK,
                    [("date", date), ("content-length", "0".into())],
                )
                    .into_response()
            } else if uri.path().ends_with("/archived") && method == axum::http::Method::GET {
                let body = "<Error><Code>InvalidObjectState</Code></Error>";
                (StatusCode::FORBIDDEN, [("date", date)], body).into_response()
            } else if uri.query().is_some_and(|q| q.contains("list-type=2")) {
                // The readiness probe's listing of one key: none.
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                    <ListBucketResult><Name>b</Name><KeyCount>0</KeyCount>\
                    <MaxKeys>1</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>";
                (StatusCode::OK, [("date", date)], body).into_response()
            } else {
                (
                    StatusCode::OK,
                    [("date", date), ("content-length", "5".into())],
                )
                    .into_response()
            }
        },
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    endpoint
}

/// Against a store whose clock is days away, the first request is refused for its time; it is
/// signed again with the store's time and goes through: the readiness probe (one request
/// otherwise), and reads through the SDK as through cellar's own requests. The store's time
/// is then cellar's "now".
#[tokio::test]
async fn a_store_whose_clock_is_days_away_is_signed_for_with_its_time() {
    let endpoint = store_two_days_ahead(std::sync::Arc::default()).await;
    store_at(endpoint.clone(), 4).await.ping().await.unwrap();
    for direct in [false, true] {
        let store = store_with(endpoint.clone(), 4, direct).await;
        assert_eq!(store.head("x").await.unwrap(), Some(5), "direct {direct}");
        let ahead = store
            .now()
            .duration_since(std::time::SystemTime::now())
            .unwrap();
        let off = ahead.as_secs_f64() - 2.0 * 86400.0;
        assert!(off.abs() < 5.0, "direct {direct}: {off} s off");
    }
}

/// A 403 for an archived object (AWS's `InvalidObjectState`) is that object's failure, not a
/// refusal of the credentials, on both read paths; a 403 `AccessDenied` still is.
#[tokio::test]
async fn an_archived_object_is_not_taken_for_refused_credentials() {
    let endpoint = store_two_days_ahead(std::sync::Arc::default()).await;
    for direct in [false, true] {
        let store = store_with(endpoint.clone(), 4, direct).await;
        let archived = store.get("p/archived", None).await;
        assert!(
            matches!(&archived, Err(StoreError::Other(m)) if m.contains("InvalidObjectState")),
            "direct {direct}: {:?}",
            archived.err()
        );
        let denied = store.get("p/denied", None).await;
        assert!(
            matches!(&denied, Err(StoreError::Misconfigured(m)) if m.contains("AccessDenied")),
            "direct {direct}: {:?}",
            denied.err()
        );
    }
}

/// A range of an empty object, as AWS answers it (a 200 with the empty object) and as MinIO
/// does (`206 bytes 0--1/0`): the empty object and a 416, on both read paths, not a 502.
#[tokio::test]
async fn a_range_of_an_empty_object_is_answered_as_the_stores_do() {
    let endpoint = store_two_days_ahead(std::sync::Arc::default()).await;
    let range = Some(ByteRange::From {
        start: 0,
        end: None,
    });
    for direct in [false, true] {
        let store = store_with(endpoint.clone(), 4, direct).await;
        let whole = store.get("p/empty", range).await;
        assert!(
            matches!(&whole, Ok(Some(o)) if o.length == Some(0) && o.range.is_none()),
            "direct {direct}: {:?}",
            whole.as_ref().err()
        );
        let minio = store.get("p/minio-empty", range).await;
        assert!(
            matches!(&minio, Err(StoreError::RangeNotSatisfiable { size: 0 })),
            "direct {direct}: {:?}",
            minio.as_ref().err()
        );
    }
}

/// The staging cleanup aborts a multipart upload begun long ago only if none of its parts
/// arrived within the age either: one still sending (a large NAR over a slow link, here or on
/// another replica) is kept, one whose parts all stopped long ago, or that has none, is not.
/// Credentials that may not list the parts date uploads by their start alone; an upload
/// whose parts the store cannot list now is kept, and the others are judged all the same.
#[tokio::test]
async fn an_upload_still_sending_parts_is_not_stale_however_old() {
    use axum::extract::{Query, State};
    use axum::http::Method;
    use std::collections::HashMap;
    type Aborted = Arc<std::sync::Mutex<Vec<String>>>;
    let at = |ago: Duration| {
        aws_smithy_types::DateTime::from(std::time::SystemTime::now() - ago)
            .fmt(aws_smithy_types::date_time::Format::DateTime)
            .unwrap()
    };
    let long_ago = at(Duration::from_secs(30 * 3600));
    let lately = at(Duration::from_secs(60));
    let (long_ago2, lately2) = (long_ago.clone(), lately.clone());
    let answer = move |State(aborted): State<Aborted>,
                       method: Method,
                       Query(q): Query<HashMap<String, String>>| {
        let (long_ago, lately) = (long_ago2.clone(), lately2.clone());
        async move {
            use axum::response::IntoResponse as _;
            if method == Method::DELETE {
                aborted.lock().unwrap().push(q["uploadId"].clone());
                return String::new().into_response();
            }
            if q.get("uploadId").is_some_and(|u| u == "denied") {
                let xml = "<Error><Code>AccessDenied</Code><Message>no</Message></Error>";
                return (axum::http::StatusCode::FORBIDDEN, xml).into_response();
            }
            if q.get("uploadId").is_some_and(|u| u == "unlisted") {
                let xml = "<Error><Code>NotImplemented</Code><Message>no</Message></Error>";
                return (axum::http::StatusCode::NOT_IMPLEMENTED, xml).into_response();
            }
            if q.contains_key("uploads") {
                let upload = |id: &str| {
                    format!(
                        "<Upload><Key>nar/{id}.nar</Key><UploadId>{id}</UploadId>\
                         <Initiated>{long_ago}</Initiated></Upload>"
                    )
                };
                return format!(
                    "<ListMultipartUploadsResult><Bucket>b</Bucket><IsTruncated>false</IsTruncated>\
                     {}{}{}{}{}</ListMultipartUploadsResult>",
                    upload("sending"),
                    upload("stopped"),
                    upload("partless"),
                    upload("denied"),
                    upload("unlisted")
                )
                .into_response();
            }
            let part = |n: u32, t: &str| {
                format!(
                    "<Part><PartNumber>{n}</PartNumber><LastModified>{t}</LastModified>\
                     <ETag>\"e\"</ETag><Size>8388608</Size></Part>"
                )
            };
            // The parts come in two pages, the recent one on the second.
            let parts = match (q["uploadId"].as_str(), q.get("part-number-marker")) {
                ("sending", None) => part(1, &long_ago),
                ("sending", Some(_)) => part(2, &lately),
                ("stopped", None) => part(1, &long_ago),
                ("stopped", Some(_)) => part(2, &long_ago),
                _ => String::new(),
            };
            let more = matches!(q["uploadId"].as_str(), "sending" | "stopped")
                && !q.contains_key("part-number-marker");
            format!(
                "<ListPartsResult><Bucket>b</Bucket><Key>k</Key><UploadId>{}</UploadId>\
                 <IsTruncated>{more}</IsTruncated><NextPartNumberMarker>1</NextPartNumberMarker>\
                 {parts}</ListPartsResult>",
                q["uploadId"]
            )
            .into_response()
        }
    };
    let aborted = Aborted::default();
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(aborted.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    let store = store_at(format!("http://{addr}"), 4).await;
    let six_hours = Duration::from_secs(6 * 3600);
    let mut stale = store.stale_staging(six_hours).await.unwrap();
    stale.sort();
    assert_eq!(
        stale,
        [
            "multipart upload of nar/denied.nar (denied)",
            "multipart upload of nar/partless.nar (partless)",
            "multipart upload of nar/stopped.nar (stopped)"
        ]
    );
    assert_eq!(store.cleanup_staging(six_hours).await.unwrap(), 3);
    let mut aborted = aborted.lock().unwrap().clone();
    aborted.sort();
    assert_eq!(aborted, ["denied", "partless", "stopped"]);
}

/// With `store.prefix` set, unfinished uploads are listed without a prefix and picked by key:
/// MinIO lists none for a prefix that is not a whole key (minio/minio#20989), so the cleanup
/// would never find the uploads a crash left there. Another prefix's uploads are left alone.
/// A store that answers the same page again and again is an error, not an endless loop.
#[tokio::test]
async fn unfinished_uploads_under_a_prefix_are_found_on_minio() {
    // An upload of every kind of object the cache's layout holds, under `store.prefix`.
    const OURS: [&str; 9] = [
        "cache/nar/ours.nar",
        "cache/log/x.drv",
        "cache/debuginfo/x.debug",
        "cache/realisations/x.doi",
        "cache/build-trace/x.drv/out",
        "cache/build-trace-v2/x.drv/out.doi",
        "cache/_cellar/x",
        "cache/x.narinfo",
        "cache/x.ls",
    ];
    use axum::extract::{Query, State};
    use std::collections::HashMap;
    let long_ago = aws_smithy_types::DateTime::from(
        std::time::SystemTime::now() - Duration::from_secs(30 * 3600),
    )
    .fmt(aws_smithy_types::date_time::Format::DateTime)
    .unwrap();
    // Which list says there is more on every page, with the same markers: none (0), the
    // uploads (1), an upload's parts (2).
    let looping = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let answer = move |State(looping): State<Arc<std::sync::atomic::AtomicU8>>,
                       Query(q): Query<HashMap<String, String>>| {
        let long_ago = long_ago.clone();
        async move {
            if q.contains_key("uploads") {
                // MinIO: a prefix lists only the uploads of exactly that key.
                let prefix = q.get("prefix").map_or("", String::as_str);
                // Two pages: the second asked for with the markers the first gave.
                let second = q.contains_key("key-marker");
                let page: &[&str] = if second { &OURS[5..] } else { &OURS[..5] };
                let others: &[&str] = if second {
                    &[]
                } else {
                    &["other/nar/theirs.nar", "cache/other/x"]
                };
                let uploads: String = page
                    .iter()
                    .chain(others)
                    .copied()
                    .filter(|k| prefix.is_empty() || *k == prefix)
                    .map(|k| {
                        format!(
                            "<Upload><Key>{k}</Key><UploadId>{k}-id</UploadId>\
                             <Initiated>{long_ago}</Initiated></Upload>"
                        )
                    })
                    .collect();
                let more = !second || looping.load(std::sync::atomic::Ordering::SeqCst) == 1;
                return format!(
                    "<ListMultipartUploadsResult><Bucket>b</Bucket>\
                     <IsTruncated>{more}</IsTruncated><NextKeyMarker>k</NextKeyMarker>\
                     <NextUploadIdMarker>u</NextUploadIdMarker>\
                     {uploads}</ListMultipartUploadsResult>"
                );
            }
            // No parts: dated by their start.
            let more = looping.load(std::sync::atomic::Ordering::SeqCst) == 2;
            format!(
                "<ListPartsResult><Bucket>b</Bucket><Key>k</Key><UploadId>{}</UploadId>\
                 <IsTruncated>{more}</IsTruncated><NextPartNumberMarker>1</NextPartNumberMarker>\
                 </ListPartsResult>",
                q["uploadId"]
            )
        }
    };
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(looping.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    let mut cfg = config_for(format!("http://{addr}"), 4, true);
    cfg.prefix = "cache/".into();
    let store = S3Store::new(&cfg, Duration::from_secs(5)).await;
    let six_hours = Duration::from_secs(6 * 3600);
    let mut found = store.stale_staging(six_hours).await.unwrap();
    found.sort();
    let mut ours: Vec<String> = OURS
        .iter()
        .map(|k| format!("multipart upload of {k} ({k}-id)"))
        .collect();
    ours.sort();
    assert_eq!(found, ours);
    // Parts that never end: that upload is kept for the next cleanup.
    looping.store(2, std::sync::atomic::Ordering::SeqCst);
    assert!(store.stale_staging(six_hours).await.unwrap().is_empty());
    looping.store(1, std::sync::atomic::Ordering::SeqCst);
    let got = store.stale_staging(six_hours).await;
    assert!(
        matches!(&got, Err(StoreError::Other(m)) if m.contains("same page")),
        "{got:?}"
    );
}

/// A store error says its cause and the causes' causes as they display themselves, once each,
/// without the `Debug` of the whole chain (kilobytes for the SDK's credential providers).
#[test]
fn an_error_chain_is_said_without_its_debug() {
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }
    let leaf = E("no route to host", None);
    let mid = E("dispatch failure: no route to host", Some(Box::new(leaf)));
    let top = E("HeadBucket", Some(Box::new(mid)));
    assert_eq!(
        super::display_chain(&top),
        "HeadBucket: dispatch failure: no route to host"
    );
}

/// Cellar's own requests go to the configured endpoint, else to `AWS_ENDPOINT_URL`'s (before,
/// a MinIO set up with the variable alone sent everything through the SDK, silently), and
/// only with path-style addressing and `store.direct_requests`.
#[test]
fn direct_requests_go_to_the_configured_endpoint_else_the_environments() {
    let configured = config_for("http://configured:9000".into(), 4, true);
    let from_env = Some("http://env:9000");
    assert_eq!(
        super::direct_endpoint(&configured, from_env),
        Some("http://configured:9000")
    );
    let unset = S3StoreConfig {
        endpoint: None,
        ..configured.clone()
    };
    assert_eq!(super::direct_endpoint(&unset, from_env), from_env);
    assert_eq!(super::direct_endpoint(&unset, None), None, "AWS itself");
    let virtual_hosted = S3StoreConfig {
        force_path_style: false,
        ..configured.clone()
    };
    assert_eq!(super::direct_endpoint(&virtual_hosted, from_env), None);
    let off = config_for("http://configured:9000".into(), 4, false);
    assert_eq!(super::direct_endpoint(&off, from_env), None);
}

/// What the AWS environment holds for one service setting (the SDK's own reader, given
/// `AWS_ENDPOINT_URL_S3`, answers the key S3 / `AWS_ENDPOINT_URL` / `endpoint_url`).
#[derive(Debug)]
struct ServiceEnv(Option<&'static str>);

impl aws_types::service_config::LoadServiceConfig for ServiceEnv {
    fn load_config(&self, key: ServiceConfigKey<'_>) -> Option<String> {
        let s3_endpoint = (key.service_id(), key.env(), key.profile())
            == ("S3", "AWS_ENDPOINT_URL", "endpoint_url");
        s3_endpoint.then(|| self.0.map(str::to_owned)).flatten()
    }
}

/// The environment's endpoint for S3 is the one the SDK uses: S3's own setting
/// (`AWS_ENDPOINT_URL_S3`) before the shared one; cellar's own requests went to the shared one
/// (or, with it unset, through the SDK) while the SDK's went to S3's.
#[test]
fn the_environments_endpoint_is_s3s_own_before_the_shared_one() {
    let shared = |service: Option<&'static str>, all: Option<&str>| {
        let mut b = aws_config::SdkConfig::builder().service_config(ServiceEnv(service));
        if let Some(all) = all {
            b = b.endpoint_url(all);
        }
        b.build()
    };
    assert_eq!(
        super::endpoint_from_env(&shared(
            Some("http://s3-only:9000"),
            Some("http://all:9000")
        ))
        .as_deref(),
        Some("http://s3-only:9000")
    );
    assert_eq!(
        super::endpoint_from_env(&shared(None, Some("http://all:9000"))).as_deref(),
        Some("http://all:9000")
    );
    assert_eq!(super::endpoint_from_env(&shared(None, None)), None);
}

/// An SDK request that could not connect is made again, seconds apart, only where asked
/// (a write, or a request made for an upload), and within its deadline; one that connected
/// and failed otherwise is not.
#[tokio::test(start_paused = true)]
async fn sdk_requests_that_could_not_connect_are_made_again_where_asked() {
    use aws_sdk_s3::error::ConnectorError;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let tries = AtomicUsize::new(0);
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    let send = |fails: usize, timeout: bool| {
        let tries = &tries;
        move || async move {
            let n = tries.fetch_add(1, Ordering::SeqCst);
            if n < fails {
                let e = if timeout {
                    ConnectorError::timeout("connect timed out".into())
                } else {
                    ConnectorError::other("the store said no".into(), None)
                };
                Err(SdkError::<(), HttpResponse>::dispatch_failure(e))
            } else {
                Ok(n)
            }
        }
    };
    let started = tokio::time::Instant::now();
    assert_eq!(
        until_connected("Op", "k", end, true, send(2, true))
            .await
            .ok(),
        Some(2)
    );
    assert_eq!(started.elapsed(), Duration::from_millis(750));
    // At most five tries.
    tries.store(0, Ordering::SeqCst);
    assert!(until_connected("Op", "k", end, true, send(9, true))
        .await
        .is_err());
    assert_eq!(tries.load(Ordering::SeqCst), CONNECT_ATTEMPTS as usize);
    // Not where it was not asked, nor for another failure.
    tries.store(0, Ordering::SeqCst);
    assert!(until_connected("Op", "k", end, false, send(9, true))
        .await
        .is_err());
    assert_eq!(tries.load(Ordering::SeqCst), 1);
    tries.store(0, Ordering::SeqCst);
    assert!(until_connected("Op", "k", end, true, send(9, false))
        .await
        .is_err());
    assert_eq!(tries.load(Ordering::SeqCst), 1);
    // Nor past the deadline: the next wait (0.25 s) would end after it.
    tries.store(0, Ordering::SeqCst);
    let soon = tokio::time::Instant::now() + Duration::from_millis(200);
    assert!(until_connected("Op", "k", soon, true, send(9, true))
        .await
        .is_err());
    assert_eq!(tries.load(Ordering::SeqCst), 1);
}

/// A listing made while an upload is served (a narinfo's upload lists the collectors'
/// announcements) through the SDK is made again while the store cannot be connected to, for
/// longer than the SDK's own tries (3 s at most): here the store is away 3.5 s.
#[tokio::test(flavor = "multi_thread")]
async fn an_sdk_listing_for_an_upload_waits_out_a_restart() {
    use futures::TryStreamExt as _;
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let store = store_timed(format!("http://{addr}"), 1, false, Duration::from_secs(20)).await;
    let app = axum::Router::new().fallback(|| async {
        "<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>"
    });
    tokio::spawn(async move {
        // The store's outage: not a wait for anything.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        axum::serve(l, app).await
    });
    let listed: Vec<_> = crate::store::serving_upload(store.list("_cellar/").try_collect())
        .await
        .unwrap();
    assert!(listed.is_empty());
}
