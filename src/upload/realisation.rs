//! Realisations of content-addressed derivations' outputs, checked before they are stored:
//! the path one names must be in the cache (Nix uploads it first), and one already published
//! is kept. A second upload naming the same path adds the signatures it brings; one naming
//! another path (a build that is not reproducible, pushed by a second builder) changes
//! nothing, so that clients that substituted the first output keep agreeing with the cache,
//! and is answered 200 (Nix sends a builder's realisations on every copy: a refusal would
//! fail each one). Unless the cache no longer has the path the stored one names: that one is
//! replaced. With `upload.trusted_keys`, what would be written must be signed by one of them,
//! and a realisation's `id` must be the one its name says.

use bytes::Bytes;

use super::{rejected, Uploader};
use crate::error::Error;
use crate::nix::{Realisation, RealisationName};
use crate::upstream::Upstreams;

/// What a realisation upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealisationStored {
    /// Written: new, or the stored one with signatures added.
    Written,
    /// The stored one names the same path and has every signature sent: nothing written.
    Unchanged,
}

/// A stored realisation is read up to this size (an upload is limited to it too).
pub const MAX_REALISATION_BYTES: u64 = 1 << 20;

impl Uploader {
    /// Stores the realisation `raw` under `key` (`realisations/…` or `build-trace/…`).
    pub async fn put_realisation(
        &self,
        key: &str,
        raw: Bytes,
        upstreams: Option<&Upstreams>,
    ) -> Result<RealisationStored, Error> {
        let sent =
            Realisation::parse(&raw).map_err(|e| rejected(format!("not a realisation: {e}")))?;
        // Its signatures as a narinfo's are kept: those that are signatures, not the server's
        // own (made afresh as it serves it), and with `upload.trusted_keys` only theirs (a
        // client trusting a key finds none under its name that does not verify).
        let own = super::lock(&self.own_key_names).clone();
        let (sent, raw) = match sent.with_signatures_checked(&self.trusted_keys, &own) {
            Some(checked) => {
                tracing::info!(key, "signatures sent with a realisation left out: not signatures, the server's own, or not by one of upload.trusted_keys");
                let json = checked.to_json().map_err(|e| {
                    super::UploadError::Internal(format!("writing a realisation: {e}"))
                })?;
                (checked, Bytes::from(json))
            }
            None => (sent, raw),
        };
        // Nix looks a realisation up by its id and does not compare the one inside: stored
        // under another output's name, a signed realisation would send that output's
        // clients to its path.
        let named: Option<RealisationName> = key
            .strip_prefix("realisations/")
            .and_then(|k| k.parse().ok());
        if let (Some(named), Some(id)) = (&named, sent.id()) {
            if !named.names(id) {
                return Err(rejected(format!(
                    "its id {id} is not the one its name says ({})",
                    named.as_str().trim_end_matches(".doi")
                )));
            }
        }
        // The form Nix 2.8 writes (with `id`) names its output by its base name: Nix 2.8
        // cannot read a whole path there ("illegal base-32 character '/'"), and would fail
        // every client substituting through it.
        if sent.id().is_some() && sent.out_path_as_written().contains('/') {
            return Err(rejected(format!(
                "its outPath {:?} is a whole path; Nix writes the path's base name there",
                sent.out_path_as_written()
            )));
        }
        // One at a time per output in this process, so two uploads of one output cannot both
        // find it absent (replicas may still race; the first written then is replaced).
        // Taken before an upload slot: realisations waiting for their turn hold none, so they
        // cannot keep other builders' listings and logs waiting. Waited for as a slot is, at
        // most `ADMIT_WAIT`: a queue of realisations behind one waiting for a slot must not
        // stall each client for the whole queue.
        let turn = self.realisations.get(&key.to_owned());
        let _one = tokio::time::timeout(super::ADMIT_WAIT, turn.lock())
            .await
            .map_err(|_| super::busy())?;
        let _slot = self.admit_other().await?;
        let stored = self.store.get_bytes(key, MAX_REALISATION_BYTES).await?;
        let stored = stored.and_then(|s| match Realisation::parse(&s) {
            // Another output's under this one's name (served as a 502: Nix does not compare
            // ids) agrees with nobody either.
            Ok(r) if r
                .id()
                .zip(named.as_ref())
                .is_some_and(|(id, named)| !named.names(id)) =>
            {
                tracing::warn!(key, id = r.id().unwrap_or_default(), "stored realisation is another output's: replaced by the upload");
                None
            }
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(key, cause = %e, "stored realisation unreadable: replaced by the upload");
                None
            }
        });
        // One naming a path the cache no longer has (expired, deleted by hand, no longer
        // served upstream) agrees with nobody: clients asking for it find nothing. The upload
        // replaces it, as a narinfo whose NAR is gone is replaced.
        let stored = match stored {
            Some(s)
                if s.out_path() != sent.out_path()
                    && self.in_cache(s.out_path(), upstreams).await?.is_some() =>
            {
                tracing::info!(
                    key,
                    stored = %s.out_path(),
                    "stored realisation names a path the cache lacks: replaced by the upload"
                );
                None
            }
            other => other,
        };
        let write = match &stored {
            // Another build of the output (not reproducible) published first: kept, so that
            // clients that substituted it keep agreeing with the cache. The upload succeeds,
            // as a narinfo of a path already published does: Nix sends a builder's
            // realisations on every copy, and a refusal would fail each one.
            Some(s) if s.out_path() != sent.out_path() => {
                tracing::info!(
                    key,
                    published = %format!("{}/{}", self.store_dir, s.out_path()),
                    uploaded = %format!("{}/{}", self.store_dir, sent.out_path()),
                    "a realisation of an output already published with another path (not reproducible): the published one is kept"
                );
                return Ok(RealisationStored::Unchanged);
            }
            Some(s) => match s.with_signatures_of(&sent) {
                Some(merged) => {
                    self.check_signed(&sent)?;
                    Bytes::from(merged)
                }
                None => return Ok(RealisationStored::Unchanged),
            },
            None => {
                self.check_signed(&sent)?;
                raw
            }
        };
        if let Some(why) = self.in_cache(sent.out_path(), upstreams).await? {
            return Err(rejected(format!(
                "its output {}/{} is not in the cache{}; upload the path first",
                self.store_dir,
                sent.out_path(),
                why.said(&self.store_dir)
            )));
        }
        self.store.put_bytes(key, write).await?;
        Ok(RealisationStored::Written)
    }

    /// As for narinfos: with trusted keys set, a write token alone writes no realisation (a
    /// new one, or signatures added to a stored one). Nix 2.8 substitutes through a
    /// realisation without checking its signatures (the e2e tests do), so this is what keeps
    /// a token without a signing key from pointing an output at another path of the cache.
    /// One already stored, sent again, is answered as before: nothing is written.
    fn check_signed(&self, sent: &Realisation) -> Result<(), Error> {
        if self.trusted_keys.is_empty() || sent.is_signed_by_any(&self.trusted_keys) {
            return Ok(());
        }
        Err(rejected(if sent.fingerprint().is_some() {
            "the realisation is not signed by any of upload.trusted_keys".to_owned()
        } else {
            "the realisation is in a form whose signatures cellar cannot check, and \
             upload.trusted_keys is set"
                .to_owned()
        }))
    }
}
