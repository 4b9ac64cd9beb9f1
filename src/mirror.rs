//! Mirroring: a path served from an upstream marked `mirror = true` is copied into the store in
//! the background (NAR, then narinfo, verified like an upload, by
//! [`Uploader::copy_path`]), so the next request for it is served from the store and keeps
//! working when the upstream is gone.
//!
//! The narinfo lookup only offers the path ([`Mirror::offer`]); it never waits for the copy,
//! and a copy that fails is logged and forgotten: the path is offered again on a later miss.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, UploadError};
use crate::nix::NarInfo;
use crate::store::{object_key, Store};
use crate::sync::lock;
use crate::upload::Uploader;
use crate::upstream::Upstreams;

/// Copies running at once. Reads must not wait behind a crowd of background copies, and anyone
/// can start one with a GET.
const MAX_COPIES: usize = 4;

/// Paths offered while every copy runs, waiting for one to end (a client walking a closure,
/// and the prefetch ahead of it, offer its paths faster than four copies go). Offers beyond
/// are dropped: mirrored on a later miss.
const MAX_WAITING: usize = 1024;

/// Clones share their queue and copies.
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

struct Inner {
    uploader: Arc<Uploader>,
    /// Where the NAR is read from: the store, then the upstreams (the NAR is usually only at
    /// the upstream the narinfo came from).
    reads: Arc<dyn Store>,
    /// References a mirrored path has at an upstream count as present.
    upstreams: Arc<Upstreams>,
    copies: Arc<Semaphore>,
    /// Offered paths no copy has taken yet, in the order offered.
    waiting: Mutex<VecDeque<NarInfo>>,
}

impl Mirror {
    pub fn new(uploader: Arc<Uploader>, reads: Arc<dyn Store>, upstreams: Arc<Upstreams>) -> Self {
        Self {
            inner: Arc::new(Inner {
                uploader,
                reads,
                upstreams,
                copies: Arc::new(Semaphore::new(MAX_COPIES)),
                waiting: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// Copies the path `info` describes (a narinfo an upstream served, already checked against
    /// that upstream's keys) into the store, in the background, once one of [`MAX_COPIES`] is
    /// free; whether it was taken. Must be called within a Tokio runtime. A NAR named after its
    /// store path (attic, old nix-serve) cannot be: the store keeps NARs under a hash of its
    /// bytes.
    pub fn offer(&self, info: NarInfo) -> bool {
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
                if let Some(info) = lock(&this.waiting).pop_front() {
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

    /// A free copy and the next path waiting, if both are.
    fn take(&self) -> Option<(OwnedSemaphorePermit, NarInfo)> {
        let permit = self.copies.clone().try_acquire_owned().ok()?;
        let info = lock(&self.waiting).pop_front()?;
        Some((permit, info))
    }

    async fn copy(&self, info: NarInfo) {
        let path = info.store_path.clone();
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
        match self
            .uploader
            .copy_path(info, fetch_nar, Some(&self.upstreams))
            .await
        {
            Ok(_) => tracing::info!(path = %path, "mirrored from upstream"),
            Err(e) => {
                tracing::warn!(path = %path, cause = %e, "mirroring from upstream failed")
            }
        }
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
