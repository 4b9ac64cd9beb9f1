//! Ed25519 keys and signatures in Nix's text formats.
//!
//! - secret key: `name:base64(64 bytes = 32-byte seed ‖ 32-byte public key)`
//!   (what `nix key generate-secret` writes)
//! - public key: `name:base64(32 bytes)`
//! - signature (`Sig:` line): `name:base64(64 bytes)` over the narinfo fingerprint.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("expected `name:base64`, found no `:`")]
    NoName,
    #[error("the key name is empty, or contains `:` or whitespace")]
    BadName,
    #[error("the part after `:` is not valid base64")]
    BadBase64,
    /// Keys as Nix's `trusted-public-keys` lists them, space-separated, given as one.
    #[error(
        "several keys separated by whitespace: give one key per list item \
         (`[\"a:…\", \"b:…\"]`; comma-separated in a CELLAR_* variable)"
    )]
    SeveralKeys,
    #[error("the key has {got} bytes, expected {expected}")]
    BadLength { got: usize, expected: usize },
    #[error(
        "this is a public key (32 bytes), not a secret key (64 bytes): give the secret key \
         file (`cellar keygen`, `nix key generate-secret`), whose public half clients trust"
    )]
    PublicNotSecret,
    #[error(
        "this is a secret key (64 bytes), not a public key (32 bytes): give its public half \
         (`nix key convert-secret-to-public`), and take the secret for exposed"
    )]
    SecretNotPublic,
    #[error("the public half of the secret key does not match its private half")]
    Inconsistent,
    #[error("not a valid ed25519 public key")]
    BadPublicKey,
    /// No key could be generated: the operating system gave no random bytes.
    #[error("the operating system's random source failed: {0}")]
    RandomSource(getrandom::Error),
}

fn split_named(s: &str, expected: usize) -> Result<(&str, Vec<u8>), KeyError> {
    let s = s.trim();
    if s.split_whitespace().filter(|w| w.contains(':')).count() > 1 {
        return Err(KeyError::SeveralKeys);
    }
    let (name, b64) = s.split_once(':').ok_or(KeyError::NoName)?;
    if name.is_empty() || name.chars().any(char::is_whitespace) {
        return Err(KeyError::BadName);
    }
    let bytes = BASE64.decode(b64).map_err(|_| KeyError::BadBase64)?;
    if bytes.len() != expected {
        return Err(KeyError::BadLength {
            got: bytes.len(),
            expected,
        });
    }
    Ok((name, bytes))
}

/// A secret signing key. Its `Debug` never shows the key material.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
            return Err(KeyError::BadName);
        }
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(KeyError::RandomSource)?;
        Ok(Self {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature {
            name: self.name.clone(),
            bytes: self.key.sign(message).to_bytes(),
        }
    }

    /// The key in Nix's secret-key file format (no trailing newline). Handle with care.
    pub fn to_nix_format(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.to_keypair_bytes())
        )
    }
}

impl FromStr for SecretKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_named(s, 64).map_err(|e| match e {
            KeyError::BadLength { got: 32, .. } => KeyError::PublicNotSecret,
            e => e,
        })?;
        let mut arr = [0u8; 64];
        arr.copy_from_slice(&bytes);
        let key = SigningKey::from_keypair_bytes(&arr).map_err(|_| KeyError::Inconsistent)?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True if `sig` is by this key (same name) and valid for `message`.
    pub fn verifies(&self, message: &[u8], sig: &Signature) -> bool {
        sig.name == self.name
            && self
                .key
                .verify(message, &ed25519_dalek::Signature::from_bytes(&sig.bytes))
                .is_ok()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_named(s, 32).map_err(|e| match e {
            KeyError::BadLength { got: 64, .. } => KeyError::SecretNotPublic,
            e => e,
        })?;
        let mut arr = [0u8; 32];
        arr.copy_from_slice(&bytes);
        let key = VerifyingKey::from_bytes(&arr).map_err(|_| KeyError::BadPublicKey)?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One `Sig:` value.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    name: String,
    bytes: [u8; 64],
}

impl Signature {
    pub fn key_name(&self) -> &str {
        &self.name
    }
}

impl FromStr for Signature {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split_named(s, 64)?;
        let mut arr = [0u8; 64];
        arr.copy_from_slice(&bytes);
        Ok(Self {
            name: name.to_owned(),
            bytes: arr,
        })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated by `nix key generate-secret --key-name test-1` (Nix 2.8) and
    // `nix key convert-secret-to-public`.
    const NIX_SECRET: &str = "test-1:py8LutmF0WPGQ/GfAtSlnXa2nHLoHvbk87lkVhfTyD3/4vRD+MqGbp1TVYv6b3Zq8+v/EAvvsF8neXCDcReW5Q==";
    const NIX_PUBLIC: &str = "test-1:/+L0Q/jKhm6dU1WL+m92avPr/xAL77BfJ3lwg3EXluU=";

    #[test]
    fn nix_generated_key_parses_and_matches_its_public_key() {
        let sk: SecretKey = NIX_SECRET.parse().unwrap();
        assert_eq!(sk.name(), "test-1");
        assert_eq!(sk.public().to_string(), NIX_PUBLIC);
        assert_eq!(sk.to_nix_format(), NIX_SECRET);
        // Debug names the key (logs say which one) and never shows its material.
        let debug = format!("{sk:?}");
        assert!(
            debug.contains("test-1") && !debug.contains("py8L"),
            "{debug}"
        );
        let pk: PublicKey = NIX_PUBLIC.parse().unwrap();
        assert_eq!(pk.name(), "test-1");
        assert_eq!(sk.public().name(), "test-1");
        // Public keys and signatures debug-print in Nix's format, as configs and logs write them.
        assert_eq!(format!("{pk:?}"), NIX_PUBLIC);
        let sig = sk.sign(b"x");
        assert_eq!(format!("{sig:?}"), sig.to_string());
    }

    #[test]
    fn sign_and_verify() {
        let sk = SecretKey::generate("cellar-1").unwrap();
        let pk: PublicKey = sk.public().to_string().parse().unwrap();
        let sig = sk.sign(b"1;/nix/store/x;sha256:y;1;");
        let sig: Signature = sig.to_string().parse().unwrap();
        assert!(pk.verifies(b"1;/nix/store/x;sha256:y;1;", &sig));
        assert!(!pk.verifies(b"1;/nix/store/x;sha256:y;2;", &sig));
        let other = SecretKey::generate("cellar-1").unwrap().public();
        assert!(!other.verifies(b"1;/nix/store/x;sha256:y;1;", &sig));
    }

    #[test]
    fn generated_keys_need_a_name_nix_can_parse() {
        // `name:base64`: a colon in the name would end it early, whitespace ends the line.
        for bad in ["", "a:b", "a b", "a\tb"] {
            assert!(
                matches!(SecretKey::generate(bad), Err(KeyError::BadName)),
                "{bad:?}"
            );
        }
        assert_eq!(SecretKey::generate("cache-1").unwrap().name(), "cache-1");
    }

    #[test]
    fn malformed_keys() {
        assert_eq!("abc".parse::<SecretKey>().unwrap_err(), KeyError::NoName);
        // As `trusted-public-keys` lists them.
        let two = "a:11qvsiUY6RIwU7BRz1zS4HS1bFQVaq9VW5MLzKlYF5c= b:22qvsiUY6RIwU7BRz1zS4HS1bFQVaq9VW5MLzKlYF5c=";
        assert_eq!(two.parse::<PublicKey>().unwrap_err(), KeyError::SeveralKeys);
        assert_eq!(":AAAA".parse::<SecretKey>().unwrap_err(), KeyError::BadName);
        assert_eq!(
            "k:!!".parse::<SecretKey>().unwrap_err(),
            KeyError::BadBase64
        );
        // One key given for the other: said so.
        assert_eq!(
            NIX_PUBLIC.parse::<SecretKey>().unwrap_err(),
            KeyError::PublicNotSecret
        );
        assert_eq!(
            NIX_SECRET.parse::<PublicKey>().unwrap_err(),
            KeyError::SecretNotPublic
        );
        assert!(matches!(
            "k:AAAA".parse::<SecretKey>(),
            Err(KeyError::BadLength { got: 3, .. })
        ));
        assert!(matches!(
            "k:AAAA".parse::<PublicKey>(),
            Err(KeyError::BadLength { got: 3, .. })
        ));
        // Swap the public half for another key's: inconsistent.
        let mut bytes = BASE64.decode(&NIX_SECRET[7..]).unwrap();
        bytes[40] ^= 1;
        let tampered = format!("test-1:{}", BASE64.encode(bytes));
        assert_eq!(
            tampered.parse::<SecretKey>().unwrap_err(),
            KeyError::Inconsistent
        );
    }
}
