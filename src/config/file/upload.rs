//! The `[upload]` section: re-encoding, trusted keys, and the bounds on each upload.

use serde::{Deserialize, Deserializer};

use super::{secs, trusted_key_list};
use crate::config::{ConfigError, Recompression, UploadConfig};
use crate::nix::{Compression, PublicKey};

fn opt_compression<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Compression>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct UploadSection {
    #[serde(deserialize_with = "opt_compression")]
    compression: Option<Compression>,
    compression_level: Option<i32>,
    #[serde(deserialize_with = "trusted_key_list")]
    trusted_keys: Vec<PublicKey>,
    staging_max_age_secs: u64,
    max_nar_bytes: u64,
    max_concurrent: usize,
    xz_memory_limit_bytes: u64,
    body_idle_timeout_secs: u64,
}

/// The most uploads `upload.max_concurrent` may let run at once.
const MAX_CONCURRENT_UPLOADS: usize = 128;

impl Default for UploadSection {
    fn default() -> Self {
        Self {
            compression: None,
            compression_level: None,
            trusted_keys: Vec::new(),
            staging_max_age_secs: 6 * 3600,
            max_nar_bytes: 32 << 30,
            max_concurrent: 8,
            // `xz -9` needs 65 MiB to decompress (a 64 MiB dictionary); leave room for
            // encoders with larger settings, but not for a 1.5 GiB dictionary.
            xz_memory_limit_bytes: 128 << 20,
            body_idle_timeout_secs: 60,
        }
    }
}

impl UploadSection {
    /// `s3`: the store is an S3 bucket, which bounds the size of one object.
    pub(super) fn validate(self, s3: bool) -> Result<UploadConfig, ConfigError> {
        let recompress = match self.compression {
            None => None,
            Some(c) => {
                let Some(levels) = c.encode_levels() else {
                    return Err(ConfigError::invalid(
                        "upload.compression",
                        format!("{c} is not supported for re-encoding; use zstd, xz or none"),
                    ));
                };
                if let Some(l) = self.compression_level {
                    if !levels.contains(&l) {
                        return Err(ConfigError::invalid(
                            "upload.compression_level",
                            format!("{l} is outside {levels:?} for {c}"),
                        ));
                    }
                }
                Some(Recompression {
                    compression: c,
                    level: self.compression_level,
                })
            }
        };
        if self.staging_max_age_secs < 60 {
            return Err(ConfigError::invalid(
                "upload.staging_max_age_secs",
                "must be at least 60 (uploads in progress would be removed)",
            ));
        }
        if self.max_nar_bytes < (1 << 20) {
            return Err(ConfigError::invalid(
                "upload.max_nar_bytes",
                "must be at least 1 MiB (1048576)",
            ));
        }
        if s3 && self.max_nar_bytes > crate::config::S3_MAX_OBJECT_BYTES {
            return Err(ConfigError::invalid(
                "upload.max_nar_bytes",
                format!(
                    "must be at most {} ({} GiB) with an S3 store: S3 takes at most 10000 parts \
                     of {} MiB in one object",
                    crate::config::S3_MAX_OBJECT_BYTES,
                    crate::config::S3_MAX_OBJECT_BYTES >> 30,
                    crate::config::S3_PART_BYTES >> 20
                ),
            ));
        }
        if self.max_concurrent == 0 {
            return Err(ConfigError::invalid(
                "upload.max_concurrent",
                "must be > 0 (0 would refuse every upload)",
            ));
        }
        if self.max_concurrent > MAX_CONCURRENT_UPLOADS {
            // Each upload holds up to two of the runtime's 512 blocking threads (its digest,
            // its read-back) for as long as its body takes; more would leave local-store
            // reads, which use them too, queued behind stalled uploads.
            return Err(ConfigError::invalid(
                "upload.max_concurrent",
                format!(
                    "must be at most {MAX_CONCURRENT_UPLOADS} (each upload holds blocking \
                     threads, of which there are 512)"
                ),
            ));
        }
        if self.xz_memory_limit_bytes < (65 << 20) {
            return Err(ConfigError::invalid(
                "upload.xz_memory_limit_bytes",
                "must be at least 65 MiB (68157440), what NARs compressed with `xz -9` need",
            ));
        }
        Ok(UploadConfig {
            recompress,
            trusted_keys: self.trusted_keys,
            staging_max_age: secs("upload.staging_max_age_secs", self.staging_max_age_secs, 60)?,
            max_nar_bytes: self.max_nar_bytes,
            max_concurrent: self.max_concurrent,
            xz_memory_limit_bytes: self.xz_memory_limit_bytes,
            body_idle_timeout: secs(
                "upload.body_idle_timeout_secs",
                self.body_idle_timeout_secs,
                1,
            )?,
        })
    }
}
