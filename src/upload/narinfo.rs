//! Narinfo uploads: the checks of a narinfo against its NAR, its signatures and its
//! references, immutability of published paths, and [`Uploader::copy_path`] for paths that
//! come from elsewhere (mirroring, import). See the parent module for the rules.

use std::collections::HashSet;
use std::future::Future;

use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _};

use super::gc_guard::TakenBack;
use super::{rejected, Accepted, Uploader, VerifiedNar};
use crate::error::Error;
use crate::nix::content_address::{self, Claim};
use crate::nix::{NarFileName, NarInfo, StorePathBaseName, StorePathHash};
use crate::store::{object_key, StoreError};
use crate::upstream::Upstreams;

impl Uploader {
    /// Accepts the narinfo uploaded as `<hash>.narinfo` if every check passes, and writes it.
    /// References that `upstreams` serve count as present.
    pub async fn put_narinfo(
        &self,
        hash: StorePathHash,
        raw: &[u8],
        upstreams: Option<&Upstreams>,
    ) -> Result<Accepted, Error> {
        let info = NarInfo::parse_for(raw, &self.store_dir, hash)
            .map_err(|e| rejected(format!("bad narinfo: {e}")))?;
        self.accept_narinfo(info, upstreams).await
    }

    /// Copies a path into the store, verified exactly like an upload: its NAR, unless the
    /// store already has it (under its name or re-encoded), read from `fetch_nar` only then;
    /// then its narinfo, last, which is what makes the path visible. For paths that come from
    /// elsewhere: an upstream being mirrored, a directory being imported.
    pub async fn copy_path<F, Fut, S>(
        &self,
        info: NarInfo,
        fetch_nar: F,
        upstreams: Option<&Upstreams>,
    ) -> Result<Accepted, Error>
    where
        F: FnOnce(NarFileName) -> Fut,
        Fut: Future<Output = Result<S, Error>>,
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let name = info.nar_file().map_err(|e| rejected(e.to_string()))?;
        // A copy found bad (read back for a narinfo) is copied over, as an upload stores its
        // body over it.
        if self.nar_found_bad(&name) || !self.has_nar(&name).await? {
            // What the narinfo would be refused for whatever the store holds, before its NAR
            // is copied (a cache signed by a key not trusted would leave every NAR orphaned).
            self.check_alone(&info)?;
            let body = fetch_nar(name.clone()).await?;
            // Named as uploaded to a cellar that re-encoded it, its bytes are what its
            // `FileHash` says, not its name.
            self.put_nar_hashing_to(&name, body, info.file_hash).await?;
        }
        self.accept_narinfo(info, upstreams).await
    }

    /// The checks of a narinfo that need nothing from the store: references listed once, the
    /// compression its URL says, a trusted signature.
    fn check_alone(&self, info: &NarInfo) -> Result<(), Error> {
        let sd = &self.store_dir;
        // The fingerprint Nix verifies has each reference once; a list with duplicates would
        // be signed as sent and fail verification on every client.
        let mut seen = HashSet::new();
        if let Some(dup) = info.references.iter().find(|r| !seen.insert(*r)) {
            return Err(rejected(format!("reference {sd}/{dup} is listed twice")));
        }
        let url_name = info.nar_file().map_err(|e| rejected(e.to_string()))?;
        if let Some(ext) = url_name.compression_from_ext() {
            if ext != info.compression {
                return Err(rejected(format!(
                    "Compression: {} does not match the URL's extension ({})",
                    info.compression, url_name
                )));
            }
        }
        // A content-addressed path (`nix store add-path`, `builtins.toFile`, a `.drv`), which
        // a builder's `secret-key-files` never signs, passes on its `CA:`, as it does in Nix:
        // the contents are checked against it once the NAR is ([`Self::check_contents`]).
        if !self.trusted_keys.is_empty()
            && !info.is_signed_by_any(&self.trusted_keys, sd)
            && content_address::certified(info, sd).is_none()
        {
            return Err(rejected(
                "the narinfo is not signed by any of upload.trusted_keys",
            ));
        }
        Ok(())
    }

    /// A narinfo that [`Self::check_alone`] let through unsigned for its content address:
    /// its NAR (`v`, whose NarHash the narinfo's matches) must hold what that address claims.
    fn check_contents(&self, info: &NarInfo, v: &VerifiedNar) -> Result<(), Error> {
        let sd = &self.store_dir;
        if self.trusted_keys.is_empty() || info.is_signed_by_any(&self.trusted_keys, sd) {
            return Ok(());
        }
        let holds = match content_address::certified(info, sd) {
            Some(Claim::Recursive(h)) => h == v.nar.hash,
            Some(Claim::Flat(h) | Claim::Text(h)) => v.flat == Some(h),
            None => false,
        };
        if holds {
            return Ok(());
        }
        Err(rejected(format!(
            "the narinfo is not signed by any of upload.trusted_keys, and its NAR does not \
             hold what its CA: {} claims (or was checked by its digest record alone: sign \
             the path)",
            info.ca.as_deref().unwrap_or_default()
        )))
    }

    /// The narinfo the store holds for `hash`, parsed.
    pub async fn stored(&self, hash: StorePathHash) -> Result<Option<NarInfo>, Error> {
        crate::store::stored_narinfo(&*self.store, hash, &self.store_dir, None).await
    }

    /// The narinfo the store holds for `hash`, as an upload of the path sees it: one that
    /// cannot be served (not a narinfo of this path, or naming its NAR elsewhere than
    /// `nar/<file>`: the root answers it 502) is absent, so that the upload replaces it, as
    /// the upload address says ([`unservable`]). Said in the log.
    pub async fn stored_to_replace(&self, hash: StorePathHash) -> Result<Option<NarInfo>, Error> {
        let stored = self.stored(hash).await;
        match unservable(&stored) {
            Some(why) => {
                tracing::warn!(key = %object_key::narinfo(hash), cause = %why, "stored narinfo cannot be served: an upload of the path replaces it");
                Ok(None)
            }
            None => stored,
        }
    }

    /// The checks of a narinfo against its NAR, its signatures and its references; writes it
    /// if they pass.
    async fn accept_narinfo(
        &self,
        mut info: NarInfo,
        upstreams: Option<&Upstreams>,
    ) -> Result<Accepted, Error> {
        let sd = &self.store_dir;
        let hash = info.hash();
        let own = self.drop_own_signatures(&mut info);
        if own > 0 {
            tracing::debug!(path = %info.store_path, signatures = own, "the server's own signatures sent with a narinfo left out: it signs what it serves");
        }
        // One upload of a path at a time in this process: the second of two builders pushing
        // it at once finds the first one's narinfo, and adds its signatures to it or keeps
        // it (a non-reproducible build's other NarHash), instead of replacing it after the
        // first was answered (clients may have read it, and its NAR would be collected).
        let one_at_a_time = self.paths.get(&hash);
        let _held = match one_at_a_time.try_lock() {
            Ok(held) => held,
            Err(_) => {
                #[cfg(test)]
                self.path_contended.notify_one();
                one_at_a_time.lock().await
            }
        };
        // The store is asked in as few sequential round trips as the rules allow (Nix uploads
        // path after path on one connection, so each one is paid per path; see gc_guard for
        // why this order keeps a concurrent `cellar gc` from breaking the closure):
        // 1. the stored narinfo and, unless a recent record already names the path, its
        //    references and its NAR ([`AccessLog::covers`]), the access record, together;
        //    the stored narinfo is not read if the upload address found none moments ago
        //    ([`Uploader::known_absent`]);
        // 2. after the record: announced deletions, the references, and the NAR (a HEAD if
        //    this server received it, else its digest record and a HEAD if it is large and
        //    has one, else read back and digested), together; with a recent
        //    record already written, this is part of step 1, and the announcements are those
        //    read as soon as the NAR's own record was written (see `Announced`), usually
        //    before the narinfo arrives; references this process wrote recently, and the NAR
        //    it received under that recent record, count as present without a request
        //    (both are kept by the records; step 3 checks the NAR again);
        // 3. after the announcements: the narinfo written, and the NAR checked once more,
        //    together (the narinfo is taken back if the NAR has gone).
        // Answers are judged in a fixed order, so a refusal does not depend on timing.
        //
        // [`AccessLog::covers`]: crate::gc::access::AccessLog::covers
        let url_name = info.nar_file().map_err(|e| rejected(e.to_string()));
        // What refuses the narinfo whatever the store holds (a signature missing when
        // `upload.trusted_keys` is set, say): judged before the store is asked anything but
        // whether the path is already there (then it is answered as present, as below), so an
        // unsigned narinfo naming many references or a large NAR costs no lookups, read back
        // or upload record.
        let refused = self.check_alone(&info).err();
        // The NAR as uploaded, and as stored if uploads are re-encoded.
        let nar_files: Vec<NarFileName> = match &url_name {
            Ok(n) => std::iter::once(n.clone())
                .chain(self.reencoded(n).map(|(stored, _)| stored))
                .collect(),
            Err(_) => Vec::new(),
        };
        let nars: Vec<&str> = nar_files.iter().map(NarFileName::as_str).collect();
        // Recorded before the references are checked and the announcements read, so that a
        // garbage collection running meanwhile either sees the record in time or has deleted
        // what it names before the checks (see crate::gc::sweep). A path already present, or
        // refused below, is recorded too: that only keeps what it names a while longer.
        let covered = match &self.access {
            Some(a) => !nars.is_empty() && a.covers(&info, &nars),
            None => false,
        };
        // A NAR this server received and verified.
        let remembered = url_name
            .as_ref()
            .ok()
            .and_then(|n| self.remembered(&object_key::nar(n)));
        // The announcements read after the NAR's own record, which a covered narinfo may use.
        let announced = remembered
            .as_ref()
            .and_then(|v| v.announced.clone())
            .filter(|a| {
                covered
                    && self
                        .access
                        .as_ref()
                        .is_some_and(|l| l.still_covers(a.since))
            });
        // The NAR's own record covers this narinfo: the NAR was received and recorded here
        // moments ago, and no collector deletes it now without announcing it (refused below).
        let nar_recorded = announced.is_some();
        let (existing, recorded, (not_deleting, nar, references)) = {
            let record = async {
                match (&self.access, nars.is_empty() || covered) {
                    (Some(a), false) => a.record_upload(&info, &nars).await,
                    _ => Ok(()),
                }
            };
            let not_deleting = async {
                match &self.access {
                    Some(_) => self.not_being_deleted(&nars, announced).await,
                    None => Ok(()),
                }
            };
            // A NAR this server received and verified, if it is still there (someone may have
            // deleted it from the bucket since); else the stored one, by its digest record or
            // read back and digested.
            let nar = async {
                if let Some(v) = remembered {
                    if nar_recorded {
                        return Ok(Some(v));
                    }
                    if self
                        .store
                        .head(&object_key::nar(&v.stored))
                        .await?
                        .is_some()
                    {
                        return Ok(Some(v));
                    }
                }
                match &url_name {
                    Ok(n) => self.verify_stored(n, info.file_hash, info.file_size).await,
                    Err(_) => Ok(None),
                }
            };
            let checks = async {
                futures::join!(not_deleting, nar, self.check_references(&info, upstreams))
            };
            let stored = async {
                if self.known_absent(hash) {
                    Ok(None)
                } else {
                    self.stored_to_replace(hash).await
                }
            };
            if refused.is_some() {
                (stored.await, Ok(()), (Ok(()), Ok(None), Ok(())))
            } else if covered {
                // Both at once (the checks need no record of their own here); but they matter
                // only for a path not there yet: one found present is answered without
                // waiting for them (a NAR read back and digested can take minutes, and the
                // client waits for this answer with nothing moving).
                tokio::pin!(stored, checks);
                let mut checked = None;
                let existing = loop {
                    tokio::select! {
                        e = &mut stored => break e,
                        c = &mut checks, if checked.is_none() => checked = Some(c),
                    }
                };
                let checks = match (&existing, checked) {
                    (Ok(None), Some(c)) => c,
                    (Ok(None), None) => checks.await,
                    _ => (Ok(()), Ok(None), Ok(())),
                };
                (existing, Ok(()), checks)
            } else {
                let (existing, recorded) = futures::join!(stored, record);
                // Found before the record was durable, the path may have been collected
                // since, the collector's look at the records after that batch missing it: it
                // is looked at again (a collection deleting it from now on sees the record and
                // writes it back), else the client would be told it is there.
                let existing = match (existing, &recorded) {
                    (Ok(Some(_)), Ok(())) if self.access.is_some() && !nars.is_empty() => {
                        self.stored_to_replace(hash).await
                    }
                    (existing, _) => existing,
                };
                // The checks wait for the record, and are not needed when the path is
                // already there or the record failed: those are judged first below.
                match (&existing, &recorded) {
                    (Ok(None), Ok(())) => (existing, recorded, checks.await),
                    _ => (existing, recorded, (Ok(()), Ok(None), Ok(()))),
                }
            }
        };
        // Published paths are immutable. Checked first: a re-upload of a present path (a
        // client with a stale view) costs one read, not a NAR verification. Two uploads of
        // different contents through two replicas racing past this check both write; the
        // last one wins (S3 has no portable create-only write), which needs a
        // non-reproducible build pushed twice at the same moment, or one path pushed by two
        // builders at once with different compressions (the loser's NAR is then an orphan;
        // docs/uploads.md). Through one replica they take turns, above.
        if let Some(existing) = existing? {
            // Another build of the path (not reproducible) published first, by another
            // builder: the cache keeps it, and the upload succeeds as `nix copy` to a store
            // that has the path does (it skips it). A refusal would fail the builder's whole
            // copy, and every retry of it while its client remembers the path as missing.
            if existing.nar_hash != info.nar_hash {
                tracing::info!(
                    path = %info.store_path,
                    published = %existing.nar_hash,
                    uploaded = %info.nar_hash,
                    "a build of a path already published with another NarHash (not reproducible): the published one is kept"
                );
            }
            // Present only if whole: a narinfo left in place when its NAR could not be looked
            // at (see `write_while_nar_stays`) is found here by the client's retry.
            if let Ok(name) = existing.nar_file() {
                // Only an upload that could have replaced it may have it removed.
                // (A content-addressed one too: its contents are checked as it is uploaded.)
                let trusted = self.trusted_keys.is_empty()
                    || info.is_signed_by_any(&self.trusted_keys, sd)
                    || content_address::certified(&info, sd).is_some();
                let whole = self.has_nar(&name).await?;
                if !whole && !trusted {
                    // Not answered "present": the client would take the path for complete.
                    return Err(rejected(format!(
                        "the cache's narinfo of this path names a NAR it lacks (nar/{name}); \
                         only an upload signed by one of upload.trusted_keys may replace it"
                    )));
                }
                if !whole {
                    let what = match self.take_back(&info, &name).await {
                        TakenBack::Deleted => "was removed",
                        TakenBack::Replaced => "was replaced meanwhile",
                    };
                    return Err(rejected(format!(
                        "the cache's narinfo of this path named a NAR it lacks (nar/{name}) and \
                         {what}; upload the path again"
                    )));
                }
            }
            // A listing sent with it describes the client's NAR, not necessarily the stored
            // one (a non-reproducible path pushed twice): the path keeps what it has.
            if self.listings.take(hash).is_some() {
                tracing::debug!(path = %hash, "listing dropped: the path was published already");
            }
            // So do its debug info links, unless they name the very NAR the path has (as
            // stored): sent again with it (its NAR was missing, or two builders pushed the
            // path at once), they are the path's.
            if let Some(sent) = info.url.strip_prefix("nar/") {
                match existing.nar_file() {
                    // As sent, or re-encoded (`nar_files`).
                    Ok(has) if nar_files.contains(&has) => {
                        self.publish_debuginfo(sent, &has).await;
                    }
                    _ => self.drop_debuginfo(sent),
                }
            }
            // Only by an upload that could have written the path, and whose record (naming
            // the path and its references) is durable, or that a recent record covers: see
            // `add_signatures`.
            let narinfo = match (&refused, recorded) {
                (None, Ok(())) => self.add_signatures(existing, &info).await?,
                // Signatures to add, but no record keeps the path while they are written:
                // the client is told (and retries), not answered as if they were stored.
                (None, Err(e))
                    if with_added_signatures(&existing, &info, sd, &self.trusted_keys)
                        .merged
                        .is_some() =>
                {
                    return Err(e.into());
                }
                // Answered as present (the client skips the path), but said: a signature it
                // sent (`nix store sign`) is not added, for the reason a new upload would be
                // refused.
                (Some(why), _) => {
                    tracing::info!(path = %existing.store_path, cause = %why, "a narinfo sent for a published path added nothing: it would be refused as an upload");
                    existing
                }
                _ => existing,
            };
            return Ok(Accepted {
                hash,
                narinfo,
                already_present: true,
            });
        }
        url_name?;
        if let Some(e) = refused {
            return Err(e);
        }
        recorded?;
        not_deleting?;
        let v = nar?.ok_or_else(|| rejected(format!("NAR {} has not been uploaded", info.url)))?;
        if let Some(up) = v.uploaded_file {
            if let Some(h) = info.file_hash {
                if h != up.hash {
                    return Err(rejected(format!(
                        "FileHash {h} does not match the uploaded NAR ({})",
                        up.hash
                    )));
                }
            }
            if let Some(s) = info.file_size {
                if s != up.size {
                    return Err(rejected(format!(
                        "FileSize {s} does not match the uploaded NAR ({} bytes)",
                        up.size
                    )));
                }
            }
        }
        if info.nar_hash != v.nar.hash {
            return Err(rejected(format!(
                "NarHash {} does not match the NAR ({})",
                info.nar_hash, v.nar.hash
            )));
        }
        if info.nar_size != v.nar.size {
            return Err(rejected(format!(
                "NarSize {} does not match the NAR ({} bytes)",
                info.nar_size, v.nar.size
            )));
        }
        self.check_contents(&info, &v)?;
        references?;

        // Point the narinfo at what is stored (the signature does not cover these fields).
        let sent = std::mem::replace(&mut info.url, format!("nar/{}", v.stored));
        info.compression = v.stored_compression;
        info.file_hash = Some(v.stored_file.hash);
        info.file_size = Some(v.stored_file.size);
        let key = object_key::narinfo(hash);
        let began = tokio::time::Instant::now();
        let write = self.store.put_bytes(&key, Bytes::from(info.render(sd)));
        match &self.access {
            Some(_) => self.write_while_nar_stays(write, &info, &v.stored).await?,
            None => write.await?,
        }
        self.wrote(&info.store_path, began);
        // Its listing, held since it came (before the narinfo, as Nix sends it), is written
        // now that the path is: never one for a path that is not, nor over another's.
        if let Some(listing) = self.listings.take(hash) {
            if let Err(e) = self
                .store
                .put_bytes(&object_key::listing(hash), listing)
                .await
            {
                tracing::warn!(path = %info.store_path, cause = %e, "the path's listing could not be written; it has none");
            }
        }
        // So are the debug info links that name its NAR, naming it as stored.
        if let Some(sent) = sent.strip_prefix("nar/") {
            self.publish_debuginfo(sent, &v.stored).await;
        }
        Ok(Accepted {
            hash,
            narinfo: info,
            already_present: false,
        })
    }

    /// `published` with the signatures `sent` adds to it ([`with_added_signatures`]), written.
    /// The path is read again first, now that this upload's record (naming the path and its
    /// references) is durable, or a recent one covers it: a collector deleting it from here on
    /// sees the record and keeps it whole (or writes it back), and one that deleted it before
    /// is seen here, so the write never brings back a path whose references may be going.
    async fn add_signatures(&self, published: NarInfo, sent: &NarInfo) -> Result<NarInfo, Error> {
        let sd = &self.store_dir;
        let first = with_added_signatures(&published, sent, sd, &self.trusted_keys);
        if first.merged.is_none() {
            // Nothing to add: said all the same when signatures sent were left out, as the
            // client is told 200 (`nix store sign` prints that it added them).
            left_out_said(&published, &first);
            return Ok(published);
        }
        let Some(now) = self.stored(published.hash()).await? else {
            return Err(rejected(String::from(
                "the path was deleted meanwhile (a garbage collection); run the copy again",
            )));
        };
        let added = with_added_signatures(&now, sent, sd, &self.trusted_keys);
        left_out_said(&now, &added);
        match added.merged {
            Some(merged) => {
                self.write_signatures(&merged).await?;
                Ok(merged)
            }
            None => Ok(now),
        }
    }

    /// Writes `merged`, a published narinfo with signatures added, over the stored one: as a
    /// new narinfo is written, checking once more that its NAR stays.
    async fn write_signatures(&self, merged: &NarInfo) -> Result<(), Error> {
        let hash = merged.hash();
        let began = tokio::time::Instant::now();
        let key = object_key::narinfo(hash);
        let write = self
            .store
            .put_bytes(&key, Bytes::from(merged.render(&self.store_dir)));
        match (&self.access, merged.nar_file()) {
            (Some(_), Ok(nar)) => self.write_while_nar_stays(write, merged, &nar).await?,
            _ => write.await?,
        }
        self.wrote(&merged.store_path, began);
        tracing::info!(path = %merged.store_path, signatures = merged.sigs.len(), "signatures added to a published path");
        Ok(())
    }

    /// Whether the path `path` is in the cache (`None`), or why not: its narinfo in the store,
    /// else (with `upstreams`) served by an upstream, which clients substituting through this
    /// server get it from. Upstreams are asked only for paths the store lacks: a `nix copy
    /// --to` uploads references first, so its uploads never reach an upstream. A narinfo for
    /// the hash of `path` naming another path, or one that cannot be read (clients get a 502
    /// for it), is not `path` in the cache.
    pub(super) async fn in_cache(
        &self,
        path: &StorePathBaseName,
        upstreams: Option<&Upstreams>,
    ) -> Result<Option<Absent>, StoreError> {
        if self.recently_written(path) {
            return Ok(None);
        }
        let h = path.hash();
        let unreadable = |why: String| {
            tracing::warn!(key = %object_key::narinfo(h), cause = %why, "stored narinfo unreadable (clients get 502 for it): its path is taken for absent");
            Ok(Some(Absent::Unreadable(why)))
        };
        let raw = match crate::store::narinfo_bytes(&*self.store, h, None).await {
            Ok(raw) => raw,
            Err(e @ (StoreError::Encoded { .. } | StoreError::TooLarge { .. })) => {
                return unreadable(e.to_string())
            }
            Err(e) => return Err(e),
        };
        if let Some(raw) = raw {
            return match NarInfo::parse_for(&raw, &self.store_dir, h) {
                Ok(stored) if stored.store_path == *path => Ok(None),
                Ok(stored) => Ok(Some(Absent::Other(stored.store_path))),
                Err(why) => unreadable(why.to_string()),
            };
        }
        let served = match upstreams {
            Some(u) if !u.is_empty() => u.has(path).await?,
            _ => false,
        };
        Ok((!served).then_some(Absent::Missing))
    }

    /// Refuses `info` unless each of its references is in the cache: written by this
    /// process recently ([`Uploader::recently_written`]: no request), else found in the
    /// store, else (with `upstreams`) served by an upstream ([`Uploader::in_cache`]). Its
    /// reference to itself is the only one not looked up, and only by its whole name.
    pub(super) async fn check_references(
        &self,
        info: &NarInfo,
        upstreams: Option<&Upstreams>,
    ) -> Result<(), Error> {
        let refs: Vec<StorePathBaseName> = info
            .references
            .iter()
            .filter(|r| **r != info.store_path && !self.recently_written(r))
            .cloned()
            .collect();
        let lookups = refs.into_iter().map(|r| async move {
            Ok::<_, StoreError>(self.in_cache(&r, upstreams).await?.map(|why| (r, why)))
        });
        // In order: the refusal names the first reference missing, whatever answers first.
        let found: Vec<Option<(StorePathBaseName, Absent)>> = futures::stream::iter(lookups)
            .buffered(16)
            .try_collect()
            .await?;
        let missing: Vec<(StorePathBaseName, Absent)> = found.into_iter().flatten().collect();
        if let Some((first, why)) = missing.first() {
            let sd = &self.store_dir;
            let why = why.said(sd);
            return Err(rejected(format!(
                "reference {sd}/{first} is not in the cache{why}{}; upload references first",
                if missing.len() > 1 {
                    format!(" (nor {} other)", missing.len() - 1)
                } else {
                    String::new()
                }
            )));
        }
        Ok(())
    }
}

/// Why a path is not in the cache ([`Uploader::in_cache`]).
#[derive(Debug)]
pub(super) enum Absent {
    /// No narinfo for its hash, in the store or upstream.
    Missing,
    /// The store's narinfo of its hash names this other path.
    Other(StorePathBaseName),
    /// The store's narinfo of its hash cannot be read, for this reason.
    Unreadable(String),
}

impl Absent {
    /// Why, to follow "… is not in the cache" (nothing when it is simply missing).
    pub(super) fn said(&self, store_dir: &str) -> String {
        match self {
            Absent::Missing => String::new(),
            Absent::Other(other) => {
                format!(" (the store's narinfo of its hash is {store_dir}/{other}'s)")
            }
            Absent::Unreadable(e) => format!(" (its narinfo in the store cannot be read: {e})"),
        }
    }
}

/// A narinfo holds at most this many signatures: Nix's own carry one to three.
pub(super) const MAX_SIGNATURES: usize = 16;

/// Why a stored narinfo, as read, cannot be served: it is no narinfo of its path, or its NAR
/// is elsewhere than `nar/<file>` (the root answers both with a logged 502). `None` for one
/// that can, for none, and for a failed read.
pub(crate) fn unservable(stored: &Result<Option<NarInfo>, Error>) -> Option<String> {
    match stored {
        Err(Error::BadObject { reason, .. }) => Some(reason.to_string()),
        Ok(Some(info)) => info.nar_file().err().map(|e| e.to_string()),
        _ => None,
    }
}

/// Logs the signatures sent for `published` that `added` left out: not by one of
/// `upload.trusted_keys`, or beyond [`MAX_SIGNATURES`].
fn left_out_said(published: &NarInfo, added: &Added) {
    if added.untrusted > 0 {
        tracing::info!(path = %published.store_path, untrusted = added.untrusted, "signatures sent for a published path left out: not by one of upload.trusted_keys");
    }
    if added.left_out > 0 {
        tracing::warn!(path = %published.store_path, left_out = added.left_out, "signatures sent for a published path left out: it holds {MAX_SIGNATURES} already");
    }
}

/// `published` with the signatures `sent` adds to it (`nix store sign --store URL` sends the
/// narinfo back with them; a builder re-uploading a path may sign it with its own key), if
/// `sent` describes the same contents (its fingerprint, which signatures cover, is the same)
/// and carries a signature `published` lacks; `None` if it adds nothing. With `trusted_keys`,
/// only signatures that verify with one of them are added; without, any (a signature over
/// contents already published vouches for nothing new: clients check the ones they trust,
/// and one that does not verify is passed over, not in the way of a valid one under the same
/// key name). Beyond [`MAX_SIGNATURES`] the rest is left out, and logged: a re-upload is never
/// refused for it.
fn with_added_signatures(
    published: &NarInfo,
    sent: &NarInfo,
    store_dir: &str,
    trusted_keys: &[crate::nix::PublicKey],
) -> Added {
    let fingerprint = published.fingerprint(store_dir);
    if fingerprint != sent.fingerprint(store_dir) {
        return Added::default();
    }
    let mut merged = published.clone();
    let mut left_out = 0;
    let mut untrusted = 0;
    for sig in &sent.sigs {
        if merged.sigs.contains(sig) {
            continue;
        }
        if !trusted_keys.is_empty()
            && !trusted_keys
                .iter()
                .any(|k| k.verifies(fingerprint.as_bytes(), sig))
        {
            untrusted += 1;
            continue;
        }
        if merged.sigs.len() >= MAX_SIGNATURES {
            left_out += 1;
            continue;
        }
        merged.sigs.push(sig.clone());
    }
    Added {
        merged: (merged.sigs.len() > published.sigs.len()).then_some(merged),
        untrusted,
        left_out,
    }
}

/// What [`with_added_signatures`] found.
#[derive(Default)]
struct Added {
    /// The narinfo with the signatures added, if any was.
    merged: Option<NarInfo>,
    /// Signatures left out: not by one of `upload.trusted_keys`.
    untrusted: usize,
    /// Signatures left out: past [`MAX_SIGNATURES`].
    left_out: usize,
}
