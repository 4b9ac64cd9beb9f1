//! Every narinfo of the store, read once into a compact reference graph: a node per narinfo
//! (indexed like the sorted inventory), its references as node indices, the NAR it points to.
//! About 200 bytes per path plus 4 per reference, so 100k paths take about 25 MiB.

use std::collections::HashMap;
use std::time::SystemTime;

use futures::StreamExt as _;

use super::inventory::Inventory;
use super::report::Progress;
use crate::nix::{NarFileName, NarInfo, StorePathBaseName, StorePathHash, MAX_NARINFO_BYTES};
use crate::store::{object_key, Store, StoreError};

/// How many narinfos are read at once: enough to hide S3 latency, few enough to stay polite.
const READ_CONCURRENCY: usize = 32;

/// Why a narinfo cannot be served as it is, whatever else the store holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Not UTF-8, or not a narinfo.
    Unparseable(String),
    /// Its `StorePath:` has another hash than its key.
    WrongHash(String),
    /// Its `URL:` is not `nar/<file>`.
    BadUrl(String),
    /// It vanished between the listing and the read (another collector, a repair).
    Gone,
    /// Stored with a `Content-Encoding` cellar does not decode (Nix's `narinfo-compression`):
    /// a narinfo, but which NAR and references it names is unknown, so nothing may be deleted
    /// on the strength of this graph (gc and repairs refuse to run).
    Encoded(String),
    /// Its `StorePath:` lies in another store directory than this run's `store_dir`: most
    /// likely the run's configuration is not the servers' (every narinfo would then look
    /// unparseable, and be deleted with its NAR), so gc and repairs refuse to run.
    OtherStoreDir(String),
    /// The store failed to read it (a file the run's user may not read, an I/O error) while
    /// it answered for the others: what it names is unknown, so, as for [`Problem::Encoded`],
    /// verify reports it and goes on, and gc and repairs delete nothing.
    Unreadable(String),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub hash: StorePathHash,
    pub modified: SystemTime,
    pub narinfo_size: u64,
    /// References to other nodes, without the path itself.
    pub refs: Box<[u32]>,
    /// References to paths that have no narinfo at all.
    pub missing_refs: Box<[StorePathHash]>,
    /// The NAR's file name (`URL:` without `nar/`).
    pub nar: Option<Box<str>>,
    pub file_size: Option<u64>,
    pub deriver: Option<StorePathHash>,
    pub problem: Option<Problem>,
    /// The base name, for messages and pins.
    pub name: Box<str>,
}

pub struct Graph {
    pub nodes: Vec<Node>,
    index: HashMap<StorePathHash, u32>,
}

/// What one narinfo says, before references are resolved to nodes.
pub struct Parsed {
    pub refs: Vec<StorePathHash>,
    pub nar: Option<Box<str>>,
    pub file_size: Option<u64>,
    pub deriver: Option<StorePathHash>,
    pub problem: Option<Problem>,
    pub name: Box<str>,
}

/// A narinfo stored under `h` whose contents are unknown, for `problem`.
fn unknown(h: StorePathHash, problem: Problem) -> Parsed {
    Parsed {
        refs: Vec::new(),
        nar: None,
        file_size: None,
        deriver: None,
        problem: Some(problem),
        name: h.as_str().into(),
    }
}

/// Parses the narinfo stored under `h` (`None`: it is gone).
pub fn parse(h: StorePathHash, raw: Option<&[u8]>, store_dir: &str) -> Parsed {
    let fail = |p: Problem| Parsed {
        refs: Vec::new(),
        nar: None,
        file_size: None,
        deriver: None,
        problem: Some(p),
        name: h.as_str().into(),
    };
    let Some(raw) = raw else {
        return fail(Problem::Gone);
    };
    let info = match NarInfo::parse_bytes(raw, store_dir) {
        Ok(i) => i,
        Err(e) => {
            if let Some(path) = other_store_dir(raw, store_dir) {
                return fail(Problem::OtherStoreDir(format!(
                    "StorePath {path} is not in store_dir {store_dir}: is `store_dir` (or \
                     CELLAR_STORE_DIR) the servers' one?"
                )));
            }
            // What it still names, as far as it reads, stays: a narinfo kept (used, pinned,
            // within the grace period) keeps its NAR and references whatever else it holds.
            let (refs, nar) = still_named(raw, h);
            return Parsed {
                refs,
                nar,
                ..fail(Problem::Unparseable(e.to_string()))
            };
        }
    };
    // A narinfo under the wrong name still names its references and NAR: they stay in the
    // graph (so nothing is collected because of it) while verify reports it.
    let mut problem = info
        .check_name(store_dir, h)
        .err()
        .map(|e| Problem::WrongHash(e.to_string()));
    let nar = match info.nar_file() {
        Ok(f) => Some(f.as_str().into()),
        Err(_) => {
            problem.get_or_insert(Problem::BadUrl(info.url.clone()));
            None
        }
    };
    Parsed {
        refs: info
            .references
            .iter()
            .map(|r| r.hash())
            .filter(|r| *r != h)
            .collect(),
        nar,
        file_size: info.file_size,
        deriver: info.deriver.as_ref().map(|d| d.hash()),
        problem,
        name: info.store_path.as_str().into(),
    }
}

/// The `StorePath:` of `raw` if it is a path outside `store_dir`.
fn other_store_dir<'a>(raw: &'a [u8], store_dir: &str) -> Option<&'a str> {
    let path = std::str::from_utf8(raw)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("StorePath: "))?;
    let inside = path
        .strip_prefix(store_dir)
        .is_some_and(|rest| rest.starts_with('/'));
    (path.starts_with('/') && !inside).then_some(path)
}

/// The references (not `h` itself) and NAR file that the lines of an unparseable narinfo
/// still name in a form they can be read in.
fn still_named(raw: &[u8], h: StorePathHash) -> (Vec<StorePathHash>, Option<Box<str>>) {
    let text = String::from_utf8_lossy(raw);
    let mut refs = Vec::new();
    let mut nar = None;
    for line in text.lines() {
        if let Some(list) = line.strip_prefix("References:") {
            refs.extend(
                list.split(' ')
                    .filter_map(|r| r.parse::<StorePathBaseName>().ok())
                    .map(|r| r.hash())
                    .filter(|r| *r != h),
            );
        } else if let Some(url) = line.strip_prefix("URL: ") {
            let file = url
                .strip_prefix("nar/")
                .and_then(|f| f.parse::<NarFileName>().ok());
            nar = nar.or(file.map(|f| f.as_str().into()));
        }
    }
    (refs, nar)
}

impl Graph {
    /// Reads every narinfo the inventory lists.
    pub async fn load(
        store: &dyn Store,
        inv: &Inventory,
        store_dir: &str,
        progress: &dyn Progress,
    ) -> Result<Self, StoreError> {
        let index: HashMap<StorePathHash, u32> = inv
            .narinfos
            .iter()
            .enumerate()
            .map(|(i, (h, _))| (*h, i as u32))
            .collect();
        let mut graph = Graph {
            nodes: Vec::with_capacity(inv.narinfos.len()),
            index,
        };
        progress.phase("reading narinfos", Some(inv.narinfos.len() as u64));
        let mut reads = futures::stream::iter(inv.narinfos.iter().map(|(h, _)| async move {
            let raw = store
                .get_bytes(&object_key::narinfo(*h), MAX_NARINFO_BYTES)
                .await;
            (*h, raw)
        }))
        .buffered(READ_CONCURRENCY);
        while let Some((h, raw)) = reads.next().await {
            let parsed = match raw {
                Ok(raw) => parse(h, raw.as_deref(), store_dir),
                // A narinfo too large to be one is as unservable as one that does not parse.
                Err(StoreError::TooLarge { .. }) => Parsed {
                    problem: Some(Problem::Unparseable(format!(
                        "larger than {MAX_NARINFO_BYTES} bytes"
                    ))),
                    ..parse(h, Some(b""), store_dir)
                },
                // One cellar cannot decode (written with `narinfo-compression`): reported by
                // verify; gc and repairs refuse to run (see `Graph::encoded`).
                Err(e @ StoreError::Encoded { .. }) => unknown(h, Problem::Encoded(e.to_string())),
                // One the store failed to read while it reads the others (a file the run's
                // user may not read): reported by verify, which goes on; gc and repairs
                // refuse to run. A store that does not answer at all stops the run.
                Err(StoreError::Other(e)) => unknown(h, Problem::Unreadable(e)),
                Err(e) => return Err(e),
            };
            let meta = inv.narinfos[graph.nodes.len()].1;
            let node = graph.node(h, meta.modified, meta.size, parsed);
            graph.nodes.push(node);
            progress.advance(1);
        }
        Ok(graph)
    }

    /// Why nothing may be deleted by this graph, if so: a narinfo stored encoded or that
    /// could not be read (what it names is unknown, so deleting could take its NAR or
    /// references), or one in another store directory (this run's `store_dir` is likely not
    /// the servers').
    pub fn refuses_deletion(&self) -> Option<&str> {
        self.nodes.iter().find_map(|n| match &n.problem {
            Some(
                Problem::Encoded(reason)
                | Problem::OtherStoreDir(reason)
                | Problem::Unreadable(reason),
            ) => Some(reason.as_str()),
            _ => None,
        })
    }

    /// Builds the node for `h` against the nodes this graph knows.
    pub fn node(
        &self,
        hash: StorePathHash,
        modified: SystemTime,
        narinfo_size: u64,
        p: Parsed,
    ) -> Node {
        let mut refs = Vec::with_capacity(p.refs.len());
        let mut missing = Vec::new();
        for r in p.refs {
            match self.index.get(&r) {
                Some(&i) => refs.push(i),
                None => missing.push(r),
            }
        }
        Node {
            hash,
            modified,
            narinfo_size,
            refs: refs.into(),
            missing_refs: missing.into(),
            nar: p.nar,
            file_size: p.file_size,
            deriver: p.deriver,
            problem: p.problem,
            name: p.name,
        }
    }

    pub fn find(&self, h: StorePathHash) -> Option<u32> {
        self.index.get(&h).copied()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The nodes whose narinfo names each NAR file (several may share one).
    pub fn nar_users(&self) -> HashMap<&str, Vec<u32>> {
        let mut users: HashMap<&str, Vec<u32>> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(f) = n.nar.as_deref() {
                users.entry(f).or_default().push(i as u32);
            }
        }
        users
    }

    /// Marks `start` and everything it refers to, transitively, in `marked`; returns the
    /// nodes newly marked.
    pub fn close_over(&self, start: u32, marked: &mut [bool]) -> Vec<u32> {
        let mut newly = Vec::new();
        let mut stack = vec![start];
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut marked[i as usize], true) {
                continue;
            }
            newly.push(i);
            stack.extend(self.nodes[i as usize].refs.iter().copied());
        }
        newly
    }
}
