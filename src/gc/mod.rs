//! Garbage collection, retention and consistency checks, with the bucket (or the local
//! directory) as the only state: no database, no lock, nothing that several replicas must share
//! but the store itself.
//!
//! What is kept: the closures of the roots. A root is a path read (its narinfo or its NAR)
//! or uploaded within `gc.keep_days` ([`access`]: servers record what they serve in small objects under
//! [`RESERVED_PREFIX`]), a path named by a pin ([`pins`]), or a narinfo younger than
//! `gc.keep_days` or the grace period. Closures follow `References:`, so a kept path never
//! loses a dependency.
//!
//! How a run goes ([`run`]): one listing of the whole store ([`inventory`]), every narinfo read
//! into a compact graph ([`graph`]), roots and marking ([`mark`]), then deletion ([`sweep`]):
//! narinfos first, referrers before what they refer to, so that the narinfos left at any
//! moment (even if the run dies half-way) still have complete closures; then NARs, listings
//! and realisations no remaining narinfo points to, then logs of deleted derivations and debug
//! info links to deleted NARs.
//!
//! Nothing under [`RESERVED_PREFIX`] is ever served: every name a request can reach is parsed
//! into a cache file name first, and none of them starts with `_`.

pub mod access;
mod began;
pub mod deleting;
mod graph;
mod inventory;
mod mark;
pub mod metrics_file;
pub mod pins;
mod report;
mod sweep;
pub mod unfinished;
pub mod verify;

use std::sync::Arc;
use std::time::SystemTime;

use thiserror::Error;

use crate::config::GcConfig;
use crate::store::{Store, StoreError};

pub use report::{human, Progress, Quiet, Summary};

/// Keys under this prefix belong to cellar itself (access records, pins).
pub const RESERVED_PREFIX: &str = "_cellar/";

#[derive(Debug, Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A pin name that cannot be a key.
    #[error("invalid pin name {0:?}: use letters, digits, `-`, `_` and `.` (not first)")]
    BadPinName(String),
    #[error("no pin named {0:?}")]
    NoSuchPin(String),
    /// A store path given on the command line that is not in the store directory.
    #[error("{path:?} is not a store path in {store_dir}")]
    BadStorePath { path: String, store_dir: String },
    /// A pin that does not parse pins nothing: collecting now could delete what it was meant
    /// to keep.
    #[error("pin {key} cannot be read ({reason}); fix or remove it before collecting")]
    BadPin { key: String, reason: String },
    /// The record of an upload under way that does not parse: what the upload relies on is
    /// unknown, so collecting now could break its closure.
    #[error(
        "the access record {key} of an upload under way does not parse ({reason}), so nothing \
         was collected; {}",
        access::BAD_UPLOAD_RECORD_HELP
    )]
    BadUploadRecord { key: String, reason: String },
    /// When the access records began is unknown, so a path no record names could be one
    /// used before them.
    #[error(
        "{key} cannot be read ({reason}), so nothing was collected: delete it, and the next \
         `cellar gc --apply` writes it again from the oldest access record in the store"
    )]
    BadRecordsBegan { key: String, reason: String },
    /// Another collector (`gc --apply` or `verify --repair`) is deleting: one at a time.
    #[error(
        "another collection is running ({key}, written {secs} s ago), so nothing was deleted: \
         run `cellar gc --apply` and `cellar verify --repair` from one machine at a time (the \
         announcement of a run that died counts for 15 minutes)"
    )]
    Busy { key: String, secs: u64 },
    /// Asked to stop (SIGINT, SIGTERM) before it deleted anything.
    #[error("stopped on request before anything was deleted")]
    Stopped,
}

impl From<deleting::Busy> for GcError {
    fn from(b: deleting::Busy) -> Self {
        Self::Busy {
            key: b.key,
            secs: b.age.as_secs(),
        }
    }
}

/// What `cellar gc` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Delete (true) or only report what would be deleted.
    pub apply: bool,
    /// The time the run treats as now (tests move it to simulate a clock).
    pub now: SystemTime,
    /// The wait between announcing NARs and deleting them: [`deleting::SETTLE`], which the
    /// servers' uploads rely on. Only a test whose uploads never overlap a collection may
    /// shorten it.
    pub settle: std::time::Duration,
    /// Asked to stop (SIGINT, SIGTERM): see [`Stop`].
    pub stop: Stop,
}

/// A request to stop a run that deletes (`gc --apply`, `verify --repair`) early, and safely:
/// one still reading the store stops at once, deleting nothing; one deleting stops before
/// its next batch, once the batch under way has had its re-read of the access records and
/// its write-backs (a run killed between deleting a batch and that re-read leaves an upload
/// that relied on one of its narinfos without it until the next run settles the batch:
/// [`unfinished`]).
#[derive(Clone, Default, Debug)]
pub struct Stop(Arc<StopInner>);

#[derive(Default, Debug)]
struct StopInner {
    requested: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Stop {
    pub fn request(&self) {
        self.0
            .requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    pub fn requested(&self) -> bool {
        self.0.requested.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Returns once a stop is requested.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.requested() {
                return;
            }
            notified.await;
        }
    }
}

/// Why a run stopped before it had deleted all it would.
pub const STOPPED: &str =
    "stopped on request (SIGINT, SIGTERM or SIGHUP) before the end: run it again";

/// One garbage collection over `store`.
pub async fn run(
    store: &Arc<dyn Store>,
    store_dir: &str,
    cfg: &GcConfig,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Summary, GcError> {
    if !opts.apply {
        return Ok(read_and_plan(store, store_dir, cfg, opts, progress)
            .await?
            .summary);
    }
    // A run that deletes announces itself before it lists anything (deleting::Announced).
    let announced = deleting::Announced::begin(store)
        .await?
        .map_err(GcError::from)?;
    // What a run that died while deleting left, before anything is listed (unfinished).
    let settled = match unfinished::settle(store.as_ref(), announced.name(), store_dir).await {
        Ok(said) => said,
        Err(e) => {
            announced.abandon().await;
            return Err(GcError::Store(StoreError::Other(format!(
                "settling the batch of a run that stopped while deleting: {e}; nothing deleted"
            ))));
        }
    };
    // Stopped while it reads, it has deleted nothing: it ends at once.
    let read = tokio::select! {
        read = read_and_plan(store, store_dir, cfg, opts, progress) => read,
        () = opts.stop.wait() => Err(GcError::Stopped),
    };
    let mut read = match read {
        Ok(read) => read,
        Err(e) => {
            announced.abandon().await;
            return Err(e);
        }
    };
    read.summary.unfinished = settled;
    let run = announced.into_run().await?.map_err(GcError::from)?;
    let outcome = sweep::execute(
        store,
        &read.graph,
        &read.marked,
        &read.plan,
        &mut read.acc,
        opts.settle,
        run,
        &opts.stop,
        progress,
    )
    .await;
    read.summary.record(outcome);
    Ok(read.summary)
}

/// What a run read, and what it would delete.
struct Planned {
    graph: graph::Graph,
    marked: mark::Marked,
    plan: sweep::Plan,
    acc: access::Accessed,
    summary: Summary,
}

async fn read_and_plan(
    store: &Arc<dyn Store>,
    store_dir: &str,
    cfg: &GcConfig,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Planned, GcError> {
    let inv = inventory::Inventory::load(store.as_ref(), progress).await?;
    let graph = graph::Graph::load(store.as_ref(), &inv, store_dir, progress).await?;
    if let Some(reason) = graph.refuses_deletion() {
        return Err(GcError::Store(StoreError::Other(format!(
            "{reason}: nothing was collected (`cellar verify` lists every such narinfo)"
        ))));
    }
    let sizes: Vec<u64> = (0..graph.len() as u32)
        .map(|i| mark::path_bytes(&graph, &inv.nars, i))
        .collect();
    let began = began::establish(store.as_ref(), &inv, opts.now, opts.apply).await?;
    let mut roots = mark::Roots::new(&graph, cfg, opts.now, began);
    let acc = access::read_all(store.as_ref(), &inv.access, cfg.keep, opts.now).await?;
    if let Some((key, reason)) = acc.bad_uploads.first().cloned() {
        return Err(GcError::BadUploadRecord { key, reason });
    }
    roots.add_access(&graph, &acc.seen);
    roots.add_nar_access(&graph, &acc.nar_seen);
    roots.add_uploads(&graph, &acc.uploading);
    let (pins, unreadable) = pins::read_all(store.as_ref(), &inv.pins, store_dir).await?;
    if let Some((key, reason)) = unreadable.into_iter().next() {
        return Err(GcError::BadPin { key, reason });
    }
    roots.add_pins(&graph, &pins, opts.now);
    let marked = mark::mark(&graph, &roots, cfg.max_bytes, &sizes);
    let contents = sweep::Contents::read(store.as_ref(), &inv).await?;
    let plan = sweep::Plan::new(&graph, &inv, &marked, contents, cfg, opts.now, &acc);
    let mut summary = Summary::new(&marked, &plan, &sizes);
    summary.records_began = roots.began().map(|b| (b, b + cfg.keep));
    summary.unresolved_pins = roots.unresolved_pins;
    summary.bad_records = acc
        .bad
        .iter()
        .map(|(key, why)| format!("{key} ({why})"))
        .collect();
    Ok(Planned {
        graph,
        marked,
        plan,
        acc,
        summary,
    })
}

#[cfg(test)]
mod tests;
