//! NARs on local disk, with a byte budget and LRU eviction.
//!
//! A miss starts one *fill* per NAR: a background task that streams the object from the store
//! into a temporary file. Every client asking for that NAR meanwhile (the first included) is
//! served by tailing the growing file, so N concurrent misses cost one store GET and nobody
//! waits for the whole NAR. The file gets its final name only once complete, with its size
//! checked and its sha256 recorded in a `.meta` file beside it.
//!
//! After a restart the index is rebuilt from the directory; files whose size does not match
//! their `.meta` are removed at once, and each surviving file is hashed once in the background
//! (on its first hit; that request is served from the store) before it is served, so a
//! corrupted file is dropped and fetched again. When the disk is full, NARs are served straight
//! from the store without caching, and that is logged once.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use sha2::Digest as _;
use tokio::sync::{watch, OnceCell};

use crate::nix::NarFileName;
use crate::store::local::LocalStore;
use crate::store::{ByteRange, ByteStream, Object, Store, StoreError};

const READ_CHUNK: u64 = 1 << 20;
/// NARs up to this size are read whole on a miss instead of being tailed through a file.
const SMALL: u64 = 1 << 20;
/// A fill writes once it has this much, or after `BATCH_WAIT` without more from the store.
const BATCH: usize = 256 << 10;
const BATCH_WAIT: Duration = Duration::from_millis(3);
/// Kept free on the cache's file system beyond the NAR being written.
const FREE_MARGIN: u64 = 256 << 20;
/// After a disk-full error, how long fills are not attempted.
const FULL_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verified {
    Yes,
    No,
    InProgress,
}

struct Entry {
    size: u64,
    sha256: [u8; 32],
    tick: u64,
    verified: Verified,
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Entry>,
    lru: BTreeMap<u64, String>,
    tick: u64,
    total: u64,
}

impl Index {
    fn touch(&mut self, name: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(name) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, name.to_owned());
        }
    }

    fn remove(&mut self, name: &str) -> bool {
        match self.entries.remove(name) {
            Some(e) => {
                self.lru.remove(&e.tick);
                self.total -= e.size;
                true
            }
            None => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Written(u64),
    Done,
    Failed,
}

/// A fill in progress: a read handle on its temporary file and how far the writer got.
pub struct FillHandle {
    file: Arc<std::fs::File>,
    size: u64,
    progress: watch::Receiver<Progress>,
}

enum Started {
    Filling(Arc<FillHandle>),
    /// A small NAR, read whole: served from memory while its file is written in the
    /// background (most NARs are small; tailing a file costs them more than it saves).
    Small(Bytes),
    NotFound,
    /// Not cacheable now (too large, disk full, cache error): serve from the store directly.
    /// The object already opened is handed to the first request that takes it.
    Bypass(Mutex<Option<Object>>),
    Failed(StoreError),
}

/// What [`NarCache::get`] found.
pub enum Lookup {
    /// Served from disk or a fill: the object.
    Object(Object),
    NotFound,
    /// The cache cannot help with this request: ask the store.
    Bypass,
}

pub struct NarCache {
    dir: PathBuf,
    tmp: PathBuf,
    files: LocalStore,
    max_bytes: u64,
    index: Mutex<Index>,
    fills: Mutex<HashMap<String, Arc<OnceCell<Started>>>>,
    full_until: AtomicU64,
    full_logged: AtomicBool,
    /// Bytes promised to fills still running (not yet in `Index::total`).
    reserved: AtomicU64,
    /// Longest wait for the next chunk from the store before a fill fails.
    idle_timeout: Duration,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn meta_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.meta"))
}

fn read_meta(path: &Path) -> Option<(u64, [u8; 32])> {
    let text = std::fs::read_to_string(path).ok()?;
    let (size, hash) = text.trim().split_once(' ')?;
    Some((size.parse().ok()?, hex::decode(hash).ok()?.try_into().ok()?))
}

impl NarCache {
    /// Opens the cache in `dir` (created if missing) and rebuilds its index.
    pub fn open(dir: &Path, max_bytes: u64, idle_timeout: Duration) -> io::Result<Arc<Self>> {
        let tmp = dir.join(".tmp");
        std::fs::create_dir_all(&tmp)?;
        for e in std::fs::read_dir(&tmp)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let mut found: Vec<(SystemTime, String, u64, [u8; 32])> = Vec::new();
        for e in std::fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with(".meta") {
                continue;
            }
            let path = e.path();
            let meta = read_meta(&meta_path(dir, &name));
            let len = e.metadata().ok().map(|m| (m.len(), m.modified().ok()));
            match (name.parse::<NarFileName>(), meta, len) {
                (Ok(_), Some((size, sha)), Some((l, mtime))) if l == size => {
                    found.push((mtime.unwrap_or(UNIX_EPOCH), name, size, sha));
                }
                _ => {
                    tracing::info!(file = %path.display(), "NAR cache: removing an incomplete or unknown file");
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(meta_path(dir, &name));
                }
            }
        }
        // Orphaned .meta files.
        for e in std::fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(nar) = name.strip_suffix(".meta") {
                if !dir.join(nar).exists() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, name, size, sha256) in found {
            index.tick += 1;
            index.lru.insert(index.tick, name.clone());
            index.total += size;
            index.entries.insert(
                name,
                Entry {
                    size,
                    sha256,
                    tick: index.tick,
                    verified: Verified::No,
                },
            );
        }
        let cache = Arc::new(Self {
            dir: dir.to_owned(),
            tmp,
            files: LocalStore::open(dir)?,
            max_bytes,
            index: Mutex::new(index),
            fills: Mutex::new(HashMap::new()),
            full_until: AtomicU64::new(0),
            full_logged: AtomicBool::new(false),
            reserved: AtomicU64::new(0),
            idle_timeout,
        });
        cache.evict();
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of NARs and bytes held.
    pub fn usage(&self) -> (usize, u64) {
        let i = self.lock();
        (i.entries.len(), i.total)
    }

    fn remove_files(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(name));
        let _ = std::fs::remove_file(meta_path(&self.dir, name));
    }

    fn drop_entry(&self, name: &str) {
        if self.lock().remove(name) {
            self.remove_files(name);
        }
    }

    fn evict(&self) {
        let victims: Vec<String> = {
            let mut i = self.lock();
            let mut v = Vec::new();
            while i.total > self.max_bytes {
                let Some((_, name)) = i.lru.pop_first() else {
                    break;
                };
                if let Some(e) = i.entries.remove(&name) {
                    i.total -= e.size;
                }
                v.push(name);
            }
            v
        };
        for name in victims {
            tracing::debug!(nar = %name, "NAR cache: evicted");
            // Readers holding the file open keep reading it; the name is gone.
            self.remove_files(&name);
        }
    }

    /// Serves `name` (store key `key`) from disk or through a fill; `range` requests are
    /// served from disk only.
    pub async fn get(
        self: &Arc<Self>,
        name: &NarFileName,
        key: &str,
        range: Option<ByteRange>,
        store: &Arc<dyn Store>,
    ) -> Result<Lookup, StoreError> {
        let n = name.as_str();
        let state = {
            let mut i = self.lock();
            i.touch(n);
            i.entries.get(n).map(|e| (e.size, e.verified))
        };
        match state {
            Some((size, Verified::Yes)) => match self.files.get(n, range).await {
                Ok(Some(obj)) if obj.range.map_or(obj.length, |r| r.total) == size => {
                    return Ok(Lookup::Object(obj));
                }
                Err(e @ StoreError::RangeNotSatisfiable { .. }) => return Err(e),
                _ => {
                    tracing::warn!(nar = %n, "NAR cache: file missing or truncated, fetching again");
                    self.drop_entry(n);
                    return Ok(Lookup::Bypass);
                }
            },
            Some((_, Verified::No)) => {
                self.spawn_verify(n.to_owned());
                return Ok(Lookup::Bypass);
            }
            Some((_, Verified::InProgress)) => return Ok(Lookup::Bypass),
            None => {}
        }
        if range.is_some() {
            return Ok(Lookup::Bypass);
        }
        tracing::debug!(nar = %n, "NAR cache: miss");
        let cell = {
            let mut f = self.fills.lock().unwrap_or_else(|p| p.into_inner());
            f.entry(n.to_owned()).or_default().clone()
        };
        // If this request goes away before the fill has started, nobody else may be waiting:
        // the guard then removes the empty cell.
        let guard = CellGuard {
            cache: self,
            name: n,
            cell: &cell,
        };
        let started = cell
            .get_or_init(|| self.start_fill(n.to_owned(), key.to_owned(), store.clone()))
            .await;
        std::mem::forget(guard);
        let result = match started {
            Started::Filling(h) => {
                return Ok(Lookup::Object(Object {
                    body: tail(h.clone()),
                    length: h.size,
                    range: None,
                }));
            }
            Started::Small(b) => {
                let b = b.clone();
                return Ok(Lookup::Object(Object {
                    length: b.len() as u64,
                    body: futures::stream::once(async move { Ok(b) }).boxed(),
                    range: None,
                }));
            }
            Started::NotFound => Ok(Lookup::NotFound),
            Started::Bypass(opened) => {
                let taken = opened.lock().unwrap_or_else(|p| p.into_inner()).take();
                Ok(taken.map_or(Lookup::Bypass, Lookup::Object))
            }
            Started::Failed(e) => Err(e.clone()),
        };
        // The fill never started: let the next request try again.
        self.forget_cell(n, &cell);
        result
    }

    fn forget_cell(&self, name: &str, cell: &Arc<OnceCell<Started>>) {
        let mut f = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if f.get(name).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            f.remove(name);
        }
    }

    fn disk_full(&self, need: u64) -> bool {
        if now_secs() < self.full_until.load(Ordering::Relaxed) {
            return true;
        }
        let avail = rustix::fs::statvfs(&self.dir)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(u64::MAX);
        if avail < need.saturating_add(FREE_MARGIN) {
            self.note_full(&format!("{avail} bytes free"));
            return true;
        }
        false
    }

    fn note_full(&self, why: &str) {
        self.full_until
            .store(now_secs() + FULL_BACKOFF.as_secs(), Ordering::Relaxed);
        if !self.full_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(dir = %self.dir.display(), cause = why, "NAR cache: disk full, serving without caching");
        }
    }

    async fn start_fill(
        self: &Arc<Self>,
        name: String,
        key: String,
        store: Arc<dyn Store>,
    ) -> Started {
        let obj = match store.get(&key, None).await {
            Ok(Some(o)) => o,
            Ok(None) => return Started::NotFound,
            Err(e) => return Started::Failed(e),
        };
        if obj.length <= SMALL {
            return self.start_small(name, obj).await;
        }
        let reserved = self.reserved.load(Ordering::Relaxed);
        if obj.length > self.max_bytes / 2 || self.disk_full(obj.length.saturating_add(reserved)) {
            return Started::Bypass(Mutex::new(Some(obj)));
        }
        let mut rnd = [0u8; 12];
        if getrandom::getrandom(&mut rnd).is_err() {
            return Started::Bypass(Mutex::new(Some(obj)));
        }
        let tmp = self.tmp.join(hex::encode(rnd));
        let opened = std::fs::File::create(&tmp).and_then(|w| Ok((w, std::fs::File::open(&tmp)?)));
        let (writer, reader) = match opened {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(cause = %e, "NAR cache: cannot create a file, serving without caching");
                let _ = std::fs::remove_file(&tmp);
                return Started::Bypass(Mutex::new(Some(obj)));
            }
        };
        let (tx, rx) = watch::channel(Progress::Written(0));
        let handle = Arc::new(FillHandle {
            file: Arc::new(reader),
            size: obj.length,
            progress: rx,
        });
        let this = self.clone();
        let size = obj.length;
        self.reserved.fetch_add(size, Ordering::Relaxed);
        tokio::spawn(async move {
            let ok = this.run_fill(&name, &tmp, writer, obj, &tx).await;
            this.reserved.fetch_sub(size, Ordering::Relaxed);
            let _ = tx.send(if ok { Progress::Done } else { Progress::Failed });
            if !ok {
                let _ = std::fs::remove_file(&tmp);
            }
            this.fills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
        });
        Started::Filling(handle)
    }

    async fn start_small(self: &Arc<Self>, name: String, obj: Object) -> Started {
        let expected = obj.length;
        let read = async {
            let mut buf = Vec::with_capacity(expected as usize);
            let mut body = obj.body;
            while let Some(chunk) = body.next().await {
                buf.extend_from_slice(&chunk?);
            }
            Ok::<_, io::Error>(buf)
        };
        let data = match tokio::time::timeout(self.idle_timeout, read).await {
            Ok(Ok(d)) if d.len() as u64 == expected => Bytes::from(d),
            Ok(Ok(d)) => {
                return Started::Failed(StoreError::Other(format!(
                    "short body for nar/{name}: {} of {expected} bytes",
                    d.len()
                )));
            }
            Ok(Err(e)) => return Started::Failed(StoreError::Other(e.to_string())),
            Err(_) => return Started::Failed(StoreError::Timeout(self.idle_timeout.as_secs())),
        };
        let this = self.clone();
        let file_data = data.clone();
        tokio::task::spawn_blocking(move || {
            this.store_small(&name, &file_data);
            this.fills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
        });
        Started::Small(data)
    }

    /// Writes a small NAR's file and indexes it (best effort: a failure only means no caching).
    fn store_small(&self, name: &str, data: &[u8]) {
        if data.len() as u64 > self.max_bytes / 2 || self.disk_full(data.len() as u64) {
            return;
        }
        let mut rnd = [0u8; 12];
        if getrandom::getrandom(&mut rnd).is_err() {
            return;
        }
        let tmp = self.tmp.join(hex::encode(rnd));
        let sha256: [u8; 32] = sha2::Sha256::digest(data).into();
        let meta = format!("{} {}\n", data.len(), hex::encode(sha256));
        let done = std::fs::write(&tmp, data)
            .and_then(|()| std::fs::write(meta_path(&self.dir, name), meta))
            .and_then(|()| std::fs::rename(&tmp, self.dir.join(name)));
        if let Err(e) = done {
            if e.raw_os_error() == Some(28) {
                self.note_full("ENOSPC");
            } else {
                tracing::warn!(nar = %name, cause = %e, "NAR cache: cannot write a file");
            }
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(meta_path(&self.dir, name));
            return;
        }
        self.index_entry(name, data.len() as u64, sha256);
        self.evict();
    }

    fn index_entry(&self, name: &str, size: u64, sha256: [u8; 32]) {
        let mut i = self.lock();
        i.remove(name);
        i.tick += 1;
        let tick = i.tick;
        i.lru.insert(tick, name.to_owned());
        i.total += size;
        i.entries.insert(
            name.to_owned(),
            Entry {
                size,
                sha256,
                tick,
                verified: Verified::Yes,
            },
        );
    }

    /// Copies the store's body into the temporary file; on success gives it its final name
    /// and indexes it. Returns false if the fill failed (readers then fail too).
    async fn run_fill(
        &self,
        name: &str,
        tmp: &Path,
        file: std::fs::File,
        obj: Object,
        tx: &watch::Sender<Progress>,
    ) -> bool {
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = sha2::Sha256::new();
        let mut written = 0u64;
        let mut body = obj.body;
        let mut buf = bytes::BytesMut::new();
        let mut waited = false;
        loop {
            // Take what the store has ready; write it out (and tell readers) before waiting
            // for more, or once 1 MiB has piled up. Readers see only flushed bytes: tokio's
            // File completes `write_all` before the data is in the file, `flush` after.
            let next = match body.next().now_or_never() {
                Some(item) => item,
                // Nothing ready, but little buffered: give the store a moment to send more, so
                // the file is written in large blocks rather than one network read at a time.
                None if !buf.is_empty() && buf.len() < BATCH && !waited => {
                    waited = true;
                    match tokio::time::timeout(BATCH_WAIT, body.next()).await {
                        Ok(item) => item,
                        Err(_) => continue, // then write what there is
                    }
                }
                None => {
                    if !buf.is_empty() {
                        match self.write_out(name, &mut file, &mut buf).await {
                            Ok(n) => {
                                written += n;
                                let _ = tx.send(Progress::Written(written));
                            }
                            Err(()) => return false,
                        }
                    }
                    match tokio::time::timeout(self.idle_timeout, body.next()).await {
                        Ok(item) => item,
                        Err(_) => {
                            tracing::warn!(nar = %name, "NAR cache: the store stalled mid-body");
                            return false;
                        }
                    }
                }
            };
            waited = false;
            match next {
                Some(Ok(chunk)) => {
                    hasher.update(&chunk);
                    buf.extend_from_slice(&chunk);
                    if buf.len() >= READ_CHUNK as usize {
                        match self.write_out(name, &mut file, &mut buf).await {
                            Ok(n) => {
                                written += n;
                                let _ = tx.send(Progress::Written(written));
                            }
                            Err(()) => return false,
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(nar = %name, cause = %e, "NAR cache: store failed mid-body");
                    return false;
                }
                None => break,
            }
        }
        match self.write_out(name, &mut file, &mut buf).await {
            Ok(n) => written += n,
            Err(()) => return false,
        }
        if written != obj.length {
            tracing::warn!(nar = %name, written, expected = obj.length, "NAR cache: short body from the store");
            return false;
        }
        let sha256: [u8; 32] = hasher.finalize().into();
        let meta = format!("{written} {}\n", hex::encode(sha256));
        let dest = self.dir.join(name);
        let finish = std::fs::File::create(meta_path(&self.dir, name))
            .and_then(|mut m| m.write_all(meta.as_bytes()))
            .and_then(|()| std::fs::rename(tmp, &dest));
        if let Err(e) = finish {
            tracing::warn!(nar = %name, cause = %e, "NAR cache: cannot finish the file");
            let _ = std::fs::remove_file(meta_path(&self.dir, name));
            return false;
        }
        self.index_entry(name, written, sha256);
        self.evict();
        true
    }

    /// Writes `buf` to the fill's file and waits until it is there (readers use `pread`).
    async fn write_out(
        &self,
        name: &str,
        file: &mut tokio::fs::File,
        buf: &mut bytes::BytesMut,
    ) -> Result<u64, ()> {
        use tokio::io::AsyncWriteExt as _;
        let data = buf.split().freeze();
        let res = match file.write_all(&data).await {
            Ok(()) => file.flush().await,
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => Ok(data.len() as u64),
            Err(e) => {
                if e.raw_os_error() == Some(28) {
                    self.note_full("ENOSPC");
                } else {
                    tracing::warn!(nar = %name, cause = %e, "NAR cache: write failed");
                }
                Err(())
            }
        }
    }

    /// Hashes a file indexed at start-up; keeps it if it matches its `.meta`.
    fn spawn_verify(self: &Arc<Self>, name: String) {
        let expected = {
            let mut i = self.lock();
            match i.entries.get_mut(&name) {
                Some(e) if e.verified == Verified::No => {
                    e.verified = Verified::InProgress;
                    (e.size, e.sha256)
                }
                _ => return,
            }
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let path = this.dir.join(&name);
            let actual = hash_file(&path);
            let good = actual.as_ref().is_ok_and(|a| *a == expected);
            if good {
                if let Some(e) = this.lock().entries.get_mut(&name) {
                    e.verified = Verified::Yes;
                }
            } else {
                tracing::warn!(nar = %name, "NAR cache: cached file is corrupt, fetching it again");
                this.drop_entry(&name);
            }
        });
    }
}

fn hash_file(path: &Path) -> io::Result<(u64, [u8; 32])> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; READ_CHUNK as usize];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((n, h.finalize().into()))
}

/// Removes a fill's cell if the request that created it is dropped before the fill started.
struct CellGuard<'a> {
    cache: &'a NarCache,
    name: &'a str,
    cell: &'a Arc<OnceCell<Started>>,
}

impl Drop for CellGuard<'_> {
    fn drop(&mut self) {
        if !self.cell.initialized() {
            self.cache.forget_cell(self.name, self.cell);
        }
    }
}

/// Streams a fill's file as it grows. Fails (so the client's transfer fails) if the fill does.
fn tail(h: Arc<FillHandle>) -> ByteStream {
    let rx = h.progress.clone();
    futures::stream::unfold((h, rx, 0u64), |(h, mut rx, pos)| async move {
        loop {
            if pos >= h.size {
                return None;
            }
            let progress = *rx.borrow_and_update();
            let avail = match progress {
                Progress::Written(n) => n,
                Progress::Done => h.size,
                Progress::Failed => {
                    return Some((
                        Err(io::Error::other("the store failed while sending this NAR")),
                        (h.clone(), rx.clone(), h.size),
                    ));
                }
            };
            if pos < avail {
                let len = (avail - pos).min(READ_CHUNK) as usize;
                let file = h.file.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, pos).map(|()| Bytes::from(buf))
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
                return match read {
                    Ok(b) => Some((Ok(b), (h, rx, pos + len as u64))),
                    Err(e) => {
                        tracing::warn!(cause = %e, pos, "NAR cache: reading a fill failed");
                        let end = h.size;
                        Some((Err(e), (h, rx, end)))
                    }
                };
            }
            if rx.changed().await.is_err() && *rx.borrow() != Progress::Done {
                let end = h.size;
                return Some((
                    Err(io::Error::other("NAR fill ended unexpectedly")),
                    (h, rx, end),
                ));
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use futures::TryStreamExt as _;

    const NAME: &str = "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz";

    async fn concat(s: ByteStream) -> Vec<u8> {
        let chunks: Vec<Bytes> = s.try_collect().await.unwrap();
        chunks.concat()
    }

    async fn body(l: Lookup) -> Vec<u8> {
        match l {
            Lookup::Object(o) => concat(o.body).await,
            _ => panic!("not an object"),
        }
    }

    fn setup(
        max: u64,
    ) -> (
        tempfile::TempDir,
        Arc<NarCache>,
        Arc<MemoryStore>,
        Arc<dyn Store>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cache = NarCache::open(dir.path(), max, Duration::from_secs(30)).unwrap();
        let mem = Arc::new(MemoryStore::new());
        let store: Arc<dyn Store> = mem.clone();
        (dir, cache, mem, store)
    }

    async fn wait_indexed(cache: &NarCache, n: usize) {
        for _ in 0..200 {
            if cache.usage().0 == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("cache never held {n} NARs");
    }

    #[tokio::test]
    async fn fills_then_hits_without_the_store() {
        let (_d, cache, mem, store) = setup(1 << 30);
        let data = vec![42u8; 3_000_000];
        mem.insert(&format!("nar/{NAME}"), data.clone());
        let name: NarFileName = NAME.parse().unwrap();
        let key = format!("nar/{NAME}");
        assert_eq!(
            body(cache.get(&name, &key, None, &store).await.unwrap()).await,
            data
        );
        wait_indexed(&cache, 1).await;
        let before = mem.requests();
        assert_eq!(
            body(cache.get(&name, &key, None, &store).await.unwrap()).await,
            data
        );
        let r = Some(ByteRange::From {
            start: 10,
            end: Some(19),
        });
        match cache.get(&name, &key, r, &store).await.unwrap() {
            Lookup::Object(o) => {
                assert_eq!(o.range.unwrap().total, data.len() as u64);
                assert_eq!(concat(o.body).await.len(), 10);
            }
            _ => panic!("range not served from disk"),
        }
        assert_eq!(mem.requests(), before, "hits must not touch the store");
    }

    #[tokio::test]
    async fn eviction_keeps_the_budget() {
        let (_d, cache, mem, store) = setup(2500);
        let names = [
            "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
            "17yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
            "27yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar",
        ];
        for (i, n) in names.iter().enumerate() {
            mem.insert(&format!("nar/{n}"), vec![i as u8; 1000]);
            let name: NarFileName = n.parse().unwrap();
            body(
                cache
                    .get(&name, &format!("nar/{n}"), None, &store)
                    .await
                    .unwrap(),
            )
            .await;
            wait_indexed(&cache, (i + 1).min(2)).await;
        }
        // The last fill indexes its NAR and evicts in the background: wait for that.
        for _ in 0..200 {
            if _d.path().join(names[2]).exists() && !_d.path().join(names[0]).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (count, bytes) = cache.usage();
        assert_eq!((count, bytes), (2, 2000));
        assert!(
            !_d.path().join(names[0]).exists(),
            "the least recently used went"
        );
        assert!(_d.path().join(names[2]).exists());
    }

    #[tokio::test]
    async fn restart_rebuilds_and_drops_corrupt_files() {
        let (d, cache, mem, store) = setup(1 << 30);
        let data = vec![7u8; 100_000];
        mem.insert(&format!("nar/{NAME}"), data.clone());
        let name: NarFileName = NAME.parse().unwrap();
        let key = format!("nar/{NAME}");
        body(cache.get(&name, &key, None, &store).await.unwrap()).await;
        wait_indexed(&cache, 1).await;
        drop(cache);

        // Same size, different bytes: only hashing can tell.
        let mut bytes = std::fs::read(d.path().join(NAME)).unwrap();
        bytes[500] ^= 1;
        std::fs::write(d.path().join(NAME), bytes).unwrap();
        let cache = NarCache::open(d.path(), 1 << 30, Duration::from_secs(30)).unwrap();
        assert_eq!(cache.usage().0, 1);
        // First hit: not yet verified, so the store serves it while the file is checked.
        assert!(matches!(
            cache.get(&name, &key, None, &store).await.unwrap(),
            Lookup::Bypass
        ));
        wait_indexed(&cache, 0).await;
        // Then it is fetched again, intact.
        assert_eq!(
            body(cache.get(&name, &key, None, &store).await.unwrap()).await,
            data
        );
        wait_indexed(&cache, 1).await;
        assert_eq!(std::fs::read(d.path().join(NAME)).unwrap(), data);

        // A truncated file is removed at start.
        drop(cache);
        std::fs::write(d.path().join(NAME), b"short").unwrap();
        let cache = NarCache::open(d.path(), 1 << 30, Duration::from_secs(30)).unwrap();
        assert_eq!(cache.usage().0, 0);
        assert!(!d.path().join(NAME).exists());
    }

    #[tokio::test]
    async fn concurrent_misses_cost_one_store_get() {
        let (_d, cache, mem, store) = setup(1 << 30);
        let data: Vec<u8> = (0..5_000_000u32).map(|i| i as u8).collect();
        mem.insert(&format!("nar/{NAME}"), data.clone());
        let name: NarFileName = NAME.parse().unwrap();
        let key = format!("nar/{NAME}");
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, store, name, key) =
                    (cache.clone(), store.clone(), name.clone(), key.clone());
                tokio::spawn(async move {
                    body(cache.get(&name, &key, None, &store).await.unwrap()).await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), data);
        }
        assert_eq!(mem.requests(), 1);
    }

    #[tokio::test]
    async fn too_large_nars_pass_through_with_one_store_get() {
        let (_d, cache, mem, store) = setup(1000);
        let data = vec![9u8; 800];
        mem.insert(&format!("nar/{NAME}"), data.clone());
        let name: NarFileName = NAME.parse().unwrap();
        let key = format!("nar/{NAME}");
        assert_eq!(
            body(cache.get(&name, &key, None, &store).await.unwrap()).await,
            data
        );
        assert_eq!(mem.requests(), 1);
        assert_eq!(cache.usage().0, 0);
    }

    #[tokio::test]
    async fn missing_nars_are_not_cached() {
        let (_d, cache, mem, store) = setup(1 << 30);
        let name: NarFileName = NAME.parse().unwrap();
        let key = format!("nar/{NAME}");
        assert!(matches!(
            cache.get(&name, &key, None, &store).await.unwrap(),
            Lookup::NotFound
        ));
        mem.insert(&key, vec![1u8; 10]);
        assert_eq!(
            body(cache.get(&name, &key, None, &store).await.unwrap()).await,
            vec![1u8; 10]
        );
    }
}
