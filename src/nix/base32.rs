//! Nix's base-32 encoding ("nix32").
//!
//! Nix writes hashes in a base-32 alphabet without `e`, `o`, `u` and `t`, and — unlike RFC 4648 —
//! emits the characters from the *last* 5-bit group to the first, reading bits little-endian.
//! Store path hash parts (20 bytes → 32 chars) and `sha256:` hashes (32 bytes → 52 chars) use it.

use thiserror::Error;

/// The 32 characters of the nix32 alphabet, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Base32Error {
    #[error("invalid nix-base32 character {0:?}")]
    InvalidChar(char),
    #[error("nix-base32 string has {got} characters, expected {expected}")]
    BadLength { got: usize, expected: usize },
    #[error("nix-base32 string has non-zero padding bits")]
    NonZeroPadding,
}

/// Number of nix32 characters needed for `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 8 - 1) / 5 + 1
    }
}

/// The value of one alphabet character, or `None` if it is not in the alphabet.
pub fn char_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'd' => Some(c - b'a' + 10),
        b'f'..=b'n' => Some(c - b'f' + 14),
        b'p'..=b's' => Some(c - b'p' + 23),
        b'v'..=b'z' => Some(c - b'v' + 27),
        _ => None,
    }
}

/// True if every byte of `s` is in the nix32 alphabet.
pub fn is_nix32(s: &str) -> bool {
    s.bytes().all(|c| char_value(c).is_some())
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = bytes[i] >> j;
        let hi = if i + 1 < bytes.len() {
            bytes[i + 1].checked_shl(8 - j as u32).unwrap_or(0)
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Decodes a nix32 string into exactly `out_len` bytes.
pub fn decode(s: &str, out_len: usize) -> Result<Vec<u8>, Base32Error> {
    let expected = encoded_len(out_len);
    if s.len() != expected {
        return Err(Base32Error::BadLength {
            got: s.len(),
            expected,
        });
    }
    let mut out = vec![0u8; out_len];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = char_value(c).ok_or(Base32Error::InvalidChar(c as char))? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let v = digit << j;
        out[i] |= (v & 0xff) as u8;
        let carry = (v >> 8) as u8;
        if i + 1 < out_len {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(Base32Error::NonZeroPadding);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sha256_vectors() {
        // sha256("") in nix32, as printed by `nix hash to-base32`.
        let empty = hex::decode("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            .unwrap();
        assert_eq!(
            encode(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            decode("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73", 32).unwrap(),
            empty
        );
    }

    #[test]
    fn round_trips_all_lengths() {
        for len in 0..40usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let s = encode(&bytes);
            assert_eq!(s.len(), encoded_len(len));
            assert!(is_nix32(&s));
            assert_eq!(decode(&s, len).unwrap(), bytes);
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            decode("e", 1).unwrap_err(),
            Base32Error::BadLength {
                got: 1,
                expected: 2
            }
        );
        assert_eq!(decode("0e", 1).unwrap_err(), Base32Error::InvalidChar('e'));
        // 2 chars carry 10 bits for 1 byte: the top two bits must be zero.
        assert_eq!(decode("z0", 1).unwrap_err(), Base32Error::NonZeroPadding);
        for c in ['e', 'o', 'u', 't', 'A', '-', '/'] {
            assert!(char_value(c as u8).is_none(), "{c}");
        }
    }
}
