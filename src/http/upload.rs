//! `/upload`: the address builders push to (`nix copy --to 'http://HOST/upload'`, netrc for
//! HOST). Nix appends the cache layout to it, so it serves the part of the protocol Nix's
//! uploader uses: `nix-cache-info`, narinfo and NAR probes, and the PUTs.
//!
//! Everything here needs a write token, GET and HEAD included: probes of this address are a
//! builder's, and they tell what the store holds, which in private mode is not for readers.
//!
//! Its probes answer from the store alone: never the narinfo memory cache or its remembered
//! misses, never an upstream. `nix copy --to` uploads exactly the paths its probes call
//! missing, so a path found at an upstream would never be uploaded, and every probe of a path
//! the store lacks would be a request to the upstream. A narinfo is answered as the store
//! holds it (not re-signed): Nix keeps what it reads here in its own cache, keyed by this URL,
//! never by the root URL it substitutes from.
//!
//! The PUT handlers are the root's ([`super::nar::put`] and the others): one upload path.

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use axum::routing::get;
use axum::Router;

use super::object::{self, Kind};
use super::{cache_info, debuginfo, log, nar, realisation, AppState};
use crate::config::Scope;
use crate::error::Error;
use crate::nix::{NarFileName, TopLevelFile};
use crate::store::{self, object_key};

/// The routes under `/upload`, all behind a write token.
pub(super) fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/nix-cache-info", get(cache_info::get).put(cache_info::put))
        .route("/nar/{file}", get(nar_get).head(nar_head).put(nar::put))
        .route("/log/{drv}", get(log_get).head(log_head).put(log::put))
        .route(
            "/debuginfo/{name}",
            get(debuginfo_get).head(debuginfo_head).put(debuginfo::put),
        )
        .route(
            "/realisations/{id}",
            get(realisation_get)
                .head(realisation_head)
                .put(realisation::put),
        )
        .route(
            "/build-trace/{drv}/{output}",
            get(build_trace_get::<false>)
                .head(build_trace_head::<false>)
                .put(realisation::put_build_trace::<false>),
        )
        .route(
            "/build-trace-v2/{drv}/{output}",
            get(build_trace_get::<true>)
                .head(build_trace_head::<true>)
                .put(realisation::put_build_trace::<true>),
        )
        .route(
            "/{file}",
            get(file_get).head(file_head).put(super::put_file),
        )
        .route_layer(middleware::from_fn_with_state(state, authorize))
}

/// Lets a write token through; every answer here is about the store right now, for one
/// builder, so no cache on the way may keep it (a 404 of a probe above all: the NAR's is
/// answered without asking the store).
async fn authorize(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let mut res = super::check(&st, req, next, Scope::Write, false).await;
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// GET `/upload/<hash>.narinfo` or `.ls`: as stored.
async fn file_get(
    State(st): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    match super::top_level(&file)? {
        TopLevelFile::NarInfo(h) => {
            let raw = stored_narinfo(&st, h).await?;
            let len = raw.len();
            Ok(narinfo_response(raw.into_response(), len))
        }
        TopLevelFile::Listing(h) => {
            object::get(&*st.store, &object_key::listing(h), Kind::Listing, &headers).await
        }
    }
}

async fn file_head(
    State(st): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    match super::top_level(&file)? {
        TopLevelFile::NarInfo(h) => {
            let len = stored_narinfo(&st, h).await?.len();
            Ok(narinfo_response(().into_response(), len))
        }
        TopLevelFile::Listing(h) => {
            object::head(&*st.store, &object_key::listing(h), Kind::Listing, &headers).await
        }
    }
}

/// The narinfo the store holds for `h`, bounded in size and time like the root's reads.
/// The path is named in the next upload record, found or not: a builder probes the closure it
/// is about to upload (see [`crate::gc::access::AccessLog::record_probe`]). Found, it is also
/// a use, as a read is: a builder pushing a closure the cache has already keeps it.
async fn stored_narinfo(
    st: &AppState,
    h: crate::nix::StorePathHash,
) -> Result<bytes::Bytes, Error> {
    st.access.record_probe(h);
    let limit = Some(st.config.store.timeout);
    match store::narinfo_bytes(&*st.store, h, limit).await? {
        // Its NAR was found missing (a collection deleted it under an upload, a lifecycle
        // rule, a hand): "absent", so that the builder uploads the path again, NAR first,
        // which makes it whole (the root hides it meanwhile, see crate::cache::missing_nars).
        // Found present, the builder would skip it in every later copy.
        Some(raw) if st.live().missing_nars.points_to_missing(&raw) => Err(Error::NotFound),
        Some(raw) => {
            // One the root cannot serve (no narinfo of this path: CRLF, empty, another
            // path's; or naming its NAR elsewhere than `nar/<file>`) is absent here, so that
            // the builder uploads the path and its narinfo replaces it (see
            // Uploader::stored_to_replace), rather than skipping it in every copy.
            let sd = &st.config.store_dir;
            let parsed = crate::nix::NarInfo::parse_for(&raw, sd, h)
                .map(Some)
                .map_err(|reason| Error::BadObject {
                    key: object_key::narinfo(h),
                    reason,
                });
            if let Some(why) = crate::upload::unservable(&parsed) {
                tracing::warn!(key = %object_key::narinfo(h), cause = %why, "stored narinfo cannot be served: absent to builders, whose upload replaces it");
                return Err(Error::NotFound);
            }
            // The builder will skip the path and upload on top of it: recorded as an
            // upload's before the answer, then looked at again, so that a collection running
            // now either deleted it before the record (absent: the builder uploads it) or
            // sees the record and writes it back. Found present without it, the path was
            // deleted after a successful `nix copy` that relied on it.
            // The record's write is shared by the probes found at once, and bounded by the
            // store's own timeout: one caller giving up must not cancel it for the others.
            st.access.record_found(h).await?;
            let key = object_key::narinfo(h);
            let head = st.store.head(&key);
            let still = match limit {
                Some(limit) => tokio::time::timeout(limit, head)
                    .await
                    .map_err(|_| crate::store::StoreError::Timeout(limit.as_secs()))?,
                None => head.await,
            }?;
            if still.is_none() {
                st.uploader.probed_absent(h);
                return Err(Error::NotFound);
            }
            st.access.record_path(h);
            Ok(raw)
        }
        None => {
            // The upload of this path that usually follows need not read it again.
            st.uploader.probed_absent(h);
            Err(Error::NotFound)
        }
    }
}

fn narinfo_response(mut res: Response, len: usize) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/x-nix-narinfo"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    res
}

async fn nar_get(
    State(st): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let f: NarFileName = file.parse()?;
    let res = object::get(&*st.store, &object_key::nar(&f), Kind::Nar, &headers).await?;
    Ok(super::nar::lifetime(&st, &f, res))
}

/// HEAD `/upload/nar/<file>`: Nix sends it right before each NAR upload, and skips the upload
/// on 200. A NAR stored as sent is answered 404 without asking the store: sending it again is
/// harmless (the same bytes under the same name), and the PUT asks the store before taking the
/// body of a large one ([`crate::upload::Uploader::probe_asks_store`]). But not while the
/// store is failing ([`super::state::App::store_failing`]): the store is asked, and its failure
/// answered, so that a proxy in front of replicas sends this builder's upload to another
/// replica instead of this one, whose PUT would fail after the body was sent. A NAR re-encoded
/// on upload (`upload.compression`) is looked up, also under the name it was stored as.
async fn nar_head(State(st): State<AppState>, Path(file): Path<String>) -> Result<Response, Error> {
    let f: NarFileName = file.parse()?;
    // Its upload, or the narinfo relying on it, follows at once: their record is written
    // meanwhile, starting now rather than after this answer.
    st.uploader.nar_expected(&f);
    // A copy found bad is absent to builders, so that the next upload stores over it.
    if st.uploader.nar_found_bad(&f) {
        return Err(Error::NotFound);
    }
    if !st.uploader.probe_asks_store(&f) && !st.store_failing() {
        return Err(Error::NotFound);
    }
    let size = match st.store.head(&object_key::nar(&f)).await? {
        Some(size) => Some(size),
        None => st.uploader.reencoded_size(&f).await?,
    };
    let Some(size) = size else {
        st.uploader.nar_probed_absent(&f);
        return Err(Error::NotFound);
    };
    Ok(object::head_response(size, Kind::Nar))
}

async fn log_get(
    State(st): State<AppState>,
    log::Drv(drv): log::Drv,
    headers: HeaderMap,
) -> Result<Response, Error> {
    object::get(&*st.store, &log::key(&drv)?, Kind::Log, &headers).await
}

async fn log_head(
    State(st): State<AppState>,
    log::Drv(drv): log::Drv,
    headers: HeaderMap,
) -> Result<Response, Error> {
    object::head(&*st.store, &log::key(&drv)?, Kind::Log, &headers).await
}

async fn debuginfo_get(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    object::get(
        &*st.store,
        &debuginfo::key(&name)?,
        Kind::DebugInfo,
        &headers,
    )
    .await
}

async fn debuginfo_head(
    State(st): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    object::head(
        &*st.store,
        &debuginfo::key(&name)?,
        Kind::DebugInfo,
        &headers,
    )
    .await
}

async fn realisation_get(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    object::get(
        &*st.store,
        &realisation::realisation_key(&id)?,
        Kind::Realisation,
        &headers,
    )
    .await
}

async fn realisation_head(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    object::head(
        &*st.store,
        &realisation::realisation_key(&id)?,
        Kind::Realisation,
        &headers,
    )
    .await
}

async fn build_trace_get<const V2: bool>(
    State(st): State<AppState>,
    Path((drv, output)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let key = realisation::build_trace_key::<V2>(&drv, &output)?;
    object::get(&*st.store, &key, Kind::Realisation, &headers).await
}

async fn build_trace_head<const V2: bool>(
    State(st): State<AppState>,
    Path((drv, output)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    object::head(
        &*st.store,
        &realisation::build_trace_key::<V2>(&drv, &output)?,
        Kind::Realisation,
        &headers,
    )
    .await
}
