//! The connection loop: accepts TCP connections and serves HTTP/1.1 on them with the limits a
//! server on the internet needs, which `axum::serve` does not set.
//!
//! HTTP/1.1 only: Nix speaks HTTP/1.1 to a plain `http://` cache, and a TLS proxy in front
//! (the deployment this server is made for) speaks HTTP/2 to clients and HTTP/1.1 to it.
//! HTTP/2 without TLS (h2c) would let one connection, one of the capped many, carry up to
//! 200 NAR downloads at once, each holding its read buffers while the client holds its flow
//! control window shut: the cap would no longer bound memory.
//!
//! - **Header-read timeout** (`header_read_timeout_secs`): a connection must send a request's
//!   headers within it, also between requests on a kept-alive connection (hyper starts the
//!   timer whenever the connection waits for a request). Without it, a client sending headers
//!   one byte a minute holds a connection and its buffer forever.
//! - **Idle timeout** (`idle_timeout_secs`): a connection on which no byte moves either way
//!   for that long is closed. It ends what the header-read timeout does not see: a client
//!   that asked for a NAR and stopped reading it (the answer waits on a full socket). A
//!   request being worked on before its answer starts keeps its connection, however long.
//! - **Connection cap** (`max_connections`): beyond it, new connections wait in the kernel's
//!   accept backlog until one closes, so memory stays bounded whatever clients do.
//! - **Graceful shutdown**: on `shutdown`, stop accepting, let requests in flight finish for
//!   at most `shutdown_timeout_secs`, then return.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{app, AppState};

/// The most a connection buffers of what it reads: bounds a request's head (431 beyond).
pub(super) const MAX_BUF_BYTES: usize = 64 << 10;

/// Serves `state` on `listener` until `shutdown` completes, then lets in-flight requests finish
/// for at most `config.shutdown_timeout`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.config.shutdown_timeout;
    let idle = state.config.idle_timeout;
    warn_if_few_open_files(state.config.max_connections);
    let permits = Arc::new(Semaphore::new(state.config.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.header_read_timeout)
        // What a connection may buffer of a request's head (hyper's default is ~400 KiB):
        // Nix sends under 1 KiB, and a thousand connections sending headers that never end
        // would hold 400 MiB.
        .max_buf_size(MAX_BUF_BYTES);
    let draining = state.clone();
    let delay = state.config.shutdown_delay;
    // Told to stop, the server says so on `/readyz` at once, and goes on accepting for the
    // delay: a load balancer probing it stops sending clients before the port closes.
    let shutdown = {
        let draining = state.clone();
        async move {
            shutdown.await;
            draining
                .draining
                .store(true, std::sync::atomic::Ordering::SeqCst);
            if !delay.is_zero() {
                tracing::info!(
                    "shutdown: /readyz answers 503; accepting connections for {} s more",
                    delay.as_secs()
                );
                tokio::time::sleep(delay).await;
            }
        }
    };
    let service = TowerToHyperService::new(app(state));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    // Accepts failing in a row (out of file descriptors): said when they begin and end.
    let mut failing_accepts = 0u64;
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _peer)) => {
                    if failing_accepts > 0 {
                        tracing::info!(failed = failing_accepts, "accepting connections again");
                        failing_accepts = 0;
                    }
                    tcp
                }
                Err(e) => {
                    // Out of file descriptors and the like: the listener itself is fine, so
                    // wait a little instead of spinning, then go on. Said once a run of
                    // failures (ten a second otherwise), with what to change.
                    if failing_accepts == 0 {
                        tracing::warn!(
                            cause = %e,
                            "accepting a connection failed; retrying every 100 ms, said again \
                             when accepts work again (out of file descriptors: raise the \
                             open-files limit, LimitNOFILE, or lower max_connections)"
                        );
                    }
                    failing_accepts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Without TCP_NODELAY, small responses on keep-alive connections stall ~40 ms
        // (Nagle's algorithm meets the client's delayed ACK).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("set_nodelay: {e}");
        }
        let (tcp, activity) = Watched::new(tcp);
        let tracked = Tracked {
            inner: service.clone(),
            activity: activity.clone(),
            state: draining.clone(),
        };
        let conn = builder
            .serve_connection(TokioIo::new(tcp), tracked)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            tokio::select! {
                // Errors here are the client's (reset, timeout, bad request): nothing to report.
                r = conn => if let Err(e) = r {
                    tracing::debug!(cause = %e, "connection ended with an error");
                },
                // Dropping the connection closes it.
                () = activity.idle_for(idle) => {
                    tracing::debug!("connection idle for {} s; closed", idle.as_secs());
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    // `/readyz` on `metrics_listen`, still open, tells load balancers to go elsewhere (set
    // already unless the loop ended another way).
    draining
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            // What is cut: a builder whose upload this was retries it, and Nix 2.8 resumes
            // a NAR's body where it broke off, which the restarted server refuses (400).
            let connections = draining
                .config
                .max_connections
                .saturating_sub(permits.available_permits());
            let uploads = crate::metrics::get().uploads_running.get();
            tracing::warn!(
                connections,
                uploads,
                "shutdown: requests still running after {} s, exiting (cut off)",
                grace.as_secs()
            );
            // What their writers staged (S3 multipart uploads, a local store's temporary
            // files), which the tasks that would remove it (once their requests are dropped)
            // would not live to do.
            // Within a few seconds, all at once: the last access records are written after
            // this, within the stop timeout the docs give.
            let aborting = draining.store.remove_unfinished();
            match tokio::time::timeout(ABORTS_WITHIN, aborting).await {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::warn!(removed, "shutdown: removed what the uploads cut off had staged (S3 multipart uploads, temporary files)");
                }
                Err(_) => tracing::warn!(
                    "shutdown: what the uploads cut off had staged was not all removed within {} s; \
                     the staging cleanup of a later start removes it",
                    ABORTS_WITHIN.as_secs()
                ),
            }
        }
    }
    Ok(())
}

/// How long a shutdown gives the aborts of the S3 multipart uploads it cut off.
const ABORTS_WITHIN: Duration = Duration::from_secs(5);

/// Connections served at once on `metrics_listen`: scrapers and health checks, a few at a
/// time. More wait in the kernel's backlog.
const METRICS_CONNECTIONS: usize = 32;

/// Serves `/metrics`, `/healthz` and `/readyz` ([`super::metrics_app`]) on `listener` until
/// the process exits, with the main listener's limits but its own cap
/// ([`METRICS_CONNECTIONS`]): HTTP/1.1 only, and a connection that sends no request head
/// within `header_read_timeout_secs` (an idle kept-alive one too) is closed. Without them,
/// connections opened there and left silent piled up until the process ran out of file
/// descriptors, and the main listener with it.
pub async fn serve_metrics(listener: TcpListener, state: AppState) {
    let permits = Arc::new(Semaphore::new(METRICS_CONNECTIONS));
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.header_read_timeout);
    let service = TowerToHyperService::new(super::metrics_app(state));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return; // never closed
        };
        let tcp = match listener.accept().await {
            Ok((tcp, _peer)) => tcp,
            Err(e) => {
                tracing::warn!(cause = %e, "accepting a connection on metrics_listen failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let conn = builder
            .serve_connection(TokioIo::new(tcp), service.clone())
            .into_owned();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(cause = %e, "metrics connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// Warns if the process may open fewer than two files per connection allowed: each download
/// holds its socket and a file or a connection to the store, and past the limit connections
/// are refused (EMFILE) and cache files fail to open. Containers get a soft limit of 1024 on
/// recent engines. Read from `/proc/self/limits`, not `getrlimit`: a systemd unit filtering
/// `@resources` kills a process calling `prlimit64`.
fn warn_if_few_open_files(max_connections: usize) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let wanted = 2 * max_connections as u64;
    if let Some(soft) = soft_open_files(&limits).filter(|&soft| soft < wanted) {
        tracing::warn!(
            open_files = soft,
            max_connections,
            "the process may open {soft} files, fewer than two per connection allowed \
             (max_connections): raise its limit (systemd's LimitNOFILE, docker run --ulimit \
             nofile=65536:65536) or lower max_connections"
        );
    }
}

/// The soft limit of open files in `/proc/self/limits` (`None` if unlimited or unreadable).
fn soft_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    fields.next()?.parse().ok()
}

/// A connection's socket that notes when a byte last moved through it.
struct Watched {
    tcp: TcpStream,
    activity: Arc<Activity>,
}

/// When a byte last moved (milliseconds since `origin`), and how many requests are being
/// worked on before their answer starts: while one is, the connection is not idle, even if
/// nothing moves (an upload's NAR read back and checked, a slow store).
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    working: AtomicUsize,
}

/// The service of one connection: counts its requests in [`Activity`] until their answer
/// starts.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    /// Says whether the server is draining: answers then close their connection.
    state: AppState,
}

impl<S, R> hyper::service::Service<R> for Tracked<S>
where
    S: hyper::service::Service<R, Response = axum::response::Response>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, req: R) -> Self::Future {
        let working = Working::start(self.activity.clone());
        let answer = self.inner.call(req);
        let state = self.state.clone();
        Box::pin(async move {
            let mut r = answer.await;
            drop(working);
            // While draining, every answer closes its connection: a proxy keeping connections
            // alive (nginx's `keepalive`) retires them during the delay, instead of sending
            // a request on one just as the delay ends and every idle connection is closed
            // (an upload it then answers 502 and does not retry).
            if state.draining.load(Ordering::SeqCst) {
                if let Ok(r) = &mut r {
                    r.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
            }
            r
        })
    }
}

/// One request being worked on; its end (answer or cancellation) counts as activity.
struct Working(Arc<Activity>);

impl Working {
    fn start(activity: Arc<Activity>) -> Self {
        activity.working.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for Working {
    fn drop(&mut self) {
        self.0.moved();
        self.0.working.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Watched {
    fn new(tcp: TcpStream) -> (Self, Arc<Activity>) {
        let activity = Arc::new(Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            working: AtomicUsize::new(0),
        });
        (
            Self {
                tcp,
                activity: activity.clone(),
            },
            activity,
        )
    }
}

impl Activity {
    fn moved(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once nothing has moved for `idle` and no request is being worked on.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let now = Instant::now();
            let deadline = if self.working.load(Ordering::Relaxed) > 0 {
                // Looked at again a period from now: the end of the request moves `last`.
                now + idle
            } else {
                last + idle
            };
            if now >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.moved();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.moved();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.moved();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::soft_open_files;

    #[test]
    fn the_soft_limit_of_open_files_is_read() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95498                95498                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(soft_open_files(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files     \n";
        assert_eq!(soft_open_files(unlimited), None);
        assert_eq!(soft_open_files("Max processes 10 10 processes\n"), None);
    }
}
