//! The connection loop: accepts TCP connections and serves HTTP/1.1 and HTTP/2 on them with
//! the limits a server on the internet needs, which `axum::serve` does not set.
//!
//! - **Header-read timeout** (`header_read_timeout_secs`): a connection must send a request's
//!   headers within it, also between requests on a kept-alive connection (hyper starts the
//!   timer whenever the connection waits for a request). Without it, a client sending headers
//!   one byte a minute holds a connection and its buffer forever.
//! - **Connection cap** (`max_connections`): beyond it, new connections wait in the kernel's
//!   accept backlog until one closes, so memory stays bounded whatever clients do.
//! - **Graceful shutdown**: on `shutdown`, stop accepting, let requests in flight finish for
//!   at most `shutdown_timeout_secs`, then return.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{app, AppState};

/// Serves `state` on `listener` until `shutdown` completes, then lets in-flight requests finish
/// for at most `config.shutdown_timeout`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.config.shutdown_timeout;
    let permits = Arc::new(Semaphore::new(state.config.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let service = TowerToHyperService::new(app(state));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
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
                Ok((tcp, _peer)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: the listener itself is fine, so
                    // wait a little instead of spinning, then go on.
                    tracing::warn!(cause = %e, "accepting a connection failed");
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
        let conn = builder
            .serve_connection(TokioIo::new(tcp), service.clone())
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // Errors here are the client's (reset, timeout, bad request): nothing to report.
            if let Err(e) = conn.await {
                tracing::debug!(cause = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown: requests still running after {} s, exiting", grace.as_secs());
        }
    }
    Ok(())
}
