//! The NAR pipeline of an upload: hashes the bytes as sent (FileHash/FileSize), decompresses
//! them on the fly to hash the NAR itself (NarHash/NarSize) and check that it is one, and
//! optionally re-encodes it with another compression. Runs on a blocking thread fed through
//! bounded channels, so memory stays bounded whatever the size of the NAR.

use std::io::{self, Write};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use sha2::Digest as _;
use tokio::sync::mpsc;

use crate::error::{Error, UploadError};
use crate::nix::{Compression, Sha256};
use crate::store::ObjectWriter;

/// What a NAR file hashes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest {
    pub hash: Sha256,
    pub size: u64,
}

/// The result of running a NAR file through the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct NarDigest {
    /// Of the bytes received.
    pub input: FileDigest,
    /// Of the decompressed NAR.
    pub nar: FileDigest,
    /// Of the bytes written to the store (equal to `input` without recompression).
    pub output: FileDigest,
}

/// Refuses NARs whose compression the pipeline cannot undo: their NarHash could not be checked.
pub(super) fn check_decodable(c: Compression) -> Result<(), UploadError> {
    if c.can_decode() {
        Ok(())
    } else {
        Err(UploadError::Rejected(format!(
            "NARs compressed with {c} cannot be verified; upload with xz, zstd, bzip2 or none"
        )))
    }
}

/// The first bytes of every NAR: the length-prefixed string "nix-archive-1".
const NAR_MAGIC: &[u8] = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1";

const OUT_CHUNK: usize = 1 << 20;

struct Hashing {
    hasher: sha2::Sha256,
    size: u64,
}

impl Hashing {
    fn new() -> Self {
        Self {
            hasher: sha2::Sha256::new(),
            size: 0,
        }
    }
    fn update(&mut self, b: &[u8]) {
        self.hasher.update(b);
        self.size += b.len() as u64;
    }
    fn finish(self) -> FileDigest {
        FileDigest {
            hash: Sha256::from_bytes(self.hasher.finalize().into()),
            size: self.size,
        }
    }
}

/// Where re-encoded bytes go: hashed, then sent to the async side in 1 MiB chunks.
struct OutSink {
    tx: mpsc::Sender<Bytes>,
    hash: Hashing,
    buf: Vec<u8>,
}

impl OutSink {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(OUT_CHUNK),
        ));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::other("upload cancelled"))
    }
}

impl Write for OutSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.hash.update(b);
        self.buf.extend_from_slice(b);
        if self.buf.len() >= OUT_CHUNK {
            self.send()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Encoder {
    Plain(OutSink),
    Xz(liblzma::write::XzEncoder<OutSink>),
    Zstd(zstd::stream::write::Encoder<'static, OutSink>),
}

impl Encoder {
    fn new(c: Compression, level: Option<i32>, out: OutSink) -> io::Result<Self> {
        Ok(match c {
            Compression::Xz => Self::Xz(liblzma::write::XzEncoder::new(
                out,
                level.unwrap_or(6).clamp(0, 9) as u32,
            )),
            Compression::Zstd => {
                Self::Zstd(zstd::stream::write::Encoder::new(out, level.unwrap_or(3))?)
            }
            Compression::None => Self::Plain(out),
            // Config validation keeps these out; never store plain bytes under their names.
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("cannot encode to {other}"),
                ));
            }
        })
    }
    fn finish(self) -> io::Result<OutSink> {
        match self {
            Self::Plain(o) => Ok(o),
            Self::Xz(e) => e.finish(),
            Self::Zstd(e) => e.finish(),
        }
    }
}

impl Write for Encoder {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(o) => o.write(b),
            Self::Xz(e) => e.write(b),
            Self::Zstd(e) => e.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Receives the decompressed NAR: hashes it, checks the magic, feeds the re-encoder.
struct NarSink {
    hash: Hashing,
    head: Vec<u8>,
    encoder: Option<Encoder>,
}

impl Write for NarSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.head.len() < NAR_MAGIC.len() {
            let take = (NAR_MAGIC.len() - self.head.len()).min(b.len());
            self.head.extend_from_slice(&b[..take]);
            if !NAR_MAGIC.starts_with(&self.head) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "not a NAR"));
            }
        }
        self.hash.update(b);
        if let Some(e) = &mut self.encoder {
            e.write_all(b)?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Decoder {
    Plain(NarSink),
    Xz(liblzma::write::XzDecoder<NarSink>),
    Zstd(zstd::stream::write::Decoder<'static, NarSink>),
    Bzip2(bzip2::write::BzDecoder<NarSink>),
}

impl Decoder {
    fn new(c: Compression, sink: NarSink) -> io::Result<Self> {
        Ok(match c {
            Compression::None => Self::Plain(sink),
            Compression::Xz => Self::Xz(liblzma::write::XzDecoder::new_multi_decoder(sink)),
            Compression::Zstd => Self::Zstd(zstd::stream::write::Decoder::new(sink)?),
            Compression::Bzip2 => Self::Bzip2(bzip2::write::BzDecoder::new(sink)),
            // Refused by `check_decodable` before a decoder is built.
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{other} cannot be decoded"),
                ));
            }
        })
    }
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Self::Plain(s) => s.write_all(b),
            Self::Xz(d) => d.write_all(b),
            Self::Zstd(d) => d.write_all(b),
            Self::Bzip2(d) => d.write_all(b),
        }
    }
    fn finish(self) -> io::Result<NarSink> {
        match self {
            Self::Plain(s) => Ok(s),
            Self::Xz(d) => d.finish(),
            Self::Zstd(mut d) => {
                d.flush()?;
                Ok(d.into_inner())
            }
            Self::Bzip2(mut d) => d.finish(),
        }
    }
}

fn rejected(e: io::Error) -> UploadError {
    UploadError::Rejected(format!("the NAR does not decompress as declared: {e}"))
}

/// Runs `body` (compressed with `input`) through the pipeline. With `writer`, the bytes to
/// store — the body as received, or re-encoded to `recompress` — are written to it (the caller
/// commits or aborts it). Body errors come back as [`UploadError::Body`], the writer's as
/// [`Error::Store`].
pub async fn digest_into<S>(
    body: S,
    input: Compression,
    recompress: Option<(Compression, Option<i32>)>,
    writer: Option<&mut Box<dyn ObjectWriter>>,
) -> Result<NarDigest, Error>
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    check_decodable(input)?;
    let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(8);
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(8);
    let want_output = writer.is_some();

    let worker = tokio::task::spawn_blocking(move || -> Result<NarDigest, UploadError> {
        let mut input_hash = Hashing::new();
        let encoder = match recompress {
            Some((c, level)) if want_output => Some(
                Encoder::new(
                    c,
                    level,
                    OutSink {
                        tx: out_tx.clone(),
                        hash: Hashing::new(),
                        buf: Vec::with_capacity(OUT_CHUNK),
                    },
                )
                .map_err(|e| UploadError::Internal(format!("starting the {c} encoder: {e}")))?,
            ),
            _ => None,
        };
        let reencoding = encoder.is_some();
        let sink = NarSink {
            hash: Hashing::new(),
            head: Vec::with_capacity(NAR_MAGIC.len()),
            encoder,
        };
        let mut dec = Decoder::new(input, sink).map_err(rejected)?;
        while let Some(chunk) = in_rx.blocking_recv() {
            input_hash.update(&chunk);
            dec.write_all(&chunk).map_err(rejected)?;
            if want_output && !reencoding && out_tx.blocking_send(chunk).is_err() {
                return Err(UploadError::Internal("upload cancelled".into()));
            }
        }
        let sink = dec.finish().map_err(rejected)?;
        if sink.head.len() < NAR_MAGIC.len() {
            return Err(UploadError::Rejected(
                "the upload is not a NAR (too short)".into(),
            ));
        }
        let input = input_hash.finish();
        let nar = sink.hash.finish();
        let output = match sink.encoder {
            Some(e) => {
                let mut out = e.finish().map_err(|e| {
                    UploadError::Internal(format!("finishing the re-encoded NAR: {e}"))
                })?;
                out.send().map_err(|e| {
                    UploadError::Internal(format!("passing on the re-encoded NAR: {e}"))
                })?;
                out.hash.finish()
            }
            None => input,
        };
        Ok(NarDigest { input, nar, output })
    });

    let feeder = tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| UploadError::Body(e.to_string()))?;
            if in_tx.send(chunk).await.is_err() {
                break; // the worker failed; its error is the one to report
            }
        }
        Ok::<(), UploadError>(())
    });

    let mut write_err = None;
    if let Some(w) = writer {
        while let Some(chunk) = out_rx.recv().await {
            if let Err(e) = w.write(chunk).await {
                write_err = Some(e);
                break;
            }
        }
    }
    drop(out_rx);
    let fed = feeder
        .await
        .map_err(|e| UploadError::Internal(format!("the body reader task failed: {e}")))?;
    let result = worker
        .await
        .map_err(|e| UploadError::Internal(format!("the NAR digest task failed: {e}")))?;
    fed?;
    if let Some(e) = write_err {
        return Err(Error::Store(e));
    }
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nar(payload: &[u8]) -> Vec<u8> {
        let mut v = NAR_MAGIC.to_vec();
        v.extend_from_slice(&[0, 0, 0]);
        v.extend_from_slice(payload);
        v
    }

    fn chunks(data: Vec<u8>) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let parts: Vec<io::Result<Bytes>> = data
            .chunks(1000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(parts)
    }

    #[tokio::test]
    async fn hashes_compressed_and_plain() {
        let plain = nar(&vec![7u8; 100_000]);
        let xz = {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(&plain).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&plain[..], 3).unwrap();
        let bz = {
            let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
            e.write_all(&plain).unwrap();
            e.finish().unwrap()
        };
        for (c, data) in [
            (Compression::None, plain.clone()),
            (Compression::Xz, xz),
            (Compression::Zstd, zst),
            (Compression::Bzip2, bz),
        ] {
            let d = digest_into(chunks(data.clone()), c, None, None)
                .await
                .unwrap();
            assert_eq!(d.nar.hash, Sha256::digest(&plain), "{c}");
            assert_eq!(d.nar.size, plain.len() as u64);
            assert_eq!(d.input.hash, Sha256::digest(&data));
            assert_eq!(d.input.size, data.len() as u64);
        }
    }

    #[tokio::test]
    async fn rejects_non_nars_and_truncated_streams() {
        let e = digest_into(
            chunks(b"hello world, not a nar".to_vec()),
            Compression::None,
            None,
            None,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, Error::Upload(UploadError::Rejected(_))),
            "{e:?}"
        );
        let plain = nar(&[1u8; 5000]);
        let mut xz = {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(&plain).unwrap();
            e.finish().unwrap()
        };
        xz.truncate(xz.len() / 2);
        let e = digest_into(chunks(xz), Compression::Xz, None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Upload(UploadError::Rejected(_))),
            "{e:?}"
        );
        let e = digest_into(chunks(plain), Compression::Brotli, None, None)
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::Upload(UploadError::Rejected(_))),
            "{e:?}"
        );
    }

    /// `Compression::can_decode`/`can_encode` promise exactly the codecs built here.
    #[test]
    fn capabilities_match_the_codecs() {
        for c in Compression::ALL {
            let sink = NarSink {
                hash: Hashing::new(),
                head: Vec::new(),
                encoder: None,
            };
            assert_eq!(Decoder::new(c, sink).is_ok(), c.can_decode(), "{c}");
            let (tx, _rx) = mpsc::channel(1);
            let out = OutSink {
                tx,
                hash: Hashing::new(),
                buf: Vec::new(),
            };
            assert_eq!(Encoder::new(c, None, out).is_ok(), c.can_encode(), "{c}");
        }
    }

    #[tokio::test]
    async fn body_errors_are_reported_as_such() {
        let s = futures::stream::iter(vec![
            Ok(Bytes::from(nar(b"x"))),
            Err(io::Error::other("client went away")),
        ]);
        let e = digest_into(s, Compression::None, None, None)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Upload(UploadError::Body(_))), "{e:?}");
    }

    #[tokio::test]
    async fn recompresses_into_the_writer() {
        use crate::store::Store as _;
        let store = crate::store::memory::MemoryStore::new();
        let plain = nar(&vec![3u8; 300_000]);
        let xz = {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
            e.write_all(&plain).unwrap();
            e.finish().unwrap()
        };
        let mut w = store.writer("out").await.unwrap();
        let d = digest_into(
            chunks(xz.clone()),
            Compression::Xz,
            Some((Compression::Zstd, Some(3))),
            Some(&mut w),
        )
        .await
        .unwrap();
        w.commit().await.unwrap();
        let stored = store.get_bytes("out", u64::MAX).await.unwrap().unwrap();
        assert_eq!(d.output.hash, Sha256::digest(&stored));
        assert_eq!(d.output.size, stored.len() as u64);
        assert_eq!(zstd::decode_all(&stored[..]).unwrap(), plain);
        assert_eq!(d.input.hash, Sha256::digest(&xz));
    }
}
