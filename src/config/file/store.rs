//! The `[store]` section: a local directory or an S3 bucket, in one flat section so that
//! `CELLAR_STORE__*` variables work for either.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{http_url, secs};
use crate::config::{
    ConfigError, LocalStoreConfig, NarRedirect, S3Credentials, S3StoreConfig, Secret, StoreBackend,
    StoreConfig,
};

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum StoreKind {
    Local,
    S3,
}

/// One flat section for both kinds (so `CELLAR_STORE__*` variables work for either); the
/// fields of the other kind are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct StoreSection {
    kind: StoreKind,
    path: PathBuf,
    bucket: Option<String>,
    endpoint: Option<String>,
    region: String,
    prefix: String,
    force_path_style: bool,
    /// Called `direct_reads` until it covered listings and small writes too: read under that
    /// name too, see `config::RENAMED`.
    direct_requests: bool,
    access_key_id: Option<String>,
    secret_access_key: Option<Secret>,
    timeout_secs: u64,
    connect_timeout_secs: u64,
    ready_timeout_secs: u64,
    redirect_nars: bool,
    public_endpoint: Option<String>,
    redirect_ttl_secs: u64,
    upload_part_concurrency: usize,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            kind: StoreKind::Local,
            path: PathBuf::from("./cellar-data"),
            bucket: None,
            endpoint: None,
            region: "us-east-1".into(),
            prefix: String::new(),
            force_path_style: true,
            direct_requests: true,
            access_key_id: None,
            secret_access_key: None,
            timeout_secs: 10,
            connect_timeout_secs: 3,
            ready_timeout_secs: 2,
            redirect_nars: false,
            public_endpoint: None,
            redirect_ttl_secs: 3600,
            upload_part_concurrency: 4,
        }
    }
}

impl StoreSection {
    pub(super) fn validate(self) -> Result<StoreConfig, ConfigError> {
        let timeout = secs("store.timeout_secs", self.timeout_secs, 1)?;
        let connect_timeout = secs("store.connect_timeout_secs", self.connect_timeout_secs, 1)?;
        let ready_timeout = secs("store.ready_timeout_secs", self.ready_timeout_secs, 1)?;
        let backend = match self.kind {
            StoreKind::Local => {
                if self.path.as_os_str().is_empty() {
                    return Err(ConfigError::invalid("store.path", "must not be empty"));
                }
                if self.redirect_nars {
                    let message = "needs store.kind = \"s3\": clients are sent to the bucket";
                    return Err(ConfigError::invalid("store.redirect_nars", message));
                }
                // Set for a bucket but left on the default kind (an environment without
                // CELLAR_STORE__KIND): it would serve and take uploads into a local
                // directory, which a container loses on restart.
                let s3_keys = [
                    ("store.bucket", self.bucket.is_some()),
                    ("store.endpoint", self.endpoint.is_some()),
                    ("store.access_key_id", self.access_key_id.is_some()),
                    ("store.secret_access_key", self.secret_access_key.is_some()),
                    ("store.public_endpoint", self.public_endpoint.is_some()),
                ];
                if let Some((key, _)) = s3_keys.iter().find(|(_, set)| *set) {
                    let message = format!(
                        "is \"local\" (the default when unset) while {key} is set, which only an S3 store \
                         uses: set store.kind = \"s3\" (CELLAR_STORE__KIND=s3), or remove {key}"
                    );
                    return Err(ConfigError::invalid("store.kind", message));
                }
                StoreBackend::Local(LocalStoreConfig { path: self.path })
            }
            StoreKind::S3 => StoreBackend::S3(self.validate_s3(connect_timeout)?),
        };
        Ok(StoreConfig {
            backend,
            timeout,
            ready_timeout,
        })
    }

    fn validate_s3(self, connect_timeout: Duration) -> Result<S3StoreConfig, ConfigError> {
        let bucket = self.bucket.unwrap_or_default();
        if bucket.is_empty() {
            let message = "is required when store.kind = \"s3\"";
            return Err(ConfigError::invalid("store.bucket", message));
        }
        if bucket.contains('/') || bucket.contains(char::is_whitespace) {
            let message = format!("{bucket:?} is not a bucket name");
            return Err(ConfigError::invalid("store.bucket", message));
        }
        if let Some(ep) = &self.endpoint {
            http_url("store.endpoint", ep)?;
        }
        if self.region.trim().is_empty() || self.region.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "store.region",
                format!(
                    "{:?} is not a region (empty, or holds whitespace)",
                    self.region
                ),
            ));
        }
        // Set but empty (a chart or compose file that always sets both) would sign with empty
        // credentials instead of using the instance's or the environment's: refused.
        for (key, v) in [
            ("store.access_key_id", self.access_key_id.as_deref()),
            (
                "store.secret_access_key",
                self.secret_access_key.as_ref().map(|s| s.0.as_str()),
            ),
        ] {
            if v.is_some_and(|v| v.trim().is_empty()) {
                return Err(ConfigError::invalid(
                    key,
                    "must not be empty (leave it unset to use the environment's or the \
                     instance's credentials)",
                ));
            }
        }
        let credentials = match (self.access_key_id, self.secret_access_key) {
            (Some(access_key_id), Some(secret_access_key)) => Some(S3Credentials {
                access_key_id,
                secret_access_key,
            }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::invalid(
                    "store.secret_access_key",
                    "store.access_key_id and store.secret_access_key must be set together",
                ))
            }
        };
        let redirect = if self.redirect_nars {
            if let Some(ep) = &self.public_endpoint {
                http_url("store.public_endpoint", ep)?;
            }
            let ttl = secs("store.redirect_ttl_secs", self.redirect_ttl_secs, 60)?;
            // SigV4 presigned URLs live at most a week.
            if ttl > Duration::from_secs(7 * 24 * 3600) {
                let message = "must be at most 604800 (a week, what S3 allows)";
                return Err(ConfigError::invalid("store.redirect_ttl_secs", message));
            }
            Some(NarRedirect {
                public_endpoint: self.public_endpoint,
                ttl,
            })
        } else {
            None
        };
        if !(1..=16).contains(&self.upload_part_concurrency) {
            let message = format!(
                "must be between 1 and 16, not {}",
                self.upload_part_concurrency
            );
            return Err(ConfigError::invalid(
                "store.upload_part_concurrency",
                message,
            ));
        }
        // `.` and `..` segments: the HTTP client resolves them in the URL it sends, so the
        // key read or written would not be the one asked for (nor the signature match). Dots
        // inside a segment (`v1..2/`) are a name like any other.
        if self.prefix.starts_with('/') || self.prefix.split('/').any(|s| s == "." || s == "..") {
            return Err(ConfigError::invalid(
                "store.prefix",
                format!("{:?} must be relative (like `cache/`)", self.prefix),
            ));
        }
        Ok(S3StoreConfig {
            bucket,
            endpoint: self.endpoint,
            region: self.region,
            prefix: normalise_prefix(&self.prefix),
            force_path_style: self.force_path_style,
            direct_requests: self.direct_requests,
            credentials,
            connect_timeout,
            redirect,
            upload_part_concurrency: self.upload_part_concurrency,
        })
    }
}

/// A key prefix ending in `/`, or empty.
pub(in crate::config) fn normalise_prefix(p: &str) -> String {
    let p = p.trim_end_matches('/');
    if p.is_empty() {
        String::new()
    } else {
        format!("{p}/")
    }
}
