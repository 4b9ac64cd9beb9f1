//! The results of `cellar gc` and `cellar verify` for Prometheus.
//!
//! Both are batch jobs (a systemd timer, cron), not servers a Prometheus can scrape, so with
//! `--metrics-file FILE` they write their results in the Prometheus text format to a file for
//! node_exporter's textfile collector (`--collector.textfile.directory`), replacing it
//! atomically (written beside it, then renamed) so a scrape never reads half a file.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::mark::Reason;
use super::report::Summary;
use super::verify::Report;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn reason_label(r: Reason) -> &'static str {
    match r {
        Reason::Pinned => "pinned",
        Reason::Young => "young",
        Reason::Uploading => "uploading",
        Reason::Recent => "recent",
        Reason::Referenced => "referenced",
        Reason::Unrecorded => "unrecorded",
        Reason::Expired => "expired",
        Reason::OverBudget => "over_budget",
    }
}

fn header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
}

/// The batch jobs that write a metrics file.
#[derive(Debug, Clone, Copy)]
pub enum Job {
    Gc,
    Verify,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Self::Gc => "gc",
            Self::Verify => "verify",
        }
    }
}

/// What every file says of the run itself: when it ended, whether it stopped before its
/// end, and when a run last ended (`success`, if known).
fn run_lines(out: &mut String, job: Job, end: SystemTime, failed: bool, success: Option<u64>) {
    let job = job.name();
    header(
        out,
        &format!("cellar_{job}_last_run_timestamp_seconds"),
        &format!("When the last cellar {job} run ended (unix time)."),
    );
    let _ = writeln!(out, "cellar_{job}_last_run_timestamp_seconds {}", unix(end));
    header(
        out,
        &format!("cellar_{job}_last_run_failed"),
        &format!(
            "1 if the last cellar {job} run stopped before its end (its log says why; the \
             other series then are missing) or ended with errors, 0 if it ended without."
        ),
    );
    let _ = writeln!(out, "cellar_{job}_last_run_failed {}", u8::from(failed));
    if let Some(t) = success {
        header(
            out,
            &format!("cellar_{job}_last_success_timestamp_seconds"),
            &format!("When a cellar {job} run last ended without errors (unix time)."),
        );
        let _ = writeln!(out, "cellar_{job}_last_success_timestamp_seconds {t}");
    }
}

/// The metrics of a `cellar gc` or `cellar verify` run that stopped at `end` without a result
/// (the store unreachable, a damaged upload record): the run's time, that it failed, and
/// when one last ended, carried over from `previous` (the file the last run left), so a
/// failing job shows on a dashboard instead of leaving the last good run's numbers there.
pub fn render_failed(job: Job, previous: Option<&str>, end: SystemTime) -> String {
    let mut out = String::new();
    run_lines(&mut out, job, end, true, last_success(job, previous));
    out
}

/// When a run of `job` last ended without errors, as `previous` (the file the last run left)
/// says.
fn last_success(job: Job, previous: Option<&str>) -> Option<u64> {
    let name = format!("cellar_{}_last_success_timestamp_seconds ", job.name());
    previous.and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The run lines of a run that ended at `end` with a result, failed if it had errors (the
/// command exits 1: stopped on request or lapsed half-way, deletions or write-backs that
/// failed): then the last success is carried over from `previous`, so an alert on either
/// series sees a job that never gets to its end.
fn ended_lines(out: &mut String, job: Job, end: SystemTime, failed: bool, previous: Option<&str>) {
    let success = if failed {
        last_success(job, previous)
    } else {
        Some(unix(end))
    };
    run_lines(out, job, end, failed, success);
}

/// The metrics of one `cellar gc` run that ended at `end` (`previous`: the file the last run
/// left).
pub fn render_gc(s: &Summary, previous: Option<&str>, end: SystemTime) -> String {
    let mut out = String::new();
    ended_lines(&mut out, Job::Gc, end, !s.errors.is_empty(), previous);
    header(
        &mut out,
        "cellar_gc_applied",
        "1 if the last run deleted (--apply), 0 for a dry run.",
    );
    let _ = writeln!(out, "cellar_gc_applied {}", u8::from(s.applied));
    header(
        &mut out,
        "cellar_gc_paths",
        "Paths by what the last run decided and why.",
    );
    for (r, t) in &s.paths {
        let outcome = if r.kept() { "kept" } else { "deleted" };
        let reason = reason_label(*r);
        let _ = writeln!(
            out,
            "cellar_gc_paths{{outcome=\"{outcome}\",reason=\"{reason}\"}} {}",
            t.count
        );
    }
    header(
        &mut out,
        "cellar_gc_path_bytes",
        "Bytes of those paths (narinfo and NAR).",
    );
    for (r, t) in &s.paths {
        let outcome = if r.kept() { "kept" } else { "deleted" };
        let reason = reason_label(*r);
        let _ = writeln!(
            out,
            "cellar_gc_path_bytes{{outcome=\"{outcome}\",reason=\"{reason}\"}} {}",
            t.bytes
        );
    }
    header(
        &mut out,
        "cellar_gc_deleted_objects",
        "Objects other than narinfos the last run deleted (a dry run: would delete), by kind.",
    );
    for (kind, t) in [
        ("nar", &s.nars),
        ("listing", &s.listings),
        ("realisation", &s.realisations),
        ("log", &s.logs),
        ("debuginfo", &s.debuginfo),
        ("nar_digest", &s.nar_digests),
        ("access_record", &s.access_records),
    ] {
        // Applied: what it did delete (fewer than planned after errors or a stop).
        let n = match &s.deleted_objects {
            Some(done) => done.get(kind).map_or(0, |&n| n as u64),
            None => t.count,
        };
        let _ = writeln!(out, "cellar_gc_deleted_objects{{kind=\"{kind}\"}} {n}");
    }
    header(
        &mut out,
        "cellar_gc_narinfos_deleted",
        "Narinfos the last run deleted (fewer than the paths it decided to delete after errors; 0 for a dry run).",
    );
    let _ = writeln!(
        out,
        "cellar_gc_narinfos_deleted {}",
        s.deleted_narinfos.unwrap_or(0)
    );
    header(&mut out, "cellar_gc_errors", "Errors in the last run.");
    let _ = writeln!(out, "cellar_gc_errors {}", s.errors.len());
    header(
        &mut out,
        "cellar_gc_damaged_access_records",
        "Access records within the retention the last run found damaged (lines that do not parse).",
    );
    let _ = writeln!(
        out,
        "cellar_gc_damaged_access_records {}",
        s.bad_records.len()
    );
    out
}

/// The metrics of one `cellar verify` run that ended at `end` (`previous`: the file the last
/// run left). Findings are its result, not a failure; repair errors and NARs that could not be
/// read for `--hashes` are.
pub fn render_verify(r: &Report, previous: Option<&str>, end: SystemTime) -> String {
    // Stopped while it checked: what it counted so far is no measure of the store.
    if r.stopped {
        return render_failed(Job::Verify, previous, end);
    }
    let mut out = String::new();
    let failed = !r.repair_errors.is_empty() || !r.unhashed.is_empty();
    ended_lines(&mut out, Job::Verify, end, failed, previous);
    header(
        &mut out,
        "cellar_verify_narinfos_checked",
        "Narinfos the last run checked.",
    );
    let _ = writeln!(out, "cellar_verify_narinfos_checked {}", r.narinfos_checked);
    header(
        &mut out,
        "cellar_verify_findings",
        "Inconsistencies the last run found, by kind.",
    );
    let mut kinds: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for f in &r.findings {
        *kinds.entry(f.kind()).or_default() += 1;
    }
    let _ = writeln!(
        out,
        "cellar_verify_findings{{kind=\"any\"}} {}",
        r.findings.len()
    );
    for (kind, n) in kinds {
        let _ = writeln!(out, "cellar_verify_findings{{kind=\"{kind}\"}} {n}");
    }
    header(
        &mut out,
        "cellar_verify_repaired_objects",
        "Objects the last run deleted with --repair.",
    );
    let _ = writeln!(out, "cellar_verify_repaired_objects {}", r.repaired.len());
    header(
        &mut out,
        "cellar_verify_kept_for_uploads",
        "Orphan NARs the last run's --repair kept because an upload recorded them.",
    );
    let _ = writeln!(out, "cellar_verify_kept_for_uploads {}", r.in_use.len());
    header(
        &mut out,
        "cellar_verify_repair_errors",
        "Repairs that failed in the last run.",
    );
    let _ = writeln!(out, "cellar_verify_repair_errors {}", r.repair_errors.len());
    header(
        &mut out,
        "cellar_verify_nars_not_hashed",
        "NARs the last run's --hashes could not read (not checked).",
    );
    let _ = writeln!(out, "cellar_verify_nars_not_hashed {}", r.unhashed.len());
    out
}

/// Replaces `path` with `text` at once (written beside it, synced, then renamed), readable by
/// all: the file is for node_exporter's textfile collector, which runs as another user, and a
/// unit's `UMask=0077` (contrib/cellar-gc.service) would otherwise leave it readable only by
/// cellar, every series silently missing.
///
/// The file written beside it has a name of its own, created new (never an existing file or a
/// symlink someone planted there: the run may be root's), and hidden (`.NAME.ID.tmp`, which
/// the collector, reading `*.prom`, skips); two runs at once each rename a whole file.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut hidden = std::ffi::OsString::from(".");
    hidden.push(name);
    hidden.push(format!(".{}.tmp", super::access::random_id()));
    let tmp = path.with_file_name(hidden);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        // After creation: the mode given to open(2) would be narrowed by the umask.
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself on disk (best effort: some file systems refuse to sync a directory).
    // `./NAME` for a bare name, whose parent is then `.`.
    let full = Path::new(".").join(path);
    if let Ok(d) = std::fs::File::open(full.parent().unwrap_or(Path::new("."))) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::super::mark::Reason;
    use super::super::report::{Summary, Tally};
    use super::super::verify::{Finding, Report};

    /// Every sample line comes after a HELP and a TYPE line for its metric.
    fn assert_described(prom: &str) {
        for line in prom.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                prom.contains(&format!("# HELP {name} ")),
                "{name} has no HELP:\n{prom}"
            );
            assert!(
                prom.contains(&format!("# TYPE {name} gauge\n")),
                "{name} has no TYPE:\n{prom}"
            );
        }
    }

    #[test]
    fn a_gc_run_is_rendered_with_every_reason_and_its_time() {
        let reasons = [
            (Reason::Pinned, "kept", "pinned"),
            (Reason::Young, "kept", "young"),
            (Reason::Uploading, "kept", "uploading"),
            (Reason::Recent, "kept", "recent"),
            (Reason::Referenced, "kept", "referenced"),
            (Reason::Unrecorded, "kept", "unrecorded"),
            (Reason::Expired, "deleted", "expired"),
            (Reason::OverBudget, "deleted", "over_budget"),
        ];
        let mut s = Summary::default();
        for (i, (r, _, _)) in reasons.iter().enumerate() {
            let n = i as u64 + 1;
            s.paths.insert(
                *r,
                Tally {
                    count: n,
                    bytes: 100 * n,
                },
            );
        }
        let prom = super::render_gc(&s, None, UNIX_EPOCH + Duration::from_secs(1_700_000_123));
        assert!(
            prom.contains("\ncellar_gc_last_run_timestamp_seconds 1700000123\n"),
            "{prom}"
        );
        for (i, (_, outcome, reason)) in reasons.iter().enumerate() {
            let n = i + 1;
            let labels = format!("{{outcome=\"{outcome}\",reason=\"{reason}\"}}");
            assert!(
                prom.contains(&format!("\ncellar_gc_paths{labels} {n}\n")),
                "{prom}"
            );
            assert!(
                prom.contains(&format!("\ncellar_gc_path_bytes{labels} {}\n", 100 * n)),
                "{prom}"
            );
        }
        assert_described(&prom);
    }

    #[test]
    fn a_verify_run_counts_its_findings_by_kind() {
        let orphan = |k: &str| Finding::OrphanNar { key: k.into() };
        let r = Report {
            narinfos_checked: 7,
            findings: vec![
                orphan("nar/a.nar"),
                orphan("nar/b.nar"),
                orphan("nar/c.nar"),
                Finding::OrphanListing { key: "x.ls".into() },
            ],
            unhashed: vec!["a.narinfo: gone".into(), "b.narinfo: gone".into()],
            ..Report::default()
        };
        let prom = super::render_verify(&r, None, UNIX_EPOCH + Duration::from_secs(42));
        for line in [
            "cellar_verify_last_run_timestamp_seconds 42",
            "cellar_verify_narinfos_checked 7",
            "cellar_verify_findings{kind=\"any\"} 4",
            "cellar_verify_findings{kind=\"orphan_nar\"} 3",
            "cellar_verify_findings{kind=\"orphan_listing\"} 1",
            "cellar_verify_nars_not_hashed 2",
        ] {
            assert!(prom.contains(&format!("\n{line}\n")), "{line}:\n{prom}");
        }
        assert_described(&prom);
    }

    /// A run that stops without a result says so, keeps the time a run last ended from the
    /// file the last one left, and drops that run's numbers (they are not this run's).
    #[test]
    fn a_failed_run_says_so_and_keeps_when_one_last_ended() {
        let ok = super::render_gc(
            &Summary::default(),
            None,
            UNIX_EPOCH + Duration::from_secs(100),
        );
        assert!(ok.contains("\ncellar_gc_last_run_failed 0\n"), "{ok}");
        assert!(
            ok.contains("\ncellar_gc_last_success_timestamp_seconds 100\n"),
            "{ok}"
        );
        let end = UNIX_EPOCH + Duration::from_secs(200);
        let failed = super::render_failed(super::Job::Gc, Some(&ok), end);
        for line in [
            "cellar_gc_last_run_timestamp_seconds 200",
            "cellar_gc_last_run_failed 1",
            "cellar_gc_last_success_timestamp_seconds 100",
        ] {
            assert!(failed.contains(&format!("\n{line}\n")), "{line}:\n{failed}");
        }
        assert!(!failed.contains("cellar_gc_paths"), "{failed}");
        assert_described(&failed);
        // Failing again keeps it; with no file before, there is no time to give.
        let again = super::render_failed(super::Job::Gc, Some(&failed), end);
        assert!(
            again.contains("\ncellar_gc_last_success_timestamp_seconds 100\n"),
            "{again}"
        );
        let first = super::render_failed(super::Job::Verify, None, end);
        assert!(
            first.contains("\ncellar_verify_last_run_failed 1\n"),
            "{first}"
        );
        assert!(!first.contains("success"), "{first}");
        let verified = super::render_verify(&Report::default(), None, end);
        assert!(
            verified.contains("\ncellar_verify_last_run_failed 0\n"),
            "{verified}"
        );

        // A run that ended with errors (stopped half-way, deletions that failed) failed too,
        // with what it did, and the last success carried over; so does a repair with errors,
        // or a verify that could not read a NAR to hash. Findings alone are no failure.
        let later = UNIX_EPOCH + Duration::from_secs(300);
        let stopped = Summary {
            errors: vec![crate::gc::STOPPED.into()],
            ..Summary::default()
        };
        let partial = super::render_gc(&stopped, Some(&ok), later);
        for line in [
            "cellar_gc_last_run_timestamp_seconds 300",
            "cellar_gc_last_run_failed 1",
            "cellar_gc_last_success_timestamp_seconds 100",
            "cellar_gc_errors 1",
        ] {
            assert!(
                partial.contains(&format!("\n{line}\n")),
                "{line}:\n{partial}"
            );
        }
        assert_described(&partial);
        for r in [
            Report {
                repair_errors: vec!["x".into()],
                ..Report::default()
            },
            Report {
                unhashed: vec!["x".into()],
                ..Report::default()
            },
        ] {
            let text = super::render_verify(&r, Some(&verified), later);
            assert!(
                text.contains("\ncellar_verify_last_run_failed 1\n"),
                "{text}"
            );
            assert!(
                text.contains("\ncellar_verify_last_success_timestamp_seconds 200\n"),
                "{text}"
            );
        }
        let found = Report {
            findings: vec![crate::gc::verify::Finding::MissingNar {
                key: "k".into(),
                nar: "n".into(),
            }],
            ..Report::default()
        };
        let text = super::render_verify(&found, Some(&verified), later);
        assert!(
            text.contains("\ncellar_verify_last_run_failed 0\n"),
            "{text}"
        );
        assert!(
            text.contains("\ncellar_verify_last_success_timestamp_seconds 300\n"),
            "{text}"
        );
    }

    /// The file beside the target is new and its own: a symlink planted where the old fixed
    /// name was is neither followed nor touched, and nothing is left beside the target.
    #[test]
    fn writes_beside_the_target_under_a_name_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let target = dir.path().join("cellar-gc.prom");
        std::os::unix::fs::symlink(&victim, dir.path().join("cellar-gc.prom.tmp")).unwrap();
        super::write(&target, "cellar_gc_errors 0\n").unwrap();
        super::write(&target, "cellar_gc_errors 1\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "cellar_gc_errors 1\n"
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["cellar-gc.prom", "cellar-gc.prom.tmp", "victim"]);
    }
}
