//! `/<hash>.narinfo` (parsed, re-signed with the server's keys, rendered) and the other
//! top-level files (`/<hash>.ls`).

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::objects::{self, Kind};
use super::AppState;
use crate::error::Error;
use crate::nix::{NarFileName, NarInfo, StorePathHash, TopLevelFile};
use crate::store::{keys, StoreError};
use crate::upload::UploadError;

/// Narinfos larger than this are treated as corrupt (a path with 100k references is ~5 MiB).
const MAX_NARINFO_BYTES: u64 = 16 << 20;

pub(super) async fn top_level(
    State(st): State<AppState>,
    method: Method,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let head = method == Method::HEAD;
    // Anything that is not a cache file name is simply not here (favicon.ico, robots.txt, …).
    match file.parse::<TopLevelFile>().map_err(|_| Error::NotFound)? {
        TopLevelFile::NarInfo(h) => {
            let body = st
                .narinfos
                .get_or_load(h, || signed_narinfo(&st, h))
                .await?
                .ok_or(Error::NotFound)?;
            // Never hand out a path whose NAR fetch is known to fail.
            if st.missing_nars.points_to_missing(&body) {
                return Err(Error::NotFound);
            }
            st.access.record_path(h);
            Ok(narinfo_response(&st, body, head))
        }
        TopLevelFile::Listing(h) => {
            objects::serve(&st, keys::listing(h), Kind::Listing, &headers, head).await
        }
    }
}

fn narinfo_response(st: &AppState, body: Bytes, head: bool) -> Response {
    let cc = st.narinfo_cache_control.clone();
    let len = body.len();
    let mut res = if head {
        ().into_response()
    } else {
        body.into_response()
    };
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/x-nix-narinfo"),
    );
    h.insert(header::CACHE_CONTROL, cc);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    res
}

/// The narinfo for `h` from the store, or else from an upstream, checked and rendered signed
/// by every server key. `Ok(None)` if nobody has it.
pub(crate) async fn signed_narinfo(
    st: &AppState,
    h: StorePathHash,
) -> Result<Option<Bytes>, Error> {
    let store_dir = &st.config.store_dir;
    let mut info = match stored_narinfo(st, h).await? {
        Some(info) => info,
        None => match st.upstreams.narinfo(h).await {
            Some(found) => {
                if found.mirror {
                    spawn_mirror(st.clone(), found.info.clone());
                }
                found.info
            }
            None => return Ok(None),
        },
    };
    if !st.config.signing.keep_existing_signatures {
        info.sigs.clear();
    }
    for k in &st.keys {
        info.sign(k, store_dir);
    }
    Ok(Some(Bytes::from(info.render(store_dir))))
}

async fn stored_narinfo(st: &AppState, h: StorePathHash) -> Result<Option<NarInfo>, Error> {
    let key = keys::narinfo(h);
    // Bounded as a whole: a store that stalls mid-body is unavailable, not a hung request.
    let limit = st.config.store.timeout;
    let read = st.store.get_bytes(&key, MAX_NARINFO_BYTES);
    let Some(raw) = tokio::time::timeout(limit, read)
        .await
        .map_err(|_| StoreError::Timeout(limit.as_secs()))??
    else {
        return Ok(None);
    };
    let bad = |reason: String| Error::BadObject {
        key: key.clone(),
        reason,
    };
    let text = std::str::from_utf8(&raw).map_err(|_| bad("not UTF-8".into()))?;
    let store_dir = &st.config.store_dir;
    let info = NarInfo::parse(text, store_dir).map_err(|e| bad(e.to_string()))?;
    if info.hash() != h {
        return Err(bad(format!(
            "its StorePath {store_dir}/{} does not match its name",
            info.store_path
        )));
    }
    Ok(Some(info))
}

/// Copies a path found upstream into the store (NAR, then narinfo, verified like an upload),
/// in the background; the client is not kept waiting.
fn spawn_mirror(st: AppState, info: NarInfo) {
    // A few at a time: reads must not wait behind a crowd of background copies, and anyone
    // can trigger one with a GET. A path not mirrored now is mirrored on a later miss.
    static MIRRORS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);
    let Ok(permit) = MIRRORS.try_acquire() else {
        tracing::debug!(path = %info.store_path, "mirroring busy, skipped");
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let h = info.hash();
        let result = async {
            let name: NarFileName = info
                .url
                .strip_prefix("nar/")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| UploadError::Rejected(format!("URL {:?}", info.url)))?;
            if st.uploader.nar_size(&name).await?.is_none() {
                let obj = st
                    .reads
                    .get(&keys::nar(&name), None)
                    .await?
                    .ok_or_else(|| UploadError::Rejected("the upstream has no NAR".into()))?;
                st.uploader.put_nar(&name, obj.body).await?;
            }
            st.uploader
                .put_narinfo(h, &info.render(&st.config.store_dir))
                .await?;
            Ok::<_, UploadError>(())
        }
        .await;
        match result {
            Ok(()) => tracing::info!(path = %info.store_path, "mirrored from upstream"),
            Err(e) => {
                tracing::warn!(path = %info.store_path, cause = %e, "mirroring from upstream failed")
            }
        }
    });
}
