//! cellar: a Nix binary cache server in front of an S3 bucket or a local directory.
//!
//! Layers, top to bottom: [`http`] (routes and handlers) → [`store`] (S3 / local objects);
//! [`nix`] holds the pure protocol code (names, narinfos, signatures) that both use.

pub mod auth;
pub mod cache;
pub mod config;
pub mod error;
pub mod gc;
pub mod http;
pub mod import;
pub mod nix;
pub mod signing_keys;
pub mod store;
pub mod upload;
pub mod upstream;

pub use http::{app, serve, AppState};
