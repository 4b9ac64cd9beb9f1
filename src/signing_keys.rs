//! Loading and creating signing key files (the I/O around [`crate::nix::signing`]).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::SigningConfig;
use crate::nix::signing::KeyError;
use crate::nix::SecretKey;

#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("cannot read signing key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signing key file {path} is not a Nix secret key (`name:base64`): {source}")]
    Malformed { path: PathBuf, source: KeyError },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid key name: {0}")]
    Name(KeyError),
    #[error("cannot generate a signing key: {0}")]
    Generate(KeyError),
}

/// Reads one secret key file.
pub fn read_secret_key(path: &Path) -> Result<SecretKey, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.trim()
        .parse()
        .map_err(|source| KeyFileError::Malformed {
            path: path.to_owned(),
            source,
        })
}

/// Writes `key` to a new file (mode 0600); refuses to overwrite an existing one.
pub fn write_secret_key(path: &Path, key: &SecretKey) -> Result<(), KeyFileError> {
    let err = |source| KeyFileError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(key.to_nix_format().as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

/// A default key name: `<hostname>-1` (key names must differ between caches, since Nix keys
/// its trusted keys by name).
pub fn default_key_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .collect();
    if host.is_empty() {
        "cellar-1".into()
    } else {
        format!("{host}-1")
    }
}

/// What [`load`] did, so the caller can tell the operator.
#[derive(Debug)]
pub struct LoadedKeys {
    pub keys: Vec<SecretKey>,
    /// Set when a key was created on this start.
    pub generated: Option<PathBuf>,
}

/// Loads every configured key, or the generated key file if none is configured, without
/// creating anything: for a reload, where a missing key file is an error to report.
pub fn load_existing(cfg: &SigningConfig) -> Result<Vec<SecretKey>, KeyFileError> {
    if cfg.key_files.is_empty() {
        return Ok(vec![read_secret_key(&cfg.generated_key_file)?]);
    }
    cfg.key_files.iter().map(|p| read_secret_key(p)).collect()
}

/// Loads every configured key; with none configured, loads (or creates on first run) the
/// generated key file.
pub fn load(cfg: &SigningConfig) -> Result<LoadedKeys, KeyFileError> {
    if !cfg.key_files.is_empty() {
        let keys = cfg
            .key_files
            .iter()
            .map(|p| read_secret_key(p))
            .collect::<Result<_, _>>()?;
        return Ok(LoadedKeys {
            keys,
            generated: None,
        });
    }
    let path = &cfg.generated_key_file;
    if path.exists() {
        return Ok(LoadedKeys {
            keys: vec![read_secret_key(path)?],
            generated: None,
        });
    }
    let name = cfg
        .generated_key_name
        .clone()
        .unwrap_or_else(default_key_name);
    let key = SecretKey::generate(&name).map_err(|e| match e {
        KeyError::RandomSource(_) => KeyFileError::Generate(e),
        e => KeyFileError::Name(e),
    })?;
    write_secret_key(path, &key)?;
    Ok(LoadedKeys {
        keys: vec![key],
        generated: Some(path.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn generate_then_reload_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SigningConfig {
            generated_key_file: dir.path().join("sub/k.sec"),
            generated_key_name: Some("t-1".into()),
            ..SigningConfig::default()
        };
        let first = load(&cfg).unwrap();
        assert!(first.generated.is_some());
        let mode = std::fs::metadata(dir.path().join("sub/k.sec"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = load(&cfg).unwrap();
        assert!(second.generated.is_none());
        assert_eq!(first.keys[0].public(), second.keys[0].public());
        assert_eq!(second.keys[0].name(), "t-1");
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.sec");
        std::fs::write(&bad, "not a key").unwrap();
        let cfg = SigningConfig {
            key_files: vec![bad.clone()],
            ..SigningConfig::default()
        };
        let e = load(&cfg).unwrap_err().to_string();
        assert!(e.contains("bad.sec"), "{e}");
        let cfg = SigningConfig {
            key_files: vec![dir.path().join("missing.sec")],
            ..SigningConfig::default()
        };
        let e = load(&cfg).unwrap_err().to_string();
        assert!(e.contains("missing.sec"), "{e}");
        // A configured but missing key is never silently created.
        assert!(!dir.path().join("missing.sec").exists());
    }
}
