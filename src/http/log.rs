//! `/log/<drv>`: build logs, plain text, named after the derivation's store path base name
//! (`nix log --store URL OUT` reads `Deriver:` from the narinfo, then GETs this). Served from
//! the read path as stored; uploaded by `nix copy --to` with `PUT /log/<drv>`, decoded first
//! if sent with a `Content-Encoding` (newer Nix's `log-compression`).

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};

use super::object::{self, Kind};
use super::AppState;
use crate::error::Error;
use crate::nix::StorePathBaseName;
use crate::store::object_key;
use crate::upload::MAX_LOG_BYTES;

/// The derivation named by `/log/<drv>`, as sent: with a `?` and all that follows it when
/// the client did not percent-encode one. `?` is allowed in store path names, and Nix 2.8
/// sends the name as it is, so `<hash>-a?b.drv` arrives as the path `<hash>-a` and the query
/// `b.drv`; taken apart, the log was stored under a cut name, or refused (`<hash>-?x.drv`).
/// No log URL has a query of its own.
pub(super) struct Drv(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Drv {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(drv) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| e.into_response())?;
        // Decoded as the path is (a name holds no `%`: one left makes it invalid).
        Ok(Self(match parts.uri.query() {
            Some(rest) => {
                let rest = percent_encoding::percent_decode_str(rest).decode_utf8_lossy();
                format!("{drv}?{rest}")
            }
            None => drv,
        }))
    }
}

/// The store key of the log of `drv` (a derivation's base name, validated).
pub(super) fn key(drv: &str) -> Result<String, Error> {
    let d: StorePathBaseName = drv.parse()?;
    Ok(object_key::log(&d))
}

pub(super) async fn get(
    State(st): State<AppState>,
    Drv(drv): Drv,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::get(&*reads, &key(&drv)?, Kind::Log, &headers).await
}

pub(super) async fn head(
    State(st): State<AppState>,
    Drv(drv): Drv,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::head(&*reads, &key(&drv)?, Kind::Log, &headers).await
}

pub(super) async fn put(
    State(st): State<AppState>,
    Drv(drv): Drv,
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
