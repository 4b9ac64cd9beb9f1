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
        // And as reached through links: a `nar_dir` that is a link into the store, or the
        // store's `nar/` linked to a bigger disk and the NAR cache put "on the big disk",
        // inside that very directory (the cache would take the uploaded NARs for files of its
        // own left incomplete, and delete them).
        let nar_resolved = resolved(nar_dir);
        let overlaps = |p: &Path| {
            let (lexical, through_links) = (lexical_absolute(p), resolved(p));
            nar.starts_with(&lexical)
                || lexical.starts_with(&nar)
                || nar_resolved.starts_with(&through_links)
                || through_links.starts_with(&nar_resolved)
        };
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
            // The store's directory, and each part of its layout that may be linked (or
            // mounted) elsewhere.
            let parts = crate::store::local::OBJECT_DIRS
                .iter()
                .chain(std::iter::once(&crate::store::local::STAGING))
                .map(|d| l.path.join(d));
            if overlaps(&l.path) {
                return Err(refuse("the store directory", &l.path));
            }
            if let Some(part) = parts.into_iter().find(|p| overlaps(p)) {
                return Err(refuse("the store directory's", &part));
            }
        }
        let keys = self
            .signing
            .key_files
            .iter()
            .chain(std::iter::once(&self.signing.generated_key_file));
        let inside = |p: &Path| {
            lexical_absolute(p).starts_with(&nar) || resolved(p).starts_with(&nar_resolved)
        };
        for key in keys {
            if inside(key) {
                return Err(refuse("the signing key", key));
            }
        }
        if let Some(f) = config_file {
            if inside(f) {
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

/// `p` as reached through links: [`lexical_absolute`], with the longest part of it that
/// exists resolved ([`std::fs::canonicalize`]), and a link that leads nowhere (a disk not
/// mounted) followed by what it says; the rest as named.
fn resolved(p: &Path) -> PathBuf {
    resolved_within(&lexical_absolute(p), 40)
}

/// [`resolved`] of the absolute `abs`, following at most `links` links that lead nowhere
/// (a loop of them ends there).
fn resolved_within(abs: &Path, links: u32) -> PathBuf {
    let mut existing = abs.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            return lexical_absolute(&rest.iter().rev().fold(real, |p, r| p.join(r)));
        }
        if links > 0 {
            if let Ok(target) = std::fs::read_link(&existing) {
                // Relative to the directory the link is in, as reached through links (a `..`
                // in the target leads up from there).
                let parent = existing.parent().unwrap_or(Path::new("/"));
                let base = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_owned());
                let through = lexical_absolute(&base.join(target));
                let real = resolved_within(&through, links - 1);
                return lexical_absolute(&rest.iter().rev().fold(real, |p, r| p.join(r)));
            }
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent.to_path_buf();
            }
            _ => return abs.to_path_buf(),
        }
    }
}
