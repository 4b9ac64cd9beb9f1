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
    let (entries, bytes) = live.narinfos.usage().await;
    let narinfo_cache = CacheStatus {
        entries,
        bytes,
        max_bytes: live.config.cache.narinfo_memory_bytes,
        hits: cache_count("narinfo_memory", "hit"),
        negative_hits: cache_count("narinfo_memory", "negative_hit"),
        misses: cache_count("narinfo_memory", "miss"),
        bypasses: 0,
    };
    // Off: all zeros (`max_bytes` 0), told apart from a server that does not report it.
    let (entries, bytes) = st.nar_memory.usage().await.unwrap_or_default();
    let nar_memory_cache = Some(CacheStatus {
        entries,
        bytes,
        max_bytes: if st.nar_memory.enabled() {
            st.config.cache.nar_memory_bytes
        } else {
            0
        },
        hits: cache_count("nar_memory", "hit"),
        negative_hits: 0,
        misses: cache_count("nar_memory", "miss"),
        bypasses: 0,
    });
    let nar_cache = st.nars.as_ref().map(|n| {
        let (entries, bytes) = n.usage();
        CacheStatus {
            entries: entries as u64,
            bytes,
            max_bytes: st.config.cache.nar_max_bytes,
            hits: cache_count("nar_disk", "hit"),
            negative_hits: 0,
            misses: cache_count("nar_disk", "miss"),
            bypasses: cache_count("nar_disk", "bypass"),
        }
    });
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
