//! The `.narinfo` format.
//!
//! A narinfo is a list of `Key: value` lines describing one store path and where its NAR is:
//!
//! ```text
//! StorePath: /nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top
//! URL: nar/07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz
//! Compression: xz
//! FileHash: sha256:07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7
//! FileSize: 300
//! NarHash: sha256:0v1h8fzqs60d8pccpwskrpnv3c7fz25ddhwl2rwlfblan5zvirsv
//! NarSize: 624
//! References: 20lja0xsjl4xlgskydbpsrass06a5s67-closure.nix a6qsrmi2wws6820p89gki93wb6rjvknc-leaf
//! Deriver: 7d6lwmyccalgxawxbva0c5in599fd8vi-top.drv
//! Sig: test-1:mbtf5wmBtrMQCHnVpWCZlJGiFC5JYhTHoK2doDUqUIcx4J6vXRDjNRdRFmY96Ai6hxXiAjaviyjzF10WhNx/Dg==
//! ```
//!
//! Parsing is strict where the Nix client is (a missing `URL`, `NarHash` or `NarSize`, CRLF line
//! endings are errors) so a corrupt object is reported as such instead of being served; unknown
//! fields are kept and rendered back. A missing `Compression:` means bzip2. A `Sig:` that is not
//! `<name>:<base64 of 64 bytes>` is dropped: no key verifies it.
//!
//! Signatures cover only the fingerprint `1;<StorePath>;<NarHash>;<NarSize>;<refs>`, not the URL,
//! Compression, FileHash or FileSize fields.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;

use thiserror::Error;

use super::compression::Compression;
use super::hash::{Sha256, StorePathHash};
use super::names::{NameError, NarFileName, StorePathBaseName};
use super::signing::{PublicKey, SecretKey, Signature};

/// Narinfos larger than this are treated as corrupt, wherever they come from (the store, an
/// upload, an upstream): a path with 100k references is ~5 MiB.
pub const MAX_NARINFO_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("not UTF-8")]
    NotUtf8,
    /// Served or uploaded under the name of another path: trusting it would serve one path's
    /// NAR for another.
    #[error("StorePath {path} does not match the name {expected}.narinfo")]
    WrongPath {
        path: String,
        expected: StorePathHash,
    },
    #[error("line {0}: carriage return (CRLF line endings are not accepted)")]
    CarriageReturn(usize),
    #[error("line {0}: expected `Key: value`")]
    NoColon(usize),
    #[error("line {line}: field {field} appears twice")]
    Duplicate { line: usize, field: &'static str },
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("line {line}: bad {field}: {reason}")]
    Bad {
        line: usize,
        field: &'static str,
        reason: String,
    },
    /// A narinfo of the store whose `URL:` names no NAR cellar serves.
    #[error(transparent)]
    Url(#[from] NarUrlError),
}

/// Why a narinfo's `URL:` names no NAR this cache could serve.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum NarUrlError {
    #[error("URL {0:?} must be nar/<file>")]
    NotUnderNar(String),
    #[error("URL {url:?}: {source}")]
    BadName { url: String, source: NameError },
}

/// A parsed narinfo. `store_dir` is kept outside (it is a property of the cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// The store path's base name (`<hash>-<name>`); `StorePath:` is `<store_dir>/<this>`.
    pub store_path: StorePathBaseName,
    pub url: String,
    pub compression: Compression,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: Vec<StorePathBaseName>,
    pub deriver: Option<StorePathBaseName>,
    pub system: Option<String>,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
    /// Fields this parser does not know, in their original order.
    pub extra: Vec<(String, String)>,
}

fn store_base_name(
    store_dir: &str,
    value: &str,
    line: usize,
    field: &'static str,
) -> Result<StorePathBaseName, NarInfoError> {
    let bad = |reason: String| NarInfoError::Bad {
        line,
        field,
        reason,
    };
    let rest = value
        .strip_prefix(store_dir)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| bad(format!("{value:?} is not in store dir {store_dir}")))?;
    rest.parse().map_err(|e| bad(format!("{e}")))
}

impl NarInfo {
    pub fn hash(&self) -> StorePathHash {
        self.store_path.hash()
    }

    /// Parses the bytes found under `<expected>.narinfo` (in the store, in an upload, at an
    /// upstream): a narinfo whose `StorePath:` lies in `store_dir` and has the hash `expected`.
    /// The size limit ([`MAX_NARINFO_BYTES`]) is the reader's to apply, before the bytes are
    /// all in memory.
    pub fn parse_for(
        raw: &[u8],
        store_dir: &str,
        expected: StorePathHash,
    ) -> Result<Self, NarInfoError> {
        let info = Self::parse_bytes(raw, store_dir)?;
        info.check_name(store_dir, expected)?;
        Ok(info)
    }

    /// Parses stored bytes (UTF-8, then [`NarInfo::parse`]) without checking whose they are;
    /// [`NarInfo::parse_for`] is the one to use unless the caller reports a wrong name apart
    /// from the rest (as `cellar verify` does).
    pub fn parse_bytes(raw: &[u8], store_dir: &str) -> Result<Self, NarInfoError> {
        let text = std::str::from_utf8(raw).map_err(|_| NarInfoError::NotUtf8)?;
        Self::parse(text, store_dir)
    }

    /// Whether this narinfo may be stored under `<expected>.narinfo`: its `StorePath:` must
    /// have that hash (else one path's name would hand out another path's NAR).
    pub fn check_name(&self, store_dir: &str, expected: StorePathHash) -> Result<(), NarInfoError> {
        if self.hash() == expected {
            return Ok(());
        }
        Err(NarInfoError::WrongPath {
            path: format!("{store_dir}/{}", self.store_path),
            expected,
        })
    }

    /// The NAR's name under `nar/`, from `URL:`. NARs are served (and uploads accepted) only
    /// there, so a URL elsewhere (absolute, another folder) is refused rather than followed.
    pub fn nar_file(&self) -> Result<NarFileName, NarUrlError> {
        let file = self
            .url
            .strip_prefix("nar/")
            .ok_or_else(|| NarUrlError::NotUnderNar(self.url.clone()))?;
        file.parse().map_err(|source| NarUrlError::BadName {
            url: self.url.clone(),
            source,
        })
    }

    /// Parses a narinfo whose `StorePath:` must lie in `store_dir` (e.g. `/nix/store`).
    pub fn parse(text: &str, store_dir: &str) -> Result<Self, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut system = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        let mut extra = Vec::new();

        fn set<T>(
            slot: &mut Option<T>,
            v: T,
            line: usize,
            field: &'static str,
        ) -> Result<(), NarInfoError> {
            if slot.is_some() {
                return Err(NarInfoError::Duplicate { line, field });
            }
            *slot = Some(v);
            Ok(())
        }

        // The references a narinfo names are what cellar's signature vouches for, so a list
        // cut short must not pass for a whole one: `References:` is required (Nix, nix-serve,
        // harmonia and cellar always write it, empty for none), and a `References:` line that
        // ends the text without a newline is taken for cut short (every writer ends each
        // line with one).
        let cut_line = (!text.ends_with('\n')).then(|| text.split('\n').count());
        for (i, raw) in text.split('\n').enumerate() {
            let line = i + 1;
            if raw.contains('\r') {
                return Err(NarInfoError::CarriageReturn(line));
            }
            if raw.is_empty() {
                continue;
            }
            let (key, value) = raw
                .split_once(": ")
                .or_else(|| {
                    // `References:` with nothing after it may lack the trailing space.
                    raw.strip_suffix(':').map(|k| (k, ""))
                })
                .ok_or(NarInfoError::NoColon(line))?;
            let bad = |field: &'static str, reason: String| NarInfoError::Bad {
                line,
                field,
                reason,
            };
            let num = |field: &'static str| {
                value
                    .parse::<u64>()
                    .map_err(|_| bad(field, format!("{value:?} is not a number")))
            };
            let hash = |field: &'static str| {
                value
                    .parse::<Sha256>()
                    .map_err(|e| bad(field, e.to_string()))
            };
            match key {
                "StorePath" => set(
                    &mut store_path,
                    store_base_name(store_dir, value, line, "StorePath")?,
                    line,
                    "StorePath",
                )?,
                "URL" => {
                    if value.is_empty() || value.contains(char::is_whitespace) {
                        return Err(bad("URL", format!("{value:?}")));
                    }
                    set(&mut url, value.to_owned(), line, "URL")?
                }
                // Empty, as absent, is bzip2 to Nix (nar-info.cc), not none.
                "Compression" => set(
                    &mut compression,
                    match value {
                        "" => Compression::Bzip2,
                        v => v.parse().map_err(|e| bad("Compression", e))?,
                    },
                    line,
                    "Compression",
                )?,
                "FileHash" => set(&mut file_hash, hash("FileHash")?, line, "FileHash")?,
                "FileSize" => set(&mut file_size, num("FileSize")?, line, "FileSize")?,
                "NarHash" => set(&mut nar_hash, hash("NarHash")?, line, "NarHash")?,
                "NarSize" => match num("NarSize")? {
                    // No NAR is empty (its header alone is 13 bytes), and Nix refuses such a
                    // narinfo as corrupt ("NarSize missing or zero").
                    0 => return Err(bad("NarSize", "zero".into())),
                    n => set(&mut nar_size, n, line, "NarSize")?,
                },
                "References" => {
                    if cut_line == Some(line) {
                        return Err(bad(
                            "References",
                            "cut short (the last line, with no newline after it)".into(),
                        ));
                    }
                    let refs = value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(|r| r.parse().map_err(|e| bad("References", format!("{e}"))))
                        .collect::<Result<Vec<_>, _>>()?;
                    set(&mut references, refs, line, "References")?
                }
                "Deriver" => {
                    // Nix writes `unknown-deriver` in some old caches; treat it as absent.
                    if value != "unknown-deriver" {
                        let d = value.parse().map_err(|e| bad("Deriver", format!("{e}")))?;
                        set(&mut deriver, d, line, "Deriver")?
                    }
                }
                "System" => set(&mut system, value.to_owned(), line, "System")?,
                // A signature that cannot be read could never verify, and Nix throws on one
                // under a key it trusts ("signature is not valid"): it is dropped, the narinfo
                // kept (it is served with this cache's own signature).
                "Sig" => sigs.extend(value.parse::<Signature>().ok()),
                "CA" => {
                    // Nix reads an empty `CA:` as none.
                    if !value.is_empty() {
                        super::hash::check_content_address(value).map_err(|e| bad("CA", e))?;
                        set(&mut ca, value.to_owned(), line, "CA")?
                    }
                }
                other => {
                    // Nix splits a line at its first `:`: `References:x: y` is a second
                    // `References` to it, so such a key is refused rather than passed on.
                    if other.is_empty()
                        || other.contains(char::is_whitespace)
                        || other.contains(':')
                    {
                        return Err(NarInfoError::NoColon(line));
                    }
                    extra.push((other.to_owned(), value.to_owned()))
                }
            }
        }

        Ok(Self {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url: url.ok_or(NarInfoError::Missing("URL"))?,
            compression: compression.unwrap_or(Compression::Bzip2),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size: nar_size.ok_or(NarInfoError::Missing("NarSize"))?,
            references: references.ok_or(NarInfoError::Missing("References"))?,
            deriver,
            system,
            sigs,
            ca,
            extra,
        })
    }

    /// Gives an uncompressed NAR's file its size, `NarSize`, when the narinfo does not say it
    /// (nix-serve and harmonia give none): the NAR caches then know how long it is before it
    /// comes, from a server that streams it without `Content-Length`.
    pub fn complete_file_size(&mut self) {
        if self.compression == Compression::None && self.file_size.is_none() {
            self.file_size = Some(self.nar_size);
        }
    }

    /// The message a signature covers: `1;<path>;<narhash>;<narsize>;<ref,ref,…>`.
    pub fn fingerprint(&self, store_dir: &str) -> String {
        let mut s = format!(
            "1;{store_dir}/{};{};{};",
            self.store_path, self.nar_hash, self.nar_size
        );
        // Nix signs the references as a sorted set, whatever order the narinfo lists them in
        // (and however often: it reads them into a set).
        let mut refs: Vec<&str> = self
            .references
            .iter()
            .map(StorePathBaseName::as_str)
            .collect();
        refs.sort_unstable();
        refs.dedup();
        for (i, r) in refs.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{store_dir}/{r}");
        }
        s
    }

    /// Adds `key`'s signature, replacing any earlier one made under the same key name.
    pub fn sign(&mut self, key: &SecretKey, store_dir: &str) {
        let sig = key.sign(self.fingerprint(store_dir).as_bytes());
        self.sigs.retain(|s| s.key_name() != key.name());
        self.sigs.push(sig);
    }

    /// True if one of the signatures verifies with one of `keys`.
    pub fn is_signed_by_any(&self, keys: &[PublicKey], store_dir: &str) -> bool {
        let fp = self.fingerprint(store_dir);
        self.sigs
            .iter()
            .any(|s| keys.iter().any(|k| k.verifies(fp.as_bytes(), s)))
    }

    /// Renders in the field order Nix uses.
    pub fn render(&self, store_dir: &str) -> String {
        let mut s = String::with_capacity(512 + 100 * self.references.len());
        let _ = writeln!(s, "StorePath: {store_dir}/{}", self.store_path);
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {h}");
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash);
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        s.push_str("References: ");
        for (i, r) in self.references.iter().enumerate() {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(r.as_str());
        }
        s.push('\n');
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {d}");
        }
        if let Some(sys) = &self.system {
            let _ = writeln!(s, "System: {sys}");
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        for (k, v) in &self.extra {
            let _ = writeln!(s, "{k}: {v}");
        }
        s
    }
}

/// Orders entries so that every path comes after the paths it references (within the set).
pub fn references_first(entries: &HashMap<StorePathHash, NarInfo>) -> Vec<StorePathHash> {
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

/// For tests elsewhere: a narinfo of the store path `base` in `/nix/store` (a NAR of 100
/// bytes, no references), as stored.
#[cfg(test)]
pub fn stub(base: &str) -> String {
    let sha = Sha256::digest(base.as_bytes());
    format!(
        "StorePath: /nix/store/{base}\nURL: nar/{}.nar\nCompression: none\n\
         NarHash: {sha}\nNarSize: 100\nReferences: \n",
        sha.to_nix32()
    )
}

#[cfg(test)]
mod tests;
