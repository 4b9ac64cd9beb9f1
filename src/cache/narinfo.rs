//! Signed, rendered narinfos in memory, bounded in bytes, with a positive and a (short)
//! negative TTL. A hot request does no parsing, signing or I/O. Loading goes through moka's
//! `try_get_with`, which runs one loader per key however many requests wait for it
//! (single-flight); errors are not cached.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::future::Cache;
use moka::Expiry;

use crate::error::Error;
use crate::nix::StorePathHash;

/// `Some(narinfo)` or `None` for "not in this cache".
pub type Lookup = Option<Bytes>;

struct Ttl {
    positive: Duration,
    negative: Duration,
}

impl Expiry<StorePathHash, Lookup> for Ttl {
    fn expire_after_create(&self, _: &StorePathHash, v: &Lookup, _: Instant) -> Option<Duration> {
        Some(if v.is_some() {
            self.positive
        } else {
            self.negative
        })
    }
}

/// Invalidation counters, each shared by the hashes that fall into it.
const GENERATIONS: usize = 1024;

pub struct NarInfoCache {
    cache: Cache<StorePathHash, Lookup>,
    /// Bumped by every invalidation of a hash of theirs: a miss loaded across one is loaded
    /// again, so an upload that lands while a lookup is in flight is not hidden behind a
    /// cached miss. One counter per group of hashes, not one for all: while uploads land
    /// every few milliseconds, a miss of another path is not looked up again for them.
    generations: Box<[AtomicU64]>,
}

impl NarInfoCache {
    pub fn new(max_bytes: u64, positive: Duration, negative: Duration) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &StorePathHash, v: &Lookup| {
                // Key, Option and bookkeeping: about 100 bytes beyond the text.
                u32::try_from(v.as_ref().map_or(0, Bytes::len) + 100).unwrap_or(u32::MAX)
            })
            .expire_after(Ttl { positive, negative })
            // Least recently used goes first, and every new entry is admitted: moka's default
            // (TinyLFU) turns away a new key once the cache is full of keys asked for more
            // than once, so a closure just prefetched would not be kept, and the prefetch of
            // the next would load it again.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .eviction_listener(move |_, v: Lookup, cause| {
                let weight = v.as_ref().map_or(0, Bytes::len) as u64 + 100;
                if crate::metrics::evicted_for_room(cause, weight, max_bytes) {
                    crate::metrics::cache_evicted("narinfo_memory", 1);
                }
            })
            .build();
        Self {
            cache,
            generations: (0..GENERATIONS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The invalidation counter of `h`.
    fn generation(&self, h: StorePathHash) -> &AtomicU64 {
        use std::hash::{BuildHasher as _, BuildHasherDefault};
        let hasher = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        &self.generations[(hasher.hash_one(h) % GENERATIONS as u64) as usize]
    }

    /// The cached lookup for `h`, or the result of `load` (run once for all concurrent
    /// callers), which is then cached.
    pub async fn get_or_load<F, Fut>(&self, h: StorePathHash, load: F) -> Result<Lookup, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Lookup, Error>>,
    {
        // Set when this caller's loader runs: anything else was answered from memory (or by a
        // load another request ran at the same time, which saved a store request all the same).
        let loaded = AtomicBool::new(false);
        let found = self.cached(h, &load, &loaded).await?;
        let result = match (loaded.load(Ordering::Relaxed), &found) {
            (true, _) => "miss",
            (false, Some(_)) => "hit",
            (false, None) => "negative_hit",
        };
        crate::metrics::cache_lookup("narinfo_memory", result);
        Ok(found)
    }

    /// Loads `h` like [`Self::get_or_load`] without counting a lookup: for prefetching,
    /// which no client asked for.
    pub async fn fill<F, Fut>(&self, h: StorePathHash, load: F) -> Result<Lookup, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Lookup, Error>>,
    {
        self.cached(h, &load, &AtomicBool::new(false)).await
    }

    /// The cached lookup for `h`, else `load`'s (once for all concurrent callers; `loaded` set
    /// if this caller's ran).
    async fn cached<F, Fut>(
        &self,
        h: StorePathHash,
        load: &F,
        loaded: &AtomicBool,
    ) -> Result<Lookup, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Lookup, Error>>,
    {
        let generation = self.generation(h);
        let before = generation.load(Ordering::SeqCst);
        // The invalidations counted when this caller's own look (if it ran one) began.
        let began = &AtomicU64::new(before);
        let attempt = move || async move {
            loaded.store(true, Ordering::Relaxed);
            self.load_fresh(generation, load, began).await
        };
        let found = self
            .cache
            .try_get_with(h, attempt())
            .await
            .map_err(|e: Arc<Error>| (*e).clone())?;
        // Looked again if an invalidation came after the look that found the answer began:
        // this caller's own look says when that was. A caller that had the answer from
        // another's look (or from memory) does not know, and looks again only for a miss
        // (which could hide an upload for the negative TTL): the look's own caller does for
        // what it found, and every caller waiting on it looking again would multiply reads.
        let now = generation.load(Ordering::SeqCst);
        let fresh = if loaded.load(Ordering::Relaxed) {
            now == began.load(Ordering::SeqCst)
        } else {
            found.is_some() || now == before
        };
        if fresh {
            return Ok(found);
        }
        // An invalidation came after the load looked, perhaps before what it found was kept
        // (the cache keeps it only once the load has returned): look again rather than keep a
        // miss that could hide an upload for the negative TTL, or a narinfo an upload
        // replaced or took back (its NAR gone) for the positive one.
        self.cache.invalidate(&h).await;
        self.cache
            .try_get_with(h, attempt())
            .await
            .map_err(|e: Arc<Error>| (*e).clone())
    }

    /// Whether `h` is held (a miss included), without loading it.
    pub fn contains(&self, h: StorePathHash) -> bool {
        self.cache.contains_key(&h)
    }

    /// Runs `load`, again if an invalidation (counted by `generation`) happened meanwhile;
    /// `began` is set to the count when the look whose answer is returned began.
    async fn load_fresh<F, Fut>(
        &self,
        generation: &AtomicU64,
        load: &F,
        began: &AtomicU64,
    ) -> Result<Lookup, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Lookup, Error>>,
    {
        for _ in 0..3 {
            let before = generation.load(Ordering::SeqCst);
            began.store(before, Ordering::SeqCst);
            let found = load().await?;
            if generation.load(Ordering::SeqCst) == before {
                return Ok(found);
            }
        }
        began.store(generation.load(Ordering::SeqCst), Ordering::SeqCst);
        load().await
    }

    /// Number of entries (misses included) and their weight in bytes.
    pub async fn usage(&self) -> (u64, u64) {
        // moka counts lazily: settle what is pending so a report matches the requests before it.
        self.cache.run_pending_tasks().await;
        (self.cache.entry_count(), self.cache.weighted_size())
    }

    /// Forgets `h` if what it holds is still `held` (the same bytes in memory), without
    /// counting an invalidation: nothing was written, and a load under way for another
    /// caller need not start over.
    pub async fn forget_if_held(&self, h: StorePathHash, held: &Bytes) {
        let same = self.cache.get(&h).await.is_some_and(|now| {
            now.is_some_and(|now| now.as_ptr() == held.as_ptr() && now.len() == held.len())
        });
        if same {
            self.cache.invalidate(&h).await;
        }
    }

    /// Forgets `h` (after an upload, so the new narinfo is served at once).
    pub async fn invalidate(&self, h: StorePathHash) {
        self.generation(h).fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate(&h).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the very bytes read are forgotten (another request may have loaded the narinfo
    /// again meanwhile), and no invalidation is counted (a load under way is not restarted).
    #[tokio::test]
    async fn forgets_only_what_it_was_shown() {
        let c = NarInfoCache::new(1 << 20, Duration::from_secs(600), Duration::from_secs(15));
        let h: StorePathHash = "f904kp3djilk732cgbnxhpy7vzykbqsh".parse().unwrap();
        let held = Bytes::from_static(b"StorePath: x\n");
        let shown = held.clone();
        c.get_or_load(h, || async { Ok(Some(shown.clone())) })
            .await
            .unwrap();
        let before = c.generation(h).load(Ordering::SeqCst);
        c.forget_if_held(h, &Bytes::from(b"StorePath: x\n".to_vec()))
            .await;
        assert!(c.contains(h), "other bytes, even equal ones");
        c.forget_if_held(h, &held.slice(..3)).await;
        assert!(c.contains(h), "a part of them");
        c.forget_if_held(h, &held).await;
        assert!(!c.contains(h));
        assert_eq!(c.generation(h).load(Ordering::SeqCst), before);
    }

    /// Narinfos let go for room are counted for `/metrics`; those expired are not.
    #[tokio::test]
    async fn narinfos_let_go_for_room_are_counted() {
        let c = NarInfoCache::new(2000, Duration::from_secs(600), Duration::from_secs(600));
        let before = crate::metrics::cache_evictions("narinfo_memory");
        for i in 0..20u32 {
            let h: StorePathHash = format!("{:0>32}", crate::nix::base32::encode(&i.to_be_bytes()))
                .parse()
                .unwrap();
            c.get_or_load(h, || async { Ok(Some(Bytes::from(vec![b'x'; 300]))) })
                .await
                .unwrap();
        }
        c.usage().await;
        // 2000 bytes hold 5 of 400 (others' tests may count meanwhile).
        let evicted = crate::metrics::cache_evictions("narinfo_memory") - before;
        assert!(evicted >= 15, "{evicted}");
    }

    #[test]
    fn hits_live_for_the_positive_ttl_and_misses_for_the_negative_one() {
        let ttl = Ttl {
            positive: Duration::from_secs(3600),
            negative: Duration::from_secs(5),
        };
        let h: StorePathHash = "0".repeat(32).parse().unwrap();
        let now = Instant::now();
        let hit = Some(Bytes::from_static(b"StorePath: x\n"));
        assert_eq!(
            ttl.expire_after_create(&h, &hit, now),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            ttl.expire_after_create(&h, &None, now),
            Some(Duration::from_secs(5))
        );
    }

    /// A miss found while uploads kept landing (each look raced by an invalidation) is not
    /// kept: the path is looked up again until a look is not raced.
    #[tokio::test]
    async fn a_miss_raced_by_an_invalidation_is_not_kept() {
        let cache = NarInfoCache::new(
            1 << 20,
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );
        let h: StorePathHash = "0".repeat(32).parse().unwrap();
        let calls = &std::sync::atomic::AtomicUsize::new(0);
        let generation = cache.generation(h);
        let load = move || async move {
            // Uploads land during the first four looks (all load_fresh makes), then stop.
            if calls.fetch_add(1, Ordering::SeqCst) < 4 {
                generation.fetch_add(1, Ordering::SeqCst);
                return Ok(None);
            }
            Ok(Some(Bytes::from_static(b"StorePath: x\n")))
        };
        let found = cache.get_or_load(h, load).await.unwrap();
        assert!(found.is_some(), "the miss was kept");
        assert!(cache
            .fill(h, || async { Ok(None) })
            .await
            .unwrap()
            .is_some());
    }

    /// A narinfo taken back while it was being loaded (an upload refused after it was written,
    /// its NAR gone; `verify --repair`) is not kept for the positive TTL: looked up again.
    #[tokio::test]
    async fn a_narinfo_raced_by_an_invalidation_is_not_kept() {
        let cache = NarInfoCache::new(
            1 << 20,
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );
        let h: StorePathHash = "0".repeat(32).parse().unwrap();
        let calls = &std::sync::atomic::AtomicUsize::new(0);
        let cache_ref = &cache;
        let load = move || async move {
            // The first look finds the narinfo, which is taken back before the look returns.
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                cache_ref.invalidate(h).await;
                return Ok(Some(Bytes::from_static(b"StorePath: x\n")));
            }
            Ok(None)
        };
        assert_eq!(cache.get_or_load(h, load).await.unwrap(), None);
        let again = cache.fill(h, || async { Ok(Some(Bytes::new())) }).await;
        assert_eq!(again.unwrap(), None, "the taken-back narinfo was kept");
    }

    /// Uploads of other paths landing while a miss is looked up do not make it looked up
    /// again (each would be a store request, and one per upstream).
    #[tokio::test]
    async fn a_miss_is_looked_up_once_while_other_paths_are_uploaded() {
        let cache = NarInfoCache::new(1 << 20, Duration::from_secs(60), Duration::from_secs(60));
        let h: StorePathHash = "0".repeat(32).parse().unwrap();
        // Hashes of other paths, counted apart from h.
        let others: Vec<StorePathHash> = (1..100u32)
            .map(|i| format!("{:0>32}", crate::nix::base32::encode(&i.to_be_bytes())))
            .filter_map(|s| s.parse().ok())
            .filter(|o| !std::ptr::eq(cache.generation(*o), cache.generation(h)))
            .collect();
        assert!(others.len() > 90);
        let calls = &std::sync::atomic::AtomicUsize::new(0);
        let (cache, others) = (&cache, &others);
        let load = move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            for o in others {
                cache.invalidate(*o).await;
            }
            Ok(None)
        };
        assert!(cache.get_or_load(h, load).await.unwrap().is_none());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// A full cache keeps what is loaded last, however often the older entries were read:
    /// a closure prefetched into it is there when the client asks.
    #[tokio::test]
    async fn a_full_cache_admits_new_entries() {
        let text = Bytes::from(vec![b'x'; 900]);
        let cache = NarInfoCache::new(1_000_000, Duration::from_secs(60), Duration::from_secs(60));
        let hash = |i: u32| -> StorePathHash {
            format!("{:0>32}", crate::nix::base32::encode(&i.to_be_bytes()))
                .parse()
                .unwrap()
        };
        // Full, then each entry read a few times (moka counts reads once it is half full).
        for round in 0..6 {
            for i in 0..1000 {
                let t = text.clone();
                cache
                    .fill(hash(i), || async { Ok(Some(t.clone())) })
                    .await
                    .unwrap();
            }
            if round == 0 {
                cache.usage().await;
            }
        }
        cache.usage().await;
        let new = hash(100_000);
        let t = text.clone();
        cache
            .fill(new, || async { Ok(Some(t.clone())) })
            .await
            .unwrap();
        cache.usage().await;
        assert!(cache.contains(new));
    }
}
