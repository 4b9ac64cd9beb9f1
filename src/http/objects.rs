//! Objects passed through from the store as they are: NARs (`/nar/<file>`), listings
//! (`/<hash>.ls`), build logs (`/log/<drv>`) and CA realisations (`/realisations/<id>.doi`,
//! `/build-trace/<drv>/<output>`).
//!
//! Bodies are streamed, never buffered whole. A store failure mid-body surfaces as a stream
//! error, which makes hyper abort the connection: the client sees a failed transfer, never a
//! clean short body.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::cache::nar::Lookup;
use crate::error::Error;
use crate::nix::{NarFileName, OutputName, RealisationName, StorePathBaseName};
use crate::store::{keys, ByteRange, Object};

#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Nar,
    Listing,
    Log,
    Realisation,
}

impl Kind {
    fn content_type(self) -> &'static str {
        match self {
            Self::Nar => "application/x-nix-nar",
            Self::Listing | Self::Realisation => "application/json",
            Self::Log => "text/plain; charset=utf-8",
        }
    }

    fn cache_control(self) -> &'static str {
        match self {
            // Content-addressed by FileHash: never changes.
            Self::Nar => "public, max-age=31536000, immutable",
            Self::Listing | Self::Log | Self::Realisation => "public, max-age=3600",
        }
    }
}

fn range_of(headers: &HeaderMap) -> Option<ByteRange> {
    headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(ByteRange::parse_header)
}

fn set_common_headers(res: &mut Response, kind: Kind) {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(kind.content_type()),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(kind.cache_control()),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

/// A streamed 200 or 206 for `obj`.
fn object_response(obj: Object, kind: Kind) -> Response {
    let mut res = Body::from_stream(obj.body).into_response();
    res.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(obj.length));
    if let Some(cr) = obj.range {
        *res.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{}", cr.start, cr.end, cr.total))
        {
            res.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    set_common_headers(&mut res, kind);
    res
}

/// An empty 200 with the headers a GET would have.
fn head_response(size: u64, kind: Kind) -> Response {
    let mut res = ().into_response();
    res.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    set_common_headers(&mut res, kind);
    res
}

/// Streams `key` (or answers a HEAD for it) with the headers for `kind`.
pub(super) async fn serve(
    st: &AppState,
    key: String,
    kind: Kind,
    req_headers: &HeaderMap,
    head: bool,
) -> Result<Response, Error> {
    if head {
        let size = st.reads.head(&key).await?.ok_or(Error::NotFound)?;
        return Ok(head_response(size, kind));
    }
    let obj = st
        .reads
        .get(&key, range_of(req_headers))
        .await?
        .ok_or(Error::NotFound)?;
    Ok(object_response(obj, kind))
}

pub(super) async fn nar(
    State(st): State<AppState>,
    method: Method,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let f: NarFileName = file.parse()?;
    if method == Method::HEAD {
        // Also finds a NAR stored re-encoded under another extension, so that clients
        // checking before an upload do not upload it again.
        let size = st.uploader.nar_size(&f).await?.ok_or(Error::NotFound)?;
        return Ok(head_response(size, Kind::Nar));
    }
    let res = get_nar(&st, &f, &headers).await;
    // Its narinfo now answers 404 (see crate::cache::missing_nars).
    if matches!(res, Err(Error::NotFound)) {
        st.missing_nars.seen_missing(f.as_str()).await;
    }
    res
}

async fn get_nar(st: &AppState, f: &NarFileName, headers: &HeaderMap) -> Result<Response, Error> {
    let key = keys::nar(f);
    if let Some(cache) = &st.nars {
        match cache.get(f, &key, range_of(headers), &st.reads).await? {
            Lookup::Object(obj) => return Ok(object_response(obj, Kind::Nar)),
            Lookup::NotFound => return Err(Error::NotFound),
            Lookup::Bypass => {}
        }
    }
    serve(st, key, Kind::Nar, headers, false).await
}

pub(super) async fn log(
    State(st): State<AppState>,
    method: Method,
    Path(drv): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let d: StorePathBaseName = drv.parse()?;
    serve(
        &st,
        keys::log(&d),
        Kind::Log,
        &headers,
        method == Method::HEAD,
    )
    .await
}

pub(super) async fn realisation(
    State(st): State<AppState>,
    method: Method,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let r: RealisationName = id.parse()?;
    let key = keys::realisation(&r);
    serve(
        &st,
        key,
        Kind::Realisation,
        &headers,
        method == Method::HEAD,
    )
    .await
}

pub(super) async fn build_trace(
    State(st): State<AppState>,
    method: Method,
    Path((drv, output)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let d: StorePathBaseName = drv.parse()?;
    let o: OutputName = output.parse()?;
    let key = keys::build_trace(&d, &o);
    serve(
        &st,
        key,
        Kind::Realisation,
        &headers,
        method == Method::HEAD,
    )
    .await
}
