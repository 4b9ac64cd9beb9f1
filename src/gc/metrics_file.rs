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
        Reason::Expired => "expired",
        Reason::OverBudget => "over_budget",
    }
}

fn header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
}

/// The metrics of one `cellar gc` run that ended at `end`.
pub fn render_gc(s: &Summary, end: SystemTime) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "cellar_gc_last_run_timestamp_seconds",
        "When the last cellar gc run ended (unix time).",
    );
    let _ = writeln!(out, "cellar_gc_last_run_timestamp_seconds {}", unix(end));
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
        "Bytes of the NARs of those paths.",
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
        "Objects other than narinfos the last run deleted (or would delete), by kind.",
    );
    for (kind, t) in [
        ("nar", &s.nars),
        ("listing", &s.listings),
        ("realisation", &s.realisations),
        ("log", &s.logs),
        ("access_record", &s.access_records),
    ] {
        let _ = writeln!(
            out,
            "cellar_gc_deleted_objects{{kind=\"{kind}\"}} {}",
            t.count
        );
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

/// The metrics of one `cellar verify` run that ended at `end`.
pub fn render_verify(r: &Report, end: SystemTime) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "cellar_verify_last_run_timestamp_seconds",
        "When the last cellar verify run ended (unix time).",
    );
    let _ = writeln!(
        out,
        "cellar_verify_last_run_timestamp_seconds {}",
        unix(end)
    );
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
    out
}

/// Replaces `path` with `text` at once (written beside it, synced, then renamed), readable by
/// all: the file is for node_exporter's textfile collector, which runs as another user, and a
/// unit's `UMask=0077` (contrib/cellar-gc.service) would otherwise leave it readable only by
/// cellar, every series silently missing.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut file = std::fs::File::create(&tmp)?;
    // After creation: the mode given to open(2) would be narrowed by the umask.
    file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
