//! The HTTP layer: the route table, shared state, and the server loop.
//!
//! Routes mirror the binary cache layout. axum cannot route `/{hash}.narinfo` (a parameter with
//! a static suffix), so `/{file}` and `/nar/{file}` take the whole name and the handlers parse it
//! into a validated type before anything reaches the store.

mod cache_info;
mod health;
mod narinfo;
mod objects;
mod upload;

#[cfg(test)]
mod tests;

use std::future::{Future, IntoFuture as _};
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::IntoResponse as _;
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt as _;
use axum::Router;
use bytes::Bytes;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;
use tracing::Instrument as _;

use crate::auth::{Decision, Tokens};
use crate::cache::missing_nars::MissingNars;
use crate::cache::nar::NarCache;
use crate::cache::narinfo::NarInfoCache;
use crate::config::Config;
use crate::config::Scope;
use crate::error::Error;
use crate::gc::access::AccessLog;
use crate::nix::SecretKey;
use crate::store::Store;
use crate::upload::Uploader;
use crate::upstream::{Upstreams, WithUpstreams};

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<App>);

pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub tokens: Tokens,
    pub uploader: Uploader,
    pub narinfos: NarInfoCache,
    /// `Cache-Control` of narinfo answers, built once.
    pub narinfo_cache_control: HeaderValue,
    pub nars: Option<Arc<NarCache>>,
    pub upstreams: Arc<Upstreams>,
    /// What clients read from: the store, then the upstreams (the store itself if none).
    pub reads: Arc<dyn Store>,
    /// Every key signs every narinfo served (several during a rotation).
    pub keys: Vec<SecretKey>,
    /// What was served or uploaded, for garbage collection (see [`crate::gc::access`]).
    pub access: Arc<AccessLog>,
    /// NARs seen missing: their narinfos answer 404.
    pub missing_nars: MissingNars,
    cache_info: Bytes,
}

impl Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

impl AppState {
    /// The state for `config`; opens the NAR disk cache if one is configured.
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        keys: Vec<SecretKey>,
    ) -> std::io::Result<Self> {
        let cache_info = cache_info::render(&config);
        let c = &config.cache;
        let narinfos = NarInfoCache::new(
            c.narinfo_memory_bytes,
            c.narinfo_ttl,
            c.narinfo_negative_ttl,
        );
        let nars = match &c.nar_dir {
            Some(dir) => Some(NarCache::open(
                dir,
                c.nar_max_bytes,
                (config.store.timeout * 3).max(Duration::from_secs(30)),
            )?),
            None => None,
        };
        let upstreams = Arc::new(
            Upstreams::new(&config.upstreams, &config.store_dir).map_err(std::io::Error::other)?,
        );
        let reads: Arc<dyn Store> = if upstreams.is_empty() {
            store.clone()
        } else {
            Arc::new(WithUpstreams {
                store: store.clone(),
                upstreams: upstreams.clone(),
            })
        };
        let access = Arc::new(AccessLog::new(store.clone(), config.gc.access_max_entries));
        let uploader = Uploader::new(
            &config.upload,
            &config.store_dir,
            store.clone(),
            (!upstreams.is_empty()).then(|| upstreams.clone()),
        )
        .with_access(access.clone());
        let missing_nars = MissingNars::new(c.narinfo_ttl);
        let narinfo_cache_control = HeaderValue::from_str(&format!(
            "public, max-age={}",
            config.narinfo_max_age.as_secs()
        ))
        .map_err(std::io::Error::other)?;
        Ok(Self(Arc::new(App {
            narinfo_cache_control,
            narinfos,
            nars,
            upstreams,
            reads,
            uploader,
            tokens: Tokens::from_config(&config.auth),
            access,
            missing_nars,
            config,
            store,
            keys,
            cache_info,
        })))
    }
}

/// The router with every route and middleware.
pub fn app(state: AppState) -> Router {
    let cache = Router::new()
        .route(
            "/nix-cache-info",
            get(cache_info::get).put(upload::put_cache_info),
        )
        .route("/nar/{file}", get(objects::nar).put(upload::put_nar))
        .route("/log/{drv}", get(objects::log).put(upload::put_log))
        .route(
            "/realisations/{id}",
            get(objects::realisation).put(upload::put_realisation),
        )
        .route(
            "/build-trace/{drv}/{output}",
            get(objects::build_trace).put(upload::put_build_trace),
        )
        .route(
            "/{file}",
            get(narinfo::top_level).put(upload::put_top_level),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .merge(cache)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            default_cache_headers,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn not_found() -> Error {
    Error::NotFound
}

/// Reads need a `read` token in private mode; everything else needs a `write` token.
async fn authorize(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let scope = match *req.method() {
        Method::GET | Method::HEAD => Scope::Read,
        _ => Scope::Write,
    };
    match st.tokens.check(req.headers(), scope) {
        Decision::Allowed(Some(token)) if scope == Scope::Write => {
            // Upload log lines carry the token's name.
            next.run(req)
                .instrument(tracing::info_span!("upload", token = %token))
                .await
        }
        Decision::Allowed(_) => next.run(req).await,
        Decision::Missing => Error::Unauthorized.into_response(),
        Decision::Invalid => Error::Forbidden("invalid token").into_response(),
        Decision::InsufficientScope(_) => {
            Error::Forbidden("this token may not do that (scope)").into_response()
        }
    }
}

/// Lets 404s be cached briefly (clients and proxies), unless a handler decided otherwise; in
/// private mode, keeps shared caches from storing anything.
async fn default_cache_headers(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    if st.config.auth.private {
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
        let scope = if st.config.auth.private {
            "private"
        } else {
            "public"
        };
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{scope}, max-age={}",
            st.config.not_found_max_age.as_secs()
        )) {
            res.headers_mut().insert(header::CACHE_CONTROL, v);
        }
    }
    res
}

/// Serves `state` on `listener` until `shutdown` completes, then lets in-flight requests finish
/// for at most `config.shutdown_timeout`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.config.shutdown_timeout;
    // Without TCP_NODELAY, small responses on keep-alive connections stall ~40 ms
    // (Nagle's algorithm meets the client's delayed ACK).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("set_nodelay: {e}");
        }
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = tx.send(());
    });
    let server = server.into_future();
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r,
        _ = async { if rx.await.is_ok() { tokio::time::sleep(grace).await } else { std::future::pending::<()>().await } } => {
            tracing::warn!("shutdown: requests still running after {} s, exiting", grace.as_secs());
            Ok(())
        }
    }
}
