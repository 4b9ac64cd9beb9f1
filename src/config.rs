//! Configuration: a TOML file (documented key by key in `config/cellar.toml`) overridden by
//! `CELLAR_<KEY>` environment variables, with `__` between nested keys
//! (`CELLAR_STORE__BUCKET=nix-cache`). Unknown keys are errors, and [`Config::validate`] checks
//! everything that can be checked before the server starts, naming the offending key.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format as _, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer};
use thiserror::Error;

use crate::nix::{Compression, PublicKey};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(Box<figment::Error>),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A string that is never printed (credentials).
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Accepts a TOML list or, for environment variables, one comma-separated string.
pub(crate) fn list_or_csv<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        One(String),
    }
    let items = match ListOrString::deserialize(d)? {
        ListOrString::List(v) => v,
        ListOrString::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    items
        .into_iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The Nix store directory the cache is for.
    pub store_dir: String,
    /// `Priority:` in nix-cache-info (lower is preferred by clients).
    pub priority: u32,
    /// `WantMassQuery:` in nix-cache-info.
    pub want_mass_query: bool,
    /// How long in-flight requests may run after SIGTERM/SIGINT before the server exits.
    pub shutdown_timeout_secs: u64,
    /// Cache-Control max-age for narinfos (NARs are immutable).
    pub narinfo_max_age_secs: u64,
    /// Cache-Control max-age for 404 answers.
    pub not_found_max_age_secs: u64,
    pub store: StoreConfig,
    pub signing: SigningConfig,
    pub auth: AuthConfig,
    pub upload: UploadConfig,
    pub cache: CacheConfig,
    /// Upstream caches asked, in order, on a narinfo miss (pull-through).
    pub upstreams: Vec<crate::upstream::UpstreamConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            store_dir: "/nix/store".into(),
            priority: 40,
            want_mass_query: true,
            shutdown_timeout_secs: 10,
            narinfo_max_age_secs: 60,
            not_found_max_age_secs: 10,
            store: StoreConfig::default(),
            signing: SigningConfig::default(),
            auth: AuthConfig::default(),
            upload: UploadConfig::default(),
            cache: CacheConfig::default(),
            upstreams: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Local,
    S3,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `local` (a directory as written by `nix copy --to file://DIR`) or `s3`.
    pub kind: StoreKind,
    /// local: the directory.
    pub path: PathBuf,
    /// s3: bucket name.
    pub bucket: Option<String>,
    /// s3: endpoint URL (e.g. `http://127.0.0.1:3900` for Garage, `https://minio.example.org`).
    /// Unset: AWS's own endpoint for the region (or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// s3: region (Garage's default is `garage`-configured `s3_region`, MinIO accepts any).
    pub region: String,
    /// s3: key prefix inside the bucket, e.g. `cache/` (a trailing `/` is added if missing).
    pub prefix: String,
    /// s3: path-style addressing (`endpoint/bucket/key`); MinIO and Garage need it.
    pub force_path_style: bool,
    /// s3: credentials; unset → the standard AWS chain (AWS_ACCESS_KEY_ID/…, profile, …).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// Seconds to wait for a store to start answering a request (not for a whole NAR body).
    pub timeout_secs: u64,
    /// Seconds for the connect phase of a store request.
    pub connect_timeout_secs: u64,
    /// Seconds `/readyz` waits for the store.
    pub ready_timeout_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::Local,
            path: PathBuf::from("./cellar-data"),
            bucket: None,
            endpoint: None,
            region: "us-east-1".into(),
            prefix: String::new(),
            force_path_style: true,
            access_key_id: None,
            secret_access_key: None,
            timeout_secs: 10,
            connect_timeout_secs: 3,
            ready_timeout_secs: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// Secret key files in Nix's format; every key signs every narinfo (rotation).
    /// Empty: use `generated_key_file`, creating it on first start.
    #[serde(deserialize_with = "list_or_csv")]
    pub key_files: Vec<PathBuf>,
    /// Where the key created on first start lives when `key_files` is empty.
    pub generated_key_file: PathBuf,
    /// Name of that key (default: `<hostname>-1`).
    pub generated_key_name: Option<String>,
    /// Keep the `Sig:` lines a narinfo already has in the store (true) or serve only ours.
    pub keep_existing_signatures: bool,
}

impl Default for SigningConfig {
    fn default() -> Self {
        Self {
            key_files: Vec::new(),
            generated_key_file: PathBuf::from("./cellar-key.sec"),
            generated_key_name: None,
            keep_existing_signatures: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Memory for signed, rendered narinfos (0 disables the memory cache).
    pub narinfo_memory_bytes: u64,
    /// How long a narinfo found in the store is served from memory.
    pub narinfo_ttl_secs: u64,
    /// How long a miss is remembered (uploads through this server refresh at once).
    pub narinfo_negative_ttl_secs: u64,
    /// Directory for the NAR disk cache; unset or empty disables it.
    pub nar_dir: Option<PathBuf>,
    /// Byte budget of the NAR disk cache (least recently used NARs go first).
    pub nar_max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            narinfo_memory_bytes: 64 << 20,
            narinfo_ttl_secs: 600,
            narinfo_negative_ttl_secs: 15,
            nar_dir: None,
            nar_max_bytes: 10 << 30,
        }
    }
}

impl CacheConfig {
    pub fn nar_dir(&self) -> Option<&Path> {
        self.nar_dir
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
}

/// One access token. Only its hash is configured (`cellar token new` prints both).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A label for logs (who uses the token).
    pub name: String,
    /// `sha256:<hex>` of the token.
    pub hash: String,
    /// `read` and/or `write`; `write` implies `read`.
    pub scopes: Vec<Scope>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require a token with the `read` scope for reads too (not for /healthz, /readyz).
    pub private: bool,
    /// Tokens; uploads need one with the `write` scope.
    pub tokens: Vec<TokenConfig>,
}

fn opt_compression<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Compression>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadConfig {
    /// Re-encode uploaded NARs with this compression (`zstd`, `xz`, `none`); empty keeps
    /// what the client sent.
    #[serde(deserialize_with = "opt_compression")]
    pub compression: Option<Compression>,
    /// Level for `compression` (zstd 1-19, default 3; xz 0-9, default 6).
    pub compression_level: Option<i32>,
    /// If set, a narinfo upload must carry a signature by one of these public keys.
    #[serde(deserialize_with = "list_or_csv")]
    pub trusted_keys: Vec<PublicKey>,
    /// Unfinished uploads older than this are removed from the store.
    pub staging_max_age_secs: u64,
}

impl Default for UploadConfig {
    fn default() -> Self {
        Self {
            compression: None,
            compression_level: None,
            trusted_keys: Vec::new(),
            staging_max_age_secs: 6 * 3600,
        }
    }
}

impl Config {
    /// Loads the defaults, then `file` (if given), then `CELLAR_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::new();
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ConfigError::invalid(
                    "--config",
                    format!("{} is not a readable file", f.display()),
                ));
            }
            fig = fig.merge(Toml::file_exact(f));
        }
        Self::from_figment(fig.merge(Env::prefixed("CELLAR_").split("__")))
    }

    pub fn from_figment(fig: Figment) -> Result<Self, ConfigError> {
        let cfg: Self = fig.extract().map_err(|e| ConfigError::Load(Box::new(e)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sd = &self.store_dir;
        if !sd.starts_with('/')
            || sd.len() < 2
            || sd.ends_with('/')
            || sd.contains(char::is_whitespace)
        {
            return Err(ConfigError::invalid(
                "store_dir",
                format!("{sd:?} must be an absolute path without a trailing `/`"),
            ));
        }
        if self.shutdown_timeout_secs == 0 {
            return Err(ConfigError::invalid("shutdown_timeout_secs", "must be > 0"));
        }
        let s = &self.store;
        for (key, v) in [
            ("store.timeout_secs", s.timeout_secs),
            ("store.connect_timeout_secs", s.connect_timeout_secs),
            ("store.ready_timeout_secs", s.ready_timeout_secs),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be > 0"));
            }
        }
        match s.kind {
            StoreKind::Local => {
                if s.path.as_os_str().is_empty() {
                    return Err(ConfigError::invalid("store.path", "must not be empty"));
                }
            }
            StoreKind::S3 => {
                match s.bucket.as_deref() {
                    None | Some("") => {
                        return Err(ConfigError::invalid(
                            "store.bucket",
                            "is required when store.kind = \"s3\"",
                        ));
                    }
                    Some(b) if b.contains('/') || b.contains(char::is_whitespace) => {
                        return Err(ConfigError::invalid(
                            "store.bucket",
                            format!("{b:?} is not a bucket name"),
                        ));
                    }
                    _ => {}
                }
                if let Some(ep) = &s.endpoint {
                    if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                        return Err(ConfigError::invalid(
                            "store.endpoint",
                            format!("{ep:?} must start with http:// or https://"),
                        ));
                    }
                }
                if s.region.is_empty() {
                    return Err(ConfigError::invalid("store.region", "must not be empty"));
                }
                if s.access_key_id.is_some() != s.secret_access_key.is_some() {
                    return Err(ConfigError::invalid(
                        "store.secret_access_key",
                        "store.access_key_id and store.secret_access_key must be set together",
                    ));
                }
                if s.prefix.starts_with('/') || s.prefix.contains("..") {
                    return Err(ConfigError::invalid(
                        "store.prefix",
                        format!("{:?} must be relative (like `cache/`)", s.prefix),
                    ));
                }
            }
        }
        for (i, t) in self.auth.tokens.iter().enumerate() {
            let key = format!("auth.tokens[{i}].hash");
            let ok = t
                .hash
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()));
            if !ok {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "token {:?}: expected sha256:<64 hex digits> (see `cellar token new`)",
                        t.name
                    ),
                ));
            }
            if t.scopes.is_empty() {
                return Err(ConfigError::invalid(
                    format!("auth.tokens[{i}].scopes"),
                    format!("token {:?} has no scope", t.name),
                ));
            }
        }
        if self.auth.private && self.auth.tokens.is_empty() {
            return Err(ConfigError::invalid(
                "auth.private",
                "is true but auth.tokens is empty: nobody could read",
            ));
        }
        if let Some(c) = self.upload.compression {
            if !crate::upload::digest::can_encode(c) {
                return Err(ConfigError::invalid(
                    "upload.compression",
                    format!("{c} is not supported for re-encoding; use zstd, xz or none"),
                ));
            }
            let range = match c {
                Compression::Zstd => 1..=19,
                Compression::Xz => 0..=9,
                _ => 0..=0,
            };
            if let Some(l) = self.upload.compression_level {
                if !range.contains(&l) {
                    return Err(ConfigError::invalid(
                        "upload.compression_level",
                        format!("{l} is outside {range:?} for {c}"),
                    ));
                }
            }
        }
        if self.upload.staging_max_age_secs < 60 {
            return Err(ConfigError::invalid(
                "upload.staging_max_age_secs",
                "must be at least 60 (uploads in progress would be removed)",
            ));
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            u.validate(i)?;
        }
        if self.cache.nar_dir().is_some() && self.cache.nar_max_bytes < (64 << 20) {
            return Err(ConfigError::invalid(
                "cache.nar_max_bytes",
                "must be at least 64 MiB when cache.nar_dir is set",
            ));
        }
        if let Some(n) = &self.signing.generated_key_name {
            if n.is_empty() || n.contains(':') || n.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    "signing.generated_key_name",
                    format!("{n:?} must be non-empty, without `:` or whitespace"),
                ));
            }
        }
        Ok(())
    }

    /// The S3 key prefix, normalised to end in `/` (or empty).
    pub fn s3_prefix(&self) -> String {
        let p = self.store.prefix.trim_end_matches('/');
        if p.is_empty() {
            String::new()
        } else {
            format!("{p}/")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(s: &str) -> Result<Config, ConfigError> {
        Config::from_figment(Figment::new().merge(Toml::string(s)))
    }

    #[test]
    fn defaults_are_valid() {
        let c = from_toml("").unwrap();
        assert_eq!(c.store.kind, StoreKind::Local);
        assert_eq!(c.store.path, PathBuf::from("./cellar-data"));
        assert_eq!(c.listen.port(), 8080);
    }

    #[test]
    fn shipped_config_file_parses() {
        let text = include_str!("../config/cellar.toml");
        let c = from_toml(text).unwrap();
        assert_eq!(c.store_dir, "/nix/store");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = from_toml("lisen = \"127.0.0.1:1\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lisen"), "{e}");
        let e = from_toml("[store]\nbukket = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bukket"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = from_toml("[store]\nkind = \"s3\"").unwrap_err().to_string();
        assert!(e.contains("store.bucket"), "{e}");
        let e = from_toml("[store]\nkind = \"ftp\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.kind") || e.contains("kind"), "{e}");
        let e = from_toml("store_dir = \"nix/store\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("store_dir"), "{e}");
        let e = from_toml("[store]\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"localhost:9000\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.endpoint"), "{e}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API
    fn env_overrides_with_nesting_and_csv_lists() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "listen = \"127.0.0.1:9000\"\n[store]\nkind = \"local\"\n",
            )?;
            jail.set_env("CELLAR_STORE__KIND", "s3");
            jail.set_env("CELLAR_STORE__BUCKET", "nix-cache");
            jail.set_env("CELLAR_SIGNING__KEY_FILES", "a.sec,b.sec");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.listen.port(), 9000);
            assert_eq!(c.store.kind, StoreKind::S3);
            assert_eq!(c.store.bucket.as_deref(), Some("nix-cache"));
            assert_eq!(
                c.signing.key_files,
                vec![PathBuf::from("a.sec"), PathBuf::from("b.sec")]
            );
            jail.set_env("CELLAR_STORE__BUKKET", "x");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("bukket"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn upload_and_auth_sections() {
        let c = from_toml(
            "[upload]\ncompression = \"zstd\"\ncompression_level = 19\n\
             trusted_keys = [\"test-1:/+L0Q/jKhm6dU1WL+m92avPr/xAL77BfJ3lwg3EXluU=\"]\n\
             [[auth.tokens]]\nname = \"ci\"\nhash = \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\nscopes = [\"write\"]\n",
        )
        .unwrap();
        assert_eq!(c.upload.compression, Some(Compression::Zstd));
        assert_eq!(c.upload.trusted_keys.len(), 1);
        assert_eq!(c.auth.tokens[0].scopes, vec![Scope::Write]);
        for (bad, key) in [
            ("[upload]\ncompression = \"br\"", "upload.compression"),
            (
                "[upload]\ncompression = \"zstd\"\ncompression_level = 40",
                "upload.compression_level",
            ),
            ("[upload]\ntrusted_keys = [\"nope\"]", "trusted_keys"),
            ("[auth]\nprivate = true", "auth.private"),
            (
                "[[auth.tokens]]\nname = \"x\"\nhash = \"abc\"\nscopes = [\"read\"]",
                "auth.tokens[0].hash",
            ),
            (
                "[[auth.tokens]]\nname = \"x\"\nhash = \"abc\"\nscopes = [\"admin\"]",
                "admin",
            ),
        ] {
            let e = from_toml(bad).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn upstreams_and_cache() {
        let c = from_toml(
            "[cache]\nnar_dir = \"/tmp/x\"\n[[upstreams]]\nurl = \"https://cache.nixos.org\"\n\
             public_keys = [\"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"]\n",
        )
        .unwrap();
        assert_eq!(c.upstreams.len(), 1);
        assert_eq!(c.upstreams[0].timeout_secs, 5);
        assert!(c.cache.nar_dir().is_some());
        for (bad, key) in [
            (
                "[[upstreams]]\nurl = \"ftp://x\"\npublic_keys = [\"a:AAAA\"]",
                "public",
            ),
            (
                "[[upstreams]]\nurl = \"ftp://x\"\npublic_keys = []",
                "upstreams[0].url",
            ),
            (
                "[[upstreams]]\nurl = \"http://x\"\npublic_keys = []",
                "upstreams[0].public_keys",
            ),
            (
                "[cache]\nnar_dir = \"/x\"\nnar_max_bytes = 5",
                "cache.nar_max_bytes",
            ),
        ] {
            let e = from_toml(bad).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let c = from_toml(
            "[store]\nkind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"AK\"\nsecret_access_key = \"SUPERSECRET\"",
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("SUPERSECRET"));
    }

    #[test]
    fn prefix_normalisation() {
        let mut c = Config::default();
        assert_eq!(c.s3_prefix(), "");
        c.store.prefix = "cache".into();
        assert_eq!(c.s3_prefix(), "cache/");
        c.store.prefix = "cache/".into();
        assert_eq!(c.s3_prefix(), "cache/");
    }
}
