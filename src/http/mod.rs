//! The HTTP layer: the route table, shared state, and the server loop.
//!
//! Routes mirror the binary cache layout, one module per endpoint family with its GET, HEAD and
//! PUT side by side: `cache_info`, `narinfo`, `nar`, `log`, `debuginfo`, `listing`, `realisation`
//! (both `/realisations/` and `/build-trace/`), `health`; `object` holds what the object
//! endpoints share. axum cannot route `/{hash}.narinfo` (a parameter with a static suffix), so
//! `/{file}` and `/nar/{file}` take the whole name and the handlers parse it into a validated
//! type before anything reaches the store; `/{file}` is dispatched here to narinfo or listing.
//!
//! Two addresses serve the cache layout:
//!
//! - the root (`/`) is for substitution: lookups go through the narinfo memory cache and the
//!   upstreams, and narinfos are served signed by the server;
//! - [`upload`] (`/upload`) is for builders (`nix copy --to http://HOST/upload`): everything
//!   there needs a write token, and its probes answer from the store alone. Nix keeps the
//!   narinfos it uploads in its own lookup cache, keyed by the URL it uploaded to; with its
//!   own URL for uploads, those unsigned copies never stand in for the root URL's signed ones.
//!
//! The root still accepts PUTs, for builders set up before `/upload` existed (see
//! docs/uploads.md for the hazard); the first one logs a warning.
//!
//! PUTs are authorized by the middleware before their handler runs (so a refused PUT never
//! reads its body, and hyper never sends `100 Continue` for it), and verified by
//! [`crate::upload`]. The state is in [`state`]: what a reload replaces is behind one swap.

mod before_body;
mod cache_info;
mod debuginfo;
mod drain;
mod health;
mod listing;
mod log;
mod metrics;
mod nar;
mod narinfo;
mod object;
mod prefetch;
mod realisation;
mod request_id;
mod server;
mod state;
mod status;
mod upload;

#[cfg(test)]
mod private_tests;
#[cfg(test)]
mod serving_tests;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::Method;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tracing::Instrument as _;

use crate::auth::Decision;
use crate::config::Scope;
use crate::error::Error;
use crate::nix::TopLevelFile;

pub use server::{serve, serve_metrics};
pub use state::{App, AppState, Live, ReloadError, StartError};

/// The router with every route and middleware.
pub fn app(state: AppState) -> Router {
    let cache = Router::new()
        .route("/nix-cache-info", get(cache_info::get).put(cache_info::put))
        .route("/nar/{file}", get(nar::get).head(nar::head).put(nar::put))
        .route("/log/{drv}", get(log::get).head(log::head).put(log::put))
        .route(
            "/debuginfo/{name}",
            get(debuginfo::get)
                .head(debuginfo::head)
                .put(debuginfo::put),
        )
        .route(
            "/realisations/{id}",
            get(realisation::get)
                .head(realisation::head)
                .put(realisation::put),
        )
        .route(
            "/build-trace/{drv}/{output}",
            get(realisation::get_build_trace::<false>)
                .head(realisation::head_build_trace::<false>)
                .put(realisation::put_build_trace::<false>),
        )
        .route(
            "/build-trace-v2/{drv}/{output}",
            get(realisation::get_build_trace::<true>)
                .head(realisation::head_build_trace::<true>)
                .put(realisation::put_build_trace::<true>),
        )
        .route("/status", get(status::get))
        .route("/{file}", get(get_file).head(head_file).put(put_file));
    // On the main listener, /metrics is behind the read token like the cache in private mode;
    // with a listener of its own, only there ([`metrics_app`]).
    let cache = if state.config.metrics_listen.is_none() {
        cache.route("/metrics", get(metrics::get))
    } else {
        cache
    };
    let cache = cache.route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .nest("/upload", upload::routes(state.clone()))
        .merge(cache)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            default_cache_headers,
        ))
        .layer(middleware::from_fn(uploads_wait_out_store_restarts))
        .layer(middleware::from_fn(drain::drain_unread))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn(metrics::observe))
        .layer(middleware::from_fn(request_id::request_span))
        .with_state(state)
}

/// A PUT is served as an upload ([`crate::store::serving_upload`]): its store requests that
/// could not connect are made again for seconds (a store restarting), since Nix 2.8 retries a
/// failed PUT without its body, which fails the copy.
async fn uploads_wait_out_store_restarts(req: Request, next: middleware::Next) -> Response {
    if req.method() == axum::http::Method::PUT {
        crate::store::serving_upload(next.run(req)).await
    } else {
        next.run(req).await
    }
}

/// A handler that panicked (a bug): answered 500 and logged with its request, instead of the
/// connection dropped without an answer, which clients take for a network failure. Counted
/// in the metrics as any 500.
fn panicked(cause: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = cause
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| cause.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    tracing::error!(cause = %what, "the request's handler panicked (a bug in cellar: please report it)");
    Error::Upload(crate::error::UploadError::Internal(
        "the server failed on this request".into(),
    ))
    .into_response()
}

/// The router of `metrics_listen`: `/metrics`, and the health checks, unauthenticated (the
/// operator chose who reaches that address). Its connections are not counted against
/// `max_connections`: a probe there is answered however many clients the main listener holds.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics::get))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(not_found)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(middleware::from_fn(metrics::observe))
        .layer(middleware::from_fn(request_id::request_span))
        .with_state(state)
}

async fn not_found() -> Error {
    Error::NotFound
}

/// The top-level file `/{file}` names. Anything that is not a cache file name is simply not
/// here (favicon.ico, robots.txt, …): 404, not 400.
fn top_level(file: &str) -> Result<TopLevelFile, Error> {
    file.parse().map_err(|_| Error::NotFound)
}

async fn get_file(
    State(st): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    match top_level(&file)? {
        TopLevelFile::NarInfo(h) => narinfo::get(&st, h).await,
        TopLevelFile::Listing(h) => listing::get(&st, h, &headers).await,
    }
}

async fn head_file(
    State(st): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    match top_level(&file)? {
        TopLevelFile::NarInfo(h) => narinfo::head(&st, h).await,
        TopLevelFile::Listing(h) => listing::head(&st, h, &headers).await,
    }
}

async fn put_file(
    State(st): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    match top_level(&file)? {
        TopLevelFile::NarInfo(h) => narinfo::put(&st, h, &headers, body)
            .await
            .map(IntoResponse::into_response),
        TopLevelFile::Listing(h) => listing::put(&st, h, &headers, body).await,
    }
}

/// Reads need a `read` token in private mode; uploads (`PUT`) need a `write` token. No route
/// here takes another method: such a request is answered 405 here, with no credentials asked
/// for and no upload warned of (and never passed on, should a route take one some day). Its
/// `Allow` is the route's own methods, which the router adds to the answer.
async fn authorize(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let scope = match *req.method() {
        Method::GET | Method::HEAD => Scope::Read,
        Method::PUT => Scope::Write,
        _ => return StatusCode::METHOD_NOT_ALLOWED.into_response(),
    };
    check(&st, req, next, scope, true).await
}

/// Uploads through the root URL keep working, but once per process the log says why they
/// should move (docs/uploads.md, "Why a separate address").
fn warn_root_upload_once(st: &AppState) {
    if !st.root_upload_warned.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "an upload was sent to the root URL; point builders at /upload \
             (`nix copy --to http://HOST/upload`): a builder that also substitutes from \
             the root URL as the same user can fail with \"lacks a valid signature\""
        );
    }
}

/// Lets the request through if its credentials allow `scope`, else answers 401/403. `root`:
/// the request came to the root URL, where an upload is warned of (once it is allowed: a
/// scanner's refused PUT does not use the warning up).
async fn check(st: &AppState, req: Request, next: Next, scope: Scope, root: bool) -> Response {
    let decision = st.live().tokens.check(req.headers(), scope);
    match decision {
        Decision::Allowed(Some(token)) if scope == Scope::Write => {
            if root {
                warn_root_upload_once(st);
            }
            // Upload log lines carry the token's name.
            async move {
                // nix-cache-info is not the store's.
                if req.method() == Method::PUT && !req.uri().path().ends_with("/nix-cache-info") {
                    if let Err(refused) = before_body::store_answers(st, req.headers()).await {
                        return refused;
                    }
                }
                next.run(req).await
            }
            .instrument(tracing::info_span!("upload", token = %token))
            .await
        }
        Decision::Allowed(_) => next.run(req).await,
        Decision::Missing => Error::Unauthorized.into_response(),
        Decision::Invalid => {
            if scope == Scope::Read {
                warn_refused_read(st);
            } else {
                warn_refused_upload(st, "a token that matches none configured");
            }
            Error::Forbidden("invalid token").into_response()
        }
        Decision::InsufficientScope(name) => {
            // Said apart from the unknown tokens' refusals (one would hide the other for a
            // minute), with the token's name: a known builder whose scope is wrong.
            if scope == Scope::Write && once_a_minute(&st.refused_scope_warned) {
                tracing::warn!(
                    "an upload with token {name:?}, which has no write scope, was refused \
                     (403): give it `scopes = [\"write\"]` in auth.tokens, or the builder a \
                     write token (said at most once a minute)"
                );
            }
            Error::Forbidden("this token may not do that (scope)").into_response()
        }
    }
}

/// Whether a warning last said at `last` may be said again (at most once a minute), noting
/// now as said if so.
fn once_a_minute(last: &std::sync::Mutex<Option<tokio::time::Instant>>) -> bool {
    crate::sync::once_per(last, std::time::Duration::from_secs(60))
}

/// A read refused for a token that matches none (a revoked one, a typo in a netrc file) fails
/// nothing visibly: Nix takes a refused narinfo for a path the cache lacks, remembers that for
/// an hour (`narinfo-cache-negative-ttl`) and builds the path instead. So the log says so, at
/// most once a minute.
fn warn_refused_read(st: &AppState) {
    if once_a_minute(&st.refused_read_warned) {
        tracing::warn!(
            "a read with a token that matches none configured was refused (403): Nix takes \
             that for a path the cache lacks and builds it instead, for an hour; check the \
             clients' netrc file (said at most once a minute)"
        );
    }
}

/// An upload refused for its token (`why`): Nix 2.8 says only that the upload URL "does not
/// appear to be a binary cache" when its first request, for `nix-cache-info`, was refused
/// (a refusal later in a copy, a token rotated meanwhile, it shows as the 403 and its body),
/// so the log says why, at most once a minute. A request without a token is not said (curl's
/// first try before it sends netrc credentials).
fn warn_refused_upload(st: &AppState, why: &str) {
    if once_a_minute(&st.refused_upload_warned) {
        tracing::warn!(
            "an upload with {why} was refused (403): `nix copy --to` then fails, saying the \
             upload URL does not appear to be a binary cache (at its start) or HTTP error 403; \
             check the builder's netrc file (`machine` the host name without a port, \
             `password` a write token) (said at most once a minute)"
        );
    }
}

/// Lets 404s be cached briefly (clients and proxies), unless a handler decided otherwise; in
/// private mode, keeps shared caches from storing anything.
async fn default_cache_headers(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let writing = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    let mut res = next.run(req).await;
    // The router's own 405 has no body: one line, as every error has.
    if res.status() == StatusCode::METHOD_NOT_ALLOWED
        && !res.headers().contains_key(header::CONTENT_TYPE)
    {
        let (mut parts, _) = res.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        res = Response::from_parts(parts, axum::body::Body::from("method not allowed\n"));
    }
    // A failed upload (or any request that is no read) is kept by no cache, whatever it is.
    if writing && (res.status().is_client_error() || res.status().is_server_error()) {
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if res
        .extensions()
        .get::<crate::error::StoreFailed>()
        .is_some()
    {
        st.note_store_failed();
    }
    if let Some(crate::error::StoreFault(label)) = res.extensions().get() {
        st.note_store_answer_failed(label);
    }
    let config = &st.live().config;
    if config.auth.private {
        let private = res
            .headers()
            .get(header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("public"))
            .and_then(|rest| HeaderValue::from_str(&format!("private{rest}")).ok());
        if let Some(v) = private {
            res.headers_mut().insert(header::CACHE_CONTROL, v);
        }
    }
    if res.status() == StatusCode::NOT_FOUND && !res.headers().contains_key(header::CACHE_CONTROL) {
        let scope = if config.auth.private {
            "private"
        } else {
            "public"
        };
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{scope}, max-age={}",
            config.not_found_max_age.as_secs()
        )) {
            res.headers_mut().insert(header::CACHE_CONTROL, v);
        }
    }
    res
}
