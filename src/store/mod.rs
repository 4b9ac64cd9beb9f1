//! Object stores holding the cache: an S3 bucket or a local directory, both with the layout
//! `nix copy --to` writes (`<hash>.narinfo`, `nar/<file>`, `log/<drv>`, …).
//!
//! Keys passed to a store are always built by [`object_key`] from validated names, never from raw
//! request strings.

pub mod clock;
pub mod local;
#[cfg(test)]
pub mod memory;
pub mod s3;

use std::io;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use thiserror::Error;

use crate::nix::{Compression, NarInfo, StorePathHash, MAX_NARINFO_BYTES};

/// A streamed object body. An `Err` item means the store failed mid-body.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send + 'static>>;

/// The `take` bytes of `body` after its first `skip`: a range cut from a whole body. A body
/// that ends before them fails (the answer must not end cleanly short).
pub fn byte_slice(body: ByteStream, skip: u64, take: u64) -> ByteStream {
    slice(body, skip, take, false)
}

/// [`byte_slice`] of the last bytes of a body of known size: one that goes on past them is
/// not that body, and fails too.
pub fn byte_slice_to_end(body: ByteStream, skip: u64, take: u64) -> ByteStream {
    slice(body, skip, take, true)
}

fn slice(body: ByteStream, skip: u64, take: u64, at_end: bool) -> ByteStream {
    use futures::StreamExt as _;
    /// Where the cut is: before or in the bytes asked for, past them (checking the body ends
    /// there, when it must), or over (after an error or the end: the body is not polled again).
    enum At {
        Cutting { skip: u64, take: u64 },
        Past { extra: bool },
        Over,
    }
    fn fail(kind: io::ErrorKind, why: &'static str) -> io::Error {
        io::Error::new(kind, why)
    }
    let long = || {
        fail(
            io::ErrorKind::InvalidData,
            "the body goes on past the size it was cut to",
        )
    };
    Box::pin(futures::stream::unfold(
        (
            body,
            if take == 0 {
                At::Past { extra: false }
            } else {
                At::Cutting { skip, take }
            },
        ),
        move |(mut body, at)| async move {
            match at {
                At::Over => None,
                At::Past { .. } if !at_end => None,
                At::Past { extra: true } => Some((Err(long()), (body, At::Over))),
                At::Past { extra: false } => loop {
                    match body.next().await {
                        None => return None,
                        Some(Ok(c)) if c.is_empty() => continue,
                        Some(Ok(_)) => return Some((Err(long()), (body, At::Over))),
                        Some(Err(e)) => return Some((Err(e), (body, At::Over))),
                    }
                },
                At::Cutting { mut skip, take } => loop {
                    let mut chunk = match body.next().await {
                        None => {
                            let short = fail(
                                io::ErrorKind::UnexpectedEof,
                                "the body ended before the range it was cut from",
                            );
                            return Some((Err(short), (body, At::Over)));
                        }
                        Some(Err(e)) => return Some((Err(e), (body, At::Over))),
                        Some(Ok(c)) => c,
                    };
                    let n = chunk.len() as u64;
                    if skip >= n {
                        skip -= n;
                        continue;
                    }
                    let mut part = chunk.split_off(skip as usize);
                    let extra = part.len() as u64 > take;
                    if extra {
                        part.truncate(take as usize);
                    }
                    let left = take - part.len() as u64;
                    let next = if left == 0 {
                        At::Past { extra }
                    } else {
                        At::Cutting {
                            skip: 0,
                            take: left,
                        }
                    };
                    return Some((Ok(part), (body, next)));
                },
            }
        },
    ))
}

/// `body`, failing with [`io::ErrorKind::TimedOut`] when the store sends nothing for `idle`
/// while it is being read: a connection gone quiet rather than closed would otherwise hold its
/// reader (and every request waiting on the same load) until the client gives up. Time spent
/// while nobody reads (a slow client downstream) does not count.
pub fn idle_limited(body: ByteStream, idle: Duration, what: String) -> ByteStream {
    Box::pin(IdleLimited {
        body,
        idle,
        quiet: None,
        what,
    })
}

struct IdleLimited {
    body: ByteStream,
    idle: Duration,
    /// Runs from the first poll that found nothing; cleared by each chunk.
    quiet: Option<Pin<Box<tokio::time::Sleep>>>,
    what: String,
}

impl Stream for IdleLimited {
    type Item = io::Result<Bytes>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(item) = this.body.as_mut().poll_next(cx) {
            this.quiet = None;
            return Poll::Ready(item);
        }
        let idle = this.idle;
        let quiet = this
            .quiet
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match quiet.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                this.quiet = None;
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{}: the store sent nothing for {} s",
                        this.what,
                        idle.as_secs()
                    ),
                ))))
            }
        }
    }
}

tokio::task_local! {
    /// True while an upload is served ([`serving_upload`]), false within [`not_for_upload`].
    static UPLOAD: bool;
}

/// Runs `f` as the serving of an upload (a client's PUT): a store's request made within it
/// that could not connect (the store restarting) is made again for seconds, as writes always
/// are, instead of failing at once. Nix 2.8 retries a PUT that failed without its body, which
/// fails its copy; a GET that fails, it retries itself. Tasks `f` spawns are outside it.
pub async fn serving_upload<F: std::future::Future>(f: F) -> F::Output {
    UPLOAD.scope(true, f).await
}

/// Runs `f` as no upload's, within one ([`serving_upload`]): its store requests fail at once
/// when they could not connect (the caller waits for the store its own way).
pub async fn not_for_upload<F: std::future::Future>(f: F) -> F::Output {
    UPLOAD.scope(false, f).await
}

/// Whether the caller serves an upload ([`serving_upload`]).
pub fn for_upload() -> bool {
    UPLOAD.try_with(|&serving| serving).unwrap_or(false)
}

/// `tokio::spawn`, the task serving an upload if the caller does ([`serving_upload`]).
pub fn spawn_serving<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    if for_upload() {
        tokio::spawn(serving_upload(f))
    } else {
        tokio::spawn(f)
    }
}

#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// The store could not be reached (connection refused, DNS, TLS, timeout).
    #[error("store unreachable: {0}")]
    Unavailable(String),
    /// The store did not answer within the configured timeout.
    #[error("store timed out after {0} s")]
    Timeout(u64),
    /// Not in the store, and no upstream cache had it while one of them could not be asked:
    /// what it would have answered is unknown. A NAR's GET is then a 503 (its narinfo was
    /// served, and Nix retries); a lookup's (a log, a listing, a realisation) a 404 not to
    /// be kept, as a narinfo's is.
    #[error("not in the store, and {0}")]
    UpstreamDown(String),
    /// The store refused our credentials or the bucket does not exist: a misconfiguration.
    #[error("store misconfigured: {0}")]
    Misconfigured(String),
    /// The requested range lies outside the object.
    #[error("range not satisfiable (object has {size} bytes)")]
    RangeNotSatisfiable { size: u64 },
    /// An object is larger than the caller accepts.
    #[error("object {key} is larger than {limit} bytes")]
    TooLarge { key: String, limit: u64 },
    /// An object cellar reads itself (a narinfo, a record, a pin) is stored with a
    /// `Content-Encoding` it cannot decode (one it does not know, or a body that does not
    /// decode as the coding says); `why` says which, completing the sentence.
    #[error("{key} is stored with Content-Encoding {encoding}, {why}")]
    Encoded {
        key: String,
        encoding: String,
        why: String,
    },
    /// A NAR named after its bytes whose store copy has another size than its narinfo's
    /// `FileSize`: truncated (a copy into the bucket cut short) or foreign. Served, it would
    /// fail every client; its narinfo then answers 404 so that a builder's next copy stores
    /// the NAR over it ([`crate::cache::missing_nars`]).
    #[error("{key} has {got} bytes, its narinfo's FileSize says {expected}")]
    WrongSize {
        key: String,
        got: u64,
        expected: u64,
    },
    /// Any other failure of the store (an unexpected S3 error, a local I/O error).
    #[error("store error: {0}")]
    Other(String),
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        Self::Other(e.to_string())
    }
}

impl StoreError {
    /// The body of `key` failed while it was read, after the store had answered: the
    /// connection broke or went quiet (a restart of the store, a reset), which is as
    /// transient as a failure before the answer, so [`StoreError::Unavailable`] (a 503 the
    /// client retries). Only a body that is wrong in itself ([`io::ErrorKind::InvalidData`]:
    /// longer than the store said) is [`StoreError::Other`], a broken answer (502).
    pub fn reading(key: &str, e: &io::Error) -> Self {
        let what = format!("reading {key}: {e}");
        match e.kind() {
            io::ErrorKind::InvalidData => Self::Other(what),
            _ => Self::Unavailable(what),
        }
    }
}

/// A byte range of a GET, as parsed from a single-range `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=start-` or `bytes=start-end` (inclusive).
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Parses a `Range` header; `None` for anything but one byte range (multi-range requests
    /// get the whole object, which HTTP allows).
    pub fn parse_header(v: &str) -> Option<Self> {
        let spec = v.trim().strip_prefix("bytes=")?;
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let (a, b) = (a.trim(), b.trim());
        if a.is_empty() {
            // `bytes=-0` is a range, one no object satisfies (RFC 9110, 14.1.1): a 416.
            return Some(Self::Suffix(b.parse().ok()?));
        }
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            None
        } else {
            let e: u64 = b.parse().ok()?;
            if e < start {
                return None;
            }
            Some(e)
        };
        Some(Self::From { start, end })
    }

    /// The inclusive byte span within an object of `size` bytes, or `None` if unsatisfiable.
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            Self::From { start, end } => {
                if start >= size {
                    return None;
                }
                Some((start, end.map_or(size - 1, |e| e.min(size - 1))))
            }
            Self::Suffix(n) => {
                if size == 0 || n == 0 {
                    return None;
                }
                Some((size.saturating_sub(n), size - 1))
            }
        }
    }

    pub fn to_header(self) -> String {
        match self {
            Self::From { start, end: None } => format!("bytes={start}-"),
            Self::From {
                start,
                end: Some(e),
            } => format!("bytes={start}-{e}"),
            Self::Suffix(n) => format!("bytes=-{n}"),
        }
    }
}

/// The span of a partial body: `Content-Range: bytes start-end/total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub start: u64,
    pub end: u64,
    pub total: u64,
}

impl ContentRange {
    /// Parses `bytes 0-99/1234` (what S3 and HTTP servers send with a 206). A span that is
    /// not inside the total (`bytes 5-2/10`, `bytes 0-99/50`) or a total left unknown
    /// (`bytes 0-99/*`) is `None`: no part can be served, or cut, from what it says.
    pub fn parse_header(v: &str) -> Option<Self> {
        let rest = v.strip_prefix("bytes ")?;
        let (span, total) = rest.split_once('/')?;
        let (s, e) = span.split_once('-')?;
        let r = Self {
            start: s.parse().ok()?,
            end: e.parse().ok()?,
            total: total.parse().ok()?,
        };
        (r.start <= r.end && r.end < r.total).then_some(r)
    }
}

/// One object as a listing reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key relative to the store root (what [`Store::get`] takes).
    pub key: String,
    pub size: u64,
    /// When the object was last written (S3 `LastModified`, a file's mtime).
    pub modified: SystemTime,
}

/// A streamed listing. Pages are fetched as the stream is polled, so a listing of a huge bucket
/// holds about one page in memory, whatever the caller does with the items.
pub type ObjectList = Pin<Box<dyn Stream<Item = Result<ObjectInfo, StoreError>> + Send + 'static>>;

/// An object being read.
pub struct Object {
    pub body: ByteStream,
    /// Length of `body` in bytes, when it is known: an upstream cache may stream an object
    /// without saying its length (nix-serve does so for NARs). Always known for the stores.
    pub length: Option<u64>,
    /// Set when a range was requested and honoured.
    pub range: Option<ContentRange>,
    /// How the body is encoded (`Content-Encoding`), if it is: Nix's S3 store writes logs and
    /// listings compressed this way with `log-compression`/`ls-compression` (cache.nixos.org's
    /// are Brotli), and a client reading them through cellar must be told, as it decodes them.
    pub encoding: Option<String>,
}

/// A `Content-Encoding` worth passing on: not empty, not `identity`, a valid header value.
/// `aws-chunked` is left out: it names how an upload was framed, not how the object is
/// encoded, and some S3 servers store it with the object (Ceph RGW before its fix, versitygw);
/// a client told it fails to decode the body.
pub fn content_encoding(v: Option<&str>) -> Option<String> {
    let v = v?.trim();
    let valid = v.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    let codings: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|c| {
            !c.is_empty()
                && !c.eq_ignore_ascii_case("identity")
                && !c.eq_ignore_ascii_case("aws-chunked")
        })
        .collect();
    (valid && !codings.is_empty()).then(|| codings.join(", "))
}

impl Object {
    /// `data`, or the part of it `range` asks for.
    pub fn from_bytes(data: Bytes, range: Option<ByteRange>) -> Result<Self, StoreError> {
        let size = data.len() as u64;
        let (data, range) = match range {
            None => (data, None),
            Some(r) => {
                let (s, e) = r
                    .resolve(size)
                    .ok_or(StoreError::RangeNotSatisfiable { size })?;
                (
                    data.slice(s as usize..=e as usize),
                    Some(ContentRange {
                        start: s,
                        end: e,
                        total: size,
                    }),
                )
            }
        };
        Ok(Self {
            length: Some(data.len() as u64),
            body: Box::pin(futures::stream::once(async move { Ok(data) })),
            range,
            encoding: None,
        })
    }
}

/// An object being written. Nothing is visible under its key until [`ObjectWriter::commit`]
/// succeeds; an aborted or dropped writer leaves nothing visible (an S3 multipart upload is
/// aborted, a local temporary file removed).
#[async_trait]
pub trait ObjectWriter: Send {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError>;
    /// Makes the object visible under its key, atomically.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
    async fn abort(self: Box<Self>);
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Opens an object for reading; `Ok(None)` if it does not exist.
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Option<Object>, StoreError>;

    /// The size of an object, or `Ok(None)` if it does not exist.
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError>;

    /// Checks that the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Starts writing `key`; the object appears only when the writer commits.
    async fn writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError>;

    /// Removes what writers that never committed left behind (S3 multipart uploads, temporary
    /// files) once older than `older_than`. Returns how many were removed.
    async fn cleanup_staging(&self, older_than: Duration) -> Result<usize, StoreError>;

    /// Removes what the writers still open staged (S3 multipart uploads, temporary files), for
    /// a shutdown that cuts their uploads off: the tasks that would remove it as the writers
    /// are dropped do not outlive the runtime. How many there were.
    async fn remove_unfinished(&self) -> usize {
        0
    }

    /// Names what writers that never committed left behind and is older than `older_than`
    /// (what [`Store::cleanup_staging`] would remove), for `cellar verify`.
    async fn stale_staging(&self, older_than: Duration) -> Result<Vec<String>, StoreError>;

    /// Every committed object whose key starts with `prefix`, in no particular order. Never
    /// lists what writers are still staging.
    fn list(&self, prefix: &str) -> ObjectList;

    /// [`Store::list`], of the objects whose key also sorts after `after` (byte order): a
    /// store that can start a listing at a key (S3's `StartAfter`) skips the rest unread.
    fn list_after(&self, prefix: &str, after: &str) -> ObjectList {
        use futures::{StreamExt as _, TryStreamExt as _};
        let after = after.to_owned();
        self.list(prefix)
            .try_filter(move |o| futures::future::ready(o.key > after))
            .boxed()
    }

    /// Removes an object; removing one that does not exist is not an error (two garbage
    /// collectors, or a retried delete, must not fail each other).
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Writes a whole small object.
    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let mut w = self.writer(key).await?;
        if let Err(e) = w.write(data).await {
            w.abort().await;
            return Err(e);
        }
        w.commit().await
    }

    /// A short description for logs (`s3://bucket/prefix at endpoint`, `file:///dir`).
    fn describe(&self) -> String;

    /// Whether GETs of large NARs are to be answered with [`Store::presigned_get`]'s URL.
    fn redirects_nars(&self) -> bool {
        false
    }

    /// A URL that lets its holder GET `key` from the store directly for a while, if this
    /// store makes them.
    async fn presigned_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let _ = key;
        Ok(None)
    }

    /// The store's time now, to compare the times of its objects with (see [`clock`]). For a
    /// store on this machine, this machine's time.
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    /// Reads a whole small object into memory, refusing objects over `limit` bytes.
    async fn get_bytes(&self, key: &str, limit: u64) -> Result<Option<Bytes>, StoreError> {
        use futures::TryStreamExt as _;
        let Some(obj) = self.get(key, None).await? else {
            return Ok(None);
        };
        if obj.length.is_some_and(|n| n > limit) {
            return Err(StoreError::TooLarge {
                key: key.to_owned(),
                limit,
            });
        }
        // Nix's `narinfo-compression` stores a narinfo compressed, saying how in its
        // `Content-Encoding`: decoded below, bounded by `limit` as stored and as decoded.
        let coding = match obj
            .encoding
            .as_deref()
            .map(Compression::from_content_encoding)
        {
            None => None,
            Some(Ok(c)) => c,
            Some(Err(encoding)) => {
                return Err(StoreError::Encoded {
                    key: key.to_owned(),
                    encoding,
                    why: "which cellar does not decode".to_owned(),
                })
            }
        };
        let mut buf = Vec::with_capacity(obj.length.unwrap_or(0).min(limit) as usize);
        let mut body = obj.body;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| StoreError::reading(key, &e))?
        {
            if (buf.len() + chunk.len()) as u64 > limit {
                return Err(StoreError::TooLarge {
                    key: key.to_owned(),
                    limit,
                });
            }
            buf.extend_from_slice(&chunk);
        }
        match coding {
            None => Ok(Some(Bytes::from(buf))),
            Some(c) => decoded(key, c, buf, limit).await.map(Some),
        }
    }
}

/// What an xz-compressed object cellar reads itself may ask of memory to be decoded: xz -9's
/// dictionary and then some, never touched by a small object (the dictionary is only written
/// as far as the object goes).
const DECODE_XZ_MEMORY: u64 = 128 << 20;

/// `data` (of `key`) decoded from `c`, at most `limit` bytes of it.
pub(crate) async fn decoded(
    key: &str,
    c: Compression,
    data: Vec<u8>,
    limit: u64,
) -> Result<Bytes, StoreError> {
    use std::io::Read as _;
    let out = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        c.decoder(&data[..], DECODE_XZ_MEMORY)?
            .take(limit.saturating_add(1))
            .read_to_end(&mut out)?;
        Ok(out)
    })
    .await
    .map_err(|e| StoreError::Other(format!("decoding {key}: {e}")))?
    .map_err(|e| StoreError::Encoded {
        key: key.to_owned(),
        encoding: c.as_str().to_owned(),
        why: format!("which it does not decode as: {e}"),
    })?;
    if out.len() as u64 > limit {
        return Err(StoreError::TooLarge {
            key: key.to_owned(),
            limit,
        });
    }
    Ok(Bytes::from(out))
}

/// The bytes of the narinfo stored for `h`, at most [`MAX_NARINFO_BYTES`]. `limit` bounds the
/// read as a whole: a store that stalls mid-body is unavailable, not a hung request.
pub async fn narinfo_bytes(
    store: &dyn Store,
    h: StorePathHash,
    limit: Option<Duration>,
) -> Result<Option<Bytes>, StoreError> {
    let key = object_key::narinfo(h);
    let read = store.get_bytes(&key, MAX_NARINFO_BYTES);
    match limit {
        Some(limit) => tokio::time::timeout(limit, read)
            .await
            .map_err(|_| StoreError::Timeout(limit.as_secs()))?,
        None => read.await,
    }
}

/// The narinfo stored for `h`, parsed and checked to be `h`'s (see [`narinfo_bytes`]); one
/// that is not is a corrupt object, not a missing one.
pub async fn stored_narinfo(
    store: &dyn Store,
    h: StorePathHash,
    store_dir: &str,
    limit: Option<Duration>,
) -> Result<Option<NarInfo>, crate::error::Error> {
    let Some(raw) = narinfo_bytes(store, h, limit).await? else {
        return Ok(None);
    };
    NarInfo::parse_for(&raw, store_dir, h)
        .map(Some)
        .map_err(|reason| crate::error::Error::BadObject {
            key: object_key::narinfo(h),
            reason,
        })
}

/// The one place that turns validated names into object keys (relative to the store root).
pub mod object_key {
    use crate::nix::{
        DebugInfoName, NarFileName, OutputName, RealisationName, StorePathBaseName, StorePathHash,
    };

    pub fn narinfo(h: StorePathHash) -> String {
        format!("{h}.narinfo")
    }
    pub fn listing(h: StorePathHash) -> String {
        format!("{h}.ls")
    }
    pub fn nar(f: &NarFileName) -> String {
        format!("nar/{f}")
    }
    /// The reverse of [`nar`]: the NAR a key names, `None` if it names none.
    pub fn nar_file(key: &str) -> Option<NarFileName> {
        key.strip_prefix("nar/")?.parse().ok()
    }
    pub fn log(drv: &StorePathBaseName) -> String {
        format!("log/{drv}")
    }
    pub fn debuginfo(name: &DebugInfoName) -> String {
        format!("debuginfo/{name}")
    }
    pub fn realisation(r: &RealisationName) -> String {
        format!("realisations/{}", r.as_str())
    }
    pub fn build_trace(drv: &StorePathBaseName, out: &OutputName) -> String {
        format!("build-trace/{drv}/{}", out.as_str())
    }
    /// Nix 2.35's layout.
    pub fn build_trace_v2(drv: &StorePathBaseName, out: &OutputName) -> String {
        format!("build-trace-v2/{drv}/{}.doi", out.as_str())
    }
}

/// Opens the store `[store]` names; a local directory is created if missing.
pub async fn open(cfg: &crate::config::StoreConfig) -> io::Result<std::sync::Arc<dyn Store>> {
    open_as(cfg, true).await
}

/// Opens the store `[store]` names; a local directory must exist (see
/// [`local::LocalStore::open_existing`]).
pub async fn open_existing(
    cfg: &crate::config::StoreConfig,
) -> io::Result<std::sync::Arc<dyn Store>> {
    open_as(cfg, false).await
}

async fn open_as(
    cfg: &crate::config::StoreConfig,
    create: bool,
) -> io::Result<std::sync::Arc<dyn Store>> {
    use crate::config::StoreBackend;
    Ok(match &cfg.backend {
        StoreBackend::Local(l) if create => std::sync::Arc::new(local::LocalStore::open(&l.path)?),
        StoreBackend::Local(l) => std::sync::Arc::new(local::LocalStore::open_existing(&l.path)?),
        StoreBackend::S3(s3) => std::sync::Arc::new(s3::S3Store::new(s3, cfg.timeout).await),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that broke off or went quiet is the store unavailable (503, retried); a body
    /// longer than the store said is a broken answer (502).
    #[test]
    fn a_failed_body_is_unavailable_unless_it_is_wrong_in_itself() {
        let reset = io::Error::other("connection reset");
        let quiet = io::Error::new(io::ErrorKind::TimedOut, "nothing for 30 s");
        for e in [reset, quiet] {
            let got = StoreError::reading("k.narinfo", &e);
            assert!(
                matches!(&got, StoreError::Unavailable(m) if m.starts_with("reading k.narinfo: ")),
                "{got:?}"
            );
        }
        let long = io::Error::new(io::ErrorKind::InvalidData, "the body goes on");
        let got = StoreError::reading("k.narinfo", &long);
        assert!(matches!(got, StoreError::Other(_)), "{got:?}");
    }

    #[test]
    fn range_parsing() {
        assert_eq!(
            ByteRange::parse_header("bytes=0-99"),
            Some(ByteRange::From {
                start: 0,
                end: Some(99)
            })
        );
        assert_eq!(
            ByteRange::parse_header("bytes=100-"),
            Some(ByteRange::From {
                start: 100,
                end: None
            })
        );
        assert_eq!(
            ByteRange::parse_header("bytes=-5"),
            Some(ByteRange::Suffix(5))
        );
        assert_eq!(
            ByteRange::parse_header("bytes=5-5"),
            Some(ByteRange::From {
                start: 5,
                end: Some(5)
            }),
            "one byte"
        );
        for bad in [
            "bytes=5-1",
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=x-",
            "bytes=-",
        ] {
            assert_eq!(ByteRange::parse_header(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_real_content_encodings_are_passed_on() {
        assert_eq!(content_encoding(Some(" br ")), Some("br".to_owned()));
        assert_eq!(content_encoding(Some("xz")), Some("xz".to_owned()));
        assert_eq!(
            content_encoding(Some("gzip,aws-chunked")),
            Some("gzip".to_owned())
        );
        assert_eq!(
            content_encoding(Some("gzip, br")),
            Some("gzip, br".to_owned())
        );
        for plain in [
            None,
            Some(""),
            Some("identity"),
            Some("IDENTITY"),
            Some("aws-chunked"),
            Some(" AWS-CHUNKED , identity"),
            Some("a\u{7f}b"),
        ] {
            assert_eq!(content_encoding(plain), None, "{plain:?}");
        }
    }

    #[tokio::test]
    async fn a_range_is_cut_from_a_whole_body() {
        use futures::StreamExt as _;
        let chunks = ["abc", "defg", "", "hij"];
        let whole = || -> ByteStream {
            Box::pin(futures::stream::iter(
                chunks.map(|c| Ok(Bytes::from_static(c.as_bytes()))),
            ))
        };
        let cut = |skip, take| async move {
            let parts: Vec<io::Result<Bytes>> = byte_slice(whole(), skip, take).collect().await;
            parts
        };
        let text = |parts: Vec<io::Result<Bytes>>| {
            parts
                .into_iter()
                .map(|p| String::from_utf8(p.unwrap().to_vec()).unwrap())
                .collect::<String>()
        };
        assert_eq!(text(cut(0, 10).await), "abcdefghij");
        assert_eq!(text(cut(2, 3).await), "cde");
        assert_eq!(text(cut(3, 4).await), "defg");
        assert_eq!(text(cut(9, 1).await), "j");
        assert!(cut(0, 0).await.is_empty());
        let short = cut(8, 5).await;
        assert_eq!(short.len(), 2, "the bytes there are, then an error");
        assert!(short[1].is_err());
        // To the end: the body must end there.
        let to_end = |skip, take| async move {
            let parts: Vec<io::Result<Bytes>> =
                byte_slice_to_end(whole(), skip, take).collect().await;
            parts
        };
        assert_eq!(text(to_end(7, 3).await), "hij");
        assert_eq!(text(to_end(0, 10).await), "abcdefghij");
        let mut long = to_end(5, 3).await;
        assert!(
            long.pop().unwrap().is_err(),
            "the bytes asked for, then an error"
        );
        assert_eq!(text(long), "fgh");
        let long = to_end(0, 0).await;
        assert!(long.len() == 1 && long[0].is_err(), "{long:?}");
    }

    #[test]
    fn range_resolution() {
        let r = |s| ByteRange::parse_header(s).unwrap();
        assert_eq!(r("bytes=0-99").resolve(50), Some((0, 49)));
        assert_eq!(r("bytes=10-").resolve(50), Some((10, 49)));
        assert_eq!(r("bytes=-10").resolve(50), Some((40, 49)));
        assert_eq!(r("bytes=-100").resolve(50), Some((0, 49)));
        assert_eq!(r("bytes=50-").resolve(50), None);
        assert_eq!(r("bytes=-1").resolve(0), None);
        assert_eq!(r("bytes=-0").resolve(50), None, "no byte of it");
    }

    /// A body that goes quiet fails after the idle limit; one whose reader goes away after
    /// finding nothing (to write to a slow disk, say) gets what arrived meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_body_fails_after_the_idle_limit() {
        use futures::{FutureExt as _, StreamExt as _};
        let idle = Duration::from_secs(30);
        let chunk = || Ok::<_, io::Error>(Bytes::from_static(b"x"));
        let quiet: ByteStream =
            Box::pin(futures::stream::iter([chunk()]).chain(futures::stream::pending()));
        let mut body = idle_limited(quiet, idle, "nar/x.nar".into());
        assert!(body.next().await.unwrap().is_ok());
        let started = tokio::time::Instant::now();
        // A guard on the virtual clock: without the limit nothing else would end the wait.
        let next = tokio::time::timeout(Duration::from_secs(3600), body.next());
        let e = next
            .await
            .expect("the body waited on")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("nar/x.nar"), "{e}");
        assert_eq!(started.elapsed(), idle);

        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut body = idle_limited(Box::pin(rx), idle, "nar/y.nar".into());
        assert!(body.next().now_or_never().is_none(), "nothing yet");
        tx.unbounded_send(chunk()).unwrap();
        tokio::time::sleep(idle * 2).await;
        assert!(
            body.next().await.unwrap().is_ok(),
            "a slow reader is not a quiet store"
        );
        drop(tx);
        assert!(body.next().await.is_none());
    }
}
