//! The `cellar` command: serve, check-config, keygen, import, token, gc, pin, verify.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use cellar::config::{Config, LogFormat, StoreBackend};
use cellar::nix::SecretKey;
use cellar::{signing_keys, store, AppState};

/// `println!` that never panics: with its reader gone (`cellar gc | head`) the rest of the
/// output is lost and the command still runs to its end (a collection is not cut half-way).
macro_rules! say {
    () => {
        say!("")
    };
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` as [`say!`] is `println!`.
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

#[path = "cli/gc.rs"]
mod gc_cli;

#[derive(Parser)]
#[command(
    name = "cellar",
    version,
    about = "A self-hosted Nix binary cache server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: `text` or `json` (default: for `serve`, `log.format` of the config; else text).
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the cache over HTTP.
    Serve {
        /// TOML config file (see config/cellar.toml); CELLAR_* env vars override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration (and key files) and exit.
    CheckConfig {
        /// TOML config file (see config/cellar.toml); CELLAR_* env vars override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Import a directory written by `nix copy --to file://DIR` into the configured store,
    /// verified like an upload, references first. Already present paths are skipped.
    Import {
        dir: PathBuf,
        /// TOML config file (see config/cellar.toml); CELLAR_* env vars override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Show what a running server reports about itself: version, store, keys, caches, upstreams.
    Status {
        /// The server's base URL [default: http://127.0.0.1:8080, or the `listen` of --config].
        #[arg(long)]
        url: Option<String>,
        /// The server's config file: its `listen` address is asked (on this host).
        #[arg(long, short, conflicts_with = "url")]
        config: Option<PathBuf>,
        /// A file holding a read token (private mode).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Manage access tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Delete what no root needs: paths not used within gc.keep_days and not pinned, with
    /// what only they refer to. A dry run unless --apply (see docs/gc.md).
    Gc {
        /// Delete; without it, only report what would be deleted.
        #[arg(long)]
        apply: bool,
        /// Also write the results in the Prometheus text format to FILE (for node_exporter's
        /// textfile collector).
        #[arg(long, value_name = "FILE")]
        metrics_file: Option<PathBuf>,
        /// TOML config file (see config/cellar.toml); CELLAR_* env vars override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Manage pins: named store paths whose closures gc always keeps.
    Pin {
        #[command(subcommand)]
        command: gc_cli::PinCommand,
        /// TOML config file (see config/cellar.toml); CELLAR_* env vars override it.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Check that every narinfo can be served whole, and what realisations and debug info
    /// links name; exit 1 on any inconsistency (with --repair: on any left unrepaired for a
    /// human, a pin, realisation or link that does not parse, or a failed deletion).
    Verify {
        /// Delete what cannot be served whole, orphans, unfinished uploads, and realisations
        /// and links naming what is missing, past the grace period.
        #[arg(long)]
        repair: bool,
        /// Check only N narinfos chosen at random.
        #[arg(long, value_name = "N")]
        sample: Option<usize>,
        /// Also read every NAR checked and check it as the client does (FileHash, else
        /// decoded against NarHash and NarSize): finds corrupted NARs, reading the whole
        /// store.
        #[arg(long)]
        hashes: bool,
        /// Also write the results in the Prometheus text format to FILE (for node_exporter's
        /// textfile collector).
        #[arg(long, value_name = "FILE")]
        metrics_file: Option<PathBuf>,
        /// TOML config file (see config/cellar.toml); CELLAR_* env vars override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Create a signing key in Nix's format and print its public key.
    Keygen {
        /// Key name, e.g. `cache.example.org-1`.
        name: String,
        /// Where to write the secret key (mode 0600); without it, it is printed to stdout.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh token and the config lines that accept it.
    New {
        /// A label for the token (shown in logs), e.g. `ci-builders`.
        #[arg(long, default_value = "token")]
        name: String,
        /// What the token may do; `write` implies `read`.
        #[arg(long, value_enum, default_value = "write")]
        scope: ScopeArg,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ScopeArg {
    Read,
    Write,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` sets up its logs once its config (with `log.format`) is read.
    if !matches!(cli.command, Command::Serve { .. }) {
        let _ = cellar::telemetry::init(cli.log_format.unwrap_or_default());
    }
    let result = match cli.command {
        Command::Serve { config } => match serve(config.as_deref(), cli.log_format) {
            Err(Failed::Logged) => return ExitCode::FAILURE,
            Err(Failed::Plain(e)) => Err(e),
            Ok(()) => Ok(()),
        },
        Command::Status {
            url,
            config,
            token_file,
        } => status(url, config.as_deref(), token_file.as_deref()),
        Command::CheckConfig { config } => check_config(config.as_deref()),
        Command::Keygen { name, out } => keygen(&name, out.as_deref()),
        Command::Import { dir, config } => match import(&dir, config.as_deref()) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Token {
            command: TokenCommand::New { name, scope },
        } => token_new(&name, scope),
        Command::Gc {
            apply,
            metrics_file,
            config,
        } => gc_cli::gc(config.as_deref(), apply, metrics_file.as_deref()),
        Command::Pin { command, config } => gc_cli::pin(config.as_deref(), command),
        Command::Verify {
            repair,
            sample,
            hashes,
            metrics_file,
            config,
        } => match gc_cli::verify(
            config.as_deref(),
            repair,
            sample,
            hashes,
            metrics_file.as_deref(),
        ) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(1),
            // Not a finding: the check could not run (a timer's unit tells them apart).
            Err(e) => {
                eprintln!("cellar: error: {e:#}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cellar: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(path: Option<&Path>) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    for (var, key) in path.map(Config::env_overrides).unwrap_or_default() {
        say!("note: {var} overrides `{key}` in the config file");
    }
    let secrets = path
        .map(Config::secrets_others_can_read)
        .unwrap_or_default();
    if !secrets.is_empty() {
        say!(
            "warning: the config file can be read by other users and holds secrets ({}); \
             `chmod o-r` it, or give them in the environment",
            secrets.join(", ")
        );
    }
    if let cellar::config::StoreBackend::Local(l) = &cfg.store.backend {
        if let Some(why) = cellar::store::local::unwritable(&l.path) {
            say!("warning: store.path {}: {why}", l.path.display());
        }
    }
    // As `serve` reads them: also refused if two keys have one name.
    if !cfg.signing.key_files.is_empty() {
        let keys = signing_keys::load_existing(&cfg.signing)?;
        for (f, k) in cfg.signing.key_files.iter().zip(&keys) {
            say!("signing key {}: {}", f.display(), k.public());
        }
    }
    if let Some(dir) = &cfg.cache.nar_dir {
        cellar::cache::nar::check_dir(dir)
            .with_context(|| format!("config key `cache.nar_dir`: {}", dir.display()))?;
    }
    local_store_to_create(&cfg)?;
    say!("configuration is valid");
    Ok(())
}

fn keygen(name: &str, out: Option<&Path>) -> anyhow::Result<()> {
    let key = SecretKey::generate(name).map_err(|e| anyhow::anyhow!("key name {name:?}: {e}"))?;
    match out {
        Some(path) => {
            signing_keys::write_secret_key(path, &key)?;
            eprintln!("secret key written to {}", path.display());
            say!("{}", key.public());
        }
        None => {
            written(&format!("{}\n", key.to_nix_format()))
                .context("writing the secret key to stdout")?;
            eprintln!("public key: {}", key.public());
        }
    }
    Ok(())
}

struct Bar(indicatif::ProgressBar);

impl cellar::import::Progress for Bar {
    fn start(&self, total: usize) {
        self.0.set_length(total as u64);
    }
    fn advance(&self, path: &str) {
        self.0.set_message(path.to_owned());
        self.0.inc(1);
    }
}

/// Imports `dir`; exits 1 if paths were rejected, 3 if the import stopped before its end (the
/// store failed, the directory could not be read: once fixed, a run again goes on), after the
/// summary of what was done either way. (2 is clap's, for a command line it refuses.)
fn import(dir: &Path, path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    // Before the store is opened (or created): a mistyped directory is said as it is, not as
    // an import that stopped half-way.
    std::fs::read_dir(dir).with_context(|| {
        format!(
            "cannot read {} (the directory `nix copy --to file://DIR` wrote)",
            dir.display()
        )
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Created, so that a new cache can be filled before its server first starts; said, as a
    // relative path lands wherever the command was run.
    if let Some(shown) = local_store_to_create(&cfg)? {
        eprintln!(
            "cellar: store.path {} does not exist: creating it (a relative path is taken \
             from the working directory)",
            shown.display()
        );
    }
    let outcome = rt.block_on(async {
        let store = store::open(&cfg.store).await.context("opening the store")?;
        eprintln!(
            "cellar: importing {} into {}",
            dir.display(),
            store.describe()
        );
        // Recorded like an upload, so that a garbage collection running meanwhile keeps what
        // is imported and its references (see cellar::gc::sweep).
        let access = cellar::gc::access::AccessLog::new(store.clone(), cfg.gc.access_max_entries)
            .covering_uploads_for(cellar::gc::access::UPLOAD_COVER);
        let uploader = cellar::upload::Uploader::new(&cfg.upload, &cfg.store_dir, store.clone())
            .with_access(std::sync::Arc::new(access));
        // The server's own signatures in a directory copied from it (`nix copy --from` the
        // cache) are not imported: it makes them as it serves. Known only if its keys can be
        // read here.
        if let Ok(keys) = signing_keys::load_existing(&cfg.signing) {
            uploader.set_own_key_names(signing_keys::key_names(&keys));
        }
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {wide_msg}")
        {
            bar.set_style(style);
        }
        let progress = Bar(bar);
        let outcome =
            cellar::import::import_dir(dir, store.as_ref(), &uploader, &cfg.store_dir, &progress)
                .await;
        progress.0.finish_and_clear();
        anyhow::Ok(outcome)
    })?;
    let (summary, stopped) = match outcome {
        Ok(summary) => (summary, None),
        Err(cellar::import::Stopped { summary, cause }) => (summary, Some(cause)),
    };
    let realisations = match summary.realisations {
        0 => String::new(),
        n => format!(", {n} realisation(s) written"),
    };
    let mended = match summary.mended {
        0 => String::new(),
        n => format!("; {n} of them mended: signatures added or NAR restored"),
    };
    say!(
        "imported {}, skipped {} (already present{mended}), rejected {}{realisations}",
        summary.imported,
        summary.skipped,
        summary.rejected.len()
    );
    for (what, why) in &summary.rejected {
        say!("  rejected {what}: {why}");
    }
    for (what, why) in &summary.not_mended {
        say!("  not mended {what}: {why}");
    }
    if let Some(cause) = stopped {
        eprintln!(
            "cellar: error: the import stopped: {cause}\ncellar: what it imported stays; once \
             that is fixed, the same command goes on from there"
        );
        return Ok(ExitCode::from(3));
    }
    if !summary.rejected.is_empty() {
        eprintln!(
            "cellar: error: {} path(s) or realisation(s) were rejected",
            summary.rejected.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn token_new(name: &str, scope: ScopeArg) -> anyhow::Result<()> {
    // The name is the netrc login and goes into the printed TOML: no spaces, quotes or
    // newlines, which would break either.
    let fits = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || !name.chars().all(fits) {
        anyhow::bail!("--name {name:?}: use letters, digits, dashes, dots and underscores");
    }
    let token = cellar::auth::generate().map_err(|e| anyhow::anyhow!("random source: {e}"))?;
    let scope = match scope {
        ScopeArg::Read => "read",
        ScopeArg::Write => "write",
    };
    let hash = cellar::auth::hash(&token);
    // Written whole or the command fails: a token printed nowhere must not look made.
    let text = format!(
        "token: {token}\n\n\
         # add to the server's config (only the hash is stored):\n\
         [[auth.tokens]]\n\
         name = \"{name}\"\n\
         hash = \"{hash}\"\n\
         scopes = [\"{scope}\"]\n\n\
         # on the client, in the file nix.conf's netrc-file points to:\n\
         # machine <cache host> login {name} password {token}\n"
    );
    written(&text).context("writing the token to stdout")
}

/// `text` written to stdout whole, or the error: for what must not be lost (a secret key, a
/// token), where [`say!`] would go on.
fn written(text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// The local store's directory, as an absolute path, if it does not exist (opening the store
/// creates it); an error naming `store.path` if it is something else than a directory.
fn local_store_to_create(cfg: &Config) -> anyhow::Result<Option<PathBuf>> {
    let StoreBackend::Local(l) = &cfg.store.backend else {
        return Ok(None);
    };
    let shown = std::path::absolute(&l.path).unwrap_or_else(|_| l.path.clone());
    match std::fs::metadata(&l.path) {
        Ok(m) if m.is_dir() => Ok(None),
        Ok(_) => anyhow::bail!(
            "config key `store.path`: {} is not a directory",
            shown.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(shown)),
        // Not to be told here (a parent not searchable): opening the store says why.
        Err(_) => Ok(None),
    }
}

/// Why `serve` stopped: an error for `main` to print, or one already logged (as JSON).
enum Failed {
    Plain(anyhow::Error),
    Logged,
}

impl<E: Into<anyhow::Error>> From<E> for Failed {
    fn from(e: E) -> Self {
        Self::Plain(e.into())
    }
}

fn serve(path: Option<&Path>, log_format: Option<LogFormat>) -> Result<(), Failed> {
    // Given on the command line, JSON logs begin before the config is read: its errors are
    // JSON lines too.
    let early = log_format == Some(LogFormat::Json);
    if early {
        cellar::telemetry::init(LogFormat::Json)
            .map_err(|e| anyhow::anyhow!("setting up logs: {e}"))?;
    }
    let mut json = early;
    let served = serve_configured(path, log_format, &mut json);
    match served {
        // Every line of stderr a JSON object, the one saying why cellar stopped too.
        Err(e) if json => {
            tracing::error!(error = %format!("{e:#}"), "cellar cannot serve: {e:#}");
            Err(Failed::Logged)
        }
        r => Ok(r?),
    }
}

/// `serve` from reading the config on; `json` says whether logs are JSON lines (set on the
/// command line: begun already), and is set once they are.
fn serve_configured(
    path: Option<&Path>,
    log_format: Option<LogFormat>,
    json: &mut bool,
) -> anyhow::Result<()> {
    let logs_begun = *json;
    // The runtime first, for the SIGHUP handler: a `systemctl reload` (a log rotation's)
    // while the config and the keys are read must not end the process.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let hup = {
        let _in_runtime = rt.enter();
        cellar::reload::sighup_handler().context("installing the SIGHUP handler")?
    };
    let mut cfg = Config::load(path)?;
    if let Some(f) = log_format {
        cfg.log.format = f;
    }
    if !logs_begun {
        cellar::telemetry::init(cfg.log.format)
            .map_err(|e| anyhow::anyhow!("setting up logs: {e}"))?;
        *json = cfg.log.format == LogFormat::Json;
    }
    cellar::reload::warn_env_overrides(path);
    cellar::metrics::set_build_info(match cfg.store.backend {
        StoreBackend::Local(_) => "local",
        StoreBackend::S3(_) => "s3",
    });
    // An empty cache: right on a first start, a mistake otherwise (a typo, a relative path
    // from another directory, a container volume mounted elsewhere), which would fill a
    // directory nobody keeps.
    if let Some(shown) = local_store_to_create(&cfg)? {
        tracing::warn!(
            "store.path {} does not exist: creating it, an empty cache (a relative path is \
             taken from the working directory)",
            shown.display()
        );
    }
    let loaded = signing_keys::load(&cfg.signing)?;
    let keys_line = cellar::signing_keys::public_keys_line(&loaded.keys);
    let generated = loaded.generated.clone();
    match cfg.log.format {
        // Printed as a line to copy into the clients' nix.conf. One line for all keys: in
        // nix.conf a second `trusted-public-keys` line replaces the first, so during a
        // rotation clients would trust only one of the keys.
        LogFormat::Text => {
            if let Some(p) = &loaded.generated {
                eprintln!("cellar: created signing key {} on first start", p.display());
            }
            eprintln!("cellar: trusted-public-keys = {keys_line}");
        }
        // Every line of stderr a JSON object, for log shippers that parse each one.
        LogFormat::Json => {
            if let Some(p) = &loaded.generated {
                tracing::info!(path = %p.display(), "created signing key on first start");
            }
            tracing::info!(
                trusted_public_keys = %keys_line,
                "trusted-public-keys = {keys_line}"
            );
        }
    }
    let served = rt.block_on(async move {
        // The access log, once there: a second signal still writes what it holds.
        let last_words = Arc::new(std::sync::OnceLock::new());
        // Before anything that may take a while: as a container's PID 1, cellar would
        // otherwise ignore a stop while the store opens.
        let signal = shutdown_signal(last_words.clone()).context("installing signal handlers")?;
        let mut signal = Box::pin(signal);
        let store = tokio::select! {
            opened = store::open(&cfg.store) => {
                opened.with_context(|| format!("opening the store ({})", cfg.store.backend))?
            }
            () = &mut signal => {
                tracing::info!("stopped before serving");
                return Ok(());
            }
        };
        if let Some(path) = generated.clone() {
            let store = store.clone();
            tokio::spawn(async move {
                if signing_keys::store_holds_a_cache(&*store).await {
                    tracing::error!(
                        key_file = %path.display(),
                        "a signing key was generated (its file did not exist), but the store \
                         already holds a cache: clients trusting the key it was served with \
                         refuse every path (\"lacks a valid signature\"). If the key file was \
                         lost, stop cellar and put it back; if a new key is meant, give the \
                         clients its public key (the trusted-public-keys line above)"
                    );
                }
            });
        }
        let last_flush_within = cfg.store.timeout;
        let early_words = last_words.clone();
        let shutdown = async move {
            signal.await;
            cellar::systemd::stopping();
            // What was served until the signal is written now, not only after the shutdown
            // delay and the wait for requests (up to `gc.access_flush_secs` of use, which an
            // orchestrator's kill at the end of its stop timeout would lose); the last write
            // below takes what is served meanwhile.
            if let Some(access) = early_words.get().cloned() {
                tokio::spawn(async move {
                    if let Err(e) = access.flush().await {
                        tracing::warn!(cause = %e, "writing the access record at the stop signal failed");
                    }
                });
            }
        };
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("config key `listen`: cannot bind {}", cfg.listen))?;
        // With `listen = 127.0.0.1:0` the kernel picks the port: this is the address to use.
        let addr = listener.local_addr().context("reading the bound address")?;
        let described = store.describe();
        let metrics_listener = match cfg.metrics_listen {
            Some(m) => Some(bind_metrics(m).await?),
            None => None,
        };
        spawn_staging_cleanup(store.clone(), cfg.upload.staging_max_age);
        let store_check = (
            store.clone(),
            cfg.store.timeout,
            matches!(cfg.store.backend, StoreBackend::Local(_)),
        );
        let state = AppState::new(cfg, store, loaded.keys)?;
        if let Some(l) = metrics_listener {
            serve_metrics(l, state.clone());
        }
        let access = state.access.clone();
        let _ = last_words.set(access.clone());
        let flusher = access.spawn_flusher(state.config.gc.access_flush_interval);
        let upkeep = state.spawn_upkeep();
        // Once start-up cannot fail any more: a store read cut by an exit is no finding.
        spawn_store_check(store_check.0, store_check.1, store_check.2);
        // Only now: every start-up error (the metrics address taken, the NAR cache another
        // cellar's) comes before it, so a journal saying it is one of a server that serves.
        tracing::info!(listen = %addr, store = %described, "cellar serving");
        announce(addr);
        cellar::systemd::ready(&format!("serving on {addr}"));
        cellar::systemd::spawn_watchdog();
        // After READY=1 and its status line: the status a reload of a SIGHUP received during
        // start-up sets (above all "configuration NOT reloaded") is not overwritten by it.
        cellar::reload::spawn_on_sighup(state.clone(), path.map(Path::to_owned), log_format, hup);
        cellar::serve(listener, state, shutdown).await?;
        // Stopped, and waited for: a write it had under way gives its entries back (and its
        // lock up) for the last one below.
        upkeep.abort();
        flusher.abort();
        let _ = flusher.await;
        // What was served since the last write still counts as recent use: written within
        // `store.timeout_secs`, which the stop timeout the docs give leaves for it.
        match tokio::time::timeout(last_flush_within, access.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(cause = %e, "writing the last access record failed"),
            Err(_) => {
                tracing::warn!("the last access record was not written within store.timeout_secs")
            }
        }
        tracing::info!("stopped");
        Ok(())
    });
    // Not waiting for ever on the blocking pool: a thread stuck in the kernel (a read of a
    // local store's file that never answers) would keep a stopped server from exiting.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    served
}

/// Binds `metrics_listen`.
async fn bind_metrics(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("config key `metrics_listen`: cannot bind {addr}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    tracing::info!(listen = %bound, "metrics served, and health checks");
    Ok(listener)
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the process exits.
fn serve_metrics(listener: tokio::net::TcpListener, state: AppState) {
    tokio::spawn(cellar::http::serve_metrics(listener, state));
}

fn status(
    url: Option<String>,
    config: Option<&Path>,
    token_file: Option<&Path>,
) -> anyhow::Result<()> {
    let url = match (url, config) {
        (Some(url), _) => url,
        (None, Some(path)) => local_url(Config::load(Some(path))?.listen),
        (None, None) => "http://127.0.0.1:8080".to_owned(),
    };
    let token = match token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading --token-file {}", f.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let status = rt.block_on(cellar::status::fetch(&url, token.as_deref()))?;
    say_raw!("{status}");
    Ok(())
}

/// The URL this host reaches a server listening on `listen` at: a wildcard address
/// (`0.0.0.0`, `[::]`) through the loopback of its family.
fn local_url(mut listen: std::net::SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        listen.set_ip(match listen {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{listen}")
}

/// Prints `listening on http://ADDR` on stdout once the port is open and the app is built, so
/// a supervisor or a test that asked for port 0 waits for this one line instead of polling the
/// port. Rust's stdout is line-buffered even into a pipe: the line leaves at once.
fn announce(addr: std::net::SocketAddr) {
    use std::io::Write as _;
    // A closed stdout must not stop the server (the address is in the log too).
    let _ = writeln!(std::io::stdout(), "listening on http://{addr}");
}

/// Asks the store once, right after start-up: a wrong endpoint, bucket, region or credentials
/// then show in the log at once, with the keys to check, not at the first client's 502 or 503.
/// The server serves anyway (an S3 store still starting is no reason to stop); `/readyz`
/// answers 503 until the store answers.
/// `local`: a local directory, whose keys to check are others, and which is also tried for
/// writing.
fn spawn_store_check(
    store: std::sync::Arc<dyn cellar::store::Store>,
    timeout: Duration,
    local: bool,
) {
    tokio::spawn(async move {
        let what = store.describe();
        let check = if local {
            "check store.path, and that the server's user may read it; serving anyway, \
             /readyz answers 503 until the store answers"
        } else {
            "check store.endpoint, store.bucket, store.prefix, store.region and the \
             credentials; serving anyway, /readyz answers 503 until the store answers"
        };
        match tokio::time::timeout(timeout, store.ping()).await {
            Ok(Ok(())) if local => {
                tracing::debug!(store = %what, "the store answers");
                // A directory the server may read but not write (a systemd unit's
                // `ProtectSystem=strict` without `ReadWritePaths=`) serves, but every upload
                // and every access record (what gc keeps by) would fail: said now, once.
                match store.writer("nix-cache-info").await {
                    Ok(w) => w.abort().await,
                    Err(e) => tracing::warn!(
                        store = %what,
                        cause = %e,
                        "the store's directory (store.path) cannot be written: uploads and \
                         the access records gc keeps paths by will fail"
                    ),
                }
            }
            Ok(Ok(())) => tracing::debug!(store = %what, "the store answers"),
            Ok(Err(e @ cellar::store::StoreError::Misconfigured(_))) => {
                tracing::error!(store = %what, cause = %e, "the store refuses cellar at start-up ({check})")
            }
            Ok(Err(e)) => {
                tracing::warn!(store = %what, cause = %e, "the store cannot be reached at start-up ({check})")
            }
            Err(_) => tracing::warn!(
                store = %what,
                "the store did not answer within store.timeout_secs at start-up ({check})"
            ),
        }
    });
}

/// Removes unfinished uploads (aborted multipart uploads, temporary files) at start and hourly.
fn spawn_staging_cleanup(store: std::sync::Arc<dyn cellar::store::Store>, max_age: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            match store.cleanup_staging(max_age).await {
                Ok(0) => tracing::debug!("no stale unfinished uploads"),
                Ok(n) => tracing::info!(removed = n, "removed stale unfinished uploads"),
                Err(e) => tracing::warn!(cause = %e, "cleanup of unfinished uploads failed"),
            }
        }
    });
}

/// Installs the SIGTERM/SIGINT handlers now (before the port opens, so an early signal is not
/// fatal) and returns a future that completes on the first of them. A second one ends the
/// process at once (Ctrl-C twice), without waiting for `shutdown_delay_secs` or the requests.
fn shutdown_signal(
    last_words: Arc<std::sync::OnceLock<Arc<cellar::gc::access::AccessLog>>>,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!(
            "shutdown signal received, finishing in-flight requests (a second one exits at once)"
        );
        tokio::spawn(async move {
            // The shell's convention, 128 + the signal's number: 143 for SIGTERM, 130 for SIGINT.
            let code = tokio::select! {
                _ = term.recv() => 143,
                _ = int.recv() => 130,
            };
            tracing::warn!("second shutdown signal: exiting now");
            // What was served since the last write still counts as recent use: written if
            // that takes at most two seconds.
            if let Some(access) = last_words.get() {
                let flushed = tokio::time::timeout(Duration::from_secs(2), access.flush()).await;
                if !matches!(flushed, Ok(Ok(()))) {
                    tracing::warn!("the last access records were not written");
                }
            }
            std::process::exit(code);
        });
    })
}
