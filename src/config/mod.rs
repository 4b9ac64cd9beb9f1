//! Configuration: a TOML file (documented key by key in `config/cellar.toml`) overridden by
//! `CELLAR_<KEY>` environment variables, with `__` between nested keys
//! (`CELLAR_STORE__BUCKET=nix-cache`).
//!
//! Two layers. [`file`] is the file format as serde reads it (unknown keys are errors, every key
//! has a default). Each of its sections then validates itself into the typed data below, once,
//! at start-up: durations are [`Duration`]s, token hashes are bytes, the store is an enum whose
//! variants own their fields, and every error names the offending key. The rest of the server
//! only ever sees the typed data, and each module gets its own section.
//!
//! This module is plain data: it imports nothing from the modules it configures.

mod file;
mod nar_dir;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Env, Format as _, Toml};
use figment::Figment;
use sha2::Digest as _;
use thiserror::Error;

use crate::nix::{Compression, PublicKey};

/// The part size of cellar's multipart uploads to S3.
pub const S3_PART_BYTES: usize = 8 << 20;

/// The largest object cellar can write to S3: 10 000 parts (S3's limit) of [`S3_PART_BYTES`].
pub const S3_MAX_OBJECT_BYTES: u64 = 10_000 * S3_PART_BYTES as u64;

#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file or environment could not be read as the file format (syntax, types, unknown
    /// keys); figment's message names the key.
    #[error("{}", shown(.0))]
    Load(Box<figment::Error>),
    /// A value that does not hold (checked once read); `from` says where it came from, as
    /// [`ConfigError::Load`]'s do (` (in FILE)`), or is empty.
    #[error("config key `{key}`{from}: {message}")]
    Invalid {
        key: String,
        message: String,
        from: String,
    },
    /// The file `--config` names is not there, or not a file.
    #[error("--config {}: not a readable file", .0.display())]
    NoFile(std::path::PathBuf),
}

/// figment's errors (one a line) as cellar's others read, ``config key `store.bukket` (in
/// FILE): …``, without what they may quote of a secret: a value of the wrong type under
/// `secret_access_key` is not repeated, and a syntax error's excerpt of the file (`2 | key =
/// "…`, which may be a secret's line) is left out; its line and column stay.
fn shown(e: &figment::Error) -> String {
    e.clone()
        .into_iter()
        .map(|e| shown_one(&e))
        .collect::<Vec<_>>()
        .join("\n")
}

fn shown_one(e: &figment::Error) -> String {
    use figment::error::Kind;
    // As cellar's own errors name keys: `upstreams[0].url`.
    let key = e.path.iter().fold(String::new(), |mut key, k| {
        match k.parse::<usize>() {
            Ok(i) => key.push_str(&format!("[{i}]")),
            Err(_) if key.is_empty() => key.push_str(k),
            Err(_) => key.push_str(&format!(".{k}")),
        }
        key
    });
    let from = match &e.metadata {
        Some(m) => source(m, &e.path),
        None => String::new(),
    };
    // A value is named by its type, never quoted: a string may be a URL with a token in it.
    let found = |a: &figment::error::Actual| match a {
        figment::error::Actual::Str(_) => "a string".to_owned(),
        other => other.to_string(),
    };
    let what = match &e.kind {
        _ if key.ends_with("secret_access_key") => {
            "not a valid value (not shown: it is a secret)".to_owned()
        }
        Kind::UnknownField(_, known) => format!("no such key; known here: {}", known.join(", ")),
        Kind::UnknownVariant(found, known) => {
            format!("`{found}` is not one of {}", known.join(", "))
        }
        Kind::InvalidType(a, expected) | Kind::InvalidValue(a, expected) => {
            format!("expected {expected}, found {}", found(a))
        }
        Kind::MissingField(field) => format!("`{field}` is missing"),
        Kind::Message(m) => without_excerpt(m),
        other => other.to_string(),
    };
    if key.is_empty() {
        format!("configuration{from}: {what}")
    } else {
        format!("config key `{key}`{from}: {what}")
    }
}

/// Where a value at `path` (its keys, without array indexes) came from, for an error message:
/// ` (in FILE)`, ` (from CELLAR_…)`.
fn source(m: &figment::Metadata, path: &[String]) -> String {
    match &m.source {
        Some(figment::Source::File(p)) => format!(" (in {})", p.display()),
        // The keys taken as text from their variables ([`with_env`]).
        Some(figment::Source::Code(_)) => {
            format!(" (from CELLAR_{})", path.join("__").to_ascii_uppercase())
        }
        _ => format!(" (from {})", m.name),
    }
}

/// [`source`] of the value at `key` (`auth.tokens[0].hash`) in `fig`; empty if it is not
/// found there.
fn source_of(fig: &Figment, key: &str) -> String {
    let found = || {
        let mut v = fig.find_value("").ok()?;
        let mut path = Vec::new();
        for part in key.split('.') {
            let (name, index) = match part.split_once('[') {
                Some((n, i)) => (n, Some(i.strip_suffix(']')?.parse::<usize>().ok()?)),
                None => (part, None),
            };
            v = v.into_dict()?.remove(name)?;
            path.push(name.to_owned());
            if let Some(i) = index {
                v = match v {
                    figment::value::Value::Array(_, items) => items.into_iter().nth(i)?,
                    _ => return None,
                };
            }
        }
        Some(source(fig.get_metadata(v.tag())?, &path))
    };
    found().unwrap_or_default()
}

/// `message` without the lines quoting the file (`2 | key = "…`).
fn without_excerpt(message: &str) -> String {
    message
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start()
                .starts_with('|')
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
            from: String::new(),
        }
    }

    /// `self`, an [`ConfigError::Invalid`] saying where its value came from in `fig`.
    fn located(self, fig: &Figment) -> Self {
        match self {
            Self::Invalid { key, message, from } if from.is_empty() => Self::Invalid {
                from: source_of(fig, &key),
                key,
                message,
            },
            e => e,
        }
    }
}

/// A string that is never printed (credentials).
#[derive(Clone, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The Nix store directory the cache is for (absolute, no trailing `/`).
    pub store_dir: String,
    /// `Priority:` in nix-cache-info (lower is preferred by clients).
    pub priority: u32,
    /// `WantMassQuery:` in nix-cache-info.
    pub want_mass_query: bool,
    /// How long in-flight requests may run after SIGTERM/SIGINT before the server exits.
    pub shutdown_timeout: Duration,
    /// After SIGTERM/SIGINT, how long the server still accepts connections while `/readyz`
    /// answers 503, before it stops accepting (load balancers that probe see it go first).
    pub shutdown_delay: Duration,
    /// Cache-Control max-age for narinfos (NARs are immutable).
    pub narinfo_max_age: Duration,
    /// Cache-Control max-age for 404 answers.
    pub not_found_max_age: Duration,
    /// How long a connection may take to send a request's headers (also the idle limit of a
    /// kept-alive connection between requests).
    pub header_read_timeout: Duration,
    /// How long a connection may go without a byte sent or received before it is closed (a
    /// client that stopped reading an answer).
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept backlog.
    pub max_connections: usize,
    pub store: StoreConfig,
    pub signing: SigningConfig,
    pub auth: AuthConfig,
    pub upload: UploadConfig,
    pub cache: CacheConfig,
    pub gc: GcConfig,
    /// Upstream caches asked, in order, on a narinfo miss (pull-through).
    pub upstreams: Vec<UpstreamConfig>,
    /// `/metrics` on a listener of its own (unauthenticated); `None`: on `listen`, behind the
    /// read token in private mode.
    pub metrics_listen: Option<SocketAddr>,
    pub log: LogConfig,
}

impl Default for Config {
    /// The built-in defaults (a local store in `./cellar-data`), as an empty file gives them.
    fn default() -> Self {
        file::ConfigFile::default()
            .validate()
            .unwrap_or_else(|e| panic!("the built-in defaults are invalid: {e}"))
    }
}

impl Config {
    /// Loads the defaults, then `file` (if given), then `CELLAR_*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::new();
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ConfigError::NoFile(f.to_owned()));
            }
            fig = fig.merge(Renamed(Toml::file_exact(f)));
        }
        let cfg = Self::from_figment(with_env(fig))?;
        cfg.check_nar_dir(file)?;
        cfg.check_endpoint_env(|var| std::env::var_os(var))?;
        Ok(cfg)
    }

    /// With `store.endpoint` unset, the S3 client takes the endpoint from
    /// `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`; the first of them that is set, set
    /// empty (an `Environment=` or env file line left blank), made every request fail with
    /// "Custom endpoint `` was not a valid URI", and the server start as if all were well.
    fn check_endpoint_env(
        &self,
        var: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<(), ConfigError> {
        let StoreBackend::S3(s3) = &self.store.backend else {
            return Ok(());
        };
        // The SDK then reads neither variable.
        let ignored = var("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
            .is_some_and(|v| v.to_string_lossy().trim().eq_ignore_ascii_case("true"));
        if s3.endpoint.is_some() || ignored {
            return Ok(());
        }
        let set = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
            .into_iter()
            .find_map(|name| Some((name, var(name)?)));
        match set {
            Some((name, value)) if value.to_string_lossy().trim().is_empty() => {
                Err(ConfigError::Invalid {
                    key: "store.endpoint".into(),
                    message: format!(
                        "unset, so the S3 client takes ${name}, which is set but empty; unset \
                         it, or give it (or store.endpoint) the store's URL"
                    ),
                    from: format!(" (from {name})"),
                })
            }
            _ => Ok(()),
        }
    }

    /// The keys `file` sets that a `CELLAR_*` variable overrides, as `(variable, key)`: what
    /// the file says there has no effect, which is worth a warning (a key rotated in the file
    /// and reloaded, while a unit's `Environment=` still names the old one).
    pub fn env_overrides(file: &Path) -> Vec<(String, String)> {
        if !file.is_file() {
            return Vec::new();
        }
        let from_file = Figment::from(Renamed(Toml::file_exact(file)));
        let mut found: Vec<(String, String)> = utf8_vars()
            .filter_map(|(var, _)| {
                let key = config_key(&var)?;
                from_file.contains(&key).then_some((var, key))
            })
            .collect();
        found.sort();
        found
    }

    /// The secrets `file` holds (`store.secret_access_key`, an upstream URL's credentials),
    /// as the keys that hold them, if other users may read it: worth a warning, as a key
    /// file's mode is. None if they may not.
    pub fn secrets_others_can_read(file: &Path) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt as _;
        let readable = std::fs::metadata(file).is_ok_and(|m| m.permissions().mode() & 0o004 != 0);
        // Nor reached by others: a directory on the way they may not enter (`/etc/cellar`
        // 0750) keeps them out.
        let reachable = std::fs::canonicalize(file).is_ok_and(|f| {
            f.ancestors()
                .skip(1)
                .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
        });
        if !(readable && reachable) {
            return Vec::new();
        }
        let from_file = Figment::from(Renamed(Toml::file_exact(file)));
        let mut found = Vec::new();
        if from_file.contains("store.secret_access_key") {
            found.push("store.secret_access_key".to_owned());
        }
        let upstreams = from_file.find_value("upstreams").ok();
        for (i, u) in upstreams
            .as_ref()
            .and_then(figment::value::Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let url = u
                .as_dict()
                .and_then(|d| d.get("url"))
                .and_then(figment::value::Value::as_str)
                .unwrap_or_default();
            let authority = url.split_once("://").map_or("", |(_, rest)| rest);
            let authority = authority.split(['/', '?', '#']).next().unwrap_or_default();
            if authority.contains('@') {
                found.push(format!("upstreams[{i}].url"));
            }
        }
        found
    }

    pub fn from_figment(fig: Figment) -> Result<Self, ConfigError> {
        let raw: file::ConfigFile = fig.extract().map_err(|e| ConfigError::Load(Box::new(e)))?;
        let cfg = raw.validate().map_err(|e| e.located(&fig))?;
        cfg.check_nar_dir(None)?;
        Ok(cfg)
    }

    /// The first key whose change from `self` to `new` only a restart can apply, if any.
    ///
    /// Reloadable (SIGHUP): `[auth]`, `[signing]`, `[[upstreams]]`, the narinfo memory cache
    /// (`cache.narinfo_*`), `narinfo_max_age_secs`, `not_found_max_age_secs`, `priority` and
    /// `want_mass_query`; `gc.keep_days`, `gc.grace_secs` and `gc.max_bytes` are read by
    /// `cellar gc` only. The rest is held by the listeners, the logger, the store client, the
    /// uploader, the access log or the NAR disk cache, which live as long as the process.
    pub fn needs_restart(&self, new: &Config) -> Option<&'static str> {
        let c = (&self.cache, &new.cache);
        let fixed: [(&'static str, bool); 19] = [
            ("listen", self.listen == new.listen),
            ("metrics_listen", self.metrics_listen == new.metrics_listen),
            (
                "header_read_timeout_secs",
                self.header_read_timeout == new.header_read_timeout,
            ),
            ("idle_timeout_secs", self.idle_timeout == new.idle_timeout),
            (
                "max_connections",
                self.max_connections == new.max_connections,
            ),
            ("log.format", self.log.format == new.log.format),
            (
                "gc.access_flush_secs",
                self.gc.access_flush_interval == new.gc.access_flush_interval,
            ),
            (
                "gc.access_max_entries",
                self.gc.access_max_entries == new.gc.access_max_entries,
            ),
            ("store_dir", self.store_dir == new.store_dir),
            (
                "shutdown_timeout_secs",
                self.shutdown_timeout == new.shutdown_timeout,
            ),
            (
                "shutdown_delay_secs",
                self.shutdown_delay == new.shutdown_delay,
            ),
            ("store.*", self.store == new.store),
            ("upload.*", self.upload == new.upload),
            ("cache.nar_dir", self.cache.nar_dir == new.cache.nar_dir),
            (
                "cache.nar_max_bytes",
                self.cache.nar_max_bytes == new.cache.nar_max_bytes,
            ),
            (
                "cache.nar_memory_bytes",
                c.0.nar_memory_bytes == c.1.nar_memory_bytes,
            ),
            (
                "cache.nar_memory_max_object_bytes",
                c.0.nar_memory_max_object == c.1.nar_memory_max_object,
            ),
            (
                "cache.prefetch_concurrency",
                c.0.prefetch_concurrency == c.1.prefetch_concurrency,
            ),
            (
                "cache.prefetch_nar_max_bytes",
                c.0.prefetch_nar_max_bytes == c.1.prefetch_nar_max_bytes,
            ),
        ];
        fixed
            .into_iter()
            .find(|(_, same)| !same)
            .map(|(key, _)| key)
    }
}

/// `[log]`: how log lines are written (to stderr).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// `log.format` and `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event for people (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("{s:?}: expected `text` or `json`")),
        }
    }
}

/// `[store]`: where the cache lives, and how long it may take to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// How long the store may take to start answering one request (not a whole NAR body).
    pub timeout: Duration,
    /// How long `/readyz` waits for the store.
    pub ready_timeout: Duration,
}

/// `store.kind`, with the fields of that kind.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreBackend {
    /// A directory as written by `nix copy --to file://DIR`.
    Local(LocalStoreConfig),
    /// A bucket as written by `nix copy --to s3://BUCKET`.
    S3(S3StoreConfig),
}

impl fmt::Display for StoreBackend {
    /// What the store is, for messages (never credentials).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local(l) => write!(f, "local directory {}", l.path.display()),
            Self::S3(s) => {
                write!(f, "s3 bucket {:?}", s.bucket)?;
                if let Some(ep) = &s.endpoint {
                    write!(f, " at {ep}")?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LocalStoreConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct S3StoreConfig {
    pub bucket: String,
    /// Unset: AWS's own endpoint for the region (or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    pub region: String,
    /// Key prefix inside the bucket: empty, or ending in `/`.
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`); MinIO and Garage need it.
    pub force_path_style: bool,
    /// GetObject, HeadObject, ListObjectsV2 and single-request PutObject signed and sent by
    /// cellar itself rather than through the SDK (path-style endpoints only): cheaper per
    /// request.
    pub direct_requests: bool,
    /// Unset: the standard AWS chain.
    pub credentials: Option<S3Credentials>,
    /// The connect phase of one request.
    pub connect_timeout: Duration,
    /// GETs of large NARs answered with a redirect to a presigned URL (`store.redirect_nars`).
    pub redirect: Option<NarRedirect>,
    /// Parts of one multipart upload sent to S3 at once.
    pub upload_part_concurrency: usize,
}

/// Large NARs are downloaded from the bucket itself, through presigned URLs.
#[derive(Debug, Clone, PartialEq)]
pub struct NarRedirect {
    /// The endpoint as clients reach it (unset: `endpoint`, or AWS's).
    pub public_endpoint: Option<String>,
    /// How long a presigned URL stays valid.
    pub ttl: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

/// `[signing]`: which keys sign narinfos.
#[derive(Debug, Clone)]
pub struct SigningConfig {
    /// Secret key files in Nix's format; every key signs every narinfo (rotation).
    /// Empty: use `generated_key_file`, creating it on first start.
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
        Config::default().signing
    }
}

/// `[cache]`: the narinfo memory cache and the NAR disk cache.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Memory for signed, rendered narinfos (0 disables the memory cache).
    pub narinfo_memory_bytes: u64,
    /// How long a narinfo found in the store is served from memory.
    pub narinfo_ttl: Duration,
    /// How long a miss is remembered (uploads through this server refresh at once).
    pub narinfo_negative_ttl: Duration,
    /// The NAR disk cache's directory; `None` disables it.
    pub nar_dir: Option<PathBuf>,
    /// Byte budget of the NAR disk cache (least recently used NARs go first).
    pub nar_max_bytes: u64,
    /// Memory for small NARs (0 disables it).
    pub nar_memory_bytes: u64,
    /// NARs up to this size (as stored) are kept in memory.
    pub nar_memory_max_object: u64,
    /// Narinfos and small NARs fetched ahead of the client at once (0 disables prefetching).
    pub prefetch_concurrency: usize,
    /// NARs up to this size go into the disk cache as soon as a client GETs their narinfo
    /// (0: never ahead of their own request).
    pub prefetch_nar_max_bytes: u64,
}

/// `[gc]`: what `cellar gc` keeps, and how servers record what they serve.
#[derive(Debug, Clone)]
pub struct GcConfig {
    /// Paths read or uploaded within this long are roots; zero makes pins the only roots.
    pub keep: Duration,
    /// Objects younger than this are never deleted (uploads in progress write the NAR first).
    pub grace: Duration,
    /// Beyond the retention, evict least recently used closures until the cache fits.
    pub max_bytes: Option<u64>,
    /// How often a server writes what it served since the last write.
    pub access_flush_interval: Duration,
    /// Distinct paths a server remembers between writes; a full set is written early.
    pub access_max_entries: usize,
}

impl Default for GcConfig {
    fn default() -> Self {
        Config::default().gc
    }
}

#[derive(Debug, Clone, Copy, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
}

/// The sha256 of an access token: all the config holds of it. Written `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        Self(sha2::Sha256::digest(token.as_bytes()).into())
    }
}

impl FromStr for TokenHash {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = "expected sha256:<64 hex digits> (see `cellar token new`)";
        let hex_part = s.strip_prefix("sha256:").ok_or(expected)?;
        let bytes = hex::decode(hex_part).map_err(|_| expected)?;
        bytes.try_into().map(Self).map_err(|_| expected)
    }
}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One access token.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// A label for logs (who uses the token).
    pub name: String,
    pub hash: TokenHash,
    /// Never empty; `write` implies `read`.
    pub scopes: Vec<Scope>,
}

/// `[auth]`: who may read and who may upload.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Require a token with the `read` scope for reads too (not for /healthz, /readyz).
    pub private: bool,
    /// Tokens; uploads need one with the `write` scope.
    pub tokens: Vec<TokenConfig>,
}

/// What uploaded NARs are re-encoded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recompression {
    /// One that [`Compression::can_encode`].
    pub compression: Compression,
    /// Within [`Compression::encode_levels`]; `None` is the codec's default.
    pub level: Option<i32>,
}

/// `[upload]`: how uploads are checked and stored.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadConfig {
    /// `None` keeps what the client sent.
    pub recompress: Option<Recompression>,
    /// If not empty, a narinfo upload must carry a signature by one of these keys.
    pub trusted_keys: Vec<PublicKey>,
    /// Unfinished uploads older than this are removed from the store.
    pub staging_max_age: Duration,
    /// The largest NAR accepted, compressed as sent or decompressed (413 beyond it).
    pub max_nar_bytes: u64,
    /// NAR uploads processed at once, and as many of everything else (listings, logs,
    /// realisations, debug info links); more wait for a slot, then are refused with 503 and
    /// `Retry-After`.
    pub max_concurrent: usize,
    /// Memory the xz decoder may use for one upload (what the stream's dictionary needs).
    pub xz_memory_limit_bytes: u64,
    /// How long an upload body may send nothing before the upload is abandoned.
    pub body_idle_timeout: Duration,
}

/// One `[[upstreams]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Base URL of the cache without a trailing `/`, e.g. `https://cache.nixos.org`.
    pub url: String,
    /// Keys whose signatures make this upstream's narinfos acceptable (at least one).
    pub public_keys: Vec<PublicKey>,
    /// How long the upstream may take to answer a request.
    pub timeout: Duration,
    /// Also store what is fetched from this upstream (NAR then narinfo, verified like an
    /// upload), so the next request is served from the store.
    pub mirror: bool,
}

/// `fig` with the `CELLAR_*` environment variables over it: `__` between nested keys, and
/// without the variables Kubernetes and Docker set for a service named `cellar`.
///
/// figment reads a variable's value as TOML would (`8080` a number, `a,b` a list); the keys
/// that are text take the value as it is written instead, so that a bucket named `2024`, or a
/// MinIO secret made of digits (`0123…`, which as a number would lose its zero), stay as set.
fn with_env(fig: Figment) -> Figment {
    // Renamed keys as in the file: both names set is an error, not whichever came last.
    let mut fig = fig.merge(Renamed(
        Env::prefixed("CELLAR_")
            .filter(|k| !is_link_variable(k.as_str()))
            .split("__"),
    ));
    for (var, value) in utf8_vars() {
        if let Some(key) = config_key(&var).filter(|k| TEXT_KEYS.contains(&k.as_str())) {
            let value = unquoted(&value).to_owned();
            fig = fig.merge(figment::providers::Serialized::default(&key, value));
        }
    }
    fig
}

/// A text value without the quotes around it, as the other keys' values are read (as TOML): a
/// Docker `--env-file` or compose file keeps `KEY="value"`'s quotes, and a bucket, a prefix or
/// a path never begins and ends with one.
fn unquoted(value: &str) -> &str {
    ['"', '\'']
        .iter()
        .find_map(|q| {
            value
                .strip_prefix(*q)
                .and_then(|v| v.strip_suffix(*q))
                .filter(|v| !v.contains(*q))
        })
        .unwrap_or(value)
}

/// The environment's variables whose names and values are UTF-8 (`std::env::vars` panics on
/// any other, and one such variable, a `$OLDPWD` in Latin-1 say, is no reason to fail).
/// Figment's `Env` skips the same ones.
fn utf8_vars() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os()
        .filter_map(|(var, value)| Some((var.into_string().ok()?, value.into_string().ok()?)))
}

/// The keys whose values are text, whatever they look like.
const TEXT_KEYS: &[&str] = &[
    "store_dir",
    "store.path",
    "store.bucket",
    "store.endpoint",
    "store.region",
    "store.prefix",
    "store.access_key_id",
    "store.secret_access_key",
    "store.public_endpoint",
    "signing.generated_key_file",
    "signing.generated_key_name",
    "cache.nar_dir",
    // Lists, as one comma-separated value: a key file named `2024` stays a name.
    "signing.key_files",
    "upload.trusted_keys",
];

/// The key a variable sets (`CELLAR_STORE__BUCKET`: `store.bucket`), if it is configuration.
fn config_key(var: &str) -> Option<String> {
    let rest = var.strip_prefix("CELLAR_")?;
    if rest.is_empty() || is_link_variable(rest) {
        return None;
    }
    Some(renamed(&rest.to_ascii_lowercase().replace("__", ".")))
}

/// Keys that were renamed, as `(table, old name, name)`. The old name is read as the new one
/// wherever it is written, in the file or in a variable, so that a variable of either name
/// overrides the file's key of either name (as serde's `alias` would not: the two names from
/// two sources reach serde together, as a duplicate).
const RENAMED: &[(&str, &str, &str)] = &[("store", "direct_reads", "direct_requests")];

/// `key` (dotted: `store.direct_reads`) under its current name.
fn renamed(key: &str) -> String {
    RENAMED
        .iter()
        .find(|(table, old, _)| key.eq_ignore_ascii_case(&format!("{table}.{old}")))
        .map_or_else(
            || key.to_owned(),
            |(table, _, new)| format!("{table}.{new}"),
        )
}

/// A provider whose renamed keys ([`RENAMED`]) are read under their current names. Both names
/// in one source is an error that names them.
struct Renamed<P>(P);

impl<P: figment::Provider> figment::Provider for Renamed<P> {
    fn metadata(&self) -> figment::Metadata {
        self.0.metadata()
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let mut data = self.0.data()?;
        for dict in data.values_mut() {
            for (table, old, new) in RENAMED {
                let Some(figment::value::Value::Dict(_, t)) = dict.get_mut(*table) else {
                    continue;
                };
                let Some(value) = t.remove(*old) else {
                    continue;
                };
                if t.contains_key(*new) {
                    return Err(format!(
                        "`{table}.{old}` is the old name of `{table}.{new}`: set one of them"
                    )
                    .into());
                }
                t.insert((*new).to_owned(), value);
            }
        }
        Ok(data)
    }

    fn profile(&self) -> Option<figment::Profile> {
        self.0.profile()
    }
}

/// Whether `key` (a variable's name after `CELLAR_`) is one Kubernetes service links
/// (`CELLAR_SERVICE_HOST`, `CELLAR_SERVICE_PORT[_NAME]`, `CELLAR_PORT[_8080_TCP[_ADDR]]`) or
/// Docker's `--link` (`CELLAR_NAME`, `CELLAR_ENV_*`, the same `CELLAR_PORT*`) set in every pod
/// or container beside a service named `cellar`, or beside one named `cellar-<x>`
/// (`CELLAR_METRICS_SERVICE_HOST`, `CELLAR_METRICS_PORT_9090_TCP`, … for `cellar-metrics`, as
/// charts name a service next to the main one). They are not configuration: taken as keys,
/// they would be unknown keys, and the server would not start. No configuration key has a
/// name of these forms.
fn is_link_variable(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if ["service_host", "service_port", "port", "name"].contains(&k.as_str())
        || ["service_port_", "port_", "env_"]
            .iter()
            .any(|p| k.starts_with(p))
    {
        return true;
    }
    // `cellar-<x>`: `<x>_` first, without `__` (which nests configuration keys).
    if k.contains("__") {
        return false;
    }
    let service_link = |rest: &str| {
        rest == "service_host"
            || rest == "service_port"
            || rest.starts_with("service_port_")
            || rest == "port"
            || is_port_link(rest)
    };
    k.match_indices('_').any(|(i, _)| service_link(&k[i + 1..]))
}

/// `port_<number>_<tcp|udp|sctp>[_proto|_port|_addr]`.
fn is_port_link(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("port_") else {
        return false;
    };
    let Some((number, rest)) = rest.split_once('_') else {
        return false;
    };
    let (proto, field) = rest.split_once('_').unwrap_or((rest, ""));
    !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && ["tcp", "udp", "sctp"].contains(&proto)
        && ["", "proto", "port", "addr"].contains(&field)
}
