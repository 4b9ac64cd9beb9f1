//! Listing a bucket: objects (ListObjectsV2, paginated) and unfinished multipart uploads
//! (ListMultipartUploads), for garbage collection, `cellar verify` and staging cleanup.

use std::time::Duration;

use aws_sdk_s3::Client;
use futures::future::BoxFuture;
use futures::{FutureExt as _, StreamExt as _, TryStreamExt as _};

use super::fast::Listed;
use super::{classify, result_label, S3Store};
use crate::store::{ObjectInfo, ObjectList, StoreError};

/// A multipart upload that was started and never completed nor aborted.
pub(super) struct StaleUpload {
    /// The full key, bucket prefix included.
    pub key: String,
    pub upload_id: String,
}

impl S3Store {
    /// Multipart uploads of this cache's layout started more than `older_than` ago, none of
    /// whose parts arrived since: an upload still sending (a large NAR over a slow link, on
    /// this replica or another) is not stale however long ago it began.
    pub(super) async fn stale_uploads(
        &self,
        older_than: Duration,
    ) -> Result<Vec<StaleUpload>, StoreError> {
        let mut stale = Vec::new();
        let mut refused = false;
        for (u, cutoff) in self.uploads_begun_before(older_than).await? {
            match self.last_part_at(&u).await {
                Ok(Some(t)) if t > cutoff => {
                    tracing::debug!(key = %u.key, "a multipart upload begun long ago is still sending parts: kept");
                }
                Ok(_) => stale.push(u),
                // Credentials without `s3:ListMultipartUploadParts`: dated by their start
                // alone, as before that permission was asked for.
                Err(e @ StoreError::Misconfigured(_)) => {
                    if !refused {
                        tracing::warn!(cause = %e, "the store refuses ListParts: unfinished uploads are dated by their start, and one running longer than upload.staging_max_age_secs is aborted (allow s3:ListMultipartUploadParts)");
                    }
                    refused = true;
                    stale.push(u);
                }
                // A store that cannot say now (a timeout, a 5xx, no ListParts at all): that
                // upload is kept for the next cleanup, the others are still judged.
                Err(e) => {
                    tracing::warn!(key = %u.key, cause = %e, "could not list an unfinished upload's parts: kept for now");
                }
            }
        }
        Ok(stale)
    }

    /// When the last part of `u` arrived (the latest `LastModified` of its parts), `None` if
    /// it has none or has gone.
    async fn last_part_at(
        &self,
        u: &StaleUpload,
    ) -> Result<Option<std::time::SystemTime>, StoreError> {
        let mut latest = None;
        let mut marker = None;
        // Every marker asked with: a store that answers one again (at once or in a cycle)
        // would be asked for ever.
        let mut asked = std::collections::HashSet::new();
        loop {
            let req = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(&u.key)
                .upload_id(&u.upload_id)
                .set_part_number_marker(marker.clone());
            let out = match self
                .call("ListParts", &u.key, || req.clone().send())
                .await?
            {
                Ok(o) => o,
                // Completed or aborted meanwhile.
                Err(_) => return Ok(None),
            };
            for p in out.parts() {
                let t = p
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok());
                latest = latest.max(t);
            }
            if out.is_truncated() != Some(true) {
                return Ok(latest);
            }
            let next = out.next_part_number_marker().map(str::to_owned);
            if next.is_none() {
                return Ok(latest);
            }
            if !asked.insert(next.clone()) {
                return Err(StoreError::Other(
                    "ListParts: the store answered the same page again".into(),
                ));
            }
            marker = next;
        }
    }

    /// Multipart uploads of this cache's layout started more than `older_than` ago, each with
    /// the time that is by the store's clock.
    async fn uploads_begun_before(
        &self,
        older_than: Duration,
    ) -> Result<Vec<(StaleUpload, std::time::SystemTime)>, StoreError> {
        let mut found = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut upload_marker: Option<String> = None;
        // Every pair of markers asked with (see `last_part_at`).
        let mut asked = std::collections::HashSet::new();
        loop {
            // No prefix, even with `store.prefix` set: MinIO lists no uploads for a prefix
            // that is not a whole key (minio/minio#20989). Ours are picked below by key.
            let req = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(upload_marker.clone());
            let list = || req.clone().send();
            let out = match self.call("ListMultipartUploads", "", list).await? {
                Ok(o) => o,
                Err(_) => return Ok(found),
            };
            // After the store's answer, which told its time (a process just started, hours
            // ahead of the store, would otherwise take other replicas' uploads for stale).
            let cutoff = self
                .clock
                .now()
                .checked_sub(older_than)
                .unwrap_or(std::time::UNIX_EPOCH);
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
                            || k.starts_with("debuginfo/")
                            || k.starts_with("realisations/")
                            || k.starts_with("build-trace/")
                            || k.starts_with("build-trace-v2/")
                            || k.starts_with(crate::gc::RESERVED_PREFIX)
                            || k.ends_with(".narinfo")
                            || k.ends_with(".ls")
                    });
                if let (true, true, Some(k), Some(id)) = (old, ours, u.key(), u.upload_id()) {
                    let upload = StaleUpload {
                        key: k.to_owned(),
                        upload_id: id.to_owned(),
                    };
                    found.push((upload, cutoff));
                }
            }
            if out.is_truncated() != Some(true) {
                return Ok(found);
            }
            let next = (
                out.next_key_marker().map(str::to_owned),
                out.next_upload_id_marker().map(str::to_owned),
            );
            if next == (None, None) {
                return Ok(found);
            }
            if !asked.insert(next.clone()) {
                return Err(StoreError::Other(
                    "ListMultipartUploads: the store answered the same page again".into(),
                ));
            }
            (key_marker, upload_marker) = next;
        }
    }

    /// Every object under `prefix` (whose key sorts after `after`, if given), one
    /// ListObjectsV2 page at a time.
    pub(super) fn list_objects(&self, prefix: &str, after: Option<&str>) -> ObjectList {
        let full_prefix = self.key(prefix);
        let relative_after = after.map(str::to_owned);
        let after = after.map(|a| self.key(a));
        let listed = match &self.fast {
            Some(fast) => {
                let fast = fast.clone();
                let after = after.clone();
                paged(self.prefix.clone(), move |token| {
                    let (fast, full_prefix) = (fast.clone(), full_prefix.clone());
                    // `StartAfter` on the first page: the token carries it on.
                    let after = after.clone().filter(|_| token.is_none());
                    async move {
                        fast.list_page(&full_prefix, token.as_deref(), after.as_deref())
                            .await
                    }
                    .boxed()
                })
            }
            None => {
                let (client, bucket, timeout) =
                    (self.client.clone(), self.bucket.clone(), self.timeout);
                let after = after.clone();
                paged(self.prefix.clone(), move |token| {
                    let (client, bucket) = (client.clone(), bucket.clone());
                    let full_prefix = full_prefix.clone();
                    let after = after.clone().filter(|_| token.is_none());
                    async move {
                        sdk_page(client, bucket, full_prefix, timeout, token, after).await
                    }
                    .boxed()
                })
            }
        };
        match relative_after {
            None => listed,
            // A store that ignores `StartAfter` lists the rest too.
            Some(after) => listed
                .try_filter(move |o| futures::future::ready(o.key > after))
                .boxed(),
        }
    }
}

/// A listing read one page at a time with `page` (the objects by full key, and the next page's
/// token if there is one), keys made relative to `root`. The next page is asked for only when
/// the caller has consumed this one.
fn paged<F>(root: String, page: F) -> ObjectList
where
    F: Fn(Option<String>) -> BoxFuture<'static, PageResult> + Send + 'static,
{
    struct Pager<F> {
        page: F,
        root: String,
        token: Option<String>,
        done: bool,
    }
    let pager = Pager {
        page,
        root,
        token: None,
        done: false,
    };
    futures::stream::try_unfold(pager, |mut p| async move {
        if p.done {
            return Ok::<_, StoreError>(None);
        }
        let asked = p.token.take();
        let (items, next) = (p.page)(asked.clone()).await?;
        // A store that hands back the token it was given would be listed forever.
        if next.is_some() && next == asked {
            return Err(StoreError::Other(format!(
                "listing {}: the store answered a page with the token it was asked for",
                p.root
            )));
        }
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

/// One listing page: the objects by full key, and the next page's token if there is one.
type PageResult = Result<(Vec<Listed>, Option<String>), StoreError>;

/// One ListObjectsV2 page (up to 1000 keys) through the SDK.
async fn sdk_page(
    client: Client,
    bucket: String,
    full_prefix: String,
    timeout: Duration,
    token: Option<String>,
    start_after: Option<String>,
) -> PageResult {
    let req = client
        .list_objects_v2()
        .bucket(&bucket)
        .prefix(&full_prefix)
        .set_continuation_token(token)
        .set_start_after(start_after);
    let started = std::time::Instant::now();
    let end = tokio::time::Instant::now() + timeout;
    // Polled by the caller's task: made again while it could not connect if that serves an
    // upload (a narinfo's upload lists the collectors' announcements).
    let send = || req.clone().send();
    let tries = super::until_connected(
        "ListObjectsV2",
        &full_prefix,
        end,
        crate::store::for_upload(),
        send,
    );
    let r = match tokio::time::timeout_at(end, tries).await {
        Err(_) => Err(StoreError::Timeout(timeout.as_secs())),
        Ok(Ok(o)) => Ok(Ok(o)),
        Ok(Err(e)) => classify("ListObjectsV2", &bucket, e),
    };
    let took = started.elapsed();
    crate::metrics::store_request("ListObjectsV2", result_label(&r), took);
    tracing::trace!(op = "ListObjectsV2", prefix = %full_prefix, result = result_label(&r), us = took.as_micros() as u64, "S3 request");
    let out = match r? {
        Ok(o) => o,
        Err(f) => return Err(StoreError::Other(format!("ListObjectsV2: {f:?}"))),
    };
    // An entry without its key, size or date is refused, as the direct listing does: an
    // object dated 1970 would look expired to gc's grace and retention.
    let items = out
        .contents()
        .iter()
        .map(|o| {
            let bad = |what: &str| {
                StoreError::Other(format!(
                    "ListObjectsV2: {} without {what}",
                    o.key().unwrap_or("an object")
                ))
            };
            Ok(Listed {
                key: o.key().ok_or_else(|| bad("a Key"))?.to_owned(),
                size: o
                    .size()
                    .and_then(|s| u64::try_from(s).ok())
                    .ok_or_else(|| bad("a Size"))?,
                modified: o
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok())
                    .ok_or_else(|| bad("a LastModified"))?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let truncated = out.is_truncated() == Some(true);
    if truncated && out.next_continuation_token().is_none() {
        // Ending here would pass a part of the listing for the whole (gc would then not see
        // the narinfos that keep their references).
        return Err(StoreError::Other(
            "ListObjectsV2: a truncated page without a NextContinuationToken".into(),
        ));
    }
    let next = out
        .next_continuation_token()
        .filter(|_| truncated)
        .map(str::to_owned);
    Ok((items, next))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use futures::StreamExt as _;

    use super::*;

    fn listed(key: &str) -> Listed {
        Listed {
            key: key.into(),
            size: 1,
            modified: SystemTime::UNIX_EPOCH,
        }
    }

    /// Pages are followed by their tokens to the last; a store answering a page with the
    /// token it was asked for is an error, not a listing without end.
    #[tokio::test]
    async fn pages_are_followed_and_a_repeated_token_ends_the_listing() {
        let pages = paged("p/".into(), |token: Option<String>| {
            async move {
                Ok(match token.as_deref() {
                    None => (vec![listed("p/a")], Some("1".to_owned())),
                    Some("1") => (vec![listed("p/b")], Some("2".to_owned())),
                    _ => (vec![listed("p/c")], None),
                })
            }
            .boxed()
        });
        let keys: Vec<String> = pages.map(|o| o.unwrap().key).collect().await;
        assert_eq!(keys, ["a", "b", "c"]);

        let stuck = paged("p/".into(), |token: Option<String>| {
            async move {
                Ok((
                    vec![listed("p/a")],
                    Some(token.unwrap_or_else(|| "1".to_owned())),
                ))
            }
            .boxed()
        });
        let got: Vec<_> = stuck.take(10).collect().await;
        assert!(
            got.iter().any(Result::is_err),
            "a repeated token was followed"
        );
        assert!(got.len() < 10, "{}", got.len());
    }
}
