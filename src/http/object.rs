//! What the endpoint modules share for objects passed through as they are (NARs, listings,
//! logs, realisations): the headers of each kind, streamed 200/206 answers, HEAD answers, and
//! reading request bodies for PUTs.
//!
//! Bodies are streamed, never buffered whole. A store failure mid-body surfaces as a stream
//! error, which makes hyper abort the connection: the client sees a failed transfer, never a
//! clean short body.
//!
//! GET and HEAD of an object both read from the source they are given: the read path (the
//! store, then the upstreams) at the root, the store alone under `/upload`. A HEAD finds
//! exactly what a GET of the same address would serve.
//!
//! Upload bodies are cut off when they send nothing for `upload.body_idle_timeout_secs`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use tokio::sync::OwnedSemaphorePermit;

use super::AppState;
use crate::error::Error;
use crate::nix::Compression;
use crate::store::{ByteRange, ByteStream, Object, Store, StoreError};
use crate::upload::{digest, encoding};

#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Nar,
    Listing,
    Log,
    Realisation,
    DebugInfo,
}

impl Kind {
    fn content_type(self) -> &'static str {
        match self {
            Self::Nar => "application/x-nix-nar",
            Self::Listing | Self::Realisation | Self::DebugInfo => "application/json",
            Self::Log => "text/plain; charset=utf-8",
        }
    }

    fn cache_control(self) -> &'static str {
        match self {
            // Content-addressed by FileHash: never changes.
            Self::Nar => "public, max-age=31536000, immutable",
            Self::Listing | Self::Log | Self::Realisation | Self::DebugInfo => {
                "public, max-age=3600"
            }
        }
    }
}

/// The single byte range a GET asks for, if any (anything else gets the whole object).
///
/// A range asked for under `If-Range` is for the version the client holds a part of; cellar
/// sends no validator (no `ETag`, no `Last-Modified`), so no version can be shown to match
/// and the whole object is the answer (RFC 9110, 13.1.5): logs, listings and realisations
/// are replaced in place, and a resumed copy of one must not splice two versions together.
pub(super) fn range_of(headers: &HeaderMap) -> Option<ByteRange> {
    if headers.contains_key(header::IF_RANGE) {
        return None;
    }
    headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(ByteRange::parse_header)
}

fn set_common_headers(res: &mut Response, kind: Kind) {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(kind.content_type()),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(kind.cache_control()),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if matches!(kind, Kind::Log | Kind::Listing) {
        // Decoded or not by the request's `Accept-Encoding` (see `decoded_for`).
        h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// The memory an xz stream's header may ask the decoder of a served log or listing for: 65 MiB,
/// what `xz -9` needs (Nix's default level needs 9 MiB).
const SERVED_XZ_MEMORY: u64 = 65 << 20;

/// Logs and listings decoded at once: each holds a thread while its client reads, and its
/// decoder's memory. Beyond, a request waits for a slot.
const SERVED_DECODES: usize = 4;

fn served_decodes() -> &'static Arc<tokio::sync::Semaphore> {
    static SLOTS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(SERVED_DECODES)))
}

/// How long a request waits for a decode slot before it is answered 503 (`Retry-After: 1`):
/// under nginx's default `proxy_read_timeout` (60 s), so that the 503 reaches the client.
const DECODE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether a request with headers `req` takes a body in content coding `coding` as it is: it
/// sent no `Accept-Encoding` (any coding then, RFC 9110 12.5.3: Nix 2.8 sends none, and
/// decodes xz and bzip2 itself), or one that accepts `coding`: by name, or else by `*`, with
/// a weight above 0 (`q=0` refuses it).
fn takes_as_stored(req: &HeaderMap, coding: &str) -> bool {
    let mut sent = req.get_all(header::ACCEPT_ENCODING).iter().peekable();
    if sent.peek().is_none() {
        return true;
    }
    // (name, accepted) of each entry.
    let entries: Vec<(String, bool)> = sent
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|item| {
            let mut parts = item.split(';').map(str::trim);
            let name = parts.next().filter(|n| !n.is_empty())?.to_ascii_lowercase();
            let refused = parts.any(|p| {
                let q = p
                    .split_once('=')
                    .filter(|(k, _)| k.trim().eq_ignore_ascii_case("q"));
                q.is_some_and(|(_, v)| v.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
            });
            Some((name, !refused))
        })
        .collect();
    let coding = coding.trim().to_ascii_lowercase();
    let named = entries.iter().find(|(n, _)| *n == coding);
    let any = entries.iter().find(|(n, _)| n == "*");
    named.or(any).is_some_and(|(_, accepted)| *accepted)
}

/// The coding to decode `obj` from for this request, if it must be: a log or listing encoded
/// with xz or bzip2 (Nix's S3 store writes them so with `log-compression`/`ls-compression`,
/// and an upstream may serve them so) that the request does not take as it is
/// ([`takes_as_stored`]): Lix has curl decode what it is sent, and curl fails on those (error
/// 61), so it must get them plain. br, zstd and gzip are passed on as they are, as is a range
/// of an encoded object (no client asks for one: none is offered).
fn to_decode(obj: &Object, kind: Kind, req: &HeaderMap) -> Option<Compression> {
    if !matches!(kind, Kind::Log | Kind::Listing) || obj.range.is_some() {
        return None;
    }
    let stored = obj.encoding.as_deref()?;
    match Compression::from_content_encoding(stored) {
        Ok(Some(c @ (Compression::Xz | Compression::Bzip2))) if !takes_as_stored(req, stored) => {
            Some(c)
        }
        _ => None,
    }
}

/// `obj` decoded here if the request needs it so ([`to_decode`]). With every slot of `slots`
/// taken, it waits for one, up to [`DECODE_WAIT`], then is a 503: the same request never gets
/// the encoded bytes instead (a proxy keys the answer by `Accept-Encoding`, see `Vary`).
pub(super) async fn decoded_for(
    obj: Object,
    kind: Kind,
    req: &HeaderMap,
    slots: &Arc<tokio::sync::Semaphore>,
) -> Result<Object, Error> {
    let Some(compression) = to_decode(&obj, kind, req) else {
        return Ok(obj);
    };
    let slot = match tokio::time::timeout(DECODE_WAIT, slots.clone().acquire_owned()).await {
        Ok(Ok(slot)) => slot,
        // The semaphore is never closed.
        Ok(Err(_)) | Err(_) => {
            return Err(Error::Busy("every decoder of logs and listings is busy"))
        }
    };
    let coding = encoding::Coding {
        compression,
        xz_memory_limit_bytes: SERVED_XZ_MEMORY,
    };
    // The slot is held by the encoded body, which the decoder's thread reads: for as long as
    // that thread runs (a client gone, it stops at its next chunk).
    let encoded = obj.body.map(move |chunk| {
        let _held = &slot;
        chunk
    });
    Ok(Object {
        body: encoding::decode(Some(coding), encoded, u64::MAX),
        length: None,
        range: None,
        encoding: None,
    })
}

/// A streamed 200 or 206 for `obj`, as it is (see [`decoded_for`] for logs and listings).
/// A body that fails once its status is sent (the store's or an upstream's broke off or went
/// quiet, a file shorter than said) is cut off, which hyper does without a word: said here,
/// in the request's span, naming the cause.
pub(super) fn object_response(obj: Object, kind: Kind) -> Response {
    let length = obj.length;
    let span = tracing::Span::current();
    let body = obj.body.inspect_err(move |e| {
        span.in_scope(|| {
            tracing::warn!(cause = %e, "the answer broke off part-way: its client gets it cut short (Nix resumes a NAR, or retries)");
        });
    });
    let mut res = Body::from_stream(body).into_response();
    if let Some(n) = length {
        res.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    if let Some(cr) = obj.range {
        *res.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{}", cr.start, cr.end, cr.total))
        {
            res.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    let encoding = obj
        .encoding
        .as_deref()
        .and_then(|e| HeaderValue::from_str(e).ok());
    set_common_headers(&mut res, kind);
    if let Some(e) = encoding {
        // Stored compressed by Nix's S3 store (`log-compression`, `ls-compression`) or served
        // so by an upstream: the client decodes it. Nix resumes such a download from the
        // start, not with a range, so none is offered.
        let h = res.headers_mut();
        h.insert(header::CONTENT_ENCODING, e);
        h.remove(header::ACCEPT_RANGES);
    }
    if length.is_none() {
        // Streamed by an upstream that did not say its length (chunked): no range of it can
        // be promised, and Nix asks for one only where it was offered.
        res.headers_mut().remove(header::ACCEPT_RANGES);
    }
    res
}

/// A 200 of `body`, made here rather than stored as it is sent (no range of it is offered),
/// or with `head` its headers alone.
pub(super) fn whole_response(body: Bytes, kind: Kind, head: bool) -> Response {
    let mut res = match head {
        true => head_response(body.len() as u64, kind),
        false => {
            let size = body.len() as u64;
            let mut res = Body::from(body).into_response();
            res.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            set_common_headers(&mut res, kind);
            res
        }
    };
    res.headers_mut().remove(header::ACCEPT_RANGES);
    res
}

/// An empty 200 with the headers a GET would have.
pub(super) fn head_response(size: u64, kind: Kind) -> Response {
    let mut res = ().into_response();
    res.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    set_common_headers(&mut res, kind);
    res
}

/// GET of `key`: streamed from `source` with the headers for `kind`.
pub(super) async fn get(
    source: &dyn Store,
    key: &str,
    kind: Kind,
    req_headers: &HeaderMap,
) -> Result<Response, Error> {
    let obj = lookup(kind, source.get(key, range_of(req_headers)).await)?;
    let decoding = to_decode(&obj, kind, req_headers).is_some();
    let mut obj = decoded_for(obj, kind, req_headers, served_decodes()).await?;
    if decoding {
        obj.body = checked_decoding(key, obj.body).await?;
    }
    Ok(object_response(obj, kind))
}

/// `body`, a stored log or listing being decoded for the client, once its first chunk came
/// out: one that does not decode at all (not the coding its `Content-Encoding` says) is a 502
/// naming it, not a 200 cut off at once. One that stops decoding later is cut off (the status
/// is sent), and logged with its key.
async fn checked_decoding(key: &str, mut body: ByteStream) -> Result<ByteStream, Error> {
    let first = match body.next().await {
        // The store's body failing (cut off, idle) is the store's failure, not the object's.
        Some(Err(e))
            if e.get_ref()
                .and_then(|i| i.downcast_ref::<crate::error::UploadError>())
                .is_some_and(|u| {
                    matches!(
                        u,
                        crate::error::UploadError::Body(_)
                            | crate::error::UploadError::IdleTimeout(_)
                    )
                }) =>
        {
            return Err(StoreError::Unavailable(format!("reading {key}: {e}")).into())
        }
        Some(Err(e)) => {
            return Err(StoreError::Other(format!(
                "{key} does not decode as its Content-Encoding says: {e}"
            ))
            .into())
        }
        first => first,
    };
    let key = key.to_owned();
    Ok(futures::stream::iter(first)
        .chain(body)
        .inspect_err(move |e| {
            tracing::warn!(key = %key, cause = %e, "a stored log or listing stopped decoding: its answer is cut off");
        })
        .boxed())
}

/// What a read found, as an answer: a listing, log or realisation that no upstream had while
/// one could not be asked is not found for now (404, kept by no cache), as a narinfo is. These
/// are lookups a client moves on from (`nix log` tries the next substituter); a 503 fails it
/// after retries. A NAR stays a 503: its narinfo said it is there.
fn lookup(kind: Kind, found: Result<Option<Object>, StoreError>) -> Result<Object, Error> {
    match found {
        Ok(Some(obj)) => Ok(obj),
        Ok(None) => Err(Error::NotFound),
        Err(StoreError::UpstreamDown(_)) if !matches!(kind, Kind::Nar) => {
            Err(Error::NotFoundForNow)
        }
        Err(e) => Err(e.into()),
    }
}

/// HEAD of `key` (a listing, log or realisation): the headers of a GET of it, from a GET of
/// it whose body is dropped unread. A store's HEAD says only a size, and these may be stored
/// compressed (`Content-Encoding`, then no ranges) or come from an upstream without a length;
/// nothing asks for them often enough for the GET to cost (Nix sends no HEAD of them).
pub(super) async fn head(
    source: &dyn Store,
    key: &str,
    kind: Kind,
    req_headers: &HeaderMap,
) -> Result<Response, Error> {
    let mut obj = lookup(kind, source.get(key, None).await)?;
    // What a GET would decode goes out without its coding and its length (chunked): said
    // without decoding it, or waiting for a decoder.
    if to_decode(&obj, kind, req_headers).is_some() {
        obj.encoding = None;
        obj.length = None;
    }
    let (parts, _unread) = object_response(obj, kind).into_parts();
    // A GET without a length (decoded here, or streamed so by an upstream) has none said in
    // its HEAD either: an empty body of unknown size, not one axum would say is 0 bytes.
    let body = match parts.headers.contains_key(header::CONTENT_LENGTH) {
        true => Body::empty(),
        false => Body::from_stream(futures::stream::empty::<Result<Bytes, std::io::Error>>()),
    };
    Ok(Response::from_parts(parts, body))
}

/// A PUT's body of at most `limit` bytes as the stream the uploader takes (which counts them
/// as they come): refused before any of it is read, so before `100 Continue` is sent, when its
/// `Content-Length` says it is larger.
pub(super) fn limited_body_stream(
    st: &AppState,
    body: Body,
    limit: u64,
) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static, Error> {
    refuse_declared_over(&body, limit)?;
    Ok(body_stream(st, body))
}

/// Refuses `body` if its `Content-Length` is over `limit`.
fn refuse_declared_over(body: &Body, limit: u64) -> Result<(), Error> {
    if http_body::Body::size_hint(body).lower() > limit {
        return Err(crate::error::UploadError::TooLarge { limit }.into());
    }
    Ok(())
}

/// [`limited_body_stream`], decoded from the request's `Content-Encoding` if it names one
/// (newer Nix compresses narinfos, listings and logs so when asked to): see
/// [`crate::upload::encoding`]. `limit` bounds the bytes as sent and as decoded.
pub(super) fn decoded_body_stream(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static, Error> {
    let coding = coding_of(st, headers)?;
    Ok(encoding::decode(
        coding,
        limited_body_stream(st, body, limit)?,
        limit,
    ))
}

/// [`read_body`], decoded as [`decoded_body_stream`] is.
/// With the room it takes among the bodies being read
/// ([`crate::upload::WHOLE_BODIES_BYTES`]), to be held while the bytes are.
pub(super) async fn read_decoded_body(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<(Bytes, OwnedSemaphorePermit), Error> {
    let coding = coding_of(st, headers)?;
    refuse_declared_over(&body, limit)?;
    let sent = room_for(&body, limit);
    // Room for the body as sent and, encoded, for what it may decode to: at most
    // [`MAX_EXPANSION`] times its declared length (its limit without one), so that a
    // compressed narinfo of a few KiB does not take room for 16 MiB.
    let decoded_limit = match coding {
        None => 0,
        Some(_) => sent.saturating_mul(MAX_EXPANSION).max(64 << 10).min(limit),
    };
    let room = st.uploader.body_room(sent + decoded_limit).await?;
    let raw = read_into_memory(st, body, limit).await?;
    Ok((
        encoding::decode_all(coding, raw, decoded_limit).await?,
        room,
    ))
}

/// How many times its declared length a compressed whole body (a narinfo newer Nix sends
/// with `narinfo-compression`) may decode to: text compresses a few times over; more is a
/// body made to fill memory, refused as too large.
const MAX_EXPANSION: u64 = 64;

/// The memory a whole body read may take: its declared length, else `limit`.
fn room_for(body: &Body, limit: u64) -> u64 {
    http_body::Body::size_hint(body)
        .exact()
        .map_or(limit, |n| n.min(limit))
}

fn coding_of(st: &AppState, headers: &HeaderMap) -> Result<Option<encoding::Coding>, Error> {
    let value = headers.get(header::CONTENT_ENCODING).map(|v| v.as_bytes());
    Ok(st.uploader.coding(value)?)
}

/// A PUT's body as the stream the uploader takes, ended by an error when idle too long.
pub(super) fn body_stream(
    st: &AppState,
    body: Body,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    digest::with_idle_timeout(
        body.into_data_stream().map_err(std::io::Error::other),
        st.config.upload.body_idle_timeout,
    )
}

/// A PUT's whole body, refused past `limit` bytes before more is read, once there is room
/// for it among the bodies being read ([`crate::upload::WHOLE_BODIES_BYTES`]); with that
/// room, to be held while the bytes are.
pub(super) async fn read_body(
    st: &AppState,
    body: Body,
    limit: u64,
) -> Result<(Bytes, OwnedSemaphorePermit), Error> {
    refuse_declared_over(&body, limit)?;
    let room = st.uploader.body_room(room_for(&body, limit)).await?;
    Ok((read_into_memory(st, body, limit).await?, room))
}

/// The time a whole body of `bytes` may take to arrive, at the slowest: a minute, and a
/// second per [`WHOLE_BODY_MIN_RATE`] bytes. The room it holds meanwhile is memory others
/// wait for: a body trickling in (a byte just before each `upload.body_idle_timeout_secs`)
/// would hold it for ever.
fn whole_body_deadline(bytes: u64) -> std::time::Duration {
    std::time::Duration::from_secs(60 + bytes / WHOLE_BODY_MIN_RATE)
}

/// Bytes a second a whole body is read at, at the slowest (a 16 MiB narinfo: 64 s more).
const WHOLE_BODY_MIN_RATE: u64 = 256 << 10;

async fn read_into_memory(st: &AppState, body: Body, limit: u64) -> Result<Bytes, Error> {
    let deadline = whole_body_deadline(room_for(&body, limit));
    let read = async {
        let mut buf = Vec::new();
        let mut s = std::pin::pin!(body_stream(st, body));
        while let Some(chunk) = s.try_next().await.map_err(digest::body_error)? {
            if (buf.len() + chunk.len()) as u64 > limit {
                return Err(crate::error::UploadError::TooLarge { limit }.into());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| crate::error::UploadError::TooSlow {
            secs: deadline.as_secs(),
        })?
}
