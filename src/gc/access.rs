//! Access records: which paths a server served or accepted, without a database and without a
//! store write per request.
//!
//! Each server keeps what it served since its last write in a bounded in-memory set and writes
//! it as one small object, `_cellar/access/<YYYY-MM-DD>/-<HHMMSSmmm>-<process>-<seq>`, every
//! `gc.access_flush_secs`, when the set is full, and at shutdown. The object's modification
//! time is when those paths were last used. A lost write (a crash) costs recency, never data:
//! at worst a path is collected a little early, with its whole closure. Names sort by when
//! their write began, so that a collector re-reading the records while it deletes lists only
//! the last minutes' (a busy day has a hundred thousand).
//!
//! Uploads are the exception: a narinfo about to be accepted is recorded with its references
//! and its NAR, and that record is written before the references and the NAR are checked, so
//! that a collector running at the same time sees what the upload relies on (see
//! [`super::sweep`]).
//!
//! An upload record also names what recently uploaded NARs and the upload address's probes
//! named (a builder probes the whole closure it is about to upload, present paths included):
//! the NAR's record is written while the NAR itself is stored, so a narinfo whose path,
//! references and NAR a record written within [`AccessLog::covering_uploads_for`] already
//! names is accepted without a record of its own, one store round trip sooner
//! ([`AccessLog::covers`]).
//!
//! Reads record the narinfos served and the NARs served: Nix keeps narinfos in its own cache
//! for 30 days (`narinfo-cache-positive-ttl`), so a client substituting a path again may ask
//! for its NAR alone. A NAR read counts as a use of every path whose narinfo names that NAR
//! (several may share one: same contents).
//!
//! Format: a header line `cellar-access 1`, then one entry per line: a store path hash, or
//! `nar/<file>` for a NAR served, or one an upload relies on (in an upload record).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use tokio::time::Instant;

use super::inventory::Meta;
use super::RESERVED_PREFIX;
use crate::nix::{NarInfo, StorePathHash};
use crate::store::{Store, StoreError};
use crate::sync::lock;

/// Where access records live, under [`RESERVED_PREFIX`].
pub const DIR: &str = "access/";

const HEADER: &str = "cellar-access 1";

/// What the key of a record written by an upload ends with.
const UPLOAD_SUFFIX: &str = "-upload";

/// A collector reads an upload record this young whatever its retention (`gc.keep_days`):
/// uploads rely on what it names for [`UPLOAD_COVER`] after writing it, and on a record of
/// their own for the few round trips before their narinfo is written.
pub const UPLOAD_RECORD_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// How long after its write started an upload record stands in for the records of later
/// uploads ([`AccessLog::covering_uploads_for`]). Well within [`UPLOAD_RECORD_LIFETIME`],
/// which leaves room for the upload's own checks and for clocks that differ between this
/// server, the store and the collector.
pub const UPLOAD_COVER: Duration = Duration::from_secs(10 * 60);

/// A moment by this process's monotonic clock and by the store's. How long ago it was is the
/// longer of the two: collectors judge a record by the store's time (its `LastModified`), which
/// goes on through a suspend of this machine (its monotonic clock stops) and jumps with the
/// store's clock; the monotonic clock goes on when a wall clock is set back.
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    at: Instant,
    store: SystemTime,
}

impl Stamp {
    /// Now, the store's time as `store` knows it.
    pub fn now(store: &dyn Store) -> Self {
        Self {
            at: Instant::now(),
            store: store.now(),
        }
    }

    /// The moment by this process's monotonic clock.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// How long before `now` (by both clocks: [`Stamp::now`] read once for many) it was.
    pub fn before(&self, now: Stamp) -> Duration {
        let by_store = now.store.duration_since(self.store).unwrap_or_default();
        now.at.saturating_duration_since(self.at).max(by_store)
    }
}

/// An access record larger than this is corrupt (a full set of 1M entries is ~60 MiB).
const MAX_RECORD_BYTES: u64 = 256 << 20;

/// `t` in UTC.
fn utc(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// `YYYY-MM-DD` (UTC) of `t`: records are grouped by day, so a collector reads only the days
/// within the retention and re-reads only the last ones.
pub fn day(t: SystemTime) -> String {
    let date = utc(t).date();
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// What the name of a record starts with, after its day: `-HHMMSSmmm` (UTC), when its write
/// began by the store's clock. Names sort by time within a day, so a re-read lists only
/// those written since it last looked ([`reread`]). `-` sorts before the hexadecimal digits
/// that began the names of records written by earlier versions (`<process>-<seq>`): a listing
/// that starts after a time still lists every one of those.
pub(super) fn time_of_day(t: SystemTime) -> String {
    let u = utc(t);
    let ms = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_millis();
    format!("-{:02}{:02}{:02}{ms:03}", u.hour(), u.minute(), u.second())
}

/// An upload's record whose write took longer than this, by this machine's clock or by the
/// store's, is written again under a new name: its name is dated when its write began, and
/// a re-read lists only records dated [`REREAD_MARGIN`] before it last looked or later. Also
/// catches a name dated by a clock that was off (before the store's first answer set it
/// right). Longer than a write is given (six request timeouts, docs/configuration.md). A
/// record of uses is not written again: one seen late costs recency only.
pub const WRITE_WITHIN: Duration = Duration::from_secs(5 * 60);

/// How far before its last listing a re-read starts listing records by their names' time:
/// more than [`WRITE_WITHIN`] plus the error of a store clock learnt from `Date` headers.
pub const REREAD_MARGIN: Duration = Duration::from_secs(15 * 60);

/// Writes record `text` as `_cellar/access/<day>/-<time>-<name>`, dated when its write
/// began; an upload's record (`kind` "upload"; "use" otherwise) again under a new date if the
/// write took longer than [`WRITE_WITHIN`], and an error if that one did too. Each try
/// counted as `kind`.
async fn put_record(
    store: &dyn Store,
    name: &str,
    text: String,
    kind: &'static str,
) -> Result<(), StoreError> {
    let text = Bytes::from(text);
    let mut took = Duration::ZERO;
    for _ in 0..2 {
        let began = store.now();
        let started = Instant::now();
        let key = format!(
            "{RESERVED_PREFIX}{DIR}{}/{}-{name}",
            day(began),
            time_of_day(began)
        );
        let written = store.put_bytes(&key, text.clone()).await;
        crate::metrics::access_record(kind, written.is_ok());
        written?;
        // By the store's clock too: the answer to this write may have set it right.
        took = started
            .elapsed()
            .max(store.now().duration_since(began).unwrap_or_default());
        if took <= WRITE_WITHIN || kind != "upload" {
            return Ok(());
        }
        tracing::debug!(
            key,
            ?took,
            "the access record took long to write: writing it anew"
        );
    }
    Err(StoreError::Unavailable(format!(
        "writing an access record took {}s, twice; a collector may not see a record that slow",
        took.as_secs()
    )))
}

/// One line of a record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Entry {
    Path(StorePathHash),
    /// A NAR by file name: served, or (in an upload record) relied on by an upload.
    Nar(Box<str>),
}

pub fn render<E: std::borrow::Borrow<Entry>>(entries: impl IntoIterator<Item = E>) -> String {
    let mut s = format!("{HEADER}\n");
    for e in entries {
        match e.borrow() {
            Entry::Path(h) => s.push_str(h.as_str()),
            Entry::Nar(f) => {
                s.push_str("nar/");
                s.push_str(f);
            }
        }
        s.push('\n');
    }
    s
}

/// Parses a record; the error names the first bad line.
pub fn parse(text: &str) -> Result<Vec<Entry>, String> {
    match parse_lenient(text)? {
        (entries, None) => Ok(entries),
        (_, Some(bad)) => Err(bad),
    }
}

/// Parses a record, keeping the entries of the lines that parse: a damaged line (a record
/// cut or changed by hand) loses only itself, and what the others name still counts as used.
/// Also the first bad line, if any. An error if the record is not one (no header).
fn parse_lenient(text: &str) -> Result<(Vec<Entry>, Option<String>), String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!("does not start with {HEADER:?}"));
    }
    let mut out = Vec::new();
    let mut first_bad = None;
    for (i, line) in lines.enumerate() {
        // A NAR is recorded by its object key, a path by its hash.
        let entry = match crate::store::object_key::nar_file(line) {
            Some(f) => Some(Entry::Nar(f.as_str().into())),
            None => line.parse().ok().map(Entry::Path),
        };
        match entry {
            Some(e) => out.push(e),
            None => {
                first_bad.get_or_insert_with(|| format!("line {}: {line:?}", i + 2));
            }
        }
    }
    Ok((out, first_bad))
}

/// What one server used since its last write.
/// 12 random hex digits naming a process or a run in object keys. Without randomness, time and
/// pid: still distinct between processes.
pub(super) fn random_id() -> String {
    let mut rnd = [0u8; 6];
    if getrandom::getrandom(&mut rnd).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        rnd = ((t.as_nanos() as u64) ^ u64::from(std::process::id())).to_le_bytes()[..6]
            .try_into()
            .unwrap_or_default();
    }
    hex::encode(rnd)
}

pub struct AccessLog {
    store: Arc<dyn Store>,
    /// Random per process, so replicas never overwrite each other's records.
    process: String,
    seq: AtomicU64,
    max_entries: usize,
    // A std Mutex: held for set operations only, never across an await.
    pending: Mutex<HashSet<Entry>>,
    full: tokio::sync::Notify,
    /// One use flush at a time (the flusher's, and the last one at shutdown). Upload records
    /// do not take it: an upload waits for its own record only, never for a large flush
    /// of uses or for another upload's record.
    flushing: tokio::sync::Mutex<()>,
    /// Paths the upload address was asked about, for the next upload record.
    probed: Mutex<HashSet<StorePathHash>>,
    /// When the upload address was last asked about a path.
    last_probe: Mutex<Option<Instant>>,
    /// What upload records named, with when their write started.
    covered: Mutex<Covered>,
    /// How long an upload record stands in for the records of later uploads; zero: never.
    cover_for: Duration,
    /// Paths the upload address found present, waiting for their record
    /// ([`Self::record_found`]).
    found: Mutex<HashSet<StorePathHash>>,
    /// The batch the paths now in `found` will be written in; batches written so far (batch
    /// `b` is written once this is past `b`). Both change under `found`'s lock only.
    found_batch: AtomicU64,
    found_written: AtomicU64,
    /// One write of found paths at a time: those found meanwhile go in the next one.
    found_turn: tokio::sync::Mutex<()>,
    /// The last write of found paths that failed: its batch, and why.
    found_failed: Mutex<Option<(u64, StoreError)>>,
}

impl AccessLog {
    pub fn new(store: Arc<dyn Store>, max_entries: usize) -> Self {
        Self {
            store,
            process: random_id(),
            seq: AtomicU64::new(0),
            max_entries,
            pending: Mutex::new(HashSet::new()),
            full: tokio::sync::Notify::new(),
            flushing: tokio::sync::Mutex::new(()),
            probed: Mutex::new(HashSet::new()),
            last_probe: Mutex::new(None),
            covered: Mutex::new(Covered::default()),
            cover_for: Duration::ZERO,
            found: Mutex::new(HashSet::new()),
            found_batch: AtomicU64::new(0),
            found_written: AtomicU64::new(0),
            found_turn: tokio::sync::Mutex::new(()),
            found_failed: Mutex::new(None),
        }
    }

    /// Lets an upload record stand in for the record of a later narinfo upload for `d` after
    /// its write started ([`UPLOAD_COVER`]; at most that: a collector reads upload records
    /// for [`UPLOAD_RECORD_LIFETIME`] only).
    pub fn covering_uploads_for(mut self, d: Duration) -> Self {
        self.cover_for = d.min(UPLOAD_COVER);
        self
    }

    /// The upload address was asked for the narinfo of `h`: a builder is about to upload
    /// its closure, and `h` is part of it. Named in the next upload record.
    pub fn record_probe(&self, h: StorePathHash) {
        *lock(&self.last_probe) = Some(Instant::now());
        let mut set = lock(&self.probed);
        if set.len() < self.max_entries {
            set.insert(h);
        }
    }

    /// The upload address found the narinfo of `h` present: the builder will skip the path
    /// and rely on it. Returns once an upload record naming it is written, so that a
    /// collection deleting it from then on sees the record and writes it back (the caller
    /// then looks at the path again: one deleted before the record is absent). Probes found
    /// present at once share one write, as a group commit: a builder probes its closure many
    /// paths at a time.
    pub async fn record_found(&self, h: StorePathHash) -> Result<(), StoreError> {
        // Named by an upload record written within the cover: a collector reads that record
        // for longer still (a CI job pushing the same closure every few minutes writes once).
        if !self.cover_for.is_zero() {
            let now = self.stamp();
            let fresh = lock(&self.covered)
                .at
                .get(&Entry::Path(h))
                .is_some_and(|at| at.before(now) < self.cover_for);
            if fresh {
                return Ok(());
            }
        }
        let mine = {
            let mut set = lock(&self.found);
            set.insert(h);
            self.found_batch.load(Ordering::SeqCst)
        };
        let _turn = self.found_turn.lock().await;
        if self.found_written.load(Ordering::SeqCst) > mine {
            return Ok(());
        }
        // The write that held this path failed: said to each caller it held, not tried again
        // by each in turn (with a store timing out, the last of 25 would wait 25 timeouts).
        if let Some((batch, e)) = &*lock(&self.found_failed) {
            if *batch >= mine {
                return Err(e.clone());
            }
        }
        let (taken, batch) = {
            let mut set = lock(&self.found);
            let batch = self.found_batch.fetch_add(1, Ordering::SeqCst);
            (std::mem::take(&mut *set), batch)
        };
        // Until written, they go back if the write fails or is dropped (this request's
        // client gone): the next write names them, for the requests still waiting.
        let mut taken = Taken::new(self, &self.found, taken);
        // Found paths have callers waiting for their record, one each (so as many as requests
        // under way): never dropped.
        taken.bounded = false;
        let entries = taken.items.iter().map(|h| Entry::Path(*h)).collect();
        if let Err(e) = self.write_upload_record(entries).await {
            *lock(&self.found_failed) = Some((batch, e.clone()));
            return Err(e);
        }
        taken.written();
        self.found_written.store(batch + 1, Ordering::SeqCst);
        Ok(())
    }

    /// A NAR is being uploaded (`nar_files`: the name uploaded and the name stored, if
    /// recompressed): writes a record of it and of the paths probed since the last upload
    /// record, so that the narinfo that follows needs no record of its own ([`Self::covers`]).
    /// Only while a builder is at work (a probe within the cover): without probes the
    /// narinfo is never covered (an import, a mirror), and the record would be one write more.
    /// `true` if a record was written.
    pub async fn record_nar_upload(&self, nar_files: &[&str]) -> Result<bool, StoreError> {
        let probing = lock(&self.last_probe).is_some_and(|t| t.elapsed() < self.cover_for);
        if !probing {
            return Ok(false);
        }
        let entries = nar_files.iter().map(|f| Entry::Nar((*f).into())).collect();
        self.write_upload_record(entries).await?;
        Ok(true)
    }

    /// Whether a record written within [`Self::covering_uploads_for`] names the narinfo
    /// `info`, each of its references and each of `nar_files`, so that its upload needs no
    /// record of its own.
    pub fn covers(&self, info: &NarInfo, nar_files: &[&str]) -> bool {
        if self.cover_for.is_zero() {
            return false;
        }
        let now = self.stamp();
        let covered = lock(&self.covered);
        let fresh = |e: &Entry| {
            covered
                .at
                .get(e)
                .is_some_and(|at| at.before(now) < self.cover_for)
        };
        fresh(&Entry::Path(info.hash()))
            && nar_files.iter().all(|f| fresh(&Entry::Nar((*f).into())))
            && info
                .references
                .iter()
                .all(|r| fresh(&Entry::Path(r.hash())))
    }

    /// Whether a record whose write started at `at` still covers uploads by itself (see
    /// [`Self::covers`]): a collector starting now still reads it.
    pub fn still_covers(&self, at: Stamp) -> bool {
        at.before(self.stamp()) < self.cover_for
    }

    /// Now, for [`Self::still_covers`].
    pub fn stamp(&self) -> Stamp {
        Stamp::now(self.store.as_ref())
    }

    /// Entries remembered as covered (the map stays bounded; shown in `/metrics`).
    pub fn covered_len(&self) -> usize {
        lock(&self.covered).at.len()
    }

    /// Forgets the entries no record covers any more, and the memory they took: a server
    /// gone quiet would otherwise keep them until its next upload.
    pub fn let_go_stale(&self) {
        let now = self.stamp();
        lock(&self.covered).let_go_stale(self.cover_for, now);
    }

    /// Writes `entries` and the paths probed since the last upload record as one record, and
    /// remembers them as covered from the moment the write started.
    async fn write_upload_record(&self, mut entries: Vec<Entry>) -> Result<(), StoreError> {
        let probed = std::mem::take(&mut *lock(&self.probed));
        entries.extend(probed.iter().map(|h| Entry::Path(*h)));
        // Until written, the probes go back if the write fails or is dropped (the upload's
        // client gone): the next upload record names them instead.
        let mut taken = Taken::new(self, &self.probed, probed);
        let started = self.stamp();
        self.write(render(&entries), UPLOAD_SUFFIX).await?;
        taken.written();
        if !self.cover_for.is_zero() {
            let now = self.stamp();
            lock(&self.covered).note(entries, started, self.cover_for, self.max_entries, now);
        }
        Ok(())
    }

    /// A narinfo was served.
    pub fn record_path(&self, h: StorePathHash) {
        self.record(Entry::Path(h));
    }

    /// A NAR was served (named as its narinfo's `URL:` names it, without `nar/`).
    pub fn record_nar(&self, file: &str) {
        self.record(Entry::Nar(file.into()));
    }

    fn record(&self, e: Entry) {
        let mut set = lock(&self.pending);
        if set.len() < self.max_entries || set.contains(&e) {
            set.insert(e);
        } else {
            // Full, its write not yet begun (the store slow, or refusing writes): this use is
            // not recorded, and `cellar gc` may not see it.
            crate::metrics::get().access_entries_dropped.inc();
        }
        if set.len() >= self.max_entries {
            self.full.notify_one();
        }
    }

    /// A narinfo is about to be accepted: writes a record of it, its references and its NAR
    /// (`nar_files`: the name uploaded and the name stored, if recompressed) at once, before
    /// they are checked.
    pub async fn record_upload(
        &self,
        info: &NarInfo,
        nar_files: &[&str],
    ) -> Result<(), StoreError> {
        let mut entries = vec![Entry::Path(info.hash())];
        entries.extend(nar_files.iter().map(|f| Entry::Nar((*f).into())));
        entries.extend(info.references.iter().map(|r| Entry::Path(r.hash())));
        self.write_upload_record(entries).await
    }

    /// Writes what was recorded since the last write (nothing if nothing was).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _f = self.flushing.lock().await;
        let entries: Vec<Entry> = std::mem::take(&mut *lock(&self.pending))
            .into_iter()
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        // Kept for the next attempt if the write fails, or is dropped (the flusher stopped at
        // shutdown mid-write: the last flush then writes them).
        // Rendered from the entries taken, not from a copy of them: a full set is large.
        let text = render(&entries);
        let mut taken = Taken::new(self, &self.pending, entries);
        self.write(text, "").await?;
        taken.written();
        Ok(())
    }

    /// Returns what a failed write took from `set` to it, as far as there is room if
    /// `bounded`; what finds none (the set filled again while the write failed) is lost, and
    /// counted so.
    fn put_back<T: std::hash::Hash + Eq>(
        &self,
        set: &Mutex<HashSet<T>>,
        taken: impl IntoIterator<Item = T>,
        bounded: bool,
    ) {
        let mut set = lock(set);
        let mut lost = 0u64;
        for h in taken {
            if bounded && set.len() >= self.max_entries && !set.contains(&h) {
                lost += 1;
                continue;
            }
            set.insert(h);
        }
        if lost > 0 {
            crate::metrics::get().access_entries_dropped.inc_by(lost);
        }
    }

    /// Writes `text` (a rendered record) as a new record whose key ends with `suffix`.
    async fn write(&self, text: String, suffix: &str) -> Result<(), StoreError> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let kind = if suffix == UPLOAD_SUFFIX {
            "upload"
        } else {
            "use"
        };
        let name = format!("{}-{seq:08}{suffix}", self.process);
        put_record(self.store.as_ref(), &name, text, kind).await
    }

    /// Writes every `interval`, and early when the set is full, until the task is aborted.
    pub fn spawn_flusher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failed = false;
            loop {
                if failed {
                    // After a failure, the next try waits for the interval even when the set
                    // is full: a store refusing every write, with requests coming in, would
                    // otherwise be sent the whole set again at once after each refusal.
                    tick.reset();
                    tick.tick().await;
                } else {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = this.full.notified() => {}
                    }
                }
                let flushed = this.flush().await;
                failed = flushed.is_err();
                match flushed {
                    Ok(()) => {}
                    // Credentials that may read but not write: `cellar gc` would then see no
                    // use of what this server serves and collect it by age alone.
                    Err(e @ StoreError::Misconfigured(_)) => tracing::error!(
                        cause = %e,
                        "the store refused the access record: `cellar gc` cannot see what this \
                         server serves; allow it to write objects under _cellar/ (see docs/s3.md)"
                    ),
                    Err(e) => {
                        tracing::warn!(cause = %e, "writing the access record failed; retrying later")
                    }
                }
            }
        })
    }
}

/// What upload records named lately, with when their write started: each stands in for the
/// records of later uploads for the cover ([`AccessLog::covers`]).
#[derive(Default)]
struct Covered {
    at: HashMap<Entry, Stamp>,
    /// The size past which the entries older than the cover are let go: twice what was left
    /// the last time, so that letting go costs a constant time per entry.
    prune_at: usize,
    /// Times it looked for what to let go.
    prunes: u64,
}

/// [`Covered`] is not looked through for what to let go below this many entries.
const COVERED_PRUNE_MIN: usize = 1024;

/// [`Covered`] holds at most this many entries (~150 bytes each), or
/// `gc.access_max_entries` if fewer.
const COVERED_MAX: usize = 250_000;

impl Covered {
    /// Notes `entries`, named by a record whose write started at `started`. With more fresh
    /// entries than three quarters of `max_entries` (or [`COVERED_MAX`]), all are forgotten:
    /// the uploads that they would have covered write records of their own.
    fn note(
        &mut self,
        entries: Vec<Entry>,
        started: Stamp,
        cover: Duration,
        max_entries: usize,
        now: Stamp,
    ) {
        let most = max_entries.min(COVERED_MAX);
        if self.at.len() + entries.len() > self.prune_at.max(COVERED_PRUNE_MIN).min(most) {
            self.prunes += 1;
            self.at.retain(|_, at| at.before(now) < cover);
            // Left at most three quarters full: the next look is a quarter of it away.
            if self.at.len() + entries.len() > most / 4 * 3 {
                self.at.clear();
            }
            crate::sync::give_back_room(&mut self.at);
            self.prune_at = 2 * (self.at.len() + entries.len());
        }
        if entries.len() > most {
            return;
        }
        for e in entries {
            self.at.insert(e, started);
        }
    }

    /// Forgets the entries older than `cover`, and the table's room they leave unused.
    fn let_go_stale(&mut self, cover: Duration, now: Stamp) {
        self.at.retain(|_, at| at.before(now) < cover);
        crate::sync::give_back_room(&mut self.at);
        self.prune_at = 2 * self.at.len();
    }
}

/// What a write took from one of an [`AccessLog`]'s sets: returned to it when dropped unless
/// [`written`](Taken::written), so that neither a failed write nor a dropped one loses it.
struct Taken<'a, T: std::hash::Hash + Eq> {
    log: &'a AccessLog,
    set: &'a Mutex<HashSet<T>>,
    items: Vec<T>,
    /// Whether putting them back respects the set's bound ([`AccessLog::put_back`]).
    bounded: bool,
}

impl<'a, T: std::hash::Hash + Eq> Taken<'a, T> {
    fn new(
        log: &'a AccessLog,
        set: &'a Mutex<HashSet<T>>,
        items: impl IntoIterator<Item = T>,
    ) -> Self {
        Self {
            log,
            set,
            items: items.into_iter().collect(),
            bounded: true,
        }
    }

    fn written(&mut self) {
        self.items.clear();
    }
}

impl<T: std::hash::Hash + Eq> Drop for Taken<'_, T> {
    fn drop(&mut self) {
        if !self.items.is_empty() {
            self.log
                .put_back(self.set, std::mem::take(&mut self.items), self.bounded);
        }
    }
}

/// Writes a record naming `paths` as used now, from outside a server (`cellar pin add`): a
/// collector already running does not see a new pin, but it sees this record, and keeps
/// those paths as it keeps what servers serve meanwhile. Named `<id>-<what>-upload`: read as
/// an upload's record, it keeps its paths for [`UPLOAD_RECORD_LIFETIME`] whatever the
/// retention (`gc.keep_days = 0`) and the budget (`gc.max_bytes`), as a collection starting
/// between this record and the pin itself does not find the pin.
pub async fn record_now(
    store: &dyn Store,
    paths: impl IntoIterator<Item = StorePathHash>,
    what: &str,
) -> Result<(), StoreError> {
    let name = format!("{}-{what}{UPLOAD_SUFFIX}", random_id());
    let record = render(paths.into_iter().map(Entry::Path));
    put_record(store, &name, record, "upload").await
}

/// Access records read by a collector.
#[derive(Debug, Default)]
pub struct Accessed {
    /// When the records were last listed: a re-read lists the records named from
    /// [`REREAD_MARGIN`] before it on (and those named by earlier versions).
    pub listed: Option<SystemTime>,
    /// Each entry with the time it was last used.
    pub seen: HashMap<StorePathHash, SystemTime>,
    /// Each NAR served (or named by an upload), with the time it was last: a use of every
    /// path whose narinfo names it.
    pub nar_seen: HashMap<Box<str>, SystemTime>,
    /// NARs uploads may still rely on: named by upload records younger than
    /// [`UPLOAD_RECORD_LIFETIME`] (or written while the collector runs), kept whether or not
    /// a narinfo names them yet.
    pub nars: HashSet<Box<str>>,
    /// Records already read (re-reads skip them).
    pub read: HashSet<String>,
    /// Records older than the retention: they no longer make anything a root.
    pub expired: Vec<(String, Meta)>,
    /// Records that do not parse, whole or in part (the lines that parse count).
    pub bad: Vec<(String, String)>,
    /// Of those, upload records young enough that an upload may rely on them: what they
    /// protect is not known for sure, so nothing may be collected while they are.
    pub bad_uploads: Vec<(String, String)>,
    /// Paths named by upload records younger than [`UPLOAD_RECORD_LIFETIME`] (and by those
    /// re-reads found): uploads may still rely on them, whatever the retention or the byte
    /// budget.
    pub uploading: HashSet<StorePathHash>,
    /// Entries of records a re-read took (now in `read`) but could not hand over, as it
    /// failed after them: the next re-read hands them over first, so that what they name
    /// is still rescued.
    pending: Vec<Entry>,
}

impl Accessed {
    /// None read yet, as if listed at `t`: a [`reread`] then takes the records named from
    /// [`REREAD_MARGIN`] before it on.
    pub fn since(t: SystemTime) -> Self {
        Self {
            listed: Some(t),
            ..Self::default()
        }
    }
}

/// Reads the records within the retention `keep` before `now`, and upload records within
/// [`UPLOAD_RECORD_LIFETIME`] whatever the retention.
pub async fn read_all(
    store: &dyn Store,
    records: &[(String, Meta)],
    keep: Duration,
    now: SystemTime,
) -> Result<Accessed, StoreError> {
    let mut acc = Accessed {
        listed: Some(now),
        ..Accessed::default()
    };
    let cutoff = now.checked_sub(keep).unwrap_or(UNIX_EPOCH);
    let lifetime_cutoff = now
        .checked_sub(UPLOAD_RECORD_LIFETIME)
        .unwrap_or(UNIX_EPOCH);
    let upload_cutoff = lifetime_cutoff.min(cutoff);
    let mut to_read = Vec::new();
    for (key, meta) in records {
        let limit = if key.ends_with(UPLOAD_SUFFIX) {
            upload_cutoff
        } else {
            cutoff
        };
        if meta.modified < limit {
            // Known, so that re-reads during deletion do not take it for a new record.
            acc.read.insert(key.clone());
            acc.expired.push((key.clone(), *meta));
            continue;
        }
        let in_progress = key.ends_with(UPLOAD_SUFFIX) && meta.modified >= lifetime_cutoff;
        to_read.push((key, meta.modified, in_progress));
    }
    let mut fetched =
        futures::stream::iter(to_read.into_iter().map(|(key, modified, ip)| async move {
            (key, modified, ip, fetch(store, key).await)
        }))
        .buffered(READS_AT_ONCE);
    while let Some((key, modified, in_progress, got)) = fetched.next().await {
        let entries = take(&mut acc, key, modified, in_progress, got?);
        if in_progress {
            acc.uploading
                .extend(entries.into_iter().filter_map(|e| match e {
                    Entry::Path(h) => Some(h),
                    Entry::Nar(_) => None,
                }));
        }
    }
    Ok(acc)
}

/// Records read at once (a busy day has thousands, each a GET).
const READS_AT_ONCE: usize = 16;

/// What reading a record gave: its bytes (`None`: gone since the listing), or why they
/// cannot be a record.
type Fetched = Result<Option<Bytes>, String>;

/// Reads record `key`.
async fn fetch(store: &dyn Store, key: &str) -> Result<Fetched, StoreError> {
    // Stored compressed (`Content-Encoding`, by a tool that copied the bucket) or larger than
    // any record: what it says cannot be read, so it is a damaged record (reported by
    // `verify`, removed by `--repair`), not a store failing, which would stop every run for
    // good.
    Ok(match store.get_bytes(key, MAX_RECORD_BYTES).await {
        Err(StoreError::Encoded { encoding, .. }) => {
            Err(format!("stored with Content-Encoding {encoding}"))
        }
        Err(StoreError::TooLarge { .. }) => Err(format!("larger than {MAX_RECORD_BYTES} bytes")),
        other => Ok(other?),
    })
}

/// Takes record `key`, as read, into `acc`; `in_progress`: an upload record young enough that
/// the upload may still rely on the NARs it names. Its entries.
fn take(
    acc: &mut Accessed,
    key: &str,
    modified: SystemTime,
    in_progress: bool,
    fetched: Fetched,
) -> Vec<Entry> {
    // Read only once it was: a record that failed to read is read again by the next re-read
    // (which fails as long as it does, and nothing is deleted meanwhile).
    acc.read.insert(key.to_owned());
    let raw = match fetched {
        Ok(None) => return Vec::new(),
        Ok(Some(raw)) => Ok(raw),
        Err(why) => Err(why),
    };
    let parsed = raw.and_then(|raw| {
        std::str::from_utf8(&raw)
            .map_err(|_| "not UTF-8".to_owned())
            .and_then(parse_lenient)
    });
    let (entries, bad) = match parsed {
        Ok((entries, bad)) => (entries, bad),
        Err(why) => (Vec::new(), Some(why)),
    };
    if let Some(why) = bad {
        if in_progress {
            acc.bad_uploads.push((key.to_owned(), why.clone()));
        }
        acc.bad.push((key.to_owned(), why));
    }
    for e in &entries {
        match e {
            Entry::Path(h) => {
                let t = acc.seen.entry(*h).or_insert(modified);
                *t = (*t).max(modified);
            }
            Entry::Nar(f) => {
                if in_progress {
                    acc.nars.insert(f.clone());
                }
                let t = acc.nar_seen.entry(f.clone()).or_insert(modified);
                *t = (*t).max(modified);
            }
        }
    }
    entries
}

/// Reads records written since the last read: what servers used while the collector was
/// running. Those named from [`REREAD_MARGIN`] before the last listing on, up to the day after
/// `now` (a run whose reading took days misses none written meanwhile), and those named by
/// earlier versions from the day before the last listing on (a server whose clock is behind
/// writes under yesterday).
pub async fn reread(
    store: &dyn Store,
    acc: &mut Accessed,
    now: SystemTime,
) -> Result<Vec<Entry>, StoreError> {
    let mut fresh = std::mem::take(&mut acc.pending);
    match reread_into(store, acc, now, &mut fresh).await {
        Ok(()) => Ok(fresh),
        Err(e) => {
            acc.pending = fresh;
            Err(e)
        }
    }
}

/// [`reread`], adding to `fresh` the entries of each record as it takes it.
async fn reread_into(
    store: &dyn Store,
    acc: &mut Accessed,
    now: SystemTime,
    fresh: &mut Vec<Entry>,
) -> Result<(), StoreError> {
    const DAY: Duration = Duration::from_secs(86400);
    // A damaged record of an upload under way was read once: what it protects stays unknown
    // for as long as the run lasts, so every re-read fails, and nothing more is deleted.
    if let Some((key, why)) = acc.bad_uploads.first() {
        return Err(StoreError::Other(format!(
            "the upload record {key} does not parse ({why}); {BAD_UPLOAD_RECORD_HELP}"
        )));
    }
    let since = acc.listed.unwrap_or(now).min(now);
    // Records dated before this were listed by then ([`WRITE_WITHIN`]).
    let from = since.checked_sub(REREAD_MARGIN).unwrap_or(since);
    let mut t = since.checked_sub(DAY).unwrap_or(since);
    let mut days = Vec::new();
    while day(t) <= day(now + DAY) && days.len() < MAX_REREAD_DAYS {
        days.push(day(t));
        t += DAY;
    }
    for d in days {
        let prefix = format!("{RESERVED_PREFIX}{DIR}{d}/");
        // Records named by earlier versions (not dated) are listed whatever their day.
        let after = match d.cmp(&day(from)) {
            std::cmp::Ordering::Less => Some(format!("{prefix}{UNDATED_AFTER}")),
            std::cmp::Ordering::Equal => Some(format!("{prefix}{}", time_of_day(from))),
            std::cmp::Ordering::Greater => None,
        };
        let listing = match &after {
            Some(a) => store.list_after(&prefix, a),
            None => store.list(&prefix),
        };
        let new: Vec<_> = listing
            .try_filter(|o| futures::future::ready(!acc.read.contains(&o.key)))
            .try_collect()
            .await?;
        let mut fetched = futures::stream::iter(
            new.iter()
                .map(|o| async move { (o, fetch(store, &o.key).await) }),
        )
        .buffered(READS_AT_ONCE);
        while let Some((o, got)) = fetched.next().await {
            let upload = o.key.ends_with(UPLOAD_SUFFIX);
            let entries = take(acc, &o.key, o.modified, upload, got?);
            // What an upload under way relies on is not known: no deletion may go on.
            if let Some((key, why)) = acc.bad_uploads.last().filter(|(k, _)| *k == o.key) {
                return Err(StoreError::Other(format!(
                    "the upload record {key} does not parse ({why}); {BAD_UPLOAD_RECORD_HELP}"
                )));
            }
            if upload {
                acc.uploading.extend(entries.iter().filter_map(|e| match e {
                    Entry::Path(h) => Some(*h),
                    Entry::Nar(_) => None,
                }));
            }
            fresh.extend(entries);
        }
    }
    acc.listed = Some(now);
    Ok(())
}

/// Sorts after every dated record name of a day ([`time_of_day`]) and before every undated
/// one (hexadecimal).
const UNDATED_AFTER: &str = "-~";

/// What to do about an upload record that does not parse, which stops every deletion: it
/// matters for [`UPLOAD_RECORD_LIFETIME`] after it was written (its upload may still be under way),
/// and `cellar verify --repair` removes it only then.
pub const BAD_UPLOAD_RECORD_HELP: &str = "it stops mattering 30 minutes after it was \
    written, and runs go on then (`cellar verify --repair` removes it); to go on sooner, \
    delete it once no upload is under way";

/// Days a re-read lists at most (a year): bounds the walk if the clock jumped.
const MAX_REREAD_DAYS: usize = 366;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_civil_dates() {
        for (secs, want) in [
            (0, "1970-01-01"),
            (951_782_400, "2000-02-29"),
            // Around the century years that are not leap years, and one that is.
            (951_868_800, "2000-03-01"),
            (1_767_225_599, "2025-12-31"),
            (4_107_542_399, "2100-02-28"),
            (4_107_542_400, "2100-03-01"),
        ] {
            assert_eq!(day(UNIX_EPOCH + Duration::from_secs(secs)), want, "{secs}");
        }
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let h: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
        let nar = "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz";
        let entries = vec![Entry::Path(h), Entry::Nar(nar.into())];
        assert_eq!(parse(&render(entries.clone())).unwrap(), entries);
        assert!(parse("garbage").is_err());
        assert!(parse(&format!("{HEADER}\nnothash\n")).is_err());
    }

    fn meta(modified: SystemTime) -> Meta {
        Meta { size: 10, modified }
    }

    /// The flusher writes what was served once per interval (and at once when it starts),
    /// not sooner: virtual time, advanced by the runtime only while every task waits.
    #[tokio::test(start_paused = true)]
    async fn the_flusher_writes_once_per_interval() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let (tx, mut written) = tokio::sync::mpsc::unbounded_channel();
        mem.after_write("_cellar/access/", move |k| {
            let _ = tx.send((k.to_owned(), Instant::now()));
        });
        let log = Arc::new(AccessLog::new(mem.clone(), 1000));
        let (a, b): (StorePathHash, StorePathHash) = (
            "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap(),
            "0c9v4an6h4s2b3x3z8jgy3r0n9v7q3ph".parse().unwrap(),
        );
        let start = Instant::now();
        log.record_path(a);
        let flusher = log.spawn_flusher(Duration::from_secs(60));
        let named = |key: &str, h: StorePathHash| {
            let text = String::from_utf8(mem.bytes(key).unwrap().to_vec()).unwrap();
            parse(&text).unwrap().contains(&Entry::Path(h))
        };
        let (first, at) = written.recv().await.unwrap();
        assert!(named(&first, a));
        assert_eq!(at, start, "the first record is written at once");
        log.record_path(b);
        let (second, at) = written.recv().await.unwrap();
        assert!(named(&second, b) && !named(&second, a));
        assert_eq!(at - start, Duration::from_secs(60), "one interval later");
        flusher.abort();
    }

    /// Paths found present while a record of found paths is being written share the next
    /// write (a builder probes its closure 25 paths at a time; one write each would cost a
    /// round trip per path); each call returns once a record naming its path is written; a
    /// write that fails fails its own caller only, and what it held goes in the next one.
    #[tokio::test]
    async fn paths_found_present_together_share_a_record() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = Arc::new(AccessLog::new(mem.clone(), 1000));
        let hashes: Vec<StorePathHash> = (0..10u8)
            .map(|i| {
                format!("{}bxnj2gfflqa529lddzh3zhcn45nn86r", i)
                    .parse()
                    .unwrap()
            })
            .collect();
        mem.fail(
            crate::store::memory::FailOp::Write,
            "_cellar/access/*",
            0,
            1,
        );
        let first = tokio::spawn({
            let log = log.clone();
            let h = hashes[0];
            async move { log.record_found(h).await }
        });
        // The first write fails (the store refusing it): its caller is told.
        assert!(first.await.unwrap().is_err());
        assert!(mem.keys().is_empty());
        let gate = mem.hold_writes("_cellar/access/");
        let calls: Vec<_> = hashes[1..]
            .iter()
            .map(|h| {
                let (log, h) = (log.clone(), *h);
                tokio::spawn(async move { log.record_found(h).await })
            })
            .collect();
        gate.reached().await;
        // Every other call has put its path in and waits for its turn.
        while lock(&log.found).len() < 8 {
            tokio::task::yield_now().await;
        }
        gate.open();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        let keys = mem.keys();
        assert_eq!(
            keys.len(),
            2,
            "one write held, one for all the rest: {keys:?}"
        );
        let named: HashSet<Entry> = keys
            .iter()
            .flat_map(|k| parse(std::str::from_utf8(&mem.bytes(k).unwrap()).unwrap()).unwrap())
            .collect();
        for h in &hashes {
            assert!(named.contains(&Entry::Path(*h)), "{h} not named");
        }
        assert!(keys.iter().all(|k| k.ends_with(UPLOAD_SUFFIX)), "{keys:?}");
    }

    /// A failed write of found paths fails every caller whose path it held at once, not one
    /// after another each with a write of its own (with a store timing out, the last of a
    /// builder's 25 probes would wait 25 timeouts).
    #[tokio::test]
    async fn a_failed_record_of_found_paths_fails_all_it_held_at_once() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = Arc::new(AccessLog::new(mem.clone(), 1000));
        let hashes: Vec<StorePathHash> = (0..3u8)
            .map(|i| {
                format!("{}bxnj2gfflqa529lddzh3zhcn45nn86r", i)
                    .parse()
                    .unwrap()
            })
            .collect();
        let call = |h: StorePathHash| {
            let log = log.clone();
            tokio::spawn(async move { log.record_found(h).await })
        };
        let gate = mem.hold_writes("_cellar/access/");
        let first = call(hashes[0]);
        gate.reached().await;
        let (a, b) = (call(hashes[1]), call(hashes[2]));
        while lock(&log.found).len() < 2 {
            tokio::task::yield_now().await;
        }
        // The first write passes, the next (holding both others) fails.
        mem.fail(
            crate::store::memory::FailOp::Write,
            "_cellar/access/*",
            1,
            1,
        );
        let writes = mem.writes();
        gate.open();
        first.await.unwrap().unwrap();
        assert!(a.await.unwrap().is_err());
        assert!(b.await.unwrap().is_err());
        assert_eq!(
            mem.writes() - writes,
            1,
            "one write for both, after the first"
        );
        // Their paths are written by the next one found.
        let later: StorePathHash = "9bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
        log.record_found(later).await.unwrap();
        let named: HashSet<Entry> = mem
            .keys()
            .iter()
            .flat_map(|k| parse(std::str::from_utf8(&mem.bytes(k).unwrap()).unwrap()).unwrap())
            .collect();
        for h in hashes.iter().chain([&later]) {
            assert!(named.contains(&Entry::Path(*h)), "{h} not named");
        }
    }

    /// A path an upload record written within the cover names needs no record of its own: a
    /// collector reads that one for longer still (a CI job pushing the same closure every few
    /// minutes writes once).
    #[tokio::test(start_paused = true)]
    async fn a_path_found_present_again_within_the_cover_writes_nothing() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = AccessLog::new(mem.clone(), 1000).covering_uploads_for(UPLOAD_COVER);
        let h: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
        log.record_found(h).await.unwrap();
        let writes = mem.writes();
        log.record_found(h).await.unwrap();
        assert_eq!(mem.writes(), writes, "written again within the cover");
        tokio::time::advance(UPLOAD_COVER).await;
        log.record_found(h).await.unwrap();
        assert_eq!(mem.writes(), writes + 1, "not written again past the cover");
    }

    /// A write the store refuses is counted as failed and loses nothing: the next flush
    /// writes what it held.
    #[tokio::test]
    async fn a_failed_write_is_counted_and_kept_for_the_next() {
        let count = |result: &'static str| {
            crate::metrics::get()
                .access_records
                .get(&crate::metrics::AccessRecordLabels {
                    kind: "use",
                    result,
                })
                .map_or(0, |c| c.get())
        };
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = AccessLog::new(mem.clone(), 1000);
        let h: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
        log.record_path(h);
        mem.set_down(true);
        let failed = count("failed");
        log.flush().await.unwrap_err();
        assert!(count("failed") > failed, "the failure is counted");
        mem.set_down(false);
        let written = count("written");
        log.flush().await.unwrap();
        assert!(count("written") > written, "the write is counted");
        let keys = mem.keys();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let text = String::from_utf8(mem.bytes(&keys[0]).unwrap().to_vec()).unwrap();
        assert!(parse(&text).unwrap().contains(&Entry::Path(h)));
    }

    /// A store refusing every write, with requests coming in while the set is full, is tried
    /// once per interval, not again after each refusal (the whole set re-sent in a loop).
    #[tokio::test(start_paused = true)]
    async fn a_full_set_the_store_refuses_is_tried_once_per_interval() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let (tx, mut written) = tokio::sync::mpsc::unbounded_channel();
        mem.after_write("_cellar/access/", move |_| {
            let _ = tx.send(Instant::now());
        });
        let log = Arc::new(AccessLog::new(mem.clone(), 1000));
        let hash = |i: usize| -> StorePathHash {
            let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
            let mut s = [b'0'; 32];
            let mut n = i;
            for c in s.iter_mut().rev().take(4) {
                *c = alphabet[n % 32];
                n /= 32;
            }
            std::str::from_utf8(&s).unwrap().parse().unwrap()
        };
        for i in 0..1000 {
            log.record_path(hash(i));
        }
        mem.set_down(true);
        let start = Instant::now();
        let flusher = log.spawn_flusher(Duration::from_secs(60));
        while mem.writes() == 0 {
            tokio::task::yield_now().await;
        }
        // Requests go on while the store refuses: each finds the set full.
        for i in 1000..1200 {
            log.record_path(hash(i));
            tokio::task::yield_now().await;
        }
        assert_eq!(mem.writes(), 1, "tried again before the interval");
        mem.set_down(false);
        let at = written.recv().await.unwrap();
        assert_eq!(at - start, Duration::from_secs(60));
        assert_eq!(mem.writes(), 2);
        flusher.abort();
    }

    /// A flush dropped while it writes (the flusher stopped at shutdown) loses nothing: the
    /// next flush, the last one, writes what it had taken.
    /// An upload's record is written while a flush of uses is under way (a large one takes
    /// seconds): it does not wait for it.
    #[tokio::test]
    async fn an_upload_record_does_not_wait_for_a_flush_of_uses() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = AccessLog::new(mem.clone(), 1000).covering_uploads_for(UPLOAD_COVER);
        let h: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
        log.record_path(h);
        log.record_probe(h);
        // The flush is the first write: sequence number 0.
        let first = format!("{RESERVED_PREFIX}{DIR}*-{}-00000000", log.process);
        let gate = mem.hold_writes(&first);
        let flush = log.flush();
        tokio::pin!(flush);
        tokio::select! {
            _ = &mut flush => panic!("the flush went through the gate"),
            () = gate.reached() => {}
        }
        let record =
            tokio::time::timeout(Duration::from_secs(60), log.record_nar_upload(&["x.nar"]));
        tokio::select! {
            _ = &mut flush => panic!("the flush went through the gate"),
            written = record => assert!(written.expect("waited for the flush").unwrap()),
        }
        assert!(mem.keys().iter().any(|k| k.ends_with(UPLOAD_SUFFIX)));
        gate.open();
        flush.await.unwrap();
        assert_eq!(mem.keys().len(), 2, "{:?}", mem.keys());
    }

    #[tokio::test]
    async fn a_flush_dropped_mid_write_leaves_its_entries_for_the_next() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = AccessLog::new(mem.clone(), 1000);
        let h: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
        log.record_path(h);
        let gate = mem.hold_writes("_cellar/access/");
        {
            let flush = log.flush();
            tokio::pin!(flush);
            tokio::select! {
                _ = &mut flush => panic!("the write went through the gate"),
                () = gate.reached() => {}
            }
        }
        gate.open();
        log.flush().await.unwrap();
        let keys = mem.keys();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let text = String::from_utf8(mem.bytes(&keys[0]).unwrap().to_vec()).unwrap();
        assert!(parse(&text).unwrap().contains(&Entry::Path(h)));
    }

    /// A path is covered only when its own hash, every reference and its NAR were named by a
    /// record started within the cover.
    #[tokio::test(start_paused = true)]
    async fn covers_needs_the_path_its_references_and_its_nar() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = AccessLog::new(mem.clone(), 1000).covering_uploads_for(UPLOAD_COVER);
        let (top, dep) = (
            "6bxnj2gfflqa529lddzh3zhcn45nn86r",
            "0c9v4an6h4s2b3x3z8jgy3r0n9v7q3ph",
        );
        let nar = "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz";
        let text = format!(
            "StorePath: /nix/store/{top}-top\nURL: nar/{nar}\nCompression: xz\n\
             NarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\n\
             NarSize: 8\nReferences: {dep}-dep\n"
        );
        let info = NarInfo::parse(&text, "/nix/store").unwrap();
        assert!(!log.covers(&info, &[nar]), "nothing recorded yet");
        log.record_probe(info.hash());
        assert!(log.record_nar_upload(&[nar]).await.unwrap(), "written");
        assert!(!log.covers(&info, &[nar]), "the reference was not probed");
        log.record_probe(dep.parse().unwrap());
        log.record_nar_upload(&[nar]).await.unwrap();
        assert!(log.covers(&info, &[nar]));
        assert!(
            !log.covers(&info, &[nar, "other.nar"]),
            "a NAR not recorded"
        );
        tokio::time::advance(UPLOAD_COVER).await;
        assert!(!log.covers(&info, &[nar]), "older than the cover");
        // Without a cover, NAR uploads write nothing and nothing is covered.
        let off = AccessLog::new(mem.clone(), 1000);
        let before = mem.keys().len();
        off.record_probe(info.hash());
        assert!(!off.record_nar_upload(&[nar]).await.unwrap(), "not written");
        assert_eq!(mem.keys().len(), before);
        assert!(!off.covers(&info, &[nar]));
    }

    /// Upload records are read for [`UPLOAD_RECORD_LIFETIME`] even past the retention (uploads
    /// rely on them for [`UPLOAD_COVER`]); other records only within it.
    #[tokio::test]
    async fn young_upload_records_are_read_whatever_the_retention() {
        let mem = crate::store::memory::MemoryStore::new();
        let now = SystemTime::now();
        let h: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
        let old: StorePathHash = "0c9v4an6h4s2b3x3z8jgy3r0n9v7q3ph".parse().unwrap();
        let young = now - Duration::from_secs(60);
        let records = vec![
            ("_cellar/access/d/p-1-upload".to_owned(), meta(young)),
            ("_cellar/access/d/p-2".to_owned(), meta(young)),
            (
                "_cellar/access/d/p-3-upload".to_owned(),
                meta(now - UPLOAD_RECORD_LIFETIME - Duration::from_secs(1)),
            ),
            (
                "_cellar/access/d/p-4-upload".to_owned(),
                meta(now - UPLOAD_RECORD_LIFETIME),
            ),
        ];
        let edge: StorePathHash = "1b8m03r63zqhnjf7l5wnldhh7c134ap5".parse().unwrap();
        mem.insert(&records[0].0, render([Entry::Path(h)]));
        mem.insert(&records[1].0, render([Entry::Path(old)]));
        mem.insert(&records[2].0, render([Entry::Path(old)]));
        mem.insert(&records[3].0, render([Entry::Path(edge)]));
        let acc = read_all(&mem, &records, Duration::ZERO, now).await.unwrap();
        let mut seen: Vec<_> = acc.seen.keys().copied().collect();
        seen.sort_by_key(|h| h.to_string());
        let mut want = vec![h, edge];
        want.sort_by_key(|h| h.to_string());
        assert_eq!(seen, want, "exactly as old as the lifetime still counts");
        assert_eq!(acc.expired.len(), 2);
        let acc = read_all(&mem, &records, Duration::from_secs(3600), now)
            .await
            .unwrap();
        assert_eq!(
            acc.seen.len(),
            3,
            "within the retention, every kind is read"
        );
    }

    /// The lifetimes the docs give (docs/gc.md): an upload record is read for 30 minutes, and
    /// stands in for later uploads' records for 10 (well within it).
    #[test]
    fn upload_records_live_30_minutes_and_cover_for_10() {
        assert_eq!(UPLOAD_RECORD_LIFETIME, Duration::from_secs(1800));
        assert_eq!(UPLOAD_COVER, Duration::from_secs(600));
    }

    /// The sets of uses and of probes hold at most `max_entries` each.
    #[test]
    fn the_sets_hold_at_most_max_entries() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = AccessLog::new(mem, 1000);
        let dropped = || crate::metrics::get().access_entries_dropped.get();
        let before = dropped();
        for i in 0..1001u32 {
            let nix32 = crate::nix::Sha256::digest(&i.to_le_bytes()).to_nix32();
            let h: StorePathHash = nix32[..32].parse().unwrap();
            log.record_path(h);
            log.record_probe(h);
        }
        assert_eq!(lock(&log.pending).len(), 1000);
        assert_eq!(lock(&log.probed).len(), 1000);
        // Counted (other tests' logs may count at the same time: at least this one).
        assert!(dropped() > before, "the use dropped was not counted");
    }

    /// Entries a failed write takes back that find the set full again (traffic went on while
    /// the store refused the write) are lost, and counted as dropped; those still in the set
    /// are not lost.
    #[test]
    fn entries_a_failed_write_cannot_put_back_are_counted_as_dropped() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = AccessLog::new(mem, 1000);
        let hash = |i: u32| -> StorePathHash {
            let nix32 = crate::nix::Sha256::digest(&i.to_le_bytes()).to_nix32();
            nix32[..32].parse().unwrap()
        };
        for i in 0..1000 {
            log.record_path(hash(i));
        }
        let dropped = || crate::metrics::get().access_entries_dropped.get();
        let before = dropped();
        // Taken by a write that failed: 300 of them are in the set again, 700 are not.
        let taken: Vec<Entry> = (700..1700).map(|i| Entry::Path(hash(i))).collect();
        log.put_back(&log.pending, taken, true);
        assert_eq!(lock(&log.pending).len(), 1000);
        let counted = dropped() - before;
        // (Other tests may count at the same time: at least these.)
        assert!((700..1000).contains(&counted), "{counted} counted");
    }

    /// A damaged record of an upload under way fails every re-read after it was found, not
    /// only the one that read it (it is not read again).
    #[tokio::test]
    async fn a_damaged_upload_record_fails_every_reread() {
        let mem = crate::store::memory::MemoryStore::new();
        let now = SystemTime::now();
        let key = format!("{RESERVED_PREFIX}{DIR}{}/r{UPLOAD_SUFFIX}", day(now));
        let mut acc = Accessed {
            listed: Some(now),
            ..Accessed::default()
        };
        mem.insert(&key, "not a record");
        for _ in 0..2 {
            assert!(reread(&mem, &mut acc, now).await.is_err());
        }
        assert_eq!(acc.bad_uploads.len(), 1);
    }

    /// A re-read lists each day from the one before the last listing to the one after now
    /// (clocks differ), and at most a year of days.
    #[tokio::test]
    async fn a_reread_lists_each_day_since_the_last_listing() {
        const DAY: Duration = Duration::from_secs(86400);
        let mem = crate::store::memory::MemoryStore::new();
        let now = SystemTime::now();
        for (since, days) in [(DAY, 4), (400 * DAY, MAX_REREAD_DAYS)] {
            let mut acc = Accessed {
                listed: Some(now - since),
                ..Accessed::default()
            };
            let before = mem.lists();
            reread(&mem, &mut acc, now).await.unwrap();
            assert_eq!(mem.lists() - before, days, "listed {since:?} ago");
            assert_eq!(acc.listed, Some(now));
        }
    }

    /// A re-read lists the records dated from [`REREAD_MARGIN`] before its last listing on,
    /// and every record named by earlier versions (not dated), yesterday's too: not the
    /// day's others (a busy day has a hundred thousand, and a collector re-reads before each
    /// batch it deletes).
    #[tokio::test]
    async fn a_reread_lists_only_the_records_dated_since_it_last_looked() {
        const DAY: Duration = Duration::from_secs(86400);
        let mem = crate::store::memory::MemoryStore::new();
        let now = SystemTime::now();
        let since = now - Duration::from_secs(30);
        let hash = |i: u32| -> StorePathHash {
            let nix32 = crate::nix::Sha256::digest(&i.to_le_bytes()).to_nix32();
            nix32[..32].parse().unwrap()
        };
        let dated = |t: SystemTime, name: &str, h: StorePathHash| {
            let key = format!("{RESERVED_PREFIX}{DIR}{}/{}-{name}", day(t), time_of_day(t));
            mem.insert_at(&key, render([Entry::Path(h)]), t);
        };
        let undated = |t: SystemTime, name: &str, h: StorePathHash| {
            let key = format!("{RESERVED_PREFIX}{DIR}{}/{name}", day(t));
            mem.insert_at(&key, render([Entry::Path(h)]), t);
        };
        // Listed by then: an hour before, and yesterday.
        for i in 0..100 {
            dated(
                now - Duration::from_secs(3600),
                &format!("p-{i:08}"),
                hash(i),
            );
        }
        dated(now - DAY, "p-00000100", hash(100));
        // Since, or within the margin before it.
        dated(now, "q-00000000-upload", hash(200));
        // Ten minutes: a write may take five ([`WRITE_WITHIN`]), with clocks off by a few.
        dated(since - Duration::from_secs(600), "q-00000001", hash(201));
        // By an earlier version, today and yesterday.
        undated(now, "0123456789ab-00000007-upload", hash(202));
        undated(now - DAY, "fedcba987654-00000003", hash(203));
        let mut acc = Accessed::since(since);
        let before = mem.listed_objects();
        let fresh: HashSet<Entry> = reread(&mem, &mut acc, now)
            .await
            .unwrap()
            .into_iter()
            .collect();
        let want: HashSet<Entry> = (200..204).map(|i| Entry::Path(hash(i))).collect();
        assert_eq!(fresh, want);
        assert_eq!(mem.listed_objects() - before, 4, "listed only those");
    }

    /// An upload's record whose write took longer than [`WRITE_WITHIN`] is written again
    /// under a new date, as its first date may be before a re-read's listing that did not see
    /// it; written slowly twice, the upload it is for is refused.
    #[tokio::test(start_paused = true)]
    async fn a_record_slow_to_write_is_written_again_dated_anew() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = AccessLog::new(mem.clone(), 1000);
        // Each try of a write held at a gate of its own, for its time in `took`.
        let write = |name: &'static str, suffix: &'static str, took: &'static [Duration]| {
            let (mem, log) = (mem.clone(), &log);
            async move {
                let before = mem.writes();
                let mut gate = mem.hold_writes("_cellar/access/");
                let written = log.write(render([Entry::Nar(name.into())]), suffix);
                tokio::pin!(written);
                for (i, slow) in took.iter().enumerate() {
                    tokio::select! {
                        _ = &mut written => panic!("try {i} went through the gate"),
                        () = gate.reached() => {}
                    }
                    tokio::time::advance(*slow).await;
                    let held = gate;
                    gate = mem.hold_writes("_cellar/access/");
                    held.open();
                }
                gate.open();
                (written.await, mem.writes() - before)
            }
        };
        const SLOW: Duration = Duration::from_secs(WRITE_WITHIN.as_secs() + 1);
        let (first, writes) = write("x.nar", UPLOAD_SUFFIX, &[SLOW, Duration::ZERO]).await;
        assert!(first.is_ok() && writes == 2, "{first:?}, {writes} writes");
        let (fast, writes) = write("y.nar", UPLOAD_SUFFIX, &[WRITE_WITHIN]).await;
        assert!(fast.is_ok() && writes == 1, "{fast:?}, {writes} writes");
        // A record of uses, seen late, costs recency only: written once (a large one over a
        // slow uplink would be sent again and again).
        let (uses, writes) = write("u.nar", "", &[SLOW]).await;
        assert!(uses.is_ok() && writes == 1, "{uses:?}, {writes} writes");
        let (twice, writes) = write("z.nar", UPLOAD_SUFFIX, &[SLOW, SLOW]).await;
        assert!(
            matches!(twice, Err(StoreError::Unavailable(_))) && writes == 2,
            "{twice:?}, {writes} writes"
        );
    }

    /// A record that could not be read is read by the next re-read: until it is, the re-reads
    /// fail (and nothing is deleted), and it is not taken for read.
    #[tokio::test]
    async fn a_record_that_failed_to_read_is_read_again() {
        use crate::store::memory::{FailOp, MemoryStore};
        let mem = MemoryStore::new();
        let now = SystemTime::now();
        let mut acc = read_all(&mem, &[], Duration::from_secs(3600), now)
            .await
            .unwrap();
        let key = format!("{RESERVED_PREFIX}{DIR}{}/p-1-upload", day(now));
        mem.insert(&key, render([Entry::Nar(NAR.into())]));
        mem.fail(FailOp::Read, &key, 0, 1);
        // One read before it in the failed re-read: taken then (not read again), and its
        // entries handed over by the next re-read, so that what it names is still rescued.
        let used: StorePathHash = "0c6kzph7q0gbwm8yd1bhcxvq58a1f5xq".parse().unwrap();
        let before = format!("{RESERVED_PREFIX}{DIR}{}/a-0", day(now));
        mem.insert(&before, render([Entry::Path(used)]));
        assert!(reread(&mem, &mut acc, now).await.is_err());
        assert!(acc.read.contains(&before));
        let fresh = reread(&mem, &mut acc, now).await.unwrap();
        assert_eq!(fresh, vec![Entry::Path(used), Entry::Nar(NAR.into())]);
        assert!(acc.nars.contains(NAR));
        assert!(reread(&mem, &mut acc, now).await.unwrap().is_empty());
    }

    /// A run whose reading took days re-reads the records of every day since its listing, not
    /// only of the days around the re-read: none written meanwhile is missed.
    #[tokio::test]
    async fn a_reread_days_later_reads_every_day_since_the_listing() {
        use crate::store::memory::MemoryStore;
        const DAY: Duration = Duration::from_secs(86400);
        let mem = MemoryStore::new();
        let now = SystemTime::now();
        let mut acc = read_all(&mem, &[], Duration::from_secs(3600), now)
            .await
            .unwrap();
        let key = format!("{RESERVED_PREFIX}{DIR}{}/p-1-upload", day(now + DAY));
        mem.insert(&key, render([Entry::Nar(NAR.into())]));
        let fresh = reread(&mem, &mut acc, now + 3 * DAY).await.unwrap();
        assert_eq!(fresh, vec![Entry::Nar(NAR.into())]);
        assert_eq!(acc.listed, Some(now + 3 * DAY));
    }

    fn hashes(n: usize) -> Vec<StorePathHash> {
        (0..n)
            .map(|i| {
                let mut s = format!("{i:0>32}");
                s = s.replace('0', "a").replace('1', "b").replace('2', "c");
                s = s.replace('3', "d").replace('4', "f").replace('5', "g");
                s = s.replace('6', "h").replace('7', "i").replace('8', "j");
                s.replace('9', "k").parse().unwrap()
            })
            .collect()
    }

    const NAR: &str = "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz";

    async fn named_in(mem: &crate::store::memory::MemoryStore, key: &str) -> Vec<Entry> {
        let raw = mem.get_bytes(key, 1 << 20).await.unwrap().unwrap();
        parse(std::str::from_utf8(&raw).unwrap()).unwrap()
    }

    /// Probes beyond `gc.access_max_entries` are dropped, not held without bound; probes a
    /// failed record could not name are named by the next one.
    #[tokio::test]
    async fn probes_are_bounded_and_survive_a_failed_write() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = AccessLog::new(mem.clone(), 3).covering_uploads_for(UPLOAD_COVER);
        let hs = hashes(5);
        for h in &hs {
            log.record_probe(*h);
        }
        mem.set_down(true);
        log.record_nar_upload(&[NAR]).await.unwrap_err();
        mem.set_down(false);
        log.record_nar_upload(&[NAR]).await.unwrap();
        let keys = mem.keys();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let named = named_in(&mem, &keys[0]).await;
        let paths = named.iter().filter(|e| matches!(e, Entry::Path(_))).count();
        assert_eq!(paths, 3, "at most access_max_entries probes: {named:?}");
    }

    /// A record covers uploads for the cover by the store's time as well as by this
    /// process's: a path it named is found covered no more once the store's clock is past it
    /// (a jump, a suspend of this machine), and a probe of it writes a record again.
    #[tokio::test]
    async fn the_cover_ends_by_the_stores_time_too() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = AccessLog::new(mem.clone(), 1000).covering_uploads_for(UPLOAD_COVER);
        let h = hashes(1)[0];
        log.record_probe(h);
        let started = log.stamp();
        log.record_nar_upload(&[NAR]).await.unwrap();
        let written = mem.keys().len();
        log.record_found(h).await.unwrap();
        assert_eq!(mem.keys().len(), written, "covered: no record of its own");
        assert!(log.still_covers(started));
        mem.set_clock_ahead(UPLOAD_COVER);
        assert!(!log.still_covers(started));
        log.record_found(h).await.unwrap();
        assert_eq!(mem.keys().len(), written + 1, "a record of its own");
    }

    /// Fresh entries noted one by one are looked through at doubling sizes only, not at each
    /// (a record naming one NAR and one path, per upload, a hundred thousand in the cover).
    #[tokio::test(start_paused = true)]
    async fn covered_entries_are_looked_through_at_doubling_sizes() {
        let mut c = Covered::default();
        // The store's clock stands still here; the monotonic one counts.
        let stamp = || Stamp {
            at: Instant::now(),
            store: UNIX_EPOCH,
        };
        let now = stamp();
        for i in 0..20_000 {
            c.note(
                vec![Entry::Nar(format!("{i}.nar").into())],
                now,
                UPLOAD_COVER,
                100_000,
                stamp(),
            );
        }
        assert_eq!(c.at.len(), 20_000);
        assert!(c.prunes <= 6, "{} times", c.prunes);
        // At the bound, as many uploads a second as age out: not a look at each.
        let mut c = Covered::default();
        let cover = Duration::from_secs(1000);
        for i in 0..3000 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let e = Entry::Nar(format!("{i}.nar").into());
            c.note(vec![e], stamp(), cover, 1000, stamp());
        }
        assert!(c.prunes <= 10, "{} times", c.prunes);
    }

    /// What records covered is forgotten once older than the cover, so the map stays bounded
    /// (by `gc.access_max_entries` here): stale entries are dropped when a record would take
    /// it over the bound, and if it is full of fresh ones, all are forgotten (the uploads they
    /// would cover write records of their own).
    #[tokio::test(start_paused = true)]
    async fn covered_entries_are_pruned_once_stale() {
        let mem = Arc::new(crate::store::memory::MemoryStore::new());
        let log = AccessLog::new(mem.clone(), 1000).covering_uploads_for(UPLOAD_COVER);
        let hs = hashes(4);
        let names = |prefix: &str, n: usize| -> Vec<String> {
            (0..n).map(|i| format!("{prefix}{i}.nar")).collect()
        };
        // A record of `n` NARs and a probed path.
        let record = |h: StorePathHash, prefix: &'static str, n: usize| {
            let log = &log;
            async move {
                log.record_probe(h);
                let names = names(prefix, n);
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                log.record_nar_upload(&refs).await.unwrap();
            }
        };
        record(hs[0], "a", 599).await;
        assert_eq!(log.covered_len(), 600);
        tokio::time::advance(UPLOAD_COVER).await;
        record(hs[1], "b", 399).await;
        assert_eq!(
            log.covered_len(),
            1000,
            "up to the bound, nothing is dropped"
        );
        record(hs[2], "c", 199).await;
        assert_eq!(
            log.covered_len(),
            600,
            "over it, the stale entries are dropped"
        );
        // Whether an upload of path `h` with NAR `<prefix>0.nar` is covered.
        let covered = |h: StorePathHash, prefix: &str| {
            let text = format!(
                "StorePath: /nix/store/{h}-x\nURL: nar/{prefix}0.nar\nCompression: none\n\
                 NarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\n\
                 NarSize: 1\nReferences: \n"
            );
            let info = NarInfo::parse(&text, "/nix/store").unwrap();
            log.covers(&info, &[&format!("{prefix}0.nar")])
        };
        assert!(covered(hs[1], "b") && covered(hs[2], "c"));
        // Full of fresh entries: all forgotten, the new ones noted.
        record(hs[3], "d", 499).await;
        assert_eq!(log.covered_len(), 500);
        assert!(covered(hs[3], "d") && !covered(hs[1], "b"));
    }
}
