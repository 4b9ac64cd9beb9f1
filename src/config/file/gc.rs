//! The `[gc]` section of the file format: retention, the grace period, the byte budget and how
//! servers record what they serve.

use std::time::Duration;

use serde::Deserialize;

use super::super::{ConfigError, GcConfig};
use super::secs;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(in crate::config) struct GcSection {
    keep_days: u64,
    grace_secs: u64,
    max_bytes: u64,
    access_flush_secs: u64,
    access_max_entries: usize,
}

impl Default for GcSection {
    fn default() -> Self {
        Self {
            keep_days: 30,
            grace_secs: 24 * 3600,
            max_bytes: 0,
            access_flush_secs: 300,
            access_max_entries: 1_000_000,
        }
    }
}

impl GcSection {
    pub(in crate::config) fn validate(self) -> Result<GcConfig, ConfigError> {
        // A day count this large overflows the clock arithmetic; no cache needs 1000 years.
        if self.keep_days > 365_000 {
            return Err(ConfigError::invalid(
                "gc.keep_days",
                "must be at most 365000",
            ));
        }
        if self.access_max_entries < 1000 {
            return Err(ConfigError::invalid(
                "gc.access_max_entries",
                "must be at least 1000 (a full set is written early)",
            ));
        }
        // A full set must stay a record collectors read (at most 256 MiB, ~65 bytes a line).
        if self.access_max_entries > 2_000_000 {
            return Err(ConfigError::invalid(
                "gc.access_max_entries",
                "must be at most 2000000 (a larger set writes records too large for \
                 `cellar gc` to read; lower gc.access_flush_secs instead)",
            ));
        }
        Ok(GcConfig {
            keep: Duration::from_secs(self.keep_days * 24 * 3600),
            grace: secs("gc.grace_secs", self.grace_secs, 0)?,
            max_bytes: (self.max_bytes > 0).then_some(self.max_bytes),
            access_flush_interval: secs("gc.access_flush_secs", self.access_flush_secs, 1)?,
            access_max_entries: self.access_max_entries,
        })
    }
}
