//! Fills: one download per NAR, shared by every reader that asks while it runs.
//!
//! The first miss on a NAR puts a cell in `NarCache::fills`; everyone asking for that NAR
//! meanwhile waits on the same cell, so N concurrent misses cost one store GET. Once the
//! store's answer is in, the cell says how to serve it:
//! - a large NAR is streamed into a temporary file by a background task, and each reader tails
//!   that file as it grows ([`tail`]), so nobody waits for the whole NAR; the last chunks
//!   received stay in memory too, so a reader keeping up with the fill (the usual case: the one
//!   client that missed) is handed them as they arrive, without waiting for them to be written
//!   or reading the file back (the file is written beside it, off the client's path);
//! - a small one is read whole and served from memory while its file is written in the
//!   background (tailing a file costs small NARs more than it saves);
//! - one the cache cannot take (too large for the budget, disk full, every fill running) is
//!   streamed to the first reader without a file: as the store opened it if that was one
//!   request, else opened again plainly, so that it holds none of the fills' part buffers.
//!
//! A reader of a fill that fails gets a stream error, so its client sees a failed transfer,
//! never a short body.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::{watch, OnceCell};

use super::disk::{Checksummer, TempFile, WriteError};
use super::index::Verified;
use super::{lock, NarCache, NarCacheAnswer};
use crate::nix::NarFileName;
use crate::store::{ByteRange, ByteStream, Object, Store, StoreError};

/// How much a reader reads at a time, and how much a fill buffers before it must write.
const READ_CHUNK: u64 = 1 << 20;
/// NARs up to this size are read whole on a miss instead of being tailed through a file.
const SMALL: u64 = 1 << 20;
/// With less than this buffered and nothing more ready from the store, a fill waits up to
/// `BATCH_WAIT` for more before it writes, so that the file is written in large blocks.
const BATCH: usize = 256 << 10;
const BATCH_WAIT: Duration = Duration::from_millis(3);
/// The last bytes a fill received that its readers get from memory, not from the file.
const RECENT: usize = 2 << 20;
/// Blocks read from the store and waiting to be written to the file, at most.
const WRITES_AHEAD: usize = 2;
/// A fill reads a large NAR in parts of this size: the first as it arrives, the next ones
/// [`PARTS_AHEAD`] at a time in parallel behind it, each a ranged GET. One connection to S3
/// goes at the store's pace for one stream; several go faster (measured on Garage: ~290 MiB/s
/// on one connection, ~440 on several).
pub(super) const PART: u64 = 4 << 20;
const PARTS_AHEAD: usize = 3;
/// Times a part is asked for before its fill fails, [`retry_wait`] apart.
pub(super) const PART_ATTEMPTS: usize = 5;

/// How long a part's read waits before its `attempt`th try (2, 3, …): not at all for the
/// second (a connection dropped once), then 0.5 s, twice as long each time after, 3.5 s over
/// [`PART_ATTEMPTS`]. Asked again at once every time, a store that refuses connections for a
/// moment (restarting, a node of a cluster going down) failed every try within 200 ms,
/// cutting off every download reading that NAR; Nix's resumption then met the same outage.
fn retry_wait(attempt: usize) -> Duration {
    match attempt {
        0..=2 => Duration::ZERO,
        n => Duration::from_millis(500 << (n - 3).min(5)),
    }
}
/// Parts fetched ahead or waiting to be taken, over all fills at once (the memory they hold).
/// A part finding none free is not fetched ahead but read when its fill gets there, streamed
/// like the first: fills of a slow source holding every one leave the others slower, not
/// stalled.
pub(super) const PARTS_IN_MEMORY: usize = 8;
/// Large NARs written to disk at once. A fill runs on after the request that started it has
/// gone (for the next one), so without a bound a client starting downloads of many NARs and
/// dropping them would hold that many store connections and write buffers; beyond it, NARs
/// stream from the store for as long as their request lasts and are not kept.
pub(super) const MAX_RUNNING: usize = 32;
/// Fills running beyond which a prefetch starts none: the rest are kept for clients' own
/// requests. A prefetch's fill outlives its hold ([`PREFETCH_HOLD`]), so over a slow
/// upstream the prefetches of a closure's large NARs alone could take every fill, and a
/// client's miss of another NAR was then streamed uncached (each concurrent request for it
/// reading the store on its own).
pub(super) const PREFETCH_RUNNING_MAX: usize = MAX_RUNNING / 2;
/// How long a prefetch waits for the fill it started before it gives its slot back to the
/// next one (the fill goes on).
pub(super) const PREFETCH_HOLD: Duration = Duration::from_secs(10);

/// How a fill's store answer is served; what its cell holds once set.
pub(super) enum Started {
    Filling(Arc<FillHandle>),
    /// A small NAR, read whole: served from memory while its file is written.
    Small(Bytes),
    NotFound,
    /// Not cacheable now (too large, disk full, cache error): serve from the store directly.
    /// The object already opened is handed to the first request that takes it.
    Bypass(Mutex<Option<Object>>),
    Failed(StoreError),
}

fn bypass(obj: Object) -> Started {
    Started::Bypass(Mutex::new(Some(obj)))
}

/// `key` opened with one plain GET, for a NAR served without a fill. Not through
/// [`open_in_parts`]: its parts hold the fills' shared part buffers until they are read, and a
/// client reading slowly (or not at all) would hold them, stalling every fill.
async fn plain(store: &Arc<dyn Store>, key: &str) -> Started {
    match store.get(key, None).await {
        Ok(Some(obj)) => bypass(obj),
        Ok(None) => Started::NotFound,
        Err(e) => Started::Failed(e),
    }
}

/// `obj`, opened in parts, served without a fill: opened again plainly ([`plain`]) if it has
/// parts beyond the first, so that it holds none of the shared part buffers.
async fn unfilled(obj: Object, store: &Arc<dyn Store>, key: &str) -> Started {
    if obj.length.is_some_and(|n| n > PART) {
        drop(obj);
        return plain(store, key).await;
    }
    bypass(obj)
}

/// How far a fill got, as its readers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// `received` bytes came from the store (the last [`RECENT`] of them are in memory, see
    /// [`FillHandle::recent_at`]), `written` of them are in the file: readers may read either.
    /// The last bytes are announced only with `Done`, after the fill's checks.
    Filling {
        received: u64,
        written: u64,
    },
    Done,
    Failed,
    /// The fill could not write its file (a full disk, an I/O error), while the store was
    /// fine: readers read the rest from the store ([`FillHandle::source`]).
    Unwritten,
}

/// Where a fill reads its NAR from, for readers to read the rest from when the fill could
/// not write it.
pub(super) struct Source {
    store: Arc<dyn Store>,
    key: Arc<str>,
    idle: Duration,
}

/// A fill in progress: a read handle on its temporary file and how far the writer got.
pub(super) struct FillHandle {
    file: Arc<std::fs::File>,
    size: u64,
    progress: watch::Receiver<Progress>,
    /// The last chunks received (at most [`RECENT`] bytes), by offset.
    recent: Mutex<VecDeque<(u64, Bytes)>>,
    /// Of [`NarCache::reserved`], what this fill has not written yet.
    unwritten: std::sync::atomic::AtomicU64,
    /// The NAR in the store, if the readers may read the rest there (see [`tail`]).
    source: Option<Source>,
    /// Reads that went to the file (for tests: who was served from memory).
    #[cfg(test)]
    file_reads: std::sync::atomic::AtomicUsize,
}

impl FillHandle {
    /// Keeps `data`, received for `offset`, for readers at the head of the fill.
    fn keep(&self, offset: u64, data: Bytes) {
        let mut recent = lock(&self.recent);
        recent.push_back((offset, data));
        // Offsets grow: the bytes held are from the first chunk's offset to the end.
        while let (Some((first, _)), Some((last, b))) = (recent.front(), recent.back()) {
            if last + b.len() as u64 - first <= RECENT as u64 || recent.len() == 1 {
                break;
            }
            recent.pop_front();
        }
    }

    /// Waits for the fill to end: "loaded" or "failed".
    async fn finished(&self) -> &'static str {
        let mut rx = self.progress.clone();
        loop {
            match *rx.borrow_and_update() {
                Progress::Done => return "loaded",
                Progress::Failed | Progress::Unwritten => return "failed",
                Progress::Filling { .. } => {}
            }
            if rx.changed().await.is_err() {
                return "failed";
            }
        }
    }

    /// The bytes from `pos` up to `end` (exclusive) that are still in memory, if `pos` is.
    fn recent_at(&self, pos: u64, end: u64) -> Option<Bytes> {
        let recent = lock(&self.recent);
        let (start, b) = recent
            .iter()
            .find(|(start, b)| *start <= pos && pos < start + b.len() as u64)?;
        let from = (pos - start) as usize;
        let to = (end - start).min(b.len() as u64) as usize;
        Some(b.slice(from..to))
    }
}

/// Why a fill stopped before its file was complete.
#[derive(Debug)]
enum FillError {
    Write(WriteError),
    /// No chunk from the store within the idle timeout.
    StoreStalled(Duration),
    StoreFailed(io::Error),
    /// The store's body ended before (or went past) the length it announced.
    Short {
        written: u64,
        expected: u64,
    },
    /// Its bytes are not what its narinfo's `FileHash` says.
    WrongBytes(String),
}

impl From<WriteError> for FillError {
    fn from(e: WriteError) -> Self {
        Self::Write(e)
    }
}

impl fmt::Display for FillError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Write(e) => fmt::Display::fmt(e, f),
            Self::StoreStalled(t) => {
                write!(f, "the store sent nothing for {} s mid-body", t.as_secs())
            }
            Self::StoreFailed(e) => write!(f, "the store failed mid-body: {e}"),
            Self::Short { written, expected } => write!(
                f,
                "the store sent {written} bytes where it announced {expected}"
            ),
            Self::WrongBytes(why) => f.write_str(why),
        }
    }
}

impl NarCache {
    /// Serves a miss through the one fill of `name`, starting it if none is running; with
    /// how the lookup counts: a `miss` if it is served through a fill (so kept), else a
    /// `bypass` (streamed from the store uncached: every fill busy, the disk full, the NAR
    /// too large for the cache, another size than its narinfo gives).
    pub(super) async fn through_fill(
        self: &Arc<Self>,
        name: &str,
        key: &str,
        announced: Option<u64>,
        store: &Arc<dyn Store>,
    ) -> (Result<NarCacheAnswer, StoreError>, &'static str) {
        // A fill of another size than the narinfo now gives (one that ended just now, of the
        // NAR it replaced) is not joined: the store is asked.
        let other_size = |size: u64| announced.is_some_and(|a| a != size);
        // What a NAR streamed from the store, not kept, is checked against as it is sent (as
        // a fill checks what it keeps).
        let said = self.file_hash_said(name).await;
        let answer = self.on_fill(name, key, announced, store, |started| match started {
            Started::Filling(h) if other_size(h.size) => Ok((NarCacheAnswer::Bypass, "bypass")),
            Started::Small(b) if other_size(b.len() as u64) => {
                Ok((NarCacheAnswer::Bypass, "bypass"))
            }
            Started::Filling(h) => Ok((
                NarCacheAnswer::Object(Object {
                    body: tail(h.clone()),
                    length: Some(h.size),
                    range: None,
                    encoding: None,
                }),
                "miss",
            )),
            Started::Small(b) => {
                let b = b.clone();
                Ok((
                    NarCacheAnswer::Object(Object {
                        length: Some(b.len() as u64),
                        body: futures::stream::once(async move { Ok(b) }).boxed(),
                        range: None,
                        encoding: None,
                    }),
                    "miss",
                ))
            }
            Started::NotFound => Ok((NarCacheAnswer::NotFound, "miss")),
            Started::Bypass(opened) => {
                let taken = lock(opened).take();
                let answer = taken.map_or(NarCacheAnswer::Bypass, |obj| {
                    NarCacheAnswer::Object(match said {
                        Some(said) => crate::cache::checked::checked(name, obj, said),
                        None => obj,
                    })
                });
                Ok((answer, "bypass"))
            }
            Started::Failed(e) => Err(e.clone()),
        });
        match answer.await {
            Some(Ok((answer, result))) => (Ok(answer), result),
            Some(Err(e)) => (Err(e), "miss"),
            // Its fill ended since the index was looked at.
            None => {
                let state = self.index().touch(name);
                match state {
                    Some((size, Verified::Yes)) => {
                        let answer = self.read_file(name, size, None).await;
                        // Counted as `read_hit` counts: a file gone since is a bypass.
                        let result = match answer {
                            Ok(NarCacheAnswer::Object(_)) => "hit",
                            _ => "bypass",
                        };
                        (answer, result)
                    }
                    _ => (Ok(NarCacheAnswer::Bypass), "bypass"),
                }
            }
        }
    }

    /// Fills the cache with `name` ahead of any request, unless it is on disk or on its way
    /// already, or would not be kept (`size` is what its narinfo says); returns once that fill
    /// is over, or has run for [`PREFETCH_HOLD`] ("started"), saying how it went (a metrics
    /// label).
    pub async fn prefetch(
        self: &Arc<Self>,
        name: &NarFileName,
        key: &str,
        size: u64,
        store: &Arc<dyn Store>,
    ) -> &'static str {
        if self.has(name) {
            return "cached";
        }
        if !self.index().admits(size) {
            return "skipped";
        }
        // No fill could start, or only one kept for clients: the store is not asked for a NAR
        // nobody would read (and no NAR is evicted for its room).
        if size > SMALL && self.running.load(Ordering::SeqCst) >= PREFETCH_RUNNING_MAX {
            return "skipped";
        }
        let reserved = self.reserved.load(Ordering::Relaxed);
        if self.no_room_off_worker(size, reserved).await {
            return "skipped";
        }
        let filling = self
            .on_fill(
                name.as_str(),
                key,
                Some(size),
                store,
                |started| match started {
                    Started::Filling(h) => Ok(Some(h.clone())),
                    Started::Small(_) => Ok(None),
                    Started::NotFound => Err("absent"),
                    // Opened for nobody: dropped.
                    Started::Bypass(_) => Err("skipped"),
                    Started::Failed(_) => Err("failed"),
                },
            )
            .await;
        match filling {
            // The caller's prefetch slot is held only so long: a NAR a slow upstream trickles
            // in would otherwise keep it for the whole download, and the fills of NARs from a
            // fast store waited behind. The fill goes on (bounded by `MAX_RUNNING`).
            Some(Ok(Some(h))) => tokio::time::timeout(PREFETCH_HOLD, h.finished())
                .await
                .unwrap_or("started"),
            Some(Ok(None)) => "loaded",
            Some(Err(result)) => result,
            None => "cached",
        }
    }

    /// Runs `use_it` on the one fill of `name`, started if none is running, or returns `None`
    /// if none is and `name` is in the index (a fill that ended since the caller looked). A
    /// fill that did not start (nothing to tail) is forgotten after, so that the next request
    /// tries again.
    async fn on_fill<R>(
        self: &Arc<Self>,
        name: &str,
        key: &str,
        announced: Option<u64>,
        store: &Arc<dyn Store>,
        use_it: impl FnOnce(&Started) -> R,
    ) -> Option<R> {
        let cell = {
            let mut fills = lock(&self.fills);
            match fills.get(name) {
                Some(cell) => cell.clone(),
                // A fill indexes its NAR before it leaves `fills`, so one that is not there
                // any more is in the index. (Lock order: `fills`, then `index`.)
                None if self.index().contains(name) => return None,
                None => fills.entry(name.to_owned()).or_default().clone(),
            }
        };
        // If this request goes away before the fill has started, nobody else may be waiting:
        // the guard then removes the empty cell.
        let guard = CellGuard {
            cache: self,
            name,
            cell: &cell,
        };
        #[cfg(test)]
        self.at_fills.fetch_add(1, Ordering::SeqCst);
        let started = cell
            .get_or_init(|| {
                self.start_fill(name.to_owned(), key.to_owned(), announced, store.clone())
            })
            .await;
        drop(guard); // the cell is set now: the guard leaves it alone
        let running = matches!(started, Started::Filling(_) | Started::Small(_));
        let answer = use_it(started);
        if !running {
            self.forget_cell(name, &cell);
        }
        Some(answer)
    }

    /// Reads from the file so far by the readers of the running fill of `name`.
    #[cfg(test)]
    pub(super) fn fill_file_reads(&self, name: &str) -> Option<usize> {
        let cell = lock(&self.fills).get(name)?.clone();
        match cell.get()? {
            Started::Filling(h) => Some(h.file_reads.load(Ordering::SeqCst)),
            _ => None,
        }
    }

    fn forget_cell(&self, name: &str, cell: &Arc<OnceCell<Started>>) {
        let mut fills = lock(&self.fills);
        if fills.get(name).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            fills.remove(name);
        }
    }

    /// Opens `key` and starts its fill. `announced` is the NAR's size by its narinfo, if
    /// known: an object of another size is a 502 if its name is its hash (it is broken),
    /// else served but not kept (a NAR named after its store path, rebuilt); one whose source does not
    /// say its length (nix-serve, harmonia) is filled to that size (a body that ends before
    /// or goes past it fails the fill and its readers).
    async fn start_fill(
        self: &Arc<Self>,
        name: String,
        key: String,
        announced: Option<u64>,
        store: Arc<dyn Store>,
    ) -> Started {
        // Known not to be kept: streamed as is, without the fills' part buffers (and without
        // their resuming of a broken-off read: the client resumes with a range). Not the
        // free-space check, which would pause caching on a size the narinfo may have wrong.
        if let Some(size) = announced.filter(|&s| s > SMALL) {
            if !self.index().admits(size) || self.running.load(Ordering::SeqCst) >= MAX_RUNNING {
                return plain(&store, &key).await;
            }
        }
        let obj = match open_in_parts(&store, &key, &self.parts, self.idle_timeout).await {
            Ok(Some(o)) => o,
            Ok(None) => return Started::NotFound,
            Err(e) => return Started::Failed(e),
        };
        let length = match (obj.length, announced) {
            // Named after its bytes, it is broken (truncated, foreign): a 502, as from
            // memory, not served with a year's lifetime for proxies to keep.
            (Some(length), Some(size))
                if length != size && crate::cache::nar_memory::names_its_bytes(&name) =>
            {
                return Started::Failed(StoreError::WrongSize {
                    key: key.clone(),
                    got: length,
                    expected: size,
                });
            }
            (Some(length), Some(size)) if length != size => {
                tracing::warn!(nar = %name, length, file_size = size, "NAR cache: the NAR's size is not its narinfo's FileSize; served without caching");
                return unfilled(obj, &store, &key).await;
            }
            (Some(length), _) | (None, Some(length)) => length,
            (None, None) => {
                // Streamed by an upstream that did not say how long it is, and no narinfo
                // said it either: a fill needs the length for its space and its readers.
                tracing::debug!(nar = %name, "NAR cache: length unknown, streamed without a fill");
                return bypass(obj);
            }
        };
        if length <= SMALL {
            return self.start_small(name, length, obj).await;
        }
        let admitted = self.index().admits(length);
        // With every fill running, no NAR is evicted for the room of one that cannot start.
        let busy = self.running.load(Ordering::SeqCst) >= MAX_RUNNING;
        let reserved = self.reserved.load(Ordering::Relaxed);
        if !admitted || busy || self.no_room_off_worker(length, reserved).await {
            return unfilled(obj, &store, &key).await;
        }
        // Counted from here to the end of its task (no await point before it is spawned).
        if self.running.fetch_add(1, Ordering::SeqCst) >= MAX_RUNNING {
            self.running.fetch_sub(1, Ordering::SeqCst);
            tracing::debug!(nar = %name, "NAR cache: {MAX_RUNNING} fills running, streamed without one");
            return unfilled(obj, &store, &key).await;
        }
        let opened = self.disk.create_temp().and_then(|(tmp, writer)| {
            let reader = tmp.reader()?;
            Ok((tmp, writer, reader))
        });
        let (tmp, writer, reader) = match opened {
            Ok(files) => files,
            Err(e) => {
                self.running.fetch_sub(1, Ordering::SeqCst);
                self.write_failed(&name, &e);
                return unfilled(obj, &store, &key).await;
            }
        };
        let (tx, rx) = watch::channel(Progress::Filling {
            received: 0,
            written: 0,
        });
        let handle = Arc::new(FillHandle {
            file: Arc::new(reader),
            size: length,
            progress: rx,
            recent: Mutex::new(VecDeque::new()),
            unwritten: std::sync::atomic::AtomicU64::new(length),
            source: Some(Source {
                store: store.clone(),
                key: key.as_str().into(),
                idle: self.idle_timeout,
            }),
            #[cfg(test)]
            file_reads: std::sync::atomic::AtomicUsize::new(0),
        });
        let this = self.clone();
        let size = length;
        self.reserved.fetch_add(size, Ordering::Relaxed);
        let head = handle.clone();
        tokio::spawn(async move {
            let result = this.run_fill(&name, tmp, writer, obj, &tx, &head).await;
            let unwritten = head.unwritten.swap(0, Ordering::Relaxed);
            this.reserved.fetch_sub(unwritten, Ordering::Relaxed);
            this.running.fetch_sub(1, Ordering::SeqCst);
            match &result {
                Ok(()) => {}
                Err(FillError::Write(e)) => this.write_failed(&name, e),
                Err(e) => tracing::warn!(nar = %name, cause = %e, "NAR cache: fill failed"),
            }
            let _ = tx.send(match result {
                Ok(()) => Progress::Done,
                Err(FillError::Write(_)) => Progress::Unwritten,
                Err(_) => Progress::Failed,
            });
            lock(&this.fills).remove(&name);
            this.changed();
        });
        Started::Filling(handle)
    }

    async fn start_small(self: &Arc<Self>, name: String, expected: u64, obj: Object) -> Started {
        let read = async {
            let mut buf = Vec::with_capacity(expected as usize);
            let mut body = obj.body;
            // No further than one byte past: a source without a length may not end there.
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                let room = (expected as usize + 1).saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if buf.len() as u64 > expected {
                    break;
                }
            }
            Ok::<_, io::Error>(buf)
        };
        let data = match tokio::time::timeout(self.idle_timeout, read).await {
            Ok(Ok(d)) if d.len() as u64 == expected => Bytes::from(d),
            Ok(Ok(d)) => {
                let what = if (d.len() as u64) < expected {
                    "short"
                } else {
                    "long"
                };
                return Started::Failed(StoreError::Other(format!(
                    "{what} body for nar/{name}: {}{} of {expected} bytes",
                    d.len(),
                    if (d.len() as u64) > expected {
                        " or more"
                    } else {
                        ""
                    }
                )));
            }
            Ok(Err(e)) => return Started::Failed(StoreError::reading(&format!("nar/{name}"), &e)),
            Err(_) => return Started::Failed(StoreError::Timeout(self.idle_timeout.as_secs())),
        };
        if let Some(said) = self.file_hash_said(&name).await {
            let got = crate::nix::Sha256::digest(&data);
            if got != said {
                return Started::Failed(StoreError::Other(wrong_bytes(&name, got, said)));
            }
        }
        // The fill's cell (serving these bytes) stays until memory or the file holds them.
        let this = self.clone();
        let kept_data = data.clone();
        tokio::spawn(async move {
            let kept = match this.keep_small.get() {
                Some(keep) => keep(name.clone(), kept_data.clone()).await,
                None => false,
            };
            if kept {
                lock(&this.fills).remove(&name);
                return;
            }
            let _ = tokio::task::spawn_blocking(move || {
                this.store_small(&name, &kept_data);
                lock(&this.fills).remove(&name);
            })
            .await;
        });
        Started::Small(data)
    }

    /// The `FileHash` narinfos gave `name`, if the cache checks fills against them
    /// ([`NarCache::check_file_hashes_by`]) and one did.
    async fn file_hash_said(&self, name: &str) -> Option<crate::nix::Sha256> {
        let of = self.file_hash_of.get()?;
        of(name.to_owned()).await
    }

    /// Writes a small NAR's file and indexes it (best effort: a failure only means no caching).
    pub(super) fn store_small(self: &Arc<Self>, name: &str, data: &[u8]) {
        let size = data.len() as u64;
        let admitted = self.index().admits(size);
        if !admitted || self.disk_full(size) {
            return;
        }
        // Written outside the lock `add` takes: only the publish and the index wait on it.
        match self.disk.write_temp(data) {
            Ok((tmp, checksum)) => self.add(name, size, || {
                self.disk.publish(tmp, name, size, checksum)?;
                Ok(checksum)
            }),
            Err(e) => self.write_failed(name, &e),
        }
    }

    /// Copies the store's body into the temporary file; on success gives it its final name
    /// and indexes it. On failure the temporary file goes, and readers fail too.
    async fn run_fill(
        self: &Arc<Self>,
        name: &str,
        tmp: TempFile,
        file: std::fs::File,
        obj: Object,
        tx: &watch::Sender<Progress>,
        head: &FillHandle,
    ) -> Result<(), FillError> {
        let length = head.size;
        let file = Arc::new(file);
        // The store is read while the file is written: a block goes to the writer below once
        // complete and the next is read meanwhile (at most WRITES_AHEAD blocks wait), so a
        // fill goes at the pace of the slower of the two, not of both one after the other.
        // Readers get each chunk from memory as it arrives, before it is written. The flag
        // says whether readers may be told about the block once it is written.
        let (to_disk, blocks) = tokio::sync::mpsc::channel::<(Block, bool)>(WRITES_AHEAD);
        let write = async {
            // Owned, so that a failed write drops it and the read stops at its next send.
            let mut blocks = blocks;
            let mut written = 0u64;
            while let Some((data, announce)) = blocks.recv().await {
                #[cfg(test)]
                if written + data.len() as u64 > self.fail_writes_past.load(Ordering::SeqCst) {
                    let e = io::Error::other("a test's failed write");
                    return Err(WriteError::io("writing", tmp.path(), e));
                }
                let n = write_out(&tmp, &file, data).await?;
                written += n;
                // Written, so gone from the free space: no longer reserved.
                let left = head.unwritten.load(Ordering::Relaxed);
                head.unwritten
                    .store(left.saturating_sub(n), Ordering::Relaxed);
                self.reserved.fetch_sub(n.min(left), Ordering::Relaxed);
                if announce {
                    // Never the last byte: that waits for `Done`, after the length and
                    // checks (a source without a length may yet send one byte too many).
                    let shown = written.min(length.saturating_sub(1));
                    tx.send_modify(|p| {
                        if let Progress::Filling { written: w, .. } = p {
                            *w = shown;
                        }
                    });
                }
            }
            Ok::<u64, WriteError>(written)
        };
        // What its narinfo says its bytes hash to, if one said: checked before the last bytes
        // are told to readers and the file is kept.
        let expected = self.file_hash_said(name).await;
        let read = async {
            let mut hasher = Checksummer::default();
            let mut sha = expected.map(|_| <sha2::Sha256 as sha2::Digest>::new());
            let mut received = 0u64;
            let mut body = obj.body;
            let mut buf = Block::default();
            let mut waited = false;
            loop {
                // Take what the store has ready; hand it to the writer before waiting for
                // more, or once 1 MiB has piled up.
                let next = match body.next().now_or_never() {
                    Some(item) => item,
                    // Nothing ready, but little buffered: give the store a moment to send more,
                    // so the file is written in large blocks rather than one network read at a
                    // time.
                    None if !buf.is_empty() && buf.len() < BATCH && !waited => {
                        waited = true;
                        match tokio::time::timeout(BATCH_WAIT, body.next()).await {
                            Ok(item) => item,
                            Err(_) => continue, // then write what there is
                        }
                    }
                    None => {
                        if !buf.is_empty()
                            && to_disk
                                .send((std::mem::take(&mut buf), true))
                                .await
                                .is_err()
                        {
                            return Ok(None); // the writer failed
                        }
                        tokio::time::timeout(self.idle_timeout, body.next())
                            .await
                            .map_err(|_| FillError::StoreStalled(self.idle_timeout))?
                    }
                };
                waited = false;
                match next {
                    // Past its length (a source that gave none, held to its narinfo's size):
                    // failed now, not once the whole body is on disk.
                    Some(Ok(chunk)) if received + chunk.len() as u64 > length => {
                        return Err(FillError::Short {
                            written: received + chunk.len() as u64,
                            expected: length,
                        });
                    }
                    Some(Ok(chunk)) => {
                        hasher.update(&chunk);
                        if let Some(sha) = &mut sha {
                            sha2::Digest::update(sha, &chunk);
                        }
                        head.keep(received, chunk.clone());
                        received += chunk.len() as u64;
                        // The last bytes wait for `Done`, after the checks below.
                        if received < length {
                            tx.send_modify(|p| {
                                if let Progress::Filling { received: r, .. } = p {
                                    *r = received;
                                }
                            });
                        }
                        buf.push(chunk);
                        if buf.len() >= READ_CHUNK as usize
                            && to_disk
                                .send((std::mem::take(&mut buf), true))
                                .await
                                .is_err()
                        {
                            return Ok(None);
                        }
                    }
                    Some(Err(e)) => return Err(FillError::StoreFailed(e)),
                    None => break,
                }
            }
            // Readers are told about the last bytes only with `Done`, after the checks below.
            if to_disk.send((buf, false)).await.is_err() {
                return Ok(None);
            }
            drop(to_disk);
            Ok(Some((hasher, sha)))
        };
        let (read, write) = futures::join!(read, write);
        // A write error ends the read too: it comes first.
        let written = write?;
        let Some((hasher, sha)) = read? else {
            return Err(FillError::Short {
                written,
                expected: length,
            });
        };
        if written != length {
            return Err(FillError::Short {
                written,
                expected: length,
            });
        }
        if let (Some(sha), Some(said)) = (sha, expected) {
            let got = crate::nix::Sha256::from_bytes(sha2::Digest::finalize(sha).into());
            if got != said {
                return Err(FillError::WrongBytes(wrong_bytes(name, got, said)));
            }
        }
        let checksum = hasher.finish();
        // Every byte is in the file, checked, and each reader holds it open: a file that
        // cannot be published (no file descriptor, no room for its `.meta`) is only not
        // cached, and the readers finish. Published and indexed on the blocking pool (its
        // `.meta` written, its rename, and the eviction it may cause), and to the end even if
        // this fill is dropped meanwhile.
        let (this, name) = (Arc::clone(self), name.to_owned());
        let _ = tokio::task::spawn_blocking(move || {
            this.add(&name, written, || {
                this.disk.publish(tmp, &name, written, checksum)?;
                Ok(checksum)
            });
        })
        .await;
        Ok(())
    }
}

/// Why the NAR `name` read from the store is refused: its bytes hash to `got`, its narinfo's
/// `FileHash` says `said` (an object rotted in the bucket at the same size, or replaced while
/// it was read).
pub(crate) fn wrong_bytes(name: &str, got: crate::nix::Sha256, said: crate::nix::Sha256) -> String {
    format!(
        "nar/{name} in the store is not the NAR its narinfo describes: its bytes hash to \
         {got}, its narinfo's FileHash says {said}"
    )
}

/// Chunks from the store, written to the file together (kept as the store sent them: no copy).
#[derive(Default)]
struct Block {
    chunks: Vec<Bytes>,
    len: usize,
}

impl Block {
    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        self.chunks.push(chunk);
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Appends `block` to the fill's file and returns once it is there (readers use `pread`).
async fn write_out(
    tmp: &TempFile,
    file: &Arc<std::fs::File>,
    block: Block,
) -> Result<u64, WriteError> {
    use std::io::Write as _;
    let len = block.len() as u64;
    let f = file.clone();
    tokio::task::spawn_blocking(move || {
        let mut w: &std::fs::File = &f;
        for c in &block.chunks {
            w.write_all(c)?;
        }
        Ok::<_, io::Error>(())
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)))
    .map_err(|e| WriteError::io("writing", tmp.path(), e))?;
    Ok(len)
}

/// Opens `key` for a fill: a ranged GET of its first [`PART`], and if the object is larger,
/// a background task fetching the following parts in parallel (at most [`PARTS_AHEAD`] per
/// fill, and `parts` fetched or waiting over all fills; a part finding no permit free is read
/// when the fill gets there instead), handed on in order after the first.
/// The object's body is then the whole object. A store that ignores the range sends the whole
/// object, which is taken as it is; one that answers the range as a miss is asked again for
/// the whole object.
async fn open_in_parts(
    store: &Arc<dyn Store>,
    key: &str,
    parts: &Arc<tokio::sync::Semaphore>,
    idle_timeout: Duration,
) -> Result<Option<Object>, StoreError> {
    let first = ByteRange::From {
        start: 0,
        end: Some(PART - 1),
    };
    let obj = match store.get(key, Some(first)).await {
        // An empty object has no first byte to ask for: read whole, it is what it is.
        Err(StoreError::RangeNotSatisfiable { size: 0 }) => return store.get(key, None).await,
        other => other?,
    };
    let Some(obj) = obj else {
        // Not there: asked for whole, in case a store only finds it so.
        return store.get(key, None).await;
    };
    let Some(range) = obj.range else {
        return Ok(Some(obj)); // the whole object
    };
    let sent = range.end.checked_sub(range.start).map(|n| n + 1);
    let Some(first_len) = sent.filter(|_| range.start == 0 && sent == obj.length) else {
        return Err(StoreError::Other(format!(
            "asked for bytes 0-{} of {key}, the store sent {}-{}/{}",
            PART - 1,
            range.start,
            range.end,
            range.total
        )));
    };
    let total = range.total;
    // NARs are never stored encoded (Nix's S3 store encodes only logs, listings and
    // narinfos), and a fill keeps bytes, not headers.
    let whole = |body| Object {
        body,
        length: Some(total),
        range: None,
        encoding: None,
    };
    // A part gone quiet is given up on well before the fill itself would be (it waits
    // `idle_timeout` for its next chunk), so that asking for it again fits in that wait: three
    // quiet reads do; more, and the fill's own wait ends it first. (Reads that fail at once,
    // a store refusing connections, take `PART_ATTEMPTS` tries, 3.5 s apart in all.)
    let part_idle = idle_timeout / 4;
    // The first part goes out to clients as it arrives: broken off, it is resumed where it
    // stopped.
    // (`first_len` ≥ 1: it is the length of a range.)
    let end = first_len - 1;
    let first = Resume::stream(store.clone(), key, obj.body, 0, end, total, part_idle);
    if first_len >= total {
        return Ok(Some(whole(first)));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Part>>(1);
    let (lazy_store, lazy_key) = (store.clone(), Arc::<str>::from(key));
    let (store, key, parts) = (store.clone(), key.to_owned(), parts.clone());
    let starts = (first_len..total).step_by(PART as usize);
    tokio::spawn(async move {
        let mut fetched = futures::stream::iter(starts)
            .map(|start| {
                let (store, key, parts) = (store.clone(), key.clone(), parts.clone());
                async move {
                    let end = (start + PART).min(total) - 1;
                    // Held until the fill takes the part: it bounds the memory parts hold.
                    // None free (other fills' parts wait on a slow source): not waited for,
                    // or this fill would stall behind theirs; read when the fill gets there.
                    let permit = match parts.try_acquire_owned() {
                        Ok(permit) => permit,
                        Err(tokio::sync::TryAcquireError::NoPermits) => {
                            return Ok(Part::Later { start, end });
                        }
                        Err(e @ tokio::sync::TryAcquireError::Closed) => {
                            return Err(io::Error::other(e));
                        }
                    };
                    let chunks =
                        fetch_part_retrying(&*store, &key, start, end, total, part_idle).await?;
                    Ok(Part::Fetched(chunks, permit))
                }
            })
            .buffered(PARTS_AHEAD);
        loop {
            // The fill went away (its body was dropped): stop fetching, even mid-part.
            let part = tokio::select! {
                part = fetched.next() => part,
                () = tx.closed() => return,
            };
            let Some(part) = part else { return };
            let failed = part.is_err();
            if tx.send(part).await.is_err() || failed {
                return;
            }
        }
    });
    let rest = futures::stream::unfold(rx, move |mut rx| {
        let (store, key) = (lazy_store.clone(), lazy_key.clone());
        async move {
            let part = rx.recv().await?;
            let chunks: ByteStream = match part {
                Ok(Part::Fetched(chunks, _taken)) => {
                    futures::stream::iter(chunks.into_iter().map(Ok)).boxed()
                }
                Ok(Part::Later { start, end }) => {
                    Resume::opening(store, key, start, end, total, part_idle)
                }
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            };
            Some((chunks, rx))
        }
    })
    .flatten();
    Ok(Some(whole(first.chain(rest).boxed())))
}

/// A part of a large NAR after the first, as its fill gets it.
enum Part {
    /// Fetched ahead, held in memory under its permit.
    Fetched(Vec<Bytes>, tokio::sync::OwnedSemaphorePermit),
    /// Bytes `start..=end`, to be read when the fill gets there: no permit was free.
    Later { start: u64, end: u64 },
}

/// The bytes `next..=end` of an object being streamed: when its body breaks off, ends short
/// or goes quiet for `idle`, the rest is asked for with a ranged GET (up to [`PART_ATTEMPTS`]
/// reads in all, the first included), so one dropped connection does not fail the downloads
/// reading it. A store that answers the resumed read wrongly ends it at once.
///
/// The store has gone quiet when the body has sent nothing over two windows of `idle / 2` in
/// a row, the second armed by a poll that found the first over: a reader that polled, went on
/// to write to a slow disk for a while and polls again gets the second window to see the bytes
/// it did not ask for meanwhile (a body sends as it is read).
struct Resume {
    store: Arc<dyn Store>,
    key: Arc<str>,
    state: ResumeState,
    /// The next byte expected, and the last one.
    next: u64,
    end: u64,
    total: u64,
    /// One window (half of the quiet time that ends a read).
    window: Duration,
    quiet: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// The current window is the second.
    struck: bool,
    reads_left: usize,
}

enum ResumeState {
    Reading(ByteStream),
    Opening(futures::future::BoxFuture<'static, Result<ByteStream, PartError>>),
    Done,
}

impl Resume {
    fn stream(
        store: Arc<dyn Store>,
        key: &str,
        body: ByteStream,
        start: u64,
        end: u64,
        total: u64,
        idle: Duration,
    ) -> ByteStream {
        let state = ResumeState::Reading(body);
        Self::boxed(store, key.into(), state, start, end, total, idle)
    }

    /// The bytes `start..=end` of `key`, whose size is `total`, asked for once polled and
    /// then read as [`Resume::stream`] reads an open body.
    fn opening(
        store: Arc<dyn Store>,
        key: Arc<str>,
        start: u64,
        end: u64,
        total: u64,
        idle: Duration,
    ) -> ByteStream {
        let open = {
            let (store, key) = (store.clone(), key.clone());
            Box::pin(async move { open_range(&*store, &key, start, end, total).await })
        };
        let state = ResumeState::Opening(open);
        Self::boxed(store, key, state, start, end, total, idle)
    }

    fn boxed(
        store: Arc<dyn Store>,
        key: Arc<str>,
        state: ResumeState,
        start: u64,
        end: u64,
        total: u64,
        idle: Duration,
    ) -> ByteStream {
        let window = idle / 2;
        Box::pin(Resume {
            store,
            key,
            state,
            next: start,
            end,
            total,
            window,
            quiet: Box::pin(tokio::time::sleep(window)),
            struck: false,
            reads_left: PART_ATTEMPTS - 1,
        })
    }

    /// Starts a new quiet window; the first of two unless `struck`.
    fn arm(&mut self, struck: bool) {
        self.struck = struck;
        let deadline = tokio::time::Instant::now() + self.window;
        self.quiet.as_mut().reset(deadline);
    }
}

impl futures::Stream for Resume {
    type Item = io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if this.next > this.end {
                return Poll::Ready(None);
            }
            let failure = match &mut this.state {
                ResumeState::Done => return Poll::Ready(None),
                ResumeState::Opening(open) => match open.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(body)) => {
                        this.state = ResumeState::Reading(body);
                        this.arm(false);
                        continue;
                    }
                    Poll::Ready(Err(PartError::Transient(e))) => e,
                    Poll::Ready(Err(PartError::Final(e))) => {
                        this.state = ResumeState::Done;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                ResumeState::Reading(body) => match body.as_mut().poll_next(cx) {
                    Poll::Ready(Some(Ok(chunk))) => {
                        // A body is never longer than its range (its framing: Content-Length).
                        this.next += chunk.len() as u64;
                        this.arm(false);
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    Poll::Ready(Some(Err(e))) => e,
                    Poll::Ready(None) => {
                        io::Error::other(format!("the store ended at byte {}", this.next))
                    }
                    Poll::Pending => match this.quiet.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(()) if !this.struck => {
                            this.arm(true);
                            continue; // registers the second window's timer
                        }
                        Poll::Ready(()) => io::Error::other(format!(
                            "the store sent nothing for {} ms",
                            (2 * this.window).as_millis()
                        )),
                    },
                },
            };
            if this.reads_left == 0 {
                this.state = ResumeState::Done;
                return Poll::Ready(Some(Err(failure)));
            }
            this.reads_left -= 1;
            let (key, next, end, total) = (this.key.clone(), this.next, this.end, this.total);
            tracing::warn!(key = %key, next, end, error = %failure, "a NAR download broke off; asking for the rest");
            let store = this.store.clone();
            let wait = retry_wait(PART_ATTEMPTS - this.reads_left);
            this.state = ResumeState::Opening(Box::pin(async move {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                open_range(&*store, &key, next, end, total).await
            }));
        }
    }
}

/// Bytes `start..=end` of `key`, whose size is `total`, whole, asked for again (up to
/// [`PART_ATTEMPTS`] in all, [`retry_wait`] apart) when the store failed or broke off: one dropped connection costs
/// that part, not the whole fill and the downloads reading it. A store that answers with
/// other bytes than those asked for, says the object is gone or refuses the credentials is
/// not asked again.
async fn fetch_part_retrying(
    store: &dyn Store,
    key: &str,
    start: u64,
    end: u64,
    total: u64,
    idle_timeout: Duration,
) -> io::Result<Vec<Bytes>> {
    let mut attempt = 1;
    loop {
        match fetch_part(store, key, start, end, total, idle_timeout).await {
            Ok(chunks) => return Ok(chunks),
            Err(PartError::Transient(e)) if attempt < PART_ATTEMPTS => {
                tracing::warn!(key, start, end, attempt, error = %e, "a part of a NAR failed; asking again");
                attempt += 1;
                let wait = retry_wait(attempt);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            Err(PartError::Transient(e) | PartError::Final(e)) => return Err(e),
        }
    }
}

/// Why a part could not be read.
enum PartError {
    /// The store failed or broke off: asking again may work.
    Transient(io::Error),
    /// The store answered, wrongly: asking again would not help.
    Final(io::Error),
}

/// Bytes `start..=end` of `key`, whose size is `total`, whole. A store that sends nothing for
/// `idle_timeout` mid-part (a connection gone quiet rather than closed) has failed it.
async fn fetch_part(
    store: &dyn Store,
    key: &str,
    start: u64,
    end: u64,
    total: u64,
    idle_timeout: Duration,
) -> Result<Vec<Bytes>, PartError> {
    let mut body = open_range(store, key, start, end, total).await?;
    let mut chunks = Vec::new();
    let mut n = 0u64;
    loop {
        let next = tokio::time::timeout(idle_timeout, body.next())
            .await
            .map_err(|_| {
                PartError::Transient(io::Error::other(format!(
                    "bytes {start}-{end} of {key}: the store sent nothing for {} s",
                    idle_timeout.as_secs()
                )))
            })?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(PartError::Transient)?;
        n += chunk.len() as u64;
        chunks.push(chunk);
    }
    if n != end - start + 1 {
        return Err(PartError::Transient(io::Error::other(format!(
            "bytes {start}-{end} of {key}: the store sent {n}"
        ))));
    }
    Ok(chunks)
}

/// The body of bytes `start..=end` of `key`, whose size is `total`: what the store answered
/// checked to be those bytes.
async fn open_range(
    store: &dyn Store,
    key: &str,
    start: u64,
    end: u64,
    total: u64,
) -> Result<ByteStream, PartError> {
    let asked = ByteRange::From {
        start,
        end: Some(end),
    };
    let obj = store
        .get(key, Some(asked))
        .await
        .map_err(|e| match e {
            StoreError::Unavailable(_)
            | StoreError::Timeout(_)
            | StoreError::UpstreamDown(_)
            | StoreError::Other(_) => PartError::Transient(io::Error::other(e)),
            // Credentials, a range the object no longer has: the next try would get the same.
            StoreError::Misconfigured(_)
            | StoreError::RangeNotSatisfiable { .. }
            | StoreError::TooLarge { .. }
            | StoreError::Encoded { .. }
            | StoreError::WrongSize { .. } => PartError::Final(io::Error::other(e)),
        })?
        .ok_or_else(|| {
            PartError::Final(io::Error::other(format!(
                "{key} went away while it was read"
            )))
        })?;
    match obj.range {
        Some(r) if (r.start, r.end, r.total) == (start, end, total) => Ok(obj.body),
        got => Err(PartError::Final(io::Error::other(format!(
            "asked for bytes {start}-{end}/{total} of {key}, the store sent {got:?}"
        )))),
    }
}

/// Removes a fill's cell if the request that created it is dropped before the fill started.
struct CellGuard<'a> {
    cache: &'a NarCache,
    name: &'a str,
    cell: &'a Arc<OnceCell<Started>>,
}

impl Drop for CellGuard<'_> {
    fn drop(&mut self) {
        if self.cell.initialized() {
            return;
        }
        // Another request waiting on the cell takes its fill over: the cell stays, so that
        // later requests join that fill instead of starting one of their own. (The cell is held
        // by `fills` and by the request going away; any more holders are waiting on it. They
        // clone it under this lock.)
        let mut fills = lock(&self.cache.fills);
        if fills
            .get(self.name)
            .is_some_and(|c| Arc::ptr_eq(c, self.cell))
            && Arc::strong_count(self.cell) <= 2
        {
            fills.remove(self.name);
        }
    }
}

/// Where a reader of a fill is.
enum Tailing {
    /// Reading the fill, at this offset.
    Fill(Arc<FillHandle>, watch::Receiver<Progress>, u64),
    /// Reading the rest from the store, the fill having failed on its side.
    Rest(ByteStream),
    Done,
}

/// Streams a fill's file as it grows. Fails (so the client's transfer fails) if the fill does
/// because of the store; if it fails on its own side (its file could not be written or read
/// back: a full disk, an I/O error), the rest is read from the store instead, so the client
/// does not see the cache's trouble.
fn tail(h: Arc<FillHandle>) -> ByteStream {
    let rx = h.progress.clone();
    futures::stream::unfold(Tailing::Fill(h, rx, 0), |state| async move {
        match state {
            Tailing::Done => None,
            Tailing::Rest(rest) => next_of(rest).await,
            Tailing::Fill(h, rx, pos) => tail_next(h, rx, pos).await,
        }
    })
    .boxed()
}

/// The next item of `rest`, and the state after it.
async fn next_of(mut rest: ByteStream) -> Option<(io::Result<Bytes>, Tailing)> {
    let item = rest.next().await?;
    Some((item, Tailing::Rest(rest)))
}

/// The rest of the NAR from `pos`, read from the store after the fill failed on its own side
/// (`cause`); an error if it cannot be.
async fn rest_from_store(
    h: &FillHandle,
    pos: u64,
    cause: &str,
) -> Option<(io::Result<Bytes>, Tailing)> {
    let Some(src) = &h.source else {
        return Some((Err(io::Error::other(cause.to_owned())), Tailing::Done));
    };
    tracing::info!(key = %src.key, pos, cause, "NAR cache: reading the rest from the store");
    let end = h.size - 1;
    let rest = Resume::opening(
        src.store.clone(),
        src.key.clone(),
        pos,
        end,
        h.size,
        src.idle,
    );
    next_of(rest).await
}

/// The next bytes for a reader of the fill `h` at `pos`.
async fn tail_next(
    h: Arc<FillHandle>,
    mut rx: watch::Receiver<Progress>,
    pos: u64,
) -> Option<(io::Result<Bytes>, Tailing)> {
    loop {
        if pos >= h.size {
            return None;
        }
        let progress = *rx.borrow_and_update();
        let (in_memory, in_file) = match progress {
            Progress::Filling { received, written } => (received, written),
            Progress::Done => (h.size, h.size),
            Progress::Failed => {
                let e = io::Error::other("the store failed while sending this NAR");
                return Some((Err(e), Tailing::Done));
            }
            Progress::Unwritten => {
                return rest_from_store(&h, pos, "the fill could not write its file").await;
            }
        };
        if pos < in_memory {
            if let Some(b) = h.recent_at(pos, in_memory) {
                let next = pos + b.len() as u64;
                return Some((Ok(b), Tailing::Fill(h, rx, next)));
            }
        }
        // Not in memory (any more): from the file once written there.
        if pos < in_file {
            #[cfg(test)]
            h.file_reads.fetch_add(1, Ordering::SeqCst);
            let len = (in_file - pos).min(READ_CHUNK) as usize;
            let file = h.file.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
            })
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
            return match read {
                Ok(b) => Some((Ok(b), Tailing::Fill(h, rx, pos + len as u64))),
                Err(e) => {
                    tracing::warn!(cause = %e, pos, "NAR cache: reading a fill failed");
                    rest_from_store(&h, pos, "the fill's file could not be read").await
                }
            };
        }
        if rx.changed().await.is_err() && *rx.borrow() != Progress::Done {
            let e = io::Error::other("NAR fill ended unexpectedly");
            return Some((Err(e), Tailing::Done));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body whose next bytes come only a moment after the reader polls for them a second
    /// time, as an HTTP body does that reads its connection when asked.
    struct ReadWhenAsked {
        polls: usize,
        arrival: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
        data: Option<Bytes>,
    }

    impl futures::Stream for ReadWhenAsked {
        type Item = io::Result<Bytes>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            use std::future::Future as _;
            self.polls += 1;
            if self.polls == 1 {
                return std::task::Poll::Pending;
            }
            let arrival = self
                .arrival
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(10))));
            std::task::ready!(arrival.as_mut().poll(cx));
            std::task::Poll::Ready(self.data.take().map(Ok))
        }
    }

    /// A part the store cannot give for a moment (refusing connections while it restarts) is
    /// asked for again over 3.5 s, the second try at once, then 0.5 s, 1 s and 2 s apart (all
    /// within 200 ms before, which a restart outlasted); a store still failing after the last
    /// try fails the part.
    #[tokio::test(start_paused = true)]
    async fn a_part_the_store_cannot_give_is_asked_for_again_over_seconds() {
        use crate::store::memory::RangeFault;
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let data: Vec<u8> = (0..100u8).collect();
        mem.insert("nar/x", data.clone());
        mem.fault_range(10, RangeFault::Unavailable, PART_ATTEMPTS - 1);
        let asked = tokio::time::Instant::now();
        let got = fetch_part_retrying(&*mem, "nar/x", 10, 99, 100, Duration::from_secs(9))
            .await
            .unwrap();
        assert_eq!(got.concat(), &data[10..]);
        assert_eq!(asked.elapsed(), Duration::from_millis(3500));
        assert_eq!(mem.range_starts(), vec![10; PART_ATTEMPTS]);
        mem.fault_range(10, RangeFault::Unavailable, PART_ATTEMPTS);
        assert!(
            fetch_part_retrying(&*mem, "nar/x", 10, 99, 100, Duration::from_secs(9))
                .await
                .is_err()
        );
    }

    /// The rest of a streamed body that broke off is asked for at once, then, while the
    /// store cannot give it, [`retry_wait`] apart, as a part is.
    #[tokio::test(start_paused = true)]
    async fn the_rest_of_a_body_broken_off_is_asked_for_over_seconds() {
        use crate::store::memory::RangeFault;
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let data: Vec<u8> = (0..10u8).collect();
        mem.insert("nar/x", data.clone());
        mem.fault_range(3, RangeFault::Unavailable, PART_ATTEMPTS - 2);
        let cut = futures::stream::iter([
            Ok(Bytes::from_static(&[0, 1, 2])),
            Err(io::Error::other("connection reset")),
        ]);
        let idle = Duration::from_secs(9);
        let mut s = Resume::stream(store_of(&mem), "nar/x", Box::pin(cut), 0, 9, 10, idle);
        assert_eq!(&s.next().await.unwrap().unwrap()[..], &[0, 1, 2]);
        let asked = tokio::time::Instant::now();
        let rest = s.next().await.unwrap().unwrap();
        assert_eq!(&rest[..], &data[3..]);
        assert_eq!(asked.elapsed(), Duration::from_millis(3500));
        assert_eq!(mem.range_starts(), vec![3; PART_ATTEMPTS - 1]);
    }

    fn store_of(mem: &Arc<crate::store::memory::MemoryStore>) -> Arc<dyn Store> {
        mem.clone()
    }

    /// A store that sends nothing while the reader waits is given up on after the quiet time
    /// (two windows), and the rest is asked for from the byte where it stopped.
    #[tokio::test(start_paused = true)]
    async fn a_store_quiet_for_the_idle_time_is_asked_for_the_rest() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let data: Vec<u8> = (0..10u8).collect();
        mem.insert("nar/x", data.clone());
        let store: Arc<dyn Store> = mem.clone();
        let quiet = futures::stream::once(async { Ok(Bytes::from_static(&[0, 1, 2])) })
            .chain(futures::stream::pending());
        let idle = Duration::from_secs(2);
        let mut s = Resume::stream(store, "nar/x", Box::pin(quiet), 0, 9, 10, idle);
        assert_eq!(&s.next().await.unwrap().unwrap()[..], &[0, 1, 2]);
        let waited = tokio::time::Instant::now();
        let rest = s.next().await.unwrap().unwrap();
        assert_eq!(waited.elapsed(), idle, "given up on after the quiet time");
        assert_eq!(&rest[..], &data[3..]);
        assert_eq!(mem.range_starts(), vec![3]);
        assert!(s.next().await.is_none());
    }

    /// A reader that polled, went away for longer than the quiet time (writing to a slow
    /// disk, say) and polls again gets the bytes the store sends then: its absence is not the
    /// store's silence, and the store is not asked again.
    #[tokio::test(start_paused = true)]
    async fn a_reader_away_for_a_while_is_not_a_quiet_store() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        mem.insert("nar/x", vec![1u8; 10]);
        let store: Arc<dyn Store> = mem.clone();
        let body = ReadWhenAsked {
            polls: 0,
            arrival: None,
            data: Some(Bytes::from(vec![1u8; 10])),
        };
        let idle = Duration::from_secs(2);
        let mut s = Resume::stream(store, "nar/x", Box::pin(body), 0, 9, 10, idle);
        assert!(s.next().now_or_never().is_none());
        tokio::time::sleep(3 * idle).await;
        let got = s.next().await.unwrap().unwrap();
        assert_eq!(&got[..], &[1u8; 10][..]);
        assert!(s.next().await.is_none());
        assert!(mem.range_starts().is_empty(), "the store was asked again");
    }

    #[test]
    fn fill_errors_say_what_went_wrong() {
        let cases = [
            (
                FillError::Write(WriteError::DiskFull),
                "no space left on the cache's file system",
            ),
            (
                FillError::StoreStalled(Duration::from_secs(30)),
                "the store sent nothing for 30 s mid-body",
            ),
            (
                FillError::StoreFailed(io::Error::other("reset")),
                "the store failed mid-body: reset",
            ),
            (
                FillError::Short {
                    written: 5,
                    expected: 9,
                },
                "the store sent 5 bytes where it announced 9",
            ),
        ];
        for (e, message) in cases {
            assert_eq!(e.to_string(), message);
        }
    }

    /// Readers get from memory what lies within the last [`RECENT`] bytes written, and only
    /// that; a single chunk larger than that is kept until the next one.
    #[test]
    fn the_last_bytes_received_are_kept_and_no_more() {
        let file = tempfile::tempfile().unwrap();
        let (_tx, rx) = watch::channel(Progress::Filling {
            received: 0,
            written: 0,
        });
        let h = FillHandle {
            file: Arc::new(file),
            size: 16 << 20,
            progress: rx,
            recent: Mutex::new(VecDeque::new()),
            unwritten: std::sync::atomic::AtomicU64::new(0),
            source: None,
            file_reads: std::sync::atomic::AtomicUsize::new(0),
        };
        let mib = 1u64 << 20;
        let chunk = |v: u8| Bytes::from(vec![v; mib as usize]);
        h.keep(0, chunk(0));
        h.keep(mib, chunk(1));
        assert_eq!(
            h.recent_at(0, 2 * mib).unwrap().len() as u64,
            mib,
            "within RECENT"
        );
        h.keep(2 * mib, chunk(2));
        assert!(h.recent_at(0, 3 * mib).is_none(), "beyond RECENT");
        let part = h.recent_at(mib + 10, 3 * mib).unwrap();
        assert_eq!((part.len() as u64, part[0]), (mib - 10, 1));
        assert_eq!(
            h.recent_at(2 * mib, 2 * mib + 5).unwrap().len(),
            5,
            "up to `end`"
        );
        assert!(h.recent_at(3 * mib, 4 * mib).is_none(), "not written yet");
        h.keep(3 * mib, Bytes::from(vec![3; 3 * mib as usize]));
        assert!(
            h.recent_at(3 * mib, 6 * mib).is_some(),
            "a large chunk stays alone"
        );
        assert!(h.recent_at(2 * mib, 3 * mib).is_none());
    }

    /// A handle on a fill of `size` bytes whose file holds `on_disk`, and its progress sender.
    fn handle(size: u64, on_disk: &[u8]) -> (Arc<FillHandle>, watch::Sender<Progress>) {
        use std::io::Write as _;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(on_disk).unwrap();
        let (tx, rx) = watch::channel(Progress::Filling {
            received: 0,
            written: 0,
        });
        let h = FillHandle {
            file: Arc::new(file),
            size,
            progress: rx,
            recent: Mutex::new(VecDeque::new()),
            unwritten: std::sync::atomic::AtomicU64::new(0),
            source: None,
            file_reads: std::sync::atomic::AtomicUsize::new(0),
        };
        (Arc::new(h), tx)
    }

    /// A reader at the head gets what the store sent as soon as it is announced, before the
    /// file has it: the client does not wait for the disk.
    #[tokio::test(start_paused = true)]
    async fn a_reader_gets_received_bytes_before_they_are_written() {
        let (h, tx) = handle(10, b"");
        h.keep(0, Bytes::from_static(b"hello"));
        tx.send_replace(Progress::Filling {
            received: 5,
            written: 0,
        });
        let mut s = tail(h.clone());
        let first = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        let first = first.expect("waited for the file").unwrap().unwrap();
        assert_eq!(first, &b"hello"[..]);
        assert_eq!(h.file_reads.load(Ordering::SeqCst), 0);
    }

    /// Bytes received but no longer in memory are read from the file only once written
    /// there: the reader waits for the writer rather than reading what is not in the file.
    #[tokio::test(start_paused = true)]
    async fn a_reader_past_memory_waits_for_the_file() {
        let (h, tx) = handle(3 << 20, &[7u8; 1 << 20]);
        let big = |v: u8| Bytes::from(vec![v; 1 << 20]);
        // The first MiB fell out of memory; the file has it, but nothing is announced as
        // written yet.
        h.keep(0, big(7));
        h.keep(1 << 20, big(8));
        h.keep(2 << 20, big(9));
        tx.send_replace(Progress::Filling {
            received: 3 << 20,
            written: 0,
        });
        let mut s = tail(h.clone());
        let waited = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        assert!(waited.is_err(), "read before the file had the bytes");
        tx.send_replace(Progress::Filling {
            received: 3 << 20,
            written: 1 << 20,
        });
        let t = Duration::from_secs(5);
        let first = tokio::time::timeout(t, s.next()).await.expect("hung");
        let first = first.unwrap().unwrap();
        assert_eq!((first.len(), first[0]), (1 << 20, 7));
        assert_eq!(h.file_reads.load(Ordering::SeqCst), 1);
        let second = tokio::time::timeout(t, s.next()).await.expect("hung");
        let second = second.unwrap().unwrap();
        assert_eq!(second[0], 8, "then memory again");
    }
}
