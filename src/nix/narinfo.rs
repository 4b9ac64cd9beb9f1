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
//! Parsing is strict where the Nix client is (a missing `URL`, `NarHash` or `NarSize`, a bad
//! `Sig:`, CRLF line endings are errors) so a corrupt object is reported as such instead of being
//! served; unknown fields are kept and rendered back. A missing `Compression:` means bzip2.
//!
//! Signatures cover only the fingerprint `1;<StorePath>;<NarHash>;<NarSize>;<refs>`, not the URL,
//! Compression, FileHash or FileSize fields.

use std::fmt::Write as _;

use thiserror::Error;

use super::compression::Compression;
use super::hash::{Sha256, StorePathHash};
use super::names::StorePathBaseName;
use super::signing::{PublicKey, SecretKey, Signature};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NarInfoError {
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
                "Compression" => set(
                    &mut compression,
                    value.parse().map_err(|e| bad("Compression", e))?,
                    line,
                    "Compression",
                )?,
                "FileHash" => set(&mut file_hash, hash("FileHash")?, line, "FileHash")?,
                "FileSize" => set(&mut file_size, num("FileSize")?, line, "FileSize")?,
                "NarHash" => set(&mut nar_hash, hash("NarHash")?, line, "NarHash")?,
                "NarSize" => set(&mut nar_size, num("NarSize")?, line, "NarSize")?,
                "References" => {
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
                "Sig" => sigs.push(value.parse().map_err(|e| bad("Sig", format!("{e}")))?),
                "CA" => {
                    if value.is_empty() {
                        return Err(bad("CA", "empty".into()));
                    }
                    set(&mut ca, value.to_owned(), line, "CA")?
                }
                other => {
                    if other.is_empty() || other.contains(char::is_whitespace) {
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
            references: references.unwrap_or_default(),
            deriver,
            system,
            sigs,
            ca,
            extra,
        })
    }

    /// The message a signature covers: `1;<path>;<narhash>;<narsize>;<ref,ref,…>`.
    pub fn fingerprint(&self, store_dir: &str) -> String {
        let mut s = format!(
            "1;{store_dir}/{};{};{};",
            self.store_path, self.nar_hash, self.nar_size
        );
        // Nix signs the references as a sorted set, whatever order the narinfo lists them in.
        let mut refs: Vec<&str> = self
            .references
            .iter()
            .map(StorePathBaseName::as_str)
            .collect();
        refs.sort_unstable();
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

#[cfg(test)]
mod tests {
    use super::*;

    const SD: &str = "/nix/store";

    /// Written by `nix copy --to file://` (Nix 2.8) for a built path with references.
    const BUILT: &str = "\
StorePath: /nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top
URL: nar/07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7.nar.xz
Compression: xz
FileHash: sha256:07yp7gw2d9vmfgl2rd063i75qwkfbrgvqngp5yz2pk6iadzlckh7
FileSize: 300
NarHash: sha256:0v1h8fzqs60d8pccpwskrpnv3c7fz25ddhwl2rwlfblan5zvirsv
NarSize: 624
References: 20lja0xsjl4xlgskydbpsrass06a5s67-closure.nix a6qsrmi2wws6820p89gki93wb6rjvknc-leaf w7vx6x2avzilhry9m3axgkz6ic5bkmz8-mid
Deriver: 7d6lwmyccalgxawxbva0c5in599fd8vi-top.drv
Sig: test-1:mbtf5wmBtrMQCHnVpWCZlJGiFC5JYhTHoK2doDUqUIcx4J6vXRDjNRdRFmY96Ai6hxXiAjaviyjzF10WhNx/Dg==
";

    #[test]
    fn round_trip_built_path() {
        let n = NarInfo::parse(BUILT, SD).unwrap();
        assert_eq!(n.hash().as_str(), "6bxnj2gfflqa529lddzh3zhcn45nn86r");
        assert_eq!(n.compression, Compression::Xz);
        assert_eq!(n.references.len(), 3);
        assert_eq!(n.sigs.len(), 1);
        assert_eq!(n.render(SD), BUILT);
        assert_eq!(
            n.fingerprint(SD),
            "1;/nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top;\
             sha256:0v1h8fzqs60d8pccpwskrpnv3c7fz25ddhwl2rwlfblan5zvirsv;624;\
             /nix/store/20lja0xsjl4xlgskydbpsrass06a5s67-closure.nix,\
             /nix/store/a6qsrmi2wws6820p89gki93wb6rjvknc-leaf,\
             /nix/store/w7vx6x2avzilhry9m3axgkz6ic5bkmz8-mid"
        );
    }

    #[test]
    fn empty_references_ca_several_sigs_and_unknown_fields() {
        let text = "\
StorePath: /nix/store/20lja0xsjl4xlgskydbpsrass06a5s67-closure.nix
URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.zst
Compression: zstd
FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3
FileSize: 132
NarHash: sha256:0v1h8fzqs60d8pccpwskrpnv3c7fz25ddhwl2rwlfblan5zvirsv
NarSize: 120
References: 
Sig: a-1:mbtf5wmBtrMQCHnVpWCZlJGiFC5JYhTHoK2doDUqUIcx4J6vXRDjNRdRFmY96Ai6hxXiAjaviyjzF10WhNx/Dg==
Sig: b-1:mbtf5wmBtrMQCHnVpWCZlJGiFC5JYhTHoK2doDUqUIcx4J6vXRDjNRdRFmY96Ai6hxXiAjaviyjzF10WhNx/Dg==
CA: text:sha256:1lr2bzm3kzl4rz6pvpqhzqs0ydwf3q8rcy2f1zdsdh4p5pnd7w0z
FutureField: something new
";
        let n = NarInfo::parse(text, SD).unwrap();
        assert!(n.references.is_empty());
        assert!(n.deriver.is_none());
        assert_eq!(n.sigs.len(), 2);
        assert!(n.ca.is_some());
        assert_eq!(
            n.extra,
            vec![("FutureField".into(), "something new".into())]
        );
        assert_eq!(n.render(SD), text);
        assert!(n.fingerprint(SD).ends_with(";120;"));
    }

    #[test]
    fn missing_compression_means_bzip2_and_hex_narhash_is_normalised() {
        let text = "StorePath: /nix/store/6bxnj2gfflqa529lddzh3zhcn45nn86r-top\n\
URL: nar/x.nar.bz2\n\
NarHash: sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
NarSize: 0\n\
References:\n";
        let n = NarInfo::parse(text, SD).unwrap();
        assert_eq!(n.compression, Compression::Bzip2);
        assert!(n
            .render(SD)
            .contains("NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n"));
    }

    #[test]
    fn strict_errors() {
        let crlf = BUILT.replace('\n', "\r\n");
        assert_eq!(
            NarInfo::parse(&crlf, SD).unwrap_err(),
            NarInfoError::CarriageReturn(1)
        );
        for (field, prefix) in [
            ("URL", "URL:"),
            ("NarHash", "NarHash:"),
            ("NarSize", "NarSize:"),
            ("StorePath", "StorePath:"),
        ] {
            let t: String = BUILT
                .lines()
                .filter(|l| !l.starts_with(prefix))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(
                NarInfo::parse(&t, SD).unwrap_err(),
                NarInfoError::Missing(field)
            );
        }
        let bad_sig = BUILT.replace("Sig: test-1:mbtf", "Sig: test-1:!!tf");
        assert!(matches!(
            NarInfo::parse(&bad_sig, SD),
            Err(NarInfoError::Bad { field: "Sig", .. })
        ));
        let other_dir = NarInfo::parse(BUILT, "/gnu/store").unwrap_err();
        assert!(matches!(
            other_dir,
            NarInfoError::Bad {
                field: "StorePath",
                ..
            }
        ));
        let dup = format!("{BUILT}NarSize: 1\n");
        assert!(matches!(
            NarInfo::parse(&dup, SD),
            Err(NarInfoError::Duplicate {
                field: "NarSize",
                ..
            })
        ));
        assert!(matches!(
            NarInfo::parse("garbage\n", SD),
            Err(NarInfoError::NoColon(1))
        ));
        let bad_ref = BUILT.replace("a6qsrmi2", "a6qsrmi/");
        assert!(matches!(
            NarInfo::parse(&bad_ref, SD),
            Err(NarInfoError::Bad {
                field: "References",
                ..
            })
        ));
    }

    /// Narinfos written and signed by the real Nix 2.8 (`nix store sign` + `nix copy --to
    /// file://`): our fingerprint must be the one Nix signed, and rendering must give back the
    /// exact bytes.
    #[test]
    fn real_nix_narinfos_round_trip_and_verify() {
        let key: PublicKey = include_str!("../../tests/fixtures/narinfo/test-1.pub")
            .trim()
            .parse()
            .unwrap();
        for text in [
            include_str!("../../tests/fixtures/narinfo/top.narinfo"),
            include_str!("../../tests/fixtures/narinfo/ca-src-zstd.narinfo"),
        ] {
            let n = NarInfo::parse(text, SD).unwrap();
            assert_eq!(n.render(SD), text);
            assert!(n.is_signed_by_any(std::slice::from_ref(&key), SD), "{text}");
            let mut tampered = n.clone();
            tampered.references.pop();
            tampered.nar_size += 1;
            assert!(!tampered.is_signed_by_any(std::slice::from_ref(&key), SD));
        }
    }

    #[test]
    fn fingerprint_lists_references_sorted_like_nix() {
        let mut n = NarInfo::parse(BUILT, SD).unwrap();
        let sorted = n.fingerprint(SD);
        n.references.reverse();
        assert_eq!(n.fingerprint(SD), sorted);
    }

    #[test]
    fn signing_replaces_same_name_and_verifies() {
        let mut n = NarInfo::parse(BUILT, SD).unwrap();
        let k = SecretKey::generate("test-1").unwrap();
        n.sign(&k, SD);
        assert_eq!(n.sigs.len(), 1, "same key name replaces the old signature");
        assert!(n.is_signed_by_any(&[k.public()], SD));
        let k2 = SecretKey::generate("cellar-2").unwrap();
        n.sign(&k2, SD);
        assert_eq!(n.sigs.len(), 2);
        assert!(n.is_signed_by_any(&[k2.public()], SD));
        // The signature does not cover URL/Compression/FileHash/FileSize...
        n.url = "nar/other.nar.zst".into();
        n.compression = Compression::Zstd;
        n.file_size = Some(1);
        assert!(n.is_signed_by_any(&[k.public()], SD));
        // ...but does cover NarSize.
        n.nar_size += 1;
        assert!(!n.is_signed_by_any(&[k.public(), k2.public()], SD));
    }
}
