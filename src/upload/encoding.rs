//! Uploads sent compressed, with `Content-Encoding`: newer Nix compresses the narinfos,
//! listings and build logs it uploads to an HTTP cache when asked to (`narinfo-compression`,
//! `ls-compression`, `log-compression` in the store URL), names the method in the header, and
//! expects the server to store what it means. cellar decodes them on the way in and stores the
//! plain text: a narinfo is parsed, checked and signed anyway, and a client reading a listing
//! or a log then gets it whatever it can decode.
//!
//! Decoding runs on a blocking thread fed from the body as it comes, and counts what it
//! produces: the limit of each kind of file applies to the decoded bytes, so a small body that
//! decodes to gigabytes is refused (413) once past it, without being held.

use std::io::{self, Read};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::error::UploadError;
use crate::nix::Compression;

/// How much the decoder produces at a time.
const CHUNK: usize = 64 * 1024;

/// The coding named by a PUT's `Content-Encoding`: `None` when it is absent or names no
/// coding (`identity`, or `none` as a Nix compression setting), else one cellar decodes. Any
/// other (several codings, `lz4`, an unknown name) is refused before the body is read.
pub fn of(header: Option<&[u8]>) -> Result<Option<Compression>, UploadError> {
    let Some(raw) = header else {
        return Ok(None);
    };
    let name = std::str::from_utf8(raw)
        .map_err(|_| UploadError::UnsupportedEncoding(String::from_utf8_lossy(raw).into()))?;
    Compression::from_content_encoding(name).map_err(UploadError::UnsupportedEncoding)
}

/// How a body is to be decoded: its coding, and the memory an xz stream's header may ask
/// for (`upload.xz_memory_limit_bytes`, as for NARs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coding {
    pub compression: Compression,
    pub xz_memory_limit_bytes: u64,
}

/// `body` decoded from `coding`, ending with an error (an [`UploadError`] inside the
/// `io::Error`, see [`super::digest::body_error`]) if it does not decode, or once more than
/// `limit` bytes have been sent or produced. `None` passes `body` on as it is.
pub fn decode<S>(
    coding: Option<Coding>,
    body: S,
    limit: u64,
) -> futures::stream::BoxStream<'static, io::Result<Bytes>>
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    let Some(coding) = coding else {
        return body.boxed();
    };
    // The body's own failures (broken, idle) as upload errors, so that they come out as
    // such rather than as the body not decoding.
    // Bounded as sent too: empty gzip members, say, decode to nothing however many come.
    let mut sent = 0u64;
    let body = body.map(move |r| {
        let chunk = r.map_err(|e| io::Error::other(super::digest::body_error(e)))?;
        sent += chunk.len() as u64;
        if sent > limit {
            return Err(io::Error::other(UploadError::TooLarge { limit }));
        }
        Ok(chunk)
    });
    // Started when first polled: the body is not read (nor `100 Continue` sent) while the
    // upload waits for a slot, and no thread is held meanwhile.
    futures::stream::once(async move {
        let (tx, mut rx) = mpsc::channel::<io::Result<Bytes>>(2);
        let reader = SyncIoBridge::new(StreamReader::new(Box::pin(body)));
        let decoder = tokio::task::spawn_blocking(move || {
            if let Err(e) = run(coding, reader, limit, &tx) {
                // The receiver may be gone (the upload failed otherwise): nothing to tell.
                let _ = tx.blocking_send(Err(e));
            }
        });
        // The channel ends when the decoder does; one that died (a panic) did not finish,
        // and what it sent must not pass for the whole body.
        let died = futures::stream::once(async move {
            decoder.await.err().map(|e| {
                Err(io::Error::other(UploadError::Internal(format!(
                    "the decoder of the body ended: {e}"
                ))))
            })
        })
        .filter_map(futures::future::ready);
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).chain(died)
    })
    .flatten()
    .boxed()
}

/// Decodes all of `input`, sending what it produces to `tx`; stops early when the receiver
/// is gone.
fn run<R: Read>(
    coding: Coding,
    input: R,
    limit: u64,
    tx: &mpsc::Sender<io::Result<Bytes>>,
) -> io::Result<()> {
    let mut decoder = coding
        .compression
        .decoder(input, coding.xz_memory_limit_bytes)?;
    let mut produced = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = match decoder.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(not_decodable(coding.compression, e)),
        };
        produced += n as u64;
        if produced > limit {
            return Err(io::Error::other(UploadError::TooLarge { limit }));
        }
        buf.truncate(n);
        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
            return Ok(());
        }
    }
}

/// A decoder's failure as the upload's: the body's own (it broke, went idle: see [`decode`])
/// as it is, anything else as the body not decoding.
fn not_decodable(coding: Compression, e: io::Error) -> io::Error {
    if e.get_ref().is_some_and(|inner| inner.is::<UploadError>()) {
        return e;
    }
    io::Error::other(UploadError::Rejected(format!(
        "the body does not decode as its Content-Encoding {} says: {e}",
        coding.as_str()
    )))
}

/// All of `body` decoded from `coding`, at most `limit` bytes of it.
pub async fn decode_all(
    coding: Option<Coding>,
    body: Bytes,
    limit: u64,
) -> Result<Bytes, UploadError> {
    if coding.is_none() {
        return Ok(body);
    }
    let mut s = decode(
        coding,
        futures::stream::once(async move { Ok::<_, io::Error>(body) }),
        limit,
    );
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.map_err(super::digest::body_error)?);
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests;
