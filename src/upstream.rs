//! Upstream binary caches (pull-through). On a narinfo miss in the store, upstreams are asked in
//! the configured order before the server answers 404 (a 404 sticks in clients for an hour). An
//! upstream narinfo is accepted only if it carries a valid signature by one of that upstream's
//! keys; it is then served signed by this server, and its NAR (and log, listing) streamed from
//! the upstream through `/nar/…`. A slow or dead upstream is a miss after its timeout and is
//! then skipped for a while, so an outage does not turn every request into a wait.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::config::UpstreamConfig;
use crate::nix::{NarFileName, NarInfo, PublicKey, StorePathHash};
use crate::store::{ByteRange, ContentRange, Object, ObjectWriter, Store, StoreError};

/// After a failure, how long an upstream is skipped.
const BACKOFF_SECS: u64 = 30;

struct Upstream {
    base: String,
    keys: Vec<PublicKey>,
    timeout: Duration,
    mirror: bool,
    down_until: AtomicU64,
    down_logged: AtomicBool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Upstream {
    fn is_down(&self) -> bool {
        now() < self.down_until.load(Ordering::Relaxed)
    }

    fn mark_down(&self, why: &str) {
        self.down_until
            .store(now() + BACKOFF_SECS, Ordering::Relaxed);
        if !self.down_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(upstream = %self.base, cause = why, "upstream unavailable; skipping it for {BACKOFF_SECS} s at a time");
        }
    }

    fn mark_up(&self) {
        if self.down_logged.swap(false, Ordering::Relaxed) {
            tracing::info!(upstream = %self.base, "upstream answers again");
        }
    }
}

/// A narinfo found upstream, already checked.
pub struct Found {
    pub info: NarInfo,
    /// Whether the upstream it came from is mirrored into the store.
    pub mirror: bool,
}

pub struct Upstreams {
    list: Vec<Upstream>,
    client: reqwest::Client,
    store_dir: String,
}

/// Longest narinfo accepted from an upstream.
const MAX_NARINFO: usize = 16 << 20;

impl Upstreams {
    pub fn new(configs: &[UpstreamConfig], store_dir: &str) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("cellar/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(32)
            // A body that stops arriving fails instead of holding a request (or a fill) forever.
            .read_timeout(Duration::from_secs(30))
            .build()?;
        let list = configs
            .iter()
            .map(|c| Upstream {
                base: c.url.clone(),
                keys: c.public_keys.clone(),
                timeout: c.timeout,
                mirror: c.mirror,
                down_until: AtomicU64::new(0),
                down_logged: AtomicBool::new(false),
            })
            .collect();
        Ok(Self {
            list,
            client,
            store_dir: store_dir.to_owned(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Asks each upstream in order for the narinfo of `h`; the first one with a narinfo that
    /// verifies wins. An upstream that is down or fails counts as a miss here: a narinfo
    /// lookup must answer (a miss is a 404) within the upstream timeout.
    pub async fn narinfo(&self, h: StorePathHash) -> Option<Found> {
        self.lookup_narinfo(h).await.0
    }

    /// True if some upstream serves a verified narinfo for `h` (used to accept uploads whose
    /// references are available through this server's upstreams). Unavailable if it is not
    /// found and some upstream could not answer, so that an upload is retried rather than
    /// refused.
    pub async fn has(&self, h: StorePathHash) -> Result<bool, StoreError> {
        match self.lookup_narinfo(h).await {
            (Some(_), _) => Ok(true),
            (None, false) => Ok(false),
            (None, true) => Err(StoreError::Unavailable(
                "an upstream cache could not be asked".into(),
            )),
        }
    }

    /// The narinfo, and whether some upstream could not answer.
    async fn lookup_narinfo(&self, h: StorePathHash) -> (Option<Found>, bool) {
        let mut unavailable = false;
        for u in &self.list {
            if u.is_down() {
                unavailable = true;
                continue;
            }
            let res = match self
                .send(u, self.client.get(format!("{}/{h}.narinfo", u.base)))
                .await
            {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(()) => {
                    unavailable = true;
                    continue;
                }
            };
            let body = match tokio::time::timeout(u.timeout, read_capped(res, MAX_NARINFO)).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    tracing::warn!(upstream = %u.base, path = %h, cause = %e, "upstream narinfo refused");
                    continue;
                }
                Err(_) => {
                    u.mark_down("timeout");
                    unavailable = true;
                    continue;
                }
            };
            match self.check(u, h, &body) {
                Ok(info) => {
                    return (
                        Some(Found {
                            info,
                            mirror: u.mirror,
                        }),
                        unavailable,
                    );
                }
                Err(why) => {
                    tracing::warn!(upstream = %u.base, path = %h, cause = %why, "upstream narinfo refused");
                }
            }
        }
        (None, unavailable)
    }

    /// Sends `req` to `u` within its timeout: `Ok(Some)` for a 2xx (or 416, so a range outside
    /// the object can be reported as such), `Ok(None)` for a plain miss (4xx), `Err` when the
    /// upstream failed (timeout, connection error, 5xx), which also marks it down.
    async fn send(
        &self,
        u: &Upstream,
        req: reqwest::RequestBuilder,
    ) -> Result<Option<reqwest::Response>, ()> {
        match tokio::time::timeout(u.timeout, req.send()).await {
            Err(_) => u.mark_down("timeout"),
            Ok(Err(e)) => u.mark_down(&e.to_string()),
            Ok(Ok(r)) if r.status().is_server_error() => {
                u.mark_down(&format!("HTTP {}", r.status()))
            }
            Ok(Ok(r)) => {
                u.mark_up();
                let ok = r.status().is_success()
                    || r.status() == reqwest::StatusCode::RANGE_NOT_SATISFIABLE;
                return Ok(ok.then_some(r));
            }
        }
        Err(())
    }

    fn check(&self, u: &Upstream, h: StorePathHash, body: &[u8]) -> Result<NarInfo, String> {
        let text = std::str::from_utf8(body).map_err(|_| "not UTF-8".to_owned())?;
        let info = NarInfo::parse(text, &self.store_dir).map_err(|e| e.to_string())?;
        if info.hash() != h {
            return Err("StorePath does not match the name".into());
        }
        if !info.is_signed_by_any(&u.keys, &self.store_dir) {
            return Err("no valid signature by the upstream's keys".into());
        }
        // Served through /nar/<file>, so the URL must be one of those names.
        info.url
            .strip_prefix("nar/")
            .and_then(|n| n.parse::<NarFileName>().ok())
            .ok_or_else(|| format!("URL {:?} is not nar/<file>", info.url))?;
        Ok(info)
    }

    /// GETs `key` (a cache-relative path such as `nar/<file>`) from the first upstream that
    /// has it.
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Option<Object>, StoreError> {
        let mut unavailable = false;
        for u in &self.list {
            if u.is_down() {
                unavailable = true;
                continue;
            }
            let mut req = self.client.get(format!("{}/{key}", u.base));
            if let Some(r) = range {
                req = req.header(reqwest::header::RANGE, r.to_header());
            }
            let res = match self.send(u, req).await {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(()) => {
                    unavailable = true;
                    continue;
                }
            };
            let status = res.status();
            if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
                return Err(StoreError::RangeNotSatisfiable { size: 0 });
            }
            let Some(length) = res.content_length() else {
                continue; // cannot serve with a Content-Length
            };
            let content_range = if status == reqwest::StatusCode::PARTIAL_CONTENT {
                res.headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(ContentRange::parse_header)
            } else {
                None
            };
            if range.is_some() && content_range.is_none() {
                // The upstream ignored the range; let the caller see a plain miss rather than
                // serve the wrong bytes as a range.
                continue;
            }
            let body = res.bytes_stream().map_err(io::Error::other).boxed();
            return Ok(Some(Object {
                body,
                length,
                range: content_range,
            }));
        }
        if unavailable {
            // A NAR 404 is a hard error for Nix; 503 makes it retry.
            return Err(StoreError::Unavailable(
                "an upstream cache could not be asked".into(),
            ));
        }
        Ok(None)
    }

    /// The size of `key` at the first upstream that has it.
    async fn head(&self, key: &str) -> Option<u64> {
        for u in self.list.iter().filter(|u| !u.is_down()) {
            let Ok(Some(r)) = self
                .send(u, self.client.head(format!("{}/{key}", u.base)))
                .await
            else {
                continue;
            };
            // HEAD has no body: the length is in the header.
            if let Some(n) = r
                .headers()
                .get(reqwest::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                return Some(n);
            }
        }
        None
    }
}

/// Reads a response body, refusing more than `cap` bytes.
async fn read_capped(res: reqwest::Response, cap: usize) -> Result<bytes::Bytes, String> {
    if res.content_length().is_some_and(|l| l > cap as u64) {
        return Err("too large".into());
    }
    let mut buf = Vec::new();
    let mut body = res.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if buf.len() + chunk.len() > cap {
            return Err("too large".into());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(bytes::Bytes::from(buf))
}

/// The store as clients see it: the configured store, then the upstreams. Reads fall through
/// to upstreams on a miss; writes go to the store only.
pub struct WithUpstreams {
    pub store: std::sync::Arc<dyn Store>,
    pub upstreams: std::sync::Arc<Upstreams>,
}

#[async_trait]
impl Store for WithUpstreams {
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Option<Object>, StoreError> {
        match self.store.get(key, range).await? {
            Some(o) => Ok(Some(o)),
            None => self.upstreams.get(key, range).await,
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        if let Some(s) = self.store.head(key).await? {
            return Ok(Some(s));
        }
        Ok(self.upstreams.head(key).await)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    async fn writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError> {
        self.store.writer(key).await
    }

    async fn cleanup_staging(&self, older_than: Duration) -> Result<usize, StoreError> {
        self.store.cleanup_staging(older_than).await
    }

    // Listing and deleting concern what this cache holds, never what upstreams hold.
    async fn stale_staging(&self, older_than: Duration) -> Result<Vec<String>, StoreError> {
        self.store.stale_staging(older_than).await
    }

    fn list(&self, prefix: &str) -> crate::store::ObjectList {
        self.store.list(prefix)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.store.delete(key).await
    }

    fn describe(&self) -> String {
        format!(
            "{} (+{} upstreams)",
            self.store.describe(),
            self.upstreams.list.len()
        )
    }
}
