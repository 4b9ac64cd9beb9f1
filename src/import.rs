//! `cellar import DIR`: brings a directory written by `nix copy --to file://DIR` into the
//! configured store through the same verification as HTTP uploads, references first. Paths
//! already in the store are skipped, so running it again imports nothing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use futures::StreamExt as _;
use thiserror::Error;
use tokio::io::AsyncReadExt as _;
use tokio_util::io::ReaderStream;

use crate::error::{Error, UploadError};
use crate::nix::{NarFileName, NarInfo, StorePathBaseName, StorePathHash, MAX_NARINFO_BYTES};
use crate::store::{object_key, Store};
use crate::upload::{Uploader, MAX_LISTING_BYTES, MAX_LOG_BYTES};

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

#[derive(Debug, Default)]
pub struct Summary {
    pub imported: usize,
    pub skipped: usize,
    /// Store path (or file) and why it was refused.
    pub rejected: Vec<(String, String)>,
}

/// Progress callbacks, so the CLI can draw a bar and tests can stay quiet.
pub trait Progress {
    fn start(&self, total: usize);
    fn advance(&self, path: &str);
}

impl Progress for () {
    fn start(&self, _: usize) {}
    fn advance(&self, _: &str) {}
}

/// Files are read in chunks this large (as an HTTP body would arrive).
const READ_CHUNK: usize = 256 * 1024;

/// Orders entries so that every path comes after the paths it references (within the set).
fn references_first(entries: &HashMap<StorePathHash, NarInfo>) -> Vec<StorePathHash> {
    let mut indegree: HashMap<StorePathHash, usize> = HashMap::new();
    let mut dependents: HashMap<StorePathHash, Vec<StorePathHash>> = HashMap::new();
    for (h, info) in entries {
        let deps: HashSet<StorePathHash> = info
            .references
            .iter()
            .map(StorePathBaseName::hash)
            .filter(|r| r != h && entries.contains_key(r))
            .collect();
        indegree.insert(*h, deps.len());
        for d in deps {
            dependents.entry(d).or_default().push(*h);
        }
    }
    let mut ready: Vec<StorePathHash> = indegree
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(h, _)| *h)
        .collect();
    ready.sort();
    let mut queue: VecDeque<StorePathHash> = ready.into();
    let mut order = Vec::with_capacity(entries.len());
    while let Some(h) = queue.pop_front() {
        order.push(h);
        for d in dependents.get(&h).into_iter().flatten() {
            if let Some(n) = indegree.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    queue.push_back(*d);
                }
            }
        }
    }
    // A reference cycle cannot happen in a Nix store; if a directory has one anyway, the
    // remaining paths go last and fail the reference check with a clear message.
    let placed: HashSet<StorePathHash> = order.iter().copied().collect();
    let mut rest: Vec<StorePathHash> = entries
        .keys()
        .filter(|h| !placed.contains(h))
        .copied()
        .collect();
    rest.sort();
    order.extend(rest);
    order
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |source| ImportError::Read {
        path: path.to_owned(),
        source,
    }
}

pub async fn import_dir(
    dir: &Path,
    store: &dyn Store,
    uploader: &Uploader,
    store_dir: &str,
    progress: &dyn Progress,
) -> Result<Summary, ImportError> {
    let mut summary = Summary::default();
    let mut entries: HashMap<StorePathHash, NarInfo> = HashMap::new();
    let mut rd = tokio::fs::read_dir(dir).await.map_err(read_err(dir))?;
    while let Some(e) = rd.next_entry().await.map_err(read_err(dir))? {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".narinfo") else {
            continue;
        };
        let Ok(hash) = stem.parse::<StorePathHash>() else {
            summary
                .rejected
                .push((name.clone(), "not a <hash>.narinfo name".into()));
            continue;
        };
        // Bounded like an upload's narinfo, so a huge file is a rejection, not all of memory.
        let mut raw = Vec::new();
        tokio::fs::File::open(e.path())
            .await
            .map_err(read_err(&e.path()))?
            .take(MAX_NARINFO_BYTES + 1)
            .read_to_end(&mut raw)
            .await
            .map_err(read_err(&e.path()))?;
        if raw.len() as u64 > MAX_NARINFO_BYTES {
            let why = format!("larger than {MAX_NARINFO_BYTES} bytes");
            summary.rejected.push((name, why));
            continue;
        }
        match NarInfo::parse_for(&raw, store_dir, hash) {
            Ok(info) => {
                entries.insert(hash, info);
            }
            Err(err) => summary.rejected.push((name, format!("bad narinfo: {err}"))),
        }
    }

    progress.start(entries.len());
    for h in references_first(&entries) {
        let Some(info) = entries.remove(&h) else {
            continue;
        };
        let label = format!("{store_dir}/{}", info.store_path);
        progress.advance(&label);
        if store.head(&object_key::narinfo(h)).await?.is_some() {
            summary.skipped += 1;
            continue;
        }
        match import_one(dir, store, uploader, info).await {
            Ok(()) => summary.imported += 1,
            // The store failing is not this path's fault: stop, and let the next run resume.
            Err(Error::Store(s)) => return Err(s.into()),
            Err(err) => summary.rejected.push((label, err.to_string())),
        }
    }
    Ok(summary)
}

async fn import_one(
    dir: &Path,
    store: &dyn Store,
    uploader: &Uploader,
    info: NarInfo,
) -> Result<(), Error> {
    let h = info.hash();
    let deriver = info.deriver.clone();
    let fetch_nar = |name: NarFileName| async move {
        let path = dir.join("nar").join(name.as_str());
        let file = tokio::fs::File::open(&path).await.map_err(|err| {
            Error::Upload(UploadError::Rejected(format!("{}: {err}", path.display())))
        })?;
        Ok(ReaderStream::with_capacity(file, READ_CHUNK))
    };
    // Import has no upstreams: every reference must be in the store (or imported first).
    uploader.copy_path(info, fetch_nar, None).await?;
    // Extras that come with the path, when the directory has them, streamed and bounded
    // like their HTTP uploads.
    let listing = dir.join(format!("{h}.ls"));
    if let Ok(f) = tokio::fs::File::open(&listing).await {
        let body = ReaderStream::with_capacity(f, READ_CHUNK).boxed();
        uploader
            .put_plain(&object_key::listing(h), body, MAX_LISTING_BYTES)
            .await?;
    }
    if let Some(drv) = &deriver {
        let log = dir.join("log").join(drv.as_str());
        if let Ok(f) = tokio::fs::File::open(&log).await {
            if store.head(&object_key::log(drv)).await?.is_none() {
                let body = ReaderStream::with_capacity(f, READ_CHUNK).boxed();
                uploader
                    .put_plain(&object_key::log(drv), body, MAX_LOG_BYTES)
                    .await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, refs: &[&str]) -> (StorePathHash, NarInfo) {
        let text = format!(
            "StorePath: /nix/store/{name}\nURL: nar/x.nar\nCompression: none\n\
             NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\nNarSize: 1\n\
             References: {}\n",
            refs.join(" ")
        );
        let info = NarInfo::parse(&text, "/nix/store").unwrap();
        (info.hash(), info)
    }

    #[tokio::test]
    async fn a_narinfo_over_the_size_limit_is_rejected_unread() {
        let dir = tempfile::tempdir().unwrap();
        let (hash, _) = entry("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a", &[]);
        let huge = vec![b'x'; MAX_NARINFO_BYTES as usize + 1];
        std::fs::write(dir.path().join(format!("{hash}.narinfo")), huge).unwrap();
        let mem = std::sync::Arc::new(crate::store::memory::MemoryStore::new());
        let store: std::sync::Arc<dyn Store> = mem.clone();
        let cfg = crate::config::Config::default();
        let uploader = Uploader::new(&cfg.upload, "/nix/store", store.clone());
        let s = import_dir(dir.path(), &*store, &uploader, "/nix/store", &())
            .await
            .unwrap();
        assert_eq!(s.rejected.len(), 1, "{:?}", s.rejected);
        assert!(
            s.rejected[0].1.starts_with("larger than"),
            "{:?}",
            s.rejected
        );
        assert!(mem.keys().is_empty());
    }

    #[test]
    fn references_come_first() {
        let a = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a";
        let b = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b";
        let c = "cccccccccccccccccccccccccccccccc-c";
        let d = "dddddddddddddddddddddddddddddddd-d";
        let outside = "ffffffffffffffffffffffffffffffff-f";
        let entries: HashMap<_, _> = [
            entry(a, &[b, c, a]),
            entry(b, &[c, outside]),
            entry(c, &[]),
            entry(d, &[a]),
        ]
        .into_iter()
        .collect();
        let order: Vec<String> = references_first(&entries)
            .iter()
            .map(|h| h.to_string())
            .collect();
        let pos = |p: &str| {
            order
                .iter()
                .position(|h| p.starts_with(h.as_str()))
                .unwrap()
        };
        assert_eq!(order.len(), 4);
        assert!(
            pos(c) < pos(b) && pos(b) < pos(a) && pos(a) < pos(d),
            "{order:?}"
        );
    }
}
