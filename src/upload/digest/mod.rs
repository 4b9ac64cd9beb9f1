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

mod flat;

/// What a NAR file hashes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest {
    pub hash: Sha256,
    pub size: u64,
}

/// The result of running a NAR file through the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct NarDigest {
    /// How the bytes received are compressed: as declared, or for a NAR named `.nar`, what
    /// its first bytes say (plain or gzip, see [`digest_named_into`]).
    pub compression: Compression,
    /// Of the bytes received.
    pub input: FileDigest,
    /// Of the decompressed NAR.
    pub nar: FileDigest,
    /// Of the bytes written to the store (equal to `input` without recompression).
    pub output: FileDigest,
    /// Of the contents of the one regular file the NAR holds, if it is one (what Nix's flat
    /// and text content addresses hash).
    pub flat: Option<Sha256>,
}

/// What one run of the pipeline may consume: bounds that keep a hostile or broken upload from
/// holding memory or disk without end.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes as sent and bytes decompressed, each (`upload.max_nar_bytes`).
    pub max_nar_bytes: u64,
    /// Memory the xz decoder may use (`upload.xz_memory_limit_bytes`); a stream whose
    /// dictionary needs more is refused instead of allocated.
    pub xz_memory_limit_bytes: u64,
}

impl Limits {
    pub fn from_config(c: &crate::config::UploadConfig) -> Self {
        Self {
            max_nar_bytes: c.max_nar_bytes,
            xz_memory_limit_bytes: c.xz_memory_limit_bytes,
        }
    }
}

/// The decompressed NAR passed `Limits::max_nar_bytes`: carried inside the `io::Error` the
/// decoders pass on, so it comes out as 413 rather than "does not decompress".
#[derive(Debug)]
struct NarTooLarge;

impl std::fmt::Display for NarTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the decompressed NAR is too large")
    }
}

impl std::error::Error for NarTooLarge {}

/// Refuses NARs whose compression the pipeline cannot undo: their NarHash could not be checked.
pub(super) fn check_decodable(c: Compression) -> Result<(), UploadError> {
    if c.can_decode() {
        Ok(())
    } else {
        Err(UploadError::Rejected(format!(
            "NARs compressed with {c} cannot be verified; upload with zstd, xz, bzip2, br, \
             gzip or none"
        )))
    }
}

/// The first bytes of every NAR: the length-prefixed string "nix-archive-1".
const NAR_MAGIC: &[u8] = b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1";

/// The first bytes of gzip data.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The compressions Nix names `.nar` and cellar does not decode, by their first bytes (lzma's
/// header: its properties byte as Nix's libarchive writes it, then a dictionary size below
/// 16 MiB).
const UNDECODABLE: [(&str, &[u8]); 5] = [
    ("lzma", &[0x5d, 0x00, 0x00]),
    ("compress", &[0x1f, 0x9d]),
    ("lzop", b"\x89LZO"),
    ("grzip", b"GRZipII"),
    ("lrzip", b"LRZI"),
];

/// Which of [`UNDECODABLE`] bytes beginning with `head` are.
fn undecodable(head: &[u8]) -> Option<&'static str> {
    UNDECODABLE
        .iter()
        .find(|(_, magic)| head.starts_with(magic))
        .map(|(c, _)| *c)
}

/// The compression of bytes that begin with `head`, sent under a name that says `named`: Nix
/// gives gzip NARs no extension of their own (`nix copy --to 'http://…?compression=gzip'`
/// uploads `<hash>.nar`), and a NAR never begins as gzip does. (Nix names lzma, lzop, grzip,
/// lrzip and compress `.nar` too; cellar decodes none of them, and refuses them saying so:
/// [`undecodable`].)
fn sniffed(named: Compression, head: &[u8]) -> Compression {
    if named == Compression::None && head.starts_with(&GZIP_MAGIC) {
        Compression::Gzip
    } else {
        named
    }
}

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
    flat: flat::FlatFile,
    head: Vec<u8>,
    encoder: Option<Encoder>,
    /// A decompression bomb stops here, before it is hashed, re-encoded or stored.
    max_bytes: u64,
}

impl Write for NarSink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.head.len() < NAR_MAGIC.len() {
            let take = (NAR_MAGIC.len() - self.head.len()).min(b.len());
            self.head.extend_from_slice(&b[..take]);
            if !NAR_MAGIC.starts_with(&self.head) {
                // Declared plain (a narinfo's `Compression: none`), but compressed: gzip, or
                // one of those Nix names `.nar` too, and cellar does not decode.
                let why = if self.head.starts_with(&GZIP_MAGIC) {
                    "not a NAR but gzip data".to_owned()
                } else if let Some(c) = undecodable(&self.head) {
                    format!(
                        "not a NAR but {c} data, which cellar cannot verify; upload with \
                         zstd, xz, bzip2, br, gzip or none"
                    )
                } else {
                    // What Nix 2.8 sends when it retries an upload that failed midway: the
                    // rest of the body alone.
                    "not a NAR (it does not begin as one; if an earlier try of this upload \
                     failed midway, Nix sent only the rest of it: run the copy again)"
                        .to_owned()
                };
                return Err(io::Error::new(io::ErrorKind::InvalidData, why));
            }
        }
        if self.hash.size + b.len() as u64 > self.max_bytes {
            return Err(io::Error::other(NarTooLarge));
        }
        self.hash.update(b);
        self.flat.update(b);
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
    // zstd's `write::Decoder` cannot tell a finished frame from a cut one; the `zio::Writer`
    // under it can, in `finish`.
    Zstd(zstd::stream::zio::Writer<NarSink, zstd::stream::raw::Decoder<'static>>),
    Bzip2(bzip2::write::BzDecoder<NarSink>),
    // Boxed: its state is kilobytes, the others' hundreds of bytes.
    Brotli(Box<brotli_decompressor::DecompressorWriter<NarSink>>),
    // Members one after the other, like `gzip -d`.
    Gzip(flate2::write::MultiGzDecoder<NarSink>),
}

impl Decoder {
    fn new(c: Compression, sink: NarSink, limits: Limits) -> io::Result<Self> {
        Ok(match c {
            Compression::None => Self::Plain(sink),
            Compression::Xz => {
                // Concatenated streams, like `xz -d`; the memory limit is what a stream's
                // header may ask for its dictionary.
                let stream = liblzma::stream::Stream::new_stream_decoder(
                    limits.xz_memory_limit_bytes,
                    liblzma::stream::CONCATENATED,
                )?;
                Self::Xz(liblzma::write::XzDecoder::new_stream(sink, stream))
            }
            Compression::Zstd => Self::Zstd(zstd::stream::zio::Writer::new(
                sink,
                zstd::stream::raw::Decoder::new()?,
            )),
            Compression::Bzip2 => Self::Bzip2(bzip2::write::BzDecoder::new(sink)),
            Compression::Brotli => {
                let mut d = brotli_decompressor::DecompressorWriter::new(sink, 64 << 10);
                // The standard window (at most 16 MiB of memory), not the large one the
                // crate accepts by default (up to 1 GiB for a stream that asks): Nix writes
                // standard streams.
                d.set_parameter(
                    brotli_decompressor::BrotliDecoderParameter::BROTLI_DECODER_PARAM_LARGE_WINDOW,
                    0,
                );
                Self::Brotli(Box::new(d))
            }
            Compression::Gzip => Self::Gzip(flate2::write::MultiGzDecoder::new(sink)),
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
            // Bytes after the end of the stream are refused (a write of them takes none).
            Self::Brotli(d) => d.write_all(b),
            Self::Gzip(d) => d.write_all(b),
        }
    }
    fn finish(self) -> io::Result<NarSink> {
        match self {
            Self::Plain(s) => Ok(s),
            Self::Xz(d) => d.finish(),
            Self::Zstd(mut d) => {
                // Fails with "incomplete frame" if the stream was cut.
                d.finish()?;
                Ok(d.into_inner().0)
            }
            Self::Bzip2(mut d) => d.finish(),
            Self::Brotli(mut d) => {
                // Fails if the stream was cut (or with the sink's own error).
                d.close()?;
                d.into_inner().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "the brotli stream is cut short")
                })
            }
            // Fails if the stream was cut (its trailer, with the CRC and length, missing).
            Self::Gzip(d) => d.finish(),
        }
    }
}

fn rejected(e: io::Error, limits: Limits) -> UploadError {
    if e.get_ref().is_some_and(|inner| inner.is::<NarTooLarge>()) {
        return UploadError::TooLarge {
            limit: limits.max_nar_bytes,
        };
    }
    let xz_memlimit = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<liblzma::stream::Error>())
        .is_some_and(|x| matches!(x, liblzma::stream::Error::MemLimit));
    if xz_memlimit {
        return UploadError::Rejected(format!(
            "the xz stream needs more memory to decompress than upload.xz_memory_limit_bytes \
             ({} bytes) allows",
            limits.xz_memory_limit_bytes
        ));
    }
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
    limits: Limits,
) -> Result<NarDigest, Error>
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    run(body, input, false, recompress, writer, limits).await
}

/// [`digest_into`] for a NAR file whose name is all that says how it is compressed (`named`,
/// from its extension): a `.nar` holding gzip is taken as gzip, as Nix names them so.
pub async fn digest_named_into<S>(
    body: S,
    named: Compression,
    recompress: Option<(Compression, Option<i32>)>,
    writer: Option<&mut Box<dyn ObjectWriter>>,
    limits: Limits,
) -> Result<NarDigest, Error>
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    run(body, named, true, recompress, writer, limits).await
}

async fn run<S>(
    body: S,
    input: Compression,
    by_name: bool,
    recompress: Option<(Compression, Option<i32>)>,
    writer: Option<&mut Box<dyn ObjectWriter>>,
    limits: Limits,
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
            flat: flat::FlatFile::default(),
            head: Vec::with_capacity(NAR_MAGIC.len()),
            encoder,
            max_bytes: limits.max_nar_bytes,
        };
        let rejected = |e| rejected(e, limits);
        // The first chunks, held until their first bytes say the compression of a `.nar`.
        let mut first = Vec::new();
        let mut head = Vec::with_capacity(GZIP_MAGIC.len());
        while by_name && head.len() < GZIP_MAGIC.len() {
            let Some(chunk) = in_rx.blocking_recv() else {
                break;
            };
            if chunk.is_empty() {
                continue;
            }
            let take = (GZIP_MAGIC.len() - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            first.push(chunk);
        }
        let compression = sniffed(input, &head);
        let mut dec = Decoder::new(compression, sink, limits).map_err(rejected)?;
        let chunks = first
            .into_iter()
            .chain(std::iter::from_fn(|| in_rx.blocking_recv()));
        for chunk in chunks {
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
        let flat = sink.flat.finish();
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
        Ok(NarDigest {
            compression,
            input,
            nar,
            output,
            flat,
        })
    });

    let feeder = tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        let mut received = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(body_error)?;
            received += chunk.len() as u64;
            if received > limits.max_nar_bytes {
                return Err(UploadError::TooLarge {
                    limit: limits.max_nar_bytes,
                });
            }
            if in_tx.send(chunk).await.is_err() {
                break; // the worker failed; its error is the one to report
            }
        }
        Ok::<(), UploadError>(())
    });

    let mut write_err = None;
    if let Some(w) = writer {
        // Ends when the worker drops its sender: finished, failed, or cut off by the feeder.
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

/// A body stream error as an upload error: an idle body (see [`with_idle_timeout`]) keeps its
/// own variant, an upload error carried inside is passed on, anything else is the body
/// breaking.
pub(crate) fn body_error(e: io::Error) -> UploadError {
    let inner = e.get_ref();
    if let Some(t) = inner.and_then(|i| i.downcast_ref::<IdleTimeout>()) {
        return UploadError::IdleTimeout(t.0);
    }
    // Already an upload's failure (a decoder refusing the body, see `super::encoding`).
    if let Some(u) = inner.and_then(|i| i.downcast_ref::<UploadError>()) {
        return u.clone();
    }
    UploadError::Body(e.to_string())
}

/// `body`, ending with an [`IdleTimeout`] error when no chunk arrives for `idle`. A client
/// that stops sending mid-body would otherwise hold its upload slot, thread and part buffer
/// for as long as the TCP connection lives.
pub fn with_idle_timeout<S>(
    body: S,
    idle: std::time::Duration,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    futures::stream::unfold(Some(Box::pin(body)), move |state| async move {
        let mut body = state?;
        match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(item)) => Some((item, Some(body))),
            Ok(None) => None,
            Err(_) => Some((
                Err(io::Error::other(IdleTimeout(idle.as_secs()))),
                None, // ends the stream after the error
            )),
        }
    })
}

/// The error an idle body stream ends with: no data for this many seconds.
#[derive(Debug)]
pub struct IdleTimeout(pub u64);

impl std::fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no data for {} s", self.0)
    }
}

impl std::error::Error for IdleTimeout {}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
