//! Uploads: what `nix copy --to http://cellar` sends, verified before anything becomes visible.
//!
//! Nix uploads each path as `HEAD nar/<file>` → `PUT nar/<file>` → `PUT <hash>.narinfo`, in
//! dependency order. The rules that keep the cache closure-complete:
//!
//! - a NAR is streamed through [`digest`] (hash as sent, decompress, hash the NAR) into a store
//!   writer and committed only if it decompresses to a NAR whose file hash matches its name;
//! - a narinfo is accepted only if its NAR is present and its FileHash/FileSize and
//!   NarHash/NarSize match what the NAR really is, and every reference is already in the cache;
//!   only then is it written (one atomic PUT), which is what makes the path visible.
//!
//! The digest of each NAR uploaded through this process is remembered, so the narinfo that
//! follows is checked without reading the NAR back; a NAR uploaded elsewhere (another replica,
//! an earlier run) is read back and digested once.
//!
//! Paths that come from elsewhere (an upstream being mirrored, a directory being imported) go
//! through the same checks, by [`Uploader::copy_path`].
//!
//! Published paths are immutable: a narinfo for a path the store already has is accepted only
//! with the same NarHash (and then changes nothing); another NarHash is a conflict (409).
//! Removing a path is for garbage collection and `verify --repair`, never for an upload.
//!
//! Bounds, so that no upload holds resources without end: [`digest::Limits`] (NAR size as
//! sent and decompressed, xz decoder memory), [`Uploader::admit`] (NAR uploads at once, the
//! rest refused with 503 before their body is read) and [`digest::with_idle_timeout`] (a body
//! that stops sending).
//!
//! Errors: what is wrong with the upload is [`UploadError`] (a 400 for HTTP clients); the
//! store failing on the way is [`Error::Store`], as for any request.

pub mod digest;
mod gc_guard;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Recompression, UploadConfig};
use crate::error::{Error, UploadError};
use crate::nix::{Compression, NarFileName, NarInfo, PublicKey, StorePathHash};
use crate::store::{object_key, Store, StoreError};
use crate::sync::lock;
use crate::upstream::Upstreams;

pub use digest::{FileDigest, Limits, NarDigest};

/// Build logs larger than this are refused (HTTP uploads and `cellar import`).
pub const MAX_LOG_BYTES: u64 = 1 << 30;

/// A bound on one listing (`<hash>.ls`), uploaded or imported.
pub const MAX_LISTING_BYTES: u64 = 256 << 20;

/// What a client refused for `upload.max_concurrent` is told to wait. Nix 2.8 retries 5xx
/// with its own back-off (0.3 s doubling) and ignores it; other clients may not.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

fn rejected(msg: impl Into<String>) -> Error {
    Error::Upload(UploadError::Rejected(msg.into()))
}

/// What the store holds for a NAR name a client used.
#[derive(Debug, Clone)]
struct VerifiedNar {
    /// The name it is stored under (differs from the uploaded name after recompression).
    stored: NarFileName,
    stored_compression: Compression,
    stored_file: FileDigest,
    /// The file as the client sent it, when this process saw the upload.
    uploaded_file: Option<FileDigest>,
    nar: FileDigest,
}

/// Remembered NAR digests are capped so a long-running server does not grow without bound.
const MAX_REMEMBERED: usize = 100_000;

pub struct Uploader {
    store: Arc<dyn Store>,
    store_dir: String,
    recompress: Option<Recompression>,
    trusted_keys: Vec<PublicKey>,
    limits: Limits,
    /// One permit per NAR upload in progress (`upload.max_concurrent`).
    slots: Arc<Semaphore>,
    // A std Mutex: held for map operations only, never across an await.
    verified: Mutex<HashMap<String, VerifiedNar>>,
    /// Where accepted narinfos are recorded before they are written (garbage collection).
    access: Option<Arc<crate::gc::access::AccessLog>>,
}

/// The result of a narinfo upload.
#[derive(Debug)]
pub struct Accepted {
    pub hash: StorePathHash,
    /// The narinfo as stored (rewritten after recompression).
    pub narinfo: NarInfo,
    /// The store already had this path with the same NarHash: nothing was written.
    pub already_present: bool,
}

impl Uploader {
    pub fn new(cfg: &UploadConfig, store_dir: &str, store: Arc<dyn Store>) -> Self {
        Self {
            store,
            store_dir: store_dir.to_owned(),
            recompress: cfg.recompress,
            trusted_keys: cfg.trusted_keys.clone(),
            limits: Limits::from_config(cfg),
            slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
            verified: Mutex::new(HashMap::new()),
            access: None,
        }
    }

    /// Records every accepted narinfo, with its references, in `access` before checking the
    /// references and writing it: a collector running meanwhile then keeps them.
    pub fn with_access(mut self, access: Arc<crate::gc::access::AccessLog>) -> Self {
        self.access = Some(access);
        self
    }

    /// The largest NAR accepted (`upload.max_nar_bytes`).
    pub fn max_nar_bytes(&self) -> u64 {
        self.limits.max_nar_bytes
    }

    /// A slot for one NAR upload, held until it is dropped; `Busy` (503) when
    /// `upload.max_concurrent` are in progress. Taken before the body is read, so a refused
    /// client has sent nothing (it is never told `100 Continue`) and its retry is whole.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.slots.clone().try_acquire_owned().map_err(|_| {
            Error::Upload(UploadError::Busy {
                retry_after_secs: BUSY_RETRY_AFTER_SECS,
            })
        })
    }

    fn remember(&self, uploaded_key: String, v: VerifiedNar) {
        let mut m = lock(&self.verified);
        if m.len() >= MAX_REMEMBERED {
            m.clear();
        }
        m.insert(uploaded_key, v);
    }

    fn remembered(&self, uploaded_key: &str) -> Option<VerifiedNar> {
        lock(&self.verified).get(uploaded_key).cloned()
    }

    /// Where a NAR uploaded as `name` is stored when uploads are re-encoded to another
    /// compression: that name and compression. `None` if it is stored as sent.
    fn reencoded(&self, name: &NarFileName) -> Option<(NarFileName, Compression)> {
        let incoming = name.compression_from_ext().unwrap_or(Compression::None);
        match self.recompress {
            Some(Recompression {
                compression: target,
                ..
            }) if target != incoming => Some((name.with_compression(target), target)),
            _ => None,
        }
    }

    /// The size of the re-encoded copy a NAR uploaded as `name` was stored as, if any. Lets
    /// `HEAD nar/<file>` find it under the name the client uploaded, so a client that probes
    /// before uploading does not upload it again.
    pub async fn reencoded_size(&self, name: &NarFileName) -> Result<Option<u64>, StoreError> {
        match self.reencoded(name) {
            Some((stored, _)) => self.store.head(&object_key::nar(&stored)).await,
            None => Ok(None),
        }
    }

    /// Whether the store holds the NAR a client would find under `name`: the object itself,
    /// or the re-encoded copy it was stored as.
    async fn has_nar(&self, name: &NarFileName) -> Result<bool, StoreError> {
        if self.store.head(&object_key::nar(name)).await?.is_some() {
            return Ok(true);
        }
        Ok(self.reencoded_size(name).await?.is_some())
    }

    /// Streams a NAR into the store, verified.
    pub async fn put_nar<S>(&self, name: &NarFileName, body: S) -> Result<NarDigest, Error>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let incoming = name.compression_from_ext().unwrap_or(Compression::None);
        digest::check_decodable(incoming)?;
        let name_hash = name.file_hash();
        if name_hash.len() != 52 {
            // The name must be the file's sha256, which is what makes re-uploads idempotent
            // and an object under it impossible to swap for other bytes.
            return Err(rejected(
                "a NAR's name must be the nix-base32 sha256 of the file (52 characters)",
            ));
        }
        let (stored, target) = match self.reencoded(name) {
            Some((stored, target)) => (stored, Some(target)),
            None => (name.clone(), None),
        };
        let recompress = target.map(|t| (t, self.recompress.and_then(|r| r.level)));
        let mut w = self.store.writer(&object_key::nar(&stored)).await?;
        let d = match digest::digest_into(body, incoming, recompress, Some(&mut w), self.limits)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                w.abort().await;
                return Err(e);
            }
        };
        if d.input.hash.to_nix32() != name_hash {
            w.abort().await;
            return Err(rejected(format!(
                "the body's sha256 is {}, but its name says {name_hash}",
                d.input.hash.to_nix32()
            )));
        }
        w.commit().await?;
        self.remember(
            object_key::nar(name),
            VerifiedNar {
                stored,
                stored_compression: target.unwrap_or(incoming),
                stored_file: d.output,
                uploaded_file: Some(d.input),
                nar: d.nar,
            },
        );
        Ok(d)
    }

    /// Finds and digests a NAR this process did not see being uploaded.
    async fn verify_stored(&self, name: &NarFileName) -> Result<Option<VerifiedNar>, Error> {
        let mut candidates = vec![name.clone()];
        if let Some((stored, _)) = self.reencoded(name) {
            candidates.push(stored);
        }
        for cand in candidates {
            let Some(obj) = self.store.get(&object_key::nar(&cand), None).await? else {
                continue;
            };
            let c = cand.compression_from_ext().unwrap_or(Compression::None);
            // The body is the store's: a broken one is the store failing, not a client.
            let d = digest::digest_into(obj.body, c, None, None, self.limits)
                .await
                .map_err(|e| match e {
                    Error::Upload(UploadError::Body(b)) => Error::Store(StoreError::Other(
                        format!("reading {} back: {b}", object_key::nar(&cand)),
                    )),
                    other => other,
                })?;
            let v = VerifiedNar {
                stored: cand,
                stored_compression: c,
                stored_file: d.input,
                uploaded_file: None,
                nar: d.nar,
            };
            self.remember(object_key::nar(name), v.clone());
            return Ok(Some(v));
        }
        Ok(None)
    }

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
        if !self.has_nar(&name).await? {
            let body = fetch_nar(name.clone()).await?;
            self.put_nar(&name, body).await?;
        }
        self.accept_narinfo(info, upstreams).await
    }

    /// The narinfo the store holds for `hash`, parsed.
    pub async fn stored(&self, hash: StorePathHash) -> Result<Option<NarInfo>, Error> {
        crate::store::stored_narinfo(&*self.store, hash, &self.store_dir, None).await
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
        // Published paths are immutable. Checked first: a re-upload of a present path (a
        // client with a stale view) costs one read, not a NAR verification. Two uploads of
        // different contents racing past this check both write; the last one wins (S3 has no
        // portable create-only write), which needs a non-reproducible build pushed twice at
        // the same moment.
        if let Some(existing) = self.stored(hash).await? {
            if existing.nar_hash != info.nar_hash {
                return Err(Error::Upload(UploadError::Conflict {
                    store_path: format!("{sd}/{}", info.store_path),
                    stored: existing.nar_hash.to_string(),
                    uploaded: info.nar_hash.to_string(),
                }));
            }
            return Ok(Accepted {
                hash,
                narinfo: existing,
                already_present: true,
            });
        }
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
        if !self.trusted_keys.is_empty() && !info.is_signed_by_any(&self.trusted_keys, sd) {
            return Err(rejected(
                "the narinfo is not signed by any of upload.trusted_keys",
            ));
        }
        // Recorded before the NAR and the references are checked, so that a garbage
        // collection running meanwhile either sees the record in time or has deleted them
        // before the checks (see crate::gc::sweep).
        if let Some(a) = &self.access {
            let stored = self.reencoded(&url_name).map(|(n, _)| n);
            let mut nars = vec![url_name.as_str()];
            nars.extend(stored.as_ref().map(NarFileName::as_str));
            a.record_upload(&info, &nars).await?;
            self.not_being_deleted(&nars).await?;
        }
        let v = match self.remembered(&object_key::nar(&url_name)) {
            // Still there? (Someone may have deleted it from the bucket since.)
            Some(v)
                if self
                    .store
                    .head(&object_key::nar(&v.stored))
                    .await?
                    .is_some() =>
            {
                v
            }
            _ => self
                .verify_stored(&url_name)
                .await?
                .ok_or_else(|| rejected(format!("NAR {} has not been uploaded", info.url)))?,
        };
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
        self.check_references(&info, upstreams).await?;

        // Point the narinfo at what is stored (the signature does not cover these fields).
        info.url = format!("nar/{}", v.stored);
        info.compression = v.stored_compression;
        info.file_hash = Some(v.stored_file.hash);
        info.file_size = Some(v.stored_file.size);
        self.store
            .put_bytes(&object_key::narinfo(hash), Bytes::from(info.render(sd)))
            .await?;
        if self.access.is_some() {
            self.still_whole(&info, &v.stored, upstreams).await?;
        }
        Ok(Accepted {
            hash,
            narinfo: info,
            already_present: false,
        })
    }

    async fn check_references(
        &self,
        info: &NarInfo,
        upstreams: Option<&Upstreams>,
    ) -> Result<(), Error> {
        let own = info.hash();
        let refs: Vec<(StorePathHash, String)> = info
            .references
            .iter()
            .filter(|r| r.hash() != own)
            .map(|r| (r.hash(), r.to_string()))
            .collect();
        let store = &self.store;
        let lookups = refs.into_iter().map(|(h, name)| {
            async move {
                if store.head(&object_key::narinfo(h)).await?.is_some() {
                    return Ok::<_, StoreError>(None);
                }
                // Clients substituting through this server get it from an upstream. Asked
                // only for references the store lacks: a `nix copy --to` uploads references
                // first, so its uploads never reach an upstream.
                let upstream = match upstreams {
                    Some(u) if !u.is_empty() => u.has(h).await?,
                    _ => false,
                };
                Ok(if upstream { None } else { Some(name) })
            }
        });
        let found: Vec<Option<String>> = futures::stream::iter(lookups)
            .buffer_unordered(16)
            .try_collect()
            .await?;
        let missing: Vec<String> = found.into_iter().flatten().collect();
        if let Some(first) = missing.first() {
            return Err(rejected(format!(
                "reference {}/{first} is not in the cache{}; upload references first",
                self.store_dir,
                if missing.len() > 1 {
                    format!(" (nor {} other)", missing.len() - 1)
                } else {
                    String::new()
                }
            )));
        }
        Ok(())
    }

    /// Stores a listing, log or realisation as sent, streamed.
    pub async fn put_plain<S>(&self, key: &str, body: S, limit: u64) -> Result<(), Error>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send,
    {
        let mut w = self.store.writer(key).await?;
        let mut body = std::pin::pin!(body);
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    w.abort().await;
                    return Err(digest::body_error(e).into());
                }
            };
            n += chunk.len() as u64;
            if n > limit {
                w.abort().await;
                return Err(UploadError::TooLarge { limit }.into());
            }
            if let Err(e) = w.write(chunk).await {
                w.abort().await;
                return Err(e.into());
            }
        }
        w.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
