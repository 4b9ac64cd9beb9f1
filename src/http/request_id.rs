//! Request ids: each request runs in a `request` span with an id, so every log line it causes
//! (an upload rejected, a store failure, a 5xx) can be found with the others of the same
//! request, and the id is echoed in `X-Request-Id` for the client to quote.
//!
//! A reverse proxy that already tagged the request (nginx `$request_id`, Caddy, a load
//! balancer) passes its id in `X-Request-Id`, and cellar keeps it so that both logs agree. An id
//! that is too long or holds other characters than `[A-Za-z0-9._-]` is replaced: it ends up in
//! log lines, which must not be forged through it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument as _;

pub(super) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_CONTENT_TYPE_OPTIONS: HeaderName = HeaderName::from_static("x-content-type-options");

const MAX_LEN: usize = 64;

pub(super) async fn request_span(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| acceptable(v))
        .map_or_else(generate, str::to_owned);
    let span = tracing::info_span!(
        "request",
        id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    let started = Instant::now();
    let mut res = next.run(req).instrument(span.clone()).await;
    // One line per request at debug level: a busy cache answers thousands of narinfos a
    // second, which the metrics count; this is for following one client (RUST_LOG=cellar=debug).
    // In scope, not `parent:`: the JSON format lists the spans of the current context only.
    let status = res.status().as_u16();
    span.in_scope(|| {
        let ms = started.elapsed().as_millis() as u64;
        tracing::debug!(status, ms, "answered");
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    // A write token can place any bytes under the cache's name (a NAR, a log): browsers must
    // take them as the type said (a log is plain text), never sniff HTML or script out of them.
    res.headers_mut().insert(
        X_CONTENT_TYPE_OPTIONS.clone(),
        HeaderValue::from_static("nosniff"),
    );
    res
}

fn acceptable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// 16 hex digits: a counter added to a random base drawn once per process, through a
/// bijective mix (splitmix64), so ids are unique within a process, unrelated between replicas,
/// and cost no system call per request (ids need to be unique in the log, not unguessable).
fn generate() -> String {
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        let mut b = [0u8; 8];
        match getrandom::getrandom(&mut b) {
            Ok(()) => u64::from_le_bytes(b),
            // No random source: the start time and the process id still differ between replicas.
            Err(_) => {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 40)
            }
        }
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}", mix(base.wrapping_add(n)))
}

/// splitmix64's finalizer: a bijection on u64 that scatters consecutive inputs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_ids_are_kept() {
        assert!(acceptable("f3a9-01.x_Y"));
        assert!(!acceptable(""));
        assert!(!acceptable("a b"));
        assert!(!acceptable("x\"} forged"));
        assert!(!acceptable(&"a".repeat(MAX_LEN + 1)));
        let g = generate();
        assert_eq!(g.len(), 16);
        assert!(acceptable(&g));
        assert_ne!(g, generate());
    }

    #[test]
    fn ids_do_not_repeat_and_do_not_look_alike() {
        let ids: Vec<String> = (0..10_000).map(|_| generate()).collect();
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Consecutive ids differ in many digits, not just the last ones.
        let same_prefix = ids.windows(2).filter(|w| w[0][..8] == w[1][..8]).count();
        assert!(
            same_prefix < 10,
            "{same_prefix} consecutive ids share 8 leading digits"
        );
        assert_eq!(mix(0), 0);
        assert_ne!(mix(1), 1);
    }
}
