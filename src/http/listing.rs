//! `/<hash>.ls`: the JSON listing of a path's files, written by `nix copy` with
//! `write-nar-listing=true` (newer Nix uses it for `nix store ls` instead of downloading the
//! whole NAR). Served from the read path as stored; uploaded as sent, decoded first if sent
//! with a `Content-Encoding` (newer Nix's `ls-compression`).
//!
//! These are called from the `/{file}` route in [`super`], which parses the name and
//! dispatches `.narinfo` and `.ls` names.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse as _, Response};

use super::object::{self, Kind};
use super::AppState;
use crate::error::Error;
use crate::nix::StorePathHash;
use crate::store::object_key;
use crate::upload::MAX_LISTING_BYTES;

pub(super) async fn get(
    st: &AppState,
    h: StorePathHash,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::get(&*reads, &object_key::listing(h), Kind::Listing, headers).await
}

pub(super) async fn head(
    st: &AppState,
    h: StorePathHash,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    let reads = st.live().reads.clone();
    object::head(&*reads, &object_key::listing(h), Kind::Listing, headers).await
}

pub(super) async fn put(
    st: &AppState,
    h: StorePathHash,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let fate = st
        .uploader
        .put_listing(
            h,
            object::decoded_body_stream(st, headers, body, MAX_LISTING_BYTES)?,
            MAX_LISTING_BYTES,
        )
        .await?;
    let mut res = StatusCode::CREATED.into_response();
    if fate == crate::upload::ListingFate::Dropped {
        // Taken (Nix fails a whole copy on a refused listing), counted apart in the metrics.
        res.extensions_mut()
            .insert(crate::error::ErrorLabel("dropped"));
    }
    Ok(res)
}
