//! Reloading on SIGHUP: tokens, signing keys, upstreams and narinfo cache settings change
//! without a restart (see [`crate::config::Config::needs_restart`] for what does not).
//!
//! A reload reads the config file and the `CELLAR_*` environment again, exactly as at start,
//! and the key files it names. Anything wrong (a syntax error, an invalid value, an
//! unreadable key file, a change that needs a restart) leaves the running state as it is and
//! is logged with its reason: a typo in the config must not lock builders out.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::{Config, ConfigError, LogFormat};
use crate::http::{AppState, ReloadError};
use crate::signing_keys::{self, KeyFileError};

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Keys(#[from] KeyFileError),
    #[error(transparent)]
    Apply(#[from] ReloadError),
}

/// Loads the configuration (`file`, then the environment) and its keys, and applies them.
/// `log_format` is the `--log-format` the server was started with, which wins over the file's
/// `log.format` as at start (a change there is no reason to refuse a reload).
pub fn reload(
    state: &AppState,
    file: Option<&Path>,
    log_format: Option<LogFormat>,
) -> Result<(), Error> {
    let mut config = Config::load(file)?;
    if let Some(f) = log_format {
        config.log.format = f;
    }
    warn_env_overrides(file);
    // Only existing keys: a reload never creates the generated key as a start would.
    let keys = signing_keys::load_existing(&config.signing)?;
    state.reload(config, keys)?;
    Ok(())
}

/// Logs each key of `file` that a `CELLAR_*` variable overrides: what the file says there has
/// no effect, at start or on reload (a key rotated in the file, while a unit's `Environment=`
/// still names the old one).
pub fn warn_env_overrides(file: Option<&Path>) {
    for (var, key) in file.map(Config::env_overrides).unwrap_or_default() {
        tracing::warn!(
            variable = %var,
            key = %key,
            "the environment overrides this key of the config file, whose value has no effect"
        );
    }
    if let Some(f) = file {
        let secrets = Config::secrets_others_can_read(f);
        if !secrets.is_empty() {
            tracing::warn!(
                path = %f.display(),
                keys = %secrets.join(", "),
                "the config file holds secrets and can be read by other users; `chmod o-r` it, \
                 or give the secrets in the environment"
            );
        }
    }
}

/// Installs the SIGHUP handler: from now on a SIGHUP is not the default action (which ends
/// the process), and one received before [`spawn_on_sighup`] starts reloading is kept for it.
/// Called first thing at start-up: a `systemctl reload` (a log rotation's, a deployment's)
/// during a slow start (the store opened, the AWS credential chain asked) must not end it.
pub fn sighup_handler() -> std::io::Result<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::hangup())
}

/// Reloads on every SIGHUP `hup` receives ([`sighup_handler`]) for as long as the runtime
/// lives.
pub fn spawn_on_sighup(
    state: AppState,
    file: Option<PathBuf>,
    log_format: Option<LogFormat>,
    mut hup: tokio::signal::unix::Signal,
) {
    tokio::spawn(async move {
        let mut said = false;
        while hup.recv().await.is_some() {
            if file.is_none() {
                // A file written next to a server started without `--config` is not read;
                // said once as a warning (a log rotation's SIGHUPs would repeat it).
                let text = "reloading a server started without --config: no config file is \
                            read, only the signing key files again; to change other settings, \
                            restart it (with --config FILE to use one)";
                if said {
                    tracing::info!("{text}");
                } else {
                    tracing::warn!("{text}");
                    said = true;
                }
            }
            let keys_before = signing_keys::public_keys_line(&state.live().signing_keys);
            match reload(&state, file.as_deref(), log_format) {
                Ok(()) => {
                    let (tokens, keys, keys_now) = {
                        let live = state.live();
                        let line = signing_keys::public_keys_line(&live.signing_keys);
                        (live.config.auth.tokens.len(), live.signing_keys.len(), line)
                    };
                    tracing::info!(tokens, keys, "configuration reloaded");
                    // The line for the clients' nix.conf, as the start prints it: a rotation
                    // is what changes it.
                    if keys_now != keys_before {
                        tracing::info!("signing keys changed; clients' nix.conf: trusted-public-keys = {keys_now}");
                    }
                    crate::systemd::status(&format!(
                        "serving; configuration reloaded ({tokens} tokens, {keys} signing keys)"
                    ));
                }
                Err(e) => {
                    // One line: a log line is one event (a TOML error spans several, with the
                    // line it points at), and systemd reads each line of a notification as an
                    // assignment.
                    let why = one_line(&e.to_string());
                    tracing::error!(
                        cause = %why,
                        "configuration not reloaded; the running configuration stays"
                    );
                    crate::systemd::status(&format!(
                        "serving; configuration NOT reloaded, the running one stays: {why}"
                    ));
                }
            }
        }
    });
}

/// `text` on one line: its lines, trimmed, joined with "; " (empty ones left out).
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
