//! Copies of the narinfos a deleting run is about to delete, kept in the store until their
//! batch is settled.
//!
//! A collector writes back a narinfo an upload relied on from the copy it read before
//! deleting it, once it has read the access records again after the batch
//! ([`super::sweep`]; `verify --repair` does the same). A run that died between deleting a
//! batch and that re-read (killed, a power cut, the machine gone) would take its copies with
//! it, and a path an upload wrote meanwhile, relying on one of those narinfos, would be left
//! without it for good. So before a batch is deleted its copies are written to
//! `_cellar/unfinished/<run>`, and they are removed once the batch is settled (the re-read
//! done and what uploads relied on written back).
//!
//! The next run that deletes (`gc --apply`, `verify --repair`) settles what a dead run left,
//! after it has announced itself (so no other run is deleting) and before it lists the store,
//! as the dead run would have after its re-read: it reads the access records written since
//! the day before the file, and writes back each narinfo of the batch that they name (served,
//! or relied on by an upload), with what it needs among the copies, if it is still missing
//! and would be whole (its NAR and references there), references first. Then it removes the
//! file. The rest stays deleted, as the dead run meant.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use futures::TryStreamExt as _;

use super::access::{self, Entry};
use super::RESERVED_PREFIX;
use crate::nix::{references_first, NarInfo, StorePathHash};
use crate::store::{object_key, ObjectInfo, Store, StoreError};

/// Where the copies live, under [`RESERVED_PREFIX`].
pub const DIR: &str = "unfinished/";

const HEADER: &str = "cellar-unfinished 1";

/// No limit on a file's size: a run like this one wrote it from what it held in memory.
const MAX_BYTES: u64 = u64::MAX;

pub fn key(run: &str) -> String {
    format!("{RESERVED_PREFIX}{DIR}{run}")
}

/// Writes the copies of the batch `run` is about to delete (replacing its last batch's).
pub async fn record<'a>(
    store: &dyn Store,
    run: &str,
    copies: impl IntoIterator<Item = (StorePathHash, &'a Bytes)>,
) -> Result<(), StoreError> {
    store.put_bytes(&key(run), render(copies).into()).await
}

/// The header, then each copy as `<hash> <length>`, a newline, its bytes and a newline.
fn render<'a>(copies: impl IntoIterator<Item = (StorePathHash, &'a Bytes)>) -> Vec<u8> {
    let mut out = format!("{HEADER}\n").into_bytes();
    for (h, body) in copies {
        out.extend_from_slice(format!("{h} {}\n", body.len()).as_bytes());
        out.extend_from_slice(body);
        out.push(b'\n');
    }
    out
}

/// Removes `run`'s copies: its batch is settled.
pub async fn clear(store: &dyn Store, run: &str) -> Result<(), StoreError> {
    store.delete(&key(run)).await
}

fn parse(raw: &[u8]) -> Result<Vec<(StorePathHash, Bytes)>, String> {
    let raw = Bytes::copy_from_slice(raw);
    let header = format!("{HEADER}\n");
    if !raw.starts_with(header.as_bytes()) {
        return Err(format!("does not begin with {HEADER:?}"));
    }
    let mut at = header.len();
    let mut out = Vec::new();
    while at < raw.len() {
        let line_end = raw[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|n| at + n)
            .ok_or("an entry's line has no end")?;
        let line = std::str::from_utf8(&raw[at..line_end]).map_err(|_| "an entry is not text")?;
        let (hash, len) = line
            .split_once(' ')
            .ok_or_else(|| format!("{line:?} is not `<hash> <length>`"))?;
        let hash: StorePathHash = hash.parse().map_err(|e| format!("{hash:?}: {e}"))?;
        let len: usize = len
            .parse()
            .map_err(|_| format!("{len:?} is not a length"))?;
        let start = line_end + 1;
        let end = start
            .checked_add(len)
            .filter(|&end| end < raw.len() && raw[end] == b'\n')
            .ok_or_else(|| format!("the copy of {hash}.narinfo is cut short"))?;
        out.push((hash, raw.slice(start..end)));
        at = end + 1;
    }
    Ok(out)
}

/// Settles the batches of runs that died while deleting (every file but `own`'s): writes back
/// what is still missing and whole, and removes the files. Returns what it did and why it
/// left a copy out, a line each. A store error stops it (the run that called it must not
/// delete: the NAR of a narinfo still to be written back could be among what it deletes).
pub async fn settle(
    store: &dyn Store,
    own: &str,
    store_dir: &str,
) -> Result<Vec<String>, StoreError> {
    let own = key(own);
    let files: Vec<ObjectInfo> = store
        .list(&format!("{RESERVED_PREFIX}{DIR}"))
        .try_filter(|o| futures::future::ready(o.key != own && !o.key.ends_with('/')))
        .try_collect()
        .await?;
    let Some(since) = files.iter().map(|f| f.modified).min() else {
        return Ok(Vec::new());
    };
    // What servers used since: what the dead runs' re-reads would have found. If the records
    // cannot all be read (a damaged upload record, which only `verify --repair` removes),
    // every whole copy is written back: more than needed, never less.
    let mut said = Vec::new();
    // The dead run last looked before it wrote the file, by as long as reading its batch took
    // (a store timing out, a pause): the records are read from the day before.
    let day_before = since
        .checked_sub(std::time::Duration::from_secs(86_400))
        .unwrap_or(since);
    let mut acc = access::Accessed::since(day_before);
    let used = match access::reread(store, &mut acc, store.now()).await {
        Ok(entries) => {
            let mut used = Used::default();
            for e in entries {
                match e {
                    Entry::Path(h) => {
                        used.paths.insert(h);
                    }
                    Entry::Nar(f) => {
                        used.nars.insert(f);
                    }
                }
            }
            Some(used)
        }
        Err(e) => {
            said.push(format!(
                "the access records since a run stopped while deleting could not all be read \
                 ({e}): every whole copy it left is written back"
            ));
            None
        }
    };
    for file in &files {
        let Some(raw) = store.get_bytes(&file.key, MAX_BYTES).await? else {
            continue;
        };
        match parse(&raw) {
            Ok(copies) => said.extend(restore(store, store_dir, copies, used.as_ref()).await?),
            Err(why) => said.push(format!("{}: {why}; removed", file.key)),
        }
        store.delete(&file.key).await?;
    }
    for line in &said {
        tracing::warn!("{line}");
    }
    Ok(said)
}

/// Paths and NAR files named by access records.
#[derive(Default)]
struct Used {
    paths: HashSet<StorePathHash>,
    nars: HashSet<Box<str>>,
}

/// Writes back the copies still missing that `used` names (all of them without `used`), with
/// the copies they need, if their NAR and references are there; references first.
async fn restore(
    store: &dyn Store,
    store_dir: &str,
    copies: Vec<(StorePathHash, Bytes)>,
    used: Option<&Used>,
) -> Result<Vec<String>, StoreError> {
    let mut said = Vec::new();
    // The copies still missing: parsed, and as they were stored.
    let mut missing: HashMap<StorePathHash, NarInfo> = HashMap::new();
    let mut bodies: HashMap<StorePathHash, Bytes> = HashMap::new();
    for (h, body) in copies {
        let key = object_key::narinfo(h);
        if store.head(&key).await?.is_some() {
            continue;
        }
        match NarInfo::parse_for(&body, store_dir, h) {
            Ok(info) => {
                missing.insert(h, info);
                bodies.insert(h, body);
            }
            Err(e) => said.push(format!("not writing back {key}: {e}")),
        }
    }
    // Named, and what they need among the copies (a path relied on keeps its closure).
    let mut wanted: Vec<StorePathHash> = missing
        .iter()
        .filter(|(h, info)| {
            used.is_none_or(|used| {
                used.paths.contains(*h)
                    || info
                        .nar_file()
                        .is_ok_and(|f| used.nars.contains(f.as_str()))
            })
        })
        .map(|(h, _)| *h)
        .collect();
    let mut needed: HashSet<StorePathHash> = HashSet::new();
    while let Some(h) = wanted.pop() {
        if needed.insert(h) {
            wanted.extend(
                missing[&h]
                    .references
                    .iter()
                    .map(|r| r.hash())
                    .filter(|r| missing.contains_key(r)),
            );
        }
    }
    let mut back: HashSet<StorePathHash> = HashSet::new();
    for h in references_first(&missing) {
        if !needed.contains(&h) {
            continue;
        }
        let (body, info) = (&bodies[&h], &missing[&h]);
        let key = object_key::narinfo(h);
        if let Some(why) = incomplete(store, h, info, &back).await? {
            said.push(format!(
                "not writing back {key}, left by a run that stopped while deleting it: {why}"
            ));
            continue;
        }
        super::sweep::write_back(store, &key, body).await?;
        back.insert(h);
        said.push(format!(
            "wrote back {key}, left by a run that stopped while deleting it"
        ));
    }
    let left = missing.len() - needed.len();
    if left > 0 {
        said.push(format!(
            "{left} narinfos a run that stopped while deleting them left stay deleted: \
             nobody used them since"
        ));
    }
    Ok(said)
}

/// Why `info` would not be whole if written back now (`back`: written back just before).
async fn incomplete(
    store: &dyn Store,
    h: StorePathHash,
    info: &NarInfo,
    back: &HashSet<StorePathHash>,
) -> Result<Option<String>, StoreError> {
    let nar = match info.nar_file() {
        Ok(f) => f,
        Err(e) => return Ok(Some(e.to_string())),
    };
    if store.head(&object_key::nar(&nar)).await?.is_none() {
        return Ok(Some(format!("its NAR {} is gone", info.url)));
    }
    for r in &info.references {
        let rh = r.hash();
        if rh == h || back.contains(&rh) {
            continue;
        }
        if store.head(&object_key::narinfo(rh)).await?.is_none() {
            return Ok(Some(format!("its reference {r} is gone")));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_read_back_as_written() {
        let a: StorePathHash = "0c6kzph7q0gbwm8yd1bhcxvq58a1f5xq".parse().unwrap();
        let b: StorePathHash = "1c6kzph7q0gbwm8yd1bhcxvq58a1f5xq".parse().unwrap();
        let (x, y) = (
            Bytes::from("StorePath: x\n"),
            Bytes::from("with\nlines \n\n"),
        );
        let raw = render([(a, &x), (b, &y)]);
        assert_eq!(parse(&raw).unwrap(), vec![(a, x), (b, y)]);
        assert!(parse(&raw[..raw.len() - 2]).is_err(), "cut short");
        assert!(
            parse(&raw[..raw.len() - 1]).is_err(),
            "without its last newline"
        );
        assert!(parse(b"something else\n").is_err());
        assert_eq!(parse(&render([])).unwrap(), vec![]);
    }
}
