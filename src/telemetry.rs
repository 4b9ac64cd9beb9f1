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

/// The levels `RUST_LOG` (its value, if set) asks for, or the defaults; and why it was not
/// taken, if it is set and does not parse (a typo such as `cellar=debugg`).
fn filter(rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        None => (EnvFilter::new(DEFAULT_FILTER), None),
        Some(v) => match EnvFilter::try_new(v) {
            Ok(f) => (f, None),
            Err(e) => (
                EnvFilter::new(DEFAULT_FILTER),
                Some(format!(
                    "RUST_LOG={v:?} is not a valid filter ({e}): logging at the default levels \
                     ({DEFAULT_FILTER})"
                )),
            ),
        },
    }
}

/// Installs the global subscriber. Fails only if one is installed already.
pub fn init(format: LogFormat) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, refused) = filter(rust_log.as_deref());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => fmt
            .json()
            // The event's fields at the top level (`message`, `status`, …), and every span
            // it is in, so the request id is there whichever span is innermost.
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
    if let Some(why) = refused {
        tracing::warn!("{why}");
    }
    installed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `RUST_LOG` that does not parse is said to be, and the defaults apply; one that
    /// parses is taken as it is; none (or an empty one) gives the defaults without a word.
    #[test]
    fn rust_log_is_taken_or_refused_aloud() {
        let default = EnvFilter::new(DEFAULT_FILTER).to_string();
        let (f, why) = filter(Some("cellar=debugg"));
        assert_eq!(f.to_string(), default);
        let why = why.expect("an invalid RUST_LOG is reported");
        assert!(why.contains("RUST_LOG=\"cellar=debugg\""), "{why}");
        assert!(why.contains(DEFAULT_FILTER), "{why}");
        let (f, why) = filter(Some("cellar=debug"));
        assert_eq!((f.to_string(), why), ("cellar=debug".to_owned(), None));
        for unset in [None, Some(""), Some("  ")] {
            let (f, why) = filter(unset);
            assert_eq!((f.to_string(), why), (default.clone(), None), "{unset:?}");
        }
    }
}
