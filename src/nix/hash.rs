//! Hashes as Nix writes them: store path hash parts and `sha256:` content hashes.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha2::Digest as _;
use thiserror::Error;

use super::base32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("not a store path hash (32 nix-base32 characters): {0:?}")]
    BadStorePathHash(String),
    #[error("unsupported hash algorithm in {0:?} (only sha256)")]
    UnsupportedAlgorithm(String),
    #[error("malformed sha256 hash {0:?}")]
    Malformed(String),
}

/// The 32-character nix-base32 hash part of a store path (`/nix/store/<hash>-<name>`).
///
/// Parsing one from a request name is what keeps arbitrary strings away from the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathHash([u8; 32]);

impl StorePathHash {
    pub const LEN: usize = 32;

    pub fn as_str(&self) -> &str {
        // Only alphabet (ASCII) bytes are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl FromStr for StorePathHash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        if s.len() != Self::LEN || !base32::is_nix32(s) {
            return Err(HashError::BadStorePathHash(s.to_owned()));
        }
        let mut b = [0u8; 32];
        b.copy_from_slice(s.as_bytes());
        Ok(Self(b))
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({})", self.as_str())
    }
}

/// A SHA-256 digest, parsed from any of the forms Nix accepts (`sha256:<nix32>`,
/// `sha256:<hex>`, `sha256:<base64>`, SRI `sha256-<base64>`) and printed as `sha256:<nix32>`,
/// the form the signature fingerprint requires.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256([u8; 32]);

impl Sha256 {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }
    pub fn digest(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// The bare nix32 form (52 characters), as used in NAR file names.
    pub fn to_nix32(&self) -> String {
        base32::encode(&self.0)
    }
}

impl FromStr for Sha256 {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, HashError> {
        let malformed = || HashError::Malformed(s.to_owned());
        let (algo, rest, sri) = if let Some((a, r)) = s.split_once(':') {
            (a, r, false)
        } else if let Some((a, r)) = s.split_once('-') {
            (a, r, true)
        } else {
            return Err(malformed());
        };
        if algo != "sha256" {
            return Err(HashError::UnsupportedAlgorithm(s.to_owned()));
        }
        let bytes = if sri {
            BASE64.decode(rest).map_err(|_| malformed())?
        } else {
            match rest.len() {
                52 => base32::decode(rest, 32).map_err(|_| malformed())?,
                64 => hex::decode(rest).map_err(|_| malformed())?,
                44 => BASE64.decode(rest).map_err(|_| malformed())?,
                _ => return Err(malformed()),
            }
        };
        let arr: [u8; 32] = bytes.try_into().map_err(|_| malformed())?;
        Ok(Self(arr))
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Checks a content address (a narinfo's `CA`) as Nix parses it: `text:<algo>:<hash>` (Nix
/// writes sha256; older versions read any algorithm), or `fixed:[r:|git:]<algo>:<hash>`, with
/// `<algo>` one of md5, sha1, sha256, sha512, blake3 (newer Nix, experimental) and the hash
/// in base16, nix32 or base64 of that algorithm's size. Nix refuses a narinfo whose
/// `CA` it cannot parse: a client reading one fails the lookup.
pub fn check_content_address(ca: &str) -> Result<(), String> {
    let (method, rest) = ca
        .split_once(':')
        .ok_or_else(|| "not <method>:<algo>:<hash>".to_owned())?;
    let rest = match method {
        "text" => rest,
        "fixed" => rest
            .strip_prefix("r:")
            .or_else(|| rest.strip_prefix("git:"))
            .unwrap_or(rest),
        other => return Err(format!("unknown method {other:?} (text or fixed)")),
    };
    let (algo, hash) = rest
        .split_once(':')
        .ok_or_else(|| "no <algo>:<hash>".to_owned())?;
    let size = match algo {
        "sha256" | "blake3" => 32,
        "md5" => 16,
        "sha1" => 20,
        "sha512" => 64,
        _ => return Err(format!("unknown hash algorithm {algo:?}")),
    };
    let decoded = if hash.len() == 2 * size {
        hex::decode(hash).ok()
    } else if hash.len() == base32::encoded_len(size) {
        base32::decode(hash, size).ok()
    } else if hash.len() == size.div_ceil(3) * 4 {
        BASE64.decode(hash).ok()
    } else {
        None
    };
    match decoded {
        Some(d) if d.len() == size => Ok(()),
        _ => Err(format!("{hash:?} is not a {algo} hash")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_path_hash_validation() {
        let ok = "6bxnj2gfflqa529lddzh3zhcn45nn86r";
        assert_eq!(ok.parse::<StorePathHash>().unwrap().to_string(), ok);
        for bad in [
            "",
            "6bxnj2gfflqa529lddzh3zhcn45nn86",
            "6bxnj2gfflqa529lddzh3zhcn45nn86rr",
            "ebxnj2gfflqa529lddzh3zhcn45nn86r",
            "../../../../../../../etc/passwdxx",
            "6BXNJ2GFFLQA529LDDZH3ZHCN45NN86R",
        ] {
            assert!(bad.parse::<StorePathHash>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sha256_forms_agree() {
        let h = Sha256::digest(b"");
        let nix32 = "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        let hexed = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let sri = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        // Base64 after a colon: what Nix's `--base64` prints.
        let base64 = "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        for s in [nix32, hexed, sri, base64] {
            assert_eq!(s.parse::<Sha256>().unwrap(), h, "{s}");
        }
        assert_eq!(h.to_string(), nix32);
        assert!(matches!(
            "md5:00".parse::<Sha256>(),
            Err(HashError::UnsupportedAlgorithm(_))
        ));
        assert!("sha256:xyz".parse::<Sha256>().is_err());
        assert!("nonsense".parse::<Sha256>().is_err());
    }

    /// Content addresses as Nix writes them pass (every method, algorithm and hash encoding);
    /// what Nix cannot parse does not.
    #[test]
    fn content_addresses_are_checked_as_nix_parses_them() {
        let sha256 = Sha256::digest(b"");
        let nix32 = sha256.to_nix32();
        let hexed = hex::encode(sha256.as_bytes());
        let b64 = BASE64.encode(sha256.as_bytes());
        let sha1 = base32::encode(&[7u8; 20]);
        let sha512 = hex::encode([7u8; 64]);
        let md5 = BASE64.encode([7u8; 16]);
        for ok in [
            format!("text:sha256:{nix32}"),
            format!("fixed:r:sha256:{nix32}"),
            format!("fixed:sha256:{hexed}"),
            format!("fixed:git:sha256:{b64}"),
            format!("fixed:r:sha1:{sha1}"),
            format!("fixed:sha512:{sha512}"),
            format!("fixed:md5:{md5}"),
            format!("fixed:r:blake3:{nix32}"),
            format!("text:sha1:{sha1}"),
        ] {
            assert_eq!(check_content_address(&ok), Ok(()), "{ok}");
        }
        for bad in [
            "garbage".to_owned(),
            format!("sha256:{nix32}"),
            format!("text:sha1:{nix32}"),
            format!("fixed:r:{nix32}"),
            format!("fixed:x:sha256:{nix32}"),
            format!("fixed:r:sha256:{}", &nix32[1..]),
            format!("fixed:r:sha256:{}", nix32.replace('0', "e")),
            format!("fixed:r:sha256:{}", hexed.replace('e', "g")),
            format!("fixed:r:sha384:{hexed}"),
            format!("fixed:r:sha512:{hexed}"),
            format!("fixed:r:sha256-{b64}"),
            // Base64 of a sha256's length (44) that decodes to 31 bytes, not 32.
            format!("fixed:r:sha256:{}", BASE64.encode([7u8; 31])),
        ] {
            assert!(check_content_address(&bad).is_err(), "{bad}");
        }
    }

    /// Debug output (assertion messages, logs) shows the values themselves.
    #[test]
    fn debug_shows_the_value() {
        let h: StorePathHash = "6bxnj2gfflqa529lddzh3zhcn45nn86r".parse().unwrap();
        assert_eq!(
            format!("{h:?}"),
            "StorePathHash(6bxnj2gfflqa529lddzh3zhcn45nn86r)"
        );
        assert_eq!(
            format!("{:?}", Sha256::digest(b"")),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }
}
