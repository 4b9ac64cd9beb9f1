//! `/<hash>.narinfo`: what a client asks first about every path.
//!
//! - GET and HEAD answer from the narinfo memory cache; on a miss the narinfo is read from the
//!   store, else from an upstream, checked (its `StorePath:` must have the hash it is named
//!   after), re-signed with every server key and rendered once, then kept in memory. HEAD is
//!   the same lookup without the body (`nix copy --from` and `nix path-info` send it first).
//!   Upstream paths marked for mirroring are offered to [`crate::mirror`] on the way.
//! - PUT is the last step of an upload: accepted only if its NAR and references are there
//!   ([`crate::upload`]); it then drops the cached answer, so a cached miss cannot hide it.
//!   A path already published answers 200 and nothing is written, whether the narinfo has
//!   the same NarHash or another (another builder's build of it: the published one is kept).
//!
//! Each request works with one snapshot of the reloadable state ([`super::Live`]).
//!
//! These are called from the `/{file}` route in [`super`], which parses the name and
//! dispatches `.narinfo` and `.ls` names.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::object;
use super::{AppState, Live};
use crate::error::{Error, UploadError};
use crate::nix::{NarFileName, NarInfo, StorePathHash, MAX_NARINFO_BYTES};
use crate::store;

pub(super) async fn get(st: &AppState, h: StorePathHash) -> Result<Response, Error> {
    let live = st.live();
    let body = load(st, &live, h).await?;
    super::prefetch::after_get(st, &body);
    let len = body.len();
    Ok(response(&live, body.into_response(), len))
}

pub(super) async fn head(st: &AppState, h: StorePathHash) -> Result<Response, Error> {
    let live = st.live();
    let len = load(st, &live, h).await?.len();
    Ok(response(&live, ().into_response(), len))
}

pub(super) async fn put(
    st: &AppState,
    h: StorePathHash,
    headers: &HeaderMap,
    body: Body,
) -> Result<StatusCode, Error> {
    // Newer Nix sends it compressed when asked to (`narinfo-compression`).
    let (raw, room) = object::read_decoded_body(st, headers, body, MAX_NARINFO_BYTES).await?;
    // The body is read: the rest runs to its end even if the client goes away (hyper drops
    // the handler then), so that a narinfo written is always checked once more against a
    // collection deleting its NAR, and taken back if need be (see
    // `Uploader::write_while_nar_stays`), never left half-way.
    let st = st.clone();
    // In this request's span: the lines it logs carry the request's id and token name.
    let accepting = async move {
        // Its room among the bodies held is given back with the bytes.
        let _room = room;
        accept(&st, h, &raw).await
    };
    crate::store::spawn_serving(tracing::Instrument::in_current_span(accepting))
        .await
        .unwrap_or_else(|e| {
            Err(UploadError::Internal(format!("the narinfo upload task failed: {e}")).into())
        })
}

async fn accept(st: &AppState, h: StorePathHash, raw: &[u8]) -> Result<StatusCode, Error> {
    let live = st.live();
    let acc = match st.uploader.put_narinfo(h, raw, Some(&live.upstreams)).await {
        Ok(acc) => acc,
        Err(e) => {
            // A refused upload may have taken a narinfo back (its NAR gone): not served from
            // memory afterwards.
            st.live().narinfos.invalidate(h).await;
            return Err(e);
        }
    };
    // Its NAR is there (the upload checked it), under the name the stored narinfo gives, which
    // differs from the uploaded one when uploads are re-encoded: a miss remembered for it
    // must not hide the path. The state now, not the one before the write: a reload may
    // have replaced the narinfo cache meanwhile.
    if let Ok(f) = acc.narinfo.nar_file() {
        st.live().missing_nars.seen_present(f.as_str()).await;
    }
    st.live().narinfos.invalidate(h).await;
    if acc.already_present {
        return Ok(StatusCode::OK);
    }
    tracing::info!(path = %acc.narinfo.store_path, "narinfo uploaded");
    Ok(StatusCode::CREATED)
}

/// The signed narinfo of `h`, from memory or loaded once for all concurrent requests. One in
/// memory that can no longer be served whole is looked up again ([`outdated`]).
async fn load(st: &AppState, live: &Arc<Live>, h: StorePathHash) -> Result<Bytes, Error> {
    let mut body = live
        .narinfos
        .get_or_load(h, || load_from_store(st, live, h))
        .await?
        .ok_or(Error::NotFound)?;
    if outdated(st, live, &body).await {
        // Dropped only if still the one read: many requests reading it at once drop it once,
        // and the reload they share is not started over (nothing was written, so the cache's
        // invalidation count is not moved).
        live.narinfos.forget_if_held(h, &body).await;
        body = live
            .narinfos
            .get_or_load(h, || load_from_store(st, live, h))
            .await?
            .ok_or(Error::NotFound)?;
    }
    // Never hand out a path whose NAR fetch is known to fail (crate::cache::missing_nars);
    // but look for that NAR again once per negative TTL: a path uploaded through another
    // replica since may have brought it back (another path of the same contents, say).
    let missing = st.live().missing_nars.clone();
    if let Some(file) = missing.missing_in(&body) {
        let every = st.config.cache.narinfo_negative_ttl;
        // Back at the size the narinfo says (a NAR found at another one stays hidden).
        let size = std::str::from_utf8(&body)
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("FileSize: ")))
            .and_then(|n| n.parse::<u64>().ok());
        let back = missing.to_look_again(file, every).await
            && matches!(
                live.reads.head(&format!("nar/{file}")).await,
                Ok(Some(n)) if size.is_none_or(|s| s == n)
            );
        if !back {
            return Err(Error::NotFound);
        }
        missing.seen_served(file).await;
    }
    st.access.record_path(h);
    Ok(body)
}

/// Whether the narinfo `body` held in memory names a NAR that cannot be had where it was
/// found, while another source may serve the path: its NAR was found missing since (an
/// upstream that lost it; the next one may have the path), or it came from an upstream that
/// is skipped now after failures, and no copy of the NAR is at hand here (the store, another
/// upstream, or a mirror copy of it may serve the path meanwhile). Such a narinfo is looked
/// up again rather than served until its TTL ends with a NAR that would fail.
///
/// Without upstreams there is no other source: such a narinfo is kept, answered 404 while its
/// NAR is missing (see `load`), and served at once when its NAR is again.
async fn outdated(st: &AppState, live: &Live, body: &[u8]) -> bool {
    if live.upstreams.is_empty() {
        return false;
    }
    if live.missing_nars.points_to_missing(body) {
        return true;
    }
    if !live.upstreams.any_skipped() {
        return false;
    }
    let Some(f) = std::str::from_utf8(body)
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("URL: nar/")))
        .and_then(|file| file.parse::<NarFileName>().ok())
    else {
        return false;
    };
    if !live
        .upstreams
        .routed_to_skipped(&store::object_key::nar(&f))
        .await
    {
        return false;
    }
    let on_disk = st.nars.as_ref().is_some_and(|nars| nars.has(&f));
    !on_disk && !st.nar_memory.contains(f.as_str()).await
}

fn response(live: &Live, mut res: Response, len: usize) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/x-nix-narinfo"),
    );
    h.insert(header::CACHE_CONTROL, live.narinfo_cache_control.clone());
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    res
}

/// What a miss of the narinfo memory cache runs: [`signed_narinfo`], then what the client will
/// ask next is fetched ahead ([`super::prefetch`]).
pub(super) async fn load_from_store(
    st: &AppState,
    live: &Arc<Live>,
    h: StorePathHash,
) -> Result<Option<Bytes>, Error> {
    let Some(info) = signed_narinfo(st, live, h).await? else {
        return Ok(None);
    };
    super::prefetch::after_load(st, live, &info).await;
    // Kept in memory at its own size: the rendering reserves room, which the cache's weigher
    // would not count.
    let text = info.render(&st.config.store_dir).into_boxed_str();
    Ok(Some(Bytes::from(text.into_boxed_bytes())))
}

/// The narinfo for `h` from the store, or else from an upstream, checked and signed by every
/// server key. `Ok(None)` if nobody has it.
async fn signed_narinfo(
    st: &AppState,
    live: &Live,
    h: StorePathHash,
) -> Result<Option<NarInfo>, Error> {
    let store_dir = &st.config.store_dir;
    // A narinfo whose NAR was found missing is not the answer where there is another source
    // (the upstreams) that may have the path whole (see `outdated`); the miss is remembered
    // for the negative TTL.
    let missing = |info: &NarInfo| {
        !live.upstreams.is_empty()
            && info
                .nar_file()
                .is_ok_and(|f| live.missing_nars.is_missing(f.as_str()))
    };
    let stored = store::stored_narinfo(
        &*st.store,
        h,
        &st.config.store_dir,
        Some(st.config.store.timeout),
    )
    .await?
    .filter(|info| !missing(info));
    let mut info = match stored {
        Some(info) => {
            // Its NAR elsewhere than `nar/<file>` (an absolute URL, another folder): not
            // signed and sent on, a corrupt object, as `cellar verify` says.
            if let Err(e) = info.nar_file() {
                return Err(Error::BadObject {
                    key: store::object_key::narinfo(h),
                    reason: e.into(),
                });
            }
            if !live.upstreams.is_empty() {
                // Its NAR is the store's now, whichever upstream named it before.
                if let Ok(f) = info.nar_file() {
                    live.upstreams.unroute(&store::object_key::nar(&f)).await;
                }
            }
            info
        }
        None => match live.upstreams.narinfo_passing_over(h, &missing).await {
            (Some(found), _) => {
                if found.mirror {
                    live.mirror.offer(found.info.clone());
                }
                found.info
            }
            (None, false) => return Ok(None),
            // Not remembered as a miss (errors are not cached): asked again once the upstream
            // is back.
            (None, true) => return Err(Error::NotFoundForNow),
        },
    };
    info.complete_file_size();
    if !live.config.signing.keep_existing_signatures {
        info.sigs.clear();
    }
    for k in &live.signing_keys {
        info.sign(k, store_dir);
    }
    Ok(Some(info))
}
