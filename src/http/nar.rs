//! `/nar/<file>`: the NARs, named `<filehash>.nar[.<ext>]` (and, read from upstreams, as
//! nix-serve and harmonia name theirs: [`NarFileName`]).
//!
//! - GET answers a small NAR (its narinfo said so) from memory, loading it whole once; any
//!   other NAR streams from the NAR disk cache when one is configured (it fills itself from
//!   the read path), else from the read path (the store, then the upstreams). Small NARs are
//!   loaded through the disk cache too, so they outlive the memory cache. Ranges are honoured:
//!   Nix resumes broken downloads with them.
//! - With `store.redirect_nars`, GET answers a NAR that is in the bucket, larger than what
//!   counts as small and not on cellar's disk with a 302 to a presigned URL: the client
//!   downloads it from the bucket itself.
//! - HEAD says whether the store has the NAR (also re-encoded on upload, under another
//!   extension), else an upstream; this replica's caches answer only while the store cannot:
//!   Nix sends `HEAD nar/<file>` before each upload to the root URL and skips the NAR on a 200,
//!   so a NAR a collection deleted but a cache still holds must be a 404.
//! - PUT is an upload (`nix copy --to`), verified by [`crate::upload`] before it is visible.
//!   Refused before its body is read when `Content-Length` is over `upload.max_nar_bytes`
//!   (413); waits for a slot when `upload.max_concurrent` uploads are running (503 after
//!   [`crate::upload::ADMIT_WAIT`]). A NAR over [`crate::upload::STORED_AGAIN_MAX`] that the
//!   store already holds is answered 200 before its body is asked for (read and dropped when
//!   a proxy took `Expect` for itself); a smaller one is stored again (the same bytes under
//!   the same name).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse as _, Response};

use super::object::{self, Kind};
use super::AppState;
use crate::cache::nar::NarCacheAnswer;
use crate::cache::nar_memory::Unloaded;
use crate::error::{Error, UploadError};
use crate::nix::NarFileName;
use crate::store::{object_key, Object, Store};

/// GET of a NAR. Its error answers say `Accept-Ranges: bytes` too: Nix resumes a NAR
/// download cut off midway (a restart, the store stalling) with a range only while the last
/// answer it got offered ranges, and it forgets the offer at each new answer; a 503 without
/// it, answered to the first resumption, made the next one fail the copy ("Requested range
/// was not delivered by the server") instead of being retried.
pub(super) async fn get(
    State(st): State<AppState>,
    Path(file): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    match get_nar(&st, &file, query.as_deref(), &headers).await {
        Ok(res) => res,
        Err(e) => {
            let mut res = e.into_response();
            res.headers_mut()
                .insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            res
        }
    }
}

async fn get_nar(
    st: &AppState,
    file: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    let f = NarFileName::from_request(file, query)?;
    let asked = tokio::time::Instant::now();
    let res = fetch(st, &f, headers)
        .await
        .map(|res| lifetime(st, &f, res));
    match &res {
        // A use of the paths whose narinfo names it, for `cellar gc`: a client whose own
        // cache holds the narinfo asks for the NAR alone.
        Ok(_) => {
            st.access.record_nar(f.as_str());
            st.live().missing_nars.seen_served(f.as_str()).await;
        }
        // Its narinfo now answers 404 (see crate::cache::missing_nars).
        Err(Error::NotFound) => st.live().missing_nars.seen_missing(f.as_str(), asked).await,
        // Truncated or foreign: as good as missing. Its narinfo answers 404 (clients build
        // the path or ask another cache, rather than fail on this NAR), and so does a
        // builder's probe of it, whose next copy stores the NAR over this one.
        Err(Error::Store(crate::store::StoreError::WrongSize { .. })) if f.names_its_bytes() => {
            st.live().missing_nars.seen_missing(f.as_str(), asked).await;
        }
        Err(_) => {}
    }
    res
}

async fn fetch(st: &AppState, f: &NarFileName, headers: &HeaderMap) -> Result<Response, Error> {
    let key = object_key::nar(f);
    let reads = st.live().reads.clone();
    let range = object::range_of(headers);
    // Small NARs: from memory, or read whole once (their narinfo announced a small size).
    let held = match st.nar_memory.get(f.as_str()).await {
        Some(b) => Some(b),
        None if st.nar_memory.is_small(f.as_str()).await => {
            match st
                .nar_memory
                .load(f.as_str(), &key, open_whole(st, f, &key, &reads, true))
                .await
            {
                Ok(b) => Some(b),
                Err(Unloaded::Large) => None,
                Err(Unloaded::Failed(e)) => return Err(e),
            }
        }
        None => None,
    };
    if let Some(b) = held {
        return Ok(object::object_response(
            Object::from_bytes(b, range)?,
            Kind::Nar,
        ));
    }
    if let Some(to) = redirect(st, f, &key).await {
        return Ok(to);
    }
    let announced = st.nar_memory.announced(f.as_str()).await;
    if let Some(cache) = &st.nars {
        match cache.get(f, &key, range, announced, &reads).await? {
            // A NAR the cache streams without keeping it (too large for it, fills all busy)
            // is held to the narinfo's size as below.
            NarCacheAnswer::Object(obj) => {
                return Ok(object::object_response(
                    resumable(f, obj, range, announced)?,
                    Kind::Nar,
                ))
            }
            NarCacheAnswer::NotFound => return Err(Error::NotFound),
            NarCacheAnswer::Bypass => {}
        }
    }
    let obj = reads.get(&key, range).await?.ok_or(Error::NotFound)?;
    // Kept by no cache, so checked here as it is sent.
    let obj = match st.nar_memory.file_hash(f.as_str()).await {
        Some(said) => crate::cache::checked::checked(f.as_str(), obj, said),
        None => obj,
    };
    Ok(object::object_response(
        resumable(f, obj, range, announced)?,
        Kind::Nar,
    ))
}

/// `obj`, answering `range`, held to the size its narinfo announced: an upstream that streams
/// NARs without a length (nix-serve, harmonia) sends the whole NAR whatever range is asked
/// for, and a NAR it fails to produce half-way may end as cleanly as a whole one. Sent with
/// the narinfo's size as its length (so a body shorter or longer than that fails the transfer,
/// which Nix retries, instead of handing it a short NAR), and ranges offered. A client resuming
/// a download must get the part it asked for (curl fails a resume answered with the whole
/// body): the part is cut from the whole with the narinfo's size as the total.
///
/// A whole NAR named after its bytes whose store gives another length than its narinfo is
/// broken (truncated, foreign): a 502, not a 200 proxies keep for a year. One named after its
/// store path may have been rebuilt, and is served as it is.
fn resumable(
    f: &NarFileName,
    obj: Object,
    range: Option<crate::store::ByteRange>,
    announced: Option<u64>,
) -> Result<Object, Error> {
    if let (Some(total), Some(length), None, None) =
        (announced, obj.length, obj.range, &obj.encoding)
    {
        if length != total && f.names_its_bytes() {
            return Err(crate::store::StoreError::WrongSize {
                key: format!("nar/{f}"),
                got: length,
                expected: total,
            }
            .into());
        }
    }
    let (Some(total), None, None, None) = (announced, obj.length, obj.range, &obj.encoding) else {
        return Ok(obj);
    };
    let Some(r) = range else {
        return Ok(Object {
            body: crate::store::byte_slice_to_end(obj.body, 0, total),
            length: Some(total),
            range: None,
            encoding: None,
        });
    };
    let Some((start, end)) = r.resolve(total) else {
        return Err(crate::store::StoreError::RangeNotSatisfiable { size: total }.into());
    };
    let len = end - start + 1;
    // To the last byte the narinfo gives: a body going on past it is not that NAR.
    let body = if end + 1 == total {
        crate::store::byte_slice_to_end(obj.body, start, len)
    } else {
        crate::store::byte_slice(obj.body, start, len)
    };
    Ok(Object {
        body,
        length: Some(len),
        range: Some(crate::store::ContentRange { start, end, total }),
        encoding: None,
    })
}

/// With `store.redirect_nars`: a NAR that is in the bucket, larger than what counts as small
/// (`cache.nar_memory_max_object_bytes`) and not on cellar's disk is downloaded from the
/// bucket itself, through a presigned URL. Anything else (a small NAR, one on disk, one only
/// an upstream has) is served as usual, and so is every NAR when the store cannot be asked or
/// the URL cannot be made: a redirect only ever saves cellar work.
async fn redirect(st: &AppState, f: &NarFileName, key: &str) -> Option<Response> {
    if !st.store.redirects_nars() || st.nars.as_ref().is_some_and(|c| c.has(f)) {
        return None;
    }
    let size = st
        .store
        .head(key)
        .await
        .inspect_err(
            |e| tracing::debug!(nar = %f, cause = %e, "not redirected: the store did not answer"),
        )
        .ok()
        .flatten()?;
    if size <= st.config.cache.nar_memory_max_object {
        return None;
    }
    // Of another size than its narinfo gives (cut short): served as usual, which answers a
    // logged 502 rather than sending the client to bytes its hash check refuses.
    if f.names_its_bytes()
        && st
            .nar_memory
            .announced(f.as_str())
            .await
            .is_some_and(|n| n != size)
    {
        tracing::debug!(nar = %f, size, "not redirected: not the size its narinfo gives");
        return None;
    }
    let url = st
        .store
        .presigned_get(key)
        .await
        .inspect_err(|e| tracing::warn!(nar = %f, cause = %e, "not redirected: presigning failed"))
        .ok()
        .flatten()?;
    let Ok(location) = axum::http::HeaderValue::from_str(&url) else {
        // Not logged: the URL is a credential.
        tracing::warn!(nar = %f, "not redirected: the presigned URL is not a header value");
        return None;
    };
    tracing::debug!(nar = %f, size, "NAR redirected to the store");
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::FOUND;
    res.headers_mut().insert(header::LOCATION, location);
    // The URL expires: nothing on the way keeps the answer.
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    Some(res)
}

/// The whole NAR for the memory cache: from the disk cache if it holds it (a NAR memory let go
/// before), else from the store. Not written to disk now: memory hands it to the disk cache
/// when it lets it go ([`crate::cache::nar_memory::Spill`]).
/// A client's request (`asked`) counts a disk cache lookup; a prefetch does not.
pub(super) async fn open_whole(
    st: &AppState,
    f: &NarFileName,
    key: &str,
    reads: &Arc<dyn Store>,
    asked: bool,
) -> Result<Option<Object>, Error> {
    if let Some(cache) = &st.nars {
        let announced = st.nar_memory.announced(f.as_str()).await;
        let held = cache.held(f, announced).await?;
        if asked {
            let result = if held.is_some() { "hit" } else { "miss" };
            crate::metrics::cache_lookup("nar_disk", result);
        }
        if let Some(obj) = held {
            return Ok(Some(obj));
        }
    }
    Ok(reads.get(key, None).await?)
}

pub(super) async fn head(
    State(st): State<AppState>,
    Path(file): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut res = head_answer(&st, &file, query.as_deref(), &headers)
        .await
        .into_response();
    // A builder (a write token) is answered otherwise than a reader: a caching proxy in
    // front must not answer one with what it kept for the other.
    if st.live().tokens.any_writer() {
        res.headers_mut()
            .append(header::VARY, HeaderValue::from_static("authorization"));
    }
    res
}

async fn head_answer(
    st: &AppState,
    file: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, Error> {
    let f = NarFileName::from_request(file, query)?;
    // The store first, not the caches: at the root this HEAD comes from `nix copy --to`,
    // which uploads the NAR only on a 404, so it must say whether the store has it. A NAR a
    // collection deleted may still be in this replica's caches; a 200 from them would make
    // the client skip the NAR and its narinfo be refused. The caches answer only while the
    // store cannot.
    let key = object_key::nar(&f);
    // Not for a builder (a write token): it uploads the NAR only on a 404, and its narinfo is
    // accepted only if the NAR is in the store, so an upstream's copy must not count.
    let builder = || {
        matches!(
            st.live().tokens.check(headers, crate::config::Scope::Write),
            crate::auth::Decision::Allowed(Some(_))
        )
    };
    // Nor a copy found bad, so that it sends the NAR again.
    if st.uploader.nar_found_bad(&f) && builder() {
        return Err(Error::NotFound);
    }
    let mut size = match st.store.head(&key).await {
        Ok(Some(size)) => Some(size),
        // Under the name a builder sent it as, a NAR stored re-encoded: found, so that it is
        // not sent again. Not for a reader, whose GET of that name is a 404.
        Ok(None) if builder() => st.uploader.reencoded_size(&f).await?,
        Ok(None) => None,
        Err(e) => match cached_size(st, &f).await {
            Some(size) => Some(size),
            None => return Err(e.into()),
        },
    };
    if size.is_none() {
        if builder() {
            // Its upload (re-encoded) need not ask the store again.
            st.uploader.nar_probed_absent(&f);
        } else {
            // An upstream that cannot be asked is a miss here, where GET would be a 503:
            // `nix copy --to` the root URL sends this HEAD before each NAR, and a 503 would
            // fail the copy where a 404 only makes it upload the NAR.
            size = st.live().upstreams.head(&key).await.unwrap_or(None);
        }
    }
    let res = object::head_response(size.ok_or(Error::NotFound)?, Kind::Nar);
    Ok(lifetime(st, &f, res))
}

/// The size of `f` as the memory or disk cache holds it, if either does.
async fn cached_size(st: &AppState, f: &NarFileName) -> Option<u64> {
    if let Some(size) = st.nar_memory.size_of(f.as_str()).await {
        return Some(size);
    }
    // Not a file its narinfo now gives another size (GET fetches that again).
    let announced = st.nar_memory.announced(f.as_str()).await;
    st.nars
        .as_ref()
        .and_then(|cache| cache.size_of(f))
        .filter(|&held| announced.is_none_or(|a| a == held))
}

/// A NAR named after its store path (attic, old nix-serve) changes when the path is rebuilt:
/// it is kept by clients and proxies as long as a narinfo, not for a year as immutable.
pub(super) fn lifetime(st: &AppState, f: &NarFileName, mut res: Response) -> Response {
    // Not a redirect, whose presigned URL expires (`no-store`).
    if !f.names_its_bytes() && res.status().is_success() {
        res.headers_mut().insert(
            header::CACHE_CONTROL,
            st.live().narinfo_cache_control.clone(),
        );
    }
    res
}

/// How long a NAR upload waits for the store to say whether it holds the NAR already, before
/// the body is taken anyway: less than the second curl waits for `100 Continue`.
const ALREADY_STORED_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// How long after its request a client that sent `Expect: 100-continue` is taken to wait for
/// `100 Continue` before it sends its body anyway (curl: one second).
const CONTINUE_PATIENCE: std::time::Duration = std::time::Duration::from_millis(900);

/// Whether the client waits for `100 Continue` before it sends the body.
fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// Reads a body to its end without keeping it, refusing more than `limit` bytes.
async fn discard<S>(body: S, limit: u64) -> Result<(), Error>
where
    S: futures::Stream<Item = std::io::Result<bytes::Bytes>>,
{
    use futures::TryStreamExt as _;
    let mut body = std::pin::pin!(body);
    let mut n = 0u64;
    while let Some(chunk) = body
        .try_next()
        .await
        .map_err(crate::upload::digest::body_error)?
    {
        n += chunk.len() as u64;
        if n > limit {
            return Err(UploadError::TooLarge { limit }.into());
        }
    }
    Ok(())
}

/// A request body lent to an upload, taken back when the upload fails: whatever of the
/// upload still holds it (its workers) reads no more, and what is left of it is read before
/// the refusal is answered ([`super::drain`], which also leaves a body the upload never asked
/// for unread while the client waits for `100 Continue`).
#[derive(Clone)]
struct Lent(
    Arc<
        std::sync::Mutex<
            Option<futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>>,
        >,
    >,
);

impl Lent {
    fn new<S>(body: S) -> Self
    where
        S: futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
    {
        use futures::StreamExt as _;
        Self(Arc::new(std::sync::Mutex::new(Some(body.boxed()))))
    }

    /// Takes the body back from the upload, which has given up on it.
    fn take_back(&self) {
        drop(crate::sync::lock(&self.0).take());
    }
}

impl futures::Stream for Lent {
    type Item = std::io::Result<bytes::Bytes>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use futures::StreamExt as _;
        let mut lent = crate::sync::lock(&self.0);
        let Some(body) = lent.as_mut() else {
            // Taken back (the upload has failed already), or ended.
            return std::task::Poll::Ready(None);
        };
        let next = body.poll_next_unpin(cx);
        // Ended, or failed (which ends it): let go, never polled again (the body's streams
        // may not be polled past their end).
        if matches!(next, std::task::Poll::Ready(None | Some(Err(_)))) {
            *lent = None;
        }
        next
    }
}

pub(super) async fn put(
    State(st): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, Error> {
    // Uploads are named as Nix names NARs; other servers' names are only read through.
    let name = NarFileName::parse_nix(&file)?;
    crate::upload::check_nar_name(&name)?;
    let limit = st.uploader.max_nar_bytes();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(UploadError::TooLarge { limit }.into());
    }
    let arrived = tokio::time::Instant::now();
    let _slot = st.uploader.admit().await?;
    // A large NAR the store holds already is not stored again: asked before the body is read.
    // A client that sent `Expect: 100-continue` waits for it (curl: one second), so it is
    // answered 200 without it; asking the store is given less than that, after which the body
    // is taken as usual. One whose body comes anyway (a proxy such as nginx answers `Expect`
    // itself) has it read and dropped: an answer over a body left unread would end in a reset
    // connection, which the client or the proxy takes for a failure.
    // A store that cannot say is no reason to fail the upload (Nix 2.8 would retry without
    // its body): the body is taken, as after the wait.
    let stored = match tokio::time::timeout(
        ALREADY_STORED_WAIT,
        st.uploader.already_stored(&name, declared),
    )
    .await
    {
        Ok(Ok(stored)) => stored,
        Ok(Err(e)) => {
            tracing::warn!(nar = %name, cause = %e, "could not ask the store for a NAR being uploaded; taking its body");
            false
        }
        Err(_) => false,
    };
    if stored {
        st.live().missing_nars.seen_present(name.as_str()).await;
        // Not asked for only while the client still waits for `100 Continue`: after a wait
        // for an upload slot, its body is on its way.
        if expects_continue(&headers) && arrived.elapsed() < CONTINUE_PATIENCE {
            tracing::info!(nar = %name, "NAR already stored: its body was not asked for");
        } else {
            discard(object::body_stream(&st, body), limit).await?;
            tracing::info!(nar = %name, "NAR already stored: its body was read and dropped");
        }
        return Ok(StatusCode::OK);
    }
    let lent = Lent::new(object::body_stream(&st, body));
    let d = match st.uploader.put_nar(&name, lent.clone()).await {
        Ok(d) => d,
        Err(e) => {
            lent.take_back();
            return Err(e);
        }
    };
    st.live().missing_nars.seen_present(name.as_str()).await;
    // What this replica held under the name came from an earlier life of the NAR, which
    // may have been a bad copy: the uploaded bytes are the ones to serve.
    st.nar_memory.forget(name.as_str()).await;
    if let Some(cache) = &st.nars {
        cache.forget(name.as_str());
    }
    let Some(d) = d else {
        // Its re-encoded copy was in the store: nothing written.
        return Ok(StatusCode::OK);
    };
    tracing::info!(nar = %name, size = d.input.size, nar_size = d.nar.size, "NAR uploaded");
    Ok(StatusCode::CREATED)
}
