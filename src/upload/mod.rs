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
//! an earlier run) is checked by the digest record stored beside it if it is large
//! ([`nar_records`]), else read back and digested once.
//!
//! Paths that come from elsewhere (an upstream being mirrored, a directory being imported) go
//! through the same checks, by [`Uploader::copy_path`].
//!
//! Published paths are immutable: a narinfo for a path the store already has changes nothing.
//! With the same NarHash it is a re-upload; with another (a build that is not reproducible,
//! pushed by a second builder) the published one is kept and the upload answered 200 all the
//! same, as `nix copy` to a store that has the path skips it: a refusal would fail the
//! builder's whole copy.
//! Removing a path is for garbage collection and `verify --repair`, never for an upload.
//!
//! Bounds, so that no upload holds resources without end: [`digest::Limits`] (NAR size as
//! sent and decompressed, xz decoder memory), [`Uploader::admit`] (NAR uploads at once, the
//! rest refused with 503 before their body is read) and [`digest::with_idle_timeout`] (a body
//! that stops sending).
//!
//! Errors: what is wrong with the upload is [`UploadError`] (a 400 for HTTP clients); the
//! store failing on the way is [`Error::Store`], as for any request.

mod announcements;
mod debuginfo;
pub mod digest;
pub mod encoding;
mod gc_guard;
mod listings;
pub mod nar_records;
mod narinfo;
mod realisation;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt as _, Shared};
use futures::{Stream, StreamExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Recompression, UploadConfig};
use crate::error::{Error, UploadError};
use crate::nix::{Compression, NarFileName, NarInfo, PublicKey, StorePathBaseName, StorePathHash};
use crate::store::{object_key, Store, StoreError};
use crate::sync::lock;

pub use digest::{FileDigest, Limits, NarDigest};
pub(crate) use narinfo::unservable;
pub use realisation::{RealisationStored, MAX_REALISATION_BYTES};

/// Refuses a NAR name no upload may use: the name must be the file's sha256 (52 characters),
/// which is what makes re-uploads idempotent and an object under it impossible to swap for
/// other bytes, and its compression one cellar decodes (else its NarHash cannot be checked).
/// Checked before anything else, also before a NAR the store holds already is taken as sent.
pub fn check_nar_name(name: &NarFileName) -> Result<(), UploadError> {
    digest::check_decodable(name.compression_from_ext().unwrap_or(Compression::None))?;
    if name.file_hash().len() != 52 {
        return Err(UploadError::Rejected(
            "a NAR's name must be the nix-base32 sha256 of the file (52 characters)".into(),
        ));
    }
    Ok(())
}

/// Build logs larger than this are refused (HTTP uploads and `cellar import`).
pub const MAX_LOG_BYTES: u64 = 1 << 30;

/// A bound on one listing (`<hash>.ls`), uploaded or imported.
pub const MAX_LISTING_BYTES: u64 = 256 << 20;

/// What became of an uploaded listing ([`Uploader::put_listing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingFate {
    /// Held until its narinfo is accepted, then written.
    Held,
    /// Read and dropped: larger than the listings held at most, no room among those being
    /// received, or another listing of its path held at once (neither is kept).
    Dropped,
}

/// What a client refused for `upload.max_concurrent` is told to wait. Nix 2.8 retries 5xx
/// with its own back-off (0.3 s doubling) and ignores it; other clients may not.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// The answer to an upload that waited [`ADMIT_WAIT`] for its turn in vain.
fn busy() -> Error {
    Error::Upload(UploadError::Busy {
        retry_after_secs: BUSY_RETRY_AFTER_SECS,
    })
}

/// A slot of one of the pools of `upload.max_concurrent` ([`Uploader::admit`],
/// [`Uploader::admit_other`], [`Uploader::readback_slot`]), held until dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        crate::metrics::get().uploads_running.inc();
        Self { _permit: permit }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        crate::metrics::get().uploads_running.dec();
    }
}

/// How long an upload waits for one of the `upload.max_concurrent` slots before it is refused
/// (503). Waiting rather than refusing at once: a client behind a proxy (nginx answers
/// `Expect: 100-continue` itself and sends or spools the body) has sent its body by then, and
/// Nix 2.8 retries a PUT without it, then stalls for 300 s. Under nginx's default
/// `proxy_read_timeout` (60 s), so that the refusal, not the proxy's 504, reaches the client.
pub const ADMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(50);

/// The bytes of whole request bodies (narinfos, realisations, debug info links) held in
/// memory at once: each is read whole before it is checked, up to its limit (a narinfo's is
/// 16 MiB, and as much again decoded), and they take no upload slot (a builder's narinfo
/// follows its NAR at once and must not wait behind other builders' NARs). Without a bound,
/// a write token's holder opening many connections could have the server hold gigabytes.
/// A narinfo is a few KiB: thousands fit.
pub const WHOLE_BODIES_BYTES: u64 = 64 << 20;

/// NARs up to this size are stored again when sent, without asking whether the store holds
/// them ([`Uploader::already_stored`]): receiving and writing 1 MiB costs about what one store
/// round trip does, and a client sends a NAR the store already holds only after an upload of
/// it broke off before its narinfo, or when two paths share one.
pub const STORED_AGAIN_MAX: u64 = 1 << 20;

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
    /// The contents' hash of a NAR of one regular file (see [`NarDigest::flat`]), if it was
    /// read here (not from a digest record).
    flat: Option<crate::nix::Sha256>,
    /// The collectors' announcements, read once this NAR's upload record was written.
    announced: Option<Announced>,
}

/// The collectors' announcements ([`crate::gc::deleting::announced`]) read in the background
/// as soon as a NAR's upload record is written, while the client sends the narinfo that
/// follows: that narinfo may use them instead of reading them itself after its record, since
/// this read, too, began after a record naming the NAR (see gc_guard). Only what concerns
/// `names` (the NAR's names, as uploaded and as stored) is kept: `None` once it is done if the
/// read failed (the narinfo then reads them itself), else those of `names` announced.
///
/// It stands for a read after the record only while that record covers uploads by itself
/// (`since`, no later than the record's start): a narinfo covered by a newer record (the NAR's
/// record too old, another upload's record naming it since) reads the announcements afresh, as
/// a collector may no longer read the old record.
#[derive(Clone)]
struct Announced {
    since: crate::gc::access::Stamp,
    names: Arc<[String]>,
    read: Shared<BoxFuture<'static, Option<Arc<HashSet<String>>>>>,
}

impl std::fmt::Debug for Announced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Announced")
    }
}

impl Announced {
    /// The announcements about `names`, for a record started at `since` and complete now:
    /// from a read that qualifies for it, or read now ([`announcements::Announcements::after`]).
    fn start(
        announcements: Arc<announcements::Announcements>,
        since: crate::gc::access::Stamp,
        names: Vec<String>,
    ) -> Self {
        let names: Arc<[String]> = names.into();
        let wanted = names.clone();
        let recorded = tokio::time::Instant::now();
        let read = async move {
            match announcements.after(recorded).await {
                Ok(all) => {
                    let set: HashSet<String> = wanted
                        .iter()
                        .filter(|f| all.contains(f.as_str()))
                        .cloned()
                        .collect();
                    Some(Arc::new(set))
                }
                Err(e) => {
                    tracing::debug!(cause = %e, "reading the collectors' announcements failed");
                    None
                }
            }
        }
        .boxed()
        .shared();
        crate::store::spawn_serving(read.clone());
        Self { since, names, read }
    }

    /// Whether this read can answer for `nars`: it looked for each of them.
    fn covers(&self, nars: &[&str]) -> bool {
        nars.iter().all(|n| self.names.iter().any(|m| m == n))
    }
}

/// Remembered NAR digests are capped so a long-running server does not grow without bound.
const MAX_REMEMBERED: usize = 100_000;

/// NARs received or checked here are remembered this long at least (a retried upload, a path
/// with the same NAR, and the narinfo that follows its NAR within seconds do not send or read
/// it again), as far as [`MAX_VERIFIED`] allows.
const REMEMBERED_FOR: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// At most this many NARs received or checked are remembered (about 1 KB each).
const MAX_VERIFIED: usize = 20_000;

/// Who stored a NAR object an upload committed ([`SameName`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoredBy {
    This,
    /// Another upload of the same name, which landed while this one was under way.
    Another,
}

/// The writer of a NAR stored as sent, whose name is the sha256 of its bytes. A store may
/// drop this upload when another upload of the same name completes first (Garage ends every
/// other multipart upload of a key then: two builders pushing one closure at once meet it),
/// or fail its commit after the other landed: if the object stands, the rest of this body is
/// still read and checked against its name, not written, and the upload succeeds. The object
/// is then not the bytes this upload checked ([`StoredBy::Another`]).
struct SameName {
    inner: Option<Box<dyn crate::store::ObjectWriter>>,
    store: Arc<dyn Store>,
    key: String,
    /// The size of the object found standing, once it was.
    standing: Arc<Mutex<Option<u64>>>,
}

impl SameName {
    /// After `e`: whether the object stands (then `Ok`, and nothing more is written).
    async fn stands(&mut self, e: StoreError) -> Result<(), StoreError> {
        let Ok(Some(size)) = self.store.head(&self.key).await else {
            return Err(e);
        };
        tracing::info!(key = %self.key, cause = %e, "NAR stored meanwhile by another upload of the same name: the rest of this one is checked, not written");
        *lock(&self.standing) = Some(size);
        if let Some(w) = self.inner.take() {
            w.abort().await;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::store::ObjectWriter for SameName {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let Some(w) = self.inner.as_mut() else {
            return Ok(());
        };
        match w.write(chunk).await {
            Ok(()) => Ok(()),
            Err(e) => self.stands(e).await,
        }
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let Some(w) = self.inner.take() else {
            return Ok(());
        };
        match w.commit().await {
            Ok(()) => Ok(()),
            Err(e) => self.stands(e).await,
        }
    }

    async fn abort(mut self: Box<Self>) {
        if let Some(w) = self.inner.take() {
            w.abort().await;
        }
    }
}

/// Notes `k` at `at` in `m`, a map of moments that matter for `keep` after them. A full map
/// first lets go of what no longer matters: clearing it whole would forget the moments still
/// relied on (a take-back that a write under way must see), which only a map still full of
/// fresh ones (more than [`MAX_REMEMBERED`] within `keep`) does as a last resort.
fn note_at<K: std::hash::Hash + Eq, V: Noted>(
    m: &mut HashMap<K, V>,
    k: K,
    v: V,
    keep: std::time::Duration,
) {
    note_within(m, k, v, keep, MAX_REMEMBERED);
}

/// [`note_at`], in a map of at most `most` entries. The memory of what was let go is given
/// back (a map is as large as it ever was until then).
fn note_within<K: std::hash::Hash + Eq, V: Noted>(
    m: &mut HashMap<K, V>,
    k: K,
    v: V,
    keep: std::time::Duration,
    most: usize,
) {
    if m.len() >= most {
        m.retain(|_, t| t.at().elapsed() < keep);
        if m.len() >= most {
            m.clear();
        }
        crate::sync::give_back_room(m);
    }
    m.insert(k, v);
}

/// Forgets the entries of `m` older than `keep`, and the table's room they leave unused.
fn let_go<K: std::hash::Hash + Eq, V: Noted>(m: &mut HashMap<K, V>, keep: std::time::Duration) {
    m.retain(|_, v| v.at().elapsed() < keep);
    crate::sync::give_back_room(m);
}

/// What [`note_at`] keeps: a moment, and maybe what happened then.
trait Noted {
    fn at(&self) -> tokio::time::Instant;
}

impl Noted for tokio::time::Instant {
    fn at(&self) -> tokio::time::Instant {
        *self
    }
}

impl<V> Noted for (tokio::time::Instant, V) {
    fn at(&self) -> tokio::time::Instant {
        self.0
    }
}

/// A narinfo this process wrote: when, and the path it was for (a reference names a path, not
/// only its hash).
struct Written {
    /// When, by this process's clock and the store's (an upload record is judged by the
    /// store's time).
    at: crate::gc::access::Stamp,
    path: StorePathBaseName,
}

impl Noted for Written {
    fn at(&self) -> tokio::time::Instant {
        self.at.instant()
    }
}

/// A NAR's upload record written ahead of the NAR, and the announcements read after it
/// (`None` if no record was written).
type EarlyRecord = Shared<BoxFuture<'static, Option<Announced>>>;

/// How long the upload address's "no such narinfo" (a probe the store answered 404) stands
/// for the immutability check of that path's upload, instead of reading the store again.
/// A builder probes its whole closure, then uploads path after path: this spares each one a
/// round trip. Another writer publishing the same path within it is the race the check
/// already leaves (two uploads past it both write; the last one wins), only wider.
const PROBED_ABSENT_TRUST: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a NAR object found bad when read back is not taken for stored by uploads of its
/// name ([`Uploader::already_stored`]): long enough for the builder's next attempt. Whoever
/// replaced it meanwhile (another replica, `cellar verify --repair`) costs one NAR received
/// again.
const FOUND_BAD_TRUST: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

pub struct Uploader {
    store: Arc<dyn Store>,
    store_dir: String,
    recompress: Option<Recompression>,
    trusted_keys: Vec<PublicKey>,
    /// The names of the server's signing keys: a narinfo's `Sig:` lines under them are the
    /// server's own, made afresh each time it serves it, and are not stored (sent back by a
    /// client that substituted the path, `nix store sign` against the root, an import of a
    /// directory copied from the cache), where one would outlive the key's retirement.
    own_key_names: Mutex<Vec<String>>,
    limits: Limits,
    /// One permit per NAR upload in progress (`upload.max_concurrent`).
    slots: Arc<Semaphore>,
    /// One permit per upload of a listing, log, realisation or debug info link (as many
    /// again): apart from the NARs', so that small uploads are not kept waiting, then refused,
    /// behind long NAR uploads over slow links.
    others: Arc<Semaphore>,
    /// One permit per NAR being read back for a narinfo (as many again): apart from the
    /// uploads', so that long NAR uploads do not keep narinfos (whose body is read already)
    /// waiting until they are refused.
    readbacks: Arc<Semaphore>,
    /// Room for whole bodies read into memory, in KiB ([`WHOLE_BODIES_BYTES`]).
    bodies: Arc<Semaphore>,
    /// Room for the listings being received, in KiB (as much as are held at most,
    /// [`listings::HELD_BYTES`]): one that finds none is read to its end and dropped.
    listings_arriving: Arc<Semaphore>,
    // A std Mutex: held for map operations only, never across an await.
    /// NARs received or checked here, and when ([`REMEMBERED_FOR`], at most [`MAX_VERIFIED`]).
    /// Boxed: a table slot each, a few hundred bytes of it otherwise.
    verified: Mutex<HashMap<String, (tokio::time::Instant, Box<VerifiedNar>)>>,
    /// Upload records written when a client asked for a NAR (`HEAD nar/…`, which Nix sends
    /// right before uploading it), and the announcements read after each, by the key of the
    /// NAR as it will be uploaded ([`Uploader::nar_expected`]).
    /// When each was started: one whose NAR never came is let go after [`REMEMBERED_FOR`]
    /// (an upload that finds none writes its own record).
    early: Mutex<HashMap<String, (tokio::time::Instant, EarlyRecord)>>,
    /// Narinfos this process wrote, and when: each after an upload record naming it, which
    /// keeps a collector from deleting it for [`crate::gc::access::UPLOAD_RECORD_LIFETIME`].
    /// For [`crate::gc::access::UPLOAD_COVER`] after the write, a later upload counts it as a
    /// present reference without asking the store (see [`Uploader::check_references`]).
    written: Mutex<HashMap<StorePathHash, Written>>,
    /// Narinfos taken back (or that may have been), and when: a write that began before that
    /// is not counted as written ([`Uploader::wrote`]).
    taken_back: Mutex<HashMap<StorePathHash, tokio::time::Instant>>,
    /// Narinfos the store lacked when the upload address was asked for them, and when
    /// ([`PROBED_ABSENT_TRUST`]).
    probed_absent: Mutex<HashMap<StorePathHash, tokio::time::Instant>>,
    /// NARs re-encoded on upload that the store lacked (under either name) when a builder
    /// asked for them (at the upload address, or at the root with a write token), by the name
    /// the client uses, and when ([`PROBED_ABSENT_TRUST`]); each taken by one upload.
    nars_probed_absent: Mutex<HashMap<String, tokio::time::Instant>>,
    /// NAR objects stored as sent whose bytes, read back for a narinfo, do not hash to their
    /// name (a copy cut short by an interrupted `cp`, a disk's corruption), by key, and when
    /// ([`FOUND_BAD_TRUST`]), until read back good or stored again: a builder's probe of the
    /// name is answered "absent", and its upload stores its body over them rather than taking
    /// them for stored. Per process: another replica knows nothing of it.
    nars_found_bad: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Where accepted narinfos are recorded before they are written (garbage collection).
    access: Option<Arc<crate::gc::access::AccessLog>>,
    /// Listings uploaded and waiting for their narinfo ([`listings`]).
    listings: listings::Listings,
    /// Debug info links uploaded and waiting for a narinfo naming their NAR ([`debuginfo`]).
    debuginfo: debuginfo::DebugLinks,
    /// Held by a realisation upload from its read of the stored one to its write, one per
    /// key (uploads of other outputs go on meanwhile).
    realisations: crate::sync::KeyedLocks<String>,
    /// Held by a narinfo upload from its read of the stored narinfo to its write, per path:
    /// a second upload of the path (two builders pushing one closure at once) waits, then
    /// finds the first one's narinfo.
    paths: crate::sync::KeyedLocks<StorePathHash>,
    /// Told when a narinfo upload waits for another of its path (for tests).
    #[cfg(test)]
    path_contended: tokio::sync::Notify,
    /// The collectors' announcements, as uploads read them after their records.
    announcements: Arc<announcements::Announcements>,
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
            announcements: announcements::Announcements::new(store.clone()),
            store,
            store_dir: store_dir.to_owned(),
            recompress: cfg.recompress,
            trusted_keys: cfg.trusted_keys.clone(),
            own_key_names: Mutex::new(Vec::new()),
            limits: Limits::from_config(cfg),
            slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
            others: Arc::new(Semaphore::new(cfg.max_concurrent)),
            readbacks: Arc::new(Semaphore::new(cfg.max_concurrent)),
            bodies: Arc::new(Semaphore::new((WHOLE_BODIES_BYTES >> 10) as usize)),
            listings_arriving: Arc::new(Semaphore::new(listings::HELD_BYTES >> 10)),
            verified: Mutex::new(HashMap::new()),
            early: Mutex::new(HashMap::new()),
            written: Mutex::new(HashMap::new()),
            taken_back: Mutex::new(HashMap::new()),
            probed_absent: Mutex::new(HashMap::new()),
            nars_probed_absent: Mutex::new(HashMap::new()),
            nars_found_bad: Mutex::new(HashMap::new()),
            access: None,
            listings: listings::Listings::default(),
            debuginfo: debuginfo::DebugLinks::default(),
            realisations: crate::sync::KeyedLocks::new(),
            paths: crate::sync::KeyedLocks::new(),
            #[cfg(test)]
            path_contended: tokio::sync::Notify::new(),
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

    /// How to decode a body sent with `content_encoding` (the header's value, if any): see
    /// [`encoding`]. A coding cellar does not decode is refused (415) before the body is read.
    pub fn coding(
        &self,
        content_encoding: Option<&[u8]>,
    ) -> Result<Option<encoding::Coding>, UploadError> {
        Ok(
            encoding::of(content_encoding)?.map(|compression| encoding::Coding {
                compression,
                xz_memory_limit_bytes: self.limits.xz_memory_limit_bytes,
            }),
        )
    }

    /// A slot for one NAR upload, held until it is dropped. Taken before the body is read:
    /// when `upload.max_concurrent` are in progress, the upload waits for one (at most
    /// [`ADMIT_WAIT`], first come first served), then is `Busy` (503).
    pub async fn admit(&self) -> Result<Slot, Error> {
        Self::slot_of(&self.slots, "nar").await
    }

    /// A slot for the upload of anything but a NAR (see [`Uploader::others`]), taken as
    /// [`Self::admit`] takes one.
    pub(crate) async fn admit_other(&self) -> Result<Slot, Error> {
        Self::slot_of(&self.others, "other").await
    }

    /// A slot for reading a NAR back (see [`Uploader::readbacks`]), taken as [`Self::admit`]
    /// takes one.
    pub(crate) async fn readback_slot(&self) -> Result<Slot, Error> {
        Self::slot_of(&self.readbacks, "readback").await
    }

    /// Room for a whole body of `bytes` in memory ([`WHOLE_BODIES_BYTES`]; a larger one takes
    /// all of it), waited for as an upload slot is: up to [`ADMIT_WAIT`], then busy.
    pub(crate) async fn body_room(&self, bytes: u64) -> Result<OwnedSemaphorePermit, Error> {
        let kib = bytes.div_ceil(1024).min(WHOLE_BODIES_BYTES >> 10) as u32;
        match tokio::time::timeout(ADMIT_WAIT, self.bodies.clone().acquire_many_owned(kib)).await {
            Ok(Ok(room)) => Ok(room),
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(
                    bytes,
                    wait_secs = ADMIT_WAIT.as_secs(),
                    "upload refused: the bodies being read held all the memory they may for as long as it waited"
                );
                Err(busy())
            }
        }
    }

    /// A slot of `slots`, the pool named `pool` in the log.
    async fn slot_of(slots: &Arc<Semaphore>, pool: &'static str) -> Result<Slot, Error> {
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Ok(Slot::new(permit));
        }
        tracing::debug!(pool, "upload waits for one of upload.max_concurrent");
        // Counted while it waits, however the wait ends (a client gone drops it).
        struct Waiting;
        impl Drop for Waiting {
            fn drop(&mut self) {
                crate::metrics::get().uploads_waiting.dec();
            }
        }
        crate::metrics::get().uploads_waiting.inc();
        let _waiting = Waiting;
        match tokio::time::timeout(ADMIT_WAIT, slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Slot::new(permit)),
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(
                    pool,
                    wait_secs = ADMIT_WAIT.as_secs(),
                    "upload refused: upload.max_concurrent uploads (of its pool) ran for as long as it waited"
                );
                Err(busy())
            }
        }
    }

    fn remember(&self, uploaded_key: String, v: VerifiedNar) {
        let mut m = lock(&self.verified);
        let now = tokio::time::Instant::now();
        note_within(
            &mut m,
            uploaded_key,
            (now, Box::new(v)),
            REMEMBERED_FOR,
            MAX_VERIFIED,
        );
    }

    /// Sets the names of the server's signing keys (at start and on each reload): see
    /// `own_key_names`.
    pub fn set_own_key_names(&self, names: Vec<String>) {
        *lock(&self.own_key_names) = names;
    }

    /// Drops `info`'s signatures under the server's own key names; how many.
    fn drop_own_signatures(&self, info: &mut NarInfo) -> usize {
        let own = lock(&self.own_key_names);
        let before = info.sigs.len();
        info.sigs.retain(|s| !own.iter().any(|n| n == s.key_name()));
        before - info.sigs.len()
    }

    fn remembered(&self, uploaded_key: &str) -> Option<VerifiedNar> {
        lock(&self.verified)
            .get(uploaded_key)
            .map(|(_, v)| VerifiedNar::clone(v))
    }

    /// The NAR names an upload of `name` is recorded under: as uploaded, and as stored if
    /// uploads are re-encoded.
    fn record_names(&self, name: &NarFileName) -> Vec<String> {
        std::iter::once(name.as_str().to_owned())
            .chain(self.reencoded(name).map(|(s, _)| s.as_str().to_owned()))
            .collect()
    }

    /// A client asks the upload address whether it has the NAR `name` (`HEAD nar/…`): Nix
    /// sends this right before it uploads the NAR, or, if the NAR is there, the narinfo that
    /// relies on it. Writes the NAR's upload record now, in the background, and reads the
    /// collectors' announcements after it, so both are done, or under way, when the NAR has
    /// arrived and its narinfo follows, instead of costing that narinfo two sequential round
    /// trips ([`Announced`]). The protocol is the same as for a record written with the NAR:
    /// the record names the NAR before anything relies on it, and the read comes after the
    /// record. A NAR then never uploaded leaves that record behind (names only, no object);
    /// it expires with the other records. Only with an access log and a builder at work (see
    /// [`crate::gc::access::AccessLog::record_nar_upload`]).
    pub fn nar_expected(&self, name: &NarFileName) {
        let Some(access) = self.access.clone() else {
            return;
        };
        let names = self.record_names(name);
        let announcements = self.announcements.clone();
        let early: EarlyRecord = async move {
            let since = access.stamp();
            let files: Vec<&str> = names.iter().map(String::as_str).collect();
            match access.record_nar_upload(&files).await {
                Ok(true) => Some(Announced::start(announcements, since, names)),
                Ok(false) => None,
                Err(e) => {
                    tracing::warn!(nar = %files[0], cause = %e, "writing an upload record failed");
                    None
                }
            }
        }
        .boxed()
        .shared();
        // Upload work, though a HEAD starts it: waits out a store restarting as the PUT does.
        tokio::spawn(crate::store::serving_upload(early.clone()));
        let mut m = lock(&self.early);
        note_at(
            &mut m,
            object_key::nar(name),
            (tokio::time::Instant::now(), early),
            REMEMBERED_FOR,
        );
    }

    /// Awaits the record [`Uploader::nar_expected`] started for `name`: `None` if none was
    /// started, else whether one was written.
    #[cfg(test)]
    pub(crate) async fn early_record(&self, name: &NarFileName) -> Option<bool> {
        let (_, early) = lock(&self.early).get(&object_key::nar(name)).cloned()?;
        Some(early.await.is_some())
    }

    /// The record [`Uploader::nar_expected`] started for the NAR under `uploaded_key`, if any.
    fn take_early(&self, uploaded_key: &str) -> Option<EarlyRecord> {
        lock(&self.early).remove(uploaded_key).map(|(_, e)| e)
    }

    /// Forgets what no upload relies on any more (each map's own time: see its field), and
    /// the memory it took. Full maps let go of it as uploads come; this lets a server gone
    /// quiet give it back too.
    pub fn let_go_stale(&self) {
        let_go(&mut lock(&self.verified), REMEMBERED_FOR);
        let_go(&mut lock(&self.early), REMEMBERED_FOR);
        let_go(&mut lock(&self.written), crate::gc::access::UPLOAD_COVER);
        // As long as any write may take (see `wrote`): a write begun before a take-back and
        // ending after the take-back was forgotten would count as written.
        let_go(&mut lock(&self.taken_back), REMEMBERED_FOR);
        let_go(&mut lock(&self.probed_absent), PROBED_ABSENT_TRUST);
        let_go(&mut lock(&self.nars_probed_absent), PROBED_ABSENT_TRUST);
        let_go(&mut lock(&self.nars_found_bad), FOUND_BAD_TRUST);
    }

    /// How many uploads, NARs and probes this process remembers (bounded: see
    /// [`Self::let_go_stale`]), for `/metrics`.
    pub fn remembered_len(&self) -> usize {
        // One lock at a time (a guard lives to the end of its statement).
        let mut n = lock(&self.verified).len();
        n += lock(&self.early).len();
        n += lock(&self.written).len();
        n += lock(&self.taken_back).len();
        n += lock(&self.probed_absent).len();
        n += lock(&self.nars_probed_absent).len();
        n += lock(&self.nars_found_bad).len();
        n
    }

    /// The upload address was asked for the narinfo of `h`, and the store has none.
    pub fn probed_absent(&self, h: StorePathHash) {
        let mut m = lock(&self.probed_absent);
        note_at(&mut m, h, tokio::time::Instant::now(), PROBED_ABSENT_TRUST);
    }

    /// Whether the store lacked the narinfo of `h` when probed within [`PROBED_ABSENT_TRUST`],
    /// and this process has not written it since.
    fn known_absent(&self, h: StorePathHash) -> bool {
        let probed = lock(&self.probed_absent).get(&h).copied();
        probed.is_some_and(|at| at.elapsed() < PROBED_ABSENT_TRUST)
            && !lock(&self.written).contains_key(&h)
    }

    /// The narinfo of `h` was written by this process, after an upload record naming it, by
    /// a write that began at `began`. Not counted if another upload took the narinfo back
    /// since then: the take-back may have come after this write.
    fn wrote(&self, path: &StorePathBaseName, began: tokio::time::Instant) {
        let h = path.hash();
        lock(&self.probed_absent).remove(&h);
        let mut m = lock(&self.written);
        if lock(&self.taken_back)
            .get(&h)
            .is_some_and(|&at| at >= began)
        {
            m.remove(&h);
            return;
        }
        note_at(
            &mut m,
            h,
            Written {
                at: crate::gc::access::Stamp::now(self.store.as_ref()),
                path: path.clone(),
            },
            crate::gc::access::UPLOAD_COVER,
        );
    }

    /// The narinfo of `h` was taken back (or may have been): references to it are asked for
    /// in the store again, and writes of it still under way are not counted.
    fn unwrote(&self, h: StorePathHash) {
        let mut m = lock(&self.written);
        m.remove(&h);
        let mut taken = lock(&self.taken_back);
        note_at(&mut taken, h, tokio::time::Instant::now(), REMEMBERED_FOR);
    }

    /// Whether this process wrote the narinfo of `path` so recently that the upload record
    /// written before it still keeps every collector from deleting it: within
    /// [`crate::gc::access::UPLOAD_COVER`] of the write (the record started at most that long
    /// before it, and collectors read records for three times that). Only with an access log
    /// (no records, no such guarantee). A narinfo of the same hash for another name is not
    /// one of `path`.
    fn recently_written(&self, path: &StorePathBaseName) -> bool {
        self.access.is_some()
            && lock(&self.written).get(&path.hash()).is_some_and(|w| {
                w.path == *path
                    && w.at
                        .before(crate::gc::access::Stamp::now(self.store.as_ref()))
                        < crate::gc::access::UPLOAD_COVER
            })
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

    /// Whether a client's `HEAD nar/<name>` at the upload address must ask the store. Not
    /// when the NAR would be stored as sent and this process has not seen it in the store:
    /// its name is the sha256 of its bytes, so storing it again writes the very object the
    /// store may hold, and the probe answers "absent" from memory, saving the round trip every
    /// path of an upload would wait for. Whether the store holds a large one is asked when it
    /// is sent ([`Uploader::already_stored`]). Asked: a NAR this process stored, read back or
    /// checked by its digest record
    /// (an upload retried after it broke off before its narinfo, or a second path with the
    /// same NAR: not sent again, even through a proxy that takes bodies before cellar sees
    /// them), and one re-encoded on upload (a new encoding of it need not be byte for byte the
    /// copy the store holds, which narinfos name by its hash).
    pub fn probe_asks_store(&self, name: &NarFileName) -> bool {
        self.reencoded(name).is_some() || self.remembered(&object_key::nar(name)).is_some()
    }

    /// A builder asked for the NAR `name` and the store has it under neither name: noted for
    /// a NAR re-encoded on upload, whose upload then need not ask again ([`Self::store_nar`]).
    pub fn nar_probed_absent(&self, name: &NarFileName) {
        if self.reencoded(name).is_none() {
            return;
        }
        let mut m = lock(&self.nars_probed_absent);
        note_at(
            &mut m,
            object_key::nar(name),
            tokio::time::Instant::now(),
            PROBED_ABSENT_TRUST,
        );
    }

    /// Whether a builder's probe found the NAR `name` absent within [`PROBED_ABSENT_TRUST`];
    /// taken, so that it serves one upload only.
    fn take_probed_absent(&self, name: &NarFileName) -> bool {
        lock(&self.nars_probed_absent)
            .remove(&object_key::nar(name))
            .is_some_and(|at| at.elapsed() < PROBED_ABSENT_TRUST)
    }

    /// Whether a NAR about to be sent as `name` with `declared` bytes (`Content-Length`) is in
    /// the store already, asked before its body is: then it is not received again. Only NARs
    /// over [`STORED_AGAIN_MAX`] (or of unknown size) are looked up; a smaller one costs less
    /// to store again than a round trip to ask (one re-encoded on upload is asked for before
    /// it is committed, see [`Self::store_nar`]).
    /// One whose stored copy was found bad ([`Self::found_bad`]), or is of another size than
    /// declared, is received and stored over that copy.
    pub async fn already_stored(
        &self,
        name: &NarFileName,
        declared: Option<u64>,
    ) -> Result<bool, StoreError> {
        if declared.is_some_and(|n| n <= STORED_AGAIN_MAX) {
            return Ok(false);
        }
        if self.found_bad(&object_key::nar(name)) {
            return Ok(false);
        }
        // The name is the sha256 of the file: a stored object of another size than the one
        // sent is not that file (cut short by an interrupted copy into the bucket), and is
        // stored over.
        match self.store.head(&object_key::nar(name)).await? {
            Some(size) => Ok(declared.is_none_or(|d| d == size)),
            None => Ok(self.reencoded_size(name).await?.is_some()),
        }
    }

    /// Whether the copy of the NAR `name` stored as sent was found bad ([`Self::found_bad`]):
    /// a builder's probe of it is answered "absent", so that it sends the NAR again.
    pub fn nar_found_bad(&self, name: &NarFileName) -> bool {
        self.found_bad(&object_key::nar(name))
    }

    /// Notes that the NAR object `key`, read back, was not what its name says.
    fn note_found_bad(&self, key: String) {
        let mut m = lock(&self.nars_found_bad);
        note_at(&mut m, key, tokio::time::Instant::now(), FOUND_BAD_TRUST);
    }

    /// Whether the NAR object `key` was found bad within [`FOUND_BAD_TRUST`] and not stored
    /// again since.
    fn found_bad(&self, key: &str) -> bool {
        lock(&self.nars_found_bad)
            .get(key)
            .is_some_and(|at| at.elapsed() < FOUND_BAD_TRUST)
    }

    /// Whether the store holds the NAR a client would find under `name`: the object itself,
    /// or the re-encoded copy it was stored as.
    pub async fn has_nar(&self, name: &NarFileName) -> Result<bool, StoreError> {
        if self.store.head(&object_key::nar(name)).await?.is_some() {
            return Ok(true);
        }
        Ok(self.reencoded_size(name).await?.is_some())
    }

    /// Streams a NAR into the store, verified. `None` if nothing was written: the store holds
    /// the copy it would have been re-encoded to (see [`Self::store_nar`]).
    pub async fn put_nar<S>(&self, name: &NarFileName, body: S) -> Result<Option<NarDigest>, Error>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        self.put_nar_hashing_to(name, body, None).await
    }

    /// [`Self::put_nar`] of a NAR whose bytes hash to `file_hash` rather than to its name (if
    /// given): one another cellar re-encoded on upload keeps the name it was uploaded under
    /// (`upload.compression`), and its narinfo's `FileHash` says what its bytes are. Copied
    /// from there (a mirror, an import), it is checked against that hash instead.
    pub(crate) async fn put_nar_hashing_to<S>(
        &self,
        name: &NarFileName,
        body: S,
        file_hash: Option<crate::nix::Sha256>,
    ) -> Result<Option<NarDigest>, Error>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let file_hash = file_hash.filter(|h| h.to_nix32() != name.file_hash());
        check_nar_name(name)?;
        let incoming = name.compression_from_ext().unwrap_or(Compression::None);
        let (stored, target) = match self.reencoded(name) {
            Some((stored, target)) => (stored, Some(target)),
            None => (name.clone(), None),
        };
        let Some((d, announced, stored_by)) = self
            .store_nar(name, body, incoming, &stored, target, file_hash)
            .await?
        else {
            return Ok(None);
        };
        // Not the bytes this upload checked: its narinfo checks the stored object instead
        // (by its digest record, or read back).
        if stored_by == StoredBy::Another {
            return Ok(Some(d));
        }
        self.remember(
            object_key::nar(name),
            VerifiedNar {
                stored,
                // A `.nar` holds a plain NAR or a gzip one: what its bytes were.
                stored_compression: target.unwrap_or(d.compression),
                stored_file: d.output,
                uploaded_file: Some(d.input),
                nar: d.nar,
                flat: d.flat,
                announced,
            },
        );
        Ok(Some(d))
    }

    /// Streams the NAR uploaded as `name` into the store as `stored`, digested and
    /// re-encoded to `target` on the way; committed only if its sha256 matches `name`. With
    /// the digest, the announcements being read if an upload record was written, and who
    /// stored the object ([`SameName`]). `None` if a re-encoded NAR was not committed because
    /// the store holds `stored` already.
    async fn store_nar<S>(
        &self,
        name: &NarFileName,
        body: S,
        incoming: Compression,
        stored: &NarFileName,
        target: Option<Compression>,
        file_hash: Option<crate::nix::Sha256>,
    ) -> Result<Option<(NarDigest, Option<Announced>, StoredBy)>, Error>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let name_hash = name.file_hash();
        let (expected, says) = match file_hash {
            Some(h) => (h.to_nix32(), "the narinfo's FileHash says"),
            None => (name_hash.to_owned(), "its name says"),
        };
        let early = self.take_early(&object_key::nar(name));
        let recompress = target.map(|t| (t, self.recompress.and_then(|r| r.level)));
        let over_bad = self.found_bad(&object_key::nar(stored));
        let mut w = self.store.writer(&object_key::nar(stored)).await?;
        // Stored as sent, its name is the sha256 of its bytes: another upload of the name that
        // lands first leaves the very object this one would (but not over a copy found bad).
        let standing = Arc::new(Mutex::new(None));
        if target.is_none() && !over_bad && file_hash.is_none() {
            w = Box::new(SameName {
                inner: Some(w),
                store: Arc::clone(&self.store),
                key: object_key::nar(stored),
                standing: Arc::clone(&standing),
            });
        }
        let d =
            match digest::digest_named_into(body, incoming, recompress, Some(&mut w), self.limits)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    w.abort().await;
                    return Err(e);
                }
            };
        if d.input.hash.to_nix32() != expected {
            w.abort().await;
            return Err(rejected(format!(
                "the body's sha256 is {}, but {says} {expected}",
                d.input.hash.to_nix32()
            )));
        }
        // A re-encoded NAR is not stored over the copy the store holds: a new encoding (another
        // level, another zstd) need not be byte for byte that one, which published narinfos
        // name by its hash and size. Asked right before the commit (the PUT's look ahead skips
        // small NARs and gives up on a slow store), unless a builder's probe found it absent
        // moments ago. A failed look is asked again (a passing timeout should not fail an
        // upload whose body is in: Nix 2.8 retries without it); a store that cannot say at all
        // fails the upload rather than risk those narinfos.
        if target.is_some() && !self.take_probed_absent(name) {
            let key = object_key::nar(stored);
            let mut held = self.store.head(&key).await;
            for wait in gc_guard::HEAD_RETRIES {
                if held.is_ok() {
                    break;
                }
                tokio::time::sleep(wait).await;
                held = self.store.head(&key).await;
            }
            match held {
                Ok(None) => {}
                Ok(Some(_)) => {
                    w.abort().await;
                    tracing::info!(nar = %name, stored = %stored, "NAR already stored re-encoded: kept, not encoded again");
                    return Ok(None);
                }
                Err(e) => {
                    w.abort().await;
                    return Err(e.into());
                }
            }
        }
        // The record that lets the narinfo following this NAR skip its own: the one written
        // when the client probed the NAR, if it names what this upload stores and still
        // covers uploads; else one written now, while the NAR is committed, so it costs no
        // round trip of its own, and only once the NAR is complete and checked. If it fails,
        // that narinfo writes its record itself. The announcements are read after the record
        // (see `Announced`).
        let names = self.record_names(name);
        let record = async {
            if let (Some(early), Some(log)) = (early, &self.access) {
                if let Some(a) = early.await {
                    let files: Vec<&str> = names.iter().map(String::as_str).collect();
                    if a.covers(&files) && log.still_covers(a.since) {
                        return Some(a);
                    }
                }
            }
            let a = self.access.as_ref()?;
            let since = a.stamp();
            let files: Vec<&str> = names.iter().map(String::as_str).collect();
            match a.record_nar_upload(&files).await {
                Ok(true) => Some(Announced::start(
                    self.announcements.clone(),
                    since,
                    names.clone(),
                )),
                Ok(false) => None,
                Err(e) => {
                    tracing::warn!(nar = %name, cause = %e, "writing an upload record failed");
                    None
                }
            }
        };
        // A large NAR stored as sent is recorded with its digest beside it, while it is
        // committed: a narinfo reaching another replica is then checked without reading the
        // NAR back ([`nar_records`]). A record is true of the name whatever becomes of this
        // commit, so it may land first; one that fails costs that narinfo the read back. But
        // not over a copy found bad (whose record was deleted so that every replica reads it
        // back): then only once this commit has replaced it.
        // Not for a copy named otherwise than by its bytes (`file_hash`): a record holds for
        // a NAR whose name is its hash.
        let recorded = target.is_none() && file_hash.is_none() && nar_records::wanted(&d);
        // Looked at again: a copy may have been found bad while this body came.
        let over_bad = over_bad || self.found_bad(&object_key::nar(stored));
        let digest_record = async {
            // Not for an object another upload left (see `SameName`).
            if recorded && !over_bad && lock(&standing).is_none() {
                self.write_record(stored, &d).await;
            }
        };
        let (committed, announced, ()) = futures::join!(w.commit(), record, digest_record);
        committed?;
        let standing = *lock(&standing);
        if let Some(size) = standing {
            // Its name says its bytes; a size other than this body's says they are not.
            if size != d.output.size {
                return Err(StoreError::Other(format!(
                    "{} stands in the store with {size} bytes, not the {} sent",
                    object_key::nar(stored),
                    d.output.size
                ))
                .into());
            }
            return Ok(Some((d, announced, StoredBy::Another)));
        }
        if recorded && over_bad {
            self.write_record(stored, &d).await;
        }
        lock(&self.nars_found_bad).remove(&object_key::nar(stored));
        Ok(Some((d, announced, StoredBy::This)))
    }

    /// Finds and digests a NAR this process did not see being uploaded (another replica
    /// received it, or this process before a restart). Reading a NAR back and decoding it
    /// costs what receiving it does, so at most `upload.max_concurrent` are read back at
    /// once: a fleet's narinfos landing on a replica that saw none of their NARs are not all
    /// read back together.
    /// `file_hash` is the narinfo's `FileHash`: a copy whose bytes it names, though its name
    /// does not (a NAR cellar re-encoded on upload is named after the file uploaded, and a
    /// narinfo copied from such a cache names it so), is that file, not a bad copy.
    /// A large one (`file_size`, the narinfo's `FileSize`) is first looked for with its
    /// digest record ([`nar_records`]), which spares the read back.
    async fn verify_stored(
        &self,
        name: &NarFileName,
        file_hash: Option<crate::nix::Sha256>,
        file_size: Option<u64>,
    ) -> Result<Option<VerifiedNar>, Error> {
        // A narinfo naming a NAR no upload could have stored (one Nix's S3 store wrote in
        // brotli, say) is the narinfo's fault, refused as the NAR's upload would be.
        check_nar_name(name)?;
        if file_size.is_some_and(|n| n >= nar_records::MIN_SIZE) {
            if let Some(v) = self.recorded(name).await {
                tracing::info!(nar = %name, "NAR checked by its digest record, not read back");
                crate::metrics::upload_nar_check("record");
                self.remember(object_key::nar(name), v.clone());
                return Ok(Some(v));
            }
        }
        let _slot = self.readback_slot().await?;
        let mut candidates = vec![name.clone()];
        if let Some((stored, _)) = self.reencoded(name) {
            candidates.push(stored);
        }
        for cand in candidates {
            let Some(obj) = self.store.get(&object_key::nar(&cand), None).await? else {
                continue;
            };
            tracing::info!(nar = %cand, size = ?obj.length, "NAR in the store not received by this process (stored before, or by another replica or an import): read back to check its narinfo");
            crate::metrics::upload_nar_check("read_back");
            let c = cand.compression_from_ext().unwrap_or(Compression::None);
            let key = object_key::nar(&cand);
            // The object is the store's: a broken body, or one that does not decode or is
            // over this server's limits (stored through a replica with larger ones), is the
            // store's trouble to be seen by its operator (a 502). One that is not what its
            // name says is stored over by the next upload of the name: refused (a 4xx, which
            // Nix does not retry: a retry of this PUT would come without its body and stall
            // for minutes), the builder's next copy mends it. Only a copy stored as sent can
            // be told bad for sure: its name is the sha256 of its bytes (a re-encoded copy's
            // is the uploaded file's). One that does not decode may still be the very file
            // (over this server's limits, stored through a replica with larger ones): it is
            // taken for bad only if its bytes, read again, do not hash to its name.
            let as_sent = cand == *name;
            let d = match digest::digest_named_into(obj.body, c, None, None, self.limits).await {
                Ok(d) => d,
                Err(Error::Upload(u)) => {
                    if matches!(u, UploadError::Rejected(_))
                        && as_sent
                        && self.hashes_to(&key, name.file_hash()).await == Some(false)
                    {
                        return Err(self.found_bad_copy(name, u.to_string()).await);
                    }
                    return Err(StoreError::Other(format!("reading {key} back: {u}")).into());
                }
                Err(e) => return Err(e),
            };
            if as_sent
                && d.input.hash.to_nix32() != name.file_hash()
                && file_hash != Some(d.input.hash)
            {
                let why = format!(
                    "its sha256 is {}, not the one its name says",
                    d.input.hash.to_nix32()
                );
                return Err(self.found_bad_copy(name, why).await);
            }
            // Good now (stored again meanwhile, through another replica).
            lock(&self.nars_found_bad).remove(&key);
            // Read back whole and found to be its name's file: a large one stored before
            // digest records were written (or whose record was lost) gets one now, so that it
            // is read back no more.
            // (What is true of the file with the name's hash, whichever copy was read.)
            if d.input.hash.to_nix32() == name.file_hash() && nar_records::wanted(&d) {
                self.write_record(name, &d).await;
            }
            let v = VerifiedNar {
                stored: cand,
                stored_compression: d.compression,
                stored_file: d.input,
                uploaded_file: None,
                nar: d.nar,
                flat: d.flat,
                announced: None,
            };
            self.remember(object_key::nar(name), v.clone());
            return Ok(Some(v));
        }
        Ok(None)
    }

    /// Notes that the copy of `name` stored as sent is bad (read back, its bytes are not what
    /// its name says), and deletes its digest record, which vouches for any copy of the
    /// record's size: every replica then reads the copy back until it is stored again (the
    /// upload that stores it writes the record again). The narinfo's refusal.
    async fn found_bad_copy(&self, name: &NarFileName, why: String) -> Error {
        let key = object_key::nar(name);
        self.note_found_bad(key.clone());
        if let Err(e) = self.store.delete(&nar_records::key(name)).await {
            tracing::warn!(nar = %name, cause = %e, "could not delete the digest record of a NAR found bad; other replicas may take the copy for good until it is stored again");
        }
        Error::Upload(UploadError::Rejected(format!(
            "the store's copy of {key} is bad ({why}); run the copy again: the NAR is sent again \
             and stored over it"
        )))
    }

    /// Writes the digest record of the NAR `name`, stored as sent and found to be `d`
    /// ([`nar_records`]); a failure is logged (a narinfo reaching another replica then reads
    /// the NAR back).
    async fn write_record(&self, name: &NarFileName, d: &NarDigest) {
        if let Err(e) = self
            .store
            .put_bytes(&nar_records::key(name), nar_records::render(d))
            .await
        {
            tracing::warn!(nar = %name, cause = %e, "writing the NAR's digest record failed; a narinfo reaching another replica reads the NAR back");
        }
    }

    /// The NAR `name` as its digest record gives it, if the store holds a record of that very
    /// file and an object of the size the record says under the name; `None` if not, or if
    /// the store cannot say (the NAR is then read back). Not for a copy found bad here: the
    /// record vouches for the file the name promises, not for the object stored.
    async fn recorded(&self, name: &NarFileName) -> Option<VerifiedNar> {
        let key = object_key::nar(name);
        if self.found_bad(&key) {
            return None;
        }
        let record_key = nar_records::key(name);
        let (record, size) = futures::join!(
            self.store.get_bytes(&record_key, nar_records::MAX_BYTES),
            self.store.head(&key)
        );
        let d = match record {
            Ok(Some(text)) => nar_records::parse(name, &text)?,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(nar = %name, cause = %e, "reading the NAR's digest record failed; reading the NAR back");
                return None;
            }
        };
        if size.ok()?? != d.output.size {
            return None;
        }
        Some(VerifiedNar {
            stored: name.clone(),
            stored_compression: d.compression,
            stored_file: d.output,
            uploaded_file: None,
            nar: d.nar,
            flat: None,
            announced: None,
        })
    }

    /// Whether the bytes of the object `key` hash (sha256) to `nix32`; `None` if they cannot
    /// be read whole.
    async fn hashes_to(&self, key: &str, nix32: &str) -> Option<bool> {
        use sha2::Digest as _;
        let obj = self.store.get(key, None).await.ok()??;
        let mut hash = sha2::Sha256::new();
        let mut body = obj.body;
        while let Some(chunk) = body.next().await {
            hash.update(chunk.ok()?);
        }
        let bytes: [u8; 32] = hash.finalize().into();
        Some(crate::nix::Sha256::from_bytes(bytes).to_nix32() == nix32)
    }

    /// Holds the listing uploaded for `h` until its narinfo is accepted, which writes it
    /// ([`listings`]); counted among the uploads running ([`Self::admit_other`]). Whether it
    /// is held: one that cannot be is read to its end all the same, and dropped (Nix fails
    /// the whole copy on a refused listing).
    pub async fn put_listing<S>(
        &self,
        h: StorePathHash,
        body: S,
        limit: u64,
    ) -> Result<ListingFate, Error>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send,
    {
        let _slot = self.admit_other().await?;
        let mut body = std::pin::pin!(body);
        // Kept while it could be held, and while the listings being received together take no
        // more memory than those held may; else read to its end (Nix fails the whole copy on
        // a refused listing) without being kept.
        let mut listing = Some(Vec::new());
        let mut room: Option<OwnedSemaphorePermit> = None;
        let mut read = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(digest::body_error)?;
            read += chunk.len() as u64;
            if read > limit {
                return Err(UploadError::TooLarge { limit }.into());
            }
            if read > listings::HELD_BYTES as u64 {
                // Not kept: its room goes to the listings arriving beside it.
                listing = None;
                room = None;
            }
            if listing.is_some() && !self.listing_room(&mut room, read) {
                tracing::warn!(path = %h, "listing dropped: the listings being received take all the memory they may");
                self.drain_listing(body, read, limit).await?;
                return Ok(ListingFate::Dropped);
            }
            if let Some(l) = &mut listing {
                l.extend_from_slice(&chunk);
            }
        }
        let Some(mut listing) = listing else {
            tracing::warn!(
                path = %h,
                bytes = read,
                "listing dropped: larger than the listings held at most ({} MiB)",
                listings::HELD_BYTES >> 20
            );
            return Ok(ListingFate::Dropped);
        };
        // Held as counted: by its length, not the capacity it grew to.
        listing.shrink_to_fit();
        if let Err(why) = self.listings.hold(h, Bytes::from(listing)) {
            tracing::warn!(path = %h, "listing dropped: {why}");
            return Ok(ListingFate::Dropped);
        }
        Ok(ListingFate::Held)
    }

    /// Grows `room` (KiB of [`Self::listings_arriving`]) to cover `bytes`, without waiting;
    /// whether it could.
    fn listing_room(&self, room: &mut Option<OwnedSemaphorePermit>, bytes: u64) -> bool {
        let held = room.as_ref().map_or(0, |r| r.num_permits());
        let needed = usize::try_from(bytes.div_ceil(1024)).unwrap_or(usize::MAX);
        if needed <= held {
            return true;
        }
        let Ok(more) = u32::try_from(needed - held) else {
            return false;
        };
        match self.listings_arriving.clone().try_acquire_many_owned(more) {
            Ok(more) => {
                match room {
                    Some(r) => r.merge(more),
                    None => *room = Some(more),
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Reads the rest of a listing that is not kept (`read` bytes of it so far).
    async fn drain_listing<S>(&self, mut body: S, mut read: u64, limit: u64) -> Result<(), Error>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Unpin,
    {
        while let Some(chunk) = body.next().await {
            read += chunk.map_err(digest::body_error)?.len() as u64;
            if read > limit {
                return Err(UploadError::TooLarge { limit }.into());
            }
        }
        Ok(())
    }

    /// Stores a log as sent, streamed; counted among the uploads running
    /// ([`Self::admit_other`]), as each holds a store writer and its buffer.
    pub async fn put_plain<S>(&self, key: &str, body: S, limit: u64) -> Result<(), Error>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send,
    {
        let _slot = self.admit_other().await?;
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

#[cfg(test)]
mod note_tests {
    use super::*;

    /// A full map of moments lets go of the stale ones first, and keeps the fresh.
    #[tokio::test(start_paused = true)]
    async fn a_full_map_of_moments_lets_go_of_the_stale_first() {
        let keep = std::time::Duration::from_secs(60);
        let mut m = HashMap::new();
        let start = tokio::time::Instant::now();
        for k in 0..MAX_REMEMBERED - 1 {
            note_at(&mut m, k, start, keep);
        }
        tokio::time::advance(keep).await;
        note_at(
            &mut m,
            MAX_REMEMBERED - 1,
            tokio::time::Instant::now(),
            keep,
        );
        // Full now: the next one lets the stale go, not the fresh.
        note_at(&mut m, MAX_REMEMBERED, tokio::time::Instant::now(), keep);
        assert_eq!(m.len(), 2);
        assert!(m.contains_key(&(MAX_REMEMBERED - 1)));
        // All fresh: cleared as a last resort.
        let now = tokio::time::Instant::now();
        for k in 0..MAX_REMEMBERED + 1 {
            note_at(&mut m, k, now, keep);
        }
        assert!(m.len() <= MAX_REMEMBERED);
        // Its memory given back too (a cleared map keeps its table).
        assert!(m.capacity() < 1000, "{}", m.capacity());
    }

    /// Each map of what uploads left is let go of after its own time, with nothing noted
    /// (a server gone quiet), and what is still relied on stays.
    #[tokio::test(start_paused = true)]
    async fn every_map_of_what_uploads_left_is_let_go_of_in_its_time() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let cfg = crate::config::Config::default();
        let up = Uploader::new(&cfg.upload, &cfg.store_dir, mem);
        let h: StorePathHash = "f904kp3djilk732cgbnxhpy7vzykbqsh".parse().unwrap();
        let now = tokio::time::Instant::now();
        let early: EarlyRecord = async { None }.boxed().shared();
        lock(&up.early).insert("nar/a.nar".into(), (now, early));
        let path: StorePathBaseName = format!("{h}-x").parse().unwrap();
        let at = crate::gc::access::Stamp::now(up.store.as_ref());
        lock(&up.written).insert(h, Written { at, path });
        lock(&up.taken_back).insert(h, now);
        lock(&up.probed_absent).insert(h, now);
        lock(&up.nars_probed_absent).insert("nar/b.nar".into(), now);
        lock(&up.nars_found_bad).insert("nar/c.nar".into(), now);
        assert_eq!(up.remembered_len(), 6);
        // Each kept while relied on: a minute, ten, thirty, a day.
        let after = |secs: u64| async move {
            tokio::time::advance(std::time::Duration::from_secs(secs)).await;
        };
        after(59).await;
        up.let_go_stale();
        assert_eq!(up.remembered_len(), 6);
        after(1).await;
        up.let_go_stale();
        assert_eq!(up.remembered_len(), 4, "the probes' minute");
        after(9 * 60).await;
        up.let_go_stale();
        assert_eq!(up.remembered_len(), 3, "the cover of uploads");
        after(20 * 60).await;
        up.let_go_stale();
        assert_eq!(up.remembered_len(), 1, "an early record, a take-back");
        after(24 * 3600).await;
        up.let_go_stale();
        assert_eq!(up.remembered_len(), 0, "a NAR found bad");
        assert_eq!(lock(&up.written).capacity(), 0, "its table given back");
    }

    /// A map of NARs received here keeps each for `keep`, as far as its bound allows, and
    /// gives back the memory of what it lets go.
    #[tokio::test(start_paused = true)]
    async fn a_map_let_go_of_shrinks() {
        let keep = std::time::Duration::from_secs(60);
        let mut m = HashMap::new();
        let start = tokio::time::Instant::now();
        for k in 0..10_000 {
            note_within(&mut m, k, start, keep, 10_000);
        }
        tokio::time::advance(keep).await;
        note_within(&mut m, 10_000, tokio::time::Instant::now(), keep, 10_000);
        assert_eq!(m.len(), 1);
        assert!(m.capacity() < 1000, "{}", m.capacity());
    }
}
