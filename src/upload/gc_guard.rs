//! What keeps uploads and a concurrent `cellar gc` from breaking a closure between them (see
//! [`crate::gc::sweep`]): before its checks an upload writes a record of what it relies on
//! ([`crate::gc::access::AccessLog::record_upload`]), and after writing its narinfo it checks
//! once more that its NAR and references are still there.

use super::{rejected, Uploader};
use crate::error::Error;
use crate::nix::{NarFileName, NarInfo};
use crate::store::object_key;
use crate::upstream::Upstreams;

impl Uploader {
    /// Checks again, after the narinfo was written, that its NAR and references are still
    /// there; if a garbage collection removed one meanwhile, takes the narinfo back and
    /// refuses the upload (the client uploads again what is missing on its next run).
    pub(super) async fn still_whole(
        &self,
        info: &NarInfo,
        nar: &NarFileName,
        upstreams: Option<&Upstreams>,
    ) -> Result<(), Error> {
        let check = async {
            if self.store.head(&object_key::nar(nar)).await?.is_none() {
                return Err(rejected(format!(
                    "NAR {} is not in the cache; upload it again",
                    info.url
                )));
            }
            self.check_references(info, upstreams).await
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
