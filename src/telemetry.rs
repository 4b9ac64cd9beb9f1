//! Log output: where the `tracing` events of the server go, and in which form.
//!
//! Logs go to stderr (journald and `docker logs` take them from there), as text for people or
//! as one JSON object per line for log shippers (`log.format`, `--log-format`). Text carries
//! terminal colours only when stderr is a terminal: in a file or the journal, escape codes
//! are noise that breaks grep. `RUST_LOG` sets the levels.
//!
//! Each request runs in a `request` span carrying its id (see `http::request_id`), so every
//! line it logs says which request it belongs to: in text as the `request{id=…}:` prefix, in
//! JSON in the `spans` list.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Levels when `RUST_LOG` is unset: the server's own events, not every HTTP connection of
/// hyper or call of the AWS SDK.
const DEFAULT_FILTER: &str = "info,tower_http=warn,aws=warn";

/// Installs the global subscriber. Fails only if one is installed already.
pub fn init(format: LogFormat) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => fmt
            .json()
            // The event's fields at the top level (`message`, `status`, …), and every span
            // it is in, so the request id is there whichever span is innermost.
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    }
}
