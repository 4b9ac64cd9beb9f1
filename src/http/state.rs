//! The state every handler shares, in two parts:
//!
//! - [`App`]: what is fixed for the life of the process (the store, the uploader and its
//!   limits, the NAR disk cache, the listen address): changing it needs a restart.
//! - [`Live`]: what a reload replaces as a whole (tokens, signing keys, upstreams, narinfo
//!   cache TTLs and Cache-Control ages, nix-cache-info), behind one atomic swap. Each step of
//!   a request (the token check, the handler, the headers) takes a snapshot
//!   ([`AppState::live`]) and uses it to its end: a reload is seen whole by each step, and a
//!   download in flight finishes with the state it started with.
//!
//! The narinfo memory cache belongs to [`Live`]: its entries are signed with the keys of their
//! state, and its TTLs are reloadable, so a reload that changes the keys, the upstreams or the
//! cache's settings starts an empty one (others keep it).

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::http::HeaderValue;
use bytes::Bytes;
use thiserror::Error;

use super::cache_info;
use super::prefetch::Prefetch;
use crate::auth::Tokens;
use crate::cache::missing_nars::MissingNars;
use crate::cache::nar::NarCache;
use crate::cache::nar_memory::{NarMemory, Spill};
use crate::cache::narinfo::NarInfoCache;
use crate::config::Config;
use crate::gc::access::AccessLog;
use crate::metrics::LayerUsage;
use crate::mirror::Mirror;
use crate::nix::SecretKey;
use crate::store::Store;
use crate::upload::Uploader;
use crate::upstream::{Upstreams, WithUpstreams};

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<App>);

/// The part of the state fixed at start-up.
pub struct App {
    /// The configuration the process started with. Its reloadable sections may be stale:
    /// read those from [`AppState::live`].
    pub config: Config,
    /// The cache's own objects (S3 or the local directory). Writes go here, and so do reads
    /// that must not be answered by an upstream: upload checks and probes, mirroring, the
    /// readiness probe.
    pub store: Arc<dyn Store>,
    pub uploader: Arc<Uploader>,
    pub nars: Option<Arc<NarCache>>,
    /// Small NARs in memory, ahead of the disk cache.
    pub nar_memory: NarMemory,
    /// Fetches what the client will ask next (see [`super::prefetch`]).
    pub prefetch: Prefetch,
    /// What was served or uploaded, for garbage collection (see [`crate::gc::access`]).
    pub access: Arc<AccessLog>,
    /// Set once an upload reached the root URL and the log said to use `/upload` instead.
    pub root_upload_warned: std::sync::atomic::AtomicBool,
    /// When the log last said a read was refused for a token that matches none (see
    /// `super::warn_refused_read`).
    pub refused_read_warned: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// The same for uploads (see `super::warn_refused_upload`).
    pub refused_upload_warned: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// When an upload with a known token lacking the write scope was last said to be refused.
    pub refused_scope_warned: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// The store's last answer to `/readyz` (see [`super::health`]).
    pub readiness: super::health::Readiness,
    /// When a request was last answered 5xx because the store did not answer (see
    /// [`App::store_failing`]).
    pub store_failed: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Answers the store's failures made 5xx since the start, for `cellar status` (see
    /// [`App::note_store_answer_failed`]).
    pub store_failures: std::sync::Mutex<StoreFailures>,
    /// The question to a failing store that uploads wait for (see [`super::before_body`]).
    pub asking: super::before_body::Asking,
    /// Set once the server stops taking connections (SIGTERM): `/readyz` answers 503.
    pub draining: std::sync::atomic::AtomicBool,
    live: ArcSwap<Live>,
}

/// How long a request the store failed to answer counts as the store failing
/// ([`App::store_failing`]).
pub const STORE_FAILED_FOR: std::time::Duration = std::time::Duration::from_secs(30);

impl App {
    /// Whether the store is failing, as far as this process knows: a request was answered 5xx
    /// within [`STORE_FAILED_FOR`] because the store did not answer, or the last readiness
    /// probe found it down. Answers this process gives from memory alone that a proxy takes as
    /// this replica working (an upload probe's "absent") then ask the store instead, so that
    /// the proxy sees the failure and sends the request elsewhere.
    pub fn store_failing(&self) -> bool {
        self.readiness.is_down()
            || crate::sync::lock(&self.store_failed)
                .is_some_and(|at| at.elapsed() < STORE_FAILED_FOR)
    }

    /// A request was answered 5xx because the store did not answer.
    pub fn note_store_failed(&self) {
        *crate::sync::lock(&self.store_failed) = Some(tokio::time::Instant::now());
    }

    /// A request was answered 5xx for the store's failure labelled `label` (an
    /// [`crate::error::Error::label`] of an [`crate::error::Error::is_store_fault`]).
    pub fn note_store_answer_failed(&self, label: &'static str) {
        let mut f = crate::sync::lock(&self.store_failures);
        f.count += 1;
        f.last = Some((tokio::time::Instant::now(), label));
    }

    /// The store answered a request made to learn whether it does: no request it failed
    /// counts any more ([`App::store_failing`]; a readiness probe's failure still does, until
    /// the next probe).
    pub fn note_store_answers(&self) {
        *crate::sync::lock(&self.store_failed) = None;
    }
}

/// Requests answered 5xx because of the store since the start: how many, and the last one's
/// time and [`crate::error::Error::label`].
#[derive(Default)]
pub struct StoreFailures {
    pub count: u64,
    pub last: Option<(tokio::time::Instant, &'static str)>,
}

/// The part of the state a reload replaces.
pub struct Live {
    /// The configuration this state was built from (the latest successful load).
    pub config: Config,
    pub tokens: Tokens,
    /// Every key signs every narinfo served (several during a rotation).
    pub signing_keys: Vec<SecretKey>,
    pub upstreams: Arc<Upstreams>,
    /// What clients' GET and HEAD read from: [`App::store`], then the upstreams in order
    /// (the store itself if there are none).
    pub reads: Arc<dyn Store>,
    /// Copies paths from upstreams marked `mirror = true` into the store, in the background.
    pub mirror: Mirror,
    /// Kept by a reload that changes neither the keys, the upstreams nor its own settings
    /// (a token rotated, say): what it holds is still what would be served.
    pub narinfos: Arc<NarInfoCache>,
    /// NARs seen missing: their narinfos answer 404 (see [`crate::cache::missing_nars`]).
    /// Here, not fixed, as what it remembers lasts `cache.narinfo_ttl_secs`, reloadable.
    pub missing_nars: Arc<MissingNars>,
    /// `Cache-Control` of narinfo answers, built once.
    pub narinfo_cache_control: HeaderValue,
    pub cache_info: Bytes,
}

/// Why a new configuration was not applied; the running one stays.
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("config key `{0}` changed: that needs a restart")]
    NeedsRestart(&'static str),
    /// The new state could not be built (an upstream's HTTP client).
    #[error("{0}")]
    Build(String),
}

/// What can stop [`AppState::new`].
#[derive(Debug, Error)]
pub enum StartError {
    #[error("config key `cache.nar_dir`: cannot open the NAR disk cache in {}: {cause}", dir.display())]
    NarCache {
        dir: std::path::PathBuf,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Live(#[from] ReloadError),
}

impl Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

/// How often [`AppState::spawn_upkeep`] lets go of what the server no longer needs.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(60);

impl App {
    /// Forgets what uploads and access records no longer rely on (see
    /// [`Uploader::let_go_stale`]), so that a server gone quiet gives that memory back.
    pub fn let_go_stale(&self) {
        self.uploader.let_go_stale();
        self.access.let_go_stale();
    }

    /// Entries remembered of recent uploads and probes, for `/metrics`.
    pub fn upload_memory_entries(&self) -> usize {
        self.uploader.remembered_len() + self.access.covered_len()
    }
}

/// What each cache layer holds ([`AppState::cache_usage`]).
pub struct CacheUsage {
    pub narinfo_memory: LayerUsage,
    pub nar_memory: LayerUsage,
    pub nar_disk: Option<LayerUsage>,
}

impl AppState {
    /// What the narinfo memory cache, the NAR memory cache (zeros when off) and the NAR disk
    /// cache (if there is one) hold now, and their budgets, for `/status` and `/metrics`.
    pub async fn cache_usage(&self) -> CacheUsage {
        let live = self.live();
        let (entries, bytes) = live.narinfos.usage().await;
        let narinfo_memory = LayerUsage {
            entries,
            bytes,
            max_bytes: live.config.cache.narinfo_memory_bytes,
        };
        let (entries, bytes) = self.nar_memory.usage().await.unwrap_or_default();
        let nar_memory = LayerUsage {
            entries,
            bytes,
            max_bytes: if self.nar_memory.enabled() {
                self.config.cache.nar_memory_bytes
            } else {
                0
            },
        };
        let nar_disk = self.nars.as_ref().map(|n| {
            let (entries, bytes) = n.usage();
            LayerUsage {
                entries: entries as u64,
                bytes,
                max_bytes: self.config.cache.nar_max_bytes,
            }
        });
        CacheUsage {
            narinfo_memory,
            nar_memory,
            nar_disk,
        }
    }

    /// Every [`UPKEEP_EVERY`], lets go of what the server no longer needs
    /// ([`App::let_go_stale`]), until the task is aborted.
    pub fn spawn_upkeep(&self) -> tokio::task::JoinHandle<()> {
        let st = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                st.let_go_stale();
                let missing_nars = st.live().missing_nars.clone();
                missing_nars.let_go_stale().await;
            }
        })
    }

    /// The state for `config`; opens the NAR disk cache if one is configured.
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        signing_keys: Vec<SecretKey>,
    ) -> Result<Self, StartError> {
        let c = &config.cache;
        let nars = match &c.nar_dir {
            Some(dir) => Some(
                NarCache::open(
                    dir,
                    c.nar_max_bytes,
                    (config.store.timeout * 3).max(Duration::from_secs(30)),
                )
                .map_err(|source| StartError::NarCache {
                    dir: dir.clone(),
                    cause: source,
                })?,
            ),
            None => None,
        };
        let access = Arc::new(
            AccessLog::new(store.clone(), config.gc.access_max_entries)
                .covering_uploads_for(crate::gc::access::UPLOAD_COVER),
        );
        let uploader = Arc::new(
            Uploader::new(&config.upload, &config.store_dir, store.clone())
                .with_access(access.clone()),
        );
        // Weak: the disk cache holds the memory cache (its keeper), which holds this.
        let spill = nars.as_ref().map(|disk| -> Spill {
            let disk = Arc::downgrade(disk);
            Arc::new(move |name: &str, data: Bytes| {
                if let Some(disk) = disk.upgrade() {
                    disk.spill(name, data);
                }
            })
        });
        let nar_memory = NarMemory::new(c.nar_memory_bytes, c.nar_memory_max_object, spill);
        if let (Some(disk), Some(keep)) = (&nars, nar_memory.keeper()) {
            disk.keep_small_in(keep);
        }
        if let Some(disk) = &nars {
            disk.check_file_hashes_by(nar_memory.file_hash_of());
        }
        let prefetch = Prefetch::new(c.prefetch_concurrency, c.prefetch_nar_max_bytes);
        uploader.set_own_key_names(crate::signing_keys::key_names(&signing_keys));
        let live = Live::build(config.clone(), signing_keys, &store, &uploader, None)?;
        Ok(Self(Arc::new(App {
            config,
            store,
            uploader,
            nars,
            nar_memory,
            prefetch,
            access,
            root_upload_warned: std::sync::atomic::AtomicBool::new(false),
            refused_read_warned: std::sync::Mutex::new(None),
            refused_upload_warned: std::sync::Mutex::new(None),
            refused_scope_warned: std::sync::Mutex::new(None),
            readiness: super::health::Readiness::default(),
            store_failed: std::sync::Mutex::new(None),
            store_failures: std::sync::Mutex::new(StoreFailures::default()),
            asking: super::before_body::Asking::default(),
            draining: std::sync::atomic::AtomicBool::new(false),
            live: ArcSwap::from_pointee(live),
        })))
    }

    /// A snapshot of the reloadable state; use one per request.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Replaces the reloadable state with one built from `config` and `keys`, unless `config`
    /// changes something only a restart can (then nothing changes).
    pub fn reload(&self, config: Config, signing_keys: Vec<SecretKey>) -> Result<(), ReloadError> {
        if let Some(key) = self.config.needs_restart(&config) {
            return Err(ReloadError::NeedsRestart(key));
        }
        let old = self.live();
        let names = crate::signing_keys::key_names(&signing_keys);
        let live = Live::build(
            config,
            signing_keys,
            &self.store,
            &self.uploader,
            Some(&old),
        )?;
        self.uploader.set_own_key_names(names);
        let emptied = !Arc::ptr_eq(&live.narinfos, &old.narinfos);
        let new_upstreams = !Arc::ptr_eq(&live.upstreams, &old.upstreams);
        self.live.store(Arc::new(live));
        if new_upstreams {
            // Nothing more is copied from the upstreams as they were.
            old.mirror.retire();
        }
        if emptied {
            // The new narinfo cache holds nothing: what was prefetched into the old one may
            // be prefetched again.
            self.prefetch.forget_recent();
        }
        Ok(())
    }
}

impl Live {
    /// The state for `config`. On a reload (`previous` is the running state) what the change
    /// leaves valid is kept: the upstreams (their clients' connections, their failure counts,
    /// the mirror's queue) if they are configured as before, and the narinfo cache and the
    /// missing NARs too if the signing keys and the cache's settings are also unchanged.
    fn build(
        config: Config,
        signing_keys: Vec<SecretKey>,
        store: &Arc<dyn Store>,
        uploader: &Arc<Uploader>,
        previous: Option<&Live>,
    ) -> Result<Self, ReloadError> {
        let c = &config.cache;
        let same_upstreams = previous.filter(|p| p.config.upstreams == config.upstreams);
        let (upstreams, reads, mirror) = match same_upstreams {
            Some(p) => (p.upstreams.clone(), p.reads.clone(), p.mirror.clone()),
            None => {
                let upstreams = Arc::new(
                    Upstreams::new(&config.upstreams, &config.store_dir)
                        .map_err(|e| ReloadError::Build(format!("upstream HTTP client: {e}")))?,
                );
                if !upstreams.is_empty() {
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        rt.spawn(upstreams.clone().check_store_dirs());
                    }
                }
                let reads: Arc<dyn Store> = if upstreams.is_empty() {
                    store.clone()
                } else {
                    Arc::new(WithUpstreams::new(store.clone(), upstreams.clone()))
                };
                let mirror = Mirror::new(uploader.clone(), reads.clone(), upstreams.clone());
                (upstreams, reads, mirror)
            }
        };
        let same_narinfos = same_upstreams.filter(|p| {
            let (was, is) = (&p.config.cache, c);
            was.narinfo_memory_bytes == is.narinfo_memory_bytes
                && was.narinfo_ttl == is.narinfo_ttl
                && was.narinfo_negative_ttl == is.narinfo_negative_ttl
                && same_keys(&p.signing_keys, &signing_keys)
                && p.config.signing.keep_existing_signatures
                    == config.signing.keep_existing_signatures
        });
        let (narinfos, missing_nars) = match same_narinfos {
            Some(p) => (p.narinfos.clone(), p.missing_nars.clone()),
            None => (
                Arc::new(NarInfoCache::new(
                    c.narinfo_memory_bytes,
                    c.narinfo_ttl,
                    c.narinfo_negative_ttl,
                )),
                Arc::new(MissingNars::new(c.narinfo_ttl)),
            ),
        };
        mirror.serves(&narinfos);
        // Digits and ASCII only: always a valid header value.
        let narinfo_cache_control = HeaderValue::from_str(&format!(
            "public, max-age={}",
            config.narinfo_max_age.as_secs()
        ))
        .unwrap_or(HeaderValue::from_static("public"));
        Ok(Self {
            tokens: Tokens::from_config(&config.auth),
            cache_info: cache_info::render(&config),
            narinfo_cache_control,
            narinfos,
            missing_nars,
            upstreams,
            reads,
            mirror,
            signing_keys,
            config,
        })
    }
}

/// Whether `a` and `b` are the same keys in the same order (the narinfos they signed carry
/// the same signatures).
fn same_keys(a: &[SecretKey], b: &[SecretKey]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.public() == b.public())
}
