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
    #[error("cannot read signing key file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// A secret key given where its file's path belongs (`key_files = ["name:base64"]`). The
    /// message does not repeat it: it ends up in logs and in systemd's status line.
    #[error(
        "signing.key_files names a secret key itself, not a file: write the key to a file \
         (mode 0600) and name that file (the key is not repeated here; if it was shared, \
         consider it exposed)"
    )]
    KeyInsteadOfFile,
    #[error("signing key file {path} is not a Nix secret key (`name:base64`): {cause}")]
    Malformed { path: PathBuf, cause: KeyError },
    #[error("cannot write key file {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("invalid key name: {0}")]
    Name(KeyError),
    /// Two keys of one name: Nix keeps one public key per name, and a narinfo one signature
    /// per name, so clients trusting one of them would find its signature replaced.
    #[error(
        "signing.key_files: {first} and {second} are both keys named `{name}` (Nix keeps one \
         key per name); give the new key a name of its own (`…-2` after `…-1`) and list both"
    )]
    SameName {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("signing.key_files lists {0} twice")]
    ListedTwice(PathBuf),
    #[error("cannot generate a signing key: {0}")]
    Generate(KeyError),
    /// Any of the above, for the config key that named the file (or the key name).
    #[error("config key `{key}`: {error}")]
    InKey {
        key: &'static str,
        error: Box<KeyFileError>,
    },
}

impl KeyFileError {
    /// This error, said to be about the file (or name) config key `key` gives. One that names
    /// its key already, or is about none (no random source), is left as it is.
    pub fn in_key(self, key: &'static str) -> Self {
        match self {
            Self::KeyInsteadOfFile
            | Self::Generate(_)
            | Self::SameName { .. }
            | Self::ListedTwice(_)
            | Self::InKey { .. } => self,
            error => Self::InKey {
                key,
                error: Box::new(error),
            },
        }
    }
}

const KEY_FILES: &str = "signing.key_files";
const GENERATED_FILE: &str = "signing.generated_key_file";

/// Reads one secret key file. One that other users may read (a key made with `nix key
/// generate-secret > FILE` under the usual umask) is used, with a warning: anyone who can read
/// it can sign paths this cache's clients trust.
pub fn read_secret_key(path: &Path) -> Result<SecretKey, KeyFileError> {
    if !path.exists()
        && path
            .to_str()
            .is_some_and(|p| p.trim().parse::<SecretKey>().is_ok())
    {
        return Err(KeyFileError::KeyInsteadOfFile);
    }
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        cause: source,
    })?;
    let key = text
        .trim()
        .parse()
        .map_err(|source| KeyFileError::Malformed {
            path: path.to_owned(),
            cause: source,
        })?;
    // Said of a secret key only (a public key given for one is refused above).
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = %format_args!("{:o}", mode & 0o777),
                "the signing key file can be read by other users; `chmod 600` it"
            );
        }
    }
    Ok(key)
}

/// Writes `key` to a new file (mode 0600); refuses to overwrite an existing one. The file
/// appears whole or not at all: written and synced beside it, then linked into place (which
/// fails if it exists), so a crash or a full disk leaves no empty key behind that every later
/// start would refuse, and a second process starting at once reads a whole key. Its directory
/// is synced after: a key whose public half was handed out survives a power cut (else the
/// next start would make another, and clients would refuse every signature).
pub fn write_secret_key(path: &Path, key: &SecretKey) -> Result<(), KeyFileError> {
    let err = |source| KeyFileError::Write {
        path: path.to_owned(),
        cause: source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut rnd = [0u8; 8];
    getrandom::getrandom(&mut rnd)
        .map_err(|e| err(std::io::Error::other(format!("no random source: {e}"))))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", hex::encode(rnd)));
    let tmp = PathBuf::from(tmp);
    let write_new = |at: &Path| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(at)?;
        f.write_all(key.to_nix_format().as_bytes())?;
        f.sync_all()
    };
    if let Err(e) = write_new(&tmp) {
        // A full disk, a full quota: nothing is left behind, the next start tries again.
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    let written = match linked {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(err(e)),
        // A file system without hard links (vfat, some FUSE and SMB mounts): written in place,
        // and removed again if that fails, so no partial key stays behind. (There, a second
        // process starting at that very moment may read it half written and stop with an
        // error; started again, it reads the whole key.)
        // Not if another process created it meanwhile: that key is theirs, and in use.
        Err(_) => write_new(path).map_err(|e| {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                let _ = std::fs::remove_file(path);
            }
            err(e)
        }),
        Ok(()) => Ok(()),
    };
    if written.is_ok() {
        // Best effort: some file systems cannot sync a directory, and the key is there.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), cause = %e, "the signing key's directory could not be synced");
        }
    }
    written
}

/// A default key name: `<hostname>-1` (key names must differ between caches, since Nix keys
/// its trusted keys by name).
pub fn default_key_name() -> String {
    key_name_for(&host_name())
}

/// The machine's host name, as the kernel has it: `uname`, which works where
/// `/proc/sys/kernel/hostname` is hidden (systemd's `ProcSubset=pid`, as in the shipped unit),
/// and names this machine, not what `/etc/hostname` may say.
fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn key_name_for(host: &str) -> String {
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

/// The names of `keys`: the `Sig:` lines under them are the server's own.
pub fn key_names(keys: &[SecretKey]) -> Vec<String> {
    keys.iter().map(|k| k.name().to_owned()).collect()
}

/// The public halves of `keys` as nix.conf's `trusted-public-keys` takes them: one line,
/// separated by spaces (a second `trusted-public-keys` line in nix.conf replaces the first).
pub fn public_keys_line(keys: &[SecretKey]) -> String {
    let publics: Vec<String> = keys.iter().map(|k| k.public().to_string()).collect();
    publics.join(" ")
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
        return Ok(vec![
            read_secret_key(&cfg.generated_key_file).map_err(|e| e.in_key(GENERATED_FILE))?
        ]);
    }
    read_key_files(&cfg.key_files)
}

/// Each of `signing.key_files`, read; refused if two have one name.
fn read_key_files(paths: &[PathBuf]) -> Result<Vec<SecretKey>, KeyFileError> {
    let keys: Vec<SecretKey> = paths
        .iter()
        .map(|p| read_key_file(p))
        .collect::<Result<_, _>>()?;
    for (j, key) in keys.iter().enumerate() {
        if let Some(i) = keys[..j].iter().position(|k| k.name() == key.name()) {
            if paths[i] == paths[j] {
                return Err(KeyFileError::ListedTwice(paths[j].clone()));
            }
            return Err(KeyFileError::SameName {
                name: key.name().to_owned(),
                first: paths[i].clone(),
                second: paths[j].clone(),
            });
        }
    }
    Ok(keys)
}

/// One of `signing.key_files`, read.
pub fn read_key_file(path: &Path) -> Result<SecretKey, KeyFileError> {
    read_secret_key(path).map_err(|e| e.in_key(KEY_FILES))
}

/// Loads every configured key; with none configured, loads (or creates on first run) the
/// generated key file.
pub fn load(cfg: &SigningConfig) -> Result<LoadedKeys, KeyFileError> {
    if !cfg.key_files.is_empty() {
        let keys = read_key_files(&cfg.key_files)?;
        return Ok(LoadedKeys {
            keys,
            generated: None,
        });
    }
    let path = &cfg.generated_key_file;
    let read_generated = || read_secret_key(path).map_err(|e| e.in_key(GENERATED_FILE));
    if path.exists() {
        return Ok(LoadedKeys {
            keys: vec![read_generated()?],
            generated: None,
        });
    }
    let name = cfg
        .generated_key_name
        .clone()
        .unwrap_or_else(default_key_name);
    let key = SecretKey::generate(&name).map_err(|e| match e {
        KeyError::RandomSource(_) => KeyFileError::Generate(e),
        e => KeyFileError::Name(e).in_key("signing.generated_key_name"),
    })?;
    match write_secret_key(path, &key) {
        Ok(()) => {}
        // Another process sharing the directory created it first: its key is the one.
        Err(KeyFileError::Write { cause, .. })
            if cause.kind() == std::io::ErrorKind::AlreadyExists =>
        {
            return Ok(LoadedKeys {
                keys: vec![read_generated()?],
                generated: None,
            });
        }
        Err(e) => return Err(e.in_key(GENERATED_FILE)),
    }
    Ok(LoadedKeys {
        keys: vec![key],
        generated: Some(path.clone()),
    })
}

/// Whether `store` already holds a cache, which some key signed for its clients: cellar's
/// records (`_cellar/`), or a narinfo among its first thousand keys. Asked after a key was
/// generated, which is right on a first start only: a key file lost (deleted, a volume not
/// mounted) makes a new key that every client trusting the old one refuses. A store that
/// cannot be listed holds none, as far as this says.
pub async fn store_holds_a_cache(store: &dyn crate::store::Store) -> bool {
    use futures::StreamExt as _;
    if matches!(store.list("_cellar/").next().await, Some(Ok(_))) {
        return true;
    }
    store
        .list("")
        .take(1000)
        .any(|o| async move { o.is_ok_and(|o| o.key.ends_with(".narinfo")) })
        .await
}

#[cfg(test)]
mod tests {
    /// A cache is told by cellar's records or a narinfo; a store with neither (a first start:
    /// nothing, or only `nix-cache-info`) holds none.
    #[tokio::test]
    async fn a_store_holding_a_cache_is_told_apart_from_a_new_one() {
        use crate::store::memory::MemoryStore;
        let mem = MemoryStore::new();
        assert!(!super::store_holds_a_cache(&mem).await);
        mem.insert("nix-cache-info", "StoreDir: /nix/store\n");
        mem.insert("nar/x.nar", "x");
        assert!(!super::store_holds_a_cache(&mem).await);
        mem.insert("f904kp3djilk732cgbnxhpy7vzykbqsh.narinfo", "x");
        assert!(super::store_holds_a_cache(&mem).await);
        let records = MemoryStore::new();
        records.insert("_cellar/access/2026-12-07/a-1", "x");
        assert!(super::store_holds_a_cache(&records).await);
    }

    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A key file other users may read is used, with a warning; a public key given for the
    /// secret one is refused saying so, without a warning about its mode (public keys are
    /// meant to be read).
    #[test]
    fn a_readable_secret_key_is_warned_of_and_a_public_key_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate("cache-1").unwrap();
        let secret = dir.path().join("secret");
        let public = dir.path().join("public");
        std::fs::write(&secret, key.to_nix_format()).unwrap();
        std::fs::write(&public, key.public().to_string()).unwrap();
        for f in [&secret, &public] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let logs = crate::test_logs::capture();
        assert_eq!(read_secret_key(&secret).unwrap().public(), key.public());
        assert!(
            logs.text().contains("can be read by other users"),
            "{}",
            logs.text()
        );
        drop(logs);
        let logs = crate::test_logs::capture();
        let e = read_secret_key(&public).unwrap_err();
        assert!(e.to_string().contains("this is a public key"), "{e}");
        assert!(!logs.text().contains("other users"), "{}", logs.text());
    }

    /// Several keys (a rotation) are printed on one line: a second `trusted-public-keys` line
    /// in nix.conf would replace the first.
    #[test]
    fn public_keys_are_one_nix_conf_line() {
        let a: SecretKey = SecretKey::generate("a-1").unwrap();
        let b: SecretKey = SecretKey::generate("b-1").unwrap();
        let line = public_keys_line(&[a.clone(), b.clone()]);
        assert_eq!(line, format!("{} {}", a.public(), b.public()));
        assert_eq!(
            public_keys_line(std::slice::from_ref(&a)),
            a.public().to_string()
        );
    }

    /// Every failure to load a key names the config key that pointed at it, and the file:
    /// `signing.key_files`, `signing.generated_key_file`, `signing.generated_key_name`.
    #[test]
    fn load_errors_name_their_config_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sec");
        let bad = dir.path().join("bad.sec");
        std::fs::write(&bad, "not a key").unwrap();
        let files = |f: &Path| SigningConfig {
            key_files: vec![f.to_owned()],
            ..SigningConfig::default()
        };
        let generated = |f: &Path, name: &str| SigningConfig {
            generated_key_file: f.to_owned(),
            generated_key_name: Some(name.into()),
            ..SigningConfig::default()
        };
        let said = |r: Result<LoadedKeys, KeyFileError>| r.unwrap_err().to_string();
        for (cfg, key, file) in [
            (files(&missing), "signing.key_files", Some(&missing)),
            (files(&bad), "signing.key_files", Some(&bad)),
            (
                generated(&bad, "t-1"),
                "signing.generated_key_file",
                Some(&bad),
            ),
            (
                generated(&missing, "t:1"),
                "signing.generated_key_name",
                None,
            ),
        ] {
            let e = said(load(&cfg));
            assert!(e.starts_with(&format!("config key `{key}`: ")), "{e}");
            if let Some(f) = file {
                assert!(e.contains(&f.display().to_string()), "{e}");
            }
        }
        // A reload reads the same files and says the same.
        let e = load_existing(&generated(&bad, "t-1"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config key `signing.generated_key_file`: "),
            "{e}"
        );
        let e = load_existing(&files(&missing)).unwrap_err().to_string();
        assert!(e.starts_with("config key `signing.key_files`: "), "{e}");
        // The generated file cannot be written: its directory is a file.
        let e = said(load(&generated(&bad.join("k.sec"), "t-1")));
        assert!(
            e.starts_with("config key `signing.generated_key_file`: "),
            "{e}"
        );
        // One that names its key already is not said twice.
        let key_itself = SecretKey::generate("t-1").unwrap().to_nix_format();
        let e = said(load(&files(Path::new(&key_itself))));
        assert_eq!(e.matches("signing.key_files").count(), 1, "{e}");
    }

    /// A key file other users may read is used, and said to be.
    #[test]
    fn a_key_file_others_may_read_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.sec");
        let key = SecretKey::generate("t-1").unwrap();
        write_secret_key(&path, &key).unwrap();
        let logs = crate::test_logs::capture();
        read_secret_key(&path).unwrap();
        assert!(!logs.text().contains("other users"), "{}", logs.text());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(read_secret_key(&path).unwrap().public(), key.public());
        assert!(logs.text().contains("mode=640"), "{}", logs.text());
        assert!(logs.text().contains("other users"), "{}", logs.text());
    }

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

    /// Replicas sharing a state directory, started at once: one creates the key, and every
    /// one signs with it (none fails on the file another is writing, none reads it half
    /// written).
    #[test]
    fn starts_at_once_share_one_created_key() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SigningConfig {
            generated_key_file: dir.path().join("k.sec"),
            generated_key_name: Some("t-1".into()),
            ..SigningConfig::default()
        };
        let barrier = std::sync::Barrier::new(8);
        let keys: Vec<String> = std::thread::scope(|s| {
            let starts: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        load(&cfg).map(|k| k.keys[0].public().to_string())
                    })
                })
                .collect();
            starts
                .into_iter()
                .map(|t| t.join().unwrap().unwrap())
                .collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        assert_eq!(
            read_secret_key(&cfg.generated_key_file)
                .unwrap()
                .public()
                .to_string(),
            keys[0]
        );
        // Nothing left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// Characters a key name may not hold are left out of the host name; with none left the
    /// name is `cellar-1`.
    #[test]
    fn key_names_keep_what_a_key_name_may_hold() {
        assert_eq!(
            key_name_for("build-01.example.org"),
            "build-01.example.org-1"
        );
        assert_eq!(key_name_for(" my host!\n"), "myhost-1");
        assert_eq!(key_name_for(""), "cellar-1");
        assert_eq!(key_name_for("ü"), "cellar-1");
        assert!(default_key_name().parse::<SecretKey>().is_err()); // a name, not a key
        assert!(SecretKey::generate(&default_key_name()).is_ok());
    }

    /// A secret key put where its file's path belongs is refused without being repeated: the
    /// error ends up in logs and in systemd's status line.
    #[test]
    fn a_key_given_for_its_file_is_not_repeated() {
        let key = SecretKey::generate("cache.example.org-1")
            .unwrap()
            .to_nix_format();
        let e = read_secret_key(Path::new(key.trim()))
            .unwrap_err()
            .to_string();
        let secret = key.trim().split_once(':').unwrap().1;
        assert!(!e.contains(secret), "{e}");
        assert!(
            e.contains("signing.key_files") && e.contains("not a file"),
            "{e}"
        );
        // A file that does not exist is still named.
        let e = read_secret_key(Path::new("/nonexistent/k.sec"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/k.sec"), "{e}");
    }

    /// A key generated without a configured name is named after the machine, `<hostname>-1`,
    /// so that caches on different machines do not share a key name (Nix keys its trusted keys
    /// by name).
    #[test]
    fn a_generated_key_is_named_after_the_host() {
        // The kernel's name for the machine (what `/proc/sys/kernel/hostname` shows where it
        // is not hidden), not read from a file that systemd's `ProcSubset=pid` hides.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let host = host.trim();
        assert!(!host.is_empty());
        assert_eq!(host_name(), host);
        let expected = key_name_for(host);
        let dir = tempfile::tempdir().unwrap();
        let cfg = SigningConfig {
            generated_key_file: dir.path().join("k.sec"),
            generated_key_name: None,
            ..SigningConfig::default()
        };
        let loaded = load(&cfg).unwrap();
        assert_eq!(loaded.keys[0].name(), expected);
        assert_eq!(default_key_name(), expected);
    }

    /// A reload reads the keys configured, or the generated key file when none is: the keys
    /// it signs with afterwards are those, not none.
    #[test]
    fn a_reload_reads_the_configured_or_generated_keys() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecretKey::generate("a-1").unwrap();
        let b = SecretKey::generate("b-1").unwrap();
        write_secret_key(&dir.path().join("a.sec"), &a).unwrap();
        write_secret_key(&dir.path().join("b.sec"), &b).unwrap();
        let cfg = SigningConfig {
            key_files: vec![dir.path().join("a.sec"), dir.path().join("b.sec")],
            ..SigningConfig::default()
        };
        let names: Vec<String> = load_existing(&cfg)
            .unwrap()
            .iter()
            .map(|k| k.public().to_string())
            .collect();
        assert_eq!(names, [a.public().to_string(), b.public().to_string()]);
        let cfg = SigningConfig {
            generated_key_file: dir.path().join("a.sec"),
            ..SigningConfig::default()
        };
        let keys = load_existing(&cfg).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].public().to_string(), a.public().to_string());
        // A missing generated key is an error to report, never created on a reload.
        let cfg = SigningConfig {
            generated_key_file: dir.path().join("gone.sec"),
            ..SigningConfig::default()
        };
        assert!(load_existing(&cfg).is_err());
        assert!(!dir.path().join("gone.sec").exists());
    }

    /// Two keys of one name (a rotation that reused the name) are refused at start and on a
    /// reload, naming both files: Nix keeps one key per name, and signing with the second
    /// replaced the first one's signature, so clients trusting the old key failed.
    #[test]
    fn two_keys_of_one_name_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("old.sec"), dir.path().join("new.sec"));
        write_secret_key(&old, &SecretKey::generate("cache-1").unwrap()).unwrap();
        write_secret_key(&new, &SecretKey::generate("cache-1").unwrap()).unwrap();
        let cfg = SigningConfig {
            key_files: vec![old.clone(), new.clone()],
            ..SigningConfig::default()
        };
        for e in [load(&cfg).err().unwrap(), load_existing(&cfg).unwrap_err()] {
            let said = e.to_string();
            assert!(matches!(e, KeyFileError::SameName { .. }), "{said}");
            for part in ["signing.key_files", "`cache-1`", "old.sec", "new.sec"] {
                assert!(said.contains(part), "{said}");
            }
        }
        // One file listed twice is said as such, not as two keys of one name.
        let twice = SigningConfig {
            key_files: vec![old.clone(), old.clone()],
            ..SigningConfig::default()
        };
        let said = load(&twice).err().unwrap().to_string();
        assert_eq!(
            said,
            format!("signing.key_files lists {} twice", old.display())
        );
    }

    /// A key file that cannot be created (its directory cannot be made: a file is in the way)
    /// is reported as such, not as a key file some other process created and this one cannot
    /// read.
    #[test]
    fn a_key_file_that_cannot_be_created_is_reported_as_a_write_failure() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "not a directory").unwrap();
        let cfg = SigningConfig {
            generated_key_file: dir.path().join("file/sub/k.sec"),
            generated_key_name: Some("t-1".into()),
            ..SigningConfig::default()
        };
        let e = load(&cfg).unwrap_err();
        let KeyFileError::InKey { key, error } = &e else {
            panic!("{e}")
        };
        assert_eq!(*key, "signing.generated_key_file");
        assert!(matches!(**error, KeyFileError::Write { .. }), "{e}");
        assert!(e.to_string().contains("cannot write key file"), "{e}");
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
