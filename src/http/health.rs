//! `/healthz` (the process answers; no I/O) and `/readyz` (the store answers, within
//! `store.ready_timeout_secs`), for curl and load balancers.
//!
//! `/readyz` needs no token: a burst of probes sends one or two requests to the store, not one
//! each. Probes arriving while the store is being asked wait for that answer, and take it if
//! it was asked at most [`SHARED`] before they arrived (several load balancers probing a
//! slow store a moment apart would otherwise each wait for two requests in a row, and time
//! out); others share the next request. A probe arriving once no request is under way asks
//! the store, so a store gone down is seen at once. Every answer comes within
//! `store.ready_timeout_secs` of the probe's arrival (else it is "store timed out"). While the
//! server drains after SIGTERM, `/readyz` answers 503, so a load balancer stops sending it
//! clients.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;

use super::AppState;

const NO_STORE: (header::HeaderName, &str) = (header::CACHE_CONTROL, "no-store");

/// How long before a probe's arrival the store may have been asked for the answer it gets.
pub const SHARED: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) async fn healthz() -> impl IntoResponse {
    ([NO_STORE], "ok\n")
}

/// The store's last answer to a readiness probe: when it was asked, when it answered, and what.
#[derive(Default)]
pub struct Readiness(tokio::sync::Mutex<Option<Answer>>);

#[derive(Clone, Copy)]
struct Answer {
    asked: tokio::time::Instant,
    answered: tokio::time::Instant,
    status: StatusCode,
    text: &'static str,
}

pub(super) async fn readyz(State(st): State<AppState>) -> impl IntoResponse {
    if st.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [NO_STORE],
            "shutting down\n",
        );
    }
    let arrived = tokio::time::Instant::now();
    let answer = async {
        // Held while the store is asked: probes arriving meanwhile wait for that answer.
        let mut last = st.readiness.0.lock().await;
        match *last {
            // Under way when this probe arrived, and asked shortly before.
            Some(a) if a.answered > arrived && a.asked + SHARED >= arrived => (a.status, a.text),
            _ => {
                let asked = tokio::time::Instant::now();
                let (status, text) = ask_store(&st).await;
                *last = Some(Answer {
                    asked,
                    answered: tokio::time::Instant::now(),
                    status,
                    text,
                });
                (status, text)
            }
        }
    };
    let limit = st.config.store.ready_timeout;
    let (status, text) = match tokio::time::timeout_at(arrived + limit, answer).await {
        Ok(answer) => answer,
        Err(_) => {
            tracing::warn!(store = %st.store.describe(), "not ready: store timed out");
            (StatusCode::SERVICE_UNAVAILABLE, "store timed out\n")
        }
    };
    (status, [NO_STORE], text)
}

async fn ask_store(st: &AppState) -> (StatusCode, &'static str) {
    let limit = st.config.store.ready_timeout;
    match tokio::time::timeout(limit, st.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n"),
        Ok(Err(e)) => {
            tracing::warn!(cause = %e, store = %st.store.describe(), "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
        }
        Err(_) => {
            tracing::warn!(store = %st.store.describe(), "not ready: store timed out");
            (StatusCode::SERVICE_UNAVAILABLE, "store timed out\n")
        }
    }
}
