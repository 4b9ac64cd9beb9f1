//! Deletion: the plan (what goes, in which order) and its execution.
//!
//! Narinfos go first, referrers before what they refer to: at every moment the narinfos left
//! in the store have complete closures, even if the run dies half-way. They go in batches;
//! before each batch the collector re-reads the access records written since it last looked,
//! and after it, once more. An upload writes its record (the narinfo and its references)
//! before it checks that the references exist, so a reference an upload relies on is either
//! seen in time and kept, or deleted in the batch just done and written back from the copy
//! read just before deleting it, or already gone when the upload checks (then the upload is
//! refused, and `nix copy` uploads the path again on its next run). NARs, listings and
//! realisations go after all narinfos, then logs, then expired access records.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use super::access::{self, Accessed};
use super::graph::Graph;
use super::inventory::{Inventory, Meta};
use super::mark::Marked;
use super::report::Progress;
use crate::config::GcConfig;
use crate::nix::StorePathHash;
use crate::store::{keys, Store, StoreError};

/// Narinfos deleted between two re-reads of the access records.
const BATCH: usize = 256;

/// A realisation (`realisations/…`, `build-trace/…`) and the path it names, when readable.
pub struct Realisation {
    pub key: String,
    pub meta: Meta,
    pub out: Option<StorePathHash>,
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
    pub logs: Vec<(String, Meta)>,
    pub access_records: Vec<(String, Meta)>,
}

fn old_enough(meta: &Meta, cutoff: SystemTime) -> bool {
    meta.modified <= cutoff
}

impl Plan {
    pub fn new(
        graph: &Graph,
        inv: &Inventory,
        marked: &Marked,
        realisations: Vec<Realisation>,
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
        let mut nars: Vec<(String, Meta)> = inv
            .nars
            .iter()
            .filter(|(f, m)| !kept_nars.contains(f.as_str()) && old_enough(m, grace))
            .map(|(f, m)| (f.clone(), *m))
            .collect();
        nars.sort_by(|a, b| a.0.cmp(&b.0));
        Plan {
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
                    r.out.is_some_and(|h| !kept_hashes.contains(&h)) && old_enough(&r.meta, grace)
                })
                .map(|r| (r.key, r.meta, r.out))
                .collect(),
            logs: inv
                .logs
                .iter()
                .filter(|(_, drv, m)| !kept_derivers.contains(drv) && old_enough(m, retention))
                .map(|(k, _, m)| (k.clone(), *m))
                .collect(),
            access_records: acc
                .expired
                .iter()
                .filter(|(_, m)| old_enough(m, grace))
                .cloned()
                .collect(),
        }
    }
}

/// The `condemned` nodes, ordered so that each comes after every condemned node referring to
/// it: deleting in this order never leaves a narinfo whose reference is gone.
pub fn referrers_first(graph: &Graph, condemned: &[bool]) -> Vec<u32> {
    let n = graph.len();
    let mut referrers = vec![0u32; n];
    for i in (0..n as u32).filter(|&i| condemned[i as usize]) {
        for &r in graph.nodes[i as usize].refs.iter() {
            referrers[r as usize] += 1;
        }
    }
    let mut ready: Vec<u32> = (0..n as u32)
        .filter(|&i| condemned[i as usize] && referrers[i as usize] == 0)
        .collect();
    let mut order = Vec::new();
    let mut placed = vec![false; n];
    while let Some(i) = ready.pop() {
        order.push(i);
        placed[i as usize] = true;
        for &r in graph.nodes[i as usize].refs.iter() {
            referrers[r as usize] -= 1;
            if referrers[r as usize] == 0 {
                ready.push(r);
            }
        }
    }
    // Only corrupt data has reference cycles (Nix paths cannot): those go last.
    order.extend((0..n as u32).filter(|&i| condemned[i as usize] && !placed[i as usize]));
    order
}

/// What happened during deletion.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Narinfos kept after all, because a server used them while the run was deleting.
    pub rescued: usize,
    /// Narinfos written back after deletion because an upload needed them.
    pub restored: usize,
    pub errors: Vec<String>,
}

/// Carries out `plan`, re-reading access records between batches.
pub async fn execute(
    store: &Arc<dyn Store>,
    graph: &Graph,
    marked: &Marked,
    plan: &Plan,
    acc: &mut Accessed,
    progress: &dyn Progress,
) -> Outcome {
    let mut out = Outcome::default();
    let mut kept: Vec<bool> = (0..graph.len() as u32).map(|i| marked.kept(i)).collect();
    let mut deleted: HashSet<u32> = HashSet::new();
    progress.phase("deleting narinfos", Some(plan.narinfos.len() as u64));
    // What servers used while this run was listing and marking.
    let mut seen = Seen {
        acc,
        kept: &mut kept,
        deleted: &deleted,
    };
    rescue(store.as_ref(), graph, &mut seen, &mut out, &HashMap::new()).await;
    for batch in plan.narinfos.chunks(BATCH) {
        let mut bodies: HashMap<u32, Bytes> = HashMap::new();
        let todo: Vec<u32> = batch
            .iter()
            .copied()
            .filter(|&i| !kept[i as usize])
            .collect();
        for i in todo {
            let key = keys::narinfo(graph.nodes[i as usize].hash);
            match store.get_bytes(&key, 64 << 20).await {
                Ok(Some(body)) => {
                    bodies.insert(i, body);
                }
                Ok(None) => {}
                Err(e) => {
                    out.errors.push(format!("{key}: {e}"));
                    continue;
                }
            }
            match store.delete(&key).await {
                Ok(()) => {
                    deleted.insert(i);
                }
                Err(e) => out.errors.push(format!("{key}: {e}")),
            }
            progress.advance(1);
        }
        let mut seen = Seen {
            acc,
            kept: &mut kept,
            deleted: &deleted,
        };
        rescue(store.as_ref(), graph, &mut seen, &mut out, &bodies).await;
    }
    let kept_nars: HashSet<&str> = (0..graph.len())
        .filter(|&i| kept[i])
        .filter_map(|i| graph.nodes[i].nar.as_deref())
        .collect();
    let kept_hashes: HashSet<StorePathHash> = (0..graph.len())
        .filter(|&i| kept[i])
        .map(|i| graph.nodes[i].hash)
        .collect();
    let mut rest: Vec<String> = Vec::new();
    rest.extend(
        plan.nars
            .iter()
            .filter(|(f, _)| !kept_nars.contains(f.as_str()))
            .map(|(f, _)| format!("nar/{f}")),
    );
    rest.extend(
        plan.listings
            .iter()
            .filter(|(h, _)| !kept_hashes.contains(h))
            .map(|(h, _)| keys::listing(*h)),
    );
    rest.extend(
        plan.realisations
            .iter()
            .filter(|(_, _, h)| h.is_none_or(|h| !kept_hashes.contains(&h)))
            .map(|(k, _, _)| k.clone()),
    );
    rest.extend(plan.logs.iter().map(|(k, _)| k.clone()));
    rest.extend(plan.access_records.iter().map(|(k, _)| k.clone()));
    progress.phase("deleting NARs and the rest", Some(rest.len() as u64));
    for key in rest {
        if let Err(e) = store.delete(&key).await {
            out.errors.push(format!("{key}: {e}"));
        }
        progress.advance(1);
    }
    out
}

/// The collector's view while deleting.
struct Seen<'a> {
    acc: &'a mut Accessed,
    kept: &'a mut [bool],
    /// Narinfos this run deleted.
    deleted: &'a HashSet<u32>,
}

/// Keeps whatever servers used since the last look: nodes not yet deleted are kept (with their
/// closures); nodes deleted in the last batch, whose copies are in `bodies`, are written back.
async fn rescue(
    store: &dyn Store,
    graph: &Graph,
    seen: &mut Seen<'_>,
    out: &mut Outcome,
    bodies: &HashMap<u32, Bytes>,
) {
    let fresh = match access::reread(store, seen.acc, SystemTime::now()).await {
        Ok(f) => f,
        Err(e) => {
            out.errors.push(format!("re-reading access records: {e}"));
            return;
        }
    };
    for i in fresh.into_iter().filter_map(|h| graph.find(h)) {
        for j in graph.close_over(i, seen.kept) {
            match bodies.get(&j) {
                Some(body) => {
                    let key = keys::narinfo(graph.nodes[j as usize].hash);
                    match store.put_bytes(&key, body.clone()).await {
                        Ok(()) => out.restored += 1,
                        Err(e) => out.errors.push(format!("restoring {key}: {e}")),
                    }
                }
                // Deleted in an earlier batch: an upload needing it found it missing already
                // and was refused, so nothing refers to it.
                None if seen.deleted.contains(&j) => seen.kept[j as usize] = false,
                None => out.rescued += 1,
            }
        }
    }
}

/// Reads which path each realisation names (its JSON `outPath`).
pub async fn read_realisations(
    store: &dyn Store,
    inv: &Inventory,
) -> Result<Vec<Realisation>, StoreError> {
    let mut out = Vec::with_capacity(inv.realisations.len());
    for (key, meta) in &inv.realisations {
        let raw = store.get_bytes(key, 1 << 20).await?;
        let path = raw
            .as_deref()
            .and_then(|r| serde_json::from_slice::<serde_json::Value>(r).ok())
            .and_then(|v| v.get("outPath")?.as_str().map(str::to_owned));
        let out_hash = path.and_then(|p| {
            let base = p.rsplit('/').next()?.to_owned();
            base.get(..32)?.parse().ok()
        });
        out.push(Realisation {
            key: key.clone(),
            meta: *meta,
            out: out_hash,
        });
    }
    Ok(out)
}
