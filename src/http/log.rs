//! `/log/<drv>`: build logs, plain text, named after the derivation's store path base name
//! (`nix log --store URL OUT` reads `Deriver:` from the narinfo, then GETs this). Served from
//! the read path as stored; uploaded by `nix copy --to` with `PUT /log/<drv>`, decoded first
//! if sent with a `Content-Encoding` (newer Nix's `log-compression`).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::object::{self, Kind};
use super::AppState;
use crate::error::Error;
use crate::nix::StorePathBaseName;
use crate::store::object_key;
use crate::upload::MAX_LOG_BYTES;

/// The store key of the log of `drv` (a derivation's base name, validated).
pub(super) fn key(drv: &str) -> Result<String, Error> {
    let d: StorePathBaseName = drv.parse()?;
    Ok(object_key::log(&d))
}

pub(super) async fn get(
    State(st): State<AppState>,
    Path(drv): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::get(&*reads, &key(&drv)?, Kind::Log, &headers).await
}

pub(super) async fn head(
    State(st): State<AppState>,
    Path(drv): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::head(&*reads, &key(&drv)?, Kind::Log, &headers).await
}

pub(super) async fn put(
    State(st): State<AppState>,
    Path(drv): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, Error> {
    st.uploader
        .put_plain(
            &key(&drv)?,
            object::decoded_body_stream(&st, &headers, body, MAX_LOG_BYTES)?,
            MAX_LOG_BYTES,
        )
        .await?;
    Ok(StatusCode::CREATED)
}
