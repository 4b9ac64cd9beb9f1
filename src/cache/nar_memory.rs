//! Small NARs in memory, bounded in bytes: most paths of a closure have NARs of a few KiB, and
//! a hot closure of them is then served without any I/O.
//!
//! Which NARs are small is known before fetching them: every narinfo cellar loads announces
//! its NAR's size (`FileSize:`), recorded here ([`NarMemory::hint`]) for NARs of every size:
//! the NAR disk cache holds its files to it too ([`NarMemory::announced`]), and a NAR held
//! here of another size than its narinfo now says (a NAR named after its store path, which
//! an upstream replaced) is let go. A NAR with a small hint is loaded whole, once for all concurrent requests (a client's and a prefetch's
//! alike), and kept; anything else takes the streaming path (the disk cache or the store).
//! NARs are immutable, so entries need no TTL: the least recently used go first, to the NAR
//! disk cache if there is one ([`Spill`]): small NARs are written to disk only when memory
//! lets them go, not every one as it is loaded (a file and its `.meta` per NAR of a few KiB
//! cost more than fetching it).

use std::future::Future;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{FutureExt as _, TryStreamExt as _};
use moka::future::Cache;

use crate::error::Error;
use crate::store::{Object, StoreError};

/// NAR sizes remembered from narinfos (about 100 bytes each).
const MAX_HINTS: u64 = 200_000;

/// Why a NAR was not loaded into memory.
#[derive(Debug, Clone)]
pub enum Unloaded {
    /// Larger than the hint said (or than the limit): stream it instead.
    Large,
    /// The store failed, or does not have it.
    Failed(Error),
}

/// Where NARs that memory lets go for room are handed (the NAR disk cache).
pub type Spill = Arc<dyn Fn(&str, Bytes) + Send + Sync>;

/// Keeps a NAR read whole elsewhere in memory, if small enough; says whether it did
/// ([`NarMemory::keeper`]).
pub type Keep = Arc<dyn Fn(String, Bytes) -> BoxFuture<'static, bool> + Send + Sync>;

/// The `FileHash` narinfos give a NAR file, if one did ([`NarMemory::file_hashes`]): what the
/// NAR disk cache checks the bytes of a fill against before it keeps them.
pub type FileHashOf =
    Arc<dyn Fn(String) -> BoxFuture<'static, Option<crate::nix::Sha256>> + Send + Sync>;

pub struct NarMemory {
    /// `None` when disabled (`cache.nar_memory_bytes = 0`).
    cache: Option<Cache<Arc<str>, Bytes>>,
    /// Room for the NARs being loaded ahead of clients, in KiB ([`Self::room_ahead`]).
    ahead: Arc<tokio::sync::Semaphore>,
    max_object: u64,
    hints: Cache<Arc<str>, u64>,
    /// The `NarHash` the last narinfo read gave each NAR named after its store path (see
    /// [`NarMemory::contents_changed`]).
    contents: Cache<Arc<str>, crate::nix::Sha256>,
    /// NARs named after their bytes that narinfos gave two sizes: no narinfo's size is taken
    /// for them any more (see [`NarMemory::hint`]).
    conflicted: Cache<Arc<str>, ()>,
    /// The `FileHash` the narinfos read gave each NAR (not a NAR's name: a copy cellar
    /// re-encoded on upload is named after the file uploaded), unless two gave it two.
    file_hashes: Cache<Arc<str>, Option<crate::nix::Sha256>>,
}

impl NarMemory {
    /// `spill` gets every NAR let go for room (not those replaced or invalidated).
    pub fn new(max_bytes: u64, max_object: u64, spill: Option<Spill>) -> Self {
        let cache = (max_bytes > 0 && max_object > 0).then(|| {
            // Least recently used out, every new NAR admitted: a prefetched NAR is loaded
            // before its first read, and moka's default admission would turn it away once
            // memory is full of NARs read once.
            let builder = Cache::builder()
                .max_capacity(max_bytes)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .weigher(|k: &Arc<str>, v: &Bytes| -> u32 {
                    u32::try_from(k.len() + v.len() + 64).unwrap_or(u32::MAX)
                });
            builder
                .eviction_listener(move |k: Arc<Arc<str>>, v: Bytes, cause| {
                    let weight = (k.len() + v.len() + 64) as u64;
                    if crate::metrics::evicted_for_room(cause, weight, max_bytes) {
                        crate::metrics::cache_evicted("nar_memory", 1);
                    }
                    if cause == moka::notification::RemovalCause::Size {
                        if let Some(spill) = &spill {
                            spill(&k, v);
                        }
                    }
                })
                .build()
        });
        Self {
            cache,
            max_object,
            hints: hints(MAX_HINTS),
            contents: Cache::builder()
                .max_capacity(MAX_HINTS)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            conflicted: Cache::builder()
                .max_capacity(MAX_HINTS)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            file_hashes: Cache::builder()
                .max_capacity(MAX_HINTS)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            ahead: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(max_bytes.max(max_object).div_ceil(1024))
                    .unwrap_or(usize::MAX)
                    .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
        }
    }

    /// The size of NAR `name` if it is one memory would hold (see [`Self::is_small`]).
    pub async fn small_size(&self, name: &str) -> Option<u64> {
        self.cache.as_ref()?;
        self.hints
            .get(name)
            .await
            .filter(|&size| size <= self.max_object)
    }

    /// Room to load a NAR of `size` bytes ahead of any client, if the NARs being loaded ahead
    /// leave it: they hold at most the memory budget between them (or one largest NAR), on
    /// top of what memory keeps; `None` otherwise (the client's own request loads it).
    pub fn room_ahead(&self, size: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let kib = u32::try_from(size.div_ceil(1024)).ok()?;
        self.ahead.clone().try_acquire_many_owned(kib).ok()
    }

    /// A narinfo read gives NAR file `name` the contents `nar_hash`: whether copies held under
    /// that name may be of other contents, and are to be dropped. Only a NAR named after its
    /// store path (attic, older nix-serve) changes under its name, when the path is rebuilt,
    /// and then possibly at the same size, which [`NarMemory::announced`] would not tell: it
    /// has, unless the last narinfo read in this process gave it the same hash (the first
    /// after a start, or after the name was forgotten, may follow a copy from before).
    pub async fn contents_changed(&self, name: &str, nar_hash: crate::nix::Sha256) -> bool {
        if names_its_bytes(name) {
            return false;
        }
        let name: Arc<str> = name.into();
        if self.contents.get(&name).await == Some(nar_hash) {
            return false;
        }
        self.contents.insert(name, nar_hash).await;
        true
    }

    /// Runs the cache's pending evictions (and so its spills) now.
    #[cfg(test)]
    pub async fn settle(&self) {
        if let Some(c) = &self.cache {
            c.run_pending_tasks().await;
        }
    }

    /// Keeps NARs read whole elsewhere here, as if loaded, when small enough: the NAR disk
    /// cache hands over the small NARs it fetched for a request that came without their
    /// narinfo (a client that had it from its own cache), so that those too reach the disk only
    /// when memory lets them go. `None` when memory keeps no NARs.
    pub fn keeper(&self) -> Option<Keep> {
        let cache = self.cache.clone()?;
        let (hints, max_object) = (self.hints.clone(), self.max_object);
        Some(Arc::new(move |name: String, data: Bytes| {
            let (cache, hints) = (cache.clone(), hints.clone());
            async move {
                let size = data.len() as u64;
                if size > max_object {
                    return false;
                }
                let name: Arc<str> = name.into();
                hints.insert(name.clone(), size).await;
                cache.insert(name, data).await;
                true
            }
            .boxed()
        }))
    }

    /// How many NARs are held and their weight in bytes (`None` when disabled).
    pub async fn usage(&self) -> Option<(u64, u64)> {
        let cache = self.cache.as_ref()?;
        // moka counts lazily: settle what is pending so a report matches the requests before it.
        cache.run_pending_tasks().await;
        Some((cache.entry_count(), cache.weighted_size()))
    }

    /// Whether NARs are kept in memory at all.
    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// Records the size a narinfo gives for NAR file `name`. Two narinfos that give a NAR
    /// named after its bytes two sizes cannot both be right, and `URL:` and `FileSize:` are
    /// not signed (an upstream's narinfo may name another path's NAR): the size is then
    /// forgotten, and no narinfo's taken for it any more (while remembered), the NAR served at
    /// the size it has (Nix checks its hash) rather than refused as broken on one narinfo's
    /// word.
    pub async fn hint(&self, name: &str, file_size: Option<u64>) {
        let Some(size) = file_size else { return };
        if names_its_bytes(name) {
            if self.conflicted.contains_key(name) {
                return;
            }
            if let Some(held) = self.hints.get(name).await.filter(|&h| h != size) {
                tracing::warn!(nar = %name, size, held, "narinfos give this NAR two sizes; going by neither");
                self.conflicted.insert(name.into(), ()).await;
                self.hints.invalidate(name).await;
                return;
            }
        }
        self.hints.insert(name.into(), size).await;
    }

    /// Records the `FileHash` a narinfo gives NAR file `name`: two narinfos that give it two
    /// cannot both be right (`URL:` and `FileHash:` are not signed), and neither is then
    /// taken (as for sizes, [`Self::hint`]).
    pub async fn hint_file_hash(&self, name: &str, file_hash: Option<crate::nix::Sha256>) {
        let Some(hash) = file_hash else { return };
        let name: Arc<str> = name.into();
        let now = match self.file_hashes.get(&name).await {
            None => Some(hash),
            Some(Some(held)) if held == hash => return,
            // Two, or two before: neither.
            Some(_) => None,
        };
        self.file_hashes.insert(name, now).await;
    }

    /// The `FileHash` narinfos gave NAR file `name`, if one did and none gave another.
    pub async fn file_hash(&self, name: &str) -> Option<crate::nix::Sha256> {
        self.file_hashes.get(name).await.flatten()
    }

    /// [`Self::file_hash`], for the NAR disk cache.
    pub fn file_hash_of(&self) -> FileHashOf {
        let hashes = self.file_hashes.clone();
        Arc::new(move |name: String| {
            let hashes = hashes.clone();
            async move { hashes.get(name.as_str()).await.flatten() }.boxed()
        })
    }

    /// Gives NAR file `name` the size `size` whatever was known (for tests that stand for
    /// narinfos of several sizes one after another).
    #[cfg(test)]
    pub async fn set_hint(&self, name: &str, size: u64) {
        self.hints.insert(name.into(), size).await;
    }

    /// The size the last narinfo read for NAR file `name` gave it, if one did.
    pub async fn announced(&self, name: &str) -> Option<u64> {
        self.hints.get(name).await
    }

    /// Whether a NAR of `size` bytes is kept here (when its narinfo was read first).
    pub fn takes(&self, size: u64) -> bool {
        self.cache.is_some() && size <= self.max_object
    }

    /// Whether `name` is known to be small enough to be kept.
    pub async fn is_small(&self, name: &str) -> bool {
        self.small_size(name).await.is_some()
    }

    /// Held in memory now (no loading).
    pub async fn get(&self, name: &str) -> Option<Bytes> {
        let found = self.held(name).await;
        if let Some(result) = self.lookup_result(name, found.is_some()).await {
            crate::metrics::cache_lookup("nar_memory", result);
        }
        found
    }

    /// What a lookup of `name` counts as in `cellar_cache_lookups_total`: nothing for a NAR
    /// this cache would not hold (it is off, or the NAR is large or of a size no narinfo
    /// read here gave: it streams), so that the ratio is that of the small NARs.
    async fn lookup_result(&self, name: &str, found: bool) -> Option<&'static str> {
        if found {
            Some("hit")
        } else if self.is_small(name).await {
            Some("miss")
        } else {
            None
        }
    }

    /// The size of `name` if it is held (a HEAD answered without the store).
    pub async fn size_of(&self, name: &str) -> Option<u64> {
        Some(self.held(name).await?.len() as u64)
    }

    /// `name` as held, unless its narinfo now gives it another size: then it is let go.
    async fn held(&self, name: &str) -> Option<Bytes> {
        let cache = self.cache.as_ref()?;
        let held = cache.get(name).await?;
        match self.hints.get(name).await {
            Some(size) if size != held.len() as u64 => {
                tracing::info!(nar = %name, held = held.len(), size, "NAR memory: its narinfo now gives another size; letting it go");
                cache.invalidate(name).await;
                None
            }
            _ => Some(held),
        }
    }

    /// Held in memory (without counting a lookup): for prefetching.
    pub async fn contains(&self, name: &str) -> bool {
        match &self.cache {
            Some(c) => c.contains_key(name),
            None => false,
        }
    }

    /// Forgets the bytes of `name` (see [`crate::cache::nar::NarCache::forget`]); a copy let go
    /// this way is not spilled to disk.
    pub async fn forget(&self, name: &str) {
        if let Some(cache) = &self.cache {
            cache.invalidate(name).await;
        }
    }

    /// `name` from memory, or read whole from what `source` opens (once for all concurrent
    /// callers) and kept. `key` names the object in error messages.
    pub async fn load<F>(&self, name: &str, key: &str, source: F) -> Result<Bytes, Unloaded>
    where
        F: Future<Output = Result<Option<Object>, Error>>,
    {
        let Some(cache) = &self.cache else {
            return Err(Unloaded::Large);
        };
        let limit = self.max_object;
        let expected = self.hints.get(name).await;
        let exact = names_its_bytes(name);
        // Not kept, nor served, if its bytes are not what its narinfo says (rotted in the
        // bucket at the same size): a logged 502, and read again once the object is fixed.
        let said = self.file_hash(name).await;
        let read = async move {
            let bytes = read_small(source, key, limit, expected, exact).await?;
            let Some(said) = said else { return Ok(bytes) };
            let got = crate::nix::Sha256::digest(&bytes);
            if got != said {
                let why = crate::cache::nar::wrong_bytes(name, got, said);
                return Err(Unloaded::Failed(StoreError::Other(why).into()));
            }
            Ok(bytes)
        };
        let loaded = cache
            .try_get_with(name.into(), read)
            .await
            .map_err(|e: Arc<Unloaded>| (*e).clone());
        if matches!(loaded, Err(Unloaded::Large)) {
            // The narinfo's size was wrong: the NAR is streamed from now on, not opened whole
            // first on every request.
            self.hints.invalidate(name).await;
        }
        loaded
    }
}

/// Whether the NAR file `name` is named after its bytes (see
/// [`crate::nix::NarFileName::names_its_bytes`]): then another size than its narinfo's is a
/// broken object, never a rebuilt one.
pub(crate) fn names_its_bytes(name: &str) -> bool {
    name.parse::<crate::nix::NarFileName>()
        .is_ok_and(|f| f.names_its_bytes())
}

/// Reads the object `source` opens whole, if it is at most `limit` bytes and, when its
/// narinfo gave one, of the `expected` size. An object larger than `limit` is
/// [`Unloaded::Large`] (streamed instead), unless it is `exact` (named after its bytes) and
/// its narinfo said it is smaller: that one is of the wrong size.
async fn read_small<F>(
    source: F,
    key: &str,
    limit: u64,
    expected: Option<u64>,
    exact: bool,
) -> Result<Bytes, Unloaded>
where
    F: Future<Output = Result<Option<Object>, Error>>,
{
    let obj = source
        .await
        .map_err(Unloaded::Failed)?
        .ok_or(Unloaded::Failed(Error::NotFound))?;
    let length = obj.length;
    // A truncated or foreign object: kept, it would be served as it is until evicted (and
    // kept by proxies for a year). Refused, it is a logged 502, and read again once fixed.
    let wrong_size = |got: u64, size: u64| {
        Unloaded::Failed(
            StoreError::WrongSize {
                key: key.to_owned(),
                got,
                expected: size,
            }
            .into(),
        )
    };
    if length.is_some_and(|n| n > limit) {
        return Err(match expected {
            Some(size) if exact && length != Some(size) => {
                wrong_size(length.unwrap_or_default(), size)
            }
            _ => Unloaded::Large,
        });
    }
    if let (Some(size), Some(got)) = (expected, length) {
        if size != got {
            return Err(wrong_size(got, size));
        }
    }
    // Without a length (an upstream streaming it), read up to the limit: more is not small.
    let cap = length.unwrap_or(limit);
    // Room for what is expected, not for the limit: what is kept holds its whole allocation.
    let room = length.or(expected).unwrap_or(cap).min(cap);
    let mut buf = BytesMut::with_capacity(room as usize);
    let mut body = obj.body;
    while let Some(chunk) = body
        .try_next()
        .await
        .map_err(|e| Unloaded::Failed(StoreError::reading(key, &e).into()))?
    {
        let more = (buf.len() + chunk.len()) as u64;
        if more > cap {
            if length.is_some() {
                break;
            }
            // Named after its bytes, with a smaller size by its narinfo: broken, not large.
            return Err(match expected {
                Some(size) if exact => wrong_size(more, size),
                _ => Unloaded::Large,
            });
        }
        buf.extend_from_slice(&chunk);
    }

    let got = buf.len() as u64;
    match (length, expected) {
        (Some(n), _) if got != n => {
            return Err(Unloaded::Failed(
                StoreError::Unavailable(format!("{key}: the store sent {got} bytes of {n}")).into(),
            ));
        }
        (None, Some(size)) if got != size => return Err(wrong_size(got, size)),
        _ => {}
    }
    // Kept in an allocation of its own size (one made for more, or grown past it, would be
    // held whole, uncounted by the budget).
    if buf.capacity() > buf.len() {
        return Ok(Bytes::copy_from_slice(&buf));
    }
    Ok(buf.freeze())
}

/// The NAR sizes from narinfos, the least recently used going first, every new one admitted:
/// a hint is read right after its narinfo was (to prefetch its NAR), and moka's default
/// admission would turn new ones away once the map is full of older ones read twice.
fn hints(capacity: u64) -> Cache<Arc<str>, u64> {
    Cache::builder()
        .max_capacity(capacity)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn two_narinfos_giving_a_nar_two_file_hashes_leave_it_unchecked() {
        let m = NarMemory::new(1 << 20, 1 << 10, None);
        let (a, b) = (
            crate::nix::Sha256::digest(b"a"),
            crate::nix::Sha256::digest(b"b"),
        );
        m.hint_file_hash("x.nar", Some(a)).await;
        m.hint_file_hash("x.nar", Some(a)).await;
        m.hint_file_hash("x.nar", None).await;
        assert_eq!(m.file_hash("x.nar").await, Some(a));
        m.hint_file_hash("x.nar", Some(b)).await;
        assert_eq!(m.file_hash("x.nar").await, None, "neither");
        m.hint_file_hash("x.nar", Some(a)).await;
        assert_eq!(m.file_hash("x.nar").await, None, "neither, still");
        assert_eq!((m.file_hash_of())("x.nar".into()).await, None);
        m.hint_file_hash("y.nar", Some(b)).await;
        assert_eq!((m.file_hash_of())("y.nar".into()).await, Some(b));
    }

    /// NARs let go for room are counted for `/metrics` (spilled to disk or not).
    #[tokio::test]
    async fn nars_let_go_for_room_are_counted() {
        let mem = Arc::new(MemoryStore::new());
        let store: Arc<dyn Store> = mem.clone();
        let m = NarMemory::new(4000, 1000, None);
        let before = crate::metrics::cache_evictions("nar_memory");
        for i in 0..20 {
            let name = format!("{i}x.nar");
            mem.insert(&format!("nar/{name}"), vec![1u8; 900]);
            m.load(
                &name,
                &format!("nar/{name}"),
                open(&store, &format!("nar/{name}")),
            )
            .await
            .unwrap();
        }
        m.settle().await;
        // At least the 16 that 4000 bytes cannot hold (others' tests may count meanwhile).
        let evicted = crate::metrics::cache_evictions("nar_memory") - before;
        assert!(evicted >= 16, "{evicted}");
    }

    #[tokio::test]
    async fn a_full_hint_map_takes_new_hints() {
        let h = hints(10);
        for i in 0..10 {
            let name: Arc<str> = format!("old{i}").into();
            h.insert(name.clone(), i).await;
            for _ in 0..5 {
                h.get(&name).await;
            }
        }
        h.run_pending_tasks().await;
        h.insert("new".into(), 42).await;
        h.run_pending_tasks().await;
        assert_eq!(h.get("new").await, Some(42));
    }
    use crate::store::Store;

    async fn open(store: &Arc<dyn Store>, key: &str) -> Result<Option<Object>, Error> {
        Ok(store.get(key, None).await?)
    }

    /// Two narinfos giving a NAR named after its bytes two sizes: one lies (its `URL:` and
    /// `FileSize:` are not signed), so neither size holds. A NAR named after its store path
    /// takes the last narinfo's (it was rebuilt).
    #[tokio::test]
    async fn a_nar_named_after_its_bytes_given_two_sizes_keeps_neither() {
        let m = NarMemory::new(1 << 20, 1000, None);
        let named = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s.nar";
        m.hint(named, Some(100)).await;
        m.hint(named, Some(100)).await;
        assert_eq!(m.announced(named).await, Some(100));
        m.hint(named, Some(1)).await;
        assert_eq!(m.announced(named).await, None);
        // Neither is taken again, whichever comes next.
        for size in [100, 1] {
            m.hint(named, Some(size)).await;
            assert_eq!(m.announced(named).await, None);
        }
        let by_path = "6bxnj2gfflqa529lddzh3zhcn45nn86r.nar";
        m.hint(by_path, Some(100)).await;
        m.hint(by_path, Some(200)).await;
        assert_eq!(m.announced(by_path).await, Some(200));
    }

    /// Lookups count as hits and misses only for NARs the cache would hold.
    #[tokio::test]
    async fn only_lookups_of_nars_it_would_hold_are_counted() {
        let m = NarMemory::new(1 << 20, 1000, None);
        m.hint("small.nar", Some(100)).await;
        m.hint("large.nar", Some(5000)).await;
        assert_eq!(m.lookup_result("small.nar", true).await, Some("hit"));
        assert_eq!(m.lookup_result("small.nar", false).await, Some("miss"));
        assert_eq!(m.lookup_result("large.nar", false).await, None);
        assert_eq!(m.lookup_result("unknown.nar", false).await, None);
        let off = NarMemory::new(0, 1000, None);
        off.hint("small.nar", Some(100)).await;
        assert_eq!(off.lookup_result("small.nar", false).await, None);
    }

    #[tokio::test]
    async fn small_nars_are_read_once_and_large_ones_left_to_streaming() {
        let mem = Arc::new(MemoryStore::new());
        mem.insert("nar/small.nar", vec![1u8; 100]);
        mem.insert("nar/large.nar", vec![2u8; 5000]);
        let store: Arc<dyn Store> = mem.clone();
        let m = NarMemory::new(1 << 20, 1000, None);
        m.hint("small.nar", Some(100)).await;
        m.hint("large.nar", Some(5000)).await;
        m.hint("lying.nar", Some(10)).await;
        assert!(m.is_small("small.nar").await);
        assert!(!m.is_small("large.nar").await, "over the limit");
        assert_eq!(m.announced("large.nar").await, Some(5000));
        assert!(!m.is_small("unknown.nar").await);

        let (a, b) = tokio::join!(
            m.load("small.nar", "nar/small.nar", open(&store, "nar/small.nar")),
            m.load("small.nar", "nar/small.nar", open(&store, "nar/small.nar"))
        );
        assert_eq!(a.unwrap(), vec![1u8; 100]);
        assert_eq!(b.unwrap(), vec![1u8; 100]);
        assert_eq!(mem.requests(), 1, "one read for concurrent loads");
        assert!(m.get("small.nar").await.is_some());
        assert!(m.contains("small.nar").await);
        assert_eq!(m.size_of("small.nar").await, Some(100));
        assert_eq!(mem.requests(), 1);
        assert!(m.enabled());

        // Exactly the limit is still small.
        mem.insert("nar/edge.nar", vec![4u8; 1000]);
        let edge = m.load("edge.nar", "nar/edge.nar", open(&store, "nar/edge.nar"));
        assert_eq!(edge.await.unwrap().len(), 1000);

        // A hint that lies: the object is larger than the limit, so it is streamed instead.
        mem.insert("nar/lying.nar", vec![3u8; 5000]);
        assert!(matches!(
            m.load("lying.nar", "nar/lying.nar", open(&store, "nar/lying.nar"))
                .await,
            Err(Unloaded::Large)
        ));
        assert!(!m.contains("lying.nar").await);
        assert!(
            !m.is_small("lying.nar").await,
            "a hint found wrong is dropped: later requests stream at once"
        );

        // An object shorter than its narinfo says is refused, not kept.
        mem.insert("nar/short.nar", vec![5u8; 60]);
        m.hint("short.nar", Some(100)).await;
        let short = m.load("short.nar", "nar/short.nar", open(&store, "nar/short.nar"));
        match short.await {
            Err(Unloaded::Failed(e)) => assert!(e.to_string().contains("FileSize"), "{e}"),
            Ok(_) | Err(Unloaded::Large) => panic!("a short NAR was taken"),
        }
        assert!(!m.contains("short.nar").await);
        assert!(matches!(
            m.load("gone.nar", "nar/gone.nar", open(&store, "nar/gone.nar"))
                .await,
            Err(Unloaded::Failed(Error::NotFound))
        ));
    }

    #[tokio::test]
    async fn an_object_in_several_chunks_is_read_whole_and_no_further() {
        let m = NarMemory::new(1 << 20, 1000, None);
        let chunked = |chunks: Vec<&'static [u8]>, length: Option<u64>| async move {
            let body = futures::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c))));
            Ok::<_, Error>(Some(Object {
                body: Box::pin(body),
                length,
                range: None,
                encoding: None,
            }))
        };
        let two = chunked(vec![&[1; 50], &[2; 50]], Some(100));
        let got = m.load("two.nar", "nar/two.nar", two).await.unwrap();
        assert_eq!(got.len(), 100);
        assert_eq!(&got[45..55], &[1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
        // A store that sends more than it announced is not believed.
        let more = chunked(vec![&[1; 50], &[2; 60]], Some(100));
        assert!(matches!(
            m.load("more.nar", "nar/more.nar", more).await,
            Err(Unloaded::Failed(_))
        ));

        // Sent without a length (an upstream streaming it): read up to the limit, kept if it
        // ends there, not small if it goes on, and held to its narinfo's FileSize.
        let streamed = chunked(vec![&[3; 600], &[4; 400]], None);
        let got = m.load("unsized.nar", "nar/unsized.nar", streamed).await;
        assert_eq!(got.unwrap().len(), 1000);
        let over = chunked(vec![&[3; 600], &[4; 401]], None);
        assert!(matches!(
            m.load("over.nar", "nar/over.nar", over).await,
            Err(Unloaded::Large)
        ));
        m.hint("fits.nar", Some(1000)).await;
        let fits = chunked(vec![&[3; 600], &[4; 400]], None);
        assert_eq!(
            m.load("fits.nar", "nar/fits.nar", fits)
                .await
                .unwrap()
                .len(),
            1000
        );
        m.hint("hinted.nar", Some(999)).await;
        let hinted = chunked(vec![&[3; 600], &[4; 400]], None);
        match m.load("hinted.nar", "nar/hinted.nar", hinted).await {
            Err(Unloaded::Failed(e)) => assert!(e.to_string().contains("FileSize"), "{e}"),
            _ => panic!("a NAR of another size than its narinfo's was taken"),
        }
    }

    /// A NAR named after its store path changes when its upstream rebuilds the path: once the
    /// narinfo gives another size, the NAR held is let go and the new one loaded.
    #[tokio::test]
    async fn a_nar_its_narinfo_now_gives_another_size_is_let_go() {
        let mem = Arc::new(MemoryStore::new());
        mem.insert("nar/p.nar", vec![1u8; 100]);
        let store: Arc<dyn Store> = mem.clone();
        let m = NarMemory::new(1 << 20, 1000, None);
        m.hint("p.nar", Some(100)).await;
        let old = m
            .load("p.nar", "nar/p.nar", open(&store, "nar/p.nar"))
            .await;
        assert_eq!(old.unwrap().len(), 100);
        m.hint("p.nar", Some(100)).await;
        assert!(m.get("p.nar").await.is_some(), "the same size: kept");

        mem.insert("nar/p.nar", vec![2u8; 200]);
        m.hint("p.nar", Some(200)).await;
        assert_eq!(m.size_of("p.nar").await, None);
        assert!(m.get("p.nar").await.is_none());
        let new = m
            .load("p.nar", "nar/p.nar", open(&store, "nar/p.nar"))
            .await;
        assert_eq!(new.unwrap(), vec![2u8; 200]);
        assert_eq!(m.size_of("p.nar").await, Some(200));
    }

    #[tokio::test]
    async fn disabled_keeps_nothing() {
        let m = NarMemory::new(0, 1000, None);
        m.hint("small.nar", Some(100)).await;
        assert!(!m.is_small("small.nar").await);
        assert!(!m.enabled());
    }

    /// What memory lets go for room goes to the spill (the disk cache), with its bytes.
    #[tokio::test]
    async fn nars_let_go_for_room_are_spilled() {
        let spilled = Arc::new(std::sync::Mutex::new(Vec::new()));
        let to = spilled.clone();
        let spill: Spill = Arc::new(move |name: &str, b: Bytes| {
            to.lock().unwrap().push((name.to_owned(), b.len()));
        });
        // Room for about two NARs of 1000 bytes.
        let m = NarMemory::new(2500, 1000, Some(spill));
        for i in 0..6 {
            let name = format!("n{i}.nar");
            let obj = async {
                Ok::<_, Error>(Some(Object::from_bytes(
                    Bytes::from(vec![i as u8; 1000]),
                    None,
                )?))
            };
            m.load(&name, &name, obj).await.unwrap();
        }
        if let Some(c) = &m.cache {
            c.run_pending_tasks().await;
        }
        let spilled = spilled.lock().unwrap().clone();
        assert!(spilled.len() >= 3, "{spilled:?}");
        assert!(spilled.iter().all(|(_, len)| *len == 1000), "{spilled:?}");
        let held = (0..6)
            .filter(|i| {
                m.cache
                    .as_ref()
                    .unwrap()
                    .contains_key(format!("n{i}.nar").as_str())
            })
            .count();
        assert_eq!(held + spilled.len(), 6, "each NAR is held or spilled");
    }
}

#[cfg(test)]
mod sized_tests {
    use super::*;

    /// An object of `data`, without a length (an upstream streaming it), in two chunks.
    fn streamed(data: Vec<u8>) -> Result<Option<Object>, Error> {
        let half = data.len() / 2;
        let (a, b) = (
            Bytes::copy_from_slice(&data[..half]),
            Bytes::from(data).slice(half..),
        );
        let body = futures::stream::iter([Ok(a), Ok(b)]);
        Ok(Some(Object {
            body: Box::pin(body),
            length: None,
            range: None,
            encoding: None,
        }))
    }

    /// A NAR read without a length is kept in an allocation of its own size, with or without
    /// its narinfo's size: not in one of the limit's, which the budget would not count.
    #[tokio::test]
    async fn a_nar_read_without_a_length_is_kept_at_its_size() {
        for expected in [Some(2000), None] {
            let got = read_small(
                async { streamed(vec![5u8; 2000]) },
                "k",
                1 << 16,
                expected,
                false,
            )
            .await
            .unwrap_or_else(|_| panic!("not loaded"));
            let held = got.try_into_mut().unwrap_or_else(|_| panic!("shared"));
            assert_eq!(held.capacity(), 2000, "expected {expected:?}");
        }
    }

    /// One named after its bytes that goes past the limit while its narinfo says it is
    /// smaller is broken (a 502), as with a length; not streamed as a large NAR.
    #[tokio::test]
    async fn an_unsized_nar_longer_than_its_narinfo_says_is_refused() {
        let name = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s.nar";
        assert!(names_its_bytes(name));
        let long = read_small(
            async { streamed(vec![5u8; 5000]) },
            "k",
            1000,
            Some(100),
            true,
        );
        assert!(matches!(long.await, Err(Unloaded::Failed(_))));
        let large = read_small(
            async { streamed(vec![5u8; 5000]) },
            "k",
            1000,
            Some(100),
            false,
        );
        assert!(matches!(large.await, Err(Unloaded::Large)));
    }

    fn whole(data: Bytes) -> Result<Option<Object>, Error> {
        let length = Some(data.len() as u64);
        let body = futures::stream::iter([Ok(data)]);
        Ok(Some(Object {
            body: Box::pin(body),
            length,
            range: None,
            encoding: None,
        }))
    }

    /// The NARs loaded ahead of clients hold at most the memory budget between them (or one
    /// largest NAR, if more), counted by the KiB; room comes back as each is done.
    #[test]
    fn nars_loaded_ahead_hold_at_most_the_budget() {
        let m = NarMemory::new(4096, 4096, None);
        let first = m.room_ahead(1500).expect("room for one");
        let second = m.room_ahead(1500).expect("room for two");
        assert!(m.room_ahead(1500).is_none(), "no room for a third");
        drop(first);
        assert!(m.room_ahead(1500).is_some());
        drop(second);
        assert!(m.room_ahead(4096).is_some());
        assert!(m.room_ahead(4097).is_none());
        let one_large = NarMemory::new(1024, 8192, None);
        assert!(one_large.room_ahead(8192).is_some());
    }

    /// Memory full of NARs each read a few times still takes a new one (prefetched before its
    /// first read): the least recently used go.
    #[tokio::test]
    async fn a_full_memory_admits_new_nars() {
        let m = NarMemory::new(1_000_000, 1000, None);
        let data = Bytes::from(vec![7u8; 900]);
        // 1100 NARs of 969 bytes each as weighed: over the budget.
        for round in 0..6 {
            for i in 0..1100 {
                let name = format!("n{i}.nar");
                let d = data.clone();
                let _ = m.load(&name, "k", async move { whole(d) }).await;
                m.get(&name).await;
            }
            if round == 0 {
                m.settle().await;
            }
        }
        m.settle().await;
        let d = data.clone();
        let _ = m.load("new.nar", "k", async move { whole(d) }).await;
        m.settle().await;
        assert!(m.contains("new.nar").await);
    }
}
