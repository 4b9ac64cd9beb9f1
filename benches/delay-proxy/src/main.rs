//! The delay proxy of the slow-S3 benchmarks (`scripts/bench`, `scripts/bench-upload`): a TCP
//! proxy that holds every chunk its upstream sends back for a fixed delay before passing it on,
//! as an S3 on another machine would answer later. That latency must not cost this machine CPU
//! (the benchmarks run cellar, Garage and the client on the same two cores), so the proxy is
//! lean: one thread, no HTTP parsing beyond finding where requests start.
//!
//! It logs every HTTP/1.x request its clients send, one line each, `<unix time> <connection>
//! <METHOD> <path>` (what the benchmarks count: S3 requests during a warm copy). Requests with
//! a chunked body stop the counting on their connection (logged), not the forwarding.
//!
//! ```text
//! cargo run --release --manifest-path benches/delay-proxy/Cargo.toml -- \
//!     PORT UPSTREAM_HOST:PORT DELAY_MS REQUEST_LOG
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

const READ: usize = 64 << 10;
/// Chunks held back from one client at most (each at most [`READ`]: 16 MiB) before reading
/// from the upstream stops: a slow client slows its upstream instead of filling memory.
const HELD_CHUNKS: usize = 256;

/// tokio's timer wakes on whole milliseconds, rounded up, and its poll rounds up again: asking
/// this much early keeps what the proxy adds to an answer at about the delay plus 1 ms, as with
/// the Python proxy it replaced (a small object's p50 through it, same Garage, several runs: at
/// +2 ms 3.2-3.8 ms, Python 3.3-3.5; at +20 ms 21.9, Python 21.8; without this: 4.1 and 22.5).
/// What is due already is not timed at all.
const EARLY: Duration = Duration::from_micros(500);

/// A request head longer than this means the counting lost the framing.
const HEAD_MAX: usize = 64 << 10;

type Log = Arc<Mutex<std::fs::File>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, upstream, delay_ms, log] = &args[..] else {
        eprintln!("usage: cellar-delay-proxy PORT UPSTREAM_HOST:PORT DELAY_MS REQUEST_LOG");
        std::process::exit(2);
    };
    let port: u16 = port.parse().expect("PORT");
    let delay = Duration::from_millis(delay_ms.parse().expect("DELAY_MS"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("REQUEST_LOG");
    let log: Log = Arc::new(Mutex::new(log));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let upstream: Arc<str> = upstream.as_str().into();
        let mut conn = 0u64;
        loop {
            let client = match listener.accept().await {
                Ok((client, _)) => client,
                Err(e) => {
                    // Out of descriptors, say: not a reason to spin.
                    eprintln!("delay proxy: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            conn += 1;
            tokio::spawn(proxy(client, upstream.clone(), delay, log.clone(), conn));
        }
    });
}

async fn proxy(client: TcpStream, upstream: Arc<str>, delay: Duration, log: Log, conn: u64) {
    let Ok(up) = TcpStream::connect(&*upstream).await else {
        return; // the client's connection closes
    };
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();

    // Client to upstream: at once, counted.
    let requests = async move {
        let mut counter = Counter::new(log, conn);
        let mut buf = vec![0u8; READ];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            counter.feed(&buf[..n]);
            if uw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = uw.shutdown().await;
    };

    // Upstream to client: each chunk (and the end) held until its due time, in order.
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(HELD_CHUNKS);
    let answers_in = async move {
        loop {
            let mut buf = Vec::with_capacity(READ);
            match ur.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if buf.len() < READ / 8 {
                buf.shrink_to_fit();
            }
            if tx.send((Instant::now() + delay, Some(buf))).await.is_err() {
                return;
            }
        }
        let _ = tx.send((Instant::now() + delay, None)).await;
    };
    let answers_out = async move {
        while let Some((due, data)) = rx.recv().await {
            if due > Instant::now() + EARLY {
                tokio::time::sleep_until(due - EARLY).await;
            }
            let Some(data) = data else { break };
            if cw.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(requests, answers_in, answers_out);
}

/// Finds the HTTP/1.x requests in one connection's client-to-server bytes: heads end with an
/// empty line, bodies are framed by `Content-Length` (all the benchmarks' clients send).
struct Counter {
    log: Log,
    conn: u64,
    buf: Vec<u8>,
    body_left: u64,
    lost: bool,
}

impl Counter {
    fn new(log: Log, conn: u64) -> Self {
        Counter {
            log,
            conn,
            buf: Vec::new(),
            body_left: 0,
            lost: false,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        if self.lost {
            return;
        }
        // Body bytes while nothing is buffered (an upload's NAR): skipped without copying.
        if self.buf.is_empty() && self.body_left > 0 {
            let n = self.body_left.min(data.len() as u64) as usize;
            self.body_left -= n as u64;
            data = &data[n..];
        }
        self.buf.extend_from_slice(data);
        loop {
            if self.body_left > 0 {
                let n = self.body_left.min(self.buf.len() as u64) as usize;
                self.body_left -= n as u64;
                self.buf.drain(..n);
                if self.body_left > 0 {
                    return;
                }
            }
            let Some(end) = find(&self.buf, b"\r\n\r\n") else {
                if self.buf.len() > HEAD_MAX {
                    self.write(
                        "? ? no request head in 64 KiB: no more counting on this connection",
                    );
                    self.lost = true;
                    self.buf = Vec::new();
                }
                return;
            };
            let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            self.buf.drain(..end + 4);
            self.request(&head);
            if self.lost {
                return;
            }
        }
    }

    fn request(&mut self, head: &str) {
        let mut lines = head.split("\r\n");
        let first = lines.next().unwrap_or("");
        let mut parts = first.split(' ');
        let method = parts.next().unwrap_or("?").to_owned();
        let path = parts.next().unwrap_or("?").to_owned();
        let mut length = 0u64;
        for line in lines {
            let (k, v) = line.split_once(':').unwrap_or((line, ""));
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                self.write("? ? chunked request body: no more counting on this connection");
                self.lost = true;
                return;
            }
            if k == "content-length" {
                match v.parse() {
                    Ok(n) => length = n,
                    Err(_) => {
                        self.write(
                            "? ? unreadable Content-Length: no more counting on this connection",
                        );
                        self.lost = true;
                        return;
                    }
                }
            }
        }
        self.body_left = length;
        self.write(&format!("{method} {path}"));
    }

    fn write(&self, what: &str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let line = format!("{now:.6} {} {what}\n", self.conn);
        let _ = self.log.lock().unwrap().write_all(line.as_bytes());
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
