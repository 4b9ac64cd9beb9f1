//! `/healthz` (the process answers; no I/O) and `/readyz` (the store answers, within
//! `store.ready_timeout_secs`), for curl and load balancers.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;

use super::AppState;

const NO_STORE: (header::HeaderName, &str) = (header::CACHE_CONTROL, "no-store");

pub(super) async fn healthz() -> impl IntoResponse {
    ([NO_STORE], "ok\n")
}

pub(super) async fn readyz(State(st): State<AppState>) -> impl IntoResponse {
    let limit = st.config.store.ready_timeout;
    match tokio::time::timeout(limit, st.store.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, [NO_STORE], "ready\n".to_owned()),
        Ok(Err(e)) => {
            tracing::warn!(cause = %e, store = %st.store.describe(), "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [NO_STORE],
                "store unavailable\n".to_owned(),
            )
        }
        Err(_) => {
            tracing::warn!(store = %st.store.describe(), "not ready: store timed out");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [NO_STORE],
                "store timed out\n".to_owned(),
            )
        }
    }
}
