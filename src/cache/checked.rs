//! A NAR streamed from the store without being kept, checked against its narinfo's
//! `FileHash` on the way: the disk cache's fills and the memory cache check what they keep,
//! and this checks what neither keeps (a NAR too large for the disk cache, every fill busy, no
//! disk cache at all), so that no client is sent a whole NAR rotted in the bucket at the same
//! size as a clean `200` a proxy keeps for a year.

use bytes::Bytes;
use futures::StreamExt as _;
use sha2::Digest as _;

use crate::nix::Sha256;
use crate::store::{ByteStream, Object};

/// A body being checked.
struct Check {
    name: String,
    body: ByteStream,
    said: Sha256,
    sha: sha2::Sha256,
    /// The last chunk read, sent once the next one (or the end, and the check) comes.
    held: Option<Bytes>,
    over: bool,
}

/// `obj` (the whole of NAR file `name`, as the store sent it), its last bytes held back until
/// what came before them hashes to `said`: a body that does not ends in an error instead (so
/// the client's transfer fails), logged. A part of a NAR (a range) or a NAR stored encoded is
/// passed on as it is: neither can be checked alone.
pub fn checked(name: &str, obj: Object, said: Sha256) -> Object {
    if obj.range.is_some() || obj.encoding.is_some() {
        return obj;
    }
    let state = Check {
        name: name.to_owned(),
        body: obj.body,
        said,
        sha: sha2::Sha256::new(),
        held: None,
        over: false,
    };
    let body: ByteStream = futures::stream::unfold(state, |mut c| async move {
        if c.over {
            return None;
        }
        loop {
            match c.body.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => {
                    c.sha.update(&chunk);
                    if let Some(before) = c.held.replace(chunk) {
                        return Some((Ok(before), c));
                    }
                }
                Some(Err(e)) => {
                    c.over = true;
                    return Some((Err(e), c));
                }
                None => {
                    c.over = true;
                    let got = Sha256::from_bytes(c.sha.finalize_reset().into());
                    if got != c.said {
                        let why = super::nar::wrong_bytes(&c.name, got, c.said);
                        tracing::warn!("{why}; the transfer is cut short");
                        return Some((Err(std::io::Error::other(why)), c));
                    }
                    return c.held.take().map(|last: Bytes| (Ok(last), c));
                }
            }
        }
    })
    .boxed();
    Object { body, ..obj }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use futures::TryStreamExt as _;

    use super::*;

    fn object(chunks: &[&'static [u8]]) -> Object {
        let items: Vec<std::io::Result<Bytes>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect();
        Object {
            length: Some(chunks.iter().map(|c| c.len() as u64).sum()),
            body: futures::stream::iter(items).boxed(),
            range: None,
            encoding: None,
        }
    }

    /// Every byte of a NAR that is what its narinfo says, in order; of one that is not, all
    /// but its last chunk, then an error: the transfer fails before its end.
    #[tokio::test]
    async fn a_nar_is_sent_whole_only_if_it_hashes_to_its_file_hash() {
        let chunks: &[&'static [u8]] = &[b"nix-", b"archive", b"", b"-1"];
        let said = Sha256::digest(b"nix-archive-1");
        let sent: Vec<Bytes> = checked("x.nar", object(chunks), said)
            .body
            .try_collect()
            .await
            .unwrap();
        assert_eq!(sent.concat(), b"nix-archive-1");

        let rotted: &[&'static [u8]] = &[b"nix-", b"archivE", b"-1"];
        let mut body = checked("x.nar", object(rotted), said).body;
        let mut got = Vec::new();
        let err = loop {
            match body.next().await.expect("ended without an error") {
                Ok(b) => got.extend_from_slice(&b),
                Err(e) => break e,
            }
        };
        assert_eq!(got, b"nix-archivE", "the last chunk is held back");
        assert!(err
            .to_string()
            .contains("is not the NAR its narinfo describes"));
        assert!(body.next().await.is_none());
    }

    /// A part of a NAR is passed on unchecked (it cannot hash to the whole's hash).
    #[tokio::test]
    async fn a_range_is_passed_on() {
        let mut obj = object(&[b"archive"]);
        obj.range = Some(crate::store::ContentRange {
            start: 4,
            end: 10,
            total: 13,
        });
        let said = Sha256::digest(b"nix-archive-1");
        let sent: Vec<Bytes> = checked("x.nar", obj, said)
            .body
            .try_collect()
            .await
            .unwrap();
        assert_eq!(sent.concat(), b"archive");
    }
}
