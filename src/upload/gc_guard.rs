//! What keeps uploads and a concurrent `cellar gc` from breaking a closure between them (see
//! [`crate::gc::sweep`]): before its checks an upload writes a record of what it relies on
//! ([`crate::gc::access::AccessLog::record_upload`]), then refuses a NAR that a collector has
//! announced it is deleting ([`crate::gc::deleting`]), and writes its narinfo while checking
//! once more that its NAR is still there.

use super::{rejected, Announced, Uploader};
use crate::error::Error;
use crate::nix::{NarFileName, NarInfo};
use crate::store::{object_key, StoreError};

/// What [`Uploader::take_back`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum TakenBack {
    /// The narinfo was deleted, or was gone already (a failed delete is logged).
    Deleted,
    /// The narinfo was left: another upload replaced it meanwhile, or the NAR is back.
    Replaced,
}

impl Uploader {
    /// Takes back the narinfo of `info`'s path, found naming `nar`, which the
    /// store lacks: deletes it, unless by now it names another NAR or that NAR is back (another
    /// upload of the path, through another replica, wrote a whole narinfo meanwhile). S3 has no
    /// delete conditional on the object's contents, so this only narrows the race with such a
    /// write to the moments between the last look and the delete. A look that fails deletes
    /// (a narinfo naming a NAR that is gone must not be served).
    pub(super) async fn take_back(&self, info: &NarInfo, nar: &NarFileName) -> TakenBack {
        let (hash, path) = (info.hash(), &info.store_path);
        // Another upload of the same path may have written it moments ago: no referrer is
        // taken on the word of that write any more.
        self.unwrote(hash);
        let replaced = match self.stored(hash).await {
            // Gone already: another upload took it back.
            Ok(None) => return TakenBack::Deleted,
            Ok(Some(now)) => match now.nar_file() {
                Ok(named) if named != *nar => true,
                Ok(_) => matches!(self.store.head(&object_key::nar(nar)).await, Ok(Some(_))),
                Err(_) => false,
            },
            Err(_) => false,
        };
        if replaced {
            tracing::info!(path = %path, nar = %nar, "narinfo not taken back: another upload replaced it, or its NAR is back");
            return TakenBack::Replaced;
        }
        if let Err(d) = self.store.delete(&object_key::narinfo(hash)).await {
            tracing::error!(path = %path, cause = %d, "could not take back a narinfo whose NAR is missing");
        }
        // And again once the delete is done: a write of the path that began while it was
        // under way (the NAR uploaded again meanwhile) may be what it deleted.
        self.unwrote(hash);
        TakenBack::Deleted
    }

    /// Refuses the upload if a collector announced that it is deleting one of `nars` (the
    /// name uploaded, and the name stored if recompressed). Called after the access record
    /// is written; `read` are the announcements as read after an earlier record that names
    /// `nars` too (the NAR's own, see [`Announced`]), which serve as well as a read now.
    pub(super) async fn not_being_deleted(
        &self,
        nars: &[&str],
        read: Option<Announced>,
    ) -> Result<(), Error> {
        let read = match read {
            Some(a) if a.covers(nars) => a.read.await,
            _ => None,
        };
        let deleting = match read {
            Some(set) => set,
            None => {
                self.announcements
                    .after(tokio::time::Instant::now())
                    .await?
            }
        };
        if !nars.iter().any(|f| deleting.contains(*f)) {
            return Ok(());
        }
        // That read may be a moment old, and the collection over since: a refusal is
        // confirmed by a read made now (rare, so it may cost the round trip).
        let deleting = self.announcements.read_now().await?;
        match nars.iter().find(|f| deleting.contains(**f)) {
            Some(f) => Err(rejected(format!(
                "NAR nar/{f} is being deleted by a garbage collection; upload it again once \
                 that collection is past it (an announcement under _cellar/deleting/ names it: \
                 one a collection that was killed left counts for 15 minutes after its last \
                 renewal)"
            ))),
            None => Ok(()),
        }
    }

    /// Writes the narinfo (`write`) while checking once more that its NAR is there; if it
    /// has gone, takes the narinfo back and refuses the upload (the client uploads the NAR
    /// again on its next run). If the store cannot say, the narinfo stays and the upload
    /// gets the store's error. Called after the announcements were read: a collector that
    /// announced the NAR before this upload's record, and so may not have seen the record,
    /// has either withdrawn its announcement after deleting the NAR (then this check sees
    /// it gone) or is still announcing it (then the upload was refused before the write).
    /// References need no second check: the collector writes back a narinfo it deleted
    /// that a record names (see [`crate::gc::sweep`]).
    pub(super) async fn write_while_nar_stays(
        &self,
        write: impl std::future::Future<Output = Result<(), StoreError>>,
        info: &NarInfo,
        nar: &NarFileName,
    ) -> Result<(), Error> {
        let key = object_key::nar(nar);
        let (written, mut nar_size) = futures::join!(write, self.store.head(&key));
        // A failed look is asked again: only a NAR seen absent takes the narinfo back.
        for wait in HEAD_RETRIES {
            if nar_size.is_ok() {
                break;
            }
            tokio::time::sleep(wait).await;
            nar_size = self.store.head(&key).await;
        }
        if let Err(e) = written {
            // The write may have been applied all the same (its answer lost: a timeout, a
            // reset connection): seen naming a NAR the store lacks, the narinfo is taken
            // back as below. The upload's error is answered either way.
            if let Ok(None) = nar_size {
                self.take_back(info, nar).await;
            }
            return Err(e.into());
        }
        match nar_size {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(rejected(match self.take_back(info, nar).await {
                TakenBack::Deleted => {
                    format!("NAR {} is not in the cache; upload it again", info.url)
                }
                TakenBack::Replaced => format!(
                    "NAR {} was not in the cache, but another upload of the path may have \
                     stored it since; run the copy again",
                    info.url
                ),
            })),
            Err(e) => {
                // Not known to be gone, the narinfo stays: another upload of the same path,
                // through another replica, may have written it too and been acknowledged,
                // and a path referring to it accepted there on the word of that write.
                // (A NAR a collection deleted in this moment is found by `cellar verify`.)
                tracing::warn!(path = %info.store_path, cause = %e, "narinfo written, but its NAR could not be looked at again; the upload is answered with an error");
                Err(e.into())
            }
        }
    }
}

/// The waits before the NAR's presence is asked again after a failed look, in
/// [`Uploader::write_while_nar_stays`]: a passing store error (a timeout, a 503) should not
/// take a narinfo back.
pub(super) const HEAD_RETRIES: [std::time::Duration; 3] = [
    std::time::Duration::from_millis(100),
    std::time::Duration::from_millis(300),
    std::time::Duration::from_secs(1),
];
