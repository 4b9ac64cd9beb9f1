//! Closure-aware prefetch: fetching what the client will ask next before it asks.
//!
//! Nix walks a closure level by level: it asks for a path's narinfo, reads its `References:`,
//! then asks for theirs, and downloads NARs after that. Each step costs the client a round trip
//! to cellar and, on a miss, cellar one to the store. When cellar loads a narinfo from the store
//! it already knows the next steps, so it starts them in the background, a few at a time
//! (`cache.prefetch_concurrency`): the narinfos of the references and, if the NAR is small
//! enough for the memory cache, the NAR. Both go into the caches requests read, through their
//! single-flight loading: a request arriving while its prefetch runs waits for that load
//! instead of asking the store again. A prefetched narinfo that was itself a miss prefetches
//! its own references, so a cold closure is read at the store's parallelism, not at the pace of
//! the client's walk.
//!
//! Larger NARs go into the NAR disk cache, not memory, and only once a client GETs their
//! narinfo (HEAD is how clients ask whether a path is there; a GET is for substituting it):
//! the client asks for the NAR only after it has walked the whole closure, so the download
//! gets a head start ([`after_get`]). At most [`NAR_FILLS`] such fills run at once, of NARs up
//! to `cache.prefetch_nar_max_bytes`.
//!
//! Only the root URL prefetches (the upload address answers its probes from the store alone),
//! a prefetch records no access (nothing was served), and what cannot be queued
//! (more than [`MAX_QUEUED`] waiting, or [`FILLS_QUEUED`] disk-cache fills, which have a queue
//! of their own so that a walk over a large closure cannot crowd out the narinfos) is dropped:
//! prefetching only ever saves time. A NAR already queued for a fill is not queued again.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use tokio::sync::{Notify, Semaphore};

use super::{AppState, Live};
use crate::nix::{NarFileName, NarInfo, StorePathHash};
use crate::store::object_key;

/// Prefetches waiting for a slot at most; beyond, new ones are dropped.
pub const MAX_QUEUED: usize = 8192;

/// NAR disk cache fills started ahead of their request that run at once.
pub const NAR_FILLS: usize = 4;

/// NAR disk cache fills waiting for one of [`NAR_FILLS`] at most; beyond, new ones are
/// dropped (by the time they ran, the client would have asked for the NAR itself).
pub const FILLS_QUEUED: usize = 64;

/// How long a narinfo prefetched is not prefetched again, whether or not the narinfo cache
/// still holds it ([`Prefetch::recent`]), and how many such names are remembered.
const RECENT_TTL: std::time::Duration = std::time::Duration::from_secs(60);
const RECENT_NAMES: u64 = 65_536;

pub struct Prefetch {
    /// `None` when prefetching is off.
    slots: Option<Arc<Semaphore>>,
    /// For NAR disk cache fills, held until the fill is over.
    fill_slots: Arc<Semaphore>,
    /// Largest NAR filled ahead (0: none).
    nar_max_bytes: u64,
    /// Waiting for a slot.
    queued: Arc<AtomicUsize>,
    /// Disk-cache fills waiting for a slot.
    fills_queued: Arc<AtomicUsize>,
    /// The NARs of the fills queued or running.
    filling: Arc<std::sync::Mutex<std::collections::HashSet<NarFileName>>>,
    /// Narinfos prefetched lately. What the narinfo cache holds is not prefetched again, but
    /// it may not hold what was loaded (expired after a short `cache.narinfo_ttl_secs`, or
    /// evicted from a full cache): without this, each load would walk the closure below it
    /// again, by every route through it.
    recent: moka::future::Cache<StorePathHash, ()>,
    /// NARs a fill ahead found in the bucket, which clients are redirected to
    /// (`store.redirect_nars`): not asked about again at every GET of their narinfo.
    redirected: moka::future::Cache<NarFileName, ()>,
    /// Waiting or running; [`Prefetch::settled`] waits for zero.
    pending: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    /// Jobs started so far (for tests: what was worth prefetching).
    #[cfg(test)]
    started: AtomicUsize,
}

impl Prefetch {
    pub fn new(concurrency: usize, nar_max_bytes: u64) -> Self {
        Self {
            slots: (concurrency > 0).then(|| Arc::new(Semaphore::new(concurrency))),
            fill_slots: Arc::new(Semaphore::new(NAR_FILLS)),
            nar_max_bytes,
            queued: Arc::new(AtomicUsize::new(0)),
            fills_queued: Arc::new(AtomicUsize::new(0)),
            filling: Arc::default(),
            recent: recently(),
            redirected: recently(),
            pending: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
            #[cfg(test)]
            started: AtomicUsize::new(0),
        }
    }

    /// How many jobs were started so far.
    #[cfg(test)]
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Returns once no prefetch is waiting or running (those a prefetch starts included: it
    /// starts them before it ends).
    #[cfg(test)]
    pub async fn settled(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    fn enabled(&self) -> bool {
        self.slots.is_some()
    }

    /// Whether `h` was not prefetched within [`RECENT_TTL`] (and is now).
    async fn first_time(&self, h: StorePathHash) -> bool {
        self.recent.entry(h).or_insert(()).await.is_fresh()
    }

    /// Forgets which narinfos were prefetched (on a reload: the new narinfo cache is empty).
    pub(super) fn forget_recent(&self) {
        self.recent.invalidate_all();
    }

    /// Runs `job` in the background once a slot is free; false if it was dropped.
    fn spawn(&self, kind: &'static str, job: impl Future<Output = ()> + Send + 'static) -> bool {
        let Some(slots) = &self.slots else {
            return false;
        };
        self.spawn_on(slots.clone(), (&self.queued, MAX_QUEUED), kind, job)
    }

    /// Runs `job` in the background once one of `slots` is free, if fewer than `cap` jobs
    /// wait in `queue` (else says false).
    fn spawn_on(
        &self,
        slots: Arc<Semaphore>,
        (queue, cap): (&Arc<AtomicUsize>, usize),
        kind: &'static str,
        job: impl Future<Output = ()> + Send + 'static,
    ) -> bool {
        if queue.fetch_add(1, Ordering::SeqCst) >= cap {
            queue.fetch_sub(1, Ordering::SeqCst);
            crate::metrics::prefetch(kind, "dropped");
            return false;
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        let counted = PendingGauge::count();
        #[cfg(test)]
        self.started.fetch_add(1, Ordering::SeqCst);
        let queued = queue.clone();
        let (pending, idle) = (self.pending.clone(), self.idle.clone());
        tokio::spawn(async move {
            let slot = slots.acquire_owned().await;
            queued.fetch_sub(1, Ordering::SeqCst);
            if slot.is_ok() {
                job.await;
            }
            drop(counted);
            if pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                idle.notify_waiters();
            }
        });
        true
    }
}

/// A narinfo was just loaded (not served from memory): records its NAR's size for the memory
/// cache and prefetches its references' narinfos and its NAR.
pub(super) async fn after_load(st: &AppState, live: &Arc<Live>, info: &NarInfo) {
    let nar = info.nar_file().ok();
    if let Some(nar) = &nar {
        st.nar_memory.hint(nar.as_str(), info.file_size).await;
        st.nar_memory
            .hint_file_hash(nar.as_str(), info.file_hash)
            .await;
        // A NAR named after its store path, rebuilt: the copies held are the old build's.
        if st
            .nar_memory
            .contents_changed(nar.as_str(), info.nar_hash)
            .await
        {
            st.nar_memory.forget(nar.as_str()).await;
            if let Some(cache) = &st.nars {
                cache.forget(nar.as_str());
            }
        }
    }
    if !st.prefetch.enabled() {
        return;
    }
    let own = info.hash();
    // Without a narinfo memory cache (`cache.narinfo_memory_bytes = 0`) there is nothing to
    // fill, and nothing would say which narinfos were loaded already: each load would walk
    // the closure below it again, by every route through it.
    let keeps_narinfos =
        live.config.cache.narinfo_memory_bytes > 0 && !live.config.cache.narinfo_ttl.is_zero();
    for h in info.references.iter().map(|r| r.hash()) {
        if !keeps_narinfos
            || h == own
            || live.narinfos.contains(h)
            || !st.prefetch.first_time(h).await
        {
            continue;
        }
        if !st
            .prefetch
            .spawn("narinfo", narinfo(st.clone(), live.clone(), h))
        {
            st.prefetch.recent.invalidate(&h).await;
        }
    }
    if let Some(nar) = nar {
        let small = match st.nar_memory.small_size(nar.as_str()).await {
            Some(size) if !st.nar_memory.contains(nar.as_str()).await => Some(size),
            _ => None,
        };
        if let Some(size) = small {
            // The NARs loaded ahead hold at most the memory budget between them: a path
            // whose references have NARs of many MiB each does not load them all at once.
            let Some(room) = st.nar_memory.room_ahead(size) else {
                crate::metrics::prefetch("nar", "skipped");
                return;
            };
            let (st, live) = (st.clone(), live.clone());
            st.clone().prefetch.spawn("nar", async move {
                let _room = room;
                // Queued before a reload that changed the upstreams it would read from.
                if !Arc::ptr_eq(&st.live().reads, &live.reads) {
                    crate::metrics::prefetch("nar", "dropped");
                    return;
                }
                let reads = &live.reads;
                let key = object_key::nar(&nar);
                let asked = tokio::time::Instant::now();
                let source = super::nar::open_whole(&st, &nar, &key, reads, false);
                let result = match st.nar_memory.load(nar.as_str(), &key, source).await {
                    Ok(_) => "loaded",
                    // Found missing ahead of the client: its narinfo answers 404 from now on,
                    // as after a client's own GET of it (see crate::cache::missing_nars).
                    Err(crate::cache::nar_memory::Unloaded::Failed(
                        crate::error::Error::NotFound,
                    )) => {
                        st.live()
                            .missing_nars
                            .seen_missing(nar.as_str(), asked)
                            .await;
                        "failed"
                    }
                    Err(_) => "failed",
                };
                crate::metrics::prefetch("nar", result);
            });
        }
    }
}

/// A client GETs a narinfo (`body`, as served): its NAR goes into the disk cache now if it is
/// larger than memory takes (those are prefetched with their narinfo), at most
/// `cache.prefetch_nar_max_bytes`, and not on disk or on its way yet.
pub(super) fn after_get(st: &AppState, body: &[u8]) {
    let (Some(cache), Some(_)) = (&st.nars, &st.prefetch.slots) else {
        return;
    };
    if st.prefetch.nar_max_bytes == 0 {
        return;
    }
    let Some((nar, size)) = nar_of(body) else {
        return;
    };
    if size > st.prefetch.nar_max_bytes
        || st.nar_memory.takes(size)
        || cache.has(&nar)
        || st.prefetch.redirected.contains_key(&nar)
    {
        return;
    }
    let filling = st.prefetch.filling.clone();
    if !crate::sync::lock(&filling).insert(nar.clone()) {
        return; // queued or running already
    }
    let (st, cache, live) = (st.clone(), cache.clone(), st.live());
    let slots = st.prefetch.fill_slots.clone();
    let queue = st.prefetch.fills_queued.clone();
    // Taken off `filling` when the job ends, or is dropped unqueued.
    let done = Filled(filling, nar.clone());
    st.clone()
        .prefetch
        .spawn_on(slots, (&queue, FILLS_QUEUED), "nar", async move {
            let _done = done;
            // Queued before a reload that changed the upstreams it would read from.
            if !Arc::ptr_eq(&st.live().reads, &live.reads) {
                crate::metrics::prefetch("nar", "dropped");
                return;
            }
            let reads = &live.reads;
            let key = object_key::nar(&nar);
            // A NAR the bucket has is redirected to it (`store.redirect_nars`): the client reads
            // it from there, not from cellar's disk. One only an upstream has is filled as usual.
            if st.store.redirects_nars() && matches!(st.store.head(&key).await, Ok(Some(_))) {
                st.prefetch.redirected.insert(nar.clone(), ()).await;
                crate::metrics::prefetch("nar", "redirected");
                return;
            }
            let result = cache.prefetch(&nar, &key, size, reads).await;
            crate::metrics::prefetch("nar", result);
        });
}

/// A set of names remembered for [`RECENT_TTL`], the least recently used going first when full.
fn recently<K>() -> moka::future::Cache<K, ()>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
{
    moka::future::Cache::builder()
        .max_capacity(RECENT_NAMES)
        .time_to_live(RECENT_TTL)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .build()
}

/// Takes a NAR off [`Prefetch::filling`] when dropped.
struct Filled(
    Arc<std::sync::Mutex<std::collections::HashSet<NarFileName>>>,
    NarFileName,
);

impl Drop for Filled {
    fn drop(&mut self) {
        crate::sync::lock(&self.0).remove(&self.1);
    }
}

/// The NAR file and its size (`FileSize:`) a rendered narinfo names, if it says both.
fn nar_of(body: &[u8]) -> Option<(NarFileName, u64)> {
    let text = std::str::from_utf8(body).ok()?;
    let (mut nar, mut size) = (None, None);
    for line in text.lines() {
        if let Some(file) = line.strip_prefix("URL: nar/") {
            nar = file.parse().ok();
        } else if let Some(n) = line.strip_prefix("FileSize: ") {
            size = n.parse().ok();
        }
    }
    Some((nar?, size?))
}

/// Loads `h` into the narinfo cache (boxed: a load may prefetch further, which loads again).
fn narinfo(st: AppState, live: Arc<Live>, h: StorePathHash) -> BoxFuture<'static, ()> {
    async move {
        // Queued before a reload (SIGHUP) that replaced the narinfo cache (no longer read) or
        // the upstreams (which may be gone from the configuration).
        let now = st.live();
        if !Arc::ptr_eq(&now.narinfos, &live.narinfos) || !Arc::ptr_eq(&now.reads, &live.reads) {
            st.prefetch.recent.invalidate(&h).await;
            crate::metrics::prefetch("narinfo", "dropped");
            return;
        }
        let result = match live
            .narinfos
            .fill(h, || super::narinfo::load_from_store(&st, &live, h))
            .await
        {
            Ok(Some(_)) => "loaded",
            Ok(None) => "absent",
            Err(_) => {
                // Not loaded: another walk may try again.
                st.prefetch.recent.invalidate(&h).await;
                "failed"
            }
        };
        crate::metrics::prefetch("narinfo", result);
    }
    .boxed()
}

/// One prefetch in `cellar_prefetches_pending`, for as long as it lives (a job that panics
/// or whose task is dropped at shutdown is taken off too).
struct PendingGauge;

impl PendingGauge {
    fn count() -> Self {
        crate::metrics::get().prefetches_pending.inc();
        Self
    }
}

impl Drop for PendingGauge {
    fn drop(&mut self) {
        crate::metrics::get().prefetches_pending.dec();
    }
}

#[cfg(test)]
mod tests;
