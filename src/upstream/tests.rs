use super::*;
use axum::extract::Path;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};
use std::sync::Arc;

#[test]
fn reads_the_size_of_a_refused_range() {
    assert_eq!(unsatisfied_range_size("bytes */1234"), Some(1234));
    assert_eq!(unsatisfied_range_size(" bytes */0 "), Some(0));
    assert_eq!(unsatisfied_range_size("bytes 0-9/1234"), None);
    assert_eq!(unsatisfied_range_size("bytes */"), None);
    assert_eq!(unsatisfied_range_size("bytes */*"), None);
}

/// An upstream whose NARs answer a range with 416: `said.nar` states its size in
/// `Content-Range`, `unsaid.nar` does not (a HEAD tells it), `mute.nar` tells it nowhere.
async fn upstream_nar(Path(file): Path<String>, headers: HeaderMap) -> Response {
    let ranged = headers.contains_key(header::RANGE);
    match (file.as_str(), ranged) {
        ("said.nar", true) => (
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, "bytes */1234")],
        )
            .into_response(),
        ("unsaid.nar" | "mute.nar", true) => StatusCode::RANGE_NOT_SATISFIABLE.into_response(),
        ("unsaid.nar", false) => vec![0u8; 777].into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// One upstream at `url`, without keys, with a 5 s timeout.
fn upstreams_at(url: String) -> Upstreams {
    let config = UpstreamConfig {
        url,
        public_keys: Vec::new(),
        timeout: Duration::from_secs(5),
        mirror: false,
    };
    Upstreams::new(&[config], "/nix/store").unwrap()
}

/// One upstream serving `app` on a port of its own.
async fn upstreams_serving(app: axum::Router) -> Upstreams {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    upstreams_at(url)
}

/// An upstream given longer than 30 s to answer (`timeout_secs`) is waited for that long:
/// the client's read timeout cut every answer off at 30 s, counted as an error, and skipped
/// the upstream (walk). One slower than its own timeout is a timeout.
#[tokio::test(start_paused = true)]
async fn an_upstream_is_given_its_whole_timeout_to_answer() {
    let app = axum::Router::new().route(
        "/nar/{file}",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_secs(40)).await;
            vec![7u8; 777]
        }),
    );
    let url = serve(app).await;
    let patient = Upstreams::new(
        &[UpstreamConfig {
            url: url.clone(),
            public_keys: Vec::new(),
            timeout: Duration::from_secs(60),
            mirror: false,
        }],
        "/nix/store",
    )
    .unwrap();
    let got = patient.get("nar/slow.nar", None).await.unwrap().unwrap();
    assert_eq!(got.length, Some(777));
    let before = crate::metrics::upstream_requests(&url, "timeout");
    let hasty = Upstreams::new(
        &[UpstreamConfig {
            url: url.clone(),
            public_keys: Vec::new(),
            timeout: Duration::from_secs(20),
            mirror: false,
        }],
        "/nix/store",
    )
    .unwrap();
    let r = hasty.get("nar/slow.nar", None).await;
    assert!(
        matches!(r, Err(StoreError::Unavailable(_))),
        "{:?}",
        r.map(|o| o.map(|o| o.length))
    );
    assert_eq!(
        crate::metrics::upstream_requests(&url, "timeout"),
        before + 1
    );
}

/// An upstream serving another store directory is said once, at start: each of its
/// narinfos is refused, which was said only path by path (walk). One serving ours is not.
#[tokio::test]
async fn an_upstream_of_another_store_directory_is_said() {
    for (theirs, said) in [("/gnu/store", true), ("/nix/store", false)] {
        let info = format!("StoreDir: {theirs}\nWantMassQuery: 1\nPriority: 40\n");
        let app = axum::Router::new().route(
            "/nix-cache-info",
            axum::routing::get(move || async move { info }),
        );
        let upstreams = Arc::new(upstreams_serving(app).await);
        let logs = crate::test_logs::capture();
        upstreams.check_store_dirs().await;
        let text = logs.text();
        assert_eq!(
            text.contains("another store directory than store_dir") && text.contains(theirs),
            said,
            "{theirs}: {text}"
        );
    }
}

#[tokio::test]
async fn a_refused_range_carries_the_upstreams_size() {
    let app = axum::Router::new().route("/nar/{file}", axum::routing::get(upstream_nar));
    let upstreams = upstreams_serving(app).await;
    let range = Some(ByteRange::From {
        start: 5000,
        end: None,
    });

    let size = |r: Result<Option<Object>, StoreError>| match r {
        Err(StoreError::RangeNotSatisfiable { size }) => Some(size),
        Err(_) => None,
        Ok(_) => panic!("a refused range was served"),
    };
    assert_eq!(size(upstreams.get("nar/said.nar", range).await), Some(1234));
    assert_eq!(
        size(upstreams.get("nar/unsaid.nar", range).await),
        Some(777)
    );
    assert!(matches!(
        upstreams.get("nar/mute.nar", range).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(
        !upstreams.list[0].down.is_active(),
        "refusing a range is not an outage"
    );
}

/// A server that answers every request with a 200 of 1000 bytes, sends `start` of them and
/// closes the connection; its URL.
async fn cutting_off(start: &'static [u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                .await;
            let _ = s.write_all(start).await;
            // Dropped: the body ends short.
        }
    });
    url
}

/// An upstream that cuts a narinfo's body off has failed: an upload relying on it is asked to
/// come back (503), not refused for a reference nobody has, and the upstream is skipped.
#[tokio::test]
async fn a_narinfo_cut_off_is_an_outage_not_a_miss() {
    let upstreams = upstreams_at(cutting_off(b"StorePath: /nix").await);
    let h: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
    for _ in 0..FAILURES_IN_A_ROW {
        assert!(matches!(
            upstreams.path_of(h).await,
            Err(StoreError::UpstreamDown(_))
        ));
    }
    assert!(
        upstreams.list[0].down.is_active(),
        "the upstream is skipped"
    );
}

/// An upstream that ignores `Range` and throttles: `whole.nar` is always sent whole (200),
/// `busy.nar` answers 429.
async fn plain_upstream(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "whole.nar" => b"0123456789".to_vec().into_response(),
        "busy.nar" => StatusCode::TOO_MANY_REQUESTS.into_response(),
        "brotli.nar" => ([(header::CONTENT_ENCODING, "br")], b"\x0b\x00".to_vec()).into_response(),
        // A part, without saying of how much.
        "vague.nar" => (
            StatusCode::PARTIAL_CONTENT,
            [(header::CONTENT_RANGE, "bytes 0-3/*")],
            b"0123".to_vec(),
        )
            .into_response(),
        // Streamed without a length, as nix-serve sends NARs.
        "chunked.nar" => {
            let parts = [&b"01234"[..], &b"56789"[..]].map(|p| Ok::<_, io::Error>(p.to_vec()));
            axum::body::Body::from_stream(futures::stream::iter(parts)).into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn plain_upstreams() -> Upstreams {
    upstreams_serving(axum::Router::new().route("/nar/{file}", axum::routing::get(plain_upstream)))
        .await
}

/// A range the upstream ignored is cut from the whole object it sent, not taken for a miss
/// (a NAR 404 fails the client's download, and hides the narinfo).
#[tokio::test]
async fn a_range_the_upstream_ignores_is_cut_from_the_whole_object() {
    let upstreams = plain_upstreams().await;
    let range = Some(ByteRange::From {
        start: 3,
        end: Some(5),
    });
    let obj = upstreams
        .get("nar/whole.nar", range)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(obj.length, Some(3));
    assert_eq!(
        obj.range,
        Some(ContentRange {
            start: 3,
            end: 5,
            total: 10
        })
    );
    let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), b"345");
    let from_the_start = Some(ByteRange::From {
        start: 0,
        end: Some(3),
    });
    let obj = upstreams
        .get("nar/whole.nar", from_the_start)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((obj.length, obj.range), (Some(10), None), "sent whole");
    let past_the_end = Some(ByteRange::From {
        start: 10,
        end: None,
    });
    assert!(matches!(
        upstreams.get("nar/whole.nar", past_the_end).await,
        Err(StoreError::RangeNotSatisfiable { size: 10 })
    ));
}

/// A throttled upstream (429) has not said it lacks the object: an outage (503), not a 404;
/// for a NAR a narinfo from it named, one that gets it skipped when it goes on.
#[tokio::test]
async fn a_throttled_upstream_is_unavailable_not_a_miss() {
    let upstreams = plain_upstreams().await;
    routed_to_first(&upstreams, "nar/busy.nar").await;
    for _ in 0..FAILURES_IN_A_ROW {
        assert!(matches!(
            upstreams.get("nar/busy.nar", None).await,
            Err(StoreError::Unavailable(_))
        ));
    }
    assert!(
        upstreams.list[0].down.is_active(),
        "the upstream is skipped"
    );
}

/// `key` routed to the first upstream, as a narinfo from it naming `key` routes it.
async fn routed_to_first(upstreams: &Upstreams, key: &str) {
    upstreams.routes.insert(key.to_owned(), 0).await;
}

/// Names no narinfo named (any client may ask for them) that an upstream answers with an
/// error status (nix-serve's 500 for a NAR it does not have, a 429) are unavailable (503) but
/// do not get it skipped: before, a few such requests had its paths answered 404 for everyone
/// (clients keep those for an hour).
#[tokio::test]
async fn error_statuses_for_names_no_narinfo_named_do_not_skip_the_upstream() {
    let upstreams = plain_upstreams().await;
    for _ in 0..FAILURES_IN_A_ROW * 2 {
        assert!(matches!(
            upstreams.get("nar/busy.nar", None).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            upstreams.head("nar/busy.nar").await,
            Err(StoreError::Unavailable(_))
        ));
    }
    assert!(!upstreams.list[0].down.is_active());
}

/// An upstream that cannot answer for a NAR is logged with the name asked for: while its
/// failures are too few to skip it, each is a wait the client sees. An error status for a
/// name no narinfo named is not (some upstreams answer so for "no"); one that a narinfo named
/// is.
#[tokio::test]
async fn an_upstream_that_cannot_answer_for_a_nar_is_logged() {
    let logs = crate::test_logs::capture();
    let dead = upstreams_at("http://127.0.0.1:9".into());
    assert!(matches!(
        dead.get(&format!("nar/{SECOND_NAR}"), None).await,
        Err(StoreError::Unavailable(_))
    ));
    let logged = logs.text();
    assert!(
        logged.contains("upstream could not answer") && logged.contains(SECOND_NAR),
        "{logged}"
    );
    // A burst is one line (the rest at debug).
    assert!(dead.get(&format!("nar/{SECOND_NAR}"), None).await.is_err());
    assert_eq!(logs.text().matches("upstream could not answer").count(), 1);
    let upstreams = plain_upstreams().await;
    assert!(upstreams.get("nar/busy.nar", None).await.is_err());
    assert_eq!(logs.text().matches("upstream could not answer").count(), 1);
    routed_to_first(&upstreams, "nar/busy.nar").await;
    assert!(upstreams.get("nar/busy.nar", None).await.is_err());
    let logged = logs.text();
    assert_eq!(
        logged.matches("upstream could not answer").count(),
        2,
        "{logged}"
    );
    assert!(logged.contains("429"), "{logged}");
}

/// A NAR whose body an upstream cuts off fails naming the upstream and why (reqwest's
/// "error decoding response body" alone does not say that the connection closed early).
#[tokio::test]
async fn a_nar_body_cut_off_names_the_upstream() {
    use futures::TryStreamExt as _;
    let url = cutting_off(b"nix-archive").await;
    let upstreams = upstreams_at(url.clone());
    let obj = upstreams
        .get(&format!("nar/{SECOND_NAR}"), None)
        .await
        .unwrap()
        .unwrap();
    let e = obj
        .body
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("upstream {url} broke off the body: ")),
        "{e}"
    );
    assert!(
        e.ends_with("end of file before message length reached"),
        "{e}"
    );
}

/// An upstream's `Content-Encoding` (cache.nixos.org serves its logs and listings Brotli-encoded)
/// is kept with the object, for the client to decode.
#[tokio::test]
async fn an_upstreams_content_encoding_is_kept() {
    let upstreams = plain_upstreams().await;
    let obj = upstreams
        .get("nar/brotli.nar", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(obj.encoding.as_deref(), Some("br"));
    let obj = upstreams.get("nar/whole.nar", None).await.unwrap().unwrap();
    assert_eq!(obj.encoding, None);
}

/// A NAR streamed without a length (nix-serve's are) is served, whole: with no length known no
/// part of it can be promised, so a range is answered with all of it (as HTTP allows).
#[tokio::test]
async fn an_object_without_a_length_is_served_whole() {
    let upstreams = plain_upstreams().await;
    for range in [
        None,
        Some(ByteRange::From {
            start: 0,
            end: Some(3),
        }),
        Some(ByteRange::From {
            start: 4,
            end: None,
        }),
    ] {
        let obj = upstreams
            .get("nar/chunked.nar", range)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((obj.length, obj.range), (None, None), "{range:?}");
        let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
        assert_eq!(chunks.concat(), b"0123456789", "{range:?}");
    }
}

/// A part whose place in the object is not said (`bytes 0-3/*` leaves the total unknown) is
/// neither served nor cut again as if it were the whole object (a fill would keep 4 bytes as
/// the NAR): the next upstream is asked, else it is unavailable.
#[tokio::test]
async fn a_part_without_a_usable_content_range_is_not_served() {
    let upstreams = plain_upstreams().await;
    for range in [
        Some(ByteRange::From {
            start: 0,
            end: Some(3),
        }),
        Some(ByteRange::From {
            start: 2,
            end: None,
        }),
    ] {
        assert!(
            matches!(
                upstreams.get("nar/vague.nar", range).await,
                Err(StoreError::Unavailable(_))
            ),
            "{range:?}"
        );
    }
}

/// A HEAD answers what a GET of the same address would: an upstream that fails (5xx) or is
/// skipped after a failure makes both unavailable (503), not a 404 kept by clients.
#[tokio::test]
async fn a_head_while_the_upstream_fails_is_unavailable_like_a_get() {
    let app = axum::Router::new().fallback(|| async { StatusCode::INTERNAL_SERVER_ERROR });
    let upstreams = upstreams_serving(app).await;
    let h: StorePathHash = FIRST.parse().unwrap();
    for _ in 0..FAILURES_IN_A_ROW {
        assert!(matches!(
            upstreams.head("log/x").await,
            Err(StoreError::Unavailable(_))
        ));
        // What gets it skipped: its narinfos failing.
        assert!(upstreams.narinfo(h).await.1);
    }
    assert!(
        upstreams.list[0].down.is_active(),
        "the upstream is skipped"
    );
    // Skipped now: still unavailable, not a miss.
    assert!(matches!(
        upstreams.head("log/x").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        upstreams.get("log/x", None).await,
        Err(StoreError::Unavailable(_))
    ));
    // A plain miss stays a miss.
    let upstreams = plain_upstreams().await;
    assert!(matches!(upstreams.head("nar/none.nar").await, Ok(None)));
    assert!(matches!(
        upstreams.head("nar/whole.nar").await,
        Ok(Some(10))
    ));
}

/// A `?` in a store path name (Nix allows it) stays in the path sent upstream: a request
/// cannot add a query of its own to it (S3's `?versionId=`, `?acl`).
#[tokio::test]
async fn a_question_mark_in_a_name_is_not_a_query_upstream() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(uri.to_string());
            "log"
        }
    });
    let upstreams = upstreams_serving(app).await;
    let key = "log/5g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-x?versionId=abc";
    assert!(upstreams.get(key, None).await.unwrap().is_some());
    assert_eq!(upstreams.head(key).await.unwrap(), Some(3));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for uri in seen {
        assert_eq!(
            uri,
            "/log/5g5d4v2ahmn1f7k9jcs2cns6ivf5gmpa-x%3FversionId=abc"
        );
    }
}

/// An upstream URL may carry credentials (`https://user:token@host`, a private cellar used as
/// an upstream): they are sent, as Basic auth, and never shown: not in `/status`, not in the
/// metrics' labels, not in the failures logged.
#[tokio::test]
async fn credentials_in_an_upstream_url_are_used_and_never_shown() {
    let logs = crate::test_logs::capture();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |headers: HeaderMap| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(
                headers
                    .get(header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_owned()),
            );
            StatusCode::INTERNAL_SERVER_ERROR
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let upstreams = upstreams_at(format!("http://reader:S3CRET-TOKEN@{addr}"));
    let h: StorePathHash = FIRST.parse().unwrap();
    for _ in 0..FAILURES_IN_A_ROW {
        assert!(upstreams.narinfo(h).await.1);
    }
    // "reader:S3CRET-TOKEN", as Basic auth.
    let basic = Some("Basic cmVhZGVyOlMzQ1JFVC1UT0tFTg==".to_owned());
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec![basic; FAILURES_IN_A_ROW as usize]
    );
    let shown = format!("{:?}", upstreams.health());
    assert!(shown.contains(&format!("http://{addr}")), "{shown}");
    let metrics = crate::metrics::render(&crate::metrics::Now::default());
    assert!(metrics.contains(&format!("http://{addr}")), "{metrics}");
    let logged = logs.text();
    assert!(logged.contains("upstream unavailable"), "{logged}");
    for text in [shown, metrics, logged] {
        assert!(
            !text.contains("S3CRET") && !text.contains("reader"),
            "{text}"
        );
    }
    // A connection refused: the failure shown names no URL.
    let upstreams = upstreams_at("http://reader:S3CRET-TOKEN@127.0.0.1:9".into());
    assert!(upstreams.get("log/x", None).await.is_err());
    let u = &upstreams.list[0];
    let e = upstreams
        .send(u, upstreams.client.get(url(u, "log/x")), true)
        .await
        .err()
        .map(|f| f.to_string())
        .unwrap_or_default();
    assert!(!e.is_empty() && !e.contains("S3CRET"), "{e}");
    assert_eq!(
        without_credentials("https://cache.example.org"),
        "https://cache.example.org"
    );
    assert_eq!(
        without_credentials("https://a:b@cache.example.org/x"),
        "https://cache.example.org/x"
    );
}

/// A narinfo for `path` whose NAR is `nar/<file>`, signed by `key`.
fn signed_narinfo(key: &crate::nix::SecretKey, path: &str, file: &str) -> String {
    let text = format!(
        "StorePath: /nix/store/{path}\nURL: nar/{file}\nCompression: none\n\
         NarHash: {}\nNarSize: 10\nReferences: \n",
        crate::nix::Sha256::digest(b"0123456789")
    );
    let mut info = NarInfo::parse(&text, "/nix/store").unwrap();
    info.sign(key, "/nix/store");
    info.render("/nix/store")
}

/// One upstream, trusted by `key`, serving `narinfo` as [`FIRST`]'s.
async fn serving_first_narinfo(narinfo: String, key: crate::nix::PublicKey) -> Upstreams {
    let app = axum::Router::new().route(
        &format!("/{FIRST}.narinfo"),
        axum::routing::get(move || async move { narinfo }),
    );
    let config = UpstreamConfig {
        url: serve(app).await,
        public_keys: vec![key],
        timeout: Duration::from_secs(5),
        mirror: false,
    };
    Upstreams::new(&[config], "/nix/store").unwrap()
}

/// Serves `app` on a port of its own; its URL.
async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

const FIRST: &str = "6bxnj2gfflqa529lddzh3zhcn45nn86r";
const SECOND: &str = "7bxnj2gfflqa529lddzh3zhcn45nn86r";
const SECOND_NAR: &str = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s.nar";

/// Two upstreams, in this order: the first holds the narinfo of [`FIRST`] and fails every NAR
/// request (as nix-serve does for a NAR name not its own), counting them; the second holds
/// [`SECOND`] and its NAR [`SECOND_NAR`].
async fn two_upstreams(first_nar_requests: Arc<std::sync::atomic::AtomicUsize>) -> Upstreams {
    let k1 = crate::nix::SecretKey::generate("first-1").unwrap();
    let k2 = crate::nix::SecretKey::generate("second-1").unwrap();
    let first = signed_narinfo(
        &k1,
        &format!("{FIRST}-a"),
        "0mz5j6wnmb1kvqbwdv1w3yyr5pahfrwsnsyk2zq4ff1qd6q6bz6j.nar",
    );
    let app1 = axum::Router::new()
        .route(
            &format!("/{FIRST}.narinfo"),
            axum::routing::get(move || async move { first }),
        )
        .route(
            "/nar/{file}",
            axum::routing::get(move || {
                first_nar_requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { StatusCode::INTERNAL_SERVER_ERROR }
            }),
        );
    let second = signed_narinfo(&k2, &format!("{SECOND}-b"), SECOND_NAR);
    let app2 = axum::Router::new()
        .route(
            &format!("/{SECOND}.narinfo"),
            axum::routing::get(move || async move { second }),
        )
        .route(
            &format!("/nar/{SECOND_NAR}"),
            axum::routing::get(|| async { "0123456789" }),
        );
    let configs =
        [(serve(app1).await, k1), (serve(app2).await, k2)].map(|(url, k)| UpstreamConfig {
            url,
            public_keys: vec![k.public()],
            timeout: Duration::from_secs(5),
            mirror: false,
        });
    Upstreams::new(&configs, "/nix/store").unwrap()
}

/// A NAR is asked of the upstream whose narinfo named it, not of every upstream in order: an
/// upstream listed before it is not asked (it could answer with another NAR of that name), and
/// its refusal does not count against it.
#[tokio::test]
async fn a_nar_is_asked_of_the_upstream_whose_narinfo_named_it() {
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let upstreams = two_upstreams(asked.clone()).await;
    let second: StorePathHash = SECOND.parse().unwrap();
    assert!(upstreams.narinfo(second).await.0.is_some());
    let key = format!("nar/{SECOND_NAR}");
    for _ in 0..FAILURES_IN_A_ROW {
        let obj = upstreams.get(&key, None).await.unwrap().unwrap();
        let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
        assert_eq!(chunks.concat(), b"0123456789");
        assert_eq!(upstreams.head(&key).await.unwrap(), Some(10));
    }
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0);
    // A name no narinfo here named (a client that kept the narinfo, another replica's) goes
    // to each upstream in order.
    let other = "nar/0zw2p0wavbk0nx2hchxbgiv9h5dv1bd7cbh1lfpv3qzcsm5dfnlj.nar";
    assert!(upstreams.get(other, None).await.is_err());
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// One failed request (a slow NAR part, one of many prefetches) does not make an upstream
/// skipped: its narinfos are still found. Only failures in a row do.
#[tokio::test]
async fn one_failure_does_not_make_an_upstream_skipped() {
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let upstreams = two_upstreams(asked.clone()).await;
    let first: StorePathHash = FIRST.parse().unwrap();
    let unknown = "nar/0zw2p0wavbk0nx2hchxbgiv9h5dv1bd7cbh1lfpv3qzcsm5dfnlj.nar";
    routed_to_first(&upstreams, unknown).await;
    for _ in 0..3 {
        // A failure, then an answer: never three in a row.
        assert!(upstreams.get(unknown, None).await.is_err());
        let (found, unsure) = upstreams.narinfo(first).await;
        assert!(found.is_some() && !unsure);
    }
    assert!(!upstreams.list[0].down.is_active());
    for _ in 0..FAILURES_IN_A_ROW {
        assert!(upstreams.get(unknown, None).await.is_err());
    }
    assert!(upstreams.list[0].down.is_active());
    // Skipped now: a miss, and one to remember for a while (not asked, so nothing failed).
    let (found, unsure) = upstreams.narinfo(first).await;
    assert!(found.is_none() && !unsure);
    // An upload relying on it is asked to come back, though.
    assert!(matches!(
        upstreams.path_of(first).await,
        Err(StoreError::UpstreamDown(_))
    ));
}

/// Requests under way together that fail together (a burst of prefetches, each waiting on one
/// overloaded upstream) are one failure, not enough to make the upstream skipped: the client's
/// own next request still asks it. Failures one after another still are.
#[tokio::test]
async fn failures_of_a_burst_count_as_one() {
    const BURST: usize = 8;
    let barrier = Arc::new(tokio::sync::Barrier::new(BURST));
    let app = axum::Router::new().route(
        "/{file}",
        axum::routing::get(move || {
            let barrier = barrier.clone();
            async move {
                // Every request of the burst has been sent before any of them is answered.
                barrier.wait().await;
                StatusCode::SERVICE_UNAVAILABLE
            }
        }),
    );
    let upstreams = Arc::new(upstreams_serving(app).await);
    let h: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
    let burst: Vec<_> = (0..BURST)
        .map(|_| {
            let upstreams = upstreams.clone();
            tokio::spawn(async move { upstreams.path_of(h).await })
        })
        .collect();
    for r in futures::future::join_all(burst).await {
        assert!(matches!(r.unwrap(), Err(StoreError::UpstreamDown(_))));
    }
    assert!(
        !upstreams.list[0].down.is_active(),
        "{BURST} failures at once are one failure in a row"
    );
    // Two more bursts, each after the one before failed: three failures in a row.
    for _ in 1..FAILURES_IN_A_ROW {
        let burst: Vec<_> = (0..BURST)
            .map(|_| {
                let upstreams = upstreams.clone();
                tokio::spawn(async move { upstreams.path_of(h).await })
            })
            .collect();
        futures::future::join_all(burst).await;
    }
    assert!(
        upstreams.list[0].down.is_active(),
        "the upstream is skipped"
    );
}

/// Redirects an upstream sends are followed to where NARs are kept (attic to its bucket), but
/// not from https to http, not to link-local addresses (cloud metadata services), and not from
/// a public upstream to a loopback or private address: what they lead to is served to anyone.
#[test]
fn redirects_that_would_reach_inside_are_refused() {
    let u = |s: &str| reqwest::Url::parse(s).unwrap();
    let public = u("https://cache.example.org/nar/x.nar");
    for ok in [
        "https://bucket.s3.example.com/x",
        "https://cache.example.org/other",
    ] {
        assert_eq!(redirect_refused(&public, &u(ok)), None, "{ok}");
    }
    for refused in [
        "http://bucket.s3.example.com/x",
        "https://169.254.169.254/latest/meta-data/",
        "https://127.0.0.1/x",
        "https://localhost/x",
        "https://10.1.2.3/x",
        "https://192.168.1.5/x",
        "https://[::1]/x",
        "https://[fd00::1]/x",
        "https://[fe80::1]/x",
        "https://[::ffff:127.0.0.1]/x",
        "https://0.0.0.0/x",
        "http://100.100.100.200/latest/meta-data/",
        "https://100.64.1.2/x",
        "https://nas/x",
        "https://minio.lan/x",
        "https://metadata.google.internal/x",
        "file:///etc/passwd",
    ] {
        assert!(
            redirect_refused(&public, &u(refused)).is_some(),
            "{refused}"
        );
    }
    // A homelab upstream may send cellar to its bucket next to it, never to link-local.
    let lan = u("http://192.168.1.5:8080/nar/x.nar");
    assert_eq!(
        redirect_refused(&lan, &u("http://192.168.1.6:9000/b/x")),
        None
    );
    assert_eq!(
        redirect_refused(&lan, &u("http://127.0.0.1:9000/b/x")),
        None
    );
    assert!(redirect_refused(&lan, &u("http://169.254.169.254/")).is_some());
    assert!(redirect_refused(&lan, &u("http://[fd00:ec2::254]/")).is_some());
    // A homelab upstream known by a local name, its bucket by address.
    for by_name in [
        "http://attic.lan:8080/x",
        "http://nas:5000/x",
        "https://cache.home.arpa/x",
    ] {
        assert_eq!(
            redirect_refused(&u(by_name), &u("http://192.168.1.6:9000/b/x")),
            None,
            "{by_name}"
        );
    }
}

/// The redirect rule is the client's: an upstream on a public address redirecting cellar to a
/// loopback one (where a metadata service or an admin port may listen) fails as a request.
/// The log says why and where to.
#[tokio::test]
async fn a_redirect_inside_is_not_followed() {
    let logs = crate::test_logs::capture();
    let secret = serve(axum::Router::new().fallback(|| async { "secret" })).await;
    let to = format!("{secret}/secret");
    // The upstream is reached by a name that reads as public; the redirect names 127.0.0.1.
    let app = axum::Router::new().fallback(move || {
        let to = to.clone();
        async move { axum::response::Redirect::temporary(&to) }
    });
    let url = serve(app).await.replace("127.0.0.1", "cache.test");
    let port = url.rsplit(':').next().unwrap().to_owned();
    let mut upstreams = upstreams_at(url);
    // The client's own policy, on a client that can reach "cache.test".
    upstreams.client = Upstreams::client_builder(Duration::from_secs(5))
        .resolve("cache.test", format!("127.0.0.1:{port}").parse().unwrap())
        .build()
        .unwrap();
    // Not followed, and not an outage: a miss of that object; the upstream stays in use.
    for _ in 0..FAILURES_IN_A_ROW {
        assert!(matches!(upstreams.get("log/x", None).await, Ok(None)));
    }
    assert!(!upstreams.list[0].down.is_active());
    let logged = logs.text();
    let origin = secret.trim_end_matches('/');
    assert!(
        logged.contains(&format!(
            "redirect from a public upstream to a loopback or private address: {origin}"
        )),
        "{logged}"
    );
}

/// An upstream that asks for credentials (a private cache whose token in the URL is wrong) is
/// failing, not missing every path: after failures in a row it is reported down and logged.
#[tokio::test]
async fn an_upstream_refusing_its_credentials_is_failing_not_a_miss() {
    let logs = crate::test_logs::capture();
    let app = axum::Router::new().fallback(|| async { StatusCode::UNAUTHORIZED });
    let upstreams = upstreams_at(serve(app).await);
    let h: StorePathHash = FIRST.parse().unwrap();
    for _ in 0..FAILURES_IN_A_ROW {
        let (found, failed) = upstreams.narinfo(h).await;
        assert!(found.is_none() && failed);
    }
    assert!(upstreams.list[0].down.is_active());
    let logged = logs.text();
    assert!(logged.contains("401"), "{logged}");
}

/// The requests to the first of `u` counted with `result` (the metrics are the process's).
fn requests_counted(u: &Upstreams, result: &'static str) -> u64 {
    crate::metrics::get()
        .upstream_requests
        .get_or_create(&crate::metrics::UpstreamLabels {
            upstream: u.list[0].name.clone(),
            result,
        })
        .get()
}

/// A 403 from an upstream whose URL holds credentials is their refusal (a private cellar
/// answers a token that matches none so): a failure, counted as `unauthorized`, which
/// `verify --repair` takes for an upstream it could not ask. Without credentials it is a miss
/// (S3 answers it for a key missing to a reader that may not list).
#[tokio::test]
async fn a_403_is_a_refusal_of_credentials_only_when_the_url_holds_some() {
    let h: StorePathHash = FIRST.parse().unwrap();
    let app = axum::Router::new().fallback(|| async { StatusCode::FORBIDDEN });
    let url = serve(app).await;
    let with = upstreams_at(url.replace("http://", "http://cellar:cellar_wrong@"));
    let before = requests_counted(&with, "unauthorized");
    for _ in 0..FAILURES_IN_A_ROW {
        let (found, failed) = with.narinfo(h).await;
        assert!(found.is_none() && failed);
    }
    assert!(with.list[0].down.is_active());
    assert_eq!(
        requests_counted(&with, "unauthorized") - before,
        FAILURES_IN_A_ROW as u64
    );
    let without = upstreams_at(url.clone());
    let before = requests_counted(&without, "not_found");
    for _ in 0..FAILURES_IN_A_ROW {
        let (found, failed) = without.narinfo(h).await;
        assert!(found.is_none() && !failed);
    }
    assert!(!without.list[0].down.is_active());
    assert_eq!(
        requests_counted(&without, "not_found") - before,
        FAILURES_IN_A_ROW as u64
    );
    // A 403 from where the upstream redirected (a bucket behind a presigned URL) is not the
    // upstream refusing its credentials: a miss.
    let bucket = url.clone();
    let redirecting = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let to = format!("{bucket}{uri}");
        async move { axum::response::Redirect::temporary(&to) }
    });
    let front = serve(redirecting).await;
    let redirected = upstreams_at(front.replace("http://", "http://cellar:cellar_right@"));
    for _ in 0..FAILURES_IN_A_ROW {
        let (found, failed) = redirected.narinfo(h).await;
        assert!(found.is_none() && !failed);
    }
    assert!(!redirected.list[0].down.is_active());
}

/// Each failure is counted as what it is: a refusal of the credentials, throttling, the
/// upstream's own timeout and its errors apart (an expired token is not a 5xx to chase).
#[tokio::test]
async fn upstream_failures_are_counted_by_what_they_are() {
    let h: StorePathHash = FIRST.parse().unwrap();
    for (status, result) in [
        (StatusCode::UNAUTHORIZED, "unauthorized"),
        (StatusCode::TOO_MANY_REQUESTS, "throttled"),
        (StatusCode::REQUEST_TIMEOUT, "timeout"),
        (StatusCode::BAD_GATEWAY, "server_error"),
        (StatusCode::NOT_FOUND, "not_found"),
    ] {
        let app = axum::Router::new().fallback(move || async move { status });
        let url = serve(app).await;
        let upstreams = upstreams_at(url.clone());
        // The counters are the process's: another test's upstream may have had this URL (a
        // port used again) and counted under it before.
        let counted = |r: &'static str| requests_counted(&upstreams, r);
        let before = (counted(result), counted("server_error"));
        let _ = upstreams.narinfo(h).await;
        assert_eq!(counted(result) - before.0, 1, "{status}");
        if result != "server_error" {
            assert_eq!(counted("server_error"), before.1, "{status}");
        }
    }
}

/// Once full, the map of NAR names keeps the newest names (the least recently used go).
#[tokio::test]
async fn the_routes_keep_new_names_once_full() {
    let r = routes(2);
    for k in ["a", "b", "c"] {
        r.insert(k.to_owned(), 0).await;
        r.run_pending_tasks().await;
    }
    assert!(r.get("c").await.is_some(), "a new name was refused");
    assert_eq!(r.entry_count(), 2);
}

/// The upstream whose narinfo named a NAR is asked first: its miss is the answer (the others
/// are not asked), but when it cannot answer (failing, skipped) the others are.
#[tokio::test]
async fn a_routed_nar_falls_back_to_the_others_only_when_its_upstream_cannot_answer() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let key = crate::nix::SecretKey::generate("first-1").unwrap();
    let info = signed_narinfo(&key, &format!("{FIRST}-a"), SECOND_NAR);
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let first = axum::Router::new()
        .route(
            &format!("/{FIRST}.narinfo"),
            axum::routing::get(move || async move { info }),
        )
        .route(
            "/nar/{file}",
            axum::routing::get(move || {
                let status = if f.load(Ordering::SeqCst) {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NOT_FOUND
                };
                async move { status }
            }),
        );
    let asked = Arc::new(AtomicUsize::new(0));
    let a = asked.clone();
    let second = axum::Router::new().route(
        &format!("/nar/{SECOND_NAR}"),
        axum::routing::get(move || {
            a.fetch_add(1, Ordering::SeqCst);
            async { "0123456789" }
        }),
    );
    let configs = [serve(first).await, serve(second).await].map(|url| UpstreamConfig {
        url,
        public_keys: vec![key.public()],
        timeout: Duration::from_secs(5),
        mirror: false,
    });
    let upstreams = Upstreams::new(&configs, "/nix/store").unwrap();
    assert!(upstreams.narinfo(FIRST.parse().unwrap()).await.0.is_some());
    let nar = format!("nar/{SECOND_NAR}");
    assert!(upstreams.get(&nar, None).await.unwrap().is_none());
    assert_eq!(upstreams.head(&nar).await.unwrap(), None);
    assert_eq!(
        asked.load(Ordering::SeqCst),
        0,
        "asked beyond the routed upstream's miss"
    );
    failing.store(true, Ordering::SeqCst);
    let obj = upstreams.get(&nar, None).await.unwrap().unwrap();
    let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), b"0123456789");
    assert_eq!(asked.load(Ordering::SeqCst), 1);
}

/// The later parts of an object an upstream served from its first byte go to the upstreams
/// first, not each to the store for a miss; an object the store served stays the store's.
#[tokio::test]
async fn later_parts_of_an_upstream_object_skip_the_store() {
    let mem = Arc::new(crate::store::memory::MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let both = WithUpstreams::new(store, Arc::new(plain_upstreams().await));
    let part = |start| {
        Some(ByteRange::From {
            start,
            end: Some(start + 1),
        })
    };
    let read = |key: &'static str, range| {
        let both = &both;
        async move {
            let obj = both.get(key, range).await.unwrap().unwrap();
            let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
            chunks.concat()
        }
    };
    // This upstream sends a range from the first byte as the whole object.
    assert_eq!(read("nar/whole.nar", part(0)).await, b"0123456789");
    assert_eq!(mem.gets_under("nar/"), 1);
    assert_eq!(read("nar/whole.nar", part(2)).await, b"23");
    assert_eq!(read("nar/whole.nar", part(4)).await, b"45");
    assert_eq!(
        mem.gets_under("nar/"),
        1,
        "the store was asked for later parts"
    );
    // Now in the store (mirrored): read from there again from its first byte on.
    mem.insert("nar/whole.nar", b"0123456789".to_vec());
    assert_eq!(read("nar/whole.nar", part(0)).await, b"01");
    assert_eq!(read("nar/whole.nar", part(2)).await, b"23");
    assert_eq!(mem.gets_under("nar/"), 3);
}

/// An upstream narinfo refused is logged with why it was refused, so that an operator can tell
/// a wrong `public_keys` entry from an upstream sending something else, and counted by
/// reason: it was counted only as an answer, so an upstream whose every narinfo is refused
/// looked healthy in the metrics (walk).
#[tokio::test]
async fn a_refused_narinfo_is_logged_with_the_reason() {
    let logs = crate::test_logs::capture();
    let trusted = crate::nix::SecretKey::generate("trusted-1").unwrap();
    let other = crate::nix::SecretKey::generate("other-1").unwrap();
    let info = signed_narinfo(&other, &format!("{FIRST}-a"), SECOND_NAR);
    let upstreams = serving_first_narinfo(info, trusted.public()).await;
    let name = upstreams.list[0].name.clone();
    let (found, failed) = upstreams.narinfo(FIRST.parse().unwrap()).await;
    assert!(found.is_none() && !failed);
    assert_eq!(
        crate::metrics::upstream_refusals(&name, "narinfo", "unsigned"),
        1
    );
    let logged = logs.text();
    assert!(logged.contains("upstream narinfo refused"), "{logged}");
    assert!(
        logged.contains("no valid signature by the upstream's keys"),
        "{logged}"
    );
}

/// An upstream that redirects `/log/<n>` to `/log/<n - 1>`, and serves `/log/0`.
async fn redirecting_upstream(Path(n): Path<usize>) -> Response {
    match n {
        0 => "found".into_response(),
        n => axum::response::Redirect::temporary(&format!("/log/{}", n - 1)).into_response(),
    }
}

/// An upstream may redirect up to [`MAX_REDIRECTS`] times in a row (attic to a bucket, a
/// bucket to its region) and what it leads to is served; one more is a miss of that object, not
/// an outage, and not followed on forever.
#[tokio::test]
async fn exactly_the_allowed_number_of_redirects_is_followed() {
    let app = axum::Router::new().route("/log/{n}", axum::routing::get(redirecting_upstream));
    let upstreams = upstreams_serving(app).await;
    let obj = upstreams
        .get(&format!("log/{MAX_REDIRECTS}"), None)
        .await
        .unwrap()
        .expect("served after the allowed redirects");
    let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), b"found");
    assert!(matches!(
        upstreams
            .get(&format!("log/{}", MAX_REDIRECTS + 1), None)
            .await,
        Ok(None)
    ));
    assert!(!upstreams.list[0].down.is_active());
}

/// Without upstreams configured there is nothing to fall through to (the store is served
/// alone, `/status` lists none); with one there is.
#[test]
fn upstreams_are_empty_only_when_none_is_configured() {
    assert!(Upstreams::new(&[], "/nix/store").unwrap().is_empty());
    assert!(!upstreams_at("http://127.0.0.1:9".into()).is_empty());
}

/// A NAR no narinfo here named (asked by a client that kept the narinfo, or of another
/// replica) is asked of every upstream in order: the first one's 404 is not the answer when the
/// next has it. And a NAR named after its bytes is not tied to the upstream that served it: once that one has
/// lost it, the upstream listed first that has it serves it (a route kept for it would make
/// the served one's miss the answer).
#[tokio::test]
async fn an_unrouted_nar_the_first_upstream_lacks_is_found_at_the_next() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Until `moved`, the second upstream has the NAR; after, the first has it instead.
    let moved = Arc::new(AtomicBool::new(false));
    let holder = |when_moved: bool| {
        let moved = moved.clone();
        axum::Router::new().route(
            &format!("/nar/{SECOND_NAR}"),
            axum::routing::get(move || {
                let has = moved.load(Ordering::SeqCst) == when_moved;
                async move {
                    if has {
                        b"0123456789".to_vec().into_response()
                    } else {
                        StatusCode::NOT_FOUND.into_response()
                    }
                }
            }),
        )
    };
    let configs =
        [serve(holder(true)).await, serve(holder(false)).await].map(|url| UpstreamConfig {
            url,
            public_keys: Vec::new(),
            timeout: Duration::from_secs(5),
            mirror: false,
        });
    let upstreams = Upstreams::new(&configs, "/nix/store").unwrap();
    let nar = format!("nar/{SECOND_NAR}");
    let read = || async {
        let obj = upstreams.get(&nar, None).await.unwrap().expect("served");
        let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
        chunks.concat()
    };
    assert_eq!(read().await, b"0123456789");
    assert_eq!(upstreams.head(&nar).await.unwrap(), Some(10));
    moved.store(true, Ordering::SeqCst);
    assert_eq!(read().await, b"0123456789");
    assert_eq!(upstreams.head(&nar).await.unwrap(), Some(10));
}

/// A part an upstream streams without a `Content-Length` has the length its `Content-Range`
/// says (what the client is told, and what a fill expects to read).
#[tokio::test]
async fn a_part_without_a_length_has_the_length_of_its_range() {
    let app = axum::Router::new().route(
        "/nar/{file}",
        axum::routing::get(|| async {
            let part = futures::stream::iter([Ok::<_, io::Error>(b"2345".to_vec())]);
            (
                StatusCode::PARTIAL_CONTENT,
                [(header::CONTENT_RANGE, "bytes 2-5/10")],
                axum::body::Body::from_stream(part),
            )
        }),
    );
    let upstreams = upstreams_serving(app).await;
    let range = Some(ByteRange::From {
        start: 2,
        end: Some(5),
    });
    let obj = upstreams.get("nar/part.nar", range).await.unwrap().unwrap();
    assert_eq!(obj.length, Some(4));
    assert_eq!(
        obj.range,
        Some(ContentRange {
            start: 2,
            end: 5,
            total: 10
        })
    );
    let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), b"2345");
}

/// Where a redirect may lead, by how its host is spelled: each range of addresses on both
/// sides of its edges (link-local and metadata addresses never, loopback, private, shared
/// 100.64/10 and unique local addresses only from a local upstream, the rest public).
#[test]
fn hosts_are_classified_at_the_edges_of_each_range() {
    let cases = [
        // Names.
        ("localhost", Reach::Local),
        ("LOCALHOST.", Reach::Local),
        ("app.localhost", Reach::Local),
        ("nas", Reach::Local),
        ("minio.lan", Reach::Local),
        ("printer.local", Reach::Local),
        ("cache.home.arpa", Reach::Local),
        ("metadata.google.internal", Reach::Local),
        ("box.localdomain", Reach::Local),
        ("cache.example.org", Reach::Public),
        ("localhost.example.org", Reach::Public),
        ("a.notlan", Reach::Public),
        // IPv4.
        ("8.8.8.8", Reach::Public),
        ("0.0.0.0", Reach::Never),
        ("255.255.255.255", Reach::Never),
        ("169.253.255.255", Reach::Public),
        ("169.254.0.0", Reach::Never),
        ("169.254.169.254", Reach::Never),
        ("169.254.255.255", Reach::Never),
        ("169.255.0.0", Reach::Public),
        ("100.100.100.200", Reach::Never),
        ("100.100.100.201", Reach::Local),
        ("127.0.0.1", Reach::Local),
        ("127.255.255.254", Reach::Local),
        ("9.255.255.255", Reach::Public),
        ("10.0.0.1", Reach::Local),
        ("11.0.0.1", Reach::Public),
        ("172.15.255.255", Reach::Public),
        ("172.16.0.1", Reach::Local),
        ("172.31.255.255", Reach::Local),
        ("172.32.0.1", Reach::Public),
        ("192.168.1.1", Reach::Local),
        ("192.169.0.1", Reach::Public),
        ("100.63.255.255", Reach::Public),
        ("100.64.0.0", Reach::Local),
        ("100.127.255.255", Reach::Local),
        ("100.128.0.0", Reach::Public),
        ("99.64.0.1", Reach::Public),
        ("101.64.0.1", Reach::Public),
        // IPv6.
        ("[::]", Reach::Never),
        ("[fe7f::1]", Reach::Public),
        ("[fe80::1]", Reach::Never),
        ("[febf:ffff::1]", Reach::Never),
        ("[fec0::1]", Reach::Public),
        ("[fd00:ec2::254]", Reach::Never),
        ("[fd00:ec2::253]", Reach::Local),
        ("[::1]", Reach::Local),
        ("[::2]", Reach::Public),
        ("[fbff::1]", Reach::Public),
        ("[fc00::1]", Reach::Local),
        ("[fdff:ffff::1]", Reach::Local),
        ("[fe00::1]", Reach::Public),
        ("[2001:db8::1]", Reach::Public),
        ("[::ffff:10.0.0.1]", Reach::Local),
        ("[::ffff:169.254.169.254]", Reach::Never),
        ("[::ffff:8.8.8.8]", Reach::Public),
    ];
    for (host, expected) in cases {
        let u = reqwest::Url::parse(&format!("http://{host}/x")).unwrap();
        assert_eq!(reach(&u), expected, "{host}");
    }
}

/// Credentials in an upstream URL are taken out of what is shown, whichever of the user name
/// and the password carries them; a URL without any is shown as configured.
#[test]
fn credentials_are_taken_out_of_every_url_that_holds_them() {
    for (configured, shown) in [
        (
            "https://reader:token@cache.example.org/x",
            "https://cache.example.org/x",
        ),
        // A token as the user name alone (as some hosts take it).
        (
            "https://TOKEN@cache.example.org/x",
            "https://cache.example.org/x",
        ),
        // A password alone.
        (
            "https://:TOKEN@cache.example.org/x",
            "https://cache.example.org/x",
        ),
        // No credentials: as spelled in the configuration.
        (
            "https://Cache.Example.org:443/nix-cache/",
            "https://Cache.Example.org:443/nix-cache/",
        ),
    ] {
        assert_eq!(without_credentials(configured), shown, "{configured}");
    }
}

/// A response of `body`, its length said (`sized`) or streamed in `chunks` without one.
fn response(body: &[u8], sized: bool, chunks: usize) -> reqwest::Response {
    let body = if sized {
        reqwest::Body::from(body.to_vec())
    } else {
        let parts: Vec<Result<Vec<u8>, io::Error>> = body
            .chunks(body.len().div_ceil(chunks).max(1))
            .map(|c| Ok(c.to_vec()))
            .collect();
        reqwest::Body::wrap_stream(futures::stream::iter(parts))
    };
    reqwest::Response::from(axum::http::Response::new(body))
}

/// A narinfo body is read up to its cap and no further: one of exactly the cap is accepted
/// whether its length is said or it is streamed in parts, one byte more is refused either way.
#[tokio::test]
async fn a_body_is_read_up_to_exactly_its_cap() {
    const CAP: usize = 10;
    let read = |body: Vec<u8>, sized: bool, chunks: usize| async move {
        match read_capped(response(&body, sized, chunks), CAP).await {
            Ok(b) => Some(b.len()),
            Err(Refusal::TooLarge(cap)) => {
                assert_eq!(cap, CAP);
                None
            }
            Err(e) => panic!("{e}"),
        }
    };
    // Its length said, or streamed in one part, two, five.
    for (sized, chunks) in [(true, 1), (false, 1), (false, 2), (false, 5)] {
        let how = format!("sized: {sized}, chunks: {chunks}");
        assert_eq!(
            read(vec![7; CAP - 1], sized, chunks).await,
            Some(CAP - 1),
            "{how}"
        );
        assert_eq!(read(vec![7; CAP], sized, chunks).await, Some(CAP), "{how}");
        assert_eq!(read(vec![7; CAP + 1], sized, chunks).await, None, "{how}");
    }
    // The last part is the one that goes over.
    let over = [7u8; CAP + 1];
    let parts: Vec<Result<Vec<u8>, io::Error>> = vec![Ok(over[..CAP].to_vec()), Ok(vec![7])];
    let res = reqwest::Response::from(axum::http::Response::new(reqwest::Body::wrap_stream(
        futures::stream::iter(parts),
    )));
    assert!(matches!(
        read_capped(res, CAP).await,
        Err(Refusal::TooLarge(CAP))
    ));
}

/// An upstream serving `nar/whole.nar` whole (ranges ignored), counting the requests, or
/// failing them (500) while `failing` is set.
async fn switchable_upstream(
    asked: Arc<std::sync::atomic::AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
) -> Upstreams {
    use std::sync::atomic::Ordering;
    let app = axum::Router::new().route(
        "/nar/whole.nar",
        axum::routing::get(move || {
            asked.fetch_add(1, Ordering::SeqCst);
            let failing = failing.load(Ordering::SeqCst);
            async move {
                if failing {
                    StatusCode::INTERNAL_SERVER_ERROR.into_response()
                } else {
                    b"0123456789".to_vec().into_response()
                }
            }
        }),
    );
    upstreams_serving(app).await
}

/// A later part of an object an upstream served from its first byte is asked of the upstream
/// first; when it fails, the store's copy (mirrored since) is served rather than a 503.
#[tokio::test]
async fn a_later_part_the_upstream_fails_is_served_from_the_store() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let asked = Arc::new(AtomicUsize::new(0));
    let failing = Arc::new(AtomicBool::new(false));
    let mem = Arc::new(crate::store::memory::MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let upstreams = switchable_upstream(asked.clone(), failing.clone()).await;
    let both = WithUpstreams::new(store, Arc::new(upstreams));
    let part = |start| {
        Some(ByteRange::From {
            start,
            end: Some(start + 1),
        })
    };
    let obj = both.get("nar/whole.nar", part(0)).await.unwrap().unwrap();
    let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), b"0123456789");
    mem.insert("nar/whole.nar", b"0123456789".to_vec());
    failing.store(true, Ordering::SeqCst);
    let obj = both
        .get("nar/whole.nar", part(2))
        .await
        .unwrap()
        .expect("served from the store");
    let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), b"23");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        2,
        "the upstream was asked first"
    );
    // Neither has it: the upstream's failure, told as such (not the store's).
    mem.remove("nar/whole.nar");
    assert!(matches!(
        both.get("nar/whole.nar", part(4)).await,
        Err(StoreError::UpstreamDown(_))
    ));
}

/// Only an object an upstream served from its first byte sends its later parts to the
/// upstreams first: a later part alone (a client resuming) served by an upstream leaves the
/// store asked first for the next, and a copy there (mirrored since) is served from it.
#[tokio::test]
async fn a_later_part_alone_from_an_upstream_leaves_the_store_asked_first() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let asked = Arc::new(AtomicUsize::new(0));
    let mem = Arc::new(crate::store::memory::MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let upstreams = switchable_upstream(asked.clone(), Arc::new(AtomicBool::new(false))).await;
    let both = WithUpstreams::new(store, Arc::new(upstreams));
    let part = |start| {
        Some(ByteRange::From {
            start,
            end: Some(start + 1),
        })
    };
    let obj = both.get("nar/whole.nar", part(2)).await.unwrap().unwrap();
    let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), b"23");
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    mem.insert("nar/whole.nar", b"0123456789".to_vec());
    let obj = both.get("nar/whole.nar", part(4)).await.unwrap().unwrap();
    let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), b"45");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        1,
        "the upstream was asked before the store"
    );
}

/// What concerns the cache itself (readiness, staging left behind, deleting, its description)
/// is answered by the store under the upstreams, never by an upstream.
#[tokio::test]
async fn the_store_under_the_upstreams_answers_for_the_cache_itself() {
    let mem = Arc::new(crate::store::memory::MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let both = WithUpstreams::new(store, Arc::new(plain_upstreams().await));
    assert_eq!(both.describe(), "memory:// (+1 upstreams)");
    assert!(both.ping().await.is_ok());
    mem.set_down(true);
    assert!(matches!(both.ping().await, Err(StoreError::Unavailable(_))));
    mem.set_down(false);
    mem.leave_staged("upload-a");
    mem.leave_staged("upload-b");
    let older = Duration::from_secs(3600);
    assert_eq!(
        both.stale_staging(older).await.unwrap(),
        ["upload-a", "upload-b"]
    );
    assert_eq!(both.cleanup_staging(older).await.unwrap(), 2);
    assert!(both.stale_staging(older).await.unwrap().is_empty());
    mem.insert("nar/whole.nar", b"0123456789".to_vec());
    both.delete("nar/whole.nar").await.unwrap();
    assert!(mem.bytes("nar/whole.nar").is_none());
}

/// A HEAD through the upstreams asks the store first, then the upstreams: the size of
/// whichever holds the object, none if neither does, and an upstream that cannot answer
/// makes the miss unknown rather than a 404.
#[tokio::test]
async fn a_head_asks_the_store_then_the_upstreams() {
    let mem = Arc::new(crate::store::memory::MemoryStore::new());
    let store: Arc<dyn Store> = mem.clone();
    let both = WithUpstreams::new(store, Arc::new(plain_upstreams().await));
    mem.insert("nar/mine.nar", b"abc".to_vec());
    assert_eq!(both.head("nar/mine.nar").await.unwrap(), Some(3));
    assert_eq!(both.head("nar/whole.nar").await.unwrap(), Some(10));
    assert_eq!(both.head("nar/nowhere.nar").await.unwrap(), None);
    assert!(matches!(
        both.head("nar/busy.nar").await,
        Err(StoreError::UpstreamDown(_))
    ));
}

/// A NAR named after its store path (attic's names) is the routed upstream's alone: another
/// upstream's NAR of that name may be another build, so when the routed one fails, the
/// answer is that it could not be asked (503), never the other's bytes. One no narinfo routed
/// stays with the upstream that first served a part of it, so a fill's later parts cannot be
/// spliced from another upstream's NAR.
#[tokio::test]
async fn a_nar_named_after_its_store_path_comes_from_one_upstream_only() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let key = crate::nix::SecretKey::generate("first-1").unwrap();
    let file = format!("{SECOND}.nar");
    let info = signed_narinfo(&key, &format!("{FIRST}-a"), &file);
    // Each upstream serves its own bytes under the name, or fails, as the test says.
    let upstream = |byte: u8, failing: Arc<AtomicBool>, asked: Arc<AtomicUsize>| {
        let info = info.clone();
        axum::Router::new()
            .route(
                &format!("/{FIRST}.narinfo"),
                axum::routing::get(move || async move { info }),
            )
            .route(
                "/nar/{file}",
                axum::routing::get(move |headers: HeaderMap| {
                    let (failing, asked) = (failing.clone(), asked.clone());
                    async move {
                        asked.fetch_add(1, Ordering::SeqCst);
                        if failing.load(Ordering::SeqCst) {
                            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
                        }
                        let body = vec![byte; 10];
                        match headers.get(header::RANGE).and_then(|r| r.to_str().ok()) {
                            Some("bytes=0-3") => (
                                StatusCode::PARTIAL_CONTENT,
                                [(header::CONTENT_RANGE, "bytes 0-3/10")],
                                body[..4].to_vec(),
                            )
                                .into_response(),
                            Some("bytes=4-9") => (
                                StatusCode::PARTIAL_CONTENT,
                                [(header::CONTENT_RANGE, "bytes 4-9/10")],
                                body[4..].to_vec(),
                            )
                                .into_response(),
                            _ => body.into_response(),
                        }
                    }
                }),
            )
    };
    let flags = || {
        (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        )
    };
    let ((fail_a, asked_a), (fail_b, asked_b)) = (flags(), flags());
    let urls = [
        serve(upstream(b'a', fail_a.clone(), asked_a.clone())).await,
        serve(upstream(b'b', fail_b.clone(), asked_b.clone())).await,
    ];
    let configs = urls.map(|url| UpstreamConfig {
        url,
        public_keys: vec![key.public()],
        timeout: Duration::from_secs(5),
        mirror: false,
    });
    let nar = format!("nar/{file}");
    let part = |start, end| {
        Some(ByteRange::From {
            start,
            end: Some(end),
        })
    };

    // Routed by the first upstream's narinfo, which then fails: the second is not asked.
    let upstreams = Upstreams::new(&configs, "/nix/store").unwrap();
    assert!(upstreams.narinfo(FIRST.parse().unwrap()).await.0.is_some());
    fail_a.store(true, Ordering::SeqCst);
    assert!(matches!(
        upstreams.get(&nar, None).await,
        Err(StoreError::Unavailable(_))
    ));
    assert_eq!(
        asked_b.load(Ordering::SeqCst),
        0,
        "the other upstream was asked"
    );

    // Not routed: the first part comes from the first upstream that has it (the second,
    // the first failing), and the later part from it again, or not at all.
    let upstreams = Upstreams::new(&configs, "/nix/store").unwrap();
    let first = upstreams.get(&nar, part(0, 3)).await.unwrap().unwrap();
    let bytes: Vec<bytes::Bytes> = first.body.try_collect().await.unwrap();
    assert_eq!(bytes.concat(), b"bbbb");
    fail_a.store(false, Ordering::SeqCst);
    fail_b.store(true, Ordering::SeqCst);
    let asked_before = asked_a.load(Ordering::SeqCst);
    assert!(matches!(
        upstreams.get(&nar, part(4, 9)).await,
        Err(StoreError::Unavailable(_))
    ));
    assert_eq!(
        asked_a.load(Ordering::SeqCst),
        asked_before,
        "the later part was asked of another upstream"
    );
}

/// An upstream bucket whose narinfos Nix wrote with `narinfo-compression` serves them
/// compressed, saying so in `Content-Encoding`: decoded as the store's are (xz, zstd); one
/// in a coding cellar does not decode is refused with that reason, not taken for a narinfo.
#[tokio::test]
async fn an_upstreams_compressed_narinfos_are_decoded() {
    use std::io::Read as _;
    let logs = crate::test_logs::capture();
    let key = crate::nix::SecretKey::generate("bucket-1").unwrap();
    let third = "8bxnj2gfflqa529lddzh3zhcn45nn86r";
    let plain = |h: &str| signed_narinfo(&key, &format!("{h}-a"), SECOND_NAR);
    let mut xz = Vec::new();
    liblzma::read::XzEncoder::new(plain(FIRST).as_bytes(), 6)
        .read_to_end(&mut xz)
        .unwrap();
    let zst = zstd::encode_all(plain(SECOND).as_bytes(), 3).unwrap();
    let lz4 = plain(third).into_bytes();
    let coded = |coding: &'static str, body: Vec<u8>| {
        axum::routing::get(move || async move { ([("content-encoding", coding)], body) })
    };
    let app = axum::Router::new()
        .route(&format!("/{FIRST}.narinfo"), coded("xz", xz))
        .route(&format!("/{SECOND}.narinfo"), coded("zstd", zst))
        .route(&format!("/{third}.narinfo"), coded("lz4", lz4));
    let config = UpstreamConfig {
        url: serve(app).await,
        public_keys: vec![key.public()],
        timeout: Duration::from_secs(5),
        mirror: false,
    };
    let upstreams = Upstreams::new(&[config], "/nix/store").unwrap();
    for h in [FIRST, SECOND] {
        let (found, failed) = upstreams.narinfo(h.parse().unwrap()).await;
        let info = found.map(|f| f.info);
        assert!(
            info.as_ref()
                .is_some_and(|i| i.store_path.to_string().starts_with(h)),
            "{h}: {info:?}"
        );
        assert!(!failed);
    }
    let (found, failed) = upstreams.narinfo(third.parse().unwrap()).await;
    assert!(found.is_none() && !failed);
    let logged = logs.text();
    assert!(logged.contains("which cellar does not decode"), "{logged}");
}

/// Whether an upstream has a path, when it cannot be asked (an upload's reference, verify's
/// look at paths the store lacks), is the upstream's failure, told as such: not a miss, and
/// not the store's failure.
#[tokio::test]
async fn has_is_upstream_down_when_the_upstream_cannot_be_asked() {
    let upstreams = upstreams_at("http://127.0.0.1:9".into());
    assert!(matches!(
        upstreams.path_of(FIRST.parse().unwrap()).await,
        Err(StoreError::UpstreamDown(_))
    ));
}

/// An upstream has a path when it serves a narinfo naming that very path: its hash under
/// another name (an upload's reference, a realisation's output) is not served.
#[tokio::test]
async fn has_is_by_the_whole_name() {
    let key = crate::nix::SecretKey::generate("up-1").unwrap();
    let narinfo = signed_narinfo(&key, &format!("{FIRST}-top"), SECOND_NAR);
    let upstreams = serving_first_narinfo(narinfo, key.public()).await;
    let top: crate::nix::StorePathBaseName = format!("{FIRST}-top").parse().unwrap();
    let other: crate::nix::StorePathBaseName = format!("{FIRST}-other").parse().unwrap();
    assert!(upstreams.has(&top).await.unwrap());
    assert!(!upstreams.has(&other).await.unwrap());
    assert_eq!(
        upstreams.path_of(FIRST.parse().unwrap()).await.unwrap(),
        Some(top)
    );
}

/// No name is connected to at a cloud metadata service's address, whatever its spelling (the
/// redirect guard judges names by spelling only): such addresses are left out of what a name
/// resolves to, and a name with only those fails. Other link-local addresses stay (a NAS on a
/// direct cable).
#[test]
fn names_are_never_connected_to_at_metadata_addresses() {
    let sa = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    for never in [
        "169.254.169.254:0",
        "100.100.100.200:0",
        "[fd00:ec2::254]:0",
        "[::ffff:169.254.169.254]:0",
    ] {
        let r = usable_addresses("instance-data", std::iter::once(sa(never)));
        assert!(
            r.as_ref()
                .is_err_and(|e| e.to_string().contains("metadata service")),
            "{never}: {r:?}"
        );
    }
    let mixed = [
        sa("169.254.169.254:0"),
        sa("10.0.0.1:0"),
        sa("169.254.1.2:0"),
        sa("[fe80::1]:0"),
    ];
    assert_eq!(
        usable_addresses("nas", mixed.into_iter()).unwrap(),
        [sa("10.0.0.1:0"), sa("169.254.1.2:0"), sa("[fe80::1]:0")]
    );
    assert!(usable_addresses("nothing", std::iter::empty()).is_err());
}

/// The upstreams' client resolves names through that filter: an upstream (or a redirect)
/// whose name resolves to a metadata service is never connected to.
#[tokio::test]
async fn the_upstreams_client_never_connects_to_a_metadata_service_by_name() {
    let logs = crate::test_logs::capture();
    let mut upstreams = upstreams_at("http://instance-data:8080".into());
    let fixed = GuardedResolver {
        fixed: Some(vec!["169.254.169.254".parse().unwrap()]),
    };
    upstreams.client = Upstreams::client_builder_with(fixed, Duration::from_secs(5))
        .build()
        .unwrap();
    for _ in 0..FAILURES_IN_A_ROW {
        let e = upstreams.get("log/x", None).await;
        assert!(
            matches!(&e, Err(StoreError::Unavailable(_))),
            "{:?}",
            e.err()
        );
    }
    // The outage is logged with its cause, down to the resolver's.
    let logged = logs.text();
    assert!(logged.contains("metadata service"), "{logged}");
}

/// Upstreams named by a host name are reached through that resolver.
#[tokio::test]
async fn an_upstream_named_by_a_host_name_is_reached() {
    let app = axum::Router::new().route("/log/{drv}", axum::routing::get(|| async { "a log" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let upstreams = upstreams_at(format!("http://localhost:{port}"));
    let obj = upstreams.get("log/x.drv", None).await.unwrap().unwrap();
    let chunks: Vec<bytes::Bytes> = obj.body.try_collect().await.unwrap();
    assert_eq!(chunks.concat(), b"a log");
}

/// An upstream's realisation is taken only signed by one of that upstream's keys, as its
/// narinfos are (Nix 2.8 substitutes through a realisation unchecked, and cellar signs what it
/// serves), and only the output's asked for: one signed by another key, unsigned, in a form
/// whose signatures cellar cannot check, or another output's (signed: Nix does not compare
/// the id it asked for with the one it gets), is that upstream's miss, and the next upstream
/// is asked. The name's hash may be in nix32.
#[tokio::test]
async fn realisations_are_taken_only_signed_by_the_upstreams_keys() {
    const NAME: &str =
        "sha256:15e3c560894cbb27085cf65b5a2ecb18488c999497f4531b6907a7581ce6d527!out.doi";
    let key = format!("realisations/{NAME}");
    let id: crate::nix::RealisationName = NAME.parse().unwrap();
    let realisation_of = |output: &str, out: &str| {
        serde_json::to_vec(&serde_json::json!({
            "dependentRealisations": {},
            "id": format!("sha256:15e3c560894cbb27085cf65b5a2ecb18488c999497f4531b6907a7581ce6d527!{output}"),
            "outPath": out,
            "signatures": [],
        }))
        .unwrap()
    };
    let realisation = |out: &str| realisation_of("out", out);
    let signed_doc = |key: &crate::nix::SecretKey, doc: Vec<u8>| {
        crate::nix::Realisation::parse(&doc)
            .unwrap()
            .signed_with(std::slice::from_ref(key), false)
            .unwrap()
    };
    let signed = |key: &crate::nix::SecretKey, out: &str| signed_doc(key, realisation(out));
    let first = crate::nix::SecretKey::generate("first-1").unwrap();
    let second = crate::nix::SecretKey::generate("second-1").unwrap();
    let forger = crate::nix::SecretKey::generate("first-1").unwrap();
    let good = signed(&second, &format!("{SECOND}-good"));
    let upstream = |body: Vec<u8>, key: &crate::nix::SecretKey| {
        let key = key.public();
        let path = format!("/realisations/{NAME}");
        async move {
            let app =
                axum::Router::new().route(&path, axum::routing::get(move || async move { body }));
            UpstreamConfig {
                url: serve(app).await,
                public_keys: vec![key],
                timeout: Duration::from_secs(5),
                mirror: false,
            }
        }
    };
    let second_up = upstream(good.clone(), &second).await;
    for (refused, why) in [
        (signed(&forger, &format!("{FIRST}-evil")), "another key"),
        (realisation(&format!("{FIRST}-evil")), "unsigned"),
        (
            format!(r#"{{"outPath":"{FIRST}-evil","signatures":[]}}"#).into_bytes(),
            "a form cellar cannot check",
        ),
        (b"{}".to_vec(), "not a realisation"),
        (
            signed_doc(&first, realisation_of("dev", &format!("{FIRST}-evil"))),
            "another output's",
        ),
    ] {
        let first_up = upstream(refused, &first).await;
        let alone = Upstreams::new(std::slice::from_ref(&first_up), "/nix/store").unwrap();
        assert_eq!(alone.realisation(&key, &id).await.unwrap(), None, "{why}");
        let both = Upstreams::new(&[first_up, second_up.clone()], "/nix/store").unwrap();
        assert_eq!(
            both.realisation(&key, &id).await.unwrap().as_deref(),
            Some(&good[..]),
            "{why}"
        );
    }
    let first_up = upstream(signed(&first, &format!("{FIRST}-fine")), &first).await;
    let both = Upstreams::new(&[first_up, second_up], "/nix/store").unwrap();
    let got = both.realisation(&key, &id).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&got).contains("-fine"));
}

/// The store with upstreams removes what its store's open writers staged, as the store
/// itself does (a shutdown asks whichever it holds).
#[tokio::test]
async fn with_upstreams_removes_what_the_stores_writers_staged() {
    let dir = tempfile::tempdir().unwrap();
    let local = Arc::new(crate::store::local::LocalStore::open(dir.path()).unwrap());
    let reads = WithUpstreams::new(local, Arc::new(Upstreams::new(&[], "/nix/store").unwrap()));
    let mut w = reads.writer("nar/x.nar").await.unwrap();
    w.write(bytes::Bytes::from_static(b"half")).await.unwrap();
    assert_eq!(reads.remove_unfinished().await, 1);
}
