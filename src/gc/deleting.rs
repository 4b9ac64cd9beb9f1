//! Announcements of NARs a collector is about to delete, so that an upload relying on one of
//! them at the same moment is refused instead of left pointing at nothing.
//!
//! A deleted narinfo can be written back from the copy the collector read before deleting it
//! (see [`super::sweep`]); a deleted NAR cannot. So for NARs both sides announce first and look
//! second, and at least one of them sees the other:
//!
//! - the collector writes `_cellar/deleting/<run>` naming the NARs of a batch, then re-reads
//!   the access records, keeps every NAR an upload relies on, and deletes the rest;
//! - an upload writes its access record (naming its NAR), then reads the announcements, and is
//!   refused if its NAR is named in one.
//!
//! If the collector's re-read missed the upload's record, that record was written after the
//! announcement, so the upload's read finds the announcement. This needs a store whose
//! listings show what was written before them (S3, Garage, MinIO and a directory do).
//!
//! An announcement older than [`TTL`] is ignored (its collector died); a collector never
//! deletes under an announcement older than half of it.
//!
//! One collector deletes at a time ([`begin`], [`Announced`]): a run announces itself (naming
//! no NAR yet) before it lists the store, keeps its announcement fresh while it runs, and stops
//! if another collector's announcement is live, when it begins and again before it deletes. Two at once could undo each other's
//! protections: one writes back a narinfo an upload needed while the other, past its look at
//! the records, deletes that narinfo's NAR.
//!
//! An upload need not read the announcements itself after its record: a read that began at
//! most [`TRUSTED_FOR`] before the record was complete serves as well, because a collector
//! waits [`SETTLE`] (at least twice as long) between announcing NARs and re-reading the records.
//! An announcement that read missed was complete after the read began, so the collector's
//! re-read begins more than `SETTLE` after that, when the record is complete, and sees it.
//! A server uploading path after path then reads the announcements once in a while in the
//! background ([`crate::upload::Uploader`]), not once per path.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::TryStreamExt as _;

use super::RESERVED_PREFIX;
use crate::store::{Store, StoreError};
use crate::sync::lock;

/// Where announcements live, under [`RESERVED_PREFIX`].
pub const DIR: &str = "deleting/";

const HEADER: &str = "cellar-deleting 1";

/// How long an announcement counts.
pub const TTL: Duration = Duration::from_secs(15 * 60);

/// Past this age the collector announces again before deleting.
pub const FRESH: Duration = Duration::from_secs(5 * 60);

/// How long a collector waits after announcing NARs before it re-reads the access records
/// and deletes them (once per run: later batches are named by the same announcement).
pub const SETTLE: Duration = Duration::from_secs(4);

/// How long before an upload's record is complete a read of the announcements may have begun
/// and still serve that upload (at most half of [`SETTLE`]: the margin covers clocks that run
/// at slightly different rates on two machines).
pub const TRUSTED_FOR: Duration = Duration::from_secs(2);

/// An announcement larger than this is not one of ours.
const MAX_BYTES: u64 = 16 << 20;

pub fn key(run: &str) -> String {
    format!("{RESERVED_PREFIX}{DIR}{run}")
}

/// Writes (or replaces) the announcement of `run`: these NAR files are about to go.
pub async fn announce<'a>(
    store: &dyn Store,
    run: &str,
    nars: impl IntoIterator<Item = &'a str>,
) -> Result<(), StoreError> {
    let mut body = format!("{HEADER}\n");
    for f in nars {
        body.push_str(f);
        body.push('\n');
    }
    store.put_bytes(&key(run), Bytes::from(body)).await
}

/// Another collector's live announcement, found by [`begin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    pub key: String,
    /// How long ago it was written, by the store's clock against this one's.
    pub age: Duration,
}

/// Starts a run that deletes: announces it (no NAR named yet), then looks for the live
/// announcement of another run. If there is one, withdraws its own and returns it: two runs
/// that start together both stop, and neither deletes anything. Returns the run's name.
pub async fn begin(store: &dyn Store) -> Result<Result<String, Busy>, StoreError> {
    let run = super::sweep::run_id();
    announce(store, &run, []).await?;
    Ok(alone(store, &run).await?.map(|()| run))
}

/// After `run` (re)announced itself: `Ok(())` if no other run's announcement is live, else
/// that run (and `run`'s own announcement withdrawn). On an error, `run`'s announcement is
/// withdrawn too: not knowing, it does not go on.
async fn alone(store: &dyn Store, run: &str) -> Result<Result<(), Busy>, StoreError> {
    match others(store, run).await {
        Ok(None) => Ok(Ok(())),
        Ok(Some(busy)) => {
            withdraw(store, run).await?;
            Ok(Err(busy))
        }
        Err(e) => {
            let _ = withdraw(store, run).await;
            Err(e)
        }
    }
}

/// Another run's live announcement, if there is one besides `run`'s.
async fn others(store: &dyn Store, run: &str) -> Result<Option<Busy>, StoreError> {
    let now = store.now();
    let cutoff = now.checked_sub(TTL).unwrap_or(SystemTime::UNIX_EPOCH);
    let own = key(run);
    let prefix = format!("{RESERVED_PREFIX}{DIR}");
    let other = store
        .list(&prefix)
        .try_filter(|o| futures::future::ready(o.modified >= cutoff && o.key != own))
        .try_next()
        .await?;
    Ok(other.map(|o| Busy {
        key: o.key,
        age: now.duration_since(o.modified).unwrap_or_default(),
    }))
}

/// The waits before `into_run` asks the store again after a failed write or listing: a run
/// that read for hours is not thrown away on one passing error.
const RETRIES: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(5),
];

/// A run that deletes, announced before it reads the store ([`Announced::begin`]) and kept
/// live in the background until it starts deleting ([`Announced::into_run`]). Its listing and
/// reads must come after the announcement: a run that listed the store while another was
/// deleting would act on what that one was undoing (a narinfo it had deleted, then written
/// back for an upload), and delete what that narinfo needs.
pub struct Announced {
    /// Renewed in the background from its first write on, naming no NAR yet.
    run: Run,
}

/// When a run's announcement was last written, and whether it may have lapsed at any time
/// since the run began: once it may have, another collector could have started, and a later
/// renewal does not undo that.
#[derive(Debug, Clone, Copy)]
struct Liveness {
    last: Written,
    lapsed: bool,
}

impl Liveness {
    fn new(at: Written) -> Self {
        Self {
            last: at,
            lapsed: false,
        }
    }

    /// A write of the announcement that began at `at` succeeded.
    fn renewed(&mut self, at: Written) {
        self.lapsed |= self.last.lapsed(at);
        self.last = at;
    }

    /// Whether the announcement has been live without a gap and still is.
    fn live(&self, now: Written) -> bool {
        !self.lapsed && !self.last.lapsed(now)
    }
}

/// When an announcement was written, by both clocks: the monotonic one does not count a
/// machine's sleep, the wall clock may be set.
#[derive(Debug, Clone, Copy)]
struct Written {
    mono: tokio::time::Instant,
    wall: SystemTime,
}

impl Written {
    fn now() -> Self {
        Self {
            mono: tokio::time::Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// Whether an announcement written then may have stopped counting for other collectors
    /// by now (within [`FRESH`] of [`TTL`], a margin for clocks).
    fn lapsed(&self, now: Written) -> bool {
        let limit = TTL - FRESH;
        let wall = now.wall.duration_since(self.wall).unwrap_or_default();
        now.mono.saturating_duration_since(self.mono) >= limit || wall >= limit
    }
}

impl Announced {
    /// [`begin`], then renews the announcement every half of [`FRESH`] while the run reads.
    pub async fn begin(
        store: &std::sync::Arc<dyn Store>,
    ) -> Result<Result<Self, Busy>, StoreError> {
        let at = Written::now();
        let run = match begin(store.as_ref()).await? {
            Ok(run) => run,
            Err(busy) => return Ok(Err(busy)),
        };
        Ok(Ok(Self {
            run: Run::start(store.clone(), run, Liveness::new(at)),
        }))
    }

    /// The [`Run`] that deletes. Its announcement is written again now, so that it is fresh
    /// when deletions begin, and the other runs' looked at once more: renewals that failed for
    /// longer than [`TTL`], or a machine suspended while the run read, may have let another
    /// run start meanwhile. Then this one does not delete (its announcement withdrawn), nor
    /// if it cannot tell.
    pub async fn into_run(self) -> Result<Result<Run, Busy>, StoreError> {
        let run = self.run;
        // Lapsed, it may have let another run start and end meanwhile (which `alone` would not
        // see), undoing what this run read.
        if !run.live() {
            run.end().await;
            return Err(StoreError::Other(
                "this run's announcement could not be kept live while it read the store, so \
                 another collection may have run meanwhile: nothing deleted; run it again"
                    .into(),
            ));
        }
        let mut retries = RETRIES.iter();
        let mut announced = run.shared.write(None).await;
        while let (Err(_), Some(&wait)) = (&announced, retries.next()) {
            tokio::time::sleep(wait).await;
            announced = run.shared.write(None).await;
        }
        if let Err(e) = announced {
            run.end().await;
            return Err(e);
        }
        let store = run.shared.store.as_ref();
        let mut retries = RETRIES.iter();
        let mut waited_for_a_starter = false;
        loop {
            match others(store, &run.shared.name).await {
                Ok(None) => return Ok(Ok(run)),
                // Written moments ago: most likely a run starting now, which sees this one and
                // withdraws at once. Looked at again once that had time to happen.
                Ok(Some(busy)) if busy.age < SETTLE && !waited_for_a_starter => {
                    waited_for_a_starter = true;
                    tokio::time::sleep(SETTLE).await;
                }
                Ok(Some(busy)) => {
                    run.end().await;
                    return Ok(Err(busy));
                }
                Err(e) => match retries.next() {
                    Some(&wait) => tokio::time::sleep(wait).await,
                    None => {
                        run.end().await;
                        return Err(e);
                    }
                },
            }
        }
    }

    /// The key of the run's announcement.
    pub fn key(&self) -> String {
        self.run.key()
    }

    /// The run's name.
    pub fn name(&self) -> &str {
        self.run.name()
    }

    /// Ends a run that will not delete (its reads failed): stops the renewals and withdraws
    /// the announcement.
    pub async fn abandon(self) {
        self.run.end().await;
    }
}

/// A run that deletes, from [`Announced::begin`] to [`Run::end`]. Its announcement is
/// written again in the background every half of [`FRESH`], naming the NARs it names at the
/// time, so that it stays live for other collectors however long a phase takes (a re-read
/// of a busy day's access records, thousands of deletions); nothing may be deleted once it
/// may have lapsed ([`Run::live`]), as another collector could have started.
pub struct Run {
    shared: Arc<RunShared>,
    stop: tokio::sync::oneshot::Sender<()>,
    renewing: tokio::task::JoinHandle<()>,
}

struct RunShared {
    store: Arc<dyn Store>,
    name: String,
    /// The NARs the announcement names, locked across each write of it: writes land in the
    /// order they were made, so that a renewal never replaces newer names with older ones.
    names: tokio::sync::Mutex<Vec<String>>,
    /// When the announcement was last written (the start of that write), and whether it
    /// lapsed meanwhile.
    written: std::sync::Mutex<Liveness>,
}

impl RunShared {
    /// Writes the announcement, naming `nars` from now on if given (and if written).
    async fn write(&self, nars: Option<Vec<String>>) -> Result<(), StoreError> {
        let mut names = self.names.lock().await;
        let named = nars.as_ref().unwrap_or(&names);
        let at = Written::now();
        announce(
            self.store.as_ref(),
            &self.name,
            named.iter().map(String::as_str),
        )
        .await?;
        if let Some(nars) = nars {
            *names = nars;
        }
        lock(&self.written).renewed(at);
        Ok(())
    }
}

/// The wait before a renewal is tried again after it failed.
pub(super) const RENEW_RETRY: Duration = Duration::from_secs(10);

impl Run {
    fn start(store: Arc<dyn Store>, name: String, written: Liveness) -> Self {
        let shared = Arc::new(RunShared {
            store,
            name,
            names: tokio::sync::Mutex::new(Vec::new()),
            written: std::sync::Mutex::new(written),
        });
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let renewer = shared.clone();
        // Stopped only between renewals, never during one: a renewal landing after the
        // withdrawal would leave the announcement behind.
        let renewing = tokio::spawn(async move {
            let mut wait = FRESH / 2;
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    () = tokio::time::sleep(wait) => {}
                }
                wait = match renewer.write(None).await {
                    Ok(()) => FRESH / 2,
                    Err(e) => {
                        tracing::warn!(cause = %e, "could not renew the announcement of the run");
                        RENEW_RETRY
                    }
                };
            }
        });
        Self {
            shared,
            stop,
            renewing,
        }
    }

    /// The key of the run's announcement.
    pub fn key(&self) -> String {
        key(&self.shared.name)
    }

    /// The run's name (the last part of its announcement's key).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Writes the announcement now, naming `nars` (instead of those it named).
    pub async fn announce<'a>(
        &self,
        nars: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), StoreError> {
        let nars = nars.into_iter().map(str::to_owned).collect();
        self.shared.write(Some(nars)).await
    }

    /// Whether the announcement has surely been live for other collectors all along: each
    /// write within [`TTL`] less a margin of [`FRESH`] of the one before, and of now. Once it
    /// is not, nothing may be deleted, however the renewals go later: another collector may
    /// have started, listing the store while this one changed it.
    pub fn live(&self) -> bool {
        lock(&self.shared.written).live(Written::now())
    }

    /// Ends the run: stops the renewals (waiting for one under way) and withdraws the
    /// announcement.
    pub async fn end(self) {
        let _ = self.stop.send(());
        let _ = self.renewing.await;
        end(self.shared.store.as_ref(), &self.shared.name).await;
    }
}

/// Ends run `run`: withdraws its announcement (a failure is only logged: an announcement
/// stops counting after [`TTL`]).
pub async fn end(store: &dyn Store, run: &str) {
    if let Err(e) = withdraw(store, run).await {
        tracing::warn!(cause = %e, "could not withdraw the announcement of deletions");
    }
}

/// Removes the announcement of `run`.
pub async fn withdraw(store: &dyn Store, run: &str) -> Result<(), StoreError> {
    store.delete(&key(run)).await
}

/// The NAR files named by announcements younger than [`TTL`] at `now`.
pub async fn announced(store: &dyn Store, now: SystemTime) -> Result<HashSet<String>, StoreError> {
    let cutoff = now.checked_sub(TTL).unwrap_or(SystemTime::UNIX_EPOCH);
    let prefix = format!("{RESERVED_PREFIX}{DIR}");
    let live: Vec<_> = store
        .list(&prefix)
        .try_filter(|o| futures::future::ready(o.modified >= cutoff))
        .try_collect()
        .await?;
    let mut out = HashSet::new();
    for o in live {
        let Some(raw) = store.get_bytes(&o.key, MAX_BYTES).await? else {
            continue; // withdrawn since the listing
        };
        let text = String::from_utf8_lossy(&raw);
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            tracing::warn!(key = %o.key, "ignoring an announcement that is not one");
            continue;
        }
        out.extend(lines.map(str::to_owned));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn announcements_are_read_back_until_withdrawn_or_stale() {
        let mem = MemoryStore::new();
        let now = SystemTime::now();
        announce(&mem, "run-a", ["a.nar.xz", "b.nar"])
            .await
            .unwrap();
        let seen = announced(&mem, now).await.unwrap();
        assert_eq!(
            seen,
            HashSet::from(["a.nar.xz".to_owned(), "b.nar".to_owned()])
        );
        // A dead collector's announcement stops counting.
        mem.insert_at(
            &key("run-dead"),
            format!("{HEADER}\nc.nar\n"),
            now - TTL * 2,
        );
        mem.insert_at(&key("junk"), "d.nar\n", now);
        assert!(!announced(&mem, now).await.unwrap().contains("c.nar"));
        assert!(!announced(&mem, now).await.unwrap().contains("d.nar"));
        withdraw(&mem, "run-a").await.unwrap();
        assert!(announced(&mem, now).await.unwrap().is_empty());
    }

    /// An announcement that may have lapsed once stays lapsed for its run, whatever renewals
    /// succeed after: another collector may have started in the gap.
    #[test]
    fn a_lapse_is_for_good() {
        let start = Written::now();
        let later = |d: Duration| Written {
            mono: start.mono + d,
            wall: start.wall + d,
        };
        let mut l = Liveness::new(start);
        l.renewed(later(FRESH / 2));
        assert!(l.live(later(FRESH)));
        // The next write only after the limit, then renewals on time again.
        l.renewed(later(FRESH / 2 + TTL - FRESH));
        assert!(!l.live(later(TTL)));
        l.renewed(later(TTL + FRESH / 2));
        assert!(!l.live(later(TTL + FRESH / 2)));
        // Without a renewal, it lapses by the clock alone.
        assert!(!Liveness::new(start).live(later(TTL - FRESH)));
        assert!(Liveness::new(start).live(later(TTL - FRESH - Duration::from_secs(1))));
    }

    /// One collector at a time: a run starts only if no other run's announcement is live,
    /// and leaves nothing behind when it does not.
    #[tokio::test]
    async fn a_run_begins_only_when_no_other_is_live() {
        let mem = MemoryStore::new();
        let now = SystemTime::now();
        mem.insert_at(&key("run-dead"), format!("{HEADER}\n"), now - TTL * 2);
        let first = begin(&mem).await.unwrap().unwrap();
        assert!(mem.keys().contains(&key(&first)));
        let busy = begin(&mem).await.unwrap().unwrap_err();
        assert_eq!(busy.key, key(&first));
        assert!(busy.age < TTL);
        let live: Vec<String> = mem
            .keys()
            .into_iter()
            .filter(|k| k.starts_with(&format!("{RESERVED_PREFIX}{DIR}")) && !k.ends_with("dead"))
            .collect();
        assert_eq!(
            live,
            vec![key(&first)],
            "the refused run left its announcement"
        );
        withdraw(&mem, &first).await.unwrap();
        let next = begin(&mem).await.unwrap().unwrap();
        assert_ne!(next, first);
    }
}
