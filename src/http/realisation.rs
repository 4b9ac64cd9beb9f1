//! Realisations of content-addressed derivations (JSON), under both names Nix has used:
//! `/realisations/<drvhash>!<output>.doi` (Nix up to ~2.32) and
//! `/build-trace/<drv>/<output>` (current Nix). Both are served from the read path as stored
//! and accepted as sent, each under its own key: one is not translated into the other.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::object::{self, Kind};
use super::AppState;
use crate::error::Error;
use crate::nix::{OutputName, RealisationName, StorePathBaseName};
use crate::store::object_key;

/// A bound on what one realisation upload may write to the store.
const MAX_REALISATION_BYTES: u64 = 1 << 20;

pub(super) fn realisation_key(id: &str) -> Result<String, Error> {
    let r: RealisationName = id.parse()?;
    Ok(object_key::realisation(&r))
}

pub(super) fn build_trace_key(drv: &str, output: &str) -> Result<String, Error> {
    let d: StorePathBaseName = drv.parse()?;
    let o: OutputName = output.parse()?;
    Ok(object_key::build_trace(&d, &o))
}

async fn put_as_sent(st: &AppState, key: &str, body: Body) -> Result<StatusCode, Error> {
    st.uploader
        .put_plain(
            key,
            object::limited_body_stream(st, body, MAX_REALISATION_BYTES)?,
            MAX_REALISATION_BYTES,
        )
        .await?;
    Ok(StatusCode::CREATED)
}

pub(super) async fn get(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::get(&*reads, &realisation_key(&id)?, Kind::Realisation, &headers).await
}

pub(super) async fn head(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::head(&*reads, &realisation_key(&id)?, Kind::Realisation).await
}

pub(super) async fn put(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<StatusCode, Error> {
    put_as_sent(&st, &realisation_key(&id)?, body).await
}

pub(super) async fn get_build_trace(
    State(st): State<AppState>,
    Path((drv, output)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let key = build_trace_key(&drv, &output)?;
    let reads = st.live().reads.clone();
    object::get(&*reads, &key, Kind::Realisation, &headers).await
}

pub(super) async fn head_build_trace(
    State(st): State<AppState>,
    Path((drv, output)): Path<(String, String)>,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::head(&*reads, &build_trace_key(&drv, &output)?, Kind::Realisation).await
}

pub(super) async fn put_build_trace(
    State(st): State<AppState>,
    Path((drv, output)): Path<(String, String)>,
    body: Body,
) -> Result<StatusCode, Error> {
    put_as_sent(&st, &build_trace_key(&drv, &output)?, body).await
}
