//! Clients that hold connections: headers sent slowly or never finished, and more connections
//! than the server will serve at once.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use common::*;

/// Opens a connection that starts a request and never finishes its headers.
async fn slow_client(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: cellar\r\nX-Slow: ")
        .await
        .unwrap();
    s
}

/// Waits until the server closes `s` (EOF or reset); the test's own guard ends a hang.
async fn closed_by_server(mut s: TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {} // e.g. a 408 before the close
        }
    }
}

fn healthz_client() -> reqwest::Client {
    reqwest::Client::builder()
        // A guard against a hung server, never an assertion about timing.
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_are_cut_and_do_not_starve_others() {
    let srv = Server::start(vec![("CELLAR_HEADER_READ_TIMEOUT_SECS".into(), "2".into())]);
    let mut slow = Vec::new();
    for _ in 0..300 {
        slow.push(slow_client(srv.addr).await);
    }
    // Normal clients are served while the slow ones hang on.
    let c = healthz_client();
    let r = c.get(format!("{}/healthz", srv.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // And every slow connection is closed by the server (without a header-read timeout they
    // would be held open forever and this would not return).
    let guard = tokio::time::timeout(Duration::from_secs(120), async {
        for s in slow {
            closed_by_server(s).await;
        }
    });
    assert!(guard.await.is_ok(), "slow connections were not closed");
}

/// The metrics listener (`metrics_listen`) cuts slow headers too, and serves a health check
/// while more connections than it serves at once hang on: before, it had none of the main
/// listener's limits, and connections left silent there piled up until the process ran out
/// of file descriptors.
#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_listener_cuts_slow_headers_too() {
    let srv = Server::start(vec![
        ("CELLAR_HEADER_READ_TIMEOUT_SECS".into(), "2".into()),
        ("CELLAR_METRICS_LISTEN".into(), "127.0.0.1:0".into()),
    ]);
    let addr: std::net::SocketAddr = srv.metrics_addr().parse().unwrap();
    let mut slow = Vec::new();
    for _ in 0..40 {
        slow.push(slow_client(addr).await);
    }
    let r = healthz_client()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let guard = tokio::time::timeout(Duration::from_secs(120), async {
        for s in slow {
            closed_by_server(s).await;
        }
    });
    assert!(guard.await.is_ok(), "slow connections were not closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_wait_for_a_free_one() {
    let srv = Server::start(vec![
        ("CELLAR_HEADER_READ_TIMEOUT_SECS".into(), "3".into()),
        ("CELLAR_MAX_CONNECTIONS".into(), "4".into()),
    ]);
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(slow_client(srv.addr).await);
    }
    // The fifth connection is accepted only once a slow one has been cut, so when its answer
    // arrives at least one slow connection must already be closed.
    let r = healthz_client()
        .get(format!("{}/healthz", srv.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut closed = 0;
    for s in &mut slow {
        let mut buf = [0u8; 256];
        // A closed connection reads EOF (or an error) at once; an open one would block, so
        // peek without waiting.
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => closed += 1,
            Ok(Ok(_)) => closed += 1, // the server's 408 and close
            Err(_) => {}
        }
    }
    assert!(
        closed >= 1,
        "the fifth connection was served while 4 were held"
    );
}

/// HTTP/2 without TLS (h2c) is not served: one connection could carry hundreds of downloads,
/// past what the connection cap bounds. The prior-knowledge preface gets the connection closed.
#[tokio::test(flavor = "multi_thread")]
async fn http2_without_tls_is_refused() {
    let srv = Server::start(Vec::new());
    let mut h2 = TcpStream::connect(srv.addr).await.unwrap();
    // The HTTP/2 preface and an empty SETTINGS frame (prior knowledge, as over h2c).
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // A guard against the connection being held, not an assertion about timing.
    tokio::time::timeout(Duration::from_secs(60), h2.read_to_end(&mut answer))
        .await
        .expect("the HTTP/2 connection was served")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 "),
        "{answer:?}"
    );
}

/// A connection opened and left without a request is closed once nothing has moved on it for
/// `idle_timeout_secs` (here before the header-read timeout).
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed() {
    let srv = Server::start(vec![
        ("CELLAR_IDLE_TIMEOUT_SECS".into(), "2".into()),
        ("CELLAR_HEADER_READ_TIMEOUT_SECS".into(), "120".into()),
    ]);
    let idle = TcpStream::connect(srv.addr).await.unwrap();
    let opened = std::time::Instant::now();
    // A guard against the connection being held forever, not an assertion about timing.
    let guard = tokio::time::timeout(Duration::from_secs(60), closed_by_server(idle));
    assert!(guard.await.is_ok(), "the idle connection was not closed");
    // Not before its time: the close is the idle limit's, not a refusal of the connection.
    assert!(
        opened.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        opened.elapsed()
    );
}

/// A connection asking a request every second is never idle for the 2 s limit: it is served
/// for as long as it keeps asking.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_in_use_is_not_idle() {
    let srv = Server::start(vec![("CELLAR_IDLE_TIMEOUT_SECS".into(), "2".into())]);
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    for i in 0..4 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: cellar\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "request {i}: {answer:?}"
        );
        // The pace of a client between requests: 4 s on one connection in all.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A download the client reads steadily for longer than the idle limit is not idle: the
/// bytes it takes keep the connection (the answer's headers went out long before).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_steady_download_is_not_idle() {
    let srv = Server::start(vec![("CELLAR_IDLE_TIMEOUT_SECS".into(), "2".into())]);
    let size = 24usize << 20;
    let nar = format!("{}.nar", "1".repeat(52));
    let dir = srv.dir.path().join("cellar-data/nar");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&nar), vec![7u8; size]).unwrap();
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let ask = format!("GET /nar/{nar} HTTP/1.1\r\nHost: cellar\r\nConnection: close\r\n\r\n");
    s.write_all(ask.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let (mut got, mut paced) = (0usize, 0usize);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
        // A client taking ~4 s for the whole NAR: 40 ms per 256 KiB.
        while got >= paced + (256 << 10) {
            paced += 256 << 10;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    assert!(got > size, "{got} bytes of {size} and headers");
    assert!(
        started.elapsed() > Duration::from_secs(2),
        "not slower than the limit"
    );
}
