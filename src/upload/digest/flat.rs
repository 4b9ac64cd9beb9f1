//! The sha256 of the contents of a NAR that is one regular file, computed as the NAR streams
//! by: what Nix's flat (`fixed:sha256:`) and text (`text:sha256:`) content addresses hash.

use sha2::Digest as _;

use crate::nix::Sha256;

/// A NAR string: its length (u64, little endian), its bytes, zeros to a multiple of 8.
fn token(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len().next_multiple_of(8), 0);
}

/// What comes before the contents' length: a plain file. An executable one is no flat or
/// text path (Nix makes neither executable, and their hash does not cover the bit).
fn header() -> Vec<u8> {
    let mut plain = Vec::new();
    for t in ["nix-archive-1", "(", "type", "regular", "contents"] {
        token(t.as_bytes(), &mut plain);
    }
    plain
}

/// Enough of a NAR's start to tell its layout: the header and the contents' length.
const HEAD: usize = 96;

#[derive(Default)]
pub(super) struct FlatFile {
    /// Bytes seen.
    pos: u64,
    /// The first bytes, until the layout is known.
    head: Vec<u8>,
    /// Where the contents begin, and how long they are, once known.
    contents: Option<(u64, u64)>,
    hasher: sha2::Sha256,
    /// The bytes after the contents: padding and the closing `)`.
    trailer: Vec<u8>,
    /// Not one regular file.
    not: bool,
}

impl FlatFile {
    pub(super) fn update(&mut self, b: &[u8]) {
        if self.not {
            return;
        }
        if self.contents.is_some() {
            let at = self.pos;
            self.pos += b.len() as u64;
            return self.body(at, b);
        }
        self.head.extend_from_slice(b);
        self.pos += b.len() as u64;
        if self.head.len() >= HEAD {
            self.layout();
        }
    }

    /// Tells the layout from the head, and runs the head through [`Self::body`].
    fn layout(&mut self) {
        let h = header();
        let found = self
            .head
            .get(h.len()..h.len() + 8)
            .and_then(|len| len.try_into().ok())
            .map(u64::from_le_bytes)
            .filter(|_| self.head.starts_with(&h))
            .map(|len| (h.len() as u64 + 8, len));
        match found {
            Some(c) => {
                self.contents = Some(c);
                let head = std::mem::take(&mut self.head);
                self.body(0, &head);
            }
            None => self.not = true,
        }
    }

    /// `b`, which starts at `at` in the NAR: the contents hashed, what follows kept.
    fn body(&mut self, at: u64, b: &[u8]) {
        let Some((start, len)) = self.contents else {
            return;
        };
        let end = start.saturating_add(len);
        let (from, to) = (at, at + b.len() as u64);
        let c0 = from.max(start).min(to);
        let c1 = to.min(end).max(c0);
        self.hasher
            .update(&b[(c0 - from) as usize..(c1 - from) as usize]);
        if to > end {
            let tail = &b[(end.max(from) - from) as usize..];
            if self.trailer.len() + tail.len() > 24 {
                self.not = true;
                return;
            }
            self.trailer.extend_from_slice(tail);
        }
    }

    /// The contents' hash, if the NAR was one regular file.
    pub(super) fn finish(mut self) -> Option<Sha256> {
        if self.contents.is_none() && !self.not {
            self.layout();
        }
        let (start, len) = self.contents.filter(|_| !self.not)?;
        // The length is the NAR's word: one near u64::MAX overflows, and is no file here.
        let padded = len.checked_next_multiple_of(8)?;
        let pad = usize::try_from(padded - len).ok()?;
        let mut close = Vec::new();
        token(b")", &mut close);
        close.splice(0..0, std::iter::repeat_n(0u8, pad));
        let end = start.checked_add(padded)?.checked_add(16)?;
        (self.pos == end && self.trailer == close)
            .then(|| Sha256::from_bytes(self.hasher.finalize().into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NAR of one regular file, as Nix writes it.
    fn nar(contents: &[u8], executable: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for t in ["nix-archive-1", "(", "type", "regular"] {
            token(t.as_bytes(), &mut out);
        }
        if executable {
            token(b"executable", &mut out);
            token(b"", &mut out);
        }
        token(b"contents", &mut out);
        token(contents, &mut out);
        token(b")", &mut out);
        out
    }

    fn flat_of(nar: &[u8], chunk: usize) -> Option<Sha256> {
        let mut f = FlatFile::default();
        for c in nar.chunks(chunk.max(1)) {
            f.update(c);
        }
        f.finish()
    }

    #[test]
    fn one_file_hashes_to_its_contents_in_any_chunking() {
        for contents in [&b""[..], b"u", b"hello\n", &[7u8; 1000], &[1u8; 8]] {
            for exec in [false, true] {
                let n = nar(contents, exec);
                // An executable file is no flat or text path.
                let expected = (!exec).then(|| Sha256::digest(contents));
                for chunk in [1, 3, 8, 100, 129, n.len()] {
                    assert_eq!(
                        flat_of(&n, chunk),
                        expected,
                        "{} bytes, exec {exec}, chunks of {chunk}",
                        contents.len()
                    );
                }
            }
        }
    }

    /// What follows the contents is kept only up to what a file's NAR has there (padding and
    /// the closing `)`): a NAR whose header claims short contents before a long tail is not
    /// held in memory.
    #[test]
    fn a_long_tail_is_not_held() {
        let mut n = nar(b"hello\n", false);
        n.extend_from_slice(&[0u8; 1 << 16]);
        let mut f = FlatFile::default();
        f.update(&n);
        assert!(f.trailer.len() <= 24, "{}", f.trailer.len());
        assert_eq!(f.finish(), None);
    }

    /// A length near u64::MAX in the header is no file (and no overflow).
    #[test]
    fn a_huge_length_is_none() {
        let mut n = nar(b"hello\n", false);
        n[88..96].copy_from_slice(&(u64::MAX - 3).to_le_bytes());
        assert_eq!(flat_of(&n, 7), None);
    }

    /// The NAR `nix store add-file` made of `hello\n` hashes to its `CA: fixed:sha256:…`.
    #[test]
    fn nix_s_own_flat_hash() {
        let ca: Sha256 = "sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
            .parse()
            .unwrap();
        assert_eq!(flat_of(&nar(b"hello\n", false), 5), Some(ca));
    }

    #[test]
    fn anything_else_has_none() {
        let one = nar(b"hello\n", false);
        let mut dir = Vec::new();
        for t in ["nix-archive-1", "(", "type", "directory", ")"] {
            token(t.as_bytes(), &mut dir);
        }
        let mut longer = one.clone();
        longer.extend_from_slice(&[0; 8]);
        let mut bad_close = one.clone();
        let n = bad_close.len();
        bad_close[n - 8] = b']';
        let mut bad_pad = one.clone();
        bad_pad[96 + 6] = 1;
        for (what, n) in [
            ("a directory", dir),
            ("cut short", one[..one.len() - 1].to_vec()),
            ("longer", longer),
            ("another close", bad_close),
            ("padding not zero", bad_pad),
            ("empty", Vec::new()),
            ("the header only", one[..90].to_vec()),
        ] {
            for chunk in [1, 7, 4096] {
                assert_eq!(flat_of(&n, chunk), None, "{what}, chunks of {chunk}");
            }
        }
    }
}
