//! `/<hash>.narinfo` (parsed, re-signed with the server's keys, rendered) and the other
//! top-level files (`/<hash>.ls`).

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::objects::{self, Kind};
use super::AppState;
use crate::error::Error;
use crate::nix::{NarInfo, StorePathHash, TopLevelFile};
use crate::store::keys;

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
                .get_or_load(h, signed_narinfo(&st, h))
                .await?
                .ok_or(Error::NotFound)?;
            Ok(narinfo_response(&st, body, head))
        }
        TopLevelFile::Listing(h) => {
            objects::serve(&st, keys::listing(h), Kind::Listing, &headers, head).await
        }
    }
}

fn narinfo_response(st: &AppState, body: Bytes, head: bool) -> Response {
    let cc = HeaderValue::from_str(&format!(
        "public, max-age={}",
        st.config.narinfo_max_age_secs
    ))
    .unwrap_or(HeaderValue::from_static("no-cache"));
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

/// Reads the narinfo for `h` from the store, checks it, and renders it signed by every server
/// key. `Ok(None)` if the store has none.
pub(crate) async fn signed_narinfo(
    st: &AppState,
    h: StorePathHash,
) -> Result<Option<Bytes>, Error> {
    let key = keys::narinfo(h);
    let Some(raw) = st.store.get_bytes(&key, MAX_NARINFO_BYTES).await? else {
        return Ok(None);
    };
    let bad = |reason: String| Error::BadObject {
        key: key.clone(),
        reason,
    };
    let text = std::str::from_utf8(&raw).map_err(|_| bad("not UTF-8".into()))?;
    let store_dir = &st.config.store_dir;
    let mut info = NarInfo::parse(text, store_dir).map_err(|e| bad(e.to_string()))?;
    if info.hash() != h {
        return Err(bad(format!(
            "its StorePath {store_dir}/{} does not match its name",
            info.store_path
        )));
    }
    if !st.config.signing.keep_existing_signatures {
        info.sigs.clear();
    }
    for k in &st.keys {
        info.sign(k, store_dir);
    }
    Ok(Some(Bytes::from(info.render(store_dir))))
}
