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

/// An upstream that cuts a narinfo's body off has failed: an upload relying on it is asked to
/// come back (503), not refused for a reference nobody has, and the upstream is skipped.
#[tokio::test]
async fn a_narinfo_cut_off_is_an_outage_not_a_miss() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nStorePath: /nix")
                .await;
            // Dropped: the body ends 990 bytes short.
        }
    });
    let upstreams = upstreams_at(url);
    let h: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
    for _ in 0..FAILURES_IN_A_ROW {
        assert!(matches!(
            upstreams.has(h).await,
            Err(StoreError::Unavailable(_))
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

/// A throttled upstream (429) has not said it lacks the object: an outage (503), not a 404.
#[tokio::test]
async fn a_throttled_upstream_is_unavailable_not_a_miss() {
    let upstreams = plain_upstreams().await;
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
    let app = axum::Router::new().route(
        "/log/{drv}",
        axum::routing::get(|| async { StatusCode::INTERNAL_SERVER_ERROR })
            .head(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
    );
    let upstreams = upstreams_serving(app).await;
    for _ in 0..FAILURES_IN_A_ROW {
        assert!(matches!(
            upstreams.head("log/x").await,
            Err(StoreError::Unavailable(_))
        ));
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
    for _ in 0..FAILURES_IN_A_ROW {
        assert!(upstreams.get("log/x", None).await.is_err());
    }
    // "reader:S3CRET-TOKEN", as Basic auth.
    let basic = Some("Basic cmVhZGVyOlMzQ1JFVC1UT0tFTg==".to_owned());
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec![basic; FAILURES_IN_A_ROW as usize]
    );
    let shown = format!("{:?}", upstreams.health());
    assert!(shown.contains(&format!("http://{addr}")), "{shown}");
    let metrics = crate::metrics::render();
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
        .send(u, upstreams.client.get(url(u, "log/x")))
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
        upstreams.has(first).await,
        Err(StoreError::Unavailable(_))
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
            tokio::spawn(async move { upstreams.has(h).await })
        })
        .collect();
    for r in futures::future::join_all(burst).await {
        assert!(matches!(r.unwrap(), Err(StoreError::Unavailable(_))));
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
                tokio::spawn(async move { upstreams.has(h).await })
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
#[tokio::test]
async fn a_redirect_inside_is_not_followed() {
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
    upstreams.client = Upstreams::client_builder()
        .resolve("cache.test", format!("127.0.0.1:{port}").parse().unwrap())
        .build()
        .unwrap();
    // Not followed, and not an outage: a miss of that object; the upstream stays in use.
    for _ in 0..FAILURES_IN_A_ROW {
        assert!(matches!(upstreams.get("log/x", None).await, Ok(None)));
    }
    assert!(!upstreams.list[0].down.is_active());
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
