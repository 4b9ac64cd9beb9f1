//! Listing a bucket: objects (ListObjectsV2, paginated) and unfinished multipart uploads
//! (ListMultipartUploads), for garbage collection, `cellar verify` and staging cleanup.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use futures::{StreamExt as _, TryStreamExt as _};

use super::fast::FastReads;
use super::{classify, result_label, S3Store};
use crate::store::{ObjectInfo, ObjectList, StoreError};

/// A multipart upload that was started and never completed nor aborted.
pub(super) struct StaleUpload {
    /// The full key, bucket prefix included.
    pub key: String,
    pub upload_id: String,
}

impl S3Store {
    /// Multipart uploads of this cache's layout started more than `older_than` ago.
    pub(super) async fn stale_uploads(
        &self,
        older_than: Duration,
    ) -> Result<Vec<StaleUpload>, StoreError> {
        let mut found = Vec::new();
        let mut key_marker = None;
        let mut upload_marker = None;
        let cutoff = std::time::SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(std::time::UNIX_EPOCH);
        loop {
            let req = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_marker.take())
                .send();
            let out = match self.call("ListMultipartUploads", req).await? {
                Ok(o) => o,
                Err(_) => return Ok(found),
            };
            for u in out.uploads() {
                let old = u
                    .initiated()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok())
                    .is_some_and(|t| t <= cutoff);
                // Only uploads of this cache's layout: a shared bucket may hold others'.
                let ours = u
                    .key()
                    .and_then(|k| k.strip_prefix(&self.prefix))
                    .is_some_and(|k| {
                        k.starts_with("nar/")
                            || k.starts_with("log/")
                            || k.starts_with("realisations/")
                            || k.starts_with("build-trace/")
                            || k.starts_with(crate::gc::RESERVED_PREFIX)
                            || k.ends_with(".narinfo")
                            || k.ends_with(".ls")
                    });
                if let (true, true, Some(k), Some(id)) = (old, ours, u.key(), u.upload_id()) {
                    found.push(StaleUpload {
                        key: k.to_owned(),
                        upload_id: id.to_owned(),
                    });
                }
            }
            if out.is_truncated() != Some(true) {
                return Ok(found);
            }
            key_marker = out.next_key_marker().map(str::to_owned);
            upload_marker = out.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && upload_marker.is_none() {
                return Ok(found);
            }
        }
    }

    /// Every object under `prefix`, one ListObjectsV2 page at a time.
    pub(super) fn list_objects(&self, prefix: &str) -> ObjectList {
        match &self.fast {
            Some(fast) => Self::list_direct(fast.clone(), self.prefix.clone(), self.key(prefix)),
            None => self.list_sdk(prefix),
        }
    }

    /// [`Self::list_objects`] without the SDK (see [`super::fast`]).
    fn list_direct(fast: Arc<FastReads>, root: String, full_prefix: String) -> ObjectList {
        struct Pager {
            fast: Arc<FastReads>,
            root: String,
            full_prefix: String,
            token: Option<String>,
            done: bool,
        }
        let pager = Pager {
            fast,
            root,
            full_prefix,
            token: None,
            done: false,
        };
        // As below: the next page is asked for only when this one has been consumed.
        futures::stream::try_unfold(pager, |mut p| async move {
            if p.done {
                return Ok::<_, StoreError>(None);
            }
            let (items, next) = p.fast.list_page(&p.full_prefix, p.token.as_deref()).await?;
            let items: Vec<Result<ObjectInfo, StoreError>> = items
                .into_iter()
                .filter_map(|o| {
                    Some(Ok(ObjectInfo {
                        key: o.key.strip_prefix(&p.root)?.to_owned(),
                        size: o.size,
                        modified: o.modified,
                    }))
                })
                .collect();
            p.done = next.is_none();
            p.token = next;
            Ok(Some((futures::stream::iter(items), p)))
        })
        .try_flatten()
        .boxed()
    }

    /// [`Self::list_objects`] through the SDK.
    fn list_sdk(&self, prefix: &str) -> ObjectList {
        struct Pager {
            client: Client,
            bucket: String,
            root: String,
            full_prefix: String,
            timeout: Duration,
            token: Option<String>,
            done: bool,
        }
        let pager = Pager {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            root: self.prefix.clone(),
            full_prefix: self.key(prefix),
            timeout: self.timeout,
            token: None,
            done: false,
        };
        // One ListObjectsV2 page (up to 1000 keys) per step; the next page is asked for only
        // when the caller has consumed this one.
        futures::stream::try_unfold(pager, |mut p| async move {
            if p.done {
                return Ok(None);
            }
            let req = p
                .client
                .list_objects_v2()
                .bucket(&p.bucket)
                .prefix(&p.full_prefix)
                .set_continuation_token(p.token.take())
                .send();
            let started = std::time::Instant::now();
            let r = match tokio::time::timeout(p.timeout, req).await {
                Err(_) => Err(StoreError::Timeout(p.timeout.as_secs())),
                Ok(Ok(o)) => Ok(Ok(o)),
                Ok(Err(e)) => classify("ListObjectsV2", &p.bucket, e),
            };
            let took = started.elapsed();
            crate::metrics::store_request("ListObjectsV2", result_label(&r), took);
            tracing::trace!(op = "ListObjectsV2", prefix = %p.full_prefix, result = result_label(&r), us = took.as_micros() as u64, "S3 request");
            let out = match r? {
                Ok(o) => o,
                Err(f) => return Err(StoreError::Other(format!("ListObjectsV2: {f:?}"))),
            };
            let items: Vec<Result<ObjectInfo, StoreError>> = out
                .contents()
                .iter()
                .filter_map(|o| {
                    let key = o.key()?.strip_prefix(&p.root)?.to_owned();
                    let modified = o
                        .last_modified()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    Some(Ok(ObjectInfo {
                        key,
                        size: o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                        modified,
                    }))
                })
                .collect();
            p.token = out.next_continuation_token().map(str::to_owned);
            p.done = out.is_truncated() != Some(true) || p.token.is_none();
            Ok(Some((futures::stream::iter(items), p)))
        })
        .try_flatten()
        .boxed()
    }
}
