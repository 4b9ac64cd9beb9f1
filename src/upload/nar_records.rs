//! Digest records: what a large NAR was found to be when it was uploaded, kept in the store
//! beside it, so that a narinfo reaching another replica (or this one after a restart) is
//! checked without reading the NAR back whole.
//!
//! A NAR uploaded through this process is remembered with its digest, and the narinfo that
//! follows it is checked against that. A narinfo whose NAR another process received had the
//! NAR read back and decoded before it was answered: for a NAR of tens of GiB that is minutes
//! with nothing moving on the client's connection, longer than Nix waits. So a NAR over
//! [`MIN_SIZE`] stored as it was sent is recorded as `_cellar/nar-digests/<file>`, written
//! while the NAR is committed (no round trip of its own), and a narinfo naming a NAR over
//! [`MIN_SIZE`] looks for that record before reading the NAR back.
//!
//! Trusted because the name is the file's sha256: every good copy under the name is byte for
//! byte the file the record describes (what it decompresses to, and how), whatever process
//! stored it, whenever. A record is taken only if it describes the file its name says and the
//! object stored under the name is the size the record gives; anything else is read back, as
//! before. A NAR re-encoded on upload (`upload.compression`) gets no record: its stored name is
//! the uploaded file's, not the hash of its own bytes, and two encodings need not be the same.
//!
//! A record goes with its NAR when `cellar gc` deletes it, or once older than the grace
//! period with its NAR missing and named by no upload under way (see [`crate::gc::sweep`]);
//! `cellar verify --repair` deletes those of the NARs it deletes or finds corrupt, and a read
//! back that finds a copy bad deletes its record.
//!
//! Format: a header line `cellar-nar-digest 1`, then `Compression:`, `FileHash:`, `FileSize:`,
//! `NarHash:` and `NarSize:` lines as in a narinfo.

use bytes::Bytes;

use super::digest::{FileDigest, NarDigest};
use crate::nix::{Compression, NarFileName, Sha256};

/// Where the records live, under [`crate::gc::RESERVED_PREFIX`].
pub const DIR: &str = "nar-digests/";

/// NARs stored at least this large (as sent) get a record: reading a smaller one back costs
/// about what reading its record does.
pub const MIN_SIZE: u64 = 4 << 20;

/// A record larger than this is not one.
pub const MAX_BYTES: u64 = 4096;

const HEADER: &str = "cellar-nar-digest 1";

/// The key of the record of the NAR `file`.
pub fn key(file: &NarFileName) -> String {
    format!("{}{DIR}{}", crate::gc::RESERVED_PREFIX, file.as_str())
}

/// The NAR file name a record's key is of, if it is one (a NAR's name: anything else under
/// [`DIR`] is not a record).
pub fn nar_of(key: &str) -> Option<&str> {
    key.strip_prefix(crate::gc::RESERVED_PREFIX)?
        .strip_prefix(DIR)
        .filter(|f| f.parse::<NarFileName>().is_ok())
}

/// Whether a NAR stored as sent, `d`, gets a record.
pub fn wanted(d: &NarDigest) -> bool {
    d.output.size >= MIN_SIZE
}

pub fn render(d: &NarDigest) -> Bytes {
    Bytes::from(format!(
        "{HEADER}\nCompression: {}\nFileHash: {}\nFileSize: {}\nNarHash: {}\nNarSize: {}\n",
        d.compression.as_str(),
        d.output.hash,
        d.output.size,
        d.nar.hash,
        d.nar.size,
    ))
}

/// The digest a record gives for the NAR `file`: `None` if it is not a well-formed record
/// of that very file (another file's, damaged, another version's).
pub fn parse(file: &NarFileName, text: &[u8]) -> Option<NarDigest> {
    let text = std::str::from_utf8(text).ok()?;
    let mut lines = text.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let (mut compression, mut file_hash, mut file_size, mut nar_hash, mut nar_size) =
        (None, None, None, None, None);
    for line in lines {
        let (k, v) = line.split_once(": ")?;
        match k {
            "Compression" => compression = Some(v.parse::<Compression>().ok()?),
            "FileHash" => file_hash = Some(v.parse::<Sha256>().ok()?),
            "FileSize" => file_size = Some(v.parse::<u64>().ok()?),
            "NarHash" => nar_hash = Some(v.parse::<Sha256>().ok()?),
            "NarSize" => nar_size = Some(v.parse::<u64>().ok()?),
            _ => return None,
        }
    }
    let file_digest = FileDigest {
        hash: file_hash?,
        size: file_size?,
    };
    // The record of another file (copied under this name) says nothing about this one; and
    // a NAR named `.nar.zst` is zstd, whatever a record says.
    let compression = compression?;
    let named = file.compression_from_ext().unwrap_or(Compression::None);
    let fits =
        compression == named || (named == Compression::None && compression == Compression::Gzip);
    if file_digest.hash.to_nix32() != file.file_hash() || !fits {
        return None;
    }
    Some(NarDigest {
        compression,
        input: file_digest,
        nar: FileDigest {
            hash: nar_hash?,
            size: nar_size?,
        },
        output: file_digest,
        // Records do not keep it: a narinfo needing it has its NAR read back.
        flat: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(file: &[u8], compression: Compression) -> NarDigest {
        let f = FileDigest {
            hash: Sha256::digest(file),
            size: 5 << 20,
        };
        NarDigest {
            compression,
            input: f,
            nar: FileDigest {
                hash: Sha256::digest(b"the nar"),
                size: 6 << 20,
            },
            output: f,
            flat: None,
        }
    }

    fn name(d: &NarDigest, ext: &str) -> NarFileName {
        format!("{}.nar{ext}", d.output.hash.to_nix32())
            .parse()
            .unwrap()
    }

    #[test]
    fn a_record_reads_back_as_the_digest_it_was_made_of() {
        let d = digest_of(b"file", Compression::Zstd);
        let n = name(&d, ".zst");
        let back = parse(&n, &render(&d)).unwrap();
        assert_eq!(back.compression, Compression::Zstd);
        assert_eq!(back.output, d.output);
        assert_eq!(back.input, d.output);
        assert_eq!(back.nar, d.nar);
        assert_eq!(nar_of(&key(&n)), Some(n.as_str()));
        assert_eq!(nar_of("_cellar/nar-digests/"), None);
        assert_eq!(nar_of("_cellar/nar-digests/x/y"), None);
        assert_eq!(nar_of("_cellar/nar-digests/README"), None);
        assert_eq!(nar_of("_cellar/access/x"), None);
    }

    #[test]
    fn a_gzip_nar_named_dot_nar_keeps_its_compression() {
        let d = digest_of(b"file", Compression::Gzip);
        let back = parse(&name(&d, ""), &render(&d)).unwrap();
        assert_eq!(back.compression, Compression::Gzip);
    }

    #[test]
    fn a_record_of_another_file_or_damaged_is_not_taken() {
        let d = digest_of(b"file", Compression::Zstd);
        let other = digest_of(b"other", Compression::Zstd);
        // Another file's record under this name.
        assert!(parse(&name(&other, ".zst"), &render(&d)).is_none());
        // A compression the name contradicts: a `.nar` is plain or gzip, a `.nar.zst` zstd.
        assert!(parse(&name(&d, ".xz"), &render(&d)).is_none());
        let xz = digest_of(b"file", Compression::Xz);
        assert!(parse(&name(&xz, ""), &render(&xz)).is_none());
        let gz = digest_of(b"file", Compression::Gzip);
        assert!(parse(&name(&gz, ".zst"), &render(&gz)).is_none());
        let n = name(&d, ".zst");
        let text = String::from_utf8(render(&d).to_vec()).unwrap();
        assert!(parse(&n, text.replace(HEADER, "cellar-nar-digest 2").as_bytes()).is_none());
        assert!(parse(&n, text.replace("NarSize", "Size").as_bytes()).is_none());
        let cut: String = text.lines().take(5).map(|l| format!("{l}\n")).collect();
        assert!(parse(&n, cut.as_bytes()).is_none(), "no NarSize");
        assert!(parse(&n, text.replace(": ", ":").as_bytes()).is_none());
        assert!(parse(&n, b"\xff").is_none());
        assert!(parse(&n, b"").is_none());
    }
}
