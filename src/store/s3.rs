//! An S3 bucket (AWS, MinIO, Garage, …) as written by `nix copy --to s3://BUCKET`.

use std::future::Future;
use std::io;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::Client;
use futures::StreamExt as _;

use super::{ByteRange, ContentRange, Object, Store, StoreError};
use crate::config::Config;

pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    timeout: Duration,
}

impl S3Store {
    /// Builds the client. Makes no request: an unreachable store is reported by `/readyz` and
    /// per request, so the server can start before its store does.
    pub async fn new(cfg: &Config) -> Self {
        let s = &cfg.store;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(s.region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(s.connect_timeout_secs))
                    .build(),
            );
        if let (Some(id), Some(secret)) = (&s.access_key_id, &s.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id,
                &secret.0,
                None,
                None,
                "cellar-config",
            ));
        }
        let shared = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(s.force_path_style)
            // Garage and MinIO over plain http mis-verify the streaming checksum trailers.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // The body of a GET is polled only as fast as the HTTP client reads it; a slow
            // client must not make the SDK abort the download as "stalled".
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
        if let Some(ep) = &s.endpoint {
            b = b.endpoint_url(ep);
        }
        let conf = b.build();
        let endpoint = s
            .endpoint
            .clone()
            .or_else(|| shared.endpoint_url().map(str::to_owned))
            .unwrap_or_else(|| format!("aws:{}", s.region));
        Self {
            client: Client::from_conf(conf),
            bucket: s.bucket.clone().unwrap_or_default(),
            prefix: cfg.s3_prefix(),
            endpoint,
            timeout: Duration::from_secs(s.timeout_secs),
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs one S3 call under the request timeout (time to response headers).
    async fn call<T, E>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    ) -> Result<Result<T, Failure>, StoreError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(StoreError::Timeout(self.timeout.as_secs())),
            Ok(Ok(v)) => Ok(Ok(v)),
            Ok(Err(e)) => classify(what, &self.bucket, e),
        }
    }
}

/// A failure the caller may want to handle (missing object, bad range); all others are
/// already `StoreError`s.
#[derive(Debug)]
enum Failure {
    NotFound,
    BadRange,
}

fn classify<T, E>(
    what: &str,
    bucket: &str,
    e: SdkError<E, HttpResponse>,
) -> Result<Result<T, Failure>, StoreError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().map(str::to_owned);
    match (&e, status, code.as_deref()) {
        (SdkError::ServiceError(_), Some(404), Some("NoSuchBucket")) => Err(
            StoreError::Misconfigured(format!("bucket {bucket:?} does not exist")),
        ),
        (SdkError::ServiceError(_), Some(404), _) => Ok(Err(Failure::NotFound)),
        (SdkError::ServiceError(_), Some(416), _) => Ok(Err(Failure::BadRange)),
        (SdkError::ServiceError(_), Some(401 | 403), c) => Err(StoreError::Misconfigured(format!(
            "{what}: access denied ({}); check the credentials and that they may read bucket {bucket:?}",
            c.unwrap_or("403")
        ))),
        (SdkError::TimeoutError(_), _, _) => Err(StoreError::Unavailable(format!("{what}: timeout"))),
        (SdkError::DispatchFailure(d), _, _) => {
            if d.is_timeout() {
                Err(StoreError::Unavailable(format!("{what}: timeout")))
            } else if d.is_io() {
                Err(StoreError::Unavailable(format!(
                    "{what}: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&e)
                )))
            } else {
                // Usually missing credentials or a bad endpoint.
                Err(StoreError::Misconfigured(format!(
                    "{what}: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&e)
                )))
            }
        }
        (SdkError::ConstructionFailure(_), _, _) => Err(StoreError::Misconfigured(format!(
            "{what}: {}",
            aws_smithy_types::error::display::DisplayErrorContext(&e)
        ))),
        (_, Some(s), _) if s >= 500 => Err(StoreError::Unavailable(format!(
            "{what}: store answered {s} {}",
            code.as_deref().unwrap_or("")
        ))),
        _ => Err(StoreError::Other(format!(
            "{what}: {}",
            aws_smithy_types::error::display::DisplayErrorContext(&e)
        ))),
    }
}

/// `bytes 0-99/1234` → `ContentRange`.
fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (s, e) = span.split_once('-')?;
    Some(ContentRange {
        start: s.parse().ok()?,
        end: e.parse().ok()?,
        total: total.parse().ok()?,
    })
}

fn body_stream(body: aws_sdk_s3::primitives::ByteStream) -> super::ByteStream {
    futures::stream::unfold(body, |mut body| async move {
        match body.next().await {
            None => None,
            Some(Ok(b)) => Some((Ok(b), body)),
            Some(Err(e)) => Some((Err(io::Error::other(e)), body)),
        }
    })
    .boxed()
}

#[async_trait]
impl Store for S3Store {
    async fn get(&self, key: &str, range: Option<ByteRange>) -> Result<Option<Object>, StoreError> {
        let full = self.key(key);
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .set_range(range.map(ByteRange::to_header))
            .send();
        let out = match self.call("GetObject", req).await? {
            Ok(o) => o,
            Err(Failure::NotFound) => return Ok(None),
            Err(Failure::BadRange) => {
                let size = self.head(key).await?.unwrap_or(0);
                return Err(StoreError::RangeNotSatisfiable { size });
            }
        };
        let length = out
            .content_length()
            .and_then(|l| u64::try_from(l).ok())
            .ok_or_else(|| StoreError::Other(format!("GetObject {full}: no Content-Length")))?;
        let content_range = match range {
            None => None,
            Some(_) => out.content_range().and_then(parse_content_range),
        };
        Ok(Some(Object {
            body: body_stream(out.body),
            length,
            range: content_range,
        }))
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let req = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .send();
        match self.call("HeadObject", req).await? {
            Ok(o) => Ok(Some(
                o.content_length()
                    .and_then(|l| u64::try_from(l).ok())
                    .unwrap_or(0),
            )),
            Err(_) => Ok(None),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let req = self.client.head_bucket().bucket(&self.bucket).send();
        match self.call("HeadBucket", req).await? {
            Ok(_) => Ok(()),
            Err(_) => Err(StoreError::Misconfigured(format!(
                "bucket {:?} does not exist",
                self.bucket
            ))),
        }
    }

    fn describe(&self) -> String {
        format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_header() {
        assert_eq!(
            parse_content_range("bytes 0-99/1234"),
            Some(ContentRange {
                start: 0,
                end: 99,
                total: 1234
            })
        );
        assert_eq!(parse_content_range("bytes */1234"), None);
    }
}
