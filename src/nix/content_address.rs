//! Content addresses (a narinfo's `CA:`): the store path one certifies. Nix takes a path whose
//! name its content address gives for trusted without a signature (paths added with
//! `nix store add-path`, `builtins.toFile`, `./file` imports, `.drv` files: none of them is
//! signed by a builder's `secret-key-files`, which signs only what it builds), checking on
//! import that the contents hash as claimed.

use sha2::{Digest as _, Sha256 as Hasher};

use super::{base32, NarInfo, Sha256};

/// What a content address claims of a path's contents, for the addresses cellar checks: those
/// with a sha256 hash (Nix writes those but for fixed-output derivations' other algorithms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// `fixed:r:sha256:…`: the NAR hashes to it, so it is the narinfo's `NarHash`.
    Recursive(Sha256),
    /// `fixed:sha256:…`: the path is one regular file whose contents hash to it.
    Flat(Sha256),
    /// `text:sha256:…`: the same, for text (`builtins.toFile`, `.drv` files), which may refer
    /// to other paths.
    Text(Sha256),
}

impl Claim {
    /// The claim of a `CA:` value, `None` for one cellar does not check (another
    /// algorithm, git hashing).
    pub fn parse(ca: &str) -> Option<Self> {
        let (method, rest) = ca.split_once(':')?;
        let (make, hash): (fn(Sha256) -> Self, &str) = match (method, rest.strip_prefix("r:")) {
            ("text", None) => (Self::Text, rest),
            ("fixed", Some(hash)) => (Self::Recursive, hash),
            ("fixed", None) => (Self::Flat, rest),
            _ => return None,
        };
        // `sha256:<nix32|base16|base64>`, as `Sha256` parses it (not SRI's `sha256-`).
        hash.strip_prefix("sha256:")?;
        hash.parse().ok().map(make)
    }

    /// The hash the contents must have: the NAR's for [`Claim::Recursive`], the file's for the
    /// others.
    pub fn hash(&self) -> Sha256 {
        match *self {
            Self::Recursive(h) | Self::Flat(h) | Self::Text(h) => h,
        }
    }
}

/// The claim of `info`'s `CA:` if its store path is the one that content address gives (as
/// Nix's `makeFixedOutputPath` and `makeTextPath` compute it, in `store_dir`), `None` if it
/// has none, one cellar does not check, or one that gives another path. Whether the contents
/// are what it claims is for the caller to check.
pub fn certified(info: &NarInfo, store_dir: &str) -> Option<Claim> {
    let claim = Claim::parse(info.ca.as_deref()?)?;
    let base = info.store_path.as_str();
    let (_, name) = base.split_once('-')?;
    let mut refs: Vec<&str> = info
        .references
        .iter()
        .map(|r| r.as_str())
        .filter(|r| *r != base)
        .collect();
    refs.sort_unstable();
    refs.dedup();
    let self_ref = info.references.iter().any(|r| r.as_str() == base);
    let with_refs = |kind: &str| {
        let mut t = kind.to_owned();
        for r in &refs {
            t.push(':');
            t.push_str(store_dir);
            t.push('/');
            t.push_str(r);
        }
        t
    };
    let path_hash = match claim {
        Claim::Text(h) if !self_ref => store_path_hash(&with_refs("text"), &h, store_dir, name),
        Claim::Recursive(h) => {
            let mut kind = with_refs("source");
            if self_ref {
                kind.push_str(":self");
            }
            store_path_hash(&kind, &h, store_dir, name)
        }
        Claim::Flat(h) if refs.is_empty() && !self_ref => {
            let inner = format!("fixed:out:sha256:{}:", hex::encode(h.as_bytes()));
            let inner = Sha256::from_bytes(Hasher::digest(inner.as_bytes()).into());
            store_path_hash("output:out", &inner, store_dir, name)
        }
        _ => return None,
    };
    (path_hash == info.hash().as_str()).then_some(claim)
}

/// Nix's `makeStorePath`: the nix32 of the sha256 of `<kind>:sha256:<hex>:<store dir>:<name>`,
/// folded to 20 bytes.
fn store_path_hash(kind: &str, hash: &Sha256, store_dir: &str, name: &str) -> String {
    let s = format!(
        "{kind}:sha256:{}:{store_dir}:{name}",
        hex::encode(hash.as_bytes())
    );
    let full: [u8; 32] = Hasher::digest(s.as_bytes()).into();
    let mut folded = [0u8; 20];
    for (i, b) in full.iter().enumerate() {
        folded[i % 20] ^= b;
    }
    base32::encode(&folded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD: &str = "/nix/store";

    fn narinfo(path: &str, refs: &str, ca: &str) -> NarInfo {
        let text = format!(
            "StorePath: {SD}/{path}\nURL: nar/{h}.nar\nCompression: none\n\
             NarHash: sha256:{h}\nNarSize: 120\nReferences: {refs}\nCA: {ca}\n",
            h = "1".repeat(52)
        );
        NarInfo::parse(&text, SD).unwrap()
    }

    /// Paths the real Nix (2.8) made: `nix store add-path` of a directory, `nix store
    /// add-file`, `builtins.toFile` of a text naming another `toFile`, and one naming none.
    const MADE_BY_NIX: [(&str, &str, &str); 4] = [
        (
            "h97b2v1mpva3fwnjbrr4yfdjyndj04fl-d",
            "",
            "fixed:r:sha256:16bgv7k5078n3n4zg41hnybrc4fa0j6q8cyx31qc9p2qwp9xsgib",
        ),
        (
            "d4b4lmbd433fa2xcdysz7p7zahnqh1z4-f.txt",
            "",
            "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
        ),
        (
            "b4z3mm3abcval42d3n7v40xick23yg6z-t.txt",
            "v0lh0k7cm9jbiq3b6ccbr86imvzpibn3-u.txt",
            "text:sha256:1gnmj8z388axf4a10i3dykzbpy49l6cxfn2w2chm81i1lqmsx8rn",
        ),
        (
            "v0lh0k7cm9jbiq3b6ccbr86imvzpibn3-u.txt",
            "",
            "text:sha256:1mha3hgpyv8cq0qvn27049a8pyd21h6wwxgw7b5cf8f3f1g97zhb",
        ),
    ];

    #[test]
    fn the_paths_nix_made_are_certified_by_their_content_address() {
        for (path, refs, ca) in MADE_BY_NIX {
            let claim = certified(&narinfo(path, refs, ca), SD);
            assert_eq!(claim, Claim::parse(ca), "{path}");
            assert!(claim.is_some(), "{path}");
        }
    }

    /// Anything the address covers changed gives another path: the name, a reference, the
    /// hash, the method, the store directory.
    #[test]
    fn another_path_is_not_certified() {
        let other_hash = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        for (path, refs, ca) in MADE_BY_NIX {
            let renamed = path.replace('-', "-x");
            assert_eq!(certified(&narinfo(&renamed, refs, ca), SD), None, "{path}");
            let (method, old) = ca.rsplit_once(':').unwrap();
            let rehashed = format!("{method}:{other_hash}");
            assert_eq!(certified(&narinfo(path, refs, &rehashed), SD), None);
            let referring = match refs {
                "" => "v0lh0k7cm9jbiq3b6ccbr86imvzpibn3-u.txt",
                _ => "",
            };
            assert_eq!(certified(&narinfo(path, referring, ca), SD), None, "{path}");
            assert_eq!(
                certified(&narinfo(path, refs, ca), "/gnu/store"),
                None,
                "{path}"
            );
            let other_method = match method {
                "fixed:r:sha256" => format!("fixed:sha256:{old}"),
                _ => format!("fixed:r:sha256:{old}"),
            };
            assert_eq!(
                certified(&narinfo(path, refs, &other_method), SD),
                None,
                "{path}"
            );
        }
    }

    #[test]
    fn claims_cellar_does_not_check_are_none() {
        let h = "1".repeat(52);
        for ca in [
            format!("fixed:r:sha1:{}", "1".repeat(32)),
            format!("fixed:git:sha256:{h}"),
            format!("text:sha512:{h}"),
            format!("other:sha256:{h}"),
            "fixed:sha256".to_owned(),
        ] {
            assert_eq!(Claim::parse(&ca), None, "{ca}");
        }
        let hex = "a".repeat(64);
        assert!(matches!(
            Claim::parse(&format!("fixed:sha256:{hex}")),
            Some(Claim::Flat(_))
        ));
    }
}
