//! Realisations of content-addressed derivations (JSON), under each name Nix has used:
//! `/realisations/<drvhash>!<output>.doi` (Nix up to ~2.32), `/build-trace/<drv>/<output>`
//! and `/build-trace-v2/<drv>/<output>.doi` (Nix 2.35, "build trace entries"). Each is read
//! under its own key (one is not translated into another). A realisation comes from the
//! store, else from an upstream that signed it with one of its keys, and is served signed by
//! the server's keys, as narinfos are (see [`served`]); a build trace comes from the store
//! alone, as stored. An upload is checked
//! ([`crate::upload::Uploader::put_realisation`]): it must name a path in the cache, and a
//! published one is kept (201 when written, 200 when it was there already, also when the
//! upload names another path: another build's).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;

use super::object::{self, Kind};
use super::AppState;
use crate::error::Error;
use crate::nix::{OutputName, Realisation, RealisationName, StorePathBaseName};
use crate::store::{object_key, StoreError};
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

/// The realisation under `key` as served. Under `realisations/<id>.doi` (`id` given): from the
/// store, else from an upstream that signed it, and signed by every server key; its `id`
/// must be the one its name says (Nix does not compare them: another output's, signed,
/// would send clients to that output's path), else it is a corrupt object (502), not passed
/// on, and so is one that is no realisation. A build trace (no `id` given, the layouts of
/// later Nix, whose signatures cellar can neither check nor make) is served from the store as
/// stored, and never taken from an upstream.
async fn served(st: &AppState, key: &str, id: Option<&RealisationName>) -> Result<Bytes, Error> {
    let live = st.live();
    let corrupt =
        |why: String| StoreError::Other(format!("corrupt object {key} in the store: {why}"));
    let raw = match (st.store.get_bytes(key, MAX_REALISATION_BYTES).await?, id) {
        (Some(raw), _) => raw,
        (None, Some(id)) => match live.upstreams.realisation(key, id).await? {
            Some(raw) => raw,
            None => return Err(Error::NotFound),
        },
        (None, None) => return Err(Error::NotFound),
    };
    let Some(id) = id else {
        return Ok(raw);
    };
    let r = Realisation::parse(&raw).map_err(|e| corrupt(format!("not a realisation: {e}")))?;
    match r.id() {
        Some(own) if !id.names(own) => {
            return Err(corrupt(format!("the realisation of another output ({own})")).into())
        }
        _ => {}
    }
    Ok(
        match r.signed_with(
            &live.signing_keys,
            live.config.signing.keep_existing_signatures,
        ) {
            Some(signed) => Bytes::from(signed),
            None => raw,
        },
    )
}

/// A GET's answer (or, with `head`, its headers) for the realisation under `key` (of output
/// `id`, see [`served`]): whole, whatever range is asked (it is made for each request, and a
/// few hundred bytes).
async fn answer(
    st: &AppState,
    key: &str,
    id: Option<&RealisationName>,
    head: bool,
) -> Result<Response, Error> {
    let body = served(st, key, id).await.map_err(|e| match e {
        // A lookup a client moves on from, as for logs and listings (`object::lookup`).
        Error::Store(StoreError::UpstreamDown(_)) => Error::NotFoundForNow,
        e => e,
    })?;
    Ok(object::whole_response(body, Kind::Realisation, head))
}

pub(super) async fn get(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, Error> {
    let id: RealisationName = name.parse()?;
    answer(&st, &object_key::realisation(&id), Some(&id), false).await
}

pub(super) async fn head(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, Error> {
    let id: RealisationName = name.parse()?;
    answer(&st, &object_key::realisation(&id), Some(&id), true).await
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
) -> Result<Response, Error> {
    answer(&st, &build_trace_key::<V2>(&drv, &output)?, None, false).await
}

pub(super) async fn head_build_trace<const V2: bool>(
    State(st): State<AppState>,
    Path((drv, output)): Path<(String, String)>,
) -> Result<Response, Error> {
    answer(&st, &build_trace_key::<V2>(&drv, &output)?, None, true).await
}

pub(super) async fn put_build_trace<const V2: bool>(
    State(st): State<AppState>,
    Path((drv, output)): Path<(String, String)>,
    body: Body,
) -> Result<StatusCode, Error> {
    put_checked(&st, &build_trace_key::<V2>(&drv, &output)?, body).await
}
