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
    /// that upstream's keys) into the store, in the background. Must be called within a Tokio
    /// runtime.
    pub fn offer(&self, info: NarInfo) {
        let Ok(permit) = self.copies.clone().try_acquire_owned() else {
            tracing::debug!(path = %info.store_path, "mirroring busy, skipped");
            return;
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
    }
}
