//! `/debuginfo/<build id>`: debug info links, JSON naming the NAR that holds a debug file and
//! the file within it (see [`crate::nix::debuginfo`]). `nix copy --to 'URL?index-debug-info=true'`
//! uploads one for each debug file of a path (a `HEAD` first, then a `PUT` if it is missing);
//! dwarffs and other fetchers of debug symbols read them. Served from the read path as stored;
//! a bare build id (dwarffs asks for `debuginfo/<build id>`) finds the link Nix uploaded as
//! `<build id>.debug`.

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

/// The keys a read of `name` tries, in order: the name as asked for, then, for a bare build id
/// (what dwarffs asks for), the name Nix's uploader gives the link (`<build id>.debug`).
fn keys(name: &str) -> Result<Vec<String>, Error> {
    let mut keys = vec![key(name)?];
    if !name.ends_with(".debug") {
        keys.push(key(&format!("{name}.debug"))?);
    }
    Ok(keys)
}

/// [`keys`] for a read: a name that is no build id Nix indexes (40 hex digits; lld's 8-byte
/// ids, md5 and uuid ones are 16 or 32) is simply not here, a 404, as fetchers of debug
/// symbols ask for whatever build id the binary they load carries, and take a 400 as a hard
/// error. (An upload of such a name is refused with 400.)
fn read_keys(name: &str) -> Result<Vec<String>, Error> {
    keys(name).map_err(|e| match e {
        Error::BadName(_) => Error::NotFound,
        e => e,
    })
}

/// The first of `keys` that `read` finds.
async fn first_found<F, Fut>(keys: Vec<String>, read: F) -> Result<Response, Error>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<Response, Error>>,
{
    let mut missing = Error::NotFound;
    for key in keys {
        match read(key).await {
            Err(e @ (Error::NotFound | Error::NotFoundForNow)) => missing = e,
            found => return found,
        }
    }
    Err(missing)
}

pub(super) async fn get(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    first_found(read_keys(&name)?, |key| {
        let (reads, headers) = (reads.clone(), &headers);
        async move { object::get(&*reads, &key, Kind::DebugInfo, headers).await }
    })
    .await
}

pub(super) async fn head(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    first_found(read_keys(&name)?, |key| {
        let (reads, headers) = (reads.clone(), &headers);
        async move { object::head(&*reads, &key, Kind::DebugInfo, headers).await }
    })
    .await
}

pub(super) async fn put(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, Error> {
    let n: DebugInfoName = name.parse()?;
    let (raw, _room) = object::read_decoded_body(&st, &headers, body, MAX_DEBUGINFO_BYTES).await?;
    st.uploader.put_debuginfo(&n, raw).await?;
    Ok(StatusCode::CREATED)
}
