//! The `gc`, `pin` and `verify` subcommands: argument handling, progress bars and output.
//! The work itself is in [`cellar::gc`].

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use clap::Subcommand;

use cellar::config::Config;
use cellar::gc::{self, Progress};
use cellar::store::{self, Store};

#[derive(Subcommand)]
pub enum PinCommand {
    /// Pin the closures of STORE-PATHs (or symlinks to them, like ./result) under NAME
    /// (replacing a pin of that name).
    Add {
        name: String,
        #[arg(required = true, value_name = "STORE-PATH")]
        paths: Vec<String>,
        /// Let the pin expire N days from now, N at least 1 (default: kept until removed).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        keep_days: Option<u64>,
    },
    /// List pins.
    List,
    /// Remove the pin NAME.
    Rm { name: String },
}

/// A progress bar on stderr; indicatif draws nothing when stderr is not a terminal.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Self {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg:28} {bar:40} {pos}/{len} {elapsed}")
        {
            bar.set_style(style);
        }
        Self(bar)
    }
}

impl Progress for Bar {
    fn phase(&self, name: &str, total: Option<u64>) {
        self.0.set_message(name.to_owned());
        self.0.set_position(0);
        self.0.set_length(total.unwrap_or(0));
    }
    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
}

/// For a run that deletes: the first SIGINT, SIGTERM or SIGHUP asks it to stop where that is
/// safe ([`gc::Stop`]), a second one ends the process at once. SIGHUP too: a run started over
/// SSH gets it when the connection drops, and its default ends the process mid-batch.
fn stop_on_signals() -> anyhow::Result<gc::Stop> {
    use std::io::Write as _;
    use tokio::signal::unix::{signal, SignalKind};
    let stop = gc::Stop::default();
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let requested = stop.clone();
    tokio::spawn(async move {
        let mut signals = 0;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            signals += 1;
            // Said with errors ignored: after a hangup, the terminal may be gone.
            if signals > 1 {
                let _ = writeln!(std::io::stderr(), "cellar: stopping at once");
                std::process::exit(130);
            }
            requested.request();
            let _ = writeln!(
                std::io::stderr(),
                "cellar: stopping once the deletions under way are checked and undone where \
                 needed (again to stop at once, which may leave an upload's reference deleted)"
            );
        }
    });
    Ok(stop)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Opens the store and asks it once: a store that does not answer fails the command at once,
/// and one whose clock differs from this machine's has shown it before anything is dated
/// (`gc`'s now, a pin's access record; see [`cellar::store::clock`]).
async fn open(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let what = || format!("opening the store ({})", cfg.store.backend);
    let store = store::open_existing(&cfg.store).await.with_context(what)?;
    store.ping().await.with_context(what)?;
    Ok(store)
}

/// Runs `run`; if it fails and a metrics file is asked for, the file says that the run
/// failed (keeping when one last ended), rather than still showing the last good run's
/// numbers as if this one had found them.
fn failure_shown<T>(
    metrics_file: Option<&Path>,
    job: gc::metrics_file::Job,
    run: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let result = run();
    if let (Err(_), Some(f)) = (&result, metrics_file) {
        let previous = std::fs::read_to_string(f).ok();
        let text = gc::metrics_file::render_failed(job, previous.as_deref(), SystemTime::now());
        if let Err(e) = gc::metrics_file::write(f, &text) {
            eprintln!("--metrics-file {}: {e}", f.display());
        }
    }
    result
}

pub fn gc(path: Option<&Path>, apply: bool, metrics_file: Option<&Path>) -> anyhow::Result<()> {
    let summary = failure_shown(metrics_file, gc::metrics_file::Job::Gc, || {
        gc_summary(path, apply)
    })?;
    if !apply {
        say!("dry run: nothing was deleted (run with --apply to delete)");
    }
    say_raw!("{summary}");
    if let Some(f) = metrics_file {
        let previous = std::fs::read_to_string(f).ok();
        let text = gc::metrics_file::render_gc(&summary, previous.as_deref(), SystemTime::now());
        gc::metrics_file::write(f, &text)
            .with_context(|| format!("--metrics-file {}", f.display()))?;
    }
    if !summary.errors.is_empty() {
        anyhow::bail!("{} error(s) during the run", summary.errors.len());
    }
    Ok(())
}

fn gc_summary(path: Option<&Path>, apply: bool) -> anyhow::Result<gc::Summary> {
    let cfg = Config::load(path)?;
    runtime()?.block_on(async {
        let stop = if apply {
            stop_on_signals()?
        } else {
            gc::Stop::default()
        };
        let store = open(&cfg).await?;
        let bar = Bar::new();
        let opts = gc::Options {
            apply,
            now: store.now(),
            settle: gc::deleting::SETTLE,
            stop,
        };
        let s = gc::run(&store, &cfg.store_dir, &cfg.gc, &opts, &bar).await;
        bar.0.finish_and_clear();
        anyhow::Ok(s?)
    })
}

pub fn pin(path: Option<&Path>, command: PinCommand) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let sd = cfg.store_dir.clone();
    runtime()?.block_on(async {
        let store = open(&cfg).await?;
        match command {
            PinCommand::Add {
                name,
                paths,
                keep_days,
            } => {
                let paths = paths
                    .iter()
                    .map(|p| gc::pins::store_path_or_link(p, &sd))
                    .collect::<Result<Vec<_>, _>>()?;
                let n = paths.len();
                let absent = gc::pins::add(store.as_ref(), &name, paths, keep_days, &sd).await?;
                for p in &absent {
                    // A running `cellar gc --apply` takes a path's narinfo away while it
                    // decides about it, and writes it back for this pin's record.
                    eprintln!(
                        "warning: {sd}/{p} is not in the cache (not uploaded yet, or a running \
                         `cellar gc --apply` is deciding about it: the pin keeps it); pinned anyway"
                    );
                }
                say!("pinned {n} path(s) as {name}");
            }
            PinCommand::List => {
                let (pins, bad) = gc::pins::list(store.as_ref(), &sd).await?;
                let now = store.now();
                for p in pins {
                    say!("{} ({})", p.name, p.state(now));
                    for path in &p.paths {
                        say!("  {sd}/{path}");
                    }
                }
                for (key, why) in bad {
                    say!("unreadable pin {key}: {why}");
                }
            }
            PinCommand::Rm { name } => {
                gc::pins::remove(store.as_ref(), &name).await?;
                say!("removed pin {name}");
            }
        }
        anyhow::Ok(())
    })
}

/// Returns whether the store is consistent (after repair, if asked for).
pub fn verify(
    path: Option<&Path>,
    repair: bool,
    sample: Option<usize>,
    hashes: bool,
    metrics_file: Option<&Path>,
) -> anyhow::Result<bool> {
    if repair && sample.is_some() {
        anyhow::bail!("--repair checks the whole store; it cannot be combined with --sample");
    }
    let report = failure_shown(metrics_file, gc::metrics_file::Job::Verify, || {
        verify_report(path, repair, sample, hashes)
    })?;
    if report.stopped {
        for u in &report.unfinished {
            say!("{u}");
        }
        for e in report.repair_errors.iter().filter(|e| *e != gc::STOPPED) {
            say!("repair failed: {e}");
        }
        // With the errors, on stderr: the run did not get to its end.
        eprintln!(
            "cellar: verify stopped on request (SIGINT, SIGTERM or SIGHUP) before its check \
             ended: no finding was repaired; run it again"
        );
        write_verify_metrics(metrics_file, &report)?;
        return Ok(false);
    }
    for f in &report.findings {
        say!("{f}");
    }
    say!(
        "checked {} narinfos{}: {} finding(s)",
        report.narinfos_checked,
        if sample.is_some() {
            " (a sample; orphans, realisations and debug info links not checked)"
        } else {
            ""
        },
        report.findings.len()
    );
    if report.on_upstreams > 0 {
        say!(
            "{} reference(s) not in the store are served by upstreams",
            report.on_upstreams
        );
    }
    for u in &report.unfinished {
        say!("{u}");
    }
    for k in &report.repaired {
        match report.pinned_by(k) {
            Some(pins) => say!(
                "repaired: deleted {k} (pinned by {pins}: the pin keeps nothing until the path \
                 is pushed again)"
            ),
            None => say!("repaired: deleted {k}"),
        }
    }
    for p in &report.pins_missing {
        say!("warning: pin {p} is not in the cache (push it again, or `cellar pin rm` the pin)");
    }
    for k in &report.in_use {
        say!("kept {k}: an upload recorded it in the last 30 minutes (its narinfo may follow)");
    }
    for k in &report.relied_on {
        say!("kept {k}: an upload in progress names it or a path that needs it (it may have been repaired by it)");
    }
    for k in &report.young {
        say!("kept {k}: younger than gc.grace_secs, or needed by a path that is or needing one that is broken (a later run repairs it if it is still broken)");
    }
    for e in &report.repair_errors {
        say!("repair failed: {e}");
    }
    for e in &report.unhashed {
        say!("not hashed: {e}");
    }
    write_verify_metrics(metrics_file, &report)?;
    // A NAR that could not be read was not checked: the store is not known to be whole.
    Ok(report.unhashed.is_empty()
        && if repair {
            report.repair_errors.is_empty()
        } else {
            report.findings.is_empty()
        })
}

/// The run's lines in `--metrics-file`, if given.
fn write_verify_metrics(
    metrics_file: Option<&Path>,
    report: &gc::verify::Report,
) -> anyhow::Result<()> {
    if let Some(f) = metrics_file {
        let previous = std::fs::read_to_string(f).ok();
        let text = gc::metrics_file::render_verify(report, previous.as_deref(), SystemTime::now());
        gc::metrics_file::write(f, &text)
            .with_context(|| format!("--metrics-file {}", f.display()))?;
    }
    Ok(())
}

fn verify_report(
    path: Option<&Path>,
    repair: bool,
    sample: Option<usize>,
    hashes: bool,
) -> anyhow::Result<gc::verify::Report> {
    let cfg = Config::load(path)?;
    runtime()?.block_on(async {
        let stop = if repair {
            stop_on_signals()?
        } else {
            gc::Stop::default()
        };
        let store = open(&cfg).await?;
        let bar = Bar::new();
        let upstreams = match cfg.upstreams.is_empty() {
            true => None,
            false => Some(Arc::new(
                cellar::upstream::Upstreams::new(&cfg.upstreams, &cfg.store_dir)
                    .context("[[upstreams]]")?,
            )),
        };
        let opts = gc::verify::Options {
            repair,
            sample,
            hashes,
            grace: cfg.gc.grace,
            now: store.now(),
            settle: gc::deleting::SETTLE,
            stop,
            upstreams,
        };
        let r = gc::verify::run(&store, &cfg.store_dir, &opts, &bar).await;
        bar.0.finish_and_clear();
        anyhow::Ok(r?)
    })
}
