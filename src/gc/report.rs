//! What a run tells its operator: progress while it runs, a summary at the end.

use std::collections::BTreeMap;
use std::fmt;

use super::mark::{Marked, Reason};
use super::sweep::{Outcome, Plan};

/// Progress of a long run (a bar on a terminal, nothing in tests).
pub trait Progress: Send + Sync {
    /// A new phase; `total` if the number of steps is known.
    fn phase(&self, name: &str, total: Option<u64>);
    fn advance(&self, n: u64);
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn phase(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
}

/// Paths and bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.count += 1;
        self.bytes += bytes;
    }
}

#[derive(Debug, Default)]
pub struct Summary {
    pub applied: bool,
    /// Paths (narinfo + NAR) by reason they are kept or deleted.
    pub paths: BTreeMap<Reason, Tally>,
    pub nars: Tally,
    pub listings: Tally,
    pub realisations: Tally,
    pub logs: Tally,
    pub debuginfo: Tally,
    pub nar_digests: Tally,
    pub access_records: Tally,
    pub rescued: usize,
    pub restored: usize,
    /// Narinfos deleted, once applied: fewer than planned after errors or rescues.
    pub deleted_narinfos: Option<usize>,
    /// The other objects deleted by kind, once applied: fewer than planned after errors, a
    /// stop, or what uploads turned out to rely on.
    pub deleted_objects: Option<BTreeMap<&'static str, usize>>,
    /// Pins naming paths that are not in the store.
    pub unresolved_pins: Vec<String>,
    /// Access records within the retention that do not parse, whole or in part: what their
    /// bad lines name counts as unused.
    pub bad_records: Vec<String>,
    /// What was done with the copies a run that died while deleting left
    /// ([`super::unfinished`]), a line each.
    pub unfinished: Vec<String>,
    /// When the access records began and when the paths written before, unused since, go, if
    /// the records do not cover the retention yet ([`super::began`]).
    pub records_began: Option<(std::time::SystemTime, std::time::SystemTime)>,
    pub errors: Vec<String>,
}

impl Summary {
    /// `sizes`: bytes of each path, indexed like the graph's nodes.
    pub fn new(marked: &Marked, plan: &Plan, sizes: &[u64]) -> Self {
        let mut s = Summary::default();
        for (reason, size) in marked.reason.iter().zip(sizes) {
            s.paths.entry(*reason).or_default().add(*size);
        }
        for (_, m) in &plan.nars {
            s.nars.add(m.size);
        }
        for (_, m) in &plan.listings {
            s.listings.add(m.size);
        }
        for (_, m, _) in &plan.realisations {
            s.realisations.add(m.size);
        }
        for (_, _, m) in &plan.logs {
            s.logs.add(m.size);
        }
        for (_, m, _) in &plan.debuginfo {
            s.debuginfo.add(m.size);
        }
        for (_, m, _) in &plan.nar_digests {
            s.nar_digests.add(m.size);
        }
        for (_, m) in &plan.access_records {
            s.access_records.add(m.size);
        }
        s
    }

    pub fn record(&mut self, o: Outcome) {
        self.applied = true;
        self.rescued = o.rescued;
        self.restored = o.restored;
        self.deleted_narinfos = Some(o.deleted_narinfos);
        self.deleted_objects = Some(o.deleted_objects);
        self.errors.extend(o.errors);
    }

    fn total(&self, kept: bool) -> Tally {
        self.paths
            .iter()
            .filter(|(r, _)| r.kept() == kept)
            .fold(Tally::default(), |a, (_, t)| Tally {
                count: a.count + t.count,
                bytes: a.bytes + t.bytes,
            })
    }

    pub fn deleted_paths(&self) -> u64 {
        self.total(false).count
    }
}

/// `1.5 GiB`, `300 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // What was planned; what was done is told below when it differs.
        let verb = if self.applied {
            "to delete"
        } else {
            "would delete"
        };
        for (kept, title) in [(true, "kept"), (false, verb)] {
            let t = self.total(kept);
            writeln!(f, "{title}: {} paths, {}", t.count, human(t.bytes))?;
            for (r, t) in self.paths.iter().filter(|(r, _)| r.kept() == kept) {
                writeln!(
                    f,
                    "  {:>8} paths, {:>10}  {}",
                    t.count,
                    human(t.bytes),
                    r.label()
                )?;
            }
        }
        for (what, t) in [
            ("NAR files (of the paths above, and orphans)", self.nars),
            ("listings", self.listings),
            ("realisations", self.realisations),
            ("build logs", self.logs),
            ("debug info links", self.debuginfo),
            ("NAR digest records", self.nar_digests),
            ("expired access records", self.access_records),
        ] {
            if t.count > 0 {
                writeln!(f, "{verb}: {} {what}, {}", t.count, human(t.bytes))?;
            }
        }
        if let Some(n) = self.deleted_narinfos {
            writeln!(f, "deleted: {n} narinfos")?;
            let planned = self.deleted_paths();
            if (n as u64) < planned {
                writeln!(
                    f,
                    "  {} of the paths to delete stayed (see below); so did their NARs, listings and logs",
                    planned - n as u64
                )?;
            }
        }
        if self.rescued + self.restored > 0 {
            writeln!(
                f,
                "kept after all (used while this run was deleting): {} paths, {} written back",
                self.rescued + self.restored,
                self.restored
            )?;
        }
        for u in &self.unfinished {
            writeln!(f, "{u}")?;
        }
        if let Some((began, until)) = self.records_began {
            if self.paths.contains_key(&Reason::Unrecorded) {
                writeln!(
                    f,
                    "note: cellar's access records began on {} (UTC): no use of a path before \
                     that is known, so the paths written before it count as used then (kept \
                     until {} unless used)",
                    super::access::day(began),
                    super::access::day(until)
                )?;
            }
        }
        for p in &self.unresolved_pins {
            writeln!(
                f,
                "warning: pin {p} is not in the cache (push it again, or `cellar pin rm` the pin)"
            )?;
        }
        for r in &self.bad_records {
            writeln!(
                f,
                "warning: access record {r} is damaged: what its lines that do not parse \
                 name counts as unused (`cellar verify --repair` removes it)"
            )?;
        }
        // The first ones whole; the rest counted by their cause (the end of their text):
        // a read-only `nar/` printed a line for each of hundreds of NARs (homelab walk).
        for e in self.errors.iter().take(ERRORS_SHOWN) {
            writeln!(f, "error: {e}")?;
        }
        let mut rest: Vec<(&str, usize)> = Vec::new();
        for e in self.errors.iter().skip(ERRORS_SHOWN) {
            let cause = e.rsplit(": ").next().unwrap_or(e);
            match rest.iter_mut().find(|(c, _)| *c == cause) {
                Some((_, n)) => *n += 1,
                None => rest.push((cause, 1)),
            }
        }
        for (cause, n) in rest {
            writeln!(f, "error: {n} more, failing with: {cause}")?;
        }
        Ok(())
    }
}

/// Errors a summary shows whole; the rest are counted by cause.
const ERRORS_SHOWN: usize = 10;

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the first ten, errors are counted by cause: a read-only `nar/` printed a line
    /// for each of 204 NARs (homelab walk).
    #[test]
    fn many_errors_are_counted_by_cause() {
        let mut s = Summary::default();
        for i in 0..30 {
            s.errors.push(format!(
                "nar/{i}.nar: deleting nar/{i}.nar: Permission denied"
            ));
        }
        s.errors
            .push("announcing deletions: the store is down".into());
        let text = s.to_string();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(lines.len(), 12, "{text}");
        assert_eq!(
            lines[0],
            "error: nar/0.nar: deleting nar/0.nar: Permission denied"
        );
        assert_eq!(lines[10], "error: 20 more, failing with: Permission denied");
        assert_eq!(lines[11], "error: 1 more, failing with: the store is down");
    }

    #[test]
    fn sizes_are_shown_in_binary_units() {
        for (bytes, shown) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (5 << 20, "5.0 MiB"),
            (3 << 30, "3.0 GiB"),
            (2 << 40, "2.0 TiB"),
            (4096 << 40, "4096.0 TiB"),
        ] {
            assert_eq!(human(bytes), shown, "{bytes}");
        }
    }

    fn tally(count: u64, bytes: u64) -> Tally {
        Tally { count, bytes }
    }

    #[test]
    fn a_summary_says_what_was_kept_deleted_and_left() {
        let mut s = Summary {
            applied: true,
            deleted_narinfos: Some(2),
            rescued: 1,
            restored: 2,
            listings: tally(4, 40),
            ..Summary::default()
        };
        s.paths.insert(Reason::Pinned, tally(1, 1000));
        s.paths.insert(Reason::Recent, tally(2, 2048));
        s.paths.insert(Reason::Expired, tally(5, 5000));
        let text = s.to_string();
        for line in [
            "kept: 3 paths, 3.0 KiB",
            "to delete: 5 paths, 4.9 KiB",
            "to delete: 4 listings, 40 B",
            "deleted: 2 narinfos",
            "  3 of the paths to delete stayed",
            "kept after all (used while this run was deleting): 3 paths, 2 written back",
        ] {
            assert!(text.contains(line), "{line:?} missing:\n{text}");
        }
        assert!(
            !text.contains("NAR files"),
            "a kind with nothing to delete is left out:\n{text}"
        );
        let at = |what: &str| text.find(what).unwrap_or_else(|| panic!("{what}:\n{text}"));
        assert!(at("to delete: 5 paths") < at("expired"), "{text}");
        assert!(at("pinned") < at("to delete: 5 paths"), "{text}");

        let quiet = Summary {
            deleted_narinfos: Some(0),
            ..Summary::default()
        };
        let text = quiet.to_string();
        assert!(
            text.starts_with("kept: 0 paths, 0 B\nwould delete: 0 paths, 0 B\n"),
            "{text}"
        );
        assert!(!text.contains("stayed"), "{text}");
        assert!(!text.contains("kept after all"), "{text}");
        let rescued = Summary {
            rescued: 1,
            ..Summary::default()
        };
        assert!(
            rescued.to_string().contains(
                "kept after all (used while this run was deleting): 1 paths, 0 written back"
            ),
            "{rescued}"
        );
    }
}
