//! Debug info links (`debuginfo/<build id>`, see [`crate::nix::debuginfo`]): checked to be a
//! link to a NAR of the cache layout, then stored. Nix writes a link before the NAR it names,
//! so the NAR is not looked for; a link whose NAR never comes is collected by `cellar gc`
//! after the retention, as a log whose paths are gone is.

use bytes::Bytes;

use super::{rejected, Uploader};
use crate::error::Error;
use crate::nix::{DebugInfoLink, DebugInfoName};
use crate::store::object_key;

impl Uploader {
    /// Stores the link `raw` as `debuginfo/<name>`, replacing one stored there: two paths may
    /// hold the same debug file, and either NAR serves it. With `upload.compression` the link
    /// names the NAR as the store will hold it (re-encoded, unless the store holds it as sent
    /// already), so that it leads to a file cellar serves.
    pub async fn put_debuginfo(&self, name: &DebugInfoName, raw: Bytes) -> Result<(), Error> {
        let link = DebugInfoLink::parse(&raw)
            .map_err(|e| rejected(format!("not a debug info link: {e}")))?;
        let _slot = self.admit_other().await?;
        // A NAR the store holds under the name sent (stored before re-encoding was set up) is
        // not uploaded again, and its narinfo keeps naming it: so does its link.
        let body = match self.reencoded(link.nar()) {
            Some((stored, _))
                if self
                    .store
                    .head(&object_key::nar(link.nar()))
                    .await?
                    .is_none() =>
            {
                Bytes::from(link.with_nar(stored).render())
            }
            _ => raw,
        };
        self.store
            .put_bytes(&object_key::debuginfo(name), body)
            .await?;
        Ok(())
    }
}
