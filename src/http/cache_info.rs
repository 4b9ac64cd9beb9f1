//! `/nix-cache-info`: generated from the config, never read from the store (a 404 here makes Nix
//! treat the URL as "not a binary cache"). HEAD is GET without the body (axum's default).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;

use super::AppState;
use crate::config::Config;

pub(super) fn render(c: &Config) -> Bytes {
    Bytes::from(format!(
        "StoreDir: {}\nWantMassQuery: {}\nPriority: {}\n",
        c.store_dir,
        u8::from(c.want_mass_query),
        c.priority
    ))
}

pub(super) async fn get(State(st): State<AppState>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/x-nix-cache-info"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        st.live().cache_info.clone(),
    )
}

/// Nix PUTs a nix-cache-info when it finds none; ours is generated, so there is nothing to do.
pub(super) async fn put() -> StatusCode {
    StatusCode::NO_CONTENT
}
