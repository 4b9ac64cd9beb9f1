//! Deletion: the plan (what goes, in which order) and its execution.
//!
//! Narinfos go first, referrers before what they refer to (a path is deleted only once the
//! deletions of its referrers are done: [`waves`]): at every moment the narinfos left in the
//! store have complete closures, even if the run dies half-way. They go in batches;
//! before each batch the collector re-reads the access records written since it last looked,
//! and after it, once more. An upload writes its record (the narinfo and its references)
//! before it checks that the references exist, so a reference an upload relies on is either
//! seen in time and kept, or deleted in the batch just done and written back from the copy
//! read just before deleting it (kept in the store until the batch is settled, for the next
//! run should this one die: [`super::unfinished`]), or already gone when the upload checks
//! (then the upload is refused, and `nix copy` uploads the path again on its next run). NARs,
//! listings and realisations go after all narinfos, then logs, then expired access records;
//! NARs are announced before the re-read that precedes their batch, many batches at once, and
//! the collector waits `deleting::SETTLE` after naming new ones ([`super::deleting`]), since a
//! deleted NAR cannot be written back. If the records cannot be read, nothing more is deleted.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use futures::{StreamExt as _, TryStreamExt as _};

use super::access::{self, Accessed, Entry};
use super::deleting;
use super::graph::Graph;
use super::inventory::{Inventory, Meta};
use super::mark::Marked;
use super::report::Progress;
use crate::config::GcConfig;
use crate::nix::StorePathHash;
use crate::store::{object_key, Store, StoreError};

/// Objects deleted between two re-reads of the access records: the smaller, the shorter the
/// time in which an upload could rely on an object the collector has already decided to delete.
pub(super) const BATCH: usize = 64;

/// Entries of the NAR phase (NARs and the rest) whose NARs one announcement names (64
/// batches, at most ~250 KiB of names): the collector waits `deleting::SETTLE` once per
/// announcement of new NARs, and an upload relying on any NAR named is refused meanwhile.
pub(super) const ANNOUNCED_AT_ONCE: usize = 64 * BATCH;

/// Deletions in flight at once.
const DELETE_CONCURRENCY: usize = 16;

/// What an object that names another (a realisation, a debug info link) was found to name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named<T> {
    /// It names this.
    Understood(T),
    /// Deleted since the listing.
    Gone,
    /// Too large, or not what Nix writes there (why). gc keeps it: it never deletes what it
    /// does not understand; `verify` reports it.
    NotUnderstood(String),
}

impl<T> Named<T> {
    pub fn understood(&self) -> Option<&T> {
        match self {
            Self::Understood(t) => Some(t),
            Self::Gone | Self::NotUnderstood(_) => None,
        }
    }
}

/// A realisation (`realisations/…`, `build-trace/…`) and the path it names.
pub struct Realisation {
    pub key: String,
    pub meta: Meta,
    pub out: Named<StorePathHash>,
}

/// A debug info link (`debuginfo/…`) and the NAR it names.
pub struct DebugLink {
    pub key: String,
    pub meta: Meta,
    pub nar: Named<String>,
}

/// What the objects that name others name: realisations and debug info links.
pub struct Contents {
    pub realisations: Vec<Realisation>,
    pub links: Vec<DebugLink>,
}

impl Contents {
    pub async fn read(store: &dyn Store, inv: &Inventory) -> Result<Self, StoreError> {
        Ok(Self {
            realisations: read_realisations(store, inv).await?,
            links: read_debuginfo(store, inv).await?,
        })
    }
}

/// What a run deletes. Nothing in it is younger than the grace period.
#[derive(Default)]
pub struct Plan {
    /// Nodes whose narinfo goes, referrers first.
    pub narinfos: Vec<u32>,
    /// NAR file names no kept narinfo points to.
    pub nars: Vec<(String, Meta)>,
    pub listings: Vec<(StorePathHash, Meta)>,
    pub realisations: Vec<(String, Meta, Option<StorePathHash>)>,
    /// Build logs, with the derivation they are of.
    pub logs: Vec<(String, StorePathHash, Meta)>,
    /// Debug info links, with the NAR they name.
    pub debuginfo: Vec<(String, Meta, String)>,
    pub access_records: Vec<(String, Meta)>,
    /// NAR digest records ([`crate::upload::nar_records`]), with the NAR they describe.
    pub nar_digests: Vec<(String, Meta, String)>,
    /// Announcements left by runs that died (killed, their machine gone): long past counting,
    /// removed so that every upload's and collector's look at the announcements stays short.
    pub dead_announcements: Vec<String>,
}

fn old_enough(meta: &Meta, cutoff: SystemTime) -> bool {
    meta.modified <= cutoff
}

impl Plan {
    pub fn new(
        graph: &Graph,
        inv: &Inventory,
        marked: &Marked,
        contents: Contents,
        cfg: &GcConfig,
        now: SystemTime,
        acc: &Accessed,
    ) -> Self {
        let grace = now.checked_sub(cfg.grace).unwrap_or(SystemTime::UNIX_EPOCH);
        let retention = now
            .checked_sub(cfg.keep.max(cfg.grace))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let kept_hashes: HashSet<StorePathHash> = (0..graph.len() as u32)
            .filter(|&i| marked.kept(i))
            .map(|i| graph.nodes[i as usize].hash)
            .collect();
        let kept_nars: HashSet<&str> = (0..graph.len() as u32)
            .filter(|&i| marked.kept(i))
            .filter_map(|i| graph.nodes[i as usize].nar.as_deref())
            .collect();
        let kept_derivers: HashSet<StorePathHash> = (0..graph.len() as u32)
            .filter(|&i| marked.kept(i))
            .filter_map(|i| graph.nodes[i as usize].deriver)
            .collect();
        // NARs uploads recorded relying on are kept too: their narinfo may not be listed yet.
        let mut nars: Vec<(String, Meta)> = inv
            .nars
            .iter()
            .filter(|(f, m)| {
                !kept_nars.contains(f.as_str())
                    && !acc.nars.contains(f.as_str())
                    && old_enough(m, grace)
            })
            .map(|(f, m)| (f.clone(), *m))
            .collect();
        nars.sort_by(|a, b| a.0.cmp(&b.0));
        let going: HashSet<&str> = nars.iter().map(|(f, _)| f.as_str()).collect();
        // A link goes with the NAR it names; one naming a NAR the store lacks (its upload
        // never finished, or the NAR went without it) once older than the retention, as
        // Nix writes the link before the NAR. One that cannot be read is kept.
        let Contents {
            realisations,
            links,
        } = contents;
        let debuginfo = links
            .into_iter()
            .filter_map(|l| {
                let Named::Understood(nar) = l.nar else {
                    return None;
                };
                let goes = if inv.nars.contains_key(&nar) {
                    going.contains(nar.as_str())
                } else {
                    !acc.nars.contains(nar.as_str())
                        && !kept_nars.contains(nar.as_str())
                        && old_enough(&l.meta, retention)
                };
                goes.then_some((l.key, l.meta, nar))
            })
            .collect();
        // A digest record goes with its NAR; one of a NAR the store lacks once past the grace
        // period (it is written while its NAR is committed, and may land first).
        let nar_digests = inv
            .nar_digests
            .iter()
            .filter(|(_, m, nar)| {
                if inv.nars.contains_key(nar) {
                    going.contains(nar.as_str())
                } else {
                    !acc.nars.contains(nar.as_str()) && old_enough(m, grace)
                }
            })
            .cloned()
            .collect();
        Plan {
            debuginfo,
            nar_digests,
            narinfos: referrers_first(
                graph,
                &(0..graph.len() as u32)
                    .map(|i| !marked.kept(i))
                    .collect::<Vec<_>>(),
            ),
            nars,
            listings: inv
                .listings
                .iter()
                .filter(|(h, m)| !kept_hashes.contains(h) && old_enough(m, grace))
                .copied()
                .collect(),
            realisations: realisations
                .into_iter()
                .filter(|r| {
                    // One whose path cannot be read is kept: never delete what is not understood.
                    // One whose path has no narinfo here (an upstream may serve it) goes only
                    // once older than the retention.
                    let cutoff = match r.out.understood().map(|h| graph.find(*h)) {
                        Some(Some(_)) => grace,
                        Some(None) => retention,
                        None => return false,
                    };
                    r.out.understood().is_some_and(|h| !kept_hashes.contains(h))
                        && old_enough(&r.meta, cutoff)
                })
                .map(|r| (r.key, r.meta, r.out.understood().copied()))
                .collect(),
            logs: inv
                .logs
                .iter()
                .filter(|(_, drv, m)| !kept_derivers.contains(drv) && old_enough(m, retention))
                .map(|(k, drv, m)| (k.clone(), *drv, *m))
                .collect(),
            access_records: acc
                .expired
                .iter()
                .filter(|(_, m)| old_enough(m, grace))
                .cloned()
                .collect(),
            dead_announcements: {
                let dead = now
                    .checked_sub(deleting::TTL * 2)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                inv.announcements
                    .iter()
                    .filter(|(_, m)| old_enough(m, dead))
                    .map(|(k, _)| k.clone())
                    .collect()
            },
        }
    }
}

/// The `condemned` nodes, ordered so that each comes after every condemned node referring to
/// it: deleting in this order never leaves a narinfo whose reference is gone.
pub fn referrers_first(graph: &Graph, condemned: &[bool]) -> Vec<u32> {
    let n = graph.len();
    let mut referrers = vec![0u32; n];
    // Only references between condemned nodes order anything: a condemned path may refer to
    // a kept one, which is never deleted.
    let condemned_refs = |i: u32| {
        graph.nodes[i as usize]
            .refs
            .iter()
            .copied()
            .filter(|&r| condemned[r as usize])
    };
    for i in (0..n as u32).filter(|&i| condemned[i as usize]) {
        for r in condemned_refs(i) {
            referrers[r as usize] += 1;
        }
    }
    // First in, first out: the order comes in layers, so that [`waves`] of it are wide.
    let mut ready: std::collections::VecDeque<u32> = (0..n as u32)
        .filter(|&i| condemned[i as usize] && referrers[i as usize] == 0)
        .collect();
    let mut order = Vec::new();
    let mut placed = vec![false; n];
    while let Some(i) = ready.pop_front() {
        order.push(i);
        placed[i as usize] = true;
        for r in condemned_refs(i) {
            referrers[r as usize] -= 1;
            if referrers[r as usize] == 0 {
                ready.push_back(r);
            }
        }
    }
    // Only corrupt data has reference cycles (Nix paths cannot): those go last.
    order.extend((0..n as u32).filter(|&i| condemned[i as usize] && !placed[i as usize]));
    order
}

/// `order` (referrers first, as [`referrers_first`] gives it) cut into waves, each deleted
/// at once after the one before is done: none of a wave refers to another of its wave, so a
/// path goes only once every referrer of it before it in `order` is gone, and a run that dies
/// half-way leaves no narinfo without a reference.
pub(super) fn waves(graph: &Graph, order: &[u32]) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    let mut wave = Vec::new();
    let mut referred: HashSet<u32> = HashSet::new();
    for &i in order {
        if referred.contains(&i) {
            out.push(std::mem::take(&mut wave));
            referred.clear();
        }
        referred.extend(graph.nodes[i as usize].refs.iter().copied());
        wave.push(i);
    }
    if !wave.is_empty() {
        out.push(wave);
    }
    out
}

/// What happened during deletion.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Narinfos kept after all, because a server used them while the run was deleting.
    pub rescued: usize,
    /// Narinfos written back after deletion because an upload needed them.
    pub restored: usize,
    /// Narinfos deleted and not written back.
    pub deleted_narinfos: usize,
    /// The other objects deleted, by kind (`nar`, `listing`, `realisation`, `log`,
    /// `debuginfo`, `nar_digest`, `access_record`).
    pub deleted_objects: std::collections::BTreeMap<&'static str, usize>,
    pub errors: Vec<String>,
}

impl State<'_> {
    fn finish(self) -> Outcome {
        Outcome {
            deleted_narinfos: self.deleted.len(),
            ..self.out
        }
    }
}

/// The collector's view while deleting: what is kept, and what uploads rely on.
struct State<'a> {
    graph: &'a Graph,
    acc: &'a mut Accessed,
    kept: Vec<bool>,
    /// The NARs of kept narinfos.
    kept_nars: HashSet<Box<str>>,
    /// Narinfos this run deleted.
    deleted: HashSet<u32>,
    /// A narinfo an upload relied on could not be written back: the run deletes no more.
    write_back_failed: bool,
    /// The nodes naming each NAR file.
    nar_users: HashMap<&'a str, Vec<u32>>,
    /// The nodes naming each derivation as their `Deriver:`.
    derived: HashMap<StorePathHash, Vec<u32>>,
    out: Outcome,
}

/// Carries out `plan` in batches, re-reading access records before and after each one, as
/// `run` (its announcement kept live in the background, and withdrawn at the end).
#[allow(clippy::too_many_arguments)]
pub async fn execute(
    store: &Arc<dyn Store>,
    graph: &Graph,
    marked: &Marked,
    plan: &Plan,
    acc: &mut Accessed,
    settle: std::time::Duration,
    run: deleting::Run,
    stop: &super::Stop,
    progress: &dyn Progress,
) -> Outcome {
    let out = delete(
        store.as_ref(),
        graph,
        marked,
        plan,
        acc,
        settle,
        &run,
        stop,
        progress,
    )
    .await;
    run.end().await;
    out
}

/// Why a run stopped after a failed write-back.
const WRITE_BACK_FAILED: &str =
    "a narinfo an upload relied on could not be written back: stopped deleting (the next run \
     that deletes writes it back from the copies kept under _cellar/unfinished/)";

/// Why a run stopped deleting when its announcement could not be kept live.
pub(super) const LAPSED: &str = "the run's announcement could not be kept live (the store \
    refused or did not answer its renewals), so another collection could start: stopped deleting; \
    run it again";

#[allow(clippy::too_many_arguments)]
async fn delete(
    store: &dyn Store,
    graph: &Graph,
    marked: &Marked,
    plan: &Plan,
    acc: &mut Accessed,
    settle: std::time::Duration,
    run: &deleting::Run,
    stop: &super::Stop,
    progress: &dyn Progress,
) -> Outcome {
    let mut st = State {
        graph,
        acc,
        kept: (0..graph.len() as u32).map(|i| marked.kept(i)).collect(),
        kept_nars: (0..graph.len() as u32)
            .filter(|&i| marked.kept(i))
            .filter_map(|i| graph.nodes[i as usize].nar.clone())
            .collect(),
        deleted: HashSet::new(),
        nar_users: graph.nar_users(),
        write_back_failed: false,
        derived: {
            let mut d: HashMap<StorePathHash, Vec<u32>> = HashMap::new();
            for (i, n) in graph.nodes.iter().enumerate() {
                if let Some(drv) = n.deriver {
                    d.entry(drv).or_default().push(i as u32);
                }
            }
            d
        },
        out: Outcome::default(),
    };
    progress.phase("deleting narinfos", Some(plan.narinfos.len() as u64));
    // What servers used while this run was listing and marking.
    let mut records_read = st.rescue(store, &HashMap::new()).await;
    for batch in plan.narinfos.chunks(BATCH) {
        if !records_read {
            // Deleting without knowing what uploads rely on could break their closures.
            return st.finish();
        }
        // Between batches: the last one's re-read and write-backs are done.
        if stop.requested() {
            st.out.errors.push(super::STOPPED.into());
            return st.finish();
        }
        if st.write_back_failed {
            st.out.errors.push(WRITE_BACK_FAILED.into());
            return st.finish();
        }
        let todo: Vec<u32> = batch
            .iter()
            .copied()
            .filter(|&i| !st.kept[i as usize])
            .collect();
        // Copies to write back if an upload turns out to need one of them.
        let mut bodies: HashMap<u32, Bytes> = HashMap::new();
        let mut unread = Vec::new();
        // Too large to be a narinfo: no server serves it, so no upload relies on it, and it
        // goes without a copy (read whole, it would stop every run).
        let mut oversized = HashSet::new();
        for &i in &todo {
            let key = object_key::narinfo(graph.nodes[i as usize].hash);
            match store.get_bytes(&key, crate::nix::MAX_NARINFO_BYTES).await {
                Ok(Some(body)) => {
                    bodies.insert(i, body);
                }
                Ok(None) => {}
                Err(StoreError::TooLarge { .. }) => {
                    oversized.insert(i);
                }
                Err(e) => {
                    st.out.errors.push(format!("{key}: {e}"));
                    unread.push(i);
                }
            }
        }
        // A narinfo that stays is served: its closure and NAR stay with it.
        for i in unread {
            st.keep(store, i, &bodies).await;
        }
        let todo: Vec<u32> = todo
            .into_iter()
            .filter(|i| (bodies.contains_key(i) || oversized.contains(i)) && !st.kept[*i as usize])
            .collect();
        // The copies outlive this run if it dies before the batch is settled (see
        // super::unfinished).
        let copies = todo
            .iter()
            .filter_map(|i| Some((graph.nodes[*i as usize].hash, bodies.get(i)?)));
        let recorded = !todo.is_empty();
        if recorded {
            if let Err(e) = super::unfinished::record(store, run.name(), copies).await {
                st.out.errors.push(format!(
                    "keeping copies of the narinfos to delete: {e}; nothing more deleted"
                ));
                return st.finish();
            }
        }
        let mut lapsed = false;
        for wave in waves(graph, &todo) {
            if !run.live() {
                // The waves deleted so far get the re-read below, and their write-backs.
                lapsed = true;
                st.out.errors.push(LAPSED.into());
                break;
            }
            // A referrer that could not be deleted keeps its closure: not deleted now.
            let wave: Vec<u32> = wave.into_iter().filter(|&i| !st.kept[i as usize]).collect();
            let keys: Vec<String> = wave
                .iter()
                .map(|&i| object_key::narinfo(graph.nodes[i as usize].hash))
                .collect();
            let mut undeleted = Vec::new();
            for ((i, key), r) in wave.iter().zip(&keys).zip(delete_keys(store, &keys).await) {
                match r {
                    Ok(()) => {
                        st.deleted.insert(*i);
                    }
                    Err(e) => undeleted.push((*i, key, e)),
                }
            }
            for (i, key, e) in undeleted {
                match gone_after_failure(store, key).await {
                    // Deleted all the same (its answer lost): as if it had answered, so that
                    // the re-read writes it back if an upload relied on it.
                    Some(true) => {
                        tracing::warn!(%key, cause = %e, "a deletion answered with an error, but the narinfo is gone: done");
                        st.deleted.insert(i);
                    }
                    // There: served, so kept with its closure.
                    Some(false) => {
                        st.out.errors.push(format!("{key}: {e}"));
                        st.keep(store, i, &bodies).await;
                    }
                    // Cannot tell: written back, so that it is whole if it is there.
                    None => {
                        st.out.errors.push(format!("{key}: {e}"));
                        st.deleted.insert(i);
                        st.keep(store, i, &bodies).await;
                    }
                }
            }
        }
        progress.advance(batch.len() as u64);
        records_read = st.rescue(store, &bodies).await;
        if !records_read {
            // An upload may have relied on any narinfo of this batch: all are written back
            // (referrers come first, so a batch written back whole leaves whole closures).
            for &i in &todo {
                if st.deleted.contains(&i) {
                    st.keep(store, i, &bodies).await;
                }
            }
        }
        // Settled: what uploads relied on is back. If not, the copies stay for the next run.
        if recorded && !st.write_back_failed {
            if let Err(e) = super::unfinished::clear(store, run.name()).await {
                tracing::warn!(cause = %e, "could not remove the copies of a settled batch; the next run writes back what of it is missing");
            }
        }
        if !records_read || lapsed {
            return st.finish();
        }
    }

    if st.write_back_failed {
        st.out.errors.push(WRITE_BACK_FAILED.into());
        return st.finish();
    }
    let mut rest: Vec<Rest> = Vec::new();
    rest.extend(plan.nars.iter().map(|(f, _)| Rest::Nar(f.as_str())));
    rest.extend(plan.listings.iter().map(|(h, _)| Rest::Listing(*h)));
    rest.extend(
        plan.realisations
            .iter()
            .map(|(k, _, h)| Rest::Realisation(k, *h)),
    );
    rest.extend(plan.logs.iter().map(|(k, drv, _)| Rest::Log(k, *drv)));
    rest.extend(
        plan.debuginfo
            .iter()
            .map(|(k, _, nar)| Rest::DebugInfo(k, nar.as_str())),
    );
    rest.extend(
        plan.nar_digests
            .iter()
            .map(|(k, _, nar)| Rest::NarDigest(k, nar.as_str())),
    );
    rest.extend(plan.access_records.iter().map(|(k, _)| Rest::Record(k)));
    rest.extend(plan.dead_announcements.iter().map(Rest::Plain));
    progress.phase("deleting NARs and the rest", Some(rest.len() as u64));
    // The end of the part of `rest` whose NARs the standing announcement names, and those
    // NARs that are still to be deleted.
    let mut named: Option<usize> = None;
    let mut announced: Vec<&str> = Vec::new();
    for (i, batch) in rest.chunks(BATCH).enumerate() {
        if stop.requested() {
            st.out.errors.push(super::STOPPED.into());
            return st.finish();
        }
        // NARs cannot be written back: they are announced before the re-read, and an upload
        // relying on one after that is refused (see super::deleting). One announcement names
        // the NARs of many batches, as the collector waits `deleting::SETTLE` after naming
        // new ones; the run renews it in the background, naming the same NARs.
        let (start, end) = (i * BATCH, i * BATCH + batch.len());
        let has_nars = batch
            .iter()
            .any(|r| matches!(r, Rest::Nar(f) if st.nar_free(f)));
        if has_nars && named.is_none_or(|named| named < end) {
            let upto = (start + ANNOUNCED_AT_ONCE).min(rest.len());
            let nars: Vec<&str> = rest[start..upto]
                .iter()
                .filter_map(|r| match r {
                    Rest::Nar(f) if st.nar_free(f) => Some(*f),
                    _ => None,
                })
                .collect();
            if let Err(e) = run.announce(nars.iter().copied()).await {
                st.out.errors.push(format!("announcing deletions: {e}"));
                progress.advance(batch.len() as u64);
                continue;
            }
            announced = nars;
            // Nothing of the batch is deleted yet: a stop asked for meanwhile ends the run
            // here, as between batches.
            tokio::select! {
                () = tokio::time::sleep(settle) => {}
                () = stop.wait() => {
                    st.out.errors.push(super::STOPPED.into());
                    return st.finish();
                }
            }
            named = Some(upto);
        }
        // Expired access records and dead announcements protect nothing an upload could rely
        // on: a batch of only those needs no re-read (each lists every record of the last
        // days, seconds on a busy cache, and the records come last, by the thousand).
        let protects = batch
            .iter()
            .any(|r| !matches!(r, Rest::Record(_) | Rest::Plain(_)));
        if protects && !st.rescue(store, &HashMap::new()).await {
            progress.advance(batch.len() as u64);
            continue;
        }
        if !run.live() {
            st.out.errors.push(LAPSED.into());
            return st.finish();
        }
        if announced.iter().any(|f| !st.nar_free(f)) {
            // The re-read kept some of the NARs named: an upload relies on them, and its
            // narinfo would be refused for as long as they are named (the announcement may
            // stand for many batches, until the run ends). Naming fewer needs no wait.
            announced.retain(|f| st.nar_free(f));
            if let Err(e) = run.announce(announced.iter().copied()).await {
                tracing::warn!(cause = %e, "could not take the NARs kept out of the announcement");
            }
        }
        let (kinds, keys): (Vec<Option<&'static str>>, Vec<String>) = batch
            .iter()
            .filter_map(|r| match r {
                Rest::Nar(f) if !st.nar_free(f) => None,
                Rest::Nar(f) => Some((Some("nar"), format!("nar/{f}"))),
                Rest::Listing(h) if st.kept_path(h) || st.uploaded(h) => None,
                Rest::Listing(h) => Some((Some("listing"), object_key::listing(*h))),
                Rest::Realisation(_, Some(h)) if st.kept_path(h) || st.uploaded(h) => None,
                // Its derivation's output was kept during the run after all.
                Rest::Log(_, drv) if st.kept_deriver(drv) => None,
                // Its NAR was kept during the run after all.
                Rest::DebugInfo(_, nar) | Rest::NarDigest(_, nar) if !st.nar_free(nar) => None,
                Rest::Realisation(k, _) => Some((Some("realisation"), (*k).clone())),
                Rest::Log(k, _) => Some((Some("log"), (*k).clone())),
                Rest::DebugInfo(k, _) => Some((Some("debuginfo"), (*k).clone())),
                Rest::NarDigest(k, _) => Some((Some("nar_digest"), (*k).clone())),
                Rest::Record(k) => Some((Some("access_record"), (*k).clone())),
                Rest::Plain(k) => Some((None, (*k).clone())),
            })
            .unzip();
        let gone = delete_all(store, &keys, &mut st.out).await;
        for (kind, gone) in kinds.into_iter().zip(gone) {
            if let (Some(kind), true) = (kind, gone) {
                *st.out.deleted_objects.entry(kind).or_default() += 1;
            }
        }
        progress.advance(batch.len() as u64);
    }
    st.finish()
}

/// A name for this run's announcements, distinct between collectors.
pub(super) fn run_id() -> String {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}-{}", t.as_secs(), super::access::random_id())
}

/// What goes after the narinfos.
enum Rest<'a> {
    Nar(&'a str),
    Listing(StorePathHash),
    Realisation(&'a String, Option<StorePathHash>),
    /// A build log, and the derivation it is of.
    Log(&'a String, StorePathHash),
    /// A debug info link, and the NAR it names.
    DebugInfo(&'a String, &'a str),
    /// A NAR's digest record, and that NAR.
    NarDigest(&'a String, &'a str),
    /// An access record past the retention.
    Record(&'a String),
    Plain(&'a String),
}

/// Deletes `keys` [`DELETE_CONCURRENCY`] at a time; one result per key, in order.
pub(super) async fn delete_keys(store: &dyn Store, keys: &[String]) -> Vec<Result<(), StoreError>> {
    futures::stream::iter(keys.iter().map(|k| store.delete(k)))
        .buffered(DELETE_CONCURRENCY)
        .collect()
        .await
}

/// Whether `key`, whose deletion failed, is gone all the same: a store may apply a delete and
/// lose its answer (a timeout, a reset connection). `None`: the store cannot say either.
pub(super) async fn gone_after_failure(store: &dyn Store, key: &str) -> Option<bool> {
    match store.head(key).await {
        Ok(found) => Some(found.is_none()),
        Err(e) => {
            tracing::warn!(%key, cause = %e, "after a failed delete, could not tell whether it is gone");
            None
        }
    }
}

/// Deletes `keys` a few at a time; returns which deletions succeeded.
async fn delete_all(store: &dyn Store, keys: &[String], out: &mut Outcome) -> Vec<bool> {
    delete_keys(store, keys)
        .await
        .into_iter()
        .zip(keys)
        .map(|(r, k)| match r {
            Ok(()) => true,
            Err(e) => {
                out.errors.push(format!("{k}: {e}"));
                false
            }
        })
        .collect()
}

impl State<'_> {
    /// Keeps whatever servers used since the last look (paths whose narinfo or NAR was
    /// served, or that an upload named): paths not yet deleted are kept with their closures; paths deleted in the last batch, whose copies are in `bodies`, are
    /// written back; NARs uploads rely on are kept (in [`Accessed::nars`]).
    ///
    /// Returns false if the records could not be read: nothing may be deleted then.
    async fn rescue(&mut self, store: &dyn Store, bodies: &HashMap<u32, Bytes>) -> bool {
        let fresh = match access::reread(store, self.acc, store.now()).await {
            Ok(f) => f,
            Err(e) => {
                self.out
                    .errors
                    .push(format!("re-reading access records: {e}"));
                return false;
            }
        };
        let graph = self.graph;
        let needed: Vec<u32> = fresh
            .into_iter()
            .flat_map(|e| match e {
                Entry::Path(h) => graph.find(h).into_iter().collect(),
                // A NAR served: the paths naming it were used.
                Entry::Nar(f) => self.nar_users.get(&*f).cloned().unwrap_or_default(),
            })
            .collect();
        for i in needed {
            self.out.rescued += self.keep(store, i, bodies).await;
        }
        true
    }

    /// Keeps `i` with its closure and their NARs; those deleted in the batch just done, whose
    /// copies are in `bodies`, are written back. Those deleted in an earlier batch stay
    /// deleted: an upload that needed one found it missing and was refused (or uploads it
    /// again); kept marked, their NARs stay. Returns how many were kept and never deleted.
    async fn keep(&mut self, store: &dyn Store, i: u32, bodies: &HashMap<u32, Bytes>) -> usize {
        let graph = self.graph;
        let mut untouched = 0;
        let closure = graph.close_over(i, &mut self.kept);
        for &j in &closure {
            if let Some(nar) = &graph.nodes[j as usize].nar {
                self.kept_nars.insert(nar.clone());
            }
            if !self.deleted.contains(&j) {
                untouched += 1;
            }
        }
        // References before their referrers, so that no narinfo is back before what it
        // needs; one whose reference could not be written back stays deleted with it.
        for j in references_first(graph, &closure) {
            if !self.deleted.contains(&j) {
                continue;
            }
            let Some(body) = bodies.get(&j) else {
                continue;
            };
            let key = object_key::narinfo(graph.nodes[j as usize].hash);
            let missing = graph.nodes[j as usize]
                .refs
                .iter()
                .find(|&&r| r != j && self.deleted.contains(&r));
            if let Some(&r) = missing {
                let needed = object_key::narinfo(graph.nodes[r as usize].hash);
                self.out.errors.push(format!(
                    "not restoring {key}: its reference {needed} is not back"
                ));
                continue;
            }
            match write_back(store, &key, body).await {
                Ok(()) => {
                    self.out.restored += 1;
                    self.deleted.remove(&j);
                }
                Err(e) => {
                    self.write_back_failed = true;
                    self.out.errors.push(format!("restoring {key}: {e}"));
                }
            }
        }
        untouched
    }

    /// No kept narinfo points to NAR file `f` and no upload relies on it.
    fn nar_free(&self, f: &str) -> bool {
        !self.acc.nars.contains(f) && !self.kept_nars.contains(f)
    }

    /// Whether a kept path names `drv` as its `Deriver:`.
    fn kept_deriver(&self, drv: &StorePathHash) -> bool {
        self.derived
            .get(drv)
            .is_some_and(|outs| outs.iter().any(|&i| self.kept[i as usize]))
    }

    /// Whether an upload record read names path `h`: the path may have been uploaded during
    /// the run, its listing and realisations written again after the plan found them orphaned.
    fn uploaded(&self, h: &StorePathHash) -> bool {
        self.acc.uploading.contains(h)
    }

    fn kept_path(&self, h: &StorePathHash) -> bool {
        self.graph.find(*h).is_some_and(|i| self.kept[i as usize])
    }
}

/// `nodes` ordered so that each comes after those of its references that are among them.
pub(super) fn references_first(graph: &Graph, nodes: &[u32]) -> Vec<u32> {
    let within: HashSet<u32> = nodes.iter().copied().collect();
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(nodes.len());
    for &start in nodes {
        let mut stack = vec![(start, false)];
        while let Some((n, expanded)) = stack.pop() {
            if expanded {
                out.push(n);
                continue;
            }
            if !seen.insert(n) {
                continue;
            }
            stack.push((n, true));
            for &r in &graph.nodes[n as usize].refs {
                if within.contains(&r) && !seen.contains(&r) {
                    stack.push((r, false));
                }
            }
        }
    }
    out
}

/// Pauses before the second and third try of a write-back.
const WRITE_BACK_RETRIES: [std::time::Duration; 2] = [
    std::time::Duration::from_millis(200),
    std::time::Duration::from_secs(1),
];

/// Writes a deleted narinfo back (an upload relied on it): tried again after a failure,
/// since until it is back that upload's path has a missing reference. Not if the store holds
/// one again: a client uploaded the path meanwhile, and its narinfo stays, not the copy read
/// before the deletion (which may name another NAR, or one that is missing).
pub(super) async fn write_back(
    store: &dyn Store,
    key: &str,
    body: &Bytes,
) -> Result<(), StoreError> {
    let mut pauses = WRITE_BACK_RETRIES.iter();
    loop {
        let written = match store.head(key).await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => store.put_bytes(key, body.clone()).await,
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => return Ok(()),
            Err(e) => match pauses.next() {
                Some(&pause) => {
                    tracing::warn!(%key, cause = %e, "writing a narinfo back failed; trying again");
                    tokio::time::sleep(pause).await;
                }
                None => return Err(e),
            },
        }
    }
}

/// Objects read at once while reading realisations and debug info links.
const READ_CONCURRENCY: usize = 16;

/// Reads each of `objects` (up to `limit` bytes) and what `names` finds in it (or why it
/// finds nothing), in order. A store failure ends the run's reading.
async fn read_named<T, E: fmt::Display>(
    store: &dyn Store,
    objects: &[(String, Meta)],
    limit: u64,
    names: impl Fn(&str, &[u8]) -> Result<T, E>,
) -> Result<Vec<Named<T>>, StoreError> {
    futures::stream::iter(
        objects
            .iter()
            .map(|(key, _)| async move { (key, store.get_bytes(key, limit).await) }),
    )
    .buffered(READ_CONCURRENCY)
    .map(|(key, read)| match read {
        Ok(None) => Ok(Named::Gone),
        Ok(Some(raw)) => Ok(match names(key, &raw) {
            Ok(t) => Named::Understood(t),
            Err(e) => Named::NotUnderstood(e.to_string()),
        }),
        Err(StoreError::TooLarge { .. }) => {
            Ok(Named::NotUnderstood(format!("larger than {limit} bytes")))
        }
        Err(e) => Err(e),
    })
    .try_collect()
    .await
}

/// Reads which NAR each debug info link names.
async fn read_debuginfo(store: &dyn Store, inv: &Inventory) -> Result<Vec<DebugLink>, StoreError> {
    let nars = read_named(
        store,
        &inv.debuginfo,
        crate::nix::MAX_DEBUGINFO_BYTES,
        |_, r| crate::nix::DebugInfoLink::parse(r).map(|l| l.nar().as_str().to_owned()),
    )
    .await?;
    Ok(inv
        .debuginfo
        .iter()
        .zip(nars)
        .map(|((key, meta), nar)| DebugLink {
            key: key.clone(),
            meta: *meta,
            nar,
        })
        .collect())
}

/// Reads which path each realisation names (its JSON `outPath`). One under
/// `realisations/<id>.doi` whose `id` is another output's is not understood: the server
/// answers it 502 (Nix does not compare ids), and an upload of the output replaces it.
async fn read_realisations(
    store: &dyn Store,
    inv: &Inventory,
) -> Result<Vec<Realisation>, StoreError> {
    let outs = read_named(
        store,
        &inv.realisations,
        crate::upload::MAX_REALISATION_BYTES,
        |key, raw| {
            let r = crate::nix::Realisation::parse(raw).map_err(|e| e.to_string())?;
            let named = key
                .strip_prefix("realisations/")
                .and_then(|n| n.parse::<crate::nix::RealisationName>().ok());
            match (named, r.id()) {
                (Some(named), Some(id)) if !named.names(id) => Err(format!(
                    "the realisation of another output ({id}): served as a 502; an upload \
                     of this output replaces it"
                )),
                _ => Ok(r.out_hash()),
            }
        },
    )
    .await?;
    Ok(inv
        .realisations
        .iter()
        .zip(outs)
        .map(|((key, meta), out)| Realisation {
            key: key.clone(),
            meta: *meta,
            out,
        })
        .collect())
}
