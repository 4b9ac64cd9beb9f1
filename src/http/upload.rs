//! PUT handlers for what `nix copy --to http://…` sends. Authorization happens in the
//! middleware before any of these run (so a refused PUT never reads its body, and hyper never
//! sends `100 Continue` for it); verification happens in [`crate::upload`].

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use futures::TryStreamExt as _;

use super::AppState;
use crate::error::Error;
use crate::nix::{NarFileName, OutputName, RealisationName, StorePathBaseName, TopLevelFile};
use crate::store::keys;
use crate::upload::UploadError;

const MAX_NARINFO_BYTES: u64 = 16 << 20;
const MAX_LISTING_BYTES: u64 = 256 << 20;
const MAX_LOG_BYTES: u64 = 1 << 30;
const MAX_REALISATION_BYTES: u64 = 1 << 20;

fn stream(
    body: Body,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    body.into_data_stream().map_err(std::io::Error::other)
}

async fn read_text(body: Body, limit: u64) -> Result<String, Error> {
    let mut buf = Vec::new();
    let mut s = std::pin::pin!(stream(body));
    while let Some(chunk) = s
        .try_next()
        .await
        .map_err(|e| UploadError::Body(e.to_string()))?
    {
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(UploadError::Rejected(format!("larger than {limit} bytes")).into());
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|_| UploadError::Rejected("not UTF-8".into()).into())
}

/// Nix PUTs a nix-cache-info when it finds none; ours is generated, so there is nothing to do.
pub(super) async fn put_cache_info() -> StatusCode {
    StatusCode::NO_CONTENT
}

pub(super) async fn put_nar(
    State(st): State<AppState>,
    Path(file): Path<String>,
    body: Body,
) -> Result<StatusCode, Error> {
    let name: NarFileName = file.parse()?;
    let d = st.uploader.put_nar(&name, stream(body)).await?;
    st.missing_nars.seen_present(name.as_str()).await;
    tracing::info!(nar = %name, size = d.input.size, nar_size = d.nar.size, "NAR uploaded");
    Ok(StatusCode::CREATED)
}

pub(super) async fn put_top_level(
    State(st): State<AppState>,
    Path(file): Path<String>,
    body: Body,
) -> Result<StatusCode, Error> {
    match file.parse::<TopLevelFile>().map_err(|_| Error::NotFound)? {
        TopLevelFile::NarInfo(h) => {
            let text = read_text(body, MAX_NARINFO_BYTES).await?;
            let acc = st.uploader.put_narinfo(h, &text).await?;
            st.narinfos.invalidate(h).await;
            tracing::info!(path = %acc.narinfo.store_path, "narinfo uploaded");
            Ok(StatusCode::CREATED)
        }
        TopLevelFile::Listing(h) => {
            st.uploader
                .put_plain(&keys::listing(h), stream(body), MAX_LISTING_BYTES)
                .await?;
            Ok(StatusCode::CREATED)
        }
    }
}

pub(super) async fn put_log(
    State(st): State<AppState>,
    Path(drv): Path<String>,
    body: Body,
) -> Result<StatusCode, Error> {
    let d: StorePathBaseName = drv.parse()?;
    st.uploader
        .put_plain(&keys::log(&d), stream(body), MAX_LOG_BYTES)
        .await?;
    Ok(StatusCode::CREATED)
}

pub(super) async fn put_realisation(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: Body,
) -> Result<StatusCode, Error> {
    let r: RealisationName = id.parse()?;
    st.uploader
        .put_plain(&keys::realisation(&r), stream(body), MAX_REALISATION_BYTES)
        .await?;
    Ok(StatusCode::CREATED)
}

pub(super) async fn put_build_trace(
    State(st): State<AppState>,
    Path((drv, output)): Path<(String, String)>,
    body: Body,
) -> Result<StatusCode, Error> {
    let d: StorePathBaseName = drv.parse()?;
    let o: OutputName = output.parse()?;
    st.uploader
        .put_plain(
            &keys::build_trace(&d, &o),
            stream(body),
            MAX_REALISATION_BYTES,
        )
        .await?;
    Ok(StatusCode::CREATED)
}
