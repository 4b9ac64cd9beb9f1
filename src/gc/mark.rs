//! Roots and marking: which paths a run keeps, and why.
//!
//! Pinned and young paths (younger than the grace period), and paths an upload in progress
//! names, are kept whatever the budget and the retention say.
//! Recently used paths (read, or uploaded, within the retention) are kept most recent first;
//! with `gc.max_bytes` set, the first one whose closure no longer fits and every older one are
//! evicted, so what is evicted is always less recently used than anything kept. A closure is
//! kept or dropped whole, never in part.

use std::collections::HashMap;
use std::time::SystemTime;

use super::graph::Graph;
use super::pins::{self, Pin};
use crate::config::GcConfig;
use crate::nix::StorePathHash;

/// Why a path is kept or deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Pinned,
    /// Younger than the grace period.
    Young,
    /// Named by an upload in progress (an upload record younger than
    /// [`super::access::UPLOAD_RECORD_LIFETIME`]).
    Uploading,
    /// Used within the retention.
    Recent,
    /// In the closure of a kept path.
    Referenced,
    /// Not used within the retention, not pinned, not referenced by anything kept.
    Expired,
    /// Written before the access records began, within the retention of that time: no use
    /// of it could have been recorded yet ([`super::began`]).
    Unrecorded,
    /// Recently used, but evicted to fit `gc.max_bytes`.
    OverBudget,
}

impl Reason {
    pub fn kept(self) -> bool {
        matches!(
            self,
            Self::Pinned
                | Self::Young
                | Self::Uploading
                | Self::Recent
                | Self::Referenced
                | Self::Unrecorded
        )
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Pinned => "pinned",
            Self::Young => "younger than the grace period",
            Self::Uploading => "named by an upload in progress",
            Self::Recent => "used within the retention",
            Self::Referenced => "referenced by a kept path",
            Self::Unrecorded => "written before the access records began",
            Self::Expired => "expired",
            Self::OverBudget => "over gc.max_bytes",
        }
    }
}

pub struct Roots {
    pinned: Vec<bool>,
    young: Vec<bool>,
    uploading: Vec<bool>,
    /// The last use within the retention, if any.
    recent: Vec<Option<SystemTime>>,
    /// When the access records began, if within the retention: every path counts as used
    /// then at the latest ([`super::began`]).
    began: Option<SystemTime>,
    cutoff: SystemTime,
    /// Pinned paths that have no narinfo (`pin: path`).
    pub unresolved_pins: Vec<String>,
}

impl Roots {
    /// When the access records began, if within the retention.
    pub fn began(&self) -> Option<SystemTime> {
        self.began
    }

    /// Young narinfos and narinfos written within the retention (an upload is a use), and
    /// every path as used when the access records `began`, if that is within the retention.
    pub fn new(graph: &Graph, cfg: &GcConfig, now: SystemTime, began: SystemTime) -> Self {
        let grace_cutoff = now.checked_sub(cfg.grace).unwrap_or(SystemTime::UNIX_EPOCH);
        let cutoff = now.checked_sub(cfg.keep).unwrap_or(SystemTime::UNIX_EPOCH);
        let young = graph
            .nodes
            .iter()
            .map(|n| n.modified > grace_cutoff)
            .collect();
        let recent = graph
            .nodes
            .iter()
            .map(|n| (n.modified > cutoff).then_some(n.modified))
            .collect();
        Self {
            pinned: vec![false; graph.len()],
            young,
            uploading: vec![false; graph.len()],
            recent,
            began: (began > cutoff).then_some(began),
            cutoff,
            unresolved_pins: Vec::new(),
        }
    }

    fn used(&mut self, i: u32, t: SystemTime) {
        if t > self.cutoff {
            let r = &mut self.recent[i as usize];
            *r = Some(r.map_or(t, |old| old.max(t)));
        }
    }

    pub fn add_access(&mut self, graph: &Graph, seen: &HashMap<StorePathHash, SystemTime>) {
        for (h, t) in seen {
            if let Some(i) = graph.find(*h) {
                self.used(i, *t);
            }
        }
    }

    /// NARs served: a use of each path whose narinfo names the NAR (a client whose own cache
    /// holds the narinfo asks for the NAR alone).
    pub fn add_nar_access(&mut self, graph: &Graph, seen: &HashMap<Box<str>, SystemTime>) {
        let users = graph.nar_users();
        for (f, t) in seen {
            for &i in users.get(&**f).into_iter().flatten() {
                self.used(i, *t);
            }
        }
    }

    /// Paths uploads may still rely on (see [`super::access::Accessed::uploading`]).
    pub fn add_uploads<'a>(
        &mut self,
        graph: &Graph,
        paths: impl IntoIterator<Item = &'a StorePathHash>,
    ) {
        for h in paths {
            if let Some(i) = graph.find(*h) {
                self.uploading[i as usize] = true;
            }
        }
    }

    pub fn add_pins(&mut self, graph: &Graph, pins: &[Pin], now: SystemTime) {
        for pin in pins.iter().filter(|p| p.active(now)) {
            for (h, p) in pins::hashes(pin).zip(&pin.paths) {
                match graph.find(h) {
                    Some(i) => self.pinned[i as usize] = true,
                    None => self.unresolved_pins.push(format!("{}: {p}", pin.name)),
                }
            }
        }
    }
}

/// The outcome of marking: per node, why it is kept or deleted.
pub struct Marked {
    pub reason: Vec<Reason>,
}

impl Marked {
    pub fn kept(&self, i: u32) -> bool {
        self.reason[i as usize].kept()
    }
}

/// Bytes a path occupies: its narinfo and its NAR.
pub fn path_bytes(
    graph: &Graph,
    nar_sizes: &HashMap<String, super::inventory::Meta>,
    i: u32,
) -> u64 {
    let n = &graph.nodes[i as usize];
    n.narinfo_size
        + n.nar
            .as_deref()
            .and_then(|f| nar_sizes.get(f))
            .map_or(0, |m| m.size)
}

pub fn mark(graph: &Graph, roots: &Roots, max_bytes: Option<u64>, sizes: &[u64]) -> Marked {
    let n = graph.len();
    let mut kept = vec![false; n];
    let mut reason: Vec<Option<Reason>> = vec![None; n];
    let mut total = 0u64;
    let keep_closure =
        |i: u32, why: Reason, kept: &mut Vec<bool>, reason: &mut Vec<Option<Reason>>| {
            let newly = graph.close_over(i, kept);
            for &j in &newly {
                reason[j as usize].get_or_insert(Reason::Referenced);
            }
            reason[i as usize] = Some(why);
            newly
        };
    for i in 0..n as u32 {
        let why = if roots.pinned[i as usize] {
            Reason::Pinned
        } else if roots.young[i as usize] {
            Reason::Young
        } else if roots.uploading[i as usize] {
            Reason::Uploading
        } else {
            continue;
        };
        for j in keep_closure(i, why, &mut kept, &mut reason) {
            total += sizes[j as usize];
        }
    }
    // A path with no use recorded counts as used when the records began, if within the
    // retention: none could have been recorded before.
    let mut recent: Vec<(SystemTime, u32, Reason)> = roots
        .recent
        .iter()
        .enumerate()
        .filter_map(|(i, t)| match (*t, roots.began) {
            (Some(t), _) => Some((t, i as u32, Reason::Recent)),
            (None, Some(b)) => Some((b, i as u32, Reason::Unrecorded)),
            (None, None) => None,
        })
        .collect();
    // Most recent first; ties by index so runs are reproducible. Paths with no use recorded
    // come after every recorded use: a use is known, theirs only bounded (a push shortly
    // before the records began is not ranked below paths untouched for years).
    recent.sort_unstable_by(|a, b| {
        (a.2 == Reason::Unrecorded)
            .cmp(&(b.2 == Reason::Unrecorded))
            .then(b.0.cmp(&a.0))
            .then(a.1.cmp(&b.1))
    });
    for (_, i, why) in recent {
        if kept[i as usize] {
            if why == Reason::Recent && reason[i as usize] == Some(Reason::Referenced) {
                reason[i as usize] = Some(Reason::Recent);
            }
            continue;
        }
        let newly = keep_closure(i, why, &mut kept, &mut reason);
        let add: u64 = newly.iter().map(|&j| sizes[j as usize]).sum();
        if max_bytes.is_some_and(|b| total + add > b) {
            // Strict LRU: this root and every older one go.
            for &j in &newly {
                kept[j as usize] = false;
                reason[j as usize] = None;
            }
            break;
        }
        total += add;
    }
    let reason = (0..n)
        .map(|i| match reason[i] {
            Some(r) if kept[i] => r,
            _ if roots.recent[i].is_some() || roots.began.is_some() => Reason::OverBudget,
            _ => Reason::Expired,
        })
        .collect();
    Marked { reason }
}
