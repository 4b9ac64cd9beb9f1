//! `/log/<drv>`: build logs, plain text, named after the derivation's store path base name
//! (`nix log --store URL OUT` reads `Deriver:` from the narinfo, then GETs this). Served from
//! the read path as stored; uploaded by `nix copy --to` with `PUT /log/<drv>`.

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

pub(super) async fn get(
    State(st): State<AppState>,
    Path(drv): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let d: StorePathBaseName = drv.parse()?;
    object::get(&st, &object_key::log(&d), Kind::Log, &headers).await
}

pub(super) async fn head(
    State(st): State<AppState>,
    Path(drv): Path<String>,
) -> Result<Response, Error> {
    let d: StorePathBaseName = drv.parse()?;
    object::head(&st, &object_key::log(&d), Kind::Log).await
}

pub(super) async fn put(
    State(st): State<AppState>,
    Path(drv): Path<String>,
    body: Body,
) -> Result<StatusCode, Error> {
    let d: StorePathBaseName = drv.parse()?;
    st.uploader
        .put_plain(
            &object_key::log(&d),
            object::body_stream(body),
            MAX_LOG_BYTES,
        )
        .await?;
    Ok(StatusCode::CREATED)
}
