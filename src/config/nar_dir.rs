//! Where the NAR disk cache may live: cellar deletes files there, so the directory must not
//! overlap anything cellar must keep.

use std::path::{Path, PathBuf};

use super::{Config, ConfigError, StoreBackend};

impl Config {
    /// cellar deletes files in `cache.nar_dir`, so it must not be, hold or lie in what cellar
    /// must keep: the local store's directory, the signing key files, the config file. (A NAR
    /// cache beside the key file is fine: only the cache directory's own files are touched,
    /// and the cache refuses a directory it did not make; see `cache::nar`.)
    pub(super) fn check_nar_dir(&self, config_file: Option<&Path>) -> Result<(), ConfigError> {
        let Some(nar_dir) = &self.cache.nar_dir else {
            return Ok(());
        };
        let nar = lexical_absolute(nar_dir);
        let refuse = |what: &str, path: &Path| {
            ConfigError::invalid(
                "cache.nar_dir",
                format!(
                    "{} would overlap {what} {}: cellar deletes files in its NAR cache, so give \
                     it a directory of its own",
                    nar_dir.display(),
                    path.display()
                ),
            )
        };
        if let StoreBackend::Local(l) = &self.store.backend {
            let store = lexical_absolute(&l.path);
            if nar.starts_with(&store) || store.starts_with(&nar) {
                return Err(refuse("the store directory", &l.path));
            }
        }
        let keys = self
            .signing
            .key_files
            .iter()
            .chain(std::iter::once(&self.signing.generated_key_file));
        for key in keys {
            if lexical_absolute(key).starts_with(&nar) {
                return Err(refuse("the signing key", key));
            }
        }
        if let Some(f) = config_file {
            if lexical_absolute(f).starts_with(&nar) {
                return Err(refuse("the config file", f));
            }
        }
        Ok(())
    }
}

/// `p` made absolute (against the working directory) with `.` and `..` resolved by name, so
/// that paths which do not exist yet can be compared.
fn lexical_absolute(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}
