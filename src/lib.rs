//! cellar: a Nix binary cache server in front of an S3 bucket or a local directory.
//!
//! The modules, from the edge inwards:
//!
//! - [`http`]: the route table, [`AppState`] (with what a SIGHUP swaps, see [`reload`]), one
//!   module per endpoint family (nix-cache-info, narinfo, nar, log, listing, realisation and
//!   build-trace, health, status, metrics), each with its GET, HEAD and PUT; the upload
//!   address; closure-aware prefetch; the listener and its connection limits. [`auth`] decides
//!   who may read and upload.
//! - [`upload`]: verification of what clients upload (hashes, decompression, recompression,
//!   references) before anything becomes visible; [`import`] runs the same checks over a
//!   directory written by `nix copy --to file://`; [`mirror`] copies upstream paths in.
//! - [`cache`]: the narinfo and small-NAR memory caches, NARs seen missing, and the NAR disk
//!   cache in front of the store; [`upstream`]: pull-through from other binary caches, as a
//!   decorator over the store.
//! - [`gc`]: retention by access records and pins, closure-safe collection, `cellar verify`.
//! - [`store`]: the object [`store::Store`] trait, its S3 and local-directory implementations,
//!   and the one place that turns names into object keys.
//! - [`nix`]: pure protocol code, no I/O: names, nix-base32, hashes, narinfos, signatures,
//!   compression names. Everything above uses it.
//! - Beside them: [`config`] (plain typed data, imports none of the modules it configures),
//!   [`error`] (the one error-to-status mapping), [`signing_keys`] (key files on disk),
//!   [`backoff`] (pausing after failures), [`metrics`] (the Prometheus registry),
//!   [`telemetry`] (log output), [`systemd`] (readiness and watchdog), [`status`] (what
//!   `cellar status` shows).

pub mod auth;
pub mod backoff;
pub mod cache;
pub mod config;
pub mod error;
pub mod gc;
pub mod http;
pub mod import;
pub mod metrics;
pub mod mirror;
pub mod nix;
pub mod reload;
pub mod signing_keys;
pub mod status;
pub mod store;
mod sync;
pub mod systemd;
pub mod telemetry;
#[cfg(test)]
mod test_logs;
pub mod upload;
pub mod upstream;

pub use http::{app, metrics_app, serve, AppState};
