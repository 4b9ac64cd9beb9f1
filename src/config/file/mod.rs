//! The file format, as serde reads it from TOML and `CELLAR_*` variables: every key with its
//! default, unknown keys refused. Each section's `validate` checks what serde cannot and turns
//! it into the typed section of [`super`], naming the key of anything wrong.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod store;
mod upload;

#[cfg(test)]
pub(super) use store::normalise_prefix;
use store::StoreSection;
use upload::UploadSection;

use super::{
    AuthConfig, CacheConfig, Config, ConfigError, LogConfig, LogFormat, Scope, SigningConfig,
    StoreBackend, TokenConfig, UpstreamConfig,
};
use crate::nix::PublicKey;

mod gc;

#[derive(Deserialize)]
#[serde(untagged)]
enum ListOrString {
    List(Vec<String>),
    One(String),
}

/// Accepts a TOML list or, for environment variables, one comma-separated string.
fn list_or_csv<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    csv_items(ListOrString::deserialize(d)?)
}

/// Like [`list_or_csv`], but an empty string is refused rather than read as an empty list:
/// for `signing.key_files`, where an empty list means "create a new key", and a variable set
/// from an unset one (`CELLAR_SIGNING__KEY_FILES=${KEY}` in compose) would quietly replace the
/// key every client trusts.
fn key_file_list<'de, D>(d: D) -> Result<Vec<PathBuf>, D::Error>
where
    D: Deserializer<'de>,
{
    not_blank(
        ListOrString::deserialize(d)?,
        "name the key files, or leave it out to use the key created on first start",
    )
}

/// Like [`key_file_list`], for `upload.trusted_keys`, where an empty list means "uploads need
/// no signature": a variable set from an unset one must not quietly drop the requirement.
pub(super) fn trusted_key_list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    not_blank(
        ListOrString::deserialize(d)?,
        "name the public keys uploads must be signed with, or leave it out to accept \
         unsigned uploads",
    )
}

/// `items`, refused if they are one string that is blank, or only separators
/// (`${KEY_A},${KEY_B}` with both unset).
fn not_blank<T, E>(items: ListOrString, instead: &str) -> Result<Vec<T>, E>
where
    T: std::str::FromStr,
    T::Err: fmt::Display,
    E: serde::de::Error,
{
    if matches!(&items, ListOrString::One(s) if s.split(',').all(|f| f.trim().is_empty())) {
        return Err(E::custom(format!(
            "is set but empty (from an unset variable?): {instead}"
        )));
    }
    csv_items(items)
}

fn csv_items<T, E>(items: ListOrString) -> Result<Vec<T>, E>
where
    T: std::str::FromStr,
    T::Err: fmt::Display,
    E: serde::de::Error,
{
    let items = match items {
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
        .map(|s| s.parse().map_err(E::custom))
        .collect()
}

/// The longest any `*_secs` key may say: 10 years. People write a huge number to mean "never";
/// timers and caches have limits of their own beyond that (moka's at 1000 years, an `Instant`
/// plus `u64::MAX` seconds overflows), and no timeout needs more.
pub(crate) const MAX_SECS: u64 = 10 * 365 * 24 * 3600;

/// The most connections or uploads at once a key may allow (a semaphore's permits).
pub(crate) const MAX_COUNT: usize = 1_000_000;

/// `key = N` seconds, which must be at least `min` and at most [`MAX_SECS`].
fn secs(key: &str, n: u64, min: u64) -> Result<Duration, ConfigError> {
    if n > MAX_SECS {
        return Err(ConfigError::invalid(
            key,
            format!("must be at most {MAX_SECS} (10 years)"),
        ));
    }
    if n < min {
        let message = if min == 1 {
            "must be > 0".to_owned()
        } else {
            format!("must be at least {min}")
        };
        return Err(ConfigError::invalid(key, message));
    }
    Ok(Duration::from_secs(n))
}

/// Checks `url` is an http(s) URL with a host that cellar can put paths after: no whitespace
/// (`"https://cache.example.org/ "` would send every request to `/%20/…`), no query or
/// fragment (the paths would land in it).
fn http_url(key: &str, url: &str) -> Result<(), ConfigError> {
    // Not repeated whole: an upstream's URL may hold a token (`user:token@host`).
    let shown = match url.rsplit_once('@') {
        Some((_, host)) => format!("…@{host}"),
        None => url.to_owned(),
    };
    let bad = |why: &str| Err(ConfigError::invalid(key, format!("{shown:?} {why}")));
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return bad("must start with http:// or https://");
    }
    if url.contains(char::is_whitespace) {
        return bad("holds whitespace");
    }
    if url.contains(['?', '#']) {
        return bad("must have no query or fragment: cellar appends each file's path to it");
    }
    // An http(s) URL that parses has a host.
    match reqwest::Url::parse(url) {
        Ok(_) => Ok(()),
        Err(e) => bad(&format!("is not a URL: {e}")),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ConfigFile {
    listen: SocketAddr,
    store_dir: String,
    priority: u32,
    want_mass_query: bool,
    shutdown_timeout_secs: u64,
    shutdown_delay_secs: u64,
    narinfo_max_age_secs: u64,
    not_found_max_age_secs: u64,
    header_read_timeout_secs: u64,
    idle_timeout_secs: u64,
    max_connections: usize,
    store: StoreSection,
    signing: SigningSection,
    auth: AuthSection,
    upload: UploadSection,
    cache: CacheSection,
    gc: gc::GcSection,
    upstreams: Vec<UpstreamEntry>,
    metrics_listen: Option<SocketAddr>,
    log: LogSection,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LogSection {
    format: LogFormat,
}

impl Default for ConfigFile {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            store_dir: "/nix/store".into(),
            priority: 40,
            want_mass_query: true,
            shutdown_timeout_secs: 10,
            shutdown_delay_secs: 0,
            narinfo_max_age_secs: 60,
            not_found_max_age_secs: 10,
            header_read_timeout_secs: 30,
            idle_timeout_secs: 300,
            max_connections: 1024,
            store: StoreSection::default(),
            signing: SigningSection::default(),
            auth: AuthSection::default(),
            upload: UploadSection::default(),
            cache: CacheSection::default(),
            gc: gc::GcSection::default(),
            upstreams: Vec::new(),
            metrics_listen: None,
            log: LogSection::default(),
        }
    }
}

impl ConfigFile {
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let sd = self.store_dir;
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
        // Nix 2.8 reads it as an `int` (`stoi`): more fails every command using the cache.
        if self.priority > i32::MAX as u32 {
            return Err(ConfigError::invalid(
                "priority",
                format!(
                    "{} is more than Nix reads (at most {})",
                    self.priority,
                    i32::MAX
                ),
            ));
        }
        let store = self.store.validate()?;
        let s3 = matches!(store.backend, StoreBackend::S3(_));
        Ok(Config {
            listen: self.listen,
            store_dir: sd,
            priority: self.priority,
            want_mass_query: self.want_mass_query,
            shutdown_timeout: secs("shutdown_timeout_secs", self.shutdown_timeout_secs, 1)?,
            shutdown_delay: secs("shutdown_delay_secs", self.shutdown_delay_secs, 0)?,
            narinfo_max_age: secs("narinfo_max_age_secs", self.narinfo_max_age_secs, 0)?,
            not_found_max_age: secs("not_found_max_age_secs", self.not_found_max_age_secs, 0)?,
            header_read_timeout: secs(
                "header_read_timeout_secs",
                self.header_read_timeout_secs,
                1,
            )?,
            idle_timeout: secs("idle_timeout_secs", self.idle_timeout_secs, 1)?,
            max_connections: match self.max_connections {
                0 => return Err(ConfigError::invalid("max_connections", "must be > 0")),
                n if n > MAX_COUNT => {
                    return Err(ConfigError::invalid(
                        "max_connections",
                        format!("must be at most {MAX_COUNT}"),
                    ))
                }
                n => n,
            },
            store,
            signing: self.signing.validate()?,
            auth: self.auth.validate()?,
            upload: self.upload.validate(s3)?,
            cache: self.cache.validate(s3)?,
            gc: self.gc.validate()?,
            upstreams: upstreams(self.upstreams)?,
            metrics_listen: match self.metrics_listen {
                Some(m) if overlap(m, self.listen) => {
                    return Err(ConfigError::invalid(
                        "metrics_listen",
                        format!(
                            "{m} takes the port `listen` ({}) serves; leave it unset to serve \
                             /metrics there",
                            self.listen
                        ),
                    ))
                }
                m => m,
            },
            log: LogConfig {
                format: self.log.format,
            },
        })
    }
}

/// Whether two listening addresses would take the same port: the same port (not 0, which is
/// two ports the kernel picks) on the same address, or on every address and one of them:
/// `0.0.0.0` takes it on every IPv4 address, `[::]` on every address of both families (Linux
/// binds it dual-stack by default).
fn overlap(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    let covers = |any: std::net::IpAddr, other: std::net::IpAddr| {
        any.is_unspecified() && (any.is_ipv6() || other.is_ipv4())
    };
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SigningSection {
    #[serde(deserialize_with = "key_file_list")]
    key_files: Vec<PathBuf>,
    generated_key_file: PathBuf,
    generated_key_name: Option<String>,
    keep_existing_signatures: bool,
}

impl Default for SigningSection {
    fn default() -> Self {
        Self {
            key_files: Vec::new(),
            generated_key_file: PathBuf::from("./cellar-key.sec"),
            generated_key_name: None,
            keep_existing_signatures: true,
        }
    }
}

/// Whether `path` is not a file but a secret key itself (`CELLAR_SIGNING__…="$(cat k.sec)"`).
fn is_a_secret_key(path: &std::path::Path) -> bool {
    !path.exists()
        && path
            .to_str()
            .is_some_and(|p| p.trim().parse::<crate::nix::SecretKey>().is_ok())
}

/// Refused without repeating it: it would end up in the log, or as a file name.
fn key_instead_of_file(key: &str) -> ConfigError {
    ConfigError::invalid(
        key,
        "holds a secret key, not the path of a file holding one (not repeated here; consider \
         it exposed)"
            .to_owned(),
    )
}

impl SigningSection {
    fn validate(self) -> Result<SigningConfig, ConfigError> {
        if self.generated_key_file.as_os_str().is_empty() {
            return Err(ConfigError::invalid(
                "signing.generated_key_file",
                "is set but empty (from an unset variable?): name the file, or leave it out"
                    .to_owned(),
            ));
        }
        if is_a_secret_key(&self.generated_key_file) {
            return Err(key_instead_of_file("signing.generated_key_file"));
        }
        if self.key_files.iter().any(|f| is_a_secret_key(f)) {
            return Err(key_instead_of_file("signing.key_files"));
        }
        if let Some(n) = &self.generated_key_name {
            if n.is_empty() || n.contains(':') || n.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    "signing.generated_key_name",
                    format!("{n:?} must be non-empty, without `:` or whitespace"),
                ));
            }
        }
        Ok(SigningConfig {
            key_files: self.key_files,
            generated_key_file: self.generated_key_file,
            generated_key_name: self.generated_key_name,
            keep_existing_signatures: self.keep_existing_signatures,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct CacheSection {
    narinfo_memory_bytes: u64,
    narinfo_ttl_secs: u64,
    narinfo_negative_ttl_secs: u64,
    nar_dir: Option<PathBuf>,
    nar_max_bytes: u64,
    nar_memory_bytes: u64,
    nar_memory_max_object_bytes: u64,
    prefetch_concurrency: usize,
    prefetch_nar_max_bytes: u64,
}

impl Default for CacheSection {
    fn default() -> Self {
        Self {
            narinfo_memory_bytes: 64 << 20,
            narinfo_ttl_secs: 600,
            narinfo_negative_ttl_secs: 15,
            nar_dir: None,
            nar_max_bytes: 10 << 30,
            nar_memory_bytes: 64 << 20,
            nar_memory_max_object_bytes: 64 << 10,
            prefetch_concurrency: 64,
            prefetch_nar_max_bytes: 256 << 20,
        }
    }
}

/// Where the NAR disk cache goes when `cache.nar_dir` is not set and the store is S3.
pub const DEFAULT_S3_NAR_DIR: &str = "./cellar-nar-cache";

impl CacheSection {
    fn validate(self, s3: bool) -> Result<CacheConfig, ConfigError> {
        // Unset: on for S3 (hot NARs from local disk, not the bucket), off for a local store
        // (its NARs are on local disk already). An empty value (what an environment variable
        // can say) disables it.
        let nar_dir = match self.nar_dir {
            None if s3 => Some(PathBuf::from(DEFAULT_S3_NAR_DIR)),
            d => d.filter(|p| !p.as_os_str().is_empty()),
        };
        if nar_dir.is_some() && self.nar_max_bytes < (64 << 20) {
            return Err(ConfigError::invalid(
                "cache.nar_max_bytes",
                "must be at least 64 MiB when cache.nar_dir is set",
            ));
        }
        if self.nar_memory_max_object_bytes > (16 << 20) {
            return Err(ConfigError::invalid(
                "cache.nar_memory_max_object_bytes",
                "must be at most 16 MiB: larger NARs belong in the disk cache",
            ));
        }
        if self.nar_memory_bytes > 0 && self.nar_memory_max_object_bytes > self.nar_memory_bytes {
            return Err(ConfigError::invalid(
                "cache.nar_memory_max_object_bytes",
                "must not exceed cache.nar_memory_bytes",
            ));
        }
        if self.prefetch_concurrency > 1024 {
            return Err(ConfigError::invalid(
                "cache.prefetch_concurrency",
                "must be at most 1024",
            ));
        }
        Ok(CacheConfig {
            nar_memory_bytes: self.nar_memory_bytes,
            nar_memory_max_object: self.nar_memory_max_object_bytes,
            prefetch_concurrency: self.prefetch_concurrency,
            prefetch_nar_max_bytes: self.prefetch_nar_max_bytes,
            narinfo_memory_bytes: self.narinfo_memory_bytes,
            narinfo_ttl: secs("cache.narinfo_ttl_secs", self.narinfo_ttl_secs, 0)?,
            narinfo_negative_ttl: secs(
                "cache.narinfo_negative_ttl_secs",
                self.narinfo_negative_ttl_secs,
                0,
            )?,
            nar_dir,
            nar_max_bytes: self.nar_max_bytes,
        })
    }
}

/// One `[[auth.tokens]]` entry. Only the token's hash is configured (`cellar token new`
/// prints both).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    hash: String,
    scopes: Vec<Scope>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AuthSection {
    private: bool,
    tokens: Vec<TokenEntry>,
}

impl AuthSection {
    fn validate(self) -> Result<AuthConfig, ConfigError> {
        let mut tokens = Vec::with_capacity(self.tokens.len());
        for (i, t) in self.tokens.into_iter().enumerate() {
            let hash = t.hash.parse().map_err(|why| {
                ConfigError::invalid(
                    format!("auth.tokens[{i}].hash"),
                    format!("token {:?}: {why}", t.name),
                )
            })?;
            // `echo -n "$TOKEN" | sha256sum` with the variable unset: any client sending an
            // empty password would hold the token.
            if hash == crate::config::TokenHash::of("") {
                return Err(ConfigError::invalid(
                    format!("auth.tokens[{i}].hash"),
                    format!(
                        "token {:?} has the hash of the empty token (hashed from an empty \
                         variable?); make a token with `cellar token new`",
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
            // Two entries of one hash are one token: the last one's scopes would decide, and
            // deleting the other to revoke it would leave it working.
            if let Some(first) = tokens.iter().position(|o: &TokenConfig| o.hash == hash) {
                return Err(ConfigError::invalid(
                    format!("auth.tokens[{i}].hash"),
                    format!(
                        "token {:?} has the hash of auth.tokens[{first}] ({:?}): one entry per token",
                        t.name, tokens[first].name
                    ),
                ));
            }
            tokens.push(TokenConfig {
                name: t.name,
                hash,
                scopes: t.scopes,
            });
        }
        if self.private && tokens.is_empty() {
            return Err(ConfigError::invalid(
                "auth.private",
                "is true but auth.tokens is empty: nobody could read",
            ));
        }
        Ok(AuthConfig {
            private: self.private,
            tokens,
        })
    }
}

/// One `[[upstreams]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamEntry {
    url: String,
    #[serde(deserialize_with = "list_or_csv")]
    public_keys: Vec<PublicKey>,
    #[serde(default = "default_upstream_timeout")]
    timeout_secs: u64,
    #[serde(default)]
    mirror: bool,
}

fn default_upstream_timeout() -> u64 {
    5
}

/// The `[[upstreams]]`, each validated, and no URL twice: the second entry of a URL would
/// only ask the same cache again after each miss (and its keys or timeout would not be the
/// ones used).
fn upstreams(entries: Vec<UpstreamEntry>) -> Result<Vec<UpstreamConfig>, ConfigError> {
    let mut out: Vec<UpstreamConfig> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let u = entry.validate(i)?;
        if let Some(first) = out.iter().position(|o| same_url(&o.url, &u.url)) {
            return Err(ConfigError::invalid(
                format!("upstreams[{i}].url"),
                format!(
                    "upstreams[{first}] has the same URL; give each upstream once (its \
                     public_keys may list several keys)"
                ),
            ));
        }
        out.push(u);
    }
    Ok(out)
}

/// Whether two upstream URLs name the same cache: as parsed (the host's case, a default port
/// and a trailing `/` aside).
fn same_url(a: &str, b: &str) -> bool {
    let norm = |u: &str| {
        reqwest::Url::parse(u)
            .map(|p| p.as_str().trim_end_matches('/').to_owned())
            .unwrap_or_else(|_| u.trim_end_matches('/').to_owned())
    };
    norm(a) == norm(b)
}

impl UpstreamEntry {
    fn validate(self, i: usize) -> Result<UpstreamConfig, ConfigError> {
        let key = |k: &str| format!("upstreams[{i}].{k}");
        http_url(&key("url"), &self.url)?;
        if self.public_keys.is_empty() {
            return Err(ConfigError::invalid(
                key("public_keys"),
                "at least one key is needed to accept this upstream's narinfos",
            ));
        }
        Ok(UpstreamConfig {
            url: self.url.trim_end_matches('/').to_owned(),
            public_keys: self.public_keys,
            timeout: secs(&key("timeout_secs"), self.timeout_secs, 1)?,
            mirror: self.mirror,
        })
    }
}
