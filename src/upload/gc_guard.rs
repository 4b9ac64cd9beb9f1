//! What keeps uploads and a concurrent `cellar gc` from breaking a closure between them (see
//! [`crate::gc::sweep`]): before its checks an upload writes a record of what it relies on
//! ([`crate::gc::access::AccessLog::record_upload`]), then refuses a NAR that a collector has
//! announced it is deleting ([`crate::gc::deleting`]), and after writing its narinfo it checks
//! once more that its NAR and references are still there.

use super::{rejected, Uploader};
use crate::error::Error;
use crate::nix::{NarFileName, NarInfo};
use crate::store::object_key;
use crate::upstream::Upstreams;

impl Uploader {
    /// Refuses the upload if a collector announced that it is deleting one of `nars` (the
    /// name uploaded, and the name stored if recompressed). Called after the access record
    /// is written.
    pub(super) async fn not_being_deleted(&self, nars: &[&str]) -> Result<(), Error> {
        let deleting =
            crate::gc::deleting::announced(self.store.as_ref(), std::time::SystemTime::now())
                .await?;
        match nars.iter().find(|f| deleting.contains(**f)) {
            Some(f) => Err(rejected(format!(
                "NAR nar/{f} is being deleted by a garbage collection; upload it again"
            ))),
            None => Ok(()),
        }
    }

    /// Checks again, after the narinfo was written, that its NAR and references are still
    /// there; if a garbage collection removed one meanwhile, takes the narinfo back and
    /// refuses the upload (the client uploads again what is missing on its next run).
    pub(super) async fn still_whole(
        &self,
        info: &NarInfo,
        nar: &NarFileName,
        upstreams: Option<&Upstreams>,
    ) -> Result<(), Error> {
        // Both at once; the NAR's answer is judged first.
        let check = async {
            let key = object_key::nar(nar);
            let (nar_size, references) = futures::join!(
                self.store.head(&key),
                self.check_references(info, upstreams)
            );
            if nar_size?.is_none() {
                return Err(rejected(format!(
                    "NAR {} is not in the cache; upload it again",
                    info.url
                )));
            }
            references
        };
        match check.await {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Err(d) = self.store.delete(&object_key::narinfo(info.hash())).await {
                    tracing::error!(path = %info.store_path, cause = %d, "could not take back a narinfo whose closure a garbage collection broke");
                }
                Err(e)
            }
        }
    }
}
