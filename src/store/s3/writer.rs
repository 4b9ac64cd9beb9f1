//! Writing one object: a single PutObject for small bodies, a multipart upload in
//! [`PART_SIZE`] parts for large ones, aborted if the writer is dropped before `commit`.
//!
//! A multipart upload sends up to `store.upload_part_concurrency` parts at once, so the
//! client's body keeps arriving while earlier parts travel to S3: over a distant S3 the
//! parts' round trips overlap instead of adding up. Parts in flight are bounded per upload
//! and process-wide ([`PARTS_IN_FLIGHT`]), and so is the memory they hold.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::fast::FastReads;
use super::part::PartBuf;
use super::{classify, result_label, until_connected, Failure, PART_SIZE};
use crate::store::clock::StoreClock;
use crate::store::{ObjectWriter, StoreError};

/// Parts being sent at once by all the multipart uploads of one process: at most this many
/// times [`PART_SIZE`] of memory (128 MiB), whatever the number of uploads.
pub(super) const PARTS_IN_FLIGHT: usize = 16;

/// The slowest uplink to S3 at which writes are still waited for: a part of 8 MiB alone on
/// it gets 256 s on top of six request timeouts. A home server pushing to a distant S3 over a
/// slow uplink shares it between the parts in flight (`store.upload_part_concurrency` per
/// upload, [`PARTS_IN_FLIGHT`] in all), so a part is given its body's time at this pace times
/// the parts in flight when it starts ([`write_deadline_sharing`]).
const SLOWEST_WRITE_BYTES_PER_SEC: u64 = 32 * 1024;

/// How long a request carrying `bytes` of body to S3 may take: six request timeouts (the
/// store answers writes more slowly than reads), plus the body's time at the slowest pace
/// waited for. A stuck connection is still given up, after minutes, not held forever.
pub(super) fn write_deadline(timeout: Duration, bytes: usize) -> Duration {
    write_deadline_sharing(timeout, bytes, 1)
}

/// [`write_deadline`] for a body sent while `sharing` requests (itself included) share the
/// uplink: at the slowest pace waited for, each gets its share of it.
pub(super) fn write_deadline_sharing(timeout: Duration, bytes: usize, sharing: usize) -> Duration {
    let sharing = u64::try_from(sharing.max(1)).unwrap_or(u64::MAX);
    let body_ms =
        (bytes as u64).saturating_mul(1000).saturating_mul(sharing) / SLOWEST_WRITE_BYTES_PER_SEC;
    timeout * 6 + Duration::from_millis(body_ms)
}

/// How long completing a multipart upload of `parts` parts may take: S3 assembles the object
/// before it answers, which for a large one takes minutes (AWS documents it), so a second per
/// part on top of a write's six request timeouts. Given up too early, the upload is aborted
/// while S3 may still be finishing it.
pub(super) fn complete_deadline(timeout: Duration, parts: usize) -> Duration {
    write_deadline(timeout, 0) + Duration::from_secs(u64::try_from(parts).unwrap_or(u64::MAX))
}

/// How much earlier than the store's time when a multipart upload began its object may be
/// dated and still be that upload's (S3 dates it when the upload began, to the second; the
/// store's time is known to within [`crate::store::clock::SLACK`]).
const DATED_WITHIN: Duration = Duration::from_secs(5);

/// The object as a HEAD shows it.
struct Shape<'a> {
    length: Option<i64>,
    etag: Option<&'a str>,
    modified: Option<SystemTime>,
}

/// Whether an object of `shape` is what a multipart upload of `parts` parts and `bytes` bytes,
/// begun at `began` by the store's clock, leaves (see [`S3Writer::completed`]).
fn is_upload_of(shape: &Shape<'_>, bytes: u64, parts: usize, began: SystemTime) -> bool {
    let etag = shape.etag.unwrap_or_default().trim_matches('"');
    let not_before = began.checked_sub(DATED_WITHIN).unwrap_or(began);
    shape.length.and_then(|l| u64::try_from(l).ok()) == Some(bytes)
        && etag.ends_with(&format!("-{parts}"))
        && shape.modified.is_some_and(|m| m >= not_before)
}

/// The object a writer writes, shared with the tasks sending its parts.
struct Target {
    client: Client,
    bucket: String,
    key: String,
    timeout: Duration,
}

impl Target {
    /// The request `send` makes, carrying `bytes` of body, within its [`write_deadline`].
    async fn timed<T, E, F>(
        &self,
        what: &'static str,
        bytes: usize,
        send: impl FnMut() -> F,
    ) -> Result<T, StoreError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    {
        self.timed_within(what, write_deadline(self.timeout, bytes), send)
            .await
    }

    /// The request `send` makes, within `deadline`.
    async fn timed_within<T, E, F>(
        &self,
        what: &'static str,
        deadline: Duration,
        send: impl FnMut() -> F,
    ) -> Result<T, StoreError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    {
        match self.answer_within(what, deadline, send).await? {
            Ok(v) => Ok(v),
            Err(f) => Err(StoreError::Other(format!("{what} {}: {f:?}", self.key))),
        }
    }

    /// The request `send` makes, within `deadline`, a missing object (or upload) told apart
    /// from other failures; made again while the store cannot be connected to
    /// ([`until_connected`]): a store restarting for longer than the SDK's own tries failed a
    /// large NAR's part, and so its upload.
    async fn answer_within<T, E, F>(
        &self,
        what: &'static str,
        deadline: Duration,
        send: impl FnMut() -> F,
    ) -> Result<Result<T, Failure>, StoreError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    {
        self.answer_trying(what, deadline, true, send).await
    }

    /// [`Self::answer_within`], made again while it could not connect only if `patient`.
    async fn answer_trying<T, E, F>(
        &self,
        what: &'static str,
        deadline: Duration,
        patient: bool,
        send: impl FnMut() -> F,
    ) -> Result<Result<T, Failure>, StoreError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    {
        let started = std::time::Instant::now();
        let end = tokio::time::Instant::now() + deadline;
        let tries = until_connected(what, &self.key, end, patient, send);
        let r = match tokio::time::timeout_at(end, tries).await {
            Err(_) => Err(StoreError::Timeout(deadline.as_secs())),
            Ok(Ok(v)) => Ok(Ok(v)),
            Ok(Err(e)) => classify::<T, E>(what, &self.bucket, e),
        };
        let took = started.elapsed();
        crate::metrics::store_request(what, result_label(&r), took);
        tracing::trace!(op = what, key = %self.key, result = result_label(&r), us = took.as_micros() as u64, "S3 request");
        r
    }

    /// Aborts the multipart upload `id`; a failure is logged (the periodic staging cleanup
    /// removes the upload later).
    async fn abort(&self, id: &str) {
        // Whatever the answer: one that failed is the staging cleanup's.
        ended(id);
        let req = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(id);
        let deadline = write_deadline(self.timeout, 0);
        match self
            // Not waited for while the store cannot be connected to: the upload's failure is
            // answered after it, and an upload left is the staging cleanup's.
            .answer_trying("AbortMultipartUpload", deadline, false, || {
                req.clone().send()
            })
            .await
        {
            Ok(Ok(_)) => tracing::debug!(key = %self.key, "multipart upload aborted"),
            // Gone already: completed by a try whose answer was lost, or ended by the store
            // (Garage ends every other upload of a key when one completes).
            Ok(Err(Failure::NotFound)) => {
                tracing::debug!(key = %self.key, "multipart upload gone already")
            }
            Ok(Err(f)) => {
                tracing::warn!(key = %self.key, cause = ?f, "could not abort a multipart upload; cleanup will retry")
            }
            Err(e) => {
                tracing::warn!(key = %self.key, cause = %e, "could not abort a multipart upload; cleanup will retry")
            }
        }
    }

    async fn upload_part(
        &self,
        id: &str,
        number: i32,
        part: Bytes,
        sharing: usize,
    ) -> Result<CompletedPart, StoreError> {
        let bytes = part.len();
        let send = || {
            self.client
                .upload_part()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(id)
                .part_number(number)
                .body(part.clone().into())
                .send()
        };
        let deadline = write_deadline_sharing(self.timeout, bytes, sharing);
        let out = self.timed_within("UploadPart", deadline, send).await?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .build())
    }
}

/// Multipart uploads begun by this process and not yet completed or aborted, by upload id:
/// what a shutdown that cuts uploads off aborts before the process exits
/// ([`abort_unfinished`]). A writer dropped aborts its upload in a task of the runtime, which
/// ends with the process; these would otherwise stay in the bucket until the staging
/// cleanup of a later start.
static UNFINISHED: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Arc<Target>>>,
> = std::sync::LazyLock::new(Default::default);

fn begun(id: &str, target: &Arc<Target>) {
    crate::sync::lock(&UNFINISHED).insert(id.to_owned(), Arc::clone(target));
}

fn ended(id: &str) {
    crate::sync::lock(&UNFINISHED).remove(id);
}

/// Aborts the multipart uploads this process began and did not end (those of requests a
/// shutdown cut off), all at once, each within the store's timeout. How many there were.
pub async fn abort_unfinished() -> usize {
    let open: Vec<(String, Arc<Target>)> = crate::sync::lock(&UNFINISHED).drain().collect();
    let n = open.len();
    futures::future::join_all(
        open.into_iter()
            .map(|(id, t)| async move { t.abort(&id).await }),
    )
    .await;
    n
}

pub(super) struct S3Writer {
    target: Arc<Target>,
    /// Sends a body that fits one PutObject without the SDK.
    fast: Option<Arc<FastReads>>,
    /// The part being filled.
    buf: PartBuf,
    upload_id: Option<String>,
    /// The CreateMultipartUpload under way, if the writer was dropped while it was: its id
    /// is then learnt by the task, which aborts the upload.
    creating: Option<tokio::task::JoinHandle<Result<String, StoreError>>>,
    /// Parts sent so far (their numbers are 1..=sent).
    sent: i32,
    /// The bytes of those parts.
    sent_bytes: u64,
    /// Parts on their way to S3.
    in_flight: JoinSet<Result<CompletedPart, StoreError>>,
    /// At most this many in `in_flight`.
    concurrency: usize,
    /// The process-wide bound on parts in flight.
    permits: Arc<Semaphore>,
    parts: Vec<CompletedPart>,
    done: bool,
    /// The store's time.
    clock: StoreClock,
    /// When the multipart upload began, by the store's clock.
    began: Option<SystemTime>,
}

impl S3Writer {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        client: Client,
        fast: Option<Arc<FastReads>>,
        bucket: String,
        key: String,
        timeout: Duration,
        concurrency: usize,
        permits: Arc<Semaphore>,
        clock: StoreClock,
    ) -> Self {
        Self {
            target: Arc::new(Target {
                client,
                bucket,
                key,
                timeout,
            }),
            fast,
            buf: PartBuf::default(),
            upload_id: None,
            creating: None,
            sent: 0,
            sent_bytes: 0,
            in_flight: JoinSet::new(),
            concurrency: concurrency.max(1),
            permits,
            parts: Vec::new(),
            done: false,
            clock,
            began: None,
        }
    }

    async fn upload_id(&mut self) -> Result<String, StoreError> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        // In a task of its own: a writer dropped while the store creates the upload (the
        // client went away) would otherwise never learn its id, and leave it to the periodic
        // staging cleanup, hours later.
        let t = Arc::clone(&self.target);
        // One creation at a time: a call cut off while waiting leaves it to the next.
        let creating = self.creating.get_or_insert_with(|| {
            tokio::spawn(async move {
                let req = t
                    .client
                    .create_multipart_upload()
                    .bucket(&t.bucket)
                    .key(&t.key);
                let out = t
                    .timed("CreateMultipartUpload", 0, || req.clone().send())
                    .await?;
                let id = out.upload_id().map(str::to_owned).ok_or_else(|| {
                    StoreError::Other("CreateMultipartUpload: no upload id".into())
                })?;
                begun(&id, &t);
                Ok(id)
            })
        });
        let created = creating.await;
        self.creating = None;
        let id = created.map_err(|e| {
            StoreError::Other(format!("CreateMultipartUpload: the task ended: {e}"))
        })??;
        self.upload_id = Some(id.clone());
        // Its answer told the store's time.
        self.began = Some(self.clock.now());
        tracing::debug!(key = %self.target.key, "multipart upload begun");
        Ok(id)
    }

    /// Sends the next part in the background, once fewer than `concurrency` of this
    /// writer's parts (and fewer than [`PARTS_IN_FLIGHT`] of the process's) are in flight.
    async fn send_part(&mut self, part: Bytes) -> Result<(), StoreError> {
        let id = self.upload_id().await?;
        while self.in_flight.len() >= self.concurrency {
            self.finish_one().await?;
        }
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Other("the part semaphore is closed".into()))?;
        self.sent = self
            .sent
            .checked_add(1)
            .ok_or_else(|| StoreError::Other("too many parts".into()))?;
        let number = self.sent;
        self.sent_bytes += part.len() as u64;
        // The parts of every upload in flight now, this one included, share the uplink.
        let sharing = PARTS_IN_FLIGHT.saturating_sub(self.permits.available_permits());
        let target = Arc::clone(&self.target);
        self.in_flight.spawn(async move {
            let _permit = permit;
            target.upload_part(&id, number, part, sharing).await
        });
        Ok(())
    }

    /// Waits for one part in flight to be stored; its failure is this upload's.
    async fn finish_one(&mut self) -> Result<(), StoreError> {
        match self.in_flight.join_next().await {
            None => Ok(()),
            Some(Ok(Ok(part))) => {
                self.parts.push(part);
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(StoreError::Other(format!(
                "UploadPart {}: the task sending it ended: {e}",
                self.target.key
            ))),
        }
    }
}

impl S3Writer {
    /// Sends the last part, waits for every part, and completes the upload.
    async fn complete(&mut self, id: &str, rest: Bytes) -> Result<(), StoreError> {
        if !rest.is_empty() {
            self.send_part(rest).await?;
        }
        while !self.in_flight.is_empty() {
            self.finish_one().await?;
        }
        let mut parts = std::mem::take(&mut self.parts);
        parts.sort_by_key(|p| p.part_number());
        let count = parts.len();
        let deadline = complete_deadline(self.target.timeout, count);
        let t = &self.target;
        let req = t
            .client
            .complete_multipart_upload()
            .bucket(&t.bucket)
            .key(&t.key)
            .upload_id(id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        let answer = t
            .answer_within("CompleteMultipartUpload", deadline, || req.clone().send())
            .await?;
        ended(id);
        match answer {
            Ok(_) => Ok(()),
            // No such upload: a try whose answer was lost (the SDK retries a connection
            // closed before the answer, a timeout, a 5xx) may have completed it. The object
            // then stands, and sending the body again would be for nothing.
            Err(Failure::NotFound) if self.completed(count).await => {
                tracing::warn!(key = %t.key, "CompleteMultipartUpload: the upload was completed by a try whose answer was lost");
                Ok(())
            }
            Err(f) => Err(StoreError::Other(format!(
                "CompleteMultipartUpload {}: {f:?}",
                t.key
            ))),
        }
    }

    /// Whether the object stands as the upload of `parts` parts would have left it: its
    /// length is the bytes sent, its ETag that of a multipart upload of `parts` parts (S3,
    /// Garage and MinIO end it with `-<parts>`; how the rest is computed differs). A NAR is
    /// named by its content's hash, so an object of that key and shape holds these bytes; a
    /// build log is named by its derivation, so it could be an earlier log of the very same
    /// length, which then stands for this one.
    async fn completed(&self, parts: usize) -> bool {
        let t = &self.target;
        let req = t.client.head_object().bucket(&t.bucket).key(&t.key);
        match t.timed("HeadObject", 0, || req.clone().send()).await {
            Ok(o) => {
                let shape = Shape {
                    length: o.content_length(),
                    etag: o.e_tag(),
                    modified: o
                        .last_modified()
                        .and_then(|t| SystemTime::try_from(*t).ok()),
                };
                let began = self.began.unwrap_or_else(|| self.clock.now());
                is_upload_of(&shape, self.sent_bytes, parts, began)
            }
            Err(_) => false,
        }
    }

    /// Stops the parts in flight (so none lands after the abort), then aborts the upload.
    async fn abort_upload(&mut self) {
        self.in_flight.shutdown().await;
        if let Some(id) = self.upload_id.take() {
            // In a task of its own: a writer dropped while it waits (its request gone) does
            // not leave the upload, whose id it no longer holds, behind.
            let t = Arc::clone(&self.target);
            let _ = tokio::spawn(async move { t.abort(&id).await }).await;
        }
        self.done = true;
    }
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        let mut chunk = &chunk[..];
        while !chunk.is_empty() {
            let n = chunk.len().min(PART_SIZE - self.buf.len());
            // Each part in a buffer of its own, given back once sent (see `part`).
            self.buf
                .extend(&chunk[..n])
                .map_err(|e| StoreError::Other(format!("no memory for an upload part: {e}")))?;
            chunk = &chunk[n..];
            if self.buf.len() == PART_SIZE {
                let part = std::mem::take(&mut self.buf).freeze();
                self.send_part(part).await?;
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let rest = std::mem::take(&mut self.buf).freeze();
        match (self.upload_id.clone(), self.fast.clone()) {
            (None, Some(fast)) => fast.put(&self.target.key, rest).await?,
            (None, None) => {
                let t = &self.target;
                let bytes = rest.len();
                let send = || {
                    t.client
                        .put_object()
                        .bucket(&t.bucket)
                        .key(&t.key)
                        .body(rest.clone().into())
                        .send()
                };
                t.timed("PutObject", bytes, send).await?;
            }
            (Some(id), _) => {
                if let Err(e) = self.complete(&id, rest).await {
                    // Not left to the drop: the upload is gone when the error is returned.
                    self.abort_upload().await;
                    return Err(e);
                }
            }
        }
        self.done = true;
        Ok(())
    }

    async fn abort(mut self: Box<Self>) {
        self.abort_upload().await;
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        // Dropped mid-upload (the client went away): abort in the background, after the parts
        // in flight are stopped. If even that fails, the periodic staging cleanup removes the
        // upload.
        if let Some(creating) = self.creating.take() {
            // Dropped while the upload was being created: aborted once it is.
            let t = Arc::clone(&self.target);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Ok(Ok(id)) = creating.await {
                        t.abort(&id).await;
                    }
                });
            }
        }
        if let (false, Some(id)) = (self.done, self.upload_id.take()) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let mut in_flight = std::mem::take(&mut self.in_flight);
                let t = Arc::clone(&self.target);
                rt.spawn(async move {
                    in_flight.shutdown().await;
                    t.abort(&id).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{is_upload_of, Shape};
    use std::time::{Duration, SystemTime};

    #[test]
    fn an_upload_is_known_by_its_length_part_count_and_date() {
        let began = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
        let etag = "\"3944a9f7a4faab7f78788ff6210f63f0-3\"";
        let shape = |length, etag, modified| Shape {
            length,
            etag,
            modified,
        };
        let up = |s: Shape<'_>| is_upload_of(&s, 30, 3, began);
        // Dated when the upload began (to the second, by a clock known to 2 s), or later.
        for at in [
            began - Duration::from_secs(5),
            began,
            began + Duration::from_secs(60),
        ] {
            assert!(up(shape(Some(30), Some(etag), Some(at))), "{at:?}");
        }
        // Another length, another number of parts, a single PUT's ETag, or none at all.
        assert!(!up(shape(Some(31), Some(etag), Some(began))));
        assert!(!up(shape(None, Some(etag), Some(began))));
        assert!(!is_upload_of(
            &shape(Some(30), Some(etag), Some(began)),
            30,
            4,
            began
        ));
        let thirteen = "\"3944a9f7a4faab7f78788ff6210f63f0-13\"";
        assert!(!up(shape(Some(30), Some(thirteen), Some(began))));
        let single = "\"3944a9f7a4faab7f78788ff6210f63f0\"";
        assert!(!up(shape(Some(30), Some(single), Some(began))));
        assert!(!up(shape(Some(30), None, Some(began))));
        // An object from before the upload (the same key, written earlier), or undated.
        assert!(!up(shape(
            Some(30),
            Some(etag),
            Some(began - Duration::from_secs(6))
        )));
        assert!(!up(shape(Some(30), Some(etag), None)));
    }
}
