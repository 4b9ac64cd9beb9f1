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

pub mod digest;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use thiserror::Error;

use crate::config::{Recompression, UploadConfig};
use crate::nix::{Compression, NarFileName, NarInfo, PublicKey, StorePathHash};
use crate::store::{keys, Store, StoreError};

pub use digest::{FileDigest, NarDigest};

#[derive(Debug, Clone, Error)]
pub enum UploadError {
    /// The upload is wrong; the message names the failed check.
    #[error("{0}")]
    Rejected(String),
    /// The request body ended early or broke.
    #[error("upload body: {0}")]
    Body(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal upload error: {0}")]
    Internal(String),
}

fn rejected(msg: impl Into<String>) -> UploadError {
    UploadError::Rejected(msg.into())
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
    /// References available from an upstream count as present.
    upstreams: Option<Arc<crate::upstream::Upstreams>>,
    // A std Mutex: held for map operations only, never across an await.
    verified: Mutex<HashMap<String, VerifiedNar>>,
    /// Where accepted narinfos are recorded before they are written (garbage collection).
    access: Option<Arc<crate::gc::access::AccessLog>>,
}

/// The result of a narinfo upload.
pub struct Accepted {
    pub hash: StorePathHash,
    /// The narinfo as stored (rewritten after recompression).
    pub narinfo: NarInfo,
}

impl Uploader {
    pub fn new(
        cfg: &UploadConfig,
        store_dir: &str,
        store: Arc<dyn Store>,
        upstreams: Option<Arc<crate::upstream::Upstreams>>,
    ) -> Self {
        Self {
            store,
            upstreams,
            store_dir: store_dir.to_owned(),
            recompress: cfg.recompress,
            trusted_keys: cfg.trusted_keys.clone(),
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

    fn remember(&self, uploaded_key: String, v: VerifiedNar) {
        let mut m = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_REMEMBERED {
            m.clear();
        }
        m.insert(uploaded_key, v);
    }

    fn remembered(&self, uploaded_key: &str) -> Option<VerifiedNar> {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(uploaded_key)
            .cloned()
    }

    /// The name a NAR uploaded as `name` is stored under.
    fn stored_name(
        &self,
        name: &NarFileName,
    ) -> Result<(NarFileName, Option<Compression>), UploadError> {
        let incoming = name.compression_from_ext().unwrap_or(Compression::None);
        match self.recompress {
            Some(Recompression {
                compression: target,
                ..
            }) if target != incoming => {
                let hash = name.as_str().split('.').next().unwrap_or_default();
                let stored = NarFileName::new(hash, target)
                    .map_err(|e| UploadError::Internal(e.to_string()))?;
                Ok((stored, Some(target)))
            }
            _ => Ok((name.clone(), None)),
        }
    }

    /// The size of the NAR a client would find under `name`: the object itself, or the
    /// re-encoded copy it was stored as. Answers `HEAD nar/<file>` so repeated uploads are
    /// skipped.
    pub async fn nar_size(&self, name: &NarFileName) -> Result<Option<u64>, StoreError> {
        if let Some(size) = self.store.head(&keys::nar(name)).await? {
            return Ok(Some(size));
        }
        let Ok((stored, Some(_))) = self.stored_name(name) else {
            return Ok(None);
        };
        self.store.head(&keys::nar(&stored)).await
    }

    /// Streams a NAR into the store, verified.
    pub async fn put_nar<S>(&self, name: &NarFileName, body: S) -> Result<NarDigest, UploadError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let incoming = name.compression_from_ext().unwrap_or(Compression::None);
        if !digest::can_decode(incoming) {
            return Err(rejected(format!(
                "NARs compressed with {incoming} cannot be verified; upload with xz, zstd, bzip2 or none"
            )));
        }
        let name_hash = name.as_str().split('.').next().unwrap_or_default();
        if name_hash.len() != 52 {
            // The name must be the file's sha256, which is what makes re-uploads idempotent
            // and an object under it impossible to swap for other bytes.
            return Err(rejected(
                "a NAR's name must be the nix-base32 sha256 of the file (52 characters)",
            ));
        }
        let (stored, target) = self.stored_name(name)?;
        let recompress = target.map(|t| (t, self.recompress.and_then(|r| r.level)));
        let mut w = self.store.writer(&keys::nar(&stored)).await?;
        let d = match digest::digest(body, incoming, recompress, Some(&mut w)).await {
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
            keys::nar(name),
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
    async fn verify_stored(&self, name: &NarFileName) -> Result<Option<VerifiedNar>, UploadError> {
        let mut candidates = vec![name.clone()];
        if let (stored, Some(_)) = self.stored_name(name)? {
            candidates.push(stored);
        }
        for cand in candidates {
            let Some(obj) = self.store.get(&keys::nar(&cand), None).await? else {
                continue;
            };
            let c = cand.compression_from_ext().unwrap_or(Compression::None);
            let d = digest::digest(obj.body, c, None, None)
                .await
                .map_err(|e| match e {
                    UploadError::Body(b) => UploadError::Store(StoreError::Other(b)),
                    other => other,
                })?;
            let v = VerifiedNar {
                stored: cand,
                stored_compression: c,
                stored_file: d.input,
                uploaded_file: None,
                nar: d.nar,
            };
            self.remember(keys::nar(name), v.clone());
            return Ok(Some(v));
        }
        Ok(None)
    }

    /// Accepts a narinfo for `hash` if every check passes, and writes it.
    pub async fn put_narinfo(
        &self,
        hash: StorePathHash,
        text: &str,
    ) -> Result<Accepted, UploadError> {
        let sd = &self.store_dir;
        let mut info = NarInfo::parse(text, sd)
            .map_err(|e| rejected(format!("narinfo does not parse: {e}")))?;
        if info.hash() != hash {
            return Err(rejected(format!(
                "StorePath {sd}/{} does not match the name {hash}.narinfo",
                info.store_path
            )));
        }
        let url_name: NarFileName = info
            .url
            .strip_prefix("nar/")
            .ok_or_else(|| rejected(format!("URL {:?} must be nar/<file>", info.url)))?
            .parse()
            .map_err(|e| rejected(format!("URL {:?}: {e}", info.url)))?;
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
            let stored = self.stored_name(&url_name)?.0;
            a.record_upload(&info, &[url_name.as_str(), stored.as_str()])
                .await?;
        }
        let v = match self.remembered(&keys::nar(&url_name)) {
            // Still there? (Someone may have deleted it from the bucket since.)
            Some(v) if self.store.head(&keys::nar(&v.stored)).await?.is_some() => v,
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
        self.check_references(&info).await?;

        // Point the narinfo at what is stored (the signature does not cover these fields).
        info.url = format!("nar/{}", v.stored);
        info.compression = v.stored_compression;
        info.file_hash = Some(v.stored_file.hash);
        info.file_size = Some(v.stored_file.size);
        self.store
            .put_bytes(&keys::narinfo(hash), Bytes::from(info.render(sd)))
            .await?;
        if self.access.is_some() {
            self.still_whole(&info, &v.stored).await?;
        }
        Ok(Accepted {
            hash,
            narinfo: info,
        })
    }

    /// Checks again, after the narinfo was written, that its NAR and references are still
    /// there; if a garbage collection removed one meanwhile, takes the narinfo back and
    /// refuses the upload (the client uploads again what is missing on its next run).
    async fn still_whole(&self, info: &NarInfo, nar: &NarFileName) -> Result<(), UploadError> {
        let check = async {
            if self.store.head(&keys::nar(nar)).await?.is_none() {
                return Err(rejected(format!(
                    "NAR {} is not in the cache; upload it again",
                    info.url
                )));
            }
            self.check_references(info).await
        };
        match check.await {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Err(d) = self.store.delete(&keys::narinfo(info.hash())).await {
                    tracing::error!(path = %info.store_path, cause = %d, "could not take back a narinfo whose closure a garbage collection broke");
                }
                Err(e)
            }
        }
    }

    async fn check_references(&self, info: &NarInfo) -> Result<(), UploadError> {
        let own = info.hash();
        let refs: Vec<(StorePathHash, String)> = info
            .references
            .iter()
            .filter(|r| r.hash() != own)
            .map(|r| (r.hash(), r.to_string()))
            .collect();
        let store = self.store.clone();
        let upstreams = self.upstreams.clone();
        let lookups = refs.into_iter().map(move |(h, name)| {
            let store = store.clone();
            let upstreams = upstreams.clone();
            async move {
                if store.head(&keys::narinfo(h)).await?.is_some() {
                    return Ok::<_, StoreError>(None);
                }
                // Clients substituting through this server get it from an upstream.
                let upstream = match &upstreams {
                    Some(u) => u.has(h).await?,
                    None => false,
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
    pub async fn put_plain<S>(&self, key: &str, body: S, limit: u64) -> Result<(), UploadError>
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
                    return Err(UploadError::Body(e.to_string()));
                }
            };
            n += chunk.len() as u64;
            if n > limit {
                w.abort().await;
                return Err(rejected(format!("larger than {limit} bytes")));
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
