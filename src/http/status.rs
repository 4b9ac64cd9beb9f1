//! `/status`: the server's own report for `cellar status` (JSON, see [`crate::status`]). It
//! names the store and the upstreams, so it sits behind the read token in private mode like
//! the cache itself.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use super::AppState;
use crate::metrics::cache_count;
use crate::status::{CacheStatus, Status, UpstreamStatus};

pub(super) async fn get(State(st): State<AppState>) -> impl IntoResponse {
    let live = st.live();
    let usage = st.cache_usage().await;
    let layer = |u: crate::metrics::LayerUsage, name: &'static str| CacheStatus {
        entries: u.entries,
        bytes: u.bytes,
        max_bytes: u.max_bytes,
        hits: cache_count(name, "hit"),
        negative_hits: cache_count(name, "negative_hit"),
        misses: cache_count(name, "miss"),
        bypasses: cache_count(name, "bypass"),
    };
    let narinfo_cache = layer(usage.narinfo_memory, "narinfo_memory");
    // Off: all zeros (`max_bytes` 0), told apart from a server that does not report it.
    let nar_memory_cache = Some(layer(usage.nar_memory, "nar_memory"));
    let nar_cache = usage.nar_disk.map(|u| layer(u, "nar_disk"));
    // Within `cellar status`'s own wait (10 s), however long `store.ready_timeout_secs` is.
    let ready = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        super::health::readiness(&st).await.1
    })
    .await
    .unwrap_or("store timed out\n");
    let store_failures = {
        let f = crate::sync::lock(&st.store_failures);
        crate::status::StoreFailures {
            count: f.count,
            last_secs_ago: f.last.map(|(at, _)| at.elapsed().as_secs()),
            last: f.last.map(|(_, why)| why.to_owned()),
        }
    };
    let status = Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        store: st.store.describe(),
        store_state: Some(ready.trim().to_owned()),
        store_failures: Some(store_failures),
        public_keys: live
            .signing_keys
            .iter()
            .map(|k| k.public().to_string())
            .collect(),
        private: live.config.auth.private,
        narinfo_cache,
        nar_memory_cache,
        nar_cache,
        upstreams: live
            .upstreams
            .health()
            .into_iter()
            .map(|(url, down)| UpstreamStatus { url, up: !down })
            .collect(),
    };
    ([(header::CACHE_CONTROL, "no-store")], Json(status))
}
