//! NARs on local disk, with a byte budget and LRU eviction.
//!
//! A miss starts one *fill* per NAR: a background task that streams the object from the store
//! into a temporary file. Every client asking for that NAR meanwhile (the first included) is
//! served by tailing the growing file, so N concurrent misses cost one store GET and nobody
//! waits for the whole NAR. Small NARs (most of them) are read whole instead and served from
//! memory while their file is written. With the small-NAR memory cache on, small NARs reach
//! this cache only when memory lets them go ([`NarCache::spill`]), and are read back with
//! [`NarCache::held`]. A file gets its final name only once complete, with its
//! size checked and its checksum recorded in a `.meta` file beside it.
//!
//! After a restart the index is rebuilt from the directory: listed at once (names only), then
//! each file's `.meta` and size read by a thread of its own while requests are served (a large
//! cache on a slow disk takes minutes; a file asked for meanwhile is looked at first). Files
//! whose size does not match their `.meta` are removed, and each surviving file is hashed once in the background
//! (on its first hit, which waits for that check as long as hashing it should take, and is
//! served from the store past that) before it is served, so a corrupted file is dropped and
//! fetched again. When the disk is full, NARs are served straight
//! from the store without caching for a while ([`Backoff`]), and that is logged once.
//!
//! The parts, each readable on its own:
//! - `index`: what is held, in which order of use, within which budget. Pure data, no I/O.
//! - `disk`: the directory layout, writing and publishing files, the scan at start-up and
//!   the hashing that checks a file before it is trusted.
//! - `fill`: one download per NAR shared by all its readers, and the readers that tail it.
//!
//! This module ties them together: a hit is served from disk, anything the cache cannot serve
//! now (a range of a NAR not on disk, a file not yet checked) is answered with
//! [`NarCacheAnswer::Bypass`] so the caller asks the store itself.

mod disk;
mod fill;

pub(crate) use fill::wrong_bytes;
mod index;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::backoff::Backoff;
use crate::cache::nar_memory::Keep;
use crate::nix::NarFileName;
use crate::store::{ByteRange, Object, Store, StoreError};
use crate::sync::lock;

use disk::{Checksum, Disk, WriteError};
use fill::Started;
use index::{Index, Verified};

/// Kept free on the cache's file system beyond the NAR being written.
const FREE_MARGIN: u64 = 256 << 20;
/// After the disk is found full, how long no NAR is written.
const FULL_BACKOFF: Duration = Duration::from_secs(60);

/// How long a request waits for the check of a file from before a restart (its hash, read
/// once) before it reads the NAR from the store instead.
const CHECK_WAIT: Duration = Duration::from_secs(10);

/// Whether a failed write says every write will fail until someone acts: a file system gone
/// read-only, a directory the server's user may no longer write, a file where a directory
/// belongs. Caching then pauses; other failures cost the one NAR.
fn lasting(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ReadOnlyFilesystem
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::NotADirectory
    )
}

/// Checks, changing nothing, that `dir` could be opened as the NAR cache: missing, empty, or
/// one cellar made (`check-config`: `serve` would refuse a directory of other files).
pub fn check_dir(dir: &Path) -> io::Result<()> {
    disk::claimable(dir).map(|_| ())
}

/// What [`NarCache::get`] found.
pub enum NarCacheAnswer {
    /// Served from disk or a fill: the object.
    Object(Object),
    /// The store does not have it.
    NotFound,
    /// The cache cannot help with this request: ask the store.
    Bypass,
}

pub struct NarCache {
    disk: Disk,
    index: Mutex<Index>,
    /// The fill of each NAR being fetched; its cell is set once the fill has started.
    fills: Mutex<HashMap<String, Arc<OnceCell<Started>>>>,
    /// Set while the disk is full: NARs are then served without caching.
    disk_full: Backoff,
    /// Set while the directory this process held is gone and could not be made anew: nothing
    /// is written until [`NarCache::check_directory`] makes it anew.
    lost: std::sync::atomic::AtomicBool,
    /// Bytes promised to fills still running (not yet in the index).
    reserved: AtomicU64,
    /// Large NARs being written to disk (see [`fill::MAX_RUNNING`]).
    running: std::sync::atomic::AtomicUsize,
    /// Longest wait for the next chunk from the store before a fill fails.
    idle_timeout: Duration,
    /// Parts of large NARs fetched ahead, over all fills (see [`fill::PART`]).
    parts: Arc<tokio::sync::Semaphore>,
    /// Where small NARs read whole go instead of a file, if it takes them (the memory cache).
    keep_small: std::sync::OnceLock<Keep>,
    /// The `FileHash` narinfos gave a NAR, which a fill checks its bytes against before it
    /// keeps them ([`Self::check_file_hashes_by`]).
    file_hash_of: std::sync::OnceLock<crate::cache::nar_memory::FileHashOf>,
    /// Woken after the index and the files changed in the background: requests waiting for a
    /// file's check wait for that (and tests, instead of polling).
    changed: tokio::sync::Notify,
    /// Files that failed to be read, and how many times in a row (see [`READ_ERRORS`]).
    read_errors: Mutex<HashMap<String, u32>>,
    /// Checks of files from before a restart that may run at once ([`CHECKS_AT_ONCE`]).
    checks: Arc<tokio::sync::Semaphore>,
    /// Checks waiting for their turn ([`CHECKS_WAITING`] at most).
    checks_waiting: std::sync::atomic::AtomicUsize,
    /// Held while a name's files change on disk with its entry in the index: a publish
    /// (`.meta`, rename, entry) and each removal of a name no longer indexed. A removal that
    /// comes after the name was filled again finds it indexed and leaves its new files.
    /// Taken before the index's lock, never while holding it.
    names: Mutex<()>,
    /// Requests that reached a fill's cell (started it, or waited on it).
    #[cfg(test)]
    at_fills: std::sync::atomic::AtomicUsize,
    /// The thread looking at the files from before the restart, if it was started.
    #[cfg(test)]
    scan: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// A fill's write that would take its file past this many bytes fails (for tests).
    #[cfg(test)]
    fail_writes_past: AtomicU64,
}

/// Checks of files from before a restart that run at once, each hashing a whole file on a
/// blocking thread. After a restart every client comes back at once: without a bound, every
/// distinct file asked for would be hashed at the same time, each with a thread, a file
/// descriptor and a read buffer, and the disk reads of everything else (hits, fills, uploads)
/// would queue behind them.
const CHECKS_AT_ONCE: usize = 4;

/// Checks waiting for their turn, at most. Beyond, a file is left unchecked for now and its
/// request goes to the store at once, instead of waiting for a check far down the line; its
/// next use asks for its check again.
const CHECKS_WAITING: usize = 256;

/// Failed reads in a row after which a cached file is dropped: fewer may be the process short
/// of file descriptors or memory for a moment (the file is fine), more a file that cannot be
/// read (its owner changed, a bad sector), to be fetched again.
const READ_ERRORS: u32 = 3;

/// Files from before a restart the scan indexes under one hold of the index's lock (two in
/// tests: a few files make several batches).
#[cfg(not(test))]
const INSERT_BATCH: usize = 4096;
#[cfg(test)]
const INSERT_BATCH: usize = 2;

impl NarCache {
    /// Opens the cache in `dir` (created if missing); its index is rebuilt in the background
    /// ([`Self::scan`]), so the server answers at once however large the cache.
    pub fn open(dir: &Path, max_bytes: u64, idle_timeout: Duration) -> io::Result<Arc<Self>> {
        Self::open_gated(dir, max_bytes, idle_timeout, None)
    }

    /// [`Self::open`] whose scan, if `gate` is given, starts only once `gate` says so (or its
    /// sender is dropped).
    fn open_gated(
        dir: &Path,
        max_bytes: u64,
        idle_timeout: Duration,
        gate: Option<std::sync::mpsc::Receiver<()>>,
    ) -> io::Result<Arc<Self>> {
        let disk::Opened {
            disk,
            nars,
            foreign,
        } = Disk::open(dir)?;
        for f in foreign {
            tracing::warn!(file = %f.display(), "NAR cache: ignoring a file cellar did not write");
        }
        let mut index = Index::new(max_bytes);
        index.set_pending(nars.iter().cloned());
        let cache = Arc::new(Self {
            disk,
            index: Mutex::new(index),
            fills: Mutex::new(HashMap::new()),
            disk_full: Backoff::new(FULL_BACKOFF),
            lost: std::sync::atomic::AtomicBool::new(false),
            reserved: AtomicU64::new(0),
            running: std::sync::atomic::AtomicUsize::new(0),
            idle_timeout,
            parts: Arc::new(tokio::sync::Semaphore::new(fill::PARTS_IN_MEMORY)),
            keep_small: std::sync::OnceLock::new(),
            file_hash_of: std::sync::OnceLock::new(),
            changed: tokio::sync::Notify::new(),
            read_errors: Mutex::new(HashMap::new()),
            checks: Arc::new(tokio::sync::Semaphore::new(CHECKS_AT_ONCE)),
            checks_waiting: std::sync::atomic::AtomicUsize::new(0),
            names: Mutex::new(()),
            #[cfg(test)]
            at_fills: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(test)]
            fail_writes_past: AtomicU64::new(u64::MAX),
            #[cfg(test)]
            scan: Mutex::new(None),
        });
        if nars.is_empty() {
            return Ok(cache);
        }
        tracing::info!(dir = %dir.display(), files = nars.len(), "NAR cache: looking at the files from before the restart, in the background");
        let this = cache.clone();
        let scan = std::thread::Builder::new()
            .name("nar-cache-scan".into())
            .spawn(move || {
                if let Some(gate) = gate {
                    let _ = gate.recv();
                }
                this.scan(nars);
            })?;
        #[cfg(test)]
        {
            *lock(&cache.scan) = Some(scan);
        }
        #[cfg(not(test))]
        drop(scan);
        Ok(cache)
    }

    /// Reads the `.meta` and size of each file found at start-up (`nars`) that no request
    /// looked at first ([`Self::settle`]), removes the incomplete ones, and indexes the others
    /// by their last use, as used before everything served since the start; then keeps the
    /// budget (it may have shrunk since the last run, and fills ran meanwhile). A file that
    /// cannot be read now is looked at again once the others are; if it still cannot, it is
    /// left to its first use (which fetches it again if it still cannot be read then).
    fn scan(self: &Arc<Self>, nars: Vec<String>) {
        let started = std::time::Instant::now();
        let mut found = Vec::new();
        let mut unread = Vec::new();
        for name in nars {
            self.look_at(name, &mut found, &mut unread);
        }
        let mut failed = Vec::new();
        for (name, _) in unread {
            self.look_at(name, &mut found, &mut failed);
        }
        if let Some((name, e)) = failed.first() {
            tracing::warn!(files = failed.len(), nar = %name, cause = %e, "NAR cache: cannot read some files from before the restart; each is looked at on its first use");
        }
        // One the budget no longer admits (it shrank since: over half of it) goes alone: kept,
        // and used last, it would be what the budget evicts the others for.
        let (kept, oversized): (Vec<_>, Vec<_>) = {
            let index = self.index();
            found.into_iter().partition(|(_, f)| index.admits(f.size))
        };
        let mut found = kept;
        let (mut files, mut bytes) = (0usize, 0u64);
        for (name, f) in oversized {
            let _names = lock(&self.names);
            // Unless a request looked at it first.
            if !self.index().take_pending(&name) {
                continue;
            }
            match self.disk.remove(&name) {
                Ok(()) => (files, bytes) = (files + 1, bytes + f.size),
                Err(e) => {
                    tracing::warn!(nar = %name, cause = %e, "NAR cache: cannot remove a file over half of cache.nar_max_bytes")
                }
            }
        }
        if files > 0 {
            tracing::info!(
                files,
                bytes,
                "NAR cache: files from before the restart over half of cache.nar_max_bytes removed"
            );
        }
        found.sort_by(|(na, a), (nb, b)| (a.used, na).cmp(&(b.used, nb)));
        // Newest first, each batch placed before those in the index: the order of use is
        // kept, and requests wait for one batch at most, not for the whole cache.
        while !found.is_empty() {
            let batch = found.split_off(found.len().saturating_sub(INSERT_BATCH));
            let _names = lock(&self.names);
            let batch = batch.into_iter().map(|(n, f)| (n, f.size, f.checksum));
            self.index().insert_unused(batch);
        }
        let (files, bytes) = {
            let mut index = self.index();
            index.shrink_pending();
            index.usage()
        };
        tracing::info!(
            files,
            bytes,
            seconds = started.elapsed().as_secs_f64(),
            "NAR cache: the files from before the restart are indexed"
        );
        let evicted = self.evict();
        if evicted > 0 {
            tracing::info!(
                files = evicted,
                "NAR cache: the least recently used files removed to keep within cache.nar_max_bytes (it may have shrunk since the last run)"
            );
        }
        self.changed();
    }

    /// [`Self::scan`]'s look at `name` if it is still pending: its findings in `found`, or
    /// `name` and the error in `unread` if it could not be read; removed if incomplete.
    fn look_at(
        &self,
        name: String,
        found: &mut Vec<(String, disk::Found)>,
        unread: &mut Vec<(String, io::Error)>,
    ) {
        if !self.index().is_pending(&name) {
            return;
        }
        match self.disk.examine(&name) {
            Ok(Some(f)) => found.push((name, f)),
            Ok(None) => self.remove_incomplete(&name),
            Err(e) => unread.push((name, e)),
        }
    }

    /// Looks at `name` now if it is a file from before the restart the scan has not reached:
    /// indexes it (to be checked before it is served) or removes it if incomplete.
    async fn settle(self: &Arc<Self>, name: &str) {
        if !self.index().is_pending(name) {
            return;
        }
        let (this, n) = (self.clone(), name.to_owned());
        // A panic only leaves the file to the scan.
        let _ = tokio::task::spawn_blocking(move || match this.disk.examine(&n) {
            Ok(Some(f)) => {
                let _names = lock(&this.names);
                let mut index = this.index();
                if index.take_pending(&n) {
                    index.insert(&n, f.size, f.checksum, Verified::No);
                }
            }
            Ok(None) => this.remove_incomplete(&n),
            // Left pending: this request goes to the store, and a fill of it replaces the
            // file (that it cannot be read says nothing of the file).
            Err(e) => {
                tracing::warn!(nar = %n, cause = %e, "NAR cache: cannot read a file from before the restart, serving from the store");
            }
        })
        .await;
    }

    /// Removes the files of `name`, found incomplete at start-up, unless something else
    /// looked at it first (a request, a fill that wrote it again).
    fn remove_incomplete(&self, name: &str) {
        let _names = lock(&self.names);
        if self.index().take_pending(name) {
            tracing::info!(nar = %name, dir = %self.disk.dir().display(), "NAR cache: removing an incomplete file");
            if let Err(e) = self.disk.remove(name) {
                tracing::warn!(nar = %name, cause = %e, "NAR cache: cannot remove an incomplete file");
            }
        }
    }

    /// Waits for the scan of the files from before the restart (tests).
    #[cfg(test)]
    pub fn finish_scan(&self) {
        let scan = lock(&self.scan).take();
        if let Some(scan) = scan {
            scan.join().expect("the scan panicked");
        }
    }

    /// [`Self::open`], once its scan is over (tests).
    #[cfg(test)]
    pub fn open_scanned(dir: &Path, max_bytes: u64, idle_timeout: Duration) -> Arc<Self> {
        let cache = Self::open(dir, max_bytes, idle_timeout).expect("opening the NAR cache");
        cache.finish_scan();
        cache
    }

    /// [`Self::open`] with its scan held until the sender says go, or is dropped (tests).
    #[cfg(test)]
    pub fn open_held(
        dir: &Path,
        max_bytes: u64,
        idle_timeout: Duration,
    ) -> (Arc<Self>, std::sync::mpsc::Sender<()>) {
        let (go, gate) = std::sync::mpsc::channel();
        let cache = Self::open_gated(dir, max_bytes, idle_timeout, Some(gate))
            .expect("opening the NAR cache");
        (cache, go)
    }

    /// Hands the small NARs a fill reads whole (those asked for without their narinfo; the
    /// others are loaded by the memory cache itself) to `keep` instead of writing them: they
    /// reach the disk when memory lets them go. Set once, at start-up.
    pub fn keep_small_in(&self, keep: Keep) {
        let _ = self.keep_small.set(keep);
    }

    /// Checks the bytes of each fill against the `FileHash` `of` gives its NAR (narinfos
    /// read): a NAR whose bytes are not what its narinfo says (rotted in the bucket at the same
    /// size, replaced during the fill) fails its readers and is not kept, rather than served
    /// from disk for as long as it stays there. Set once, at start-up.
    pub fn check_file_hashes_by(&self, of: crate::cache::nar_memory::FileHashOf) {
        let _ = self.file_hash_of.set(of);
    }

    /// Number of NARs and bytes held.
    pub fn usage(&self) -> (usize, u64) {
        self.index().usage()
    }

    /// Whether `name` is on disk (its file from before the restart possibly not looked at
    /// yet) or being filled.
    pub fn has(&self, name: &NarFileName) -> bool {
        // `fills` first: a fill leaves it only once its NAR is indexed. (Never both locks at
        // once in this order: `on_fill` takes `fills`, then `index`.)
        let filling = lock(&self.fills).contains_key(name.as_str());
        filling || {
            let index = self.index();
            index.contains(name.as_str()) || index.is_pending(name.as_str())
        }
    }

    /// The size of `name` if a checked copy is on disk (a HEAD answered without the store).
    pub fn size_of(&self, name: &NarFileName) -> Option<u64> {
        self.index().verified_size(name.as_str())
    }

    /// Serves `name` (store key `key`) from disk or through a fill; `range` requests are
    /// served from disk only. `announced` is its size by its narinfo, if known
    /// ([`crate::cache::nar_memory::NarMemory::announced`]): a file of another size is
    /// dropped and fetched again (a NAR named after its store path, which the upstream
    /// replaced), and a fill is held to it.
    pub async fn get(
        self: &Arc<Self>,
        name: &NarFileName,
        key: &str,
        range: Option<ByteRange>,
        announced: Option<u64>,
        store: &Arc<dyn Store>,
    ) -> Result<NarCacheAnswer, StoreError> {
        use crate::metrics::cache_lookup;
        let n = name.as_str();
        self.settle(n).await;
        self.drop_if_not(n, announced);
        let state = self.index().touch(n);
        match state {
            Some((size, Verified::Yes)) => return self.read_hit(n, size, range).await,
            Some((size, verified)) => {
                // A file from before a restart, checked on its first use. The requests for it
                // meanwhile (after a deploy, every client at once) wait for the check rather
                // than each reading the whole NAR from the store; a check that takes longer
                // than a client should wait (a huge file on a slow disk) lets them go there.
                if verified == Verified::No {
                    self.spawn_verify(n.to_owned());
                }
                // Waited for as long as hashing the file should take (at 100 MB/s, plus a
                // second), at most CHECK_WAIT: many checks at once, or a stuck one, send the
                // requests to the store soon.
                let wait = Duration::from_millis(1000 + size / 100_000).min(CHECK_WAIT);
                if let Some(size) = self.checked_within(n, wait).await {
                    return self.read_hit(n, size, range).await;
                }
                if self.index().size(n).is_some() {
                    cache_lookup("nar_disk", "bypass");
                    return Ok(NarCacheAnswer::Bypass);
                }
                // Corrupt, and dropped: fetched again like any miss.
            }
            None => {}
        }
        if range.is_some() {
            cache_lookup("nar_disk", "bypass");
            return Ok(NarCacheAnswer::Bypass);
        }
        tracing::debug!(nar = %n, "NAR cache: miss");
        let (answer, result) = self.through_fill(n, key, announced, store).await;
        cache_lookup("nar_disk", result);
        answer
    }

    /// Forgets `name`, whose copy here may not be the NAR to serve any more: its bytes were
    /// just uploaded (the store lacked them, and a copy from an earlier life of the NAR may be
    /// a bad one, deleted by `cellar verify --repair`), or it is named after its store path
    /// and a narinfo gave it other contents (rebuilt).
    pub fn forget(&self, name: &str) {
        self.drop_entry(name);
    }

    /// Drops the file of `name` if it is not of the `announced` size.
    fn drop_if_not(&self, name: &str, announced: Option<u64>) {
        let Some(size) = announced else { return };
        let held = self.index().size(name);
        if let Some(held) = held.filter(|&h| h != size) {
            tracing::info!(nar = %name, held, file_size = size, "NAR cache: its narinfo now gives another size; fetching it again");
            self.drop_entry(name);
        }
    }

    /// `name` from disk if a checked copy is there; never fetched from the store (for the
    /// small NARs the memory cache loads, which reach the disk only when memory lets them go:
    /// [`Self::spill`]). Counts no lookup.
    pub async fn held(
        self: &Arc<Self>,
        name: &NarFileName,
        announced: Option<u64>,
    ) -> Result<Option<Object>, StoreError> {
        let n = name.as_str();
        self.settle(n).await;
        self.drop_if_not(n, announced);
        let state = self.index().touch(n);
        let answer = match state {
            Some((size, Verified::Yes)) => self.read_file(n, size, None).await?,
            Some((size, verified)) => {
                // A file from before a restart: a small one is hashed in no time, so its check
                // is waited for rather than the NAR read from the store.
                if verified == Verified::No {
                    self.spawn_verify(n.to_owned());
                }
                let wait = Duration::from_millis(1000 + size / 100_000).min(CHECK_WAIT);
                match self.checked_within(n, wait).await {
                    Some(size) => self.read_file(n, size, None).await?,
                    None => NarCacheAnswer::Bypass,
                }
            }
            None => NarCacheAnswer::Bypass,
        };
        // Not counted here: the caller knows whether a client asked (a prefetch is no
        // lookup), and counts.
        Ok(match answer {
            NarCacheAnswer::Object(obj) => Some(obj),
            _ => None,
        })
    }

    /// Writes a small NAR the memory cache let go (in the background; best effort: a failure
    /// only means it is fetched from the store next time).
    pub fn spill(self: &Arc<Self>, name: &str, data: Bytes) {
        if self.index().contains(name) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (this, name) = (self.clone(), name.to_owned());
        rt.spawn_blocking(move || this.store_small(&name, &data));
    }

    /// Waits until `done` holds, looking again after each change made in the background.
    #[cfg(test)]
    pub async fn wait_until(&self, done: impl Fn(&Self) -> bool) {
        let waiting = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if done(self) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), waiting)
            .await
            .expect("the NAR cache never got there");
    }

    /// [`Self::read_file`] of a checked file, counted as a hit (or a bypass if the file is
    /// gone).
    async fn read_hit(
        &self,
        name: &str,
        size: u64,
        range: Option<ByteRange>,
    ) -> Result<NarCacheAnswer, StoreError> {
        let answer = self.read_file(name, size, range).await;
        let result = match answer {
            Ok(NarCacheAnswer::Object(_)) => "hit",
            _ => "bypass",
        };
        crate::metrics::cache_lookup("nar_disk", result);
        answer
    }

    /// Serves a hit from its file, if the file is still what the index says.
    async fn read_file(
        &self,
        name: &str,
        size: u64,
        range: Option<ByteRange>,
    ) -> Result<NarCacheAnswer, StoreError> {
        let read = self.disk.read(name, range).await;
        if !matches!(read, Err(StoreError::Other(_))) {
            let mut errors = lock(&self.read_errors);
            if !errors.is_empty() {
                errors.remove(name);
            }
        }
        match read {
            Ok(Some(obj)) if obj.range.map_or(obj.length, |r| Some(r.total)) == Some(size) => {
                Ok(NarCacheAnswer::Object(obj))
            }
            Err(e @ StoreError::RangeNotSatisfiable { .. }) => Err(e),
            // The file could not be read (out of file descriptors, an I/O error): it may be
            // fine, so it stays until that happens READ_ERRORS times in a row, and this request
            // goes to the store.
            Err(e) => {
                if self.check_directory() {
                    return Ok(NarCacheAnswer::Bypass);
                }
                if self.read_failed(name) {
                    tracing::warn!(nar = %name, error = %e, "NAR cache: cannot read the file, fetching it again");
                    self.drop_entry_of_size(name, size);
                } else {
                    tracing::warn!(nar = %name, error = %e, "NAR cache: cannot read the file, serving from the store");
                }
                Ok(NarCacheAnswer::Bypass)
            }
            Ok(_) => {
                if self.check_directory() {
                    return Ok(NarCacheAnswer::Bypass);
                }
                tracing::warn!(nar = %name, "NAR cache: file missing or truncated, fetching again");
                self.drop_entry_of_size(name, size);
                Ok(NarCacheAnswer::Bypass)
            }
        }
    }

    /// Counts a failed read of `name`'s file; true once that made [`READ_ERRORS`] in a row
    /// (the count then starts over).
    fn read_failed(&self, name: &str) -> bool {
        let mut errors = lock(&self.read_errors);
        let n = errors.entry(name.to_owned()).or_insert(0);
        *n += 1;
        if *n >= READ_ERRORS {
            errors.remove(name);
            return true;
        }
        false
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    /// Publishes the file of `name` (`publish` gives it its name and returns its checksum)
    /// and indexes it, as one step for removals (see [`Self::names`]); then keeps the budget.
    /// A failure only means the NAR is not cached.
    fn add(
        self: &Arc<Self>,
        name: &str,
        size: u64,
        publish: impl FnOnce() -> Result<Checksum, WriteError>,
    ) {
        let published = {
            let _names = lock(&self.names);
            publish().map(|checksum| self.index().insert(name, size, checksum, Verified::Yes))
        };
        match published {
            Ok(()) => {
                tracing::debug!(nar = %name, bytes = size, "NAR cache: stored");
                // A fill from before a pause ending in it does not end the pause: said once
                // fills run again.
                if !self.disk_full.is_active() && self.disk_full.reset() {
                    tracing::info!(dir = %self.disk.dir().display(), "NAR cache: the disk takes files again, caching");
                }
                self.evict();
                self.changed();
            }
            Err(e) => self.write_failed(name, &e),
        }
    }

    /// [`Self::drop_entry`] if the index still holds `name` at `size`, the size its caller
    /// looked up: a fill may have put a new file there since (a NAR named after its store
    /// path, rebuilt, of another size), which is not the one found wrong.
    fn drop_entry_of_size(&self, name: &str, size: u64) {
        let held = {
            let mut index = self.index();
            index.size(name) == Some(size) && index.remove(name)
        };
        if held {
            self.remove_unindexed(name);
        }
        self.changed();
    }

    fn drop_entry(&self, name: &str) {
        let held = self.index().remove(name);
        if held {
            self.remove_unindexed(name);
        }
        self.changed();
    }

    /// Removes the files of `name` unless it is indexed again: filled anew since it left the
    /// index, its files are the new ones. Its failed reads are forgotten either way (a count
    /// for every file that ever failed would be kept for the life of the process).
    fn remove_unindexed(&self, name: &str) {
        let _names = lock(&self.names);
        // Not in a directory this process does not hold (another cache's file of that name).
        if !self.index().contains(name) && !self.disk.replaced() {
            if let Err(e) = self.disk.remove(name) {
                // A file system gone read-only, say: the file keeps its space, which the
                // budget no longer counts, so caching pauses as on a full disk.
                if self.disk_full.trip() {
                    tracing::warn!(nar = %name, cause = %e, dir = %self.disk.dir().display(), "NAR cache: cannot remove an evicted file (its space is no longer counted; a restart counts it again); serving without caching for a while");
                }
            }
        }
        lock(&self.read_errors).remove(name);
    }

    fn changed(&self) {
        self.changed.notify_waiters();
    }

    /// The size of `name` once its file's check passes, if that is within `wait`; `None` if
    /// the check failed (the file is gone) or takes longer.
    async fn checked_within(&self, name: &str, wait: Duration) -> Option<u64> {
        let checked = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                // Looked at without touching: every change wakes every waiter.
                let (held, checked) = {
                    let index = self.index();
                    (index.size(name), index.verified_size(name))
                };
                match (held, checked) {
                    (_, Some(size)) => return Some(size),
                    // Its check could not read it: not checked within any wait.
                    (Some(_), None) if self.index().unchecked(name) => return None,
                    (Some(_), None) => {}
                    (None, None) => return None,
                }
                changed.await;
            }
        };
        tokio::time::timeout(wait, checked).await.ok().flatten()
    }

    /// Keeps the budget: the least recently used NARs leave the index at once, and their
    /// files are removed on the blocking pool (a large NAR may evict thousands of small ones,
    /// and unlinking them would hold an async worker that long). A NAR filled again under the
    /// same name meanwhile keeps its new files.
    /// Evicts what the budget no longer holds; how many NARs that was.
    fn evict(self: &Arc<Self>) -> usize {
        let victims = self.index().evict();
        let evicted = victims.len();
        if victims.is_empty() {
            return 0;
        }
        for name in &victims {
            tracing::debug!(nar = %name, "NAR cache: evicted");
        }
        crate::metrics::cache_evicted("nar_disk", evicted as u64);

        let this = Arc::clone(self);
        let remove = move || {
            for name in &victims {
                this.remove_unindexed(name);
            }
            this.changed();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(remove)),
            Err(_) => remove(),
        }
        evicted
    }

    /// Whether writing `need` more bytes should be skipped: during a disk-full pause, or if
    /// the file system would keep less than [`FREE_MARGIN`] free and the least recently used
    /// NARs cannot make the room (a budget larger than the disk, or other files filling it:
    /// the cache then shrinks to what the disk holds, as nginx's `min_free` does).
    fn disk_full(&self, need: u64) -> bool {
        self.no_room(need, 0)
    }

    /// [`Self::disk_full`] for a NAR of `size` bytes while fills still running are yet to
    /// write `reserved` more (what they wrote is gone from the free space already, and no
    /// longer reserved). NARs are evicted for this NAR's own room at most.
    fn no_room(&self, size: u64, reserved: u64) -> bool {
        match self.room_at_once(size, reserved) {
            Ok(no_room) => no_room,
            Err(avail) => self.make_room(size, reserved, avail),
        }
    }

    /// [`Self::no_room`] from async code: when room must be made, on the blocking pool.
    /// Evicting for a large NAR on a disk fuller than the budget allows may unlink thousands
    /// of small files, which would hold an async worker, and every request on it, that long.
    async fn no_room_off_worker(self: &Arc<Self>, size: u64, reserved: u64) -> bool {
        if let Ok(no_room) = self.room_at_once(size, reserved) {
            return no_room;
        }
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.no_room(size, reserved))
            .await
            .unwrap_or(true)
    }

    /// [`Self::no_room`]'s answer if it needs no eviction, else (`Err`) the free bytes.
    fn room_at_once(&self, size: u64, reserved: u64) -> Result<bool, u64> {
        if self.disk_full.is_active() {
            return Ok(true);
        }
        // Its directory lost, tried again after each pause.
        if self.lost.load(Ordering::SeqCst) {
            self.check_directory();
            if self.lost.load(Ordering::SeqCst) {
                return Ok(true);
            }
        }
        // Unknown free space is no reason to stop caching; a full disk is then found on write.
        let avail = self.disk.free_bytes().unwrap_or(u64::MAX);
        let wanted = size.saturating_add(reserved).saturating_add(FREE_MARGIN);
        if avail >= wanted {
            return Ok(false);
        }
        Err(avail)
    }

    /// The rest of [`Self::no_room`], with `avail` bytes free: evicts for the room, or pauses
    /// caching if it cannot be made.
    fn make_room(&self, size: u64, reserved: u64, avail: u64) -> bool {
        let wanted = size.saturating_add(reserved).saturating_add(FREE_MARGIN);
        let alone = size.saturating_add(FREE_MARGIN);
        let short = (wanted - avail).min(alone);
        let victims = self.index().make_room(short);
        if victims.is_empty() {
            // Room for this NAR, short only by what running fills have yet to write (which a
            // fill cut off never writes): this one passes the cache, and the others are not
            // paused for a minute.
            if avail >= alone {
                tracing::debug!(
                    nar_bytes = size,
                    reserved,
                    free_bytes = avail,
                    "NAR cache: no room beside the running fills; this NAR is not cached"
                );
                return true;
            }
            self.note_full(format_args!("{avail} bytes free"));
            return true;
        }
        tracing::info!(
            nars = victims.len(),
            free_bytes = avail,
            "NAR cache: the disk is fuller than the budget allows; evicting to keep room"
        );
        crate::metrics::cache_evicted("nar_disk", victims.len() as u64);
        for name in victims {
            self.remove_unindexed(&name);
        }
        self.changed();
        // A removal that failed paused caching: no room was made.
        self.disk_full.is_active()
    }

    fn note_full(&self, cause: impl fmt::Display) {
        if self.disk_full.trip() {
            tracing::warn!(dir = %self.disk.dir().display(), %cause, "NAR cache: disk full, serving without caching");
        }
    }

    /// Reports a failed write: a full disk pauses caching; a directory removed or replaced
    /// while in use is made anew ([`Self::check_directory`]); any other failure (a file
    /// system gone read-only, a directory the server's user may no longer write) pauses
    /// caching as a full disk does, logged once, and caching is tried again after the pause.
    fn write_failed(&self, name: &str, e: &WriteError) {
        match e {
            WriteError::DiskFull => self.note_full(e),
            // Its directory was replaced since the file was begun: made anew now if that was
            // not done yet.
            WriteError::Stale => {
                if !self.check_directory() {
                    tracing::debug!(nar = %name, "NAR cache: dropped a file begun in the directory before it was made anew");
                }
            }
            _ if self.check_directory() => {}
            WriteError::Io { cause, .. } if lasting(cause) => {
                if self.disk_full.trip() {
                    tracing::warn!(nar = %name, cause = %e, dir = %self.disk.dir().display(), "NAR cache: cannot write a file; serving without caching for a while");
                }
            }
            // Out of file descriptors (every client back at once after a restart), an I/O
            // error: this NAR is not cached, the next one may be.
            _ => tracing::warn!(nar = %name, cause = %e, "NAR cache: cannot write a file"),
        }
    }

    /// If the cache's directory was removed, renamed or replaced while in use (to empty the
    /// cache by hand, say), forgets every file it held and makes it anew, as at start-up;
    /// caching starts over. Where it cannot be made again (another cellar took the path, a
    /// directory of other files is there), caching pauses as on a full disk, said once, and
    /// this is tried again after the pause. True if the directory was found replaced.
    fn check_directory(&self) -> bool {
        if !self.disk.replaced() {
            // The directory this process holds is back (moved away and back): its index
            // still describes it.
            if self.lost.swap(false, Ordering::SeqCst) {
                tracing::info!(dir = %self.disk.dir().display(), "NAR cache: the directory is back, caching");
            }
            return false;
        }
        let _names = lock(&self.names);
        // Another request made it anew meanwhile.
        if !self.disk.replaced() {
            return true;
        }
        // Tried once per pause, not by every request meanwhile.
        if self.lost.load(Ordering::SeqCst) && self.disk_full.is_active() {
            return true;
        }
        match self.disk.reclaim() {
            Ok(()) => {
                let forgotten = self.index().clear();
                lock(&self.read_errors).clear();
                tracing::warn!(dir = %self.disk.dir().display(), forgotten, "NAR cache: the directory was removed or replaced while in use; made it anew, caching starts over");
                self.lost.store(false, Ordering::SeqCst);
                self.disk_full.reset();
            }
            // What the index holds stays: the directory may come back (moved away and back).
            Err(e) => {
                self.lost.store(true, Ordering::SeqCst);
                if self.disk_full.trip() {
                    tracing::warn!(dir = %self.disk.dir().display(), cause = %e, "NAR cache: the directory was removed or replaced while in use and cannot be made anew; serving without caching for a while");
                }
            }
        }
        self.changed();
        true
    }

    /// Hashes a file indexed at start-up in the background ([`CHECKS_AT_ONCE`] at a time);
    /// keeps it if it matches its `.meta`, drops it (to be fetched again) otherwise. With
    /// [`CHECKS_WAITING`] checks waiting already, leaves it unchecked for now.
    fn spawn_verify(self: &Arc<Self>, name: String) {
        let Some(expected) = self.index().start_verify(&name) else {
            return;
        };
        if self.checks_waiting.fetch_add(1, Ordering::SeqCst) >= CHECKS_WAITING {
            self.checks_waiting.fetch_sub(1, Ordering::SeqCst);
            self.index().set_unchecked(&name);
            self.changed();
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let turn = this.checks.clone().acquire_owned().await;
            this.checks_waiting.fetch_sub(1, Ordering::SeqCst);
            let Ok(turn) = turn else {
                return; // never closed
            };
            let (cache, file) = (this.clone(), name.clone());
            let check = tokio::task::spawn_blocking(move || {
                let _turn = turn;
                cache.verify(&file, expected);
            });
            // A check that panicked leaves the file to be checked again on its next use.
            if check.await.is_err() {
                this.index().set_unchecked(&name);
                this.changed();
            }
        });
    }

    /// The check [`Self::spawn_verify`] runs.
    fn verify(&self, name: &str, expected: (u64, Checksum)) {
        match self.disk.verify(name, expected) {
            Ok(()) => {
                self.index().set_verified(name);
                self.changed();
            }
            // Not read (out of file descriptors after a restart, with every client at once):
            // checked again on a later use, unless that keeps failing.
            Err(disk::VerifyError::Unreadable(e))
                if e.kind() != io::ErrorKind::NotFound && !self.read_failed(name) =>
            {
                tracing::warn!(nar = %name, cause = %e, "NAR cache: cannot read the file to check it, serving from the store");
                self.index().set_unchecked(name);
                self.changed();
            }
            // Gone: evicted while it waited for its check (fills after a restart), or
            // removed by hand. Nothing to say if the cache let it go itself.
            Err(disk::VerifyError::Unreadable(e)) if e.kind() == io::ErrorKind::NotFound => {
                if self.index().contains(name) {
                    tracing::warn!(nar = %name, "NAR cache: cached file is missing, fetching it again");
                }
                self.drop_entry_of_size(name, expected.0);
            }
            Err(e) => {
                tracing::warn!(nar = %name, cause = %e, "NAR cache: cached file is corrupt, fetching it again");
                // The entry checked, not one a fill put there meanwhile.
                self.drop_entry_of_size(name, expected.0);
            }
        }
    }
}
