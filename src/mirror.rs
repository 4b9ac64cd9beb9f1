//! Mirroring: a path served from an upstream marked `mirror = true` is copied into the store in
//! the background (NAR, then narinfo, verified like an upload, by
//! [`Uploader::copy_path`]), so the next request for it is served from the store and keeps
//! working when the upstream is gone. Its closure comes along: each reference the store lacks
//! that a mirrored upstream serves is copied first, and the path itself only once all are in,
//! so the store serves every closure it holds a mirrored path of without the mirrored
//! upstreams. A reference only an upstream that is not mirrored serves stays there, served
//! through it (as an upload's may).
//!
//! The narinfo lookup only offers the path ([`Mirror::offer`]); it never waits for the copy,
//! and a copy that fails is logged and forgotten: the path is offered again on a later miss.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cache::narinfo::NarInfoCache;
use crate::error::{Error, UploadError};
use crate::nix::{NarInfo, StorePathHash};
use crate::store::{object_key, Store};
use crate::sync::{lock, KeyedLocks};
use crate::upload::Uploader;
use crate::upstream::Upstreams;

/// Copies running at once. Reads must not wait behind a crowd of background copies, and anyone
/// can start one with a GET.
const MAX_COPIES: usize = 4;

/// Paths offered while every copy runs, waiting for one to end (a client walking a closure,
/// and the prefetch ahead of it, offer its paths faster than four copies go). Offers beyond
/// are dropped: mirrored on a later miss.
const MAX_WAITING: usize = 1024;

/// The most paths one copy brings into the store with a path's closure: a closure the store
/// lacks more of is not mirrored (a misconfigured upstream would otherwise have one copy walk
/// a distribution). Its paths are still served through the upstream.
const MAX_CLOSURE: usize = 20_000;

/// Clones share their queue and copies.
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

struct Inner {
    /// [`MAX_CLOSURE`] (smaller in tests, which build closures over it).
    max_closure: usize,
    uploader: Arc<Uploader>,
    /// Where the NAR is read from: the store, then the upstreams (the NAR is usually only at
    /// the upstream the narinfo came from).
    reads: Arc<dyn Store>,
    /// Where the narinfos of the references a mirrored path's store lacks are found.
    upstreams: Arc<Upstreams>,
    copies: Arc<Semaphore>,
    /// Offered paths no copy has taken yet, in the order offered.
    waiting: Mutex<VecDeque<NarInfo>>,
    /// Set by [`Mirror::retire`]: nothing more is copied.
    retired: AtomicBool,
    /// The paths being copied now, each with the lock its copier holds meanwhile: copies
    /// whose closures overlap (a cold closure's references, offered together) copy a shared
    /// path once, not once each from the upstream into the store.
    copying: KeyedLocks<StorePathHash>,
    /// The narinfo memory cache of the state this mirror serves: a path copied leaves it, so
    /// that its narinfo is read from the store next, whatever becomes of the upstream (the
    /// one in memory is the upstream's, naming its NAR, which the store may hold under
    /// another name: `upload.compression` re-encodes it).
    served: arc_swap::ArcSwapOption<NarInfoCache>,
    /// Told when a copier found a path another was copying (for tests).
    #[cfg(test)]
    contended: tokio::sync::Notify,
}

impl Mirror {
    pub fn new(uploader: Arc<Uploader>, reads: Arc<dyn Store>, upstreams: Arc<Upstreams>) -> Self {
        Self {
            inner: Arc::new(Inner {
                max_closure: MAX_CLOSURE,
                uploader,
                reads,
                upstreams,
                copies: Arc::new(Semaphore::new(MAX_COPIES)),
                waiting: Mutex::new(VecDeque::new()),
                retired: AtomicBool::new(false),
                copying: KeyedLocks::new(),
                served: arc_swap::ArcSwapOption::empty(),
                #[cfg(test)]
                contended: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Copies the path `info` describes (a narinfo an upstream served, already checked against
    /// that upstream's keys) into the store, in the background, once one of [`MAX_COPIES`] is
    /// free; whether it was taken. Must be called within a Tokio runtime. A NAR named after its
    /// store path (attic, old nix-serve) cannot be: the store keeps NARs under a hash of its
    /// bytes.
    pub fn offer(&self, info: NarInfo) -> bool {
        if self.inner.retired.load(Ordering::SeqCst) {
            return false;
        }
        if !info.nar_file().is_ok_and(|f| f.names_its_bytes()) {
            tracing::debug!(path = %info.store_path, url = %info.url, "not mirrored: its NAR is not named after its bytes");
            return false;
        }
        {
            let mut waiting = lock(&self.inner.waiting);
            if waiting.iter().any(|w| w.store_path == info.store_path) {
                return true;
            }
            if waiting.len() >= MAX_WAITING {
                tracing::debug!(path = %info.store_path, "mirroring busy, skipped");
                return false;
            }
            waiting.push_back(info);
        }
        Inner::work(&self.inner);
        true
    }

    /// Has the paths this mirror copies dropped from `narinfos` (the memory cache of the
    /// state it serves now, which a reload may replace while keeping the mirror).
    pub fn serves(&self, narinfos: &Arc<NarInfoCache>) {
        self.inner.served.store(Some(narinfos.clone()));
    }

    /// Stops this mirror, whose upstreams a reload replaced (an upstream no longer mirrored,
    /// or gone, perhaps for serving what it should not): the paths waiting are dropped, later
    /// offers refused, and a copy under way stops before its next path. What it copied is in
    /// the store, verified and with its references, as an upload would be.
    pub fn retire(&self) {
        self.inner.retired.store(true, Ordering::SeqCst);
        let dropped = std::mem::take(&mut *lock(&self.inner.waiting)).len();
        if dropped > 0 {
            tracing::info!(
                paths = dropped,
                "upstreams reconfigured: paths waiting to be mirrored dropped"
            );
        }
    }

    /// Whether [`Self::retire`] was called (for tests).
    #[cfg(test)]
    pub fn is_retired(&self) -> bool {
        self.inner.retired.load(Ordering::SeqCst)
    }

    /// Paths offered and not yet taken by a copy (for tests).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        lock(&self.inner.waiting).len()
    }
}

impl Inner {
    /// Starts a copier if a copy is free and a path waits: it copies paths one after another
    /// until none waits.
    fn work(this: &Arc<Self>) {
        let Some((permit, first)) = this.take() else {
            return;
        };
        let this = this.clone();
        tokio::spawn(async move {
            let (mut permit, mut next) = (permit, first);
            loop {
                this.copy(next).await;
                let waiting = lock(&this.waiting).pop_front();
                if let Some(info) = waiting.filter(|_| !this.retired.load(Ordering::SeqCst)) {
                    next = info;
                    continue;
                }
                drop(permit);
                // A path offered between the look above and the permit's release found no
                // copy free: looked for again now that one is.
                match this.take() {
                    Some((p, info)) => (permit, next) = (p, info),
                    None => return,
                }
            }
        });
    }

    /// A free copy and the next path waiting, if both are (and the mirror is not retired).
    fn take(&self) -> Option<(OwnedSemaphorePermit, NarInfo)> {
        if self.retired.load(Ordering::SeqCst) {
            return None;
        }
        let permit = self.copies.clone().try_acquire_owned().ok()?;
        let info = lock(&self.waiting).pop_front()?;
        Some((permit, info))
    }

    async fn copy(&self, info: NarInfo) {
        let path = info.store_path.clone();
        match self.copy_closure(info).await {
            Ok(0) => {}
            Ok(1) => tracing::info!(path = %path, "mirrored from upstream"),
            Ok(n) => {
                tracing::info!(path = %path, paths = n, "mirrored from upstream, with the references the store lacked")
            }
            Err(e) => {
                tracing::warn!(path = %path, cause = %e, "mirroring from upstream failed")
            }
        }
    }

    /// Copies `top` and every path of its closure the store lacks and a mirrored upstream
    /// serves, references first; how many were copied. Nothing of the closure is asked of the
    /// store twice, and a reference found in the store, or at an upstream that is not
    /// mirrored, is not walked further. Fails before copying anything when a reference is at
    /// no upstream or cannot be stored; a copy that fails stops the rest (what was copied
    /// before it has its references in, and is served whole).
    async fn copy_closure(&self, top: NarInfo) -> Result<usize, Error> {
        let rejected = |why: String| Error::Upload(UploadError::Rejected(why));
        let top_hash = top.hash();
        if self.in_store(top_hash).await? {
            return Ok(0);
        }
        let mut seen: HashSet<StorePathHash> = HashSet::from([top.hash()]);
        // Paths of the closure the store lacks (`top` first): what the limit counts, not the
        // references found in the store (a path with many references the store has is one
        // copy).
        let mut lacking = 1;
        // Depth first: a path leaves the stack, into `order`, once all its references have.
        let mut stack: Vec<(NarInfo, usize)> = vec![(top, 0)];
        let mut order: Vec<NarInfo> = Vec::new();
        while let Some((info, next)) = stack.last_mut() {
            let Some(r) = info.references.get(*next).cloned() else {
                if let Some((done, _)) = stack.pop() {
                    order.push(done);
                }
                continue;
            };
            *next += 1;
            if self.retired.load(Ordering::SeqCst) {
                tracing::info!(path = %r, "upstreams reconfigured: mirroring stopped");
                return Ok(0);
            }
            if !seen.insert(r.hash()) || self.in_store(r.hash()).await? {
                continue;
            }
            lacking += 1;
            if lacking > self.max_closure {
                return Err(rejected(format!(
                    "the store lacks over {} paths of its closure",
                    self.max_closure
                )));
            }
            let found = match self.upstreams.narinfo(r.hash()).await {
                // Left at that upstream, which is not to be copied from.
                (Some(f), _) if !f.mirror => continue,
                (Some(f), _) => f.info,
                (None, failed) => {
                    let why = if failed { "could not be asked" } else { "has" };
                    return Err(rejected(format!(
                        "its closure's {r} is not in the store and no upstream {why} it"
                    )));
                }
            };
            if !found.nar_file().is_ok_and(|f| f.names_its_bytes()) {
                return Err(rejected(format!(
                    "its closure's {r} has a NAR named after its store path, which cannot be \
                     stored"
                )));
            }
            stack.push((found, 0));
        }
        let mut n = 0;
        for info in order {
            if self.retired.load(Ordering::SeqCst) {
                tracing::info!(path = %info.store_path, "upstreams reconfigured: mirroring stopped");
                break;
            }
            let slot = self.copying.get(&info.hash());
            let _copying = match slot.try_lock() {
                Ok(held) => held,
                Err(_) => {
                    // Another copy is copying it: waited for, then looked for again.
                    #[cfg(test)]
                    self.contended.notify_one();
                    let held = slot.lock().await;
                    if self.in_store(info.hash()).await? {
                        continue;
                    }
                    held
                }
            };
            let (h, path) = (info.hash(), info.store_path.clone());
            self.copy_one(info).await.map_err(|e| {
                if h == top_hash {
                    e
                } else {
                    // Logged under the path offered: named here.
                    rejected(format!("copying its closure's {path}: {e}"))
                }
            })?;
            if let Some(narinfos) = self.served.load_full() {
                narinfos.invalidate(h).await;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Whether the store (not an upstream) has a narinfo for `h`.
    async fn in_store(&self, h: StorePathHash) -> Result<bool, Error> {
        Ok(self.uploader.stored(h).await?.is_some())
    }

    /// Copies one path whose references are all in the store.
    async fn copy_one(&self, info: NarInfo) -> Result<(), Error> {
        let reads = self.reads.clone();
        let fetch_nar = |name| async move {
            let obj = reads
                .get(&object_key::nar(&name), None)
                .await?
                .ok_or_else(|| {
                    Error::Upload(UploadError::Rejected(format!(
                        "no upstream has its NAR {name}"
                    )))
                })?;
            Ok(obj.body)
        };
        // Its references from mirrored upstreams are in the store by now; the others count
        // at their upstream.
        self.uploader
            .copy_path(info, fetch_nar, Some(&self.upstreams))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::memory::MemoryStore;

    fn narinfo(url: &str) -> NarInfo {
        let text = format!(
            "StorePath: /nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top\nURL: {url}\n\
             Compression: none\nNarHash: sha256:0v1h8fzqs60d8pccpwskrpnv3c7fz25ddhwl2rwlfblan5zvirsv\n\
             NarSize: 624\nReferences: \n"
        );
        NarInfo::parse(&text, "/nix/store").unwrap()
    }

    /// A client walking a closure offers its paths faster than the copies go: those offered
    /// while every copy runs wait for one, and every path is mirrored.
    #[tokio::test]
    async fn paths_offered_while_every_copy_runs_wait_for_one() {
        use crate::nix::Sha256;
        let cfg = Config::default();
        let upstream = Arc::new(MemoryStore::new());
        let reads: Arc<dyn Store> = upstream.clone();
        let mem = Arc::new(MemoryStore::new());
        let store: Arc<dyn Store> = mem.clone();
        let (tx, mut written) = tokio::sync::mpsc::unbounded_channel();
        mem.after_write("", move |k| {
            if k.ends_with(".narinfo") {
                let _ = tx.send(k.to_owned());
            }
        });
        let uploader = Arc::new(Uploader::new(&cfg.upload, &cfg.store_dir, store));
        let upstreams = Arc::new(Upstreams::new(&[], &cfg.store_dir).unwrap());
        let mirror = Mirror::new(uploader, reads, upstreams);
        let n = 3 * MAX_COPIES;
        for i in 0..n {
            let mut nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
            nar.extend_from_slice(format!("path {i}").as_bytes());
            let sha = Sha256::digest(&nar);
            let file = format!("{}.nar", sha.to_nix32());
            upstream.insert(&format!("nar/{file}"), nar.clone());
            let hash: String = format!("{i:0>32}")
                .chars()
                .map(|c| if c == '0' { 'a' } else { c })
                .collect();
            let text = format!(
                "StorePath: /nix/store/{hash}-p\nURL: nar/{file}\nCompression: none\n\
                 NarHash: {sha}\nNarSize: {}\nReferences: \n",
                nar.len()
            );
            let info = NarInfo::parse(&text, "/nix/store").unwrap();
            assert!(mirror.offer(info.clone()), "offer {i} dropped");
            assert!(mirror.offer(info), "offered twice: taken once");
        }
        let mut got = Vec::new();
        while got.len() < n {
            let key = tokio::time::timeout(std::time::Duration::from_secs(60), written.recv())
                .await
                .expect("not every path offered was mirrored")
                .unwrap();
            got.push(key);
        }
        got.sort();
        got.dedup();
        assert_eq!(got.len(), n, "{got:?}");
        assert_eq!(mirror.waiting(), 0);
    }

    /// A path of a closure: its narinfo, the key of its NAR, and the NAR.
    type Path = (NarInfo, String, Vec<u8>);

    /// A path of a closure: its narinfo signed by `key` (NAR uncompressed), the NAR's key, and
    /// the NAR.
    fn closure_path(key: &crate::nix::SecretKey, hash: &str, refs: &[&str]) -> Path {
        use crate::nix::Sha256;
        let mut nar = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1\x00\x00\x00".to_vec();
        nar.extend_from_slice(hash.as_bytes());
        let sha = Sha256::digest(&nar);
        let file = format!("{}.nar", sha.to_nix32());
        let refs: Vec<String> = refs.iter().map(|r| format!("{r}-p")).collect();
        let text = format!(
            "StorePath: /nix/store/{hash}-p\nURL: nar/{file}\nCompression: none\n\
             NarHash: {sha}\nNarSize: {}\nReferences: {}\n",
            nar.len(),
            refs.join(" ")
        );
        let mut info = NarInfo::parse(&text, "/nix/store").unwrap();
        info.sign(key, "/nix/store");
        (info, format!("nar/{file}"), nar)
    }

    /// An upstream serving `paths`' narinfos (their NARs are read from the returned store, as
    /// the read path would through the upstreams), and a mirror into `store` over it.
    async fn mirror_over(
        key: &crate::nix::SecretKey,
        paths: &[Path],
        store: &Arc<MemoryStore>,
    ) -> Mirror {
        mirror_over_each(key, &[(paths, true)], store).await
    }

    /// [`mirror_over`] with several upstreams, each serving its paths, mirrored or not.
    async fn mirror_over_each(
        key: &crate::nix::SecretKey,
        upstreams: &[(&[Path], bool)],
        store: &Arc<MemoryStore>,
    ) -> Mirror {
        let nars = Arc::new(MemoryStore::new());
        let mut configs = Vec::new();
        for (paths, mirror) in upstreams {
            let mut app = axum::Router::new();
            for (info, nar_key, nar) in paths.iter() {
                nars.insert(nar_key, nar.clone());
                let text = info.render("/nix/store");
                app = app.route(
                    &format!("/{}.narinfo", info.hash()),
                    axum::routing::get(move || async move { text }),
                );
            }
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            configs.push(crate::config::UpstreamConfig {
                url,
                public_keys: vec![key.public()],
                timeout: std::time::Duration::from_secs(10),
                mirror: *mirror,
            });
        }
        let cfg = Config::default();
        let upstreams = Upstreams::new(&configs, &cfg.store_dir).unwrap();
        let inner: Arc<dyn Store> = store.clone();
        let uploader = Arc::new(Uploader::new(&cfg.upload, &cfg.store_dir, inner));
        let mut mirror = Mirror::new(uploader, nars, Arc::new(upstreams));
        if let Some(inner) = Arc::get_mut(&mut mirror.inner) {
            inner.max_closure = TEST_CLOSURE;
        }
        mirror
    }

    /// The closure limit of the mirrors over test upstreams: closures over it are cheap.
    const TEST_CLOSURE: usize = 64;

    /// `n` distinct store path hashes (`a…`, then digits).
    fn hashes(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                format!("{i:0>32}")
                    .chars()
                    .map(|c| if c == '0' { 'a' } else { c })
                    .collect()
            })
            .collect()
    }

    /// A closure the store lacks more paths of than the limit is not copied, nothing of it;
    /// one of exactly the limit is.
    #[tokio::test]
    async fn a_closure_the_store_lacks_more_of_than_the_limit_is_not_mirrored() {
        let key = crate::nix::SecretKey::generate("up-1").unwrap();
        for (refs, copied) in [(TEST_CLOSURE - 1, true), (TEST_CLOSURE, false)] {
            let store = Arc::new(MemoryStore::new());
            let names = hashes(refs);
            let mut paths: Vec<Path> = names.iter().map(|h| closure_path(&key, h, &[])).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let top = closure_path(&key, D, &names);
            paths.insert(0, top.clone());
            let mirror = mirror_over(&key, &paths, &store).await;
            let done = mirror.inner.copy_closure(top.0.clone()).await;
            match copied {
                true => assert_eq!(done.unwrap(), refs + 1),
                false => {
                    let e = done.unwrap_err();
                    assert!(e.to_string().contains("lacks over 64 paths"), "{e}");
                    assert!(store.keys().is_empty(), "copied: {:?}", store.keys());
                }
            }
        }
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccc";
    const D: &str = "dddddddddddddddddddddddddddddddd";

    /// The closure limit counts the paths the store lacks, not references it has: a path with
    /// more references than the limit, all in the store, is copied.
    #[tokio::test]
    async fn references_the_store_has_do_not_count_against_the_closure_limit() {
        let key = crate::nix::SecretKey::generate("up-1").unwrap();
        let store = Arc::new(MemoryStore::new());
        let refs = hashes(TEST_CLOSURE + 1);
        for r in &refs {
            let (info, nar_key, nar) = closure_path(&key, r, &[]);
            store.insert(&format!("{r}.narinfo"), info.render("/nix/store"));
            store.insert(&nar_key, nar);
        }
        // And one the store lacks, at the upstream, found after all those.
        let mut refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        refs.push(C);
        let top = closure_path(&key, D, &refs);
        let lacking = closure_path(&key, C, &[]);
        let mirror = mirror_over(&key, &[top.clone(), lacking], &store).await;
        let n = mirror.inner.copy_closure(top.0.clone()).await.unwrap();
        assert_eq!(n, 2);
        for h in [C, D] {
            assert!(store.bytes(&format!("{h}.narinfo")).is_some(), "{h}");
        }
    }

    /// A mirrored path brings the paths of its closure the store lacks, references first,
    /// each from the upstream that serves it: once the upstream is gone, the store serves the
    /// whole closure. A reference the store has is not walked further.
    #[tokio::test]
    async fn a_mirrored_path_brings_its_closure_references_first() {
        let key = crate::nix::SecretKey::generate("up-1").unwrap();
        let paths = [
            closure_path(&key, A, &[B, C, A]),
            closure_path(&key, B, &[C, D]),
            closure_path(&key, C, &[]),
            closure_path(&key, D, &[]),
        ];
        let store = Arc::new(MemoryStore::new());
        // D is in the store already: neither copied nor asked of the upstream.
        store.insert(
            &format!("{D}.narinfo"),
            paths[3].0.render("/nix/store").into_bytes(),
        );
        store.insert(&paths[3].1, paths[3].2.clone());
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let w = written.clone();
        store.after_write("", move |k| {
            if let Some(h) = k.strip_suffix(".narinfo") {
                w.lock().unwrap().push(h.to_owned());
            }
        });
        let mirror = mirror_over(&key, &paths[..3], &store).await;
        let n = mirror.inner.copy_closure(paths[0].0.clone()).await.unwrap();
        assert_eq!(n, 3);
        assert_eq!(*written.lock().unwrap(), [C, B, A], "references first");
        for (_, nar, _) in &paths {
            assert!(store.bytes(nar).is_some(), "{nar}");
        }
        // Mirrored again: nothing to do.
        assert_eq!(
            mirror.inner.copy_closure(paths[0].0.clone()).await.unwrap(),
            0
        );
    }

    /// Two copies whose closures share a path (a cold closure's references, offered together)
    /// copy it once: the second waits for the first, then finds it in the store.
    #[tokio::test]
    async fn overlapping_copies_copy_a_shared_path_once() {
        let key = crate::nix::SecretKey::generate("up-1").unwrap();
        let paths = [
            closure_path(&key, A, &[C]),
            closure_path(&key, B, &[C]),
            closure_path(&key, C, &[]),
        ];
        let store = Arc::new(MemoryStore::new());
        let shared_nar = paths[2].1.clone();
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = writes.clone();
        store.after_write(&shared_nar, move |_| {
            w.fetch_add(1, Ordering::SeqCst);
        });
        let mirror = mirror_over(&key, &paths, &store).await;
        let gate = store.hold_writes(&shared_nar);
        let copy = |top: NarInfo| {
            let inner = mirror.inner.clone();
            tokio::spawn(async move { inner.copy_closure(top).await })
        };
        let first = copy(paths[0].0.clone());
        gate.reached().await;
        let second = copy(paths[1].0.clone());
        let waited = mirror.inner.contended.notified();
        tokio::time::timeout(std::time::Duration::from_secs(30), waited)
            .await
            .expect("the second copy did not wait for the first");
        gate.open();
        assert_eq!(first.await.unwrap().unwrap(), 2, "C, then A");
        assert_eq!(second.await.unwrap().unwrap(), 1, "B alone");
        assert_eq!(
            writes.load(Ordering::SeqCst),
            1,
            "the shared NAR written twice"
        );
        for (info, _, _) in &paths {
            assert!(store.bytes(&format!("{}.narinfo", info.hash())).is_some());
        }
    }

    /// A mirror retired by a reload that replaced its upstreams copies nothing more: the copy
    /// under way ends with the path it is writing (its references are in), later offers are
    /// refused.
    #[tokio::test]
    async fn a_retired_mirror_stops_before_its_next_path() {
        let key = crate::nix::SecretKey::generate("up-1").unwrap();
        let paths = [closure_path(&key, A, &[B]), closure_path(&key, B, &[])];
        let store = Arc::new(MemoryStore::new());
        let mirror = mirror_over(&key, &paths, &store).await;
        let gate = store.hold_writes("nar/");
        let copying = {
            let (inner, top) = (mirror.inner.clone(), paths[0].0.clone());
            tokio::spawn(async move { inner.copy_closure(top).await })
        };
        gate.reached().await;
        mirror.retire();
        gate.open();
        assert_eq!(copying.await.unwrap().unwrap(), 1, "B, the path under way");
        assert!(store.bytes(&format!("{B}.narinfo")).is_some());
        assert!(store.bytes(&format!("{A}.narinfo")).is_none());
        assert!(store.bytes(&paths[0].1).is_none());
        assert!(!mirror.offer(paths[0].0.clone()));
        assert_eq!(mirror.waiting(), 0);
    }

    /// Retiring a mirror drops the paths waiting for a copy and says how many; with none
    /// waiting it says nothing. (A current-thread runtime: the copies offers start do not run
    /// before the test awaits.)
    #[tokio::test]
    async fn retiring_drops_the_paths_waiting_and_says_so() {
        let logs = crate::test_logs::capture();
        let key = crate::nix::SecretKey::generate("up-1").unwrap();
        let hashes: Vec<String> = "dfghijklmn"
            .chars()
            .take(MAX_COPIES + 2)
            .map(|c| c.to_string().repeat(32))
            .collect();
        let paths: Vec<Path> = hashes.iter().map(|h| closure_path(&key, h, &[])).collect();
        let store = Arc::new(MemoryStore::new());
        let mirror = mirror_over(&key, &paths, &store).await;
        mirror.retire();
        assert!(!logs.text().contains("dropped"), "{}", logs.text());

        let mirror = mirror_over(&key, &paths, &store).await;
        for (info, _, _) in &paths {
            assert!(mirror.offer(info.clone()));
        }
        assert_eq!(mirror.waiting(), 2, "{MAX_COPIES} taken by copies");
        mirror.retire();
        assert_eq!(mirror.waiting(), 0);
        let logged = logs.text();
        assert_eq!(
            logged
                .matches("paths waiting to be mirrored dropped")
                .count(),
            1,
            "{logged}"
        );
        assert!(logged.contains("paths=2"), "{logged}");
    }

    /// A reference only an upstream that is not mirrored serves stays there (served through
    /// it, as before): the path is mirrored with the references a mirrored upstream serves.
    #[tokio::test]
    async fn references_at_an_upstream_not_mirrored_stay_there() {
        let key = crate::nix::SecretKey::generate("up-1").unwrap();
        let paths = [
            closure_path(&key, A, &[B, C]),
            closure_path(&key, B, &[]),
            closure_path(&key, C, &[]),
        ];
        let store = Arc::new(MemoryStore::new());
        let mirrored = [paths[0].clone(), paths[1].clone()];
        let not_mirrored = [paths[2].clone()];
        let mirror = mirror_over_each(
            &key,
            &[(&not_mirrored[..], false), (&mirrored[..], true)],
            &store,
        )
        .await;
        let n = mirror.inner.copy_closure(paths[0].0.clone()).await.unwrap();
        assert_eq!(n, 2);
        assert!(store.bytes(&format!("{A}.narinfo")).is_some());
        assert!(store.bytes(&format!("{B}.narinfo")).is_some());
        assert!(store.bytes(&format!("{C}.narinfo")).is_none());
        assert!(store.bytes(&paths[2].1).is_none(), "C's NAR copied");
    }

    /// A closure with a path no upstream has (or one whose NAR cannot be stored) is not
    /// mirrored at all: its top would be a narinfo the store alone cannot serve whole.
    #[tokio::test]
    async fn a_path_whose_closure_cannot_be_mirrored_is_not() {
        let key = crate::nix::SecretKey::generate("up-1").unwrap();
        let paths = [
            closure_path(&key, A, &[B]),
            closure_path(&key, B, &[C]),
            closure_path(&key, C, &[]),
        ];
        let store = Arc::new(MemoryStore::new());
        // C is at no upstream.
        let mirror = mirror_over(&key, &paths[..2], &store).await;
        let e = mirror
            .inner
            .copy_closure(paths[0].0.clone())
            .await
            .unwrap_err();
        assert!(e.to_string().contains(C), "{e}");
        assert!(
            !store.keys().iter().any(|k| k.ends_with(".narinfo")),
            "{:?}",
            store.keys()
        );
        // B's NAR is named after its store path.
        let (mut b, _, _) = closure_path(&key, B, &[]);
        b.url = format!("nar/{B}.nar");
        b.sign(&key, "/nix/store");
        let paths = [paths[0].clone(), (b, String::new(), Vec::new())];
        let mirror = mirror_over(&key, &paths, &store).await;
        let e = mirror
            .inner
            .copy_closure(paths[0].0.clone())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("named after its store path"), "{e}");
        assert!(!store.keys().iter().any(|k| k.ends_with(".narinfo")));
    }

    /// A reference whose copy fails is named in the error, which is logged under the path
    /// offered; the path's own failure is its own.
    #[tokio::test]
    async fn a_reference_that_cannot_be_copied_is_named() {
        let key = crate::nix::SecretKey::generate("up-1").unwrap();
        for broken in [B, A] {
            let mut paths = [closure_path(&key, A, &[B]), closure_path(&key, B, &[])];
            // Its NAR is not the one its narinfo describes.
            let i = usize::from(broken == B);
            paths[i].2.push(0);
            let store = Arc::new(MemoryStore::new());
            let mirror = mirror_over(&key, &paths, &store).await;
            let e = mirror
                .inner
                .copy_closure(paths[0].0.clone())
                .await
                .unwrap_err()
                .to_string();
            assert_eq!(e.starts_with("copying its closure's "), broken == B, "{e}");
            if broken == B {
                assert!(
                    e.starts_with(&format!("copying its closure's {B}-p: ")),
                    "{e}"
                );
            }
        }
    }

    /// Each path copied leaves the narinfo memory cache the mirror serves (the upstream's
    /// narinfo there names the upstream's NAR, which the store may keep under another name):
    /// its narinfo is read from the store next. A reload may give the mirror another cache.
    #[tokio::test]
    async fn a_copied_path_leaves_the_narinfo_memory_cache() {
        let key = crate::nix::SecretKey::generate("up-1").unwrap();
        let paths = [closure_path(&key, A, &[B]), closure_path(&key, B, &[])];
        let store = Arc::new(MemoryStore::new());
        let mirror = mirror_over(&key, &paths, &store).await;
        let held = |c: Arc<NarInfoCache>| async move {
            for h in [A, B] {
                let body = bytes::Bytes::from_static(b"upstream's");
                c.get_or_load(h.parse().unwrap(), || async { Ok(Some(body.clone())) })
                    .await
                    .unwrap();
            }
            c
        };
        let day = std::time::Duration::from_secs(86400);
        let before = held(Arc::new(NarInfoCache::new(1 << 20, day, day))).await;
        let after = held(Arc::new(NarInfoCache::new(1 << 20, day, day))).await;
        mirror.serves(&before);
        mirror.serves(&after);
        assert_eq!(
            mirror.inner.copy_closure(paths[0].0.clone()).await.unwrap(),
            2
        );
        for h in [A, B] {
            assert!(!after.contains(h.parse().unwrap()), "{h}");
            assert!(before.contains(h.parse().unwrap()), "{h}");
        }
    }

    /// A NAR named after its store path cannot be stored (the store names NARs after their
    /// bytes): such a path is not offered a copy that would fail on every miss.
    #[tokio::test]
    async fn paths_whose_nar_is_named_after_the_store_path_are_not_copied() {
        let cfg = Config::default();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let uploader = Arc::new(Uploader::new(&cfg.upload, &cfg.store_dir, store.clone()));
        let upstreams = Arc::new(Upstreams::new(&[], &cfg.store_dir).unwrap());
        let mirror = Mirror::new(uploader, store, upstreams);
        assert!(!mirror.offer(narinfo("nar/6bxnj2gfflqa529lddzh3zhcn45nn86r.nar")));
        assert!(mirror.offer(narinfo(
            "nar/0v1h8fzqs60d8pccpwskrpnv3c7fz25ddhwl2rwlfblan5zvirsv.nar"
        )));
    }
}
