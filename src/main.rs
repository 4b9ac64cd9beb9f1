//! The `cellar` command: serve, check-config, keygen.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use cellar::config::Config;
use cellar::nix::SecretKey;
use cellar::{keys, store, AppState};

#[derive(Parser)]
#[command(
    name = "cellar",
    version,
    about = "A self-hosted Nix binary cache server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn,aws=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve { config } => serve(config.as_deref()),
        Command::CheckConfig { config } => check_config(config.as_deref()),
        Command::Keygen { name, out } => keygen(&name, out.as_deref()),
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
    if !cfg.signing.key_files.is_empty() {
        for f in &cfg.signing.key_files {
            let k = keys::read_secret_key(f)?;
            println!("signing key {}: {}", f.display(), k.public());
        }
    }
    println!("configuration is valid");
    Ok(())
}

fn keygen(name: &str, out: Option<&Path>) -> anyhow::Result<()> {
    let key = SecretKey::generate(name).map_err(|e| anyhow::anyhow!("key name {name:?}: {e}"))?;
    match out {
        Some(path) => {
            keys::write_secret_key(path, &key)?;
            eprintln!("secret key written to {}", path.display());
            println!("{}", key.public());
        }
        None => {
            println!("{}", key.to_nix_format());
            eprintln!("public key: {}", key.public());
        }
    }
    Ok(())
}

fn serve(path: Option<&Path>) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let loaded = keys::load_signing_keys(&cfg.signing)?;
    if let Some(p) = &loaded.generated {
        eprintln!("cellar: created signing key {} on first start", p.display());
    }
    for k in &loaded.keys {
        // Printed, not logged: operators copy this line into their clients' nix.conf.
        eprintln!("cellar: trusted-public-keys = {}", k.public());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let store = store::from_config(&cfg)
            .await
            .with_context(|| format!("opening store ({:?})", cfg.store.kind))?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("config key `listen`: cannot bind {}", cfg.listen))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            store = %store.describe(),
            "cellar serving"
        );
        let state = AppState::new(cfg, store, loaded.keys);
        cellar::serve(listener, state, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received, finishing in-flight requests");
}
