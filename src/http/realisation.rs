//! Realisations of content-addressed derivations (JSON), under each name Nix has used:
//! `/realisations/<drvhash>!<output>.doi` (Nix up to ~2.32), `/build-trace/<drv>/<output>`
//! and `/build-trace-v2/<drv>/<output>.doi` (Nix 2.35, "build trace entries"). Each is served
//! from the read path as stored, under its own key: one is not translated into another. An upload is checked
//! ([`crate::upload::Uploader::put_realisation`]): it must name a path in the cache, and a
//! published one is kept (201 when written, 200 when it was there already, also when the
//! upload names another path: another build's).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::object::{self, Kind};
use super::AppState;
use crate::error::Error;
use crate::nix::{OutputName, RealisationName, StorePathBaseName};
use crate::store::object_key;
use crate::upload::{RealisationStored, MAX_REALISATION_BYTES};

pub(super) fn realisation_key(id: &str) -> Result<String, Error> {
    let r: RealisationName = id.parse()?;
    Ok(object_key::realisation(&r))
}

/// The key of a build trace: `build-trace/<drv>/<output>`, or with `V2`
/// `build-trace-v2/<drv>/<output>.doi`.
pub(super) fn build_trace_key<const V2: bool>(drv: &str, output: &str) -> Result<String, Error> {
    let d: StorePathBaseName = drv.parse()?;
    Ok(if V2 {
        object_key::build_trace_v2(&d, &OutputName::from_doi_file(output)?)
    } else {
        object_key::build_trace(&d, &output.parse()?)
    })
}

async fn put_checked(st: &AppState, key: &str, body: Body) -> Result<StatusCode, Error> {
    // Its room among the bodies held is given back once it is stored.
    let (raw, _room) = object::read_body(st, body, MAX_REALISATION_BYTES).await?;
    let live = st.live();
    Ok(
        match st
            .uploader
            .put_realisation(key, raw, Some(&live.upstreams))
            .await?
        {
            RealisationStored::Written => StatusCode::CREATED,
            RealisationStored::Unchanged => StatusCode::OK,
        },
    )
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
    headers: HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::head(&*reads, &realisation_key(&id)?, Kind::Realisation, &headers).await
}

pub(super) async fn put(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<StatusCode, Error> {
    put_checked(&st, &realisation_key(&id)?, body).await
}

pub(super) async fn get_build_trace<const V2: bool>(
    State(st): State<AppState>,
    Path((drv, output)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let key = build_trace_key::<V2>(&drv, &output)?;
    let reads = st.live().reads.clone();
    object::get(&*reads, &key, Kind::Realisation, &headers).await
}

pub(super) async fn head_build_trace<const V2: bool>(
    State(st): State<AppState>,
    Path((drv, output)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::head(
        &*reads,
        &build_trace_key::<V2>(&drv, &output)?,
        Kind::Realisation,
        &headers,
    )
    .await
}

pub(super) async fn put_build_trace<const V2: bool>(
    State(st): State<AppState>,
    Path((drv, output)): Path<(String, String)>,
    body: Body,
) -> Result<StatusCode, Error> {
    put_checked(&st, &build_trace_key::<V2>(&drv, &output)?, body).await
}
