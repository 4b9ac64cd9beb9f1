//! Mirroring: a path served from an upstream marked `mirror = true` is copied into the store in
//! the background (NAR, then narinfo, verified like an upload, by
//! [`Uploader::copy_path`]), so the next request for it is served from the store and keeps
//! working when the upstream is gone.
//!
//! The narinfo lookup only offers the path ([`Mirror::offer`]); it never waits for the copy,
//! and a copy that fails is logged and forgotten: the path is offered again on a later miss.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::error::{Error, UploadError};
use crate::nix::NarInfo;
use crate::store::{object_key, Store};
use crate::upload::Uploader;
use crate::upstream::Upstreams;

/// Copies running at once. Reads must not wait behind a crowd of background copies, and anyone
/// can start one with a GET; offers beyond this are dropped.
const MAX_COPIES: usize = 4;

pub struct Mirror {
    uploader: Arc<Uploader>,
    /// Where the NAR is read from: the store, then the upstreams (the NAR is usually only at
    /// the upstream the narinfo came from).
    reads: Arc<dyn Store>,
    /// References a mirrored path has at an upstream count as present.
    upstreams: Arc<Upstreams>,
    copies: Arc<Semaphore>,
}

impl Mirror {
    pub fn new(uploader: Arc<Uploader>, reads: Arc<dyn Store>, upstreams: Arc<Upstreams>) -> Self {
        Self {
            uploader,
            reads,
            upstreams,
            copies: Arc::new(Semaphore::new(MAX_COPIES)),
        }
    }

    /// Copies the path `info` describes (a narinfo an upstream served, already checked against
    /// that upstream's keys) into the store, in the background; whether a copy started. Must be
    /// called within a Tokio runtime. A NAR named after its store path (attic, old nix-serve)
    /// cannot be: the store keeps NARs under a hash of their bytes.
    pub fn offer(&self, info: NarInfo) -> bool {
        if !info.nar_file().is_ok_and(|f| f.names_its_bytes()) {
            tracing::debug!(path = %info.store_path, url = %info.url, "not mirrored: its NAR is not named after its bytes");
            return false;
        }
        let Ok(permit) = self.copies.clone().try_acquire_owned() else {
            tracing::debug!(path = %info.store_path, "mirroring busy, skipped");
            return false;
        };
        let uploader = self.uploader.clone();
        let reads = self.reads.clone();
        let upstreams = self.upstreams.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let path = info.store_path.clone();
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
            match uploader.copy_path(info, fetch_nar, Some(&upstreams)).await {
                Ok(_) => tracing::info!(path = %path, "mirrored from upstream"),
                Err(e) => {
                    tracing::warn!(path = %path, cause = %e, "mirroring from upstream failed")
                }
            }
        });
        true
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
