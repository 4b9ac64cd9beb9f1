//! Writing one object: a single PutObject for small bodies, a multipart upload in
//! [`PART_SIZE`] parts for large ones, aborted if the writer is dropped before `commit`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};

use super::fast::FastReads;
use super::{classify, result_label, PART_SIZE};
use crate::store::{ObjectWriter, StoreError};

pub(super) struct S3Writer {
    client: Client,
    /// Sends a body that fits one PutObject without the SDK.
    fast: Option<Arc<FastReads>>,
    bucket: String,
    key: String,
    timeout: Duration,
    buf: BytesMut,
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
    done: bool,
}

impl S3Writer {
    pub(super) fn new(
        client: Client,
        fast: Option<Arc<FastReads>>,
        bucket: String,
        key: String,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            fast,
            bucket,
            key,
            timeout,
            buf: BytesMut::new(),
            upload_id: None,
            parts: Vec::new(),
            done: false,
        }
    }

    async fn timed<T, E>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    ) -> Result<T, StoreError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let started = std::time::Instant::now();
        let r = match tokio::time::timeout(self.timeout * 6, fut).await {
            Err(_) => Err(StoreError::Timeout(self.timeout.as_secs() * 6)),
            Ok(Ok(v)) => Ok(Ok(v)),
            Ok(Err(e)) => classify::<T, E>(what, &self.bucket, e),
        };
        let took = started.elapsed();
        crate::metrics::store_request(what, result_label(&r), took);
        tracing::trace!(op = what, key = %self.key, result = result_label(&r), us = took.as_micros() as u64, "S3 request");
        match r? {
            Ok(v) => Ok(v),
            Err(f) => Err(StoreError::Other(format!("{what} {}: {f:?}", self.key))),
        }
    }

    async fn upload_part(&mut self, part: Bytes) -> Result<(), StoreError> {
        let id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let req = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .send();
                let out = self.timed("CreateMultipartUpload", req).await?;
                let id = out
                    .upload_id()
                    .ok_or_else(|| StoreError::Other("CreateMultipartUpload: no upload id".into()))?
                    .to_owned();
                self.upload_id = Some(id.clone());
                id
            }
        };
        let number = i32::try_from(self.parts.len() + 1)
            .map_err(|_| StoreError::Other("too many parts".into()))?;
        let req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&id)
            .part_number(number)
            .body(part.into())
            .send();
        let out = self.timed("UploadPart", req).await?;
        self.parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .build(),
        );
        Ok(())
    }
}

#[async_trait]
impl ObjectWriter for S3Writer {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.buf.extend_from_slice(&chunk);
        while self.buf.len() >= PART_SIZE {
            let part = self.buf.split_to(PART_SIZE).freeze();
            self.upload_part(part).await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        let rest = std::mem::take(&mut self.buf).freeze();
        match (self.upload_id.clone(), self.fast.clone()) {
            (None, Some(fast)) => fast.put(&self.key, rest).await?,
            (None, None) => {
                let req = self
                    .client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .body(rest.into())
                    .send();
                self.timed("PutObject", req).await?;
            }
            (Some(id), _) => {
                if !rest.is_empty() {
                    self.upload_part(rest).await?;
                }
                let req = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .upload_id(&id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(std::mem::take(&mut self.parts)))
                            .build(),
                    )
                    .send();
                self.timed("CompleteMultipartUpload", req).await?;
            }
        }
        self.done = true;
        Ok(())
    }

    async fn abort(mut self: Box<Self>) {
        if let Some(id) = self.upload_id.take() {
            let req = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&id)
                .send();
            match self.timed("AbortMultipartUpload", req).await {
                Ok(_) => tracing::debug!(key = %self.key, "multipart upload aborted"),
                Err(e) => {
                    tracing::warn!(key = %self.key, cause = %e, "could not abort a multipart upload; cleanup will retry")
                }
            }
        }
        self.done = true;
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        // Dropped mid-upload (the client went away): abort in the background. If even that
        // fails, the periodic staging cleanup removes the upload.
        if let (false, Some(id)) = (self.done, self.upload_id.take()) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let req = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .upload_id(id);
                let key = std::mem::take(&mut self.key);
                rt.spawn(async move {
                    match req.send().await {
                        Ok(_) => tracing::debug!(%key, "multipart upload aborted"),
                        Err(e) => {
                            let cause = aws_smithy_types::error::display::DisplayErrorContext(&e);
                            tracing::warn!(%key, %cause, "could not abort a multipart upload; cleanup will retry")
                        }
                    }
                });
            }
        }
    }
}
