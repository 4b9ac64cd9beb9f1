//! Property test: any interleaving of uploads, reads, access-record writes, pins, clock
//! advances and garbage collections over random reference graphs, on the local directory
//! store, keeps the invariants:
//!
//! - every narinfo left has its NAR and the narinfos of all its references;
//! - every root's closure is still there (pinned, used within the retention, or younger than
//!   the grace period);
//! - nothing younger than the grace period is deleted.
//!
//! The clock is simulated: every object written is given the simulated time as its
//! modification time, and each collection runs at the simulated now.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod gc_support;

use std::collections::{HashMap, HashSet};
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cellar::config::GcConfig;
use cellar::gc::{self, access::AccessLog, Quiet};
use cellar::nix::NarInfo;
use cellar::store::local::LocalStore;
use cellar::store::Store;
use gc_support::Path;
use proptest::prelude::*;

const HOUR: Duration = Duration::from_secs(3600);
const PATHS: usize = 10;

#[derive(Debug, Clone)]
enum Op {
    Upload(usize),
    /// An upload in progress: the NAR is written, the narinfo not yet.
    UploadNar(usize),
    Read(usize),
    Flush,
    Pin(usize),
    Unpin(usize),
    Advance(u64),
    Gc,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..PATHS).prop_map(Op::Upload),
        1 => (0..PATHS).prop_map(Op::UploadNar),
        3 => (0..PATHS).prop_map(Op::Read),
        2 => Just(Op::Flush),
        1 => (0..PATHS).prop_map(Op::Pin),
        1 => (0..PATHS).prop_map(Op::Unpin),
        3 => (1u64..40).prop_map(|h| Op::Advance(h * 3)),
        3 => Just(Op::Gc),
    ]
}

/// Path i may refer to any path before it.
fn dag() -> impl Strategy<Value = Vec<Vec<usize>>> {
    (0..PATHS)
        .map(|i| proptest::sample::subsequence((0..i).collect::<Vec<_>>(), 0..=i.min(3)))
        .collect::<Vec<_>>()
}

struct World {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    log: AccessLog,
    paths: Vec<Path>,
    real_start: SystemTime,
    now: SystemTime,
    cfg: GcConfig,
    /// Model: when each path was last uploaded or used (as the collector can know it).
    uploaded: HashMap<usize, SystemTime>,
    used: HashMap<usize, SystemTime>,
    pending_reads: HashSet<usize>,
    pinned: HashSet<usize>,
}

impl World {
    fn exists(&self, key: &str) -> bool {
        self.dir.path().join(key).is_file()
    }

    fn present(&self, i: usize) -> bool {
        self.exists(&self.paths[i].narinfo_key())
    }

    /// Gives every object written since the last call the simulated time.
    fn stamp(&self) {
        for f in files(self.dir.path()) {
            let m = std::fs::metadata(&f).unwrap().modified().unwrap();
            if m >= self.real_start {
                let file = std::fs::File::options().write(true).open(&f).unwrap();
                file.set_modified(self.now).unwrap();
            }
        }
    }

    fn closure(&self, roots: impl IntoIterator<Item = usize>) -> HashSet<usize> {
        let mut seen = HashSet::new();
        let mut stack: Vec<usize> = roots.into_iter().collect();
        while let Some(i) = stack.pop() {
            if seen.insert(i) {
                stack.extend(self.paths[i].refs.iter().map(|r| self.index_of(r)));
            }
        }
        seen
    }

    fn index_of(&self, base: &str) -> usize {
        self.paths.iter().position(|p| p.base() == base).unwrap()
    }

    fn is_root(&self, i: usize) -> bool {
        let within = |t: Option<&SystemTime>, d: Duration| {
            t.is_some_and(|t| self.now.duration_since(*t).unwrap_or_default() < d)
        };
        self.pinned.contains(&i)
            || within(self.uploaded.get(&i), self.cfg.grace.max(self.cfg.keep))
            || within(self.used.get(&i), self.cfg.keep)
    }

    async fn apply(&mut self, op: &Op, refs: &[Vec<usize>]) {
        match *op {
            Op::Upload(i) => {
                // What `nix copy --to` does: the missing paths of the closure, references
                // first, each recorded before it is checked and written.
                let mut closure: Vec<usize> = self.closure([i]).into_iter().collect();
                closure.sort_unstable();
                closure.retain(|&j| !self.present(j));
                for j in closure {
                    let p = &self.paths[j];
                    let info = NarInfo::parse(&p.narinfo(), "/nix/store").unwrap();
                    self.log.record_upload(&info, &[&p.nar_file]).await.unwrap();
                    self.store
                        .put_bytes(&p.nar_key(), Bytes::from(p.nar.clone()))
                        .await
                        .unwrap();
                    self.store
                        .put_bytes(&p.narinfo_key(), Bytes::from(p.narinfo()))
                        .await
                        .unwrap();
                    self.uploaded.insert(j, self.now);
                    for k in std::iter::once(j).chain(refs[j].iter().copied()) {
                        self.used.insert(k, self.now);
                    }
                }
            }
            Op::UploadNar(i) => {
                let p = &self.paths[i];
                self.store
                    .put_bytes(&p.nar_key(), Bytes::from(p.nar.clone()))
                    .await
                    .unwrap();
            }
            Op::Read(i) => {
                if self.present(i) {
                    self.log.record_path(self.paths[i].hash.parse().unwrap());
                    self.pending_reads.insert(i);
                }
            }
            Op::Flush => {
                self.log.flush().await.unwrap();
                for i in self.pending_reads.drain() {
                    self.used.insert(i, self.now);
                }
            }
            Op::Pin(i) => {
                let base = self.paths[i].base().parse().unwrap();
                gc::pins::add(
                    self.store.as_ref(),
                    &format!("p{i}"),
                    vec![base],
                    None,
                    "/nix/store",
                )
                .await
                .unwrap();
                self.pinned.insert(i);
            }
            Op::Unpin(i) => {
                if self.pinned.remove(&i) {
                    gc::pins::remove(self.store.as_ref(), &format!("p{i}"))
                        .await
                        .unwrap();
                }
            }
            Op::Advance(hours) => self.now += HOUR * hours as u32,
            Op::Gc => self.gc().await,
        }
        self.stamp();
    }

    async fn gc(&mut self) {
        let before: Vec<(std::path::PathBuf, SystemTime)> = files(self.dir.path())
            .into_iter()
            .map(|f| {
                let m = std::fs::metadata(&f).unwrap().modified().unwrap();
                (f, m)
            })
            .collect();
        let roots: Vec<usize> = (0..PATHS)
            .filter(|&i| self.present(i) && self.is_root(i))
            .collect();
        let must_keep = self.closure(roots);
        let opts = gc::Options {
            apply: true,
            now: self.now,
            // The operations run one after another: no upload overlaps a collection.
            settle: Duration::ZERO,
            stop: Default::default(),
        };
        let s = gc::run(&self.store, "/nix/store", &self.cfg, &opts, &Quiet)
            .await
            .unwrap();
        assert!(s.errors.is_empty(), "{s}");

        for i in must_keep {
            assert!(self.present(i), "root closure member {i} deleted\n{s}");
        }
        let grace_cutoff = self.now - self.cfg.grace;
        for (f, m) in before {
            assert!(
                m <= grace_cutoff || f.is_file(),
                "{} was younger than the grace period",
                f.display()
            );
        }
        for i in (0..PATHS).filter(|&i| self.present(i)) {
            assert!(
                self.exists(&self.paths[i].nar_key()),
                "narinfo {i} lost its NAR"
            );
            for r in &self.paths[i].refs {
                assert!(
                    self.present(self.index_of(r)),
                    "narinfo {i} lost reference {r}"
                );
            }
        }
        // Forget what the collector deleted.
        for i in 0..PATHS {
            if !self.present(i) {
                self.uploaded.remove(&i);
            }
        }
    }
}

fn files(dir: &FsPath) -> Vec<std::path::PathBuf> {
    common::walk(dir)
        .into_iter()
        .filter(|p| !p.components().any(|c| c.as_os_str() == ".staging"))
        .collect()
}

fn world(refs: &[Vec<usize>]) -> World {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path()).unwrap());
    let mut paths: Vec<Path> = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let deps: Vec<&Path> = r.iter().map(|&j| &paths[j]).collect();
        let p = Path::new(&format!("prop-{i}"), 32 + i, &deps);
        paths.push(p);
    }
    let real_start = SystemTime::now();
    World {
        log: AccessLog::new(store.clone(), 10_000),
        dir,
        store,
        paths,
        real_start,
        // Simulated time stays far before the real one, so new objects are recognisable.
        now: real_start - Duration::from_secs(1000 * 86400),
        cfg: GcConfig {
            keep: 48 * HOUR,
            grace: 24 * HOUR,
            ..GcConfig::default()
        },
        uploaded: HashMap::new(),
        used: HashMap::new(),
        pending_reads: HashSet::new(),
        pinned: HashSet::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn gc_keeps_closures_roots_and_young_objects(refs in dag(), ops in proptest::collection::vec(op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut w = world(&refs);
            for op in &ops {
                w.apply(op, &refs).await;
            }
            w.apply(&Op::Gc, &refs).await;
        });
    }
}
