//! Validated names of the objects in a binary cache.
//!
//! Every name that comes in a request URL is parsed into one of these types before anything
//! touches the store, so a request can never name an object outside the cache layout (no `..`,
//! no `/`, no surprises in S3 keys).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::base32;
use super::compression::Compression;
use super::hash::StorePathHash;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("invalid {kind} name {name:?}")]
pub struct NameError {
    pub kind: &'static str,
    pub name: String,
}

pub(super) fn err(kind: &'static str, name: &str) -> NameError {
    NameError {
        kind,
        name: name.chars().take(200).collect(),
    }
}

/// Characters Nix allows in the name part of a store path. A leading `.` is allowed, as Nix
/// 2.4 to 2.18 (and again 2.20 on) allow it: `"${./.envrc}"` is `<hash>-.envrc`. The name
/// always follows `<hash>-` in a key, so even `..` is no path segment of its own.
fn is_store_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 211
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
}

/// An output name (`out`, `dev`): a store name that does not start with `.`, so that it is
/// never `.` or `..` as a key's path segment (`build-trace/<drv>/<output>`).
fn is_output_name(s: &str) -> bool {
    is_store_name(s) && !s.starts_with('.')
}

/// `<hash32>-<name>`, the last component of a store path (used for build logs and drv names).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StorePathBaseName {
    hash: StorePathHash,
    full: String,
}

impl StorePathBaseName {
    pub fn hash(&self) -> StorePathHash {
        self.hash
    }
    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl FromStr for StorePathBaseName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let e = || err("store path", s);
        let (h, name) = s.split_at_checked(StorePathHash::LEN).ok_or_else(e)?;
        let name = name.strip_prefix('-').ok_or_else(e)?;
        if !is_store_name(name) {
            return Err(e());
        }
        Ok(Self {
            hash: h.parse().map_err(|_| e())?,
            full: s.to_owned(),
        })
    }
}

impl fmt::Display for StorePathBaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for StorePathBaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.full)
    }
}

/// What a top-level file name (`/<name>`) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopLevelFile {
    NarInfo(StorePathHash),
    Listing(StorePathHash),
}

impl FromStr for TopLevelFile {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let e = || err("cache file", s);
        let (stem, ext) = s.split_once('.').ok_or_else(e)?;
        let hash: StorePathHash = stem.parse().map_err(|_| e())?;
        match ext {
            "narinfo" => Ok(Self::NarInfo(hash)),
            "ls" => Ok(Self::Listing(hash)),
            _ => Err(e()),
        }
    }
}

/// `<filehash>.nar[.<ext>]`, the name of a NAR under `nar/`.
///
/// The hash is nix-base32: 52 characters for the sha256 FileHash Nix uses, 32 for caches that
/// name NARs after the store path hash.
///
/// Two names other servers give their (uncompressed) NARs are taken too, so that cellar can
/// pull through from them: nix-serve's `<pathhash>-<narhash>.nar` and harmonia's
/// `<narhash>.nar?hash=<pathhash>` (the query is part of the name: harmonia finds the path by
/// it). Both are the only forms their grammar allows, hashes checked, so a name still cannot
/// reach outside the cache layout or carry anything else to an upstream.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct NarFileName {
    full: String,
    compression: Option<Compression>,
    /// Where the file hash starts in `full` (after nix-serve's `<pathhash>-`).
    hash_at: usize,
}

impl NarFileName {
    pub fn as_str(&self) -> &str {
        &self.full
    }
    /// The compression implied by the extension (`None` for a bare `.nar`, which Nix also uses
    /// for gzip).
    pub fn compression_from_ext(&self) -> Option<Compression> {
        self.compression
    }
    /// The nix-base32 hash the name starts with: the file's sha256 (52 characters) for the
    /// names Nix gives NARs, which is what makes a NAR's name a promise about its bytes. For
    /// nix-serve's and harmonia's names, the NAR hash (their NARs are not compressed, so it is
    /// the file's hash too).
    pub fn file_hash(&self) -> &str {
        // Parsing checked there is a `.` after a 32- or 52-character hash.
        let rest = &self.full[self.hash_at..];
        rest.split_once('.').map_or(rest, |(h, _)| h)
    }
    /// Whether the name is a hash of the bytes (always so for the names Nix gives NARs, and
    /// nix-serve's and harmonia's), not a store path hash (32 characters): a NAR named after
    /// its store path changes when the path is rebuilt, so it is not cached as immutable.
    pub fn names_its_bytes(&self) -> bool {
        self.file_hash().len() != StorePathHash::LEN
    }
    /// The same file hash under the extension of `compression` (what a NAR re-encoded on
    /// upload is stored as). Infallible: the hash was validated and every extension is known.
    pub fn with_compression(&self, compression: Compression) -> Self {
        Self {
            full: format!("{}.nar{}", self.file_hash(), compression.extension()),
            compression: Compression::from_extension(
                compression.extension().trim_start_matches('.'),
            ),
            hash_at: 0,
        }
    }
    /// The name a request for `/nar/<file>?<query>` asks for: `file`, or harmonia's
    /// `<narhash>.nar?hash=<pathhash>` when the query is exactly that. Any other query is
    /// ignored, as it is on every other route.
    pub fn from_request(file: &str, query: Option<&str>) -> Result<Self, NameError> {
        if let Some(q) = query.filter(|q| q.starts_with("hash=")) {
            if let Ok(n) = format!("{file}?{q}").parse() {
                return Ok(n);
            }
        }
        file.parse()
    }
    /// `s` if it is one of the names Nix gives NARs (`<filehash>.nar[.<ext>]`), not another
    /// server's name for one: what an upload may be called.
    pub fn parse_nix(s: &str) -> Result<Self, NameError> {
        let n: Self = s.parse()?;
        if n.hash_at != 0 || n.full.contains('?') {
            return Err(err("NAR file", s));
        }
        Ok(n)
    }
}

impl FromStr for NarFileName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let e = || err("NAR file", s);
        let is_hash = |h: &str, len: usize| h.len() == len && base32::is_nix32(h);
        // harmonia: `<narhash>.nar?hash=<pathhash>`.
        if let Some((name, query)) = s.split_once('?') {
            let path_hash = query.strip_prefix("hash=").ok_or_else(e)?;
            let nar_hash = name.strip_suffix(".nar").ok_or_else(e)?;
            if !is_hash(nar_hash, 52) || !is_hash(path_hash, StorePathHash::LEN) {
                return Err(e());
            }
            return Ok(Self {
                full: s.to_owned(),
                compression: None,
                hash_at: 0,
            });
        }
        let (hash, rest) = s.split_once('.').ok_or_else(e)?;
        // nix-serve: `<pathhash>-<narhash>.nar`.
        if let Some((path_hash, nar_hash)) = hash.split_once('-') {
            if rest != "nar" || !is_hash(path_hash, StorePathHash::LEN) || !is_hash(nar_hash, 52) {
                return Err(e());
            }
            return Ok(Self {
                full: s.to_owned(),
                compression: None,
                hash_at: path_hash.len() + 1,
            });
        }
        if !(is_hash(hash, 32) || is_hash(hash, 52)) {
            return Err(e());
        }
        let compression = match rest {
            "nar" => None,
            _ => {
                let ext = rest.strip_prefix("nar.").ok_or_else(e)?;
                Some(Compression::from_extension(ext).ok_or_else(e)?)
            }
        };
        Ok(Self {
            full: s.to_owned(),
            compression,
            hash_at: 0,
        })
    }
}

impl fmt::Display for NarFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for NarFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.full)
    }
}

/// `sha256:<hex>!<output>.doi`, a CA realisation under `realisations/` (Nix ≤ 2.32): the id
/// is Nix's `DrvOutput::to_string()`, the derivation's hash modulo in base 16 (64 lowercase hex
/// digits). A nix32 hash (52 characters) is accepted too.
#[derive(Clone, PartialEq, Eq)]
pub struct RealisationName(String);

impl RealisationName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `id` (a realisation's `id`, `sha256:<hash>!<output>`) is the output this name
    /// names, its hash in base 16 or nix32 on either side.
    pub fn names(&self, id: &str) -> bool {
        let parts = |s: &str| -> Option<(Vec<u8>, String)> {
            let (hash, output) = s.split_once('!')?;
            let h = hash.strip_prefix("sha256:")?;
            let bytes = match h.len() {
                64 => hex::decode(h).ok()?,
                52 => base32::decode(h, 32).ok()?,
                _ => return None,
            };
            Some((bytes, output.to_owned()))
        };
        let mine = self.0.strip_suffix(".doi").and_then(parts);
        mine.is_some() && mine == parts(id)
    }
}

impl FromStr for RealisationName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let e = || err("realisation", s);
        let stem = s.strip_suffix(".doi").ok_or_else(e)?;
        let (drv_hash, output) = stem.split_once('!').ok_or_else(e)?;
        let h = drv_hash.strip_prefix("sha256:").ok_or_else(e)?;
        let hex = h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let nix32 = h.len() == 52 && base32::is_nix32(h);
        if !(hex || nix32) || !is_output_name(output) {
            return Err(e());
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Debug for RealisationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// An output name (`out`, `dev`, …) as used in `build-trace/<drv>/<output>` and
/// `build-trace-v2/<drv>/<output>.doi`.
#[derive(Clone, PartialEq, Eq)]
pub struct OutputName(String);

impl OutputName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The output a `build-trace-v2/<drv>/` file names: `<output>.doi`.
    pub fn from_doi_file(file: &str) -> Result<Self, NameError> {
        file.strip_suffix(".doi")
            .and_then(|o| o.parse().ok())
            .ok_or_else(|| err("build trace file", file))
    }
}

impl FromStr for OutputName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        if is_output_name(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(err("output", s))
        }
    }
}

impl fmt::Debug for OutputName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "6bxnj2gfflqa529lddzh3zhcn45nn86r";
    const F: &str = "07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7";

    #[test]
    fn top_level_files() {
        assert!(matches!(
            format!("{H}.narinfo").parse(),
            Ok(TopLevelFile::NarInfo(_))
        ));
        assert!(matches!(
            format!("{H}.ls").parse(),
            Ok(TopLevelFile::Listing(_))
        ));
        for bad in [
            format!("{H}.narinfo.bak"),
            H.to_string(),
            "nix-cache-info".to_owned(),
            "..narinfo".to_owned(),
            format!("{H}x.narinfo"),
        ] {
            assert!(bad.parse::<TopLevelFile>().is_err(), "{bad}");
        }
    }

    #[test]
    fn nar_file_names() {
        for (name, c) in [
            (format!("{F}.nar.xz"), Some(Compression::Xz)),
            (format!("{F}.nar.zst"), Some(Compression::Zstd)),
            (format!("{F}.nar.bz2"), Some(Compression::Bzip2)),
            (format!("{F}.nar.br"), Some(Compression::Brotli)),
            (format!("{F}.nar.lz4"), Some(Compression::Lz4)),
            (format!("{F}.nar.lzip"), Some(Compression::Lzip)),
            (format!("{F}.nar"), None),
            (format!("{H}.nar"), None),
        ] {
            let n: NarFileName = name.parse().unwrap();
            assert_eq!(n.compression_from_ext(), c, "{name}");
            assert_eq!(n.as_str(), name);
            assert_eq!(format!("{n:?}"), format!("{name:?}"));
        }
        for bad in [
            format!("{F}.nar.gz"),
            format!("{F}.xz"),
            format!("{F}.nar.xz/"),
            "..%2f.nar".to_owned(),
            format!("{F}x.nar"),
        ] {
            assert!(bad.parse::<NarFileName>().is_err(), "{bad}");
        }
        // Other servers' names for their uncompressed NARs, taken for pull-through.
        let serve: NarFileName = format!("{H}-{F}.nar").parse().unwrap();
        let harmonia: NarFileName = format!("{F}.nar?hash={H}").parse().unwrap();
        for n in [&serve, &harmonia] {
            assert_eq!(n.file_hash(), F, "{n}");
            assert_eq!(n.compression_from_ext(), None, "{n}");
            assert!(NarFileName::parse_nix(n.as_str()).is_err(), "{n}");
        }
        assert_eq!(harmonia.as_str(), format!("{F}.nar?hash={H}"));
        assert_eq!(
            serve.with_compression(Compression::Zstd).as_str(),
            format!("{F}.nar.zst")
        );
        assert!(NarFileName::parse_nix(&format!("{F}.nar.xz")).is_ok());
        for bad in [
            format!("{H}-{F}.nar.xz"),
            format!("{F}-{H}.nar"),
            format!("{H}-{H}.nar"),
            format!("{H}x-{F}.nar"),
            format!("{H}-{F}.nar?hash={H}"),
            format!("{F}.nar.xz?hash={H}"),
            format!("{F}.nar?hash={F}"),
            format!("{F}.nar?hash={H}&x=1"),
            format!("{F}.nar?other={H}"),
            format!("{H}.nar?hash={H}"),
            format!("{F}.nar?hash=../{H}"),
        ] {
            assert!(bad.parse::<NarFileName>().is_err(), "{bad}");
        }
        // The request for harmonia's name: its query is part of it; other queries are not.
        let req = |q| NarFileName::from_request(&format!("{F}.nar"), q).unwrap();
        let query = format!("hash={H}");
        assert_eq!(req(Some(&query)), harmonia);
        assert_eq!(req(Some("hash=nope")).as_str(), format!("{F}.nar"));
        assert_eq!(req(Some("x=1")).as_str(), format!("{F}.nar"));
        assert_eq!(req(None).as_str(), format!("{F}.nar"));
        let xz: NarFileName = format!("{F}.nar.xz").parse().unwrap();
        assert_eq!(xz.file_hash(), F);
        assert_eq!(
            xz.with_compression(Compression::Zstd).as_str(),
            format!("{F}.nar.zst")
        );
        for c in Compression::ALL {
            // The same as parsing the name it renders.
            let n = xz.with_compression(c);
            assert_eq!(n, n.as_str().parse().unwrap(), "{c}");
            assert_eq!(n.file_hash(), F);
        }
    }

    #[test]
    fn store_path_base_names() {
        let ok = format!("{H}-hello-2.12.drv");
        let n: StorePathBaseName = ok.parse().unwrap();
        assert_eq!(n.hash().as_str(), H);
        // Debug (assertion messages, logs) shows the name, quoted.
        assert_eq!(format!("{n:?}"), format!("{ok:?}"));
        // Names Nix 2.8 gives paths (`builtins.toFile ".envrc"`, `".."`).
        for dotted in [".envrc", ".pnp.loader.mjs", "..", ".-x"] {
            let ok = format!("{H}-{dotted}");
            assert_eq!(ok.parse::<StorePathBaseName>().unwrap().as_str(), ok);
        }
        for bad in [
            H.to_string(),
            format!("{H}-"),
            format!("{H}-a/b"),
            format!("{H}_x"),
        ] {
            assert!(bad.parse::<StorePathBaseName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn realisation_names() {
        let ok = format!("sha256:{F}!out.doi");
        let r: RealisationName = ok.parse().unwrap();
        assert_eq!(format!("{r:?}"), format!("{ok:?}"));
        // As Nix writes them: base 16.
        let hex = "sha256:b632b7d29005a5d5a8bcf52c678c15117655ecea0accf428a35335c6ecba23d2!out.doi";
        assert_eq!(hex.parse::<RealisationName>().unwrap().as_str(), hex);
        let out: OutputName = "dev".parse().unwrap();
        assert_eq!(format!("{out:?}"), "\"dev\"");
        for bad in ["..", ".", ".dev", ""] {
            assert!(bad.parse::<OutputName>().is_err(), "{bad}");
        }
        assert_eq!(
            OutputName::from_doi_file("dev.doi").unwrap().as_str(),
            "dev"
        );
        for bad in ["dev", ".doi", "..doi", "dev.doi/x", "dev.DOI"] {
            assert!(OutputName::from_doi_file(bad).is_err(), "{bad}");
        }
        for bad in [
            format!("sha256:{F}!out"),
            format!("sha256:{F}.doi"),
            format!("md5:{F}!out.doi"),
            format!("sha256:{F}!../x.doi"),
            // nix32, one character short; 52 characters, one not in nix32's alphabet
            format!("sha256:{}!out.doi", &F[1..]),
            format!("sha256:e{}!out.doi", &F[1..]),
            // base 16: one digit short, upper case, not a digit
            format!("sha256:{}!out.doi", "a".repeat(63)),
            format!("sha256:{}!out.doi", "A".repeat(64)),
            format!("sha256:{}!out.doi", "g".repeat(64)),
        ] {
            assert!(bad.parse::<RealisationName>().is_err(), "{bad}");
        }
    }

    /// A realisation's `id` is the output its name names whatever base either hash is in; not
    /// another output, nor another derivation's.
    #[test]
    fn a_realisation_name_names_its_outputs_id() {
        let hex = "b632b7d29005a5d5a8bcf52c678c15117655ecea0accf428a35335c6ecba23d2";
        let bytes = ::hex::decode(hex).unwrap();
        let nix32 = super::base32::encode(&bytes);
        let by_hex: RealisationName = format!("sha256:{hex}!out.doi").parse().unwrap();
        let by_nix32: RealisationName = format!("sha256:{nix32}!out.doi").parse().unwrap();
        for name in [&by_hex, &by_nix32] {
            assert!(name.names(&format!("sha256:{hex}!out")), "{name:?}");
            assert!(name.names(&format!("sha256:{nix32}!out")), "{name:?}");
            assert!(!name.names(&format!("sha256:{hex}!dev")), "{name:?}");
            let other = hex.replace("b632", "b633");
            assert!(!name.names(&format!("sha256:{other}!out")), "{name:?}");
            assert!(!name.names(&format!("sha256:{hex}")), "{name:?}");
            assert!(!name.names(&format!("md5:{hex}!out")), "{name:?}");
            assert!(!name.names(""), "{name:?}");
        }
    }
}
