//! `cellar verify`: checks that everything the store would serve can be served whole, and
//! with `--repair` removes what cannot.
//!
//! Findings: narinfos that do not parse, are stored under another path's hash, point at a
//! missing NAR or one of another size than their `FileSize`, refer to a path that has no
//! narinfo (and no upstream serves: uploads may build on those) or one that cannot be served
//! whole; NARs and listings no narinfo points to; realisations naming a path without a
//! narinfo, debug info links naming a missing NAR, and either when it cannot be read;
//! unfinished uploads; objects under the reserved prefix that do not parse. Orphans,
//! unfinished uploads and what names something missing are uploads in progress while younger
//! than the grace period, not findings.
//!
//! Repair deletes the unservable narinfos to a fixed point (a path whose reference goes, goes
//! too), referrers first, each older than the grace period and found unservable again by a
//! second look at the store (the listing is not a snapshot); then orphans and unfinished
//! uploads older than the grace period and unreadable access records; realisations and debug
//! info links naming what is gone (what it deleted, or what a second look does not find).
//! Unreadable pins, realisations and links are reported, never deleted.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::graph::{Graph, Problem};
use super::inventory::Inventory;
use super::report::Progress;
use super::sweep::Named;
use super::{access, deleting, pins, sweep};
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::nix::{Sha256, StorePathHash};
use crate::store::{object_key, Store, StoreError};
use crate::upstream::Upstreams;

/// One inconsistency, with the key of the object it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Unparseable {
        key: String,
        reason: String,
    },
    WrongHash {
        key: String,
        detail: String,
    },
    BadUrl {
        key: String,
        url: String,
    },
    MissingNar {
        key: String,
        nar: String,
    },
    NarSize {
        key: String,
        nar: String,
        expected: u64,
        actual: u64,
    },
    /// The NAR does not decode to what the narinfo says (`NarHash`, `NarSize`), or not at all:
    /// the client would refuse it. Checked with [`Options::hashes`].
    NarHash {
        key: String,
        nar: String,
        reason: String,
    },
    MissingReference {
        key: String,
        reference: String,
    },
    UnservableReference {
        key: String,
        reference: String,
    },
    OrphanNar {
        key: String,
    },
    OrphanListing {
        key: String,
    },
    UnfinishedUpload {
        what: String,
    },
    BadReserved {
        key: String,
        reason: String,
    },
    /// A realisation naming a path the store has no narinfo for (and no upstream serves).
    DanglingRealisation {
        key: String,
        out: String,
    },
    /// A debug info link naming a NAR the store lacks.
    DanglingDebugInfo {
        key: String,
        nar: String,
    },
    /// A realisation or debug info link that is not what Nix writes there.
    Unreadable {
        key: String,
        reason: String,
    },
    /// A narinfo the store failed to read (a file this run's user may not read).
    ReadFailed {
        key: String,
        reason: String,
    },
}

impl Finding {
    /// A short, bounded name for the kind of finding (a metrics label).
    /// Whether it says an object is missing, which a listing racing with uploads and
    /// collections may say wrongly ([`second_look`]).
    fn says_missing(&self) -> bool {
        matches!(
            self,
            Self::MissingNar { .. } | Self::MissingReference { .. }
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unparseable { .. } => "unparseable",
            Self::WrongHash { .. } => "wrong_hash",
            Self::BadUrl { .. } => "bad_url",
            Self::MissingNar { .. } => "missing_nar",
            Self::NarSize { .. } => "nar_size",
            Self::NarHash { .. } => "nar_hash",
            Self::MissingReference { .. } => "missing_reference",
            Self::UnservableReference { .. } => "unservable_reference",
            Self::OrphanNar { .. } => "orphan_nar",
            Self::OrphanListing { .. } => "orphan_listing",
            Self::UnfinishedUpload { .. } => "unfinished_upload",
            Self::BadReserved { .. } => "bad_reserved",
            Self::DanglingRealisation { .. } => "dangling_realisation",
            Self::DanglingDebugInfo { .. } => "dangling_debuginfo",
            Self::Unreadable { .. } => "unreadable",
            Self::ReadFailed { .. } => "read_failed",
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unparseable { key, reason } => write!(f, "unparseable {key}: {reason}"),
            Self::WrongHash { key, detail } => write!(f, "wrong-hash {key}: {detail}"),
            Self::BadUrl { key, url } => write!(f, "bad-url {key}: URL {url:?} is not nar/<file>"),
            Self::MissingNar { key, nar } => {
                write!(f, "missing-nar {key}: nar/{nar} does not exist")
            }
            Self::NarSize {
                key,
                nar,
                expected,
                actual,
            } => write!(
                f,
                "nar-size {key}: nar/{nar} has {actual} bytes, FileSize says {expected}"
            ),
            Self::NarHash { key, nar, reason } => write!(f, "nar-hash {key}: nar/{nar} {reason}"),
            Self::MissingReference { key, reference } => {
                write!(f, "missing-reference {key}: {reference} has no narinfo")
            }
            Self::UnservableReference { key, reference } => {
                write!(
                    f,
                    "broken-reference {key}: {reference} cannot be served whole"
                )
            }
            Self::OrphanNar { key } => write!(f, "orphan-nar {key}: no narinfo points to it"),
            Self::OrphanListing { key } => {
                write!(f, "orphan-listing {key}: its path has no narinfo")
            }
            Self::UnfinishedUpload { what } => write!(f, "unfinished-upload {what}"),
            Self::BadReserved { key, reason } => write!(f, "bad-reserved {key}: {reason}"),
            Self::DanglingRealisation { key, out } => {
                write!(f, "dangling-realisation {key}: {out} has no narinfo")
            }
            Self::DanglingDebugInfo { key, nar } => {
                write!(f, "dangling-debuginfo {key}: nar/{nar} does not exist")
            }
            Self::Unreadable { key, reason } => write!(f, "unreadable {key}: {reason}"),
            Self::ReadFailed { key, reason } => write!(f, "read-failed {key}: {reason}"),
        }
    }
}

#[derive(Clone)]
pub struct Options {
    pub repair: bool,
    /// Read every NAR checked and check it as the client does (slow: the whole store is read).
    pub hashes: bool,
    /// Check only this many narinfos, chosen at random (no orphan check, no realisations or
    /// debug info links, no repair).
    pub sample: Option<usize>,
    pub grace: Duration,
    pub now: SystemTime,
    /// The wait between announcing orphaned NARs and deleting them (see
    /// [`super::Options::settle`]).
    pub settle: Duration,
    /// Asked to stop (see [`super::Stop`]).
    pub stop: super::Stop,
    /// The server's upstreams: a reference one of them serves is not missing (the server
    /// accepted the upload on top of it and serves it through).
    pub upstreams: Option<Arc<Upstreams>>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub narinfos_checked: usize,
    pub findings: Vec<Finding>,
    /// References (and realisations' paths) the store lacks that an upstream serves.
    pub on_upstreams: usize,
    /// Paths whose NAR `hashes` could not read (why): not checked, so not consistent either.
    pub unhashed: Vec<String>,
    /// Keys deleted by `--repair`.
    pub repaired: Vec<String>,
    /// Orphan NARs `--repair` kept because an upload recorded them (its narinfo may follow).
    pub in_use: Vec<String>,
    /// Narinfos `--repair` found broken but kept: an upload in progress (or a record written
    /// while it ran) names them, so an upload may rely on them (or just healed them).
    pub relied_on: Vec<String>,
    /// Narinfos `--repair` found broken but kept: younger than the grace period (an upload
    /// in progress may be about to write what they miss), needed by one that is, or needing
    /// one that is broken on its own.
    pub young: Vec<String>,
    pub repair_errors: Vec<String>,
    /// With `--repair`: what was done with the copies a run that died while deleting left
    /// ([`super::unfinished`]), a line each.
    pub unfinished: Vec<String>,
    /// Stopped on request while it checked (a repair; [`super::STOPPED`] is among the
    /// `repair_errors` then): its findings are not all there is, and nothing was repaired.
    pub stopped: bool,
    /// Paths a pin in force names that the store lacks (`pin: path`): the pin keeps nothing
    /// there (deleted broken by a repair, or never pushed), which only gc said before.
    pub pins_missing: Vec<String>,
    /// The pins in force naming each path the store holds (by hash): a repair deleting one
    /// says so.
    pub pinned: HashMap<StorePathHash, Vec<String>>,
}

impl Report {
    /// The pins naming the path whose narinfo is `key`, if any, as the repair's line adds
    /// them.
    pub fn pinned_by(&self, key: &str) -> Option<String> {
        let h: StorePathHash = key.strip_suffix(".narinfo")?.parse().ok()?;
        self.pinned.get(&h).map(|names| names.join(", "))
    }
}

pub async fn run(
    store: &Arc<dyn Store>,
    store_dir: &str,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Report, StoreError> {
    // One collector deletes at a time, and a repair announces itself before it lists
    // anything (see deleting::Announced): it must not act on what another run was undoing.
    let mut announced = None;
    let mut not_repairing = None;
    let mut settled = Vec::new();
    if opts.repair {
        match deleting::Announced::begin(store).await {
            // What a run that died while deleting left, before anything is listed.
            Ok(Ok(a)) => match super::unfinished::settle(store.as_ref(), a.name(), store_dir).await
            {
                Ok(said) => {
                    settled = said;
                    announced = Some(a);
                }
                Err(e) => {
                    a.abandon().await;
                    not_repairing = Some(format!(
                        "settling the batch of a run that stopped while deleting: {e}; nothing \
                         repaired"
                    ));
                }
            },
            Ok(Err(busy)) => {
                not_repairing = Some(format!(
                    "another collection is running ({}, written {} s ago): nothing repaired",
                    busy.key,
                    busy.age.as_secs()
                ));
            }
            Err(e) => not_repairing = Some(format!("announcing the repair: {e}; nothing repaired")),
        }
    }
    // Stopped while it checks, it has deleted nothing: it ends at once, a run that did not
    // get to its end (exit 1), not one that could not run (the store failing, exit 2).
    let checked = tokio::select! {
        checked = check(store, store_dir, opts, progress) => checked.map(Some),
        () = opts.stop.wait() => Ok(None),
    };
    let (mut report, checked) = match checked {
        Ok(Some(done)) => done,
        Ok(None) => {
            if let Some(a) = announced {
                a.abandon().await;
            }
            return Ok(Report {
                stopped: true,
                repair_errors: std::iter::once(super::STOPPED.into())
                    .chain(not_repairing)
                    .collect(),
                unfinished: settled,
                ..Report::default()
            });
        }
        Err(e) => {
            if let Some(a) = announced {
                a.abandon().await;
            }
            return Err(e);
        }
    };
    report.repair_errors.extend(not_repairing);
    report.unfinished.splice(0..0, settled);
    match (announced, checked) {
        (Some(a), Some(c)) if c.graph.refuses_deletion().is_some() => {
            a.abandon().await;
            report.repair_errors.push(format!(
                "{}: nothing was repaired (mend or remove the narinfos reported so)",
                c.graph.refuses_deletion().unwrap_or_default()
            ));
        }
        (Some(a), Some(c)) => {
            let run = match a.into_run().await {
                Ok(Ok(run)) => run,
                Ok(Err(busy)) => {
                    report.repair_errors.push(format!(
                        "another collection is running ({}, written {} s ago): nothing repaired",
                        busy.key,
                        busy.age.as_secs()
                    ));
                    return Ok(report);
                }
                Err(e) => {
                    report
                        .repair_errors
                        .push(format!("announcing the repair: {e}; nothing repaired"));
                    return Ok(report);
                }
            };
            let findings = report.findings.clone();
            repair_as(store, store_dir, &c, &findings, opts, &run, &mut report).await;
            run.end().await;
        }
        (Some(a), None) => a.abandon().await,
        (None, _) => {}
    }
    Ok(report)
}

/// What a full check read, for the repair.
struct Checked {
    graph: Graph,
    /// Nodes whose NAR did not hash to what their narinfo says.
    corrupt: HashSet<u32>,
    inv: Inventory,
    own_bad: Vec<bool>,
    upstream: HashSet<StorePathHash>,
    /// The realisations and debug info links, and what they name.
    contents: sweep::Contents,
}

/// The findings; what the check read too, unless it only sampled.
async fn check(
    store: &Arc<dyn Store>,
    store_dir: &str,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<(Report, Option<Checked>), StoreError> {
    let mut inv = Inventory::load(store.as_ref(), progress).await?;
    let all: HashSet<StorePathHash> = inv.narinfos.iter().map(|(h, _)| *h).collect();
    let mut report = Report::default();
    let full = opts.sample.is_none_or(|n| n >= inv.narinfos.len());
    if !full {
        sample(&mut inv.narinfos, opts.sample.unwrap_or(0));
    }
    let graph = Graph::load(store.as_ref(), &inv, store_dir, progress).await?;
    report.narinfos_checked = graph.len();
    let contents = match full {
        true => Some(sweep::Contents::read(store.as_ref(), &inv).await?),
        false => None,
    };
    let upstream =
        served_by_upstreams(&graph, &all, contents.as_ref(), opts.upstreams.as_deref()).await?;
    report.on_upstreams = upstream.len();
    let mut unservable = vec![false; graph.len()];
    let mut doubtful = Vec::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        let key = object_key::narinfo(n.hash);
        let present = |r: &StorePathHash| all.contains(r) || upstream.contains(r);
        let own = own_findings(n, &key, &inv, &present);
        if own.iter().any(Finding::says_missing) {
            doubtful.push((i, own));
            continue;
        }
        unservable[i] = !own.is_empty();
        report.findings.extend(own);
    }
    let mut looked = futures::stream::iter(doubtful.into_iter().map(|(i, own)| {
        let n = &graph.nodes[i];
        async move { (i, second_look(store.as_ref(), n, own).await) }
    }))
    .buffered(SECOND_LOOKS);
    while let Some((i, own)) = looked.next().await {
        let own = own?;
        unservable[i] = !own.is_empty();
        report.findings.extend(own);
    }
    drop(looked);
    // The NARs of the paths found whole so far, read and hashed.
    let mut corrupt = HashSet::new();
    if opts.hashes {
        let whole: Vec<u32> = (0..graph.len() as u32)
            .filter(|&i| !unservable[i as usize])
            .collect();
        progress.phase("hashing NARs", Some(whole.len() as u64));
        let mut hashed = futures::stream::iter(whole.into_iter().map(|i| {
            let n = &graph.nodes[i as usize];
            async move { (i, hash_finding(store.as_ref(), n, store_dir).await) }
        }))
        .buffered(HASH_CONCURRENCY);
        while let Some((i, found)) = hashed.next().await {
            progress.advance(1);
            match found {
                Ok(Some(f)) => {
                    unservable[i as usize] = true;
                    corrupt.insert(i);
                    report.findings.push(f);
                }
                Ok(None) => {}
                Err(e) => report.unhashed.push(format!(
                    "{}: {e}",
                    object_key::narinfo(graph.nodes[i as usize].hash)
                )),
            }
        }
    }
    let Some(contents) = contents else {
        return Ok((report, None));
    };
    let own_bad = unservable.clone();
    propagate(&graph, &mut unservable, &mut report.findings);
    let grace = opts
        .now
        .checked_sub(opts.grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let pointed: HashSet<&str> = graph
        .nodes
        .iter()
        .filter_map(|n| n.nar.as_deref())
        .collect();
    let mut orphan_nars: Vec<&String> = inv
        .nars
        .iter()
        .filter(|(f, m)| !pointed.contains(f.as_str()) && m.modified <= grace)
        .map(|(f, _)| f)
        .collect();
    orphan_nars.sort();
    report
        .findings
        .extend(orphan_nars.into_iter().map(|f| Finding::OrphanNar {
            key: format!("nar/{f}"),
        }));
    for (h, m) in &inv.listings {
        if !all.contains(h) && m.modified <= grace {
            report.findings.push(Finding::OrphanListing {
                key: object_key::listing(*h),
            });
        }
    }
    report.findings.extend(named_findings(
        &contents,
        &|h| all.contains(h) || upstream.contains(h),
        &inv,
        grace,
    ));
    for what in store.stale_staging(opts.grace).await? {
        report.findings.push(Finding::UnfinishedUpload { what });
    }
    // Not findings (a run deleting now has one too), but what explains a path found missing
    // a reference until they are settled.
    for (key, _) in &inv.unfinished {
        report.unfinished.push(format!(
            "{key}: copies of narinfos a collection is deleting, or left by one that stopped \
             while deleting them: the next `gc --apply` or `verify --repair` writes back those \
             used since"
        ));
    }
    let mut bad_reserved: Vec<(String, String)> = inv
        .reserved_other
        .iter()
        .map(|(k, _)| (k.clone(), "not an access record or a pin".to_owned()))
        .collect();
    let acc = access::read_all(store.as_ref(), &inv.access, Duration::MAX, opts.now).await?;
    bad_reserved.extend(acc.bad);
    let (pins, bad_pins) = pins::read_all(store.as_ref(), &inv.pins, store_dir).await?;
    bad_reserved.extend(bad_pins);
    for pin in pins.iter().filter(|p| p.active(opts.now)) {
        for (h, p) in pins::hashes(pin).zip(&pin.paths) {
            match graph.find(h) {
                Some(_) => report.pinned.entry(h).or_default().push(pin.name.clone()),
                None => report
                    .pins_missing
                    .push(format!("{}: {store_dir}/{p}", pin.name)),
            }
        }
    }
    if let Some(reason) = super::began::damaged(store.as_ref(), &inv).await? {
        bad_reserved.push((super::began::key(), reason));
    }
    for (key, reason) in bad_reserved {
        report.findings.push(Finding::BadReserved { key, reason });
    }
    Ok((
        report,
        Some(Checked {
            graph,
            corrupt,
            inv,
            own_bad,
            upstream,
            contents,
        }),
    ))
}

/// What is wrong with the realisations and debug info links: those naming what the store
/// lacks (older than `grace`: Nix writes a link before its NAR), and those not understood.
fn named_findings(
    contents: &sweep::Contents,
    present: &dyn Fn(&StorePathHash) -> bool,
    inv: &Inventory,
    grace: SystemTime,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for r in &contents.realisations {
        match &r.out {
            Named::Understood(h) if !present(h) && r.meta.modified <= grace => {
                out.push(Finding::DanglingRealisation {
                    key: r.key.clone(),
                    out: h.to_string(),
                });
            }
            Named::NotUnderstood(reason) => out.push(Finding::Unreadable {
                key: r.key.clone(),
                reason: reason.clone(),
            }),
            Named::Understood(_) | Named::Gone => {}
        }
    }
    for l in &contents.links {
        match &l.nar {
            Named::Understood(nar) if !inv.nars.contains_key(nar) && l.meta.modified <= grace => {
                out.push(Finding::DanglingDebugInfo {
                    key: l.key.clone(),
                    nar: nar.clone(),
                });
            }
            Named::NotUnderstood(reason) => out.push(Finding::Unreadable {
                key: l.key.clone(),
                reason: reason.clone(),
            }),
            Named::Understood(_) | Named::Gone => {}
        }
    }
    out
}

/// The references and realisations' paths no narinfo in the store has that some upstream
/// serves (the server accepts both on top of an upstream). An upstream that cannot be asked
/// stops the run: a repair must not delete what it might serve.
async fn served_by_upstreams(
    graph: &Graph,
    all: &HashSet<StorePathHash>,
    contents: Option<&sweep::Contents>,
    upstreams: Option<&Upstreams>,
) -> Result<HashSet<StorePathHash>, StoreError> {
    let Some(u) = upstreams.filter(|u| !u.is_empty()) else {
        return Ok(HashSet::new());
    };
    let outs = contents
        .into_iter()
        .flat_map(|c| c.realisations.iter().filter_map(|r| r.out.understood()));
    let missing: HashSet<StorePathHash> = graph
        .nodes
        .iter()
        .flat_map(|n| n.missing_refs.iter())
        .chain(outs)
        .copied()
        .filter(|r| !all.contains(r))
        .collect();
    let asks = missing.into_iter().map(|h| async move {
        match u.path_of(h).await {
            Ok(served) => Ok(served.map(|_| h)),
            // Said with the path it was asked for (the upstream's failure is logged).
            Err(StoreError::UpstreamDown(why)) => Err(StoreError::UpstreamDown(format!(
                "{why} for {}, which the store lacks: it may serve it, so nothing is \
                     taken for missing until every upstream answers",
                object_key::narinfo(h)
            ))),
            Err(e) => Err(e),
        }
    });
    let found: Vec<Option<StorePathHash>> = futures::stream::iter(asks)
        .buffer_unordered(16)
        .try_collect()
        .await?;
    Ok(found.into_iter().flatten().collect())
}

fn own_findings(
    n: &super::graph::Node,
    key: &str,
    inv: &Inventory,
    present: &dyn Fn(&StorePathHash) -> bool,
) -> Vec<Finding> {
    let key = key.to_owned();
    let mut out = Vec::new();
    match &n.problem {
        None => {}
        // Deleted since the listing: nothing to check.
        Some(Problem::Gone) => return out,
        Some(
            Problem::Unparseable(reason)
            | Problem::Encoded(reason)
            | Problem::OtherStoreDir(reason),
        ) => {
            out.push(Finding::Unparseable {
                key,
                reason: reason.clone(),
            });
            return out;
        }
        Some(Problem::Unreadable(reason)) => {
            out.push(Finding::ReadFailed {
                key,
                reason: reason.clone(),
            });
            return out;
        }
        Some(Problem::WrongHash(detail)) => out.push(Finding::WrongHash {
            key: key.clone(),
            detail: detail.clone(),
        }),
        Some(Problem::BadUrl(url)) => out.push(Finding::BadUrl {
            key: key.clone(),
            url: url.clone(),
        }),
    }
    if let Some(nar) = &n.nar {
        match inv.nars.get(&**nar) {
            None => out.push(Finding::MissingNar {
                key: key.clone(),
                nar: nar.to_string(),
            }),
            Some(m) => {
                if let Some(expected) = n.file_size.filter(|&s| s != m.size) {
                    out.push(Finding::NarSize {
                        key: key.clone(),
                        nar: nar.to_string(),
                        expected,
                        actual: m.size,
                    });
                }
            }
        }
    }
    for r in n.missing_refs.iter().filter(|r| !present(r)) {
        out.push(Finding::MissingReference {
            key: key.clone(),
            reference: r.to_string(),
        });
    }
    out
}

/// `own`, the findings of narinfo `n`, with what they say is missing looked at once more: the
/// listing is not a snapshot, so a NAR or a reference uploaded after it passed their keys is
/// missing from it, as is the NAR of a narinfo a collection deleted after it was read. Keeps
/// what is still missing, and nothing if the narinfo itself is gone; the rest as found.
async fn second_look(
    store: &dyn Store,
    n: &super::graph::Node,
    own: Vec<Finding>,
) -> Result<Vec<Finding>, StoreError> {
    let mut kept = Vec::with_capacity(own.len());
    for f in own {
        let key = match &f {
            Finding::MissingNar { nar, .. } => format!("nar/{nar}"),
            Finding::MissingReference { reference, .. } => match reference.parse() {
                Ok(h) => object_key::narinfo(h),
                Err(_) => {
                    kept.push(f);
                    continue;
                }
            },
            _ => {
                kept.push(f);
                continue;
            }
        };
        if store.head(&key).await?.is_none() {
            kept.push(f);
        }
    }
    if kept.iter().any(Finding::says_missing)
        && store.head(&object_key::narinfo(n.hash)).await?.is_none()
    {
        return Ok(Vec::new());
    }
    Ok(kept)
}

/// Marks every node referring to an unservable one as unservable too, to a fixed point.
fn propagate(graph: &Graph, unservable: &mut [bool], findings: &mut Vec<Finding>) {
    let mut referrers: Vec<Vec<u32>> = vec![Vec::new(); graph.len()];
    for (i, n) in graph.nodes.iter().enumerate() {
        for &r in n.refs.iter() {
            referrers[r as usize].push(i as u32);
        }
    }
    let mut stack: Vec<u32> = (0..graph.len() as u32)
        .filter(|&i| unservable[i as usize])
        .collect();
    while let Some(bad) = stack.pop() {
        for &by in &referrers[bad as usize] {
            if !std::mem::replace(&mut unservable[by as usize], true) {
                findings.push(Finding::UnservableReference {
                    key: object_key::narinfo(graph.nodes[by as usize].hash),
                    reference: graph.nodes[bad as usize].name.to_string(),
                });
                stack.push(by);
            }
        }
    }
}

/// Keeps `n` narinfos chosen uniformly at random (a partial Fisher-Yates shuffle).
fn sample<T>(v: &mut Vec<T>, n: usize) {
    for i in 0..n.min(v.len()) {
        let mut b = [0u8; 8];
        let r = getrandom::getrandom(&mut b).map_or(i as u64, |()| u64::from_le_bytes(b));
        let j = i + (r % (v.len() - i) as u64) as usize;
        v.swap(i, j);
    }
    v.truncate(n);
}

/// Whether narinfo `n` (older than the grace period), found unservable on its own, still is:
/// the listing is not a snapshot, so a NAR or reference uploaded while it ran may be missing
/// from it. Asked again of the store; one the store cannot answer for stays.
async fn still_unservable(
    store: &dyn Store,
    n: &super::graph::Node,
    upstream: &HashSet<StorePathHash>,
    rehash: Option<&str>,
    report: &mut Report,
) -> bool {
    if matches!(
        n.problem,
        Some(Problem::Unparseable(_) | Problem::WrongHash(_) | Problem::BadUrl(_))
    ) {
        return true;
    }
    let mut keys: Vec<(String, Option<u64>)> = Vec::new();
    if let Some(nar) = &n.nar {
        keys.push((format!("nar/{nar}"), n.file_size));
    }
    keys.extend(
        n.missing_refs
            .iter()
            .filter(|r| !upstream.contains(r))
            .map(|r| (object_key::narinfo(*r), None)),
    );
    for (key, size) in keys {
        match store.head(&key).await {
            Ok(None) => return true,
            Ok(Some(actual)) if size.is_some_and(|s| s != actual) => return true,
            Ok(Some(_)) => {}
            Err(e) => {
                report
                    .repair_errors
                    .push(format!("{key}: {e}; its narinfo kept"));
                return false;
            }
        }
    }
    // Its NAR hashed wrong: it may have been uploaded again since.
    let Some(store_dir) = rehash else {
        return false;
    };
    match hash_finding(store, n, store_dir).await {
        Ok(found) => found.is_some(),
        Err(e) => {
            report.repair_errors.push(format!(
                "hashing the NAR of {}: {e}; its narinfo kept",
                object_key::narinfo(n.hash)
            ));
            false
        }
    }
}

/// NARs read and hashed at once.
const HASH_CONCURRENCY: usize = 4;

/// Reads the NAR of `n` and says if the client would refuse it: its bytes as stored against
/// `FileHash` (quick), and when they differ or there is none, the NAR decoded against
/// `NarHash` and `NarSize`, which is what the client checks (a NAR re-encoded since its
/// narinfo was written still serves). Nothing when either object is gone, the narinfo does
/// not parse (reported otherwise), the NAR is stored with a `Content-Encoding` (the client
/// decodes that first) or compressed in a way cellar cannot decode.
async fn hash_finding(
    store: &dyn Store,
    n: &super::graph::Node,
    store_dir: &str,
) -> Result<Option<Finding>, StoreError> {
    let key = object_key::narinfo(n.hash);
    let Some(raw) = store.get_bytes(&key, crate::nix::MAX_NARINFO_BYTES).await? else {
        return Ok(None);
    };
    let Ok(info) = crate::nix::NarInfo::parse_bytes(&raw, store_dir) else {
        return Ok(None);
    };
    let Some(nar) = info.url.strip_prefix("nar/") else {
        return Ok(None);
    };
    let nar_key = &info.url;
    let decodable = info.compression.can_decode();
    if info.file_hash.is_none() && !decodable {
        return Ok(None);
    }
    let Some(obj) = store.get(nar_key, None).await? else {
        return Ok(None);
    };
    if obj.encoding.is_some() {
        return Ok(None);
    }
    let obj = match info.file_hash {
        Some(expected) => {
            if hash_body(nar_key, obj).await? == expected || !decodable {
                return Ok(None);
            }
            match store.get(nar_key, None).await? {
                Some(obj) => obj,
                None => return Ok(None),
            }
        }
        None => obj,
    };
    // What is in the store is checked whatever this server's upload limits, which may have
    // been larger when it went in (xz's largest dictionary is 1.5 GiB).
    let limits = crate::upload::Limits {
        max_nar_bytes: u64::MAX,
        xz_memory_limit_bytes: 2 << 30,
    };
    let length = obj.length;
    let reason =
        match crate::upload::digest::digest_into(obj.body, info.compression, None, None, limits)
            .await
        {
            Ok(d) if length.is_some_and(|l| l != d.input.size) => {
                return Err(StoreError::Other(format!(
                    "{nar_key}: read {} of its {} bytes",
                    d.input.size,
                    length.unwrap_or_default()
                )));
            }
            Ok(d) if d.nar.hash != info.nar_hash => {
                format!("decodes to {}, NarHash says {}", d.nar.hash, info.nar_hash)
            }
            Ok(d) if d.nar.size != info.nar_size => format!(
                "decodes to {} bytes, NarSize says {}",
                d.nar.size, info.nar_size
            ),
            Ok(_) => return Ok(None),
            Err(crate::error::Error::Upload(crate::error::UploadError::Rejected(why))) => {
                format!("does not decode: {why}")
            }
            Err(crate::error::Error::Store(e)) => return Err(e),
            Err(e) => return Err(StoreError::Other(format!("{nar_key}: {e}"))),
        };
    Ok(Some(Finding::NarHash {
        key,
        nar: nar.to_owned(),
        reason,
    }))
}

/// The SHA-256 of an object's bytes, all of them (a body cut short is an error).
async fn hash_body(key: &str, obj: crate::store::Object) -> Result<Sha256, StoreError> {
    use sha2::Digest as _;
    let mut body = obj.body;
    let mut h = sha2::Sha256::new();
    let mut read = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        read += chunk.len() as u64;
        h.update(&chunk);
    }
    if let Some(l) = obj.length.filter(|&l| l != read) {
        return Err(StoreError::Other(format!(
            "{key}: read {read} of its {l} bytes"
        )));
    }
    Ok(Sha256::from_bytes(h.finalize().into()))
}

async fn repair_as(
    store: &Arc<dyn Store>,
    store_dir: &str,
    c: &Checked,
    findings: &[Finding],
    opts: &Options,
    run: &deleting::Run,
    report: &mut Report,
) {
    let Checked {
        graph,
        corrupt,
        inv,
        own_bad,
        upstream,
        contents,
    } = c;
    let grace = opts
        .now
        .checked_sub(opts.grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut unservable = vec![false; graph.len()];
    // Broken on their own but younger than the grace period (perhaps an upload in progress):
    // kept, with the paths that need them, and said so (below).
    let mut young_bad = vec![false; graph.len()];
    for (i, n) in graph.nodes.iter().enumerate() {
        if !own_bad[i] {
            continue;
        }
        if n.modified > grace {
            young_bad[i] = true;
            continue;
        }
        let rehash = corrupt.contains(&(i as u32)).then_some(store_dir);
        unservable[i] = still_unservable(store.as_ref(), n, upstream, rehash, report).await;
    }
    // The digest records of the NARs found again not to be what their narinfo says, first:
    // one left beside a copy too young to be deleted, or by a repair that stops before its
    // end, would have an upload's narinfo check take that copy for its file and publish it
    // again (a record of a good NAR deleted costs a read back, never more).
    let corrupt_nars: HashSet<&str> = corrupt
        .iter()
        .filter(|&&i| unservable[i as usize])
        .filter_map(|&i| graph.nodes[i as usize].nar.as_deref())
        .collect();
    let corrupt_records: Vec<String> = inv
        .nar_digests
        .iter()
        .filter(|(_, _, nar)| corrupt_nars.contains(nar.as_str()))
        .map(|(k, _, _)| k.clone())
        .collect();
    delete_each(store.as_ref(), corrupt_records, report, run, &opts.stop).await;
    propagate(graph, &mut unservable, &mut Vec::new());
    // Confirmed broken a moment ago, a path may have been healed since (its missing reference
    // uploaded) and be relied on by an upload of a path referring to it: one an upload in
    // progress names stays (after the propagation: none of it is deleted).
    let mut acc = match relied_on(store.as_ref(), inv, opts).await {
        Ok(r) => r,
        Err(e) => {
            report
                .repair_errors
                .push(format!("reading access records: {e}; nothing repaired"));
            return;
        }
    };
    // With its closure: the healing may have been deeper down (a reference's missing
    // reference uploaded), and deleting a path below would break the one relied on for good.
    // So too a narinfo younger than the grace period that refers to a broken path: nothing
    // that young is deleted, nor what it needs (a later run repairs what is still broken).
    let mut kept = vec![false; graph.len()];
    for (i, n) in graph.nodes.iter().enumerate() {
        let relied = acc.uploading.contains(&n.hash);
        if unservable[i] && (relied || n.modified > grace) {
            let listed = if relied {
                &mut report.relied_on
            } else {
                &mut report.young
            };
            keep_closure(graph, i, &mut kept, &mut unservable, listed);
        }
    }
    // The young paths broken on their own, and the paths that need them (at any depth), unless
    // deleted for another broken reference or listed already.
    propagate(graph, &mut young_bad, &mut Vec::new());
    let listed: HashSet<String> = report
        .young
        .iter()
        .chain(&report.relied_on)
        .cloned()
        .collect();
    for (i, n) in graph.nodes.iter().enumerate() {
        let key = object_key::narinfo(n.hash);
        if young_bad[i] && !unservable[i] && !listed.contains(&key) {
            report.young.push(key);
        }
    }
    let order = sweep::referrers_first(graph, &unservable);
    let mut deleted = vec![false; graph.len()];
    for (n, chunk) in order.chunks(DELETE_CHUNK).enumerate() {
        if n > 0 {
            // A long repair: uploads that began meanwhile may rely on what is left (one
            // healed by them, or what it needs). Those are kept, with their closures.
            if let Err(e) = access::reread(store.as_ref(), &mut acc, store.now()).await {
                report
                    .repair_errors
                    .push(format!("re-reading access records: {e}; stopped repairing"));
                return;
            }
            for &i in &order[n * DELETE_CHUNK..] {
                let i = i as usize;
                if !unservable[i] || !acc.uploading.contains(&graph.nodes[i].hash) {
                    continue;
                }
                // Its references come after it in the order: none is deleted yet.
                keep_closure(graph, i, &mut kept, &mut unservable, &mut report.relied_on);
            }
        }
        let chunk: Vec<u32> = chunk
            .iter()
            .copied()
            .filter(|&i| unservable[i as usize])
            .collect();
        // Copies to write back if an upload turns out to have relied on one of them (below).
        // One that cannot be read is not deleted; one too large to be a narinfo goes without
        // a copy (no server serves it, so no upload relies on it).
        let mut bodies: HashMap<u32, Bytes> = HashMap::new();
        let mut oversized = HashSet::new();
        for &i in &chunk {
            let key = object_key::narinfo(graph.nodes[i as usize].hash);
            match store.get_bytes(&key, crate::nix::MAX_NARINFO_BYTES).await {
                Ok(Some(body)) => {
                    bodies.insert(i, body);
                }
                Ok(None) => {}
                Err(StoreError::TooLarge { .. }) => {
                    oversized.insert(i);
                }
                Err(e) => report
                    .repair_errors
                    .push(format!("{key}: {e}; not deleted")),
            }
        }
        let chunk: Vec<u32> = chunk
            .into_iter()
            .filter(|i| bodies.contains_key(i) || oversized.contains(i))
            .collect();
        let keys: Vec<String> = chunk
            .iter()
            .map(|&i| object_key::narinfo(graph.nodes[i as usize].hash))
            .collect();
        // The copies outlive this run if it dies before the chunk is settled (see
        // super::unfinished).
        let recorded = !chunk.is_empty();
        if recorded {
            let copies = chunk
                .iter()
                .filter_map(|i| Some((graph.nodes[*i as usize].hash, bodies.get(i)?)));
            if let Err(e) = super::unfinished::record(store.as_ref(), run.name(), copies).await {
                report.repair_errors.push(format!(
                    "keeping copies of the narinfos to delete: {e}; stopped repairing"
                ));
                return;
            }
        }
        let gone = delete_each(store.as_ref(), keys, report, run, &opts.stop).await;
        for (&i, gone) in chunk.iter().zip(gone) {
            deleted[i as usize] = gone;
        }
        // An upload that began after the look before this chunk may have found one of them
        // (healed since it was found broken) and relied on it before it went: written back,
        // with what it needs, as a collection does after each batch.
        let reread = access::reread(store.as_ref(), &mut acc, store.now()).await;
        let in_chunk: HashSet<u32> = chunk.iter().copied().collect();
        // Kept with their closures from here on: what is left of them is not deleted by a
        // later chunk either. Not those deleted in an earlier chunk, which stay deleted (an
        // upload relying on one found it missing then): they keep nothing.
        let back: Vec<u32> = match &reread {
            Ok(_) => {
                for i in 0..graph.len() {
                    let gone_before = deleted[i] && !in_chunk.contains(&(i as u32));
                    if !kept[i] && !gone_before && acc.uploading.contains(&graph.nodes[i].hash) {
                        keep_closure(graph, i, &mut kept, &mut unservable, &mut report.relied_on);
                    }
                }
                chunk
                    .iter()
                    .copied()
                    .filter(|&i| kept[i as usize])
                    .collect()
            }
            // Any of them may have been relied on.
            Err(_) => chunk.clone(),
        };
        let back: Vec<u32> = back.into_iter().filter(|&i| deleted[i as usize]).collect();
        // Said first: it is why the whole chunk is written back.
        let why = match &reread {
            Ok(_) => "which an upload relies on",
            Err(e) => {
                report.repair_errors.push(format!(
                    "re-reading access records: {e}; what was just deleted is written back, and \
                     repairing stopped"
                ));
                "as the access records could not be read"
            }
        };
        let mut not_back = false;
        for j in sweep::references_first(graph, &back) {
            // The store failing writes: the rest stays in this run's copies, which the next
            // run settles, rather than each waiting out its own retries.
            if not_back {
                break;
            }
            let key = object_key::narinfo(graph.nodes[j as usize].hash);
            let Some(body) = bodies.get(&j) else { continue };
            // Not before what it needs: one whose reference could not be written back stays
            // deleted with it.
            let missing = graph.nodes[j as usize]
                .refs
                .iter()
                .find(|&&r| r != j && deleted[r as usize]);
            if let Some(&r) = missing {
                let needed = object_key::narinfo(graph.nodes[r as usize].hash);
                report.repair_errors.push(format!(
                    "not writing back {key}, {why}: its reference {needed} is not back"
                ));
                continue;
            }
            // Uploaded again meanwhile (the path healed), the upload's narinfo stays.
            match sweep::write_back(store.as_ref(), &key, body).await {
                Ok(()) => {
                    deleted[j as usize] = false;
                    report.repaired.retain(|k| *k != key);
                }
                Err(e) => {
                    not_back = true;
                    report
                        .repair_errors
                        .push(format!("writing back {key}, {why}: {e}"));
                }
            }
        }
        // Settled: what uploads relied on is back. If not, the copies stay for the next run.
        if recorded && !not_back {
            if let Err(e) = super::unfinished::clear(store.as_ref(), run.name()).await {
                tracing::warn!(cause = %e, "could not remove the copies of a settled chunk; the next run writes back what of it is missing");
            }
        }
        // The store fails writes, or the records cannot be read: nothing more is deleted, as a
        // collection stops.
        if not_back {
            report.repair_errors.push(
                "a deleted narinfo could not be written back; repairing stopped (this run's \
                 copies under _cellar/unfinished/ are written back by the next `cellar gc` or \
                 `cellar verify --repair`)"
                    .into(),
            );
            return;
        }
        if reread.is_err() {
            return;
        }
        if halted_noted(run, &opts.stop, report) {
            break;
        }
    }
    // A narinfo that could not be deleted stays: so do its NAR and listing.
    for &i in &order {
        unservable[i as usize] = deleted[i as usize];
    }
    // Stopped (asked to, or its announcement lapsed): nothing more is deleted.
    if halted_noted(run, &opts.stop, report) {
        return;
    }
    let unservable = &unservable[..];
    // Realisations naming a path this repair deleted, or one the store has no narinfo for.
    let gone: HashSet<StorePathHash> = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| unservable[*i])
        .map(|(_, n)| n.hash)
        .collect();
    let realisations = named_to_delete(
        store.as_ref(),
        contents
            .realisations
            .iter()
            .map(|r| (&r.key, &r.meta, &r.out)),
        |h| {
            (gone.contains(h) || graph.find(*h).is_none() && !upstream.contains(h))
                .then(|| object_key::narinfo(*h))
        },
        // An upload of the path may be under way (its narinfo not written yet).
        (&mut acc, |acc, h| acc.uploading.contains(h), "realisation"),
        grace,
        report,
    )
    .await;
    delete_each(store.as_ref(), realisations, report, run, &opts.stop).await;
    if halted_noted(run, &opts.stop, report) {
        return;
    }
    // NARs and listings left without a narinfo, old enough not to be uploads.
    let remaining: HashSet<&str> = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| !unservable[*i])
        .filter_map(|(_, n)| n.nar.as_deref())
        .collect();
    let kept_paths: HashSet<StorePathHash> = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| !unservable[*i] && n.problem.is_none())
        .map(|(_, n)| n.hash)
        .collect();
    let mut nars: Vec<String> = inv
        .nars
        .iter()
        .filter(|(f, m)| !remaining.contains(f.as_str()) && m.modified <= grace)
        .map(|(f, _)| f.clone())
        .collect();
    nars.sort();
    let mut rest = Vec::new();
    rest.extend(
        inv.listings
            .iter()
            // One of a path being uploaded again (an upload record read since names it) was
            // written again, after the listing found it orphaned.
            .filter(|(h, m)| {
                !kept_paths.contains(h) && !acc.uploading.contains(h) && m.modified <= grace
            })
            .map(|(h, _)| object_key::listing(*h)),
    );
    // A pin that does not parse is left for a human: gc refuses to run while it is there,
    // and deleting it would let the next run collect what it was meant to keep.
    let pins: HashSet<&str> = inv.pins.iter().map(|(k, _)| k.as_str()).collect();
    for f in findings {
        match f {
            Finding::BadReserved { key, .. } if !pins.contains(key.as_str()) => {
                rest.push(key.clone());
            }
            // Not repaired, so the run does not end as if all were: a failure to see.
            Finding::BadReserved { key, .. } => report.repair_errors.push(format!(
                "{key}: a pin that does not parse is left for you to fix or remove \
                 (`cellar pin rm`); gc refuses to run while it is there"
            )),
            _ => {}
        }
    }
    let gone_nars = delete_nars(store.as_ref(), inv, &nars, opts, run, report).await;
    if halted_noted(run, &opts.stop, report) {
        return;
    }
    // Debug info links naming a NAR this repair deleted, or one the store lacks.
    let links = named_to_delete(
        store.as_ref(),
        contents.links.iter().map(|l| (&l.key, &l.meta, &l.nar)),
        |nar| {
            (gone_nars.contains(nar) || !inv.nars.contains_key(nar)).then(|| format!("nar/{nar}"))
        },
        // Nix writes a path's links before its NAR, which an upload under way records (as
        // the client asks for it) before sending it.
        (
            &mut acc,
            |acc, nar| acc.nars.contains(nar.as_str()),
            "debug info link",
        ),
        grace,
        report,
    )
    .await;
    rest.extend(links);
    // The digest records of the NARs this repair deleted.
    rest.extend(
        inv.nar_digests
            .iter()
            .filter(|(_, _, nar)| gone_nars.contains(nar))
            .map(|(k, _, _)| k.clone()),
    );
    delete_each(store.as_ref(), rest, report, run, &opts.stop).await;
    if halted_noted(run, &opts.stop, report) {
        return;
    }
    match store.cleanup_staging(opts.grace).await {
        Ok(n) if n > 0 => report.repaired.push(format!("{n} unfinished upload(s)")),
        Ok(_) => {}
        Err(e) => report
            .repair_errors
            .push(format!("unfinished uploads: {e}")),
    }
}

/// The realisations or debug info links (key, listing, what it names) that may go: older than
/// `grace`, naming what `gone` says is gone or was missing (the key to look at), found missing
/// by a second look at that key (it may have been uploaded since the listing, or again since
/// the repair deleted it), and not named by an upload under way (`relied`: the upload records,
/// read again after the looks, whether they name it, and what the objects are, for messages).
/// One not understood is left for a human, as a repair error.
async fn named_to_delete<'a, T: 'a>(
    store: &dyn Store,
    objects: impl Iterator<Item = (&'a String, &'a super::inventory::Meta, &'a Named<T>)>,
    gone: impl Fn(&T) -> Option<String>,
    relied: (
        &mut access::Accessed,
        impl Fn(&access::Accessed, &T) -> bool,
        &str,
    ),
    grace: SystemTime,
    report: &mut Report,
) -> Vec<String> {
    let mut unsure = Vec::new();
    for (key, meta, named) in objects {
        match named {
            Named::NotUnderstood(_) => report.repair_errors.push(format!(
                "{key}: not understood, left for you to check and remove (verify deletes \
                 only what it understands)"
            )),
            Named::Understood(t) if meta.modified <= grace => {
                if let Some(probe) = gone(t) {
                    unsure.push((key, t, probe));
                }
            }
            Named::Understood(_) | Named::Gone => {}
        }
    }
    let looks: Vec<_> =
        futures::stream::iter(unsure.into_iter().map(|(key, t, probe)| async move {
            let r = store.head(&probe).await;
            (key, t, probe, r)
        }))
        .buffered(SECOND_LOOKS)
        .collect()
        .await;
    let mut missing = Vec::new();
    for (key, t, probe, r) in looks {
        match r {
            Ok(None) => missing.push((key, t)),
            Ok(Some(_)) => {}
            Err(e) => report
                .repair_errors
                .push(format!("{probe}: {e}; {key} kept")),
        }
    }
    let (acc, names, what) = relied;
    if let Err(e) = access::reread(store, acc, store.now()).await {
        report
            .repair_errors
            .push(format!("re-reading access records: {e}; no {what} deleted"));
        return Vec::new();
    }
    missing
        .into_iter()
        .filter(|(_, t)| !names(acc, t))
        .map(|(key, _)| key.clone())
        .collect()
}

/// Second looks at the store in flight at once.
const SECOND_LOOKS: usize = 16;

/// Paths uploads may rely on now: named by upload records young enough to be uploads in
/// progress (those listed, and those written since).
async fn relied_on(
    store: &dyn Store,
    inv: &Inventory,
    opts: &Options,
) -> Result<access::Accessed, StoreError> {
    let mut acc = access::read_all(store, &inv.access, Duration::ZERO, opts.now).await?;
    access::reread(store, &mut acc, store.now()).await?;
    Ok(acc)
}

/// Keeps node `i` and its closure from deletion (`kept`: what was kept so far), listing each
/// broken narinfo of it in `listed`.
fn keep_closure(
    graph: &Graph,
    i: usize,
    kept: &mut [bool],
    unservable: &mut [bool],
    listed: &mut Vec<String>,
) {
    for j in graph.close_over(i as u32, kept) {
        let j = j as usize;
        if unservable[j] {
            unservable[j] = false;
            listed.push(object_key::narinfo(graph.nodes[j].hash));
        }
    }
}

/// Whether the repair must stop (asked to, or its announcement lapsed), said in the report
/// (once) when so: a repair that stops before its end did not repair what it left, and must
/// not end as if it had (exit 0, a success in the metrics).
fn halted_noted(run: &deleting::Run, stop: &super::Stop, report: &mut Report) -> bool {
    let why = if !run.live() {
        sweep::LAPSED
    } else if stop.requested() {
        super::STOPPED
    } else {
        return false;
    };
    if !report.repair_errors.iter().any(|e| e == why) {
        report.repair_errors.push(why.into());
    }
    true
}

/// Keys deleted between two looks at the run's announcement (kept live for other collectors
/// through a long repair: one of a bucket an expiry rule broke can delete for hours).
pub(super) const DELETE_CHUNK: usize = 1024;

/// Deletes `keys` in order, a chunk at a time, while the run's announcement is live; says for
/// each whether it is gone.
async fn delete_each(
    store: &dyn Store,
    keys: Vec<String>,
    report: &mut Report,
    run: &deleting::Run,
    stop: &super::Stop,
) -> Vec<bool> {
    let mut gone = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(DELETE_CHUNK) {
        if halted_noted(run, stop, report) {
            gone.resize(keys.len(), false);
            break;
        }
        gone.extend(delete_reporting(store, chunk, report).await);
    }
    gone
}

/// Deletes `keys`, reporting each; says for each whether it is gone.
async fn delete_reporting(store: &dyn Store, keys: &[String], report: &mut Report) -> Vec<bool> {
    let results = sweep::delete_keys(store, keys).await;
    let mut gone = Vec::with_capacity(keys.len());
    for (key, r) in keys.iter().zip(results) {
        let deleted = match r {
            Ok(()) => true,
            // Applied all the same (its answer lost)? Then it is deleted, as if it had
            // answered; if that cannot be told, it is taken to be there.
            Err(e) => match sweep::gone_after_failure(store, key).await {
                Some(true) => {
                    tracing::warn!(%key, cause = %e, "a deletion answered with an error, but the object is gone: done");
                    true
                }
                _ => {
                    report.repair_errors.push(format!("{key}: {e}"));
                    false
                }
            },
        };
        if deleted {
            report.repaired.push(key.clone());
        }
        gone.push(deleted);
    }
    gone
}

/// Deletes orphan NAR files under the collector's announcement protocol
/// ([`super::deleting`]): not one a recent upload names in its access record (an upload may
/// rely on a NAR already in the store, and its narinfo may not be written yet), each batch
/// announced before the records are read again, so that an upload recording one of them
/// later sees the announcement and is refused.
/// Says which it deleted.
async fn delete_nars(
    store: &dyn Store,
    inv: &Inventory,
    files: &[String],
    opts: &Options,
    run: &deleting::Run,
    report: &mut Report,
) -> HashSet<String> {
    let mut deleted = HashSet::new();
    if files.is_empty() {
        return deleted;
    }
    // An upload's record comes seconds before its narinfo: one older than the grace period
    // belongs to an upload that is over (`read_all` reads upload records for at least
    // `access::UPLOAD_RECORD_LIFETIME` anyway).
    let mut acc = match access::read_all(store, &inv.access, opts.grace, opts.now).await {
        Ok(acc) => acc,
        Err(e) => {
            report
                .repair_errors
                .push(format!("reading access records: {e}; no NAR deleted"));
            return deleted;
        }
    };
    for batch in files.chunks(sweep::BATCH) {
        if opts.stop.requested() {
            report.repair_errors.push(super::STOPPED.into());
            return deleted;
        }
        let free: Vec<&str> = batch
            .iter()
            .map(String::as_str)
            .filter(|f| !acc.nars.contains(*f))
            .collect();
        if !free.is_empty() {
            if let Err(e) = run.announce(free.iter().copied()).await {
                report
                    .repair_errors
                    .push(format!("announcing deletions: {e}; batch skipped"));
                continue;
            }
            tokio::time::sleep(opts.settle).await;
            if let Err(e) = access::reread(store, &mut acc, store.now()).await {
                report
                    .repair_errors
                    .push(format!("re-reading access records: {e}; batch skipped"));
                continue;
            }
        }
        if !run.live() {
            report.repair_errors.push(sweep::LAPSED.into());
            return deleted;
        }
        let (in_use, free): (Vec<&String>, Vec<&String>) =
            batch.iter().partition(|f| acc.nars.contains(f.as_str()));
        report
            .in_use
            .extend(in_use.into_iter().map(|f| format!("nar/{f}")));
        // Under this batch's announcement, which must stay as it is until they are gone.
        let keys: Vec<String> = free.iter().map(|f| format!("nar/{f}")).collect();
        let gone = delete_reporting(store, &keys, report).await;
        deleted.extend(
            free.into_iter()
                .zip(gone)
                .filter(|(_, gone)| *gone)
                .map(|(f, _)| f.clone()),
        );
    }
    deleted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_finding_has_its_own_metrics_kind() {
        let k = || String::from("k");
        let all = [
            (
                Finding::Unparseable {
                    key: k(),
                    reason: k(),
                },
                "unparseable",
            ),
            (
                Finding::WrongHash {
                    key: k(),
                    detail: k(),
                },
                "wrong_hash",
            ),
            (Finding::BadUrl { key: k(), url: k() }, "bad_url"),
            (Finding::MissingNar { key: k(), nar: k() }, "missing_nar"),
            (
                Finding::NarSize {
                    key: k(),
                    nar: k(),
                    expected: 1,
                    actual: 2,
                },
                "nar_size",
            ),
            (
                Finding::MissingReference {
                    key: k(),
                    reference: k(),
                },
                "missing_reference",
            ),
            (
                Finding::UnservableReference {
                    key: k(),
                    reference: k(),
                },
                "unservable_reference",
            ),
            (
                Finding::NarHash {
                    key: k(),
                    nar: k(),
                    reason: k(),
                },
                "nar_hash",
            ),
            (Finding::OrphanNar { key: k() }, "orphan_nar"),
            (Finding::OrphanListing { key: k() }, "orphan_listing"),
            (Finding::UnfinishedUpload { what: k() }, "unfinished_upload"),
            (
                Finding::BadReserved {
                    key: k(),
                    reason: k(),
                },
                "bad_reserved",
            ),
            (
                Finding::DanglingRealisation { key: k(), out: k() },
                "dangling_realisation",
            ),
            (
                Finding::DanglingDebugInfo { key: k(), nar: k() },
                "dangling_debuginfo",
            ),
            (
                Finding::Unreadable {
                    key: k(),
                    reason: k(),
                },
                "unreadable",
            ),
            (
                Finding::ReadFailed {
                    key: k(),
                    reason: k(),
                },
                "read_failed",
            ),
        ];
        for (finding, kind) in &all {
            assert_eq!(finding.kind(), *kind, "{finding}");
        }
    }

    /// A sample is `n` distinct narinfos of those listed, any of them.
    #[test]
    fn a_sample_is_drawn_from_all() {
        let mut seen = HashSet::new();
        for _ in 0..300 {
            let mut v: Vec<u32> = (0..10).collect();
            sample(&mut v, 3);
            assert_eq!(v.len(), 3);
            assert!(v.iter().all(|x| *x < 10));
            assert_eq!(v.iter().collect::<HashSet<_>>().len(), 3, "{v:?}");
            seen.extend(v);
        }
        assert_eq!(seen.len(), 10, "never drawn: {seen:?}");
        let mut few: Vec<u32> = (0..2).collect();
        sample(&mut few, 5);
        assert_eq!(few.len(), 2);
    }
}
