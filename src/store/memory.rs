//! An in-memory store for unit tests of the layers above the store. Counts requests and can be
//! switched into failure, so tests can check what reaches the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;

use super::{ByteRange, Object, ObjectInfo, ObjectList, ObjectWriter, Store, StoreError};
use crate::sync::lock;

/// An object's bytes and when it was written (what a listing reports).
#[derive(Clone)]
struct Stored {
    data: Bytes,
    modified: SystemTime,
}

/// Called with the key of each object written under a prefix (see [`MemoryStore::after_write`]).
type Hook = Arc<dyn Fn(&str) + Send + Sync>;

/// What a ranged read made to fail does (see [`MemoryStore::fault_range`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeFault {
    /// The body breaks off halfway, as over a dropped connection.
    CutBody,
    /// The answer is for the bytes one past those asked for.
    WrongRange,
    /// The store cannot be reached.
    Unavailable,
    /// The store refuses the credentials.
    Denied,
    /// The body stops halfway and sends nothing more, as over a connection gone quiet.
    Stall,
}

/// Which calls [`MemoryStore::fail`] makes fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOp {
    /// `get` and `head`.
    Read,
    Delete,
    /// `list`, of exactly this prefix.
    List,
    /// Opening a writer (and so `put_bytes`).
    Write,
    /// A write the store applies and then answers with an error (its answer lost after it
    /// was applied: a timeout, a reset connection): the object is written all the same.
    WriteAnswer,
    /// The same for a delete: the object is gone all the same.
    DeleteAnswer,
    /// `get` answers, then its body breaks off halfway (a connection reset mid-body).
    Body,
    /// The first chunk written to a writer fails (a multipart upload the store dropped).
    Part,
    /// `get` and `head` fail as for a file the process may not read, while the store
    /// answers for every other key ([`StoreError::Other`]).
    Denied,
}

/// Holds reads of keys under a prefix between looking the object up and returning it, until
/// the test opens it (see [`MemoryStore::hold_reads`]).
pub struct ReadGate {
    prefix: String,
    /// Given a permit by each read that reached the gate.
    reached: tokio::sync::Semaphore,
    /// Closed when the gate opens: every held read and every later one goes on.
    open: tokio::sync::Semaphore,
}

impl ReadGate {
    /// Waits until a read has looked its object up and is held at the gate.
    pub async fn reached(&self) {
        if let Ok(p) = self.reached.acquire().await {
            p.forget();
        }
    }

    /// Lets every held read return, and every later one pass.
    pub fn open(&self) {
        self.open.close();
    }
}

#[derive(Default)]
pub struct MemoryStore {
    // A std Mutex: held only for map operations, never across an await.
    objects: Arc<Mutex<HashMap<String, Stored>>>,
    gets: AtomicUsize,
    /// Writers asked for (each write, failed or not).
    writes: AtomicUsize,
    lists: AtomicUsize,
    /// Objects listings handed out.
    listed_objects: AtomicUsize,
    pings: AtomicUsize,
    down: AtomicBool,
    /// Pings answered as a store refusing the credentials would.
    misconfigured: AtomicBool,
    latency_ms: AtomicUsize,
    hooks: Arc<Mutex<Vec<(String, Hook)>>>,
    /// Run after each deletion of a key under their prefix (see [`MemoryStore::after_delete`]).
    delete_hooks: Mutex<Vec<(String, Hook)>>,
    /// The `Content-Encoding` GETs of a key answer with (see [`MemoryStore::set_encoding`]).
    encodings: Mutex<HashMap<String, String>>,
    gates: Mutex<Vec<Arc<ReadGate>>>,
    /// Gates held by writes (opening a writer), see [`MemoryStore::hold_writes`].
    write_gates: Mutex<Vec<Arc<ReadGate>>>,
    /// Gates held by GETs alone, see [`MemoryStore::hold_gets`].
    get_gates: Mutex<Vec<Arc<ReadGate>>>,
    /// The key of every `get`, in order.
    got: Mutex<Vec<String>>,
    /// Every key a `head` asked about, in order.
    headed: Mutex<Vec<String>>,
    /// What writers that never committed "left behind" ([`MemoryStore::leave_staged`]).
    staged: Mutex<Vec<String>>,
    /// Faults for ranged reads starting at a byte: (start, fault, reads left to fail).
    faults: Mutex<Vec<(u64, RangeFault, usize)>>,
    /// The start of every ranged `get`, in order.
    range_starts: Mutex<Vec<u64>>,
    /// Calls made to fail: (operation, key, calls left to pass first, calls left to fail).
    failing: Mutex<Vec<(FailOp, String, usize, usize)>>,
    /// Set: large NARs are redirected to `<base>/<key>` (as S3 does with presigned URLs).
    presign_base: Mutex<Option<String>>,
    /// Set: objects are sent whole without a length, ranges ignored (as nix-serve does).
    lengthless: AtomicBool,
    /// How far the store's clock is ahead of this machine's, in seconds (see
    /// [`MemoryStore::set_clock_ahead`]).
    clock_ahead: Arc<AtomicU64>,
}

/// This machine's time moved `ahead` seconds on.
fn shifted_now(ahead: &AtomicU64) -> SystemTime {
    SystemTime::now() + std::time::Duration::from_secs(ahead.load(Ordering::SeqCst))
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, key: &str, data: impl Into<Bytes>) {
        self.insert_at(key, data, self.now());
    }

    /// Sets the store's clock `ahead` of this machine's (a store whose clock jumped, or this
    /// machine suspended: its wall clock then catches up, its monotonic clock does not).
    /// Objects written from then on are dated by it.
    pub fn set_clock_ahead(&self, ahead: std::time::Duration) {
        self.clock_ahead.store(ahead.as_secs(), Ordering::SeqCst);
    }

    /// Inserts an object as if written at `modified` (to test age-based decisions).
    pub fn insert_at(&self, key: &str, data: impl Into<Bytes>, modified: SystemTime) {
        lock(&self.objects).insert(
            key.to_owned(),
            Stored {
                data: data.into(),
                modified,
            },
        );
    }

    /// GETs of `key` say it is stored with `Content-Encoding: encoding` (as Nix's
    /// `narinfo-compression` leaves objects in S3).
    pub fn set_encoding(&self, key: &str, encoding: &str) {
        lock(&self.encodings).insert(key.to_owned(), encoding.to_owned());
    }

    /// From now on GETs of large NARs are answered with a redirect to `<base>/<key>`.
    pub fn presign_to(&self, base: &str) {
        *lock(&self.presign_base) = Some(base.to_owned());
    }

    /// Removes an object at once (from a hook: what another process deletes meanwhile).
    /// Sends objects from now on as nix-serve and harmonia send NARs: whole, ranges ignored,
    /// without a length.
    pub fn serve_unsized(&self) {
        self.lengthless.store(true, Ordering::SeqCst);
    }

    /// Objects are sent with their length again (after [`Self::serve_unsized`]).
    pub fn serve_sized(&self) {
        self.lengthless.store(false, Ordering::SeqCst);
    }

    pub fn remove(&self, key: &str) {
        lock(&self.encodings).remove(key);
        lock(&self.objects).remove(key);
    }

    /// Runs `f` after each write of an object whose key starts with `prefix`, before the
    /// write returns: a test steps in at an exact point of a protocol.
    pub fn after_write(&self, prefix: &str, f: impl Fn(&str) + Send + Sync + 'static) {
        lock(&self.hooks).push((prefix.to_owned(), Arc::new(f)));
    }

    /// Runs `f` after each deletion of an object whose key starts with `prefix`, before the
    /// deletion returns.
    pub fn after_delete(&self, prefix: &str, f: impl Fn(&str) + Send + Sync + 'static) {
        lock(&self.delete_hooks).push((prefix.to_owned(), Arc::new(f)));
    }

    /// Holds each `get` and `head` of a key under `prefix` after it has looked the object up
    /// and before it returns, until the gate is opened: a test lands a write exactly between
    /// a read and its answer.
    pub fn hold_reads(&self, prefix: &str) -> Arc<ReadGate> {
        Self::add_gate(&self.gates, prefix)
    }

    /// [`MemoryStore::hold_reads`] for GETs alone: a HEAD of the same key passes.
    pub fn hold_gets(&self, prefix: &str) -> Arc<ReadGate> {
        Self::add_gate(&self.get_gates, prefix)
    }

    /// Holds each write of a key under `prefix` (as it opens its writer) until the gate is
    /// opened: a test drops a write under way. A `*` in `prefix` stands for any part of the
    /// key (the rest of the key then ends with what follows it).
    pub fn hold_writes(&self, prefix: &str) -> Arc<ReadGate> {
        Self::add_gate(&self.write_gates, prefix)
    }

    fn add_gate(gates: &Mutex<Vec<Arc<ReadGate>>>, prefix: &str) -> Arc<ReadGate> {
        let gate = Arc::new(ReadGate {
            prefix: prefix.to_owned(),
            reached: tokio::sync::Semaphore::new(0),
            open: tokio::sync::Semaphore::new(0),
        });
        lock(gates).push(gate.clone());
        gate
    }

    async fn pass_gates(&self, key: &str) {
        Self::pass(&self.gates, key).await;
    }

    async fn pass(gates: &Mutex<Vec<Arc<ReadGate>>>, key: &str) {
        let gates: Vec<Arc<ReadGate>> = lock(gates)
            .iter()
            .filter(|g| match g.prefix.split_once('*') {
                Some((start, end)) => {
                    key.len() >= start.len() + end.len()
                        && key.starts_with(start)
                        && key.ends_with(end)
                }
                None => key.starts_with(g.prefix.as_str()),
            })
            .cloned()
            .collect();
        for g in gates {
            g.reached.add_permits(1);
            // Never granted: this returns (with an error) once the gate is closed, i.e. open.
            let _ = g.open.acquire().await;
        }
    }

    /// How many `get`s asked for a key under `prefix` (bodies read, not existence checks).
    pub fn gets_under(&self, prefix: &str) -> usize {
        lock(&self.got)
            .iter()
            .filter(|k| k.starts_with(prefix))
            .count()
    }

    /// Makes `what` look like an upload a writer left unfinished, older than any grace period
    /// (real writers here buffer in memory and leave nothing).
    pub fn leave_staged(&self, what: &str) {
        lock(&self.staged).push(what.to_owned());
    }

    /// How many `head`s asked about a key under `prefix`.
    pub fn heads_under(&self, prefix: &str) -> usize {
        lock(&self.headed)
            .iter()
            .filter(|k| k.starts_with(prefix))
            .count()
    }

    /// An object's bytes, read at once (from a hook or an assertion; not counted as a `get`).
    pub fn bytes(&self, key: &str) -> Option<Bytes> {
        lock(&self.objects).get(key).map(|o| o.data.clone())
    }

    /// Every key, sorted (for assertions).
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = lock(&self.objects).keys().cloned().collect();
        k.sort();
        k
    }

    /// Makes the next `times` ranged reads starting at byte `start` fail with `fault`.
    pub fn fault_range(&self, start: u64, fault: RangeFault, times: usize) {
        lock(&self.faults).push((start, fault, times));
    }

    /// The first byte asked for by each ranged `get`, in order.
    pub fn range_starts(&self) -> Vec<u64> {
        lock(&self.range_starts).clone()
    }

    /// The fault set for a ranged read starting at `start`, if any reads are left to fail.
    fn take_fault(&self, start: u64) -> Option<RangeFault> {
        let mut faults = lock(&self.faults);
        let f = faults
            .iter_mut()
            .find(|(s, _, left)| *s == start && *left > 0)?;
        f.2 -= 1;
        Some(f.1)
    }

    /// Number of `list` calls so far.
    pub fn lists(&self) -> usize {
        self.lists.load(Ordering::SeqCst)
    }

    /// Number of objects listings handed out so far.
    pub fn listed_objects(&self) -> usize {
        self.listed_objects.load(Ordering::SeqCst)
    }

    /// Number of `ping` calls so far.
    pub fn pings(&self) -> usize {
        self.pings.load(Ordering::SeqCst)
    }

    /// Number of writes tried so far (failed ones too).
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// Number of `get` and `head` calls so far.
    pub fn requests(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    /// Makes every `get`, `head`, `delete` and `ping` take this long (to let concurrent
    /// requests pile up, or a long run pass in paused time).
    pub fn set_latency(&self, d: std::time::Duration) {
        self.latency_ms
            .store(d.as_millis() as usize, Ordering::SeqCst);
    }

    async fn delay(&self) {
        let ms = self.latency_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(ms as u64)).await;
        }
    }

    /// Makes `times` calls of `op` on `key` fail as an unreachable store would, after the
    /// next `skip` ones pass.
    /// (`key` ending in `*`: every key it begins.)
    pub fn fail(&self, op: FailOp, key: &str, skip: usize, times: usize) {
        lock(&self.failing).push((op, key.to_owned(), skip, times));
    }

    fn take_failure(&self, op: FailOp, key: &str) -> Result<(), StoreError> {
        let mut failing = lock(&self.failing);
        let Some(f) = failing.iter_mut().find(|(o, k, _, left)| {
            let matches = match k.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix),
                None => k == key,
            };
            *o == op && matches && *left > 0
        }) else {
            return Ok(());
        };
        if f.2 > 0 {
            f.2 -= 1;
            return Ok(());
        }
        f.3 -= 1;
        Err(StoreError::Unavailable(format!("{key}: a test fault")))
    }

    /// While down, every call fails as an unreachable store would.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// While set, pings fail as a store refusing the credentials does.
    pub fn set_misconfigured(&self, misconfigured: bool) {
        self.misconfigured.store(misconfigured, Ordering::SeqCst);
    }

    fn lookup(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory store is down".into()));
        }
        self.take_failure(FailOp::Read, key)?;
        if self.take_failure(FailOp::Denied, key).is_err() {
            return Err(StoreError::Other(format!(
                "{key}: Permission denied (a test fault)"
            )));
        }
        Ok(lock(&self.objects).get(key).map(|s| s.data.clone()))
    }
}

impl MemoryStore {
    /// A GET as the objects are stored, before any `Content-Encoding` is given.
    async fn get_as_stored(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<Object>, StoreError> {
        self.delay().await;
        lock(&self.got).push(key.to_owned());
        let found = self.lookup(key)?;
        self.pass_gates(key).await;
        Self::pass(&self.get_gates, key).await;
        let Some(data) = found else {
            return Ok(None);
        };
        if self.lengthless.load(Ordering::SeqCst) {
            let mut obj = Object::from_bytes(data, None)?;
            obj.length = None;
            return Ok(Some(obj));
        }
        let Some(ByteRange::From { start, end }) = range else {
            return Object::from_bytes(data, range).map(Some);
        };
        lock(&self.range_starts).push(start);
        match self.take_fault(start) {
            None => Object::from_bytes(data, range).map(Some),
            Some(RangeFault::WrongRange) => {
                let shifted = ByteRange::From {
                    start: start + 1,
                    end: end.map(|e| e + 1),
                };
                Object::from_bytes(data, Some(shifted)).map(Some)
            }
            Some(RangeFault::Unavailable) => Err(StoreError::Unavailable(
                "connection refused (a test fault)".into(),
            )),
            Some(RangeFault::Denied) => Err(StoreError::Misconfigured(
                "access denied (a test fault)".into(),
            )),
            Some(fault @ (RangeFault::CutBody | RangeFault::Stall)) => {
                let obj = Object::from_bytes(data, range)?;
                Ok(Some(cut(obj, fault == RangeFault::Stall).await))
            }
        }
    }
}

/// `obj` with its body broken off halfway: then reset, or (`stall`) quiet for ever.
async fn cut(mut obj: Object, stall: bool) -> Object {
    let whole: Vec<Bytes> = obj.body.map(|c| c.unwrap_or_default()).collect().await;
    let whole = whole.concat();
    let half = futures::stream::once(futures::future::ready(Ok(Bytes::from(
        whole[..whole.len() / 2].to_vec(),
    ))));
    obj.body = if stall {
        half.chain(futures::stream::pending()).boxed()
    } else {
        let reset = std::io::Error::other("connection reset (a test fault)");
        half.chain(futures::stream::once(futures::future::ready(Err(reset))))
            .boxed()
    };
    obj
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Option<Object>, StoreError> {
        let mut found = self.get_as_stored(key, range).await;
        if let Ok(Some(obj)) = &mut found {
            obj.encoding = lock(&self.encodings).get(key).cloned();
        }
        match found {
            Ok(Some(obj)) if self.take_failure(FailOp::Body, key).is_err() => {
                Ok(Some(cut(obj, false).await))
            }
            found => found,
        }
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        lock(&self.headed).push(key.to_owned());
        self.delay().await;
        let found = self.lookup(key)?;
        self.pass_gates(key).await;
        Ok(found.map(|d| d.len() as u64))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.pings.fetch_add(1, Ordering::SeqCst);
        self.delay().await;
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory store is down".into()));
        }
        if self.misconfigured.load(Ordering::SeqCst) {
            return Err(StoreError::Misconfigured("access denied".into()));
        }
        Ok(())
    }

    fn now(&self) -> SystemTime {
        shifted_now(&self.clock_ahead)
    }

    async fn writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        Self::pass(&self.write_gates, key).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory store is down".into()));
        }
        self.take_failure(FailOp::Write, key)?;
        Ok(Box::new(MemoryWriter {
            clock_ahead: self.clock_ahead.clone(),
            objects: self.objects.clone(),
            hooks: self.hooks.clone(),
            key: key.to_owned(),
            buf: Vec::new(),
            answer_lost: self.take_failure(FailOp::WriteAnswer, key).is_err(),
            part_fails: self.take_failure(FailOp::Part, key).is_err(),
        }))
    }

    async fn cleanup_staging(&self, _older_than: std::time::Duration) -> Result<usize, StoreError> {
        Ok(std::mem::take(&mut *lock(&self.staged)).len())
    }

    // Writers buffer in memory and leave nothing behind, unless a test says otherwise.
    async fn stale_staging(
        &self,
        _older_than: std::time::Duration,
    ) -> Result<Vec<String>, StoreError> {
        Ok(lock(&self.staged).clone())
    }

    fn list(&self, prefix: &str) -> ObjectList {
        self.list_after(prefix, "")
    }

    fn list_after(&self, prefix: &str, after: &str) -> ObjectList {
        self.lists.fetch_add(1, Ordering::SeqCst);
        let items: Vec<Result<ObjectInfo, StoreError>> = if self.down.load(Ordering::SeqCst) {
            vec![Err(StoreError::Unavailable("memory store is down".into()))]
        } else if let Err(e) = self.take_failure(FailOp::List, prefix) {
            vec![Err(e)]
        } else {
            // In key order, as S3 lists.
            let mut found: Vec<ObjectInfo> = lock(&self.objects)
                .iter()
                .filter(|(k, _)| k.starts_with(prefix) && k.as_str() > after)
                .map(|(k, v)| ObjectInfo {
                    key: k.clone(),
                    size: v.data.len() as u64,
                    modified: v.modified,
                })
                .collect();
            found.sort_by(|a, b| a.key.cmp(&b.key));
            self.listed_objects.fetch_add(found.len(), Ordering::SeqCst);
            found.into_iter().map(Ok).collect()
        };
        futures::stream::iter(items).boxed()
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.delay().await;
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("memory store is down".into()));
        }
        self.take_failure(FailOp::Delete, key)?;
        lock(&self.encodings).remove(key);
        lock(&self.objects).remove(key);
        let hooks: Vec<Hook> = lock(&self.delete_hooks)
            .iter()
            .filter(|(p, _)| key.starts_with(p.as_str()))
            .map(|(_, h)| h.clone())
            .collect();
        for h in hooks {
            h(key);
        }
        self.take_failure(FailOp::DeleteAnswer, key)
    }

    fn describe(&self) -> String {
        "memory://".into()
    }

    fn redirects_nars(&self) -> bool {
        lock(&self.presign_base).is_some()
    }

    async fn presigned_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(lock(&self.presign_base)
            .as_ref()
            .map(|base| format!("{base}/{key}")))
    }
}

struct MemoryWriter {
    clock_ahead: Arc<AtomicU64>,
    objects: Arc<Mutex<HashMap<String, Stored>>>,
    hooks: Arc<Mutex<Vec<(String, Hook)>>>,
    key: String,
    buf: Vec<u8>,
    /// Committed, then answered with an error ([`FailOp::WriteAnswer`]).
    answer_lost: bool,
    /// The next chunk fails ([`FailOp::Part`]).
    part_fails: bool,
}

#[async_trait]
impl ObjectWriter for MemoryWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        if std::mem::take(&mut self.part_fails) {
            return Err(StoreError::Other(format!(
                "UploadPart {}: NotFound (a test fault)",
                self.key
            )));
        }
        self.buf.extend_from_slice(&chunk);
        Ok(())
    }
    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let this = *self;
        lock(&this.objects).insert(
            this.key.clone(),
            Stored {
                data: Bytes::from(this.buf),
                modified: shifted_now(&this.clock_ahead),
            },
        );
        let hooks: Vec<Hook> = lock(&this.hooks)
            .iter()
            .filter(|(p, _)| this.key.starts_with(p.as_str()))
            .map(|(_, h)| h.clone())
            .collect();
        for h in hooks {
            h(&this.key);
        }
        if this.answer_lost {
            return Err(StoreError::Unavailable(format!(
                "{}: a test fault after the write was applied",
                this.key
            )));
        }
        Ok(())
    }
    async fn abort(self: Box<Self>) {}
}
