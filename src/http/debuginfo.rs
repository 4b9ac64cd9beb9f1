//! `/debuginfo/<build id>`: debug info links, JSON naming the NAR that holds a debug file and
//! the file within it (see [`crate::nix::debuginfo`]). `nix copy --to 'URL?index-debug-info=true'`
//! uploads one for each debug file of a path (a `HEAD` first, then a `PUT` if it is missing);
//! dwarffs and other debuginfod-style fetchers read them. Served from the read path as stored.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::object::{self, Kind};
use super::AppState;
use crate::error::Error;
use crate::nix::{DebugInfoName, MAX_DEBUGINFO_BYTES};
use crate::store::object_key;

/// The store key of the link `name` (validated).
pub(super) fn key(name: &str) -> Result<String, Error> {
    let n: DebugInfoName = name.parse()?;
    Ok(object_key::debuginfo(&n))
}

pub(super) async fn get(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::get(&*reads, &key(&name)?, Kind::DebugInfo, &headers).await
}

pub(super) async fn head(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::head(&*reads, &key(&name)?, Kind::DebugInfo).await
}

pub(super) async fn put(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, Error> {
    let n: DebugInfoName = name.parse()?;
    let raw = object::read_decoded_body(&st, &headers, body, MAX_DEBUGINFO_BYTES).await?;
    st.uploader.put_debuginfo(&n, raw).await?;
    Ok(StatusCode::CREATED)
}
