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

/// The store's last answer to a readiness probe: when it was asked, when it answered, and what;
/// and whether the store was last found not ready (logged when that changes, not per probe:
/// `/readyz` needs no token, and a client looping on it while the store is down would
/// otherwise write a warning per request).
#[derive(Default)]
pub struct Readiness(
    tokio::sync::Mutex<Option<Answer>>,
    /// When the last probe found the store down, if it did.
    std::sync::Mutex<Option<tokio::time::Instant>>,
);

impl Readiness {
    /// Notes whether the store is ready now; true if that is news (the first failure, or
    /// the first success after failures).
    fn changed(&self, ready: bool) -> bool {
        let now_down = (!ready).then(tokio::time::Instant::now);
        let was_down = std::mem::replace(&mut *crate::sync::lock(&self.1), now_down).is_some();
        was_down == ready
    }

    /// Whether the last probe found the store down, within
    /// [`super::state::STORE_FAILED_FOR`] (no probe may come again for long: open-source
    /// nginx sends none).
    pub fn is_down(&self) -> bool {
        crate::sync::lock(&self.1).is_some_and(|at| at.elapsed() < super::state::STORE_FAILED_FOR)
    }
}

#[derive(Clone, Copy)]
struct Answer {
    asked: tokio::time::Instant,
    answered: tokio::time::Instant,
    status: StatusCode,
    text: &'static str,
}

pub(super) async fn readyz(State(st): State<AppState>) -> impl IntoResponse {
    let (status, text) = readiness(&st).await;
    (status, [NO_STORE], text)
}

/// What `/readyz` answers (also told by `/status`): 200 `ready` when the store answers, else
/// 503 with why.
pub(super) async fn readiness(st: &AppState) -> (StatusCode, &'static str) {
    if st.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
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
                let (status, text) = ask_store(st).await;
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
        // Its wait for another probe's request counted: the store's own answer may never
        // be asked for, so the change is noted here too.
        Err(_) => timed_out(st, st.readiness.changed(false)),
    };
    (status, text)
}

async fn ask_store(st: &AppState) -> (StatusCode, &'static str) {
    let limit = st.config.store.ready_timeout;
    let answer = tokio::time::timeout(limit, st.store.ping()).await;
    let news = st.readiness.changed(matches!(answer, Ok(Ok(()))));
    match answer {
        Ok(Ok(())) => {
            if news {
                tracing::info!(store = %st.store.describe(), "ready: the store answers again");
            }
            (StatusCode::OK, "ready\n")
        }
        Ok(Err(e)) => {
            let store = st.store.describe();
            if news {
                tracing::warn!(cause = %e, %store, "not ready (logged again once the store answers and fails again)");
            } else {
                tracing::debug!(cause = %e, %store, "not ready");
            }
            // Credentials refused, a bucket missing, a wrong region: for the operator to fix,
            // not a store down.
            let text = match e {
                crate::store::StoreError::Misconfigured(_) => "store misconfigured\n",
                _ => "store unavailable\n",
            };
            (StatusCode::SERVICE_UNAVAILABLE, text)
        }
        Err(_) => timed_out(st, news),
    }
}

/// The answer to a probe the store did not answer in time; logged as a warning if that is
/// `news` (see [`Readiness::changed`]).
fn timed_out(st: &AppState, news: bool) -> (StatusCode, &'static str) {
    let store = st.store.describe();
    if news {
        tracing::warn!(%store, "not ready: store timed out (logged again once the store answers and fails again)");
    } else {
        tracing::debug!(%store, "not ready: store timed out");
    }
    (StatusCode::SERVICE_UNAVAILABLE, "store timed out\n")
}

#[cfg(test)]
mod tests {
    use super::Readiness;

    /// Readiness is logged as it changes: the first failure, then nothing until the store
    /// has answered again; the first success is no news.
    #[test]
    fn readiness_is_news_only_when_it_changes() {
        let r = Readiness::default();
        assert!(!r.changed(true), "ready from the start is no news");
        assert!(r.changed(false));
        assert!(!r.changed(false));
        assert!(!r.changed(false));
        assert!(r.changed(true));
        assert!(!r.changed(true));
        assert!(r.changed(false));
    }
}
