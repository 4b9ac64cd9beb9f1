//! An S3 bucket (AWS, MinIO, Garage, …) as written by `nix copy --to s3://BUCKET`.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::error::display_chain;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::Client;
use aws_types::service_config::ServiceConfigKey;
use futures::StreamExt as _;

use super::clock::{ObserveDates, RetrySkewed, StoreClock};
use super::{ByteRange, ContentRange, Object, ObjectList, ObjectWriter, Store, StoreError};
use crate::config::S3StoreConfig;

mod fast;
mod listing;
mod part;
mod writer;

use writer::S3Writer;

/// Bodies up to this size are sent with one PutObject; larger ones as a multipart upload in
/// parts of this size, so an upload holds at most a few parts in memory whatever its size
/// (one being filled, `store.upload_part_concurrency` in flight). S3 allows 10 000 parts,
/// which bounds `upload.max_nar_bytes` ([`crate::config::S3_MAX_OBJECT_BYTES`]).
const PART_SIZE: usize = crate::config::S3_PART_BYTES;

pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
    timeout: Duration,
    /// How long a body being read may go without a byte before it fails (see
    /// [`super::idle_limited`]).
    body_idle: Duration,
    /// Reads, listings and small writes without the SDK, for a path-style endpoint (see
    /// [`fast`]).
    fast: Option<Arc<fast::FastReads>>,
    /// Signs the URLs large NARs are redirected to (`store.redirect_nars`): a client of its
    /// own whose endpoint is the one clients reach; it sends nothing.
    presigner: Option<(Client, Duration)>,
    /// Parts one multipart upload sends at once (`store.upload_part_concurrency`).
    part_concurrency: usize,
    /// Parts all multipart uploads send at once ([`writer::PARTS_IN_FLIGHT`]).
    part_permits: Arc<tokio::sync::Semaphore>,
    /// The store's time, learnt from its answers.
    clock: StoreClock,
}

/// The idle limit of bodies read from the store: three request timeouts, at least 30 s (a
/// store under load may pause between chunks longer than it takes to start an answer).
fn body_idle(timeout: Duration) -> Duration {
    (timeout * 3).max(Duration::from_secs(30))
}

/// The HTTPS client the SDK sends its requests with (and its credential providers theirs):
/// what the SDK's `default-https-client` feature builds (the SDK's connect timeout and sleep,
/// proxies from `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY`), on rustls with ring, the crypto
/// reqwest uses too, instead of a second library (aws-lc) for the same job.
pub fn sdk_http_client() -> aws_sdk_s3::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    use aws_smithy_http_client::{proxy::ProxyConfig, Builder, ConnectorBuilder};
    Builder::new().build_with_connector_fn(|settings, components| {
        let mut conn = ConnectorBuilder::default().tls_provider(Provider::Rustls(CryptoMode::Ring));
        conn.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            conn.set_sleep_impl(components.sleep_impl());
        }
        conn.set_proxy_config(Some(ProxyConfig::from_env()));
        conn.build()
    })
}

impl S3Store {
    /// One HeadBucket, without the SDK's retries.
    /// One listing of at most one key under the prefix, without retries: what a readiness
    /// probe asks. Not a HeadBucket, which a Garage node answers from its own metadata when it
    /// has lost the others (every read then fails while the probe said ready); a listing
    /// needs the cluster, as reads do.
    async fn probe_once(
        &self,
    ) -> Result<
        Result<aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output, Failure>,
        StoreError,
    > {
        let once = aws_sdk_s3::config::Builder::default()
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled());
        let send = || {
            self.client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .max_keys(1)
                .customize()
                .config_override(once.clone())
                .send()
        };
        self.call("ListObjectsV2", &self.prefix, send).await
    }

    /// Builds the client. Makes no request: an unreachable store is reported by `/readyz` and
    /// per request, so the server can start before its store does.
    pub async fn new(s: &S3StoreConfig, timeout: Duration) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(sdk_http_client())
            .region(Region::new(s.region.clone()))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(s.connect_timeout)
                    .build(),
            );
        if let Some(c) = &s.credentials {
            loader = loader.credentials_provider(Credentials::new(
                &c.access_key_id,
                &c.secret_access_key.0,
                None,
                None,
                "cellar-config",
            ));
        }
        let shared = loader.load().await;
        let clock = StoreClock::default();
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(s.force_path_style)
            // Garage and MinIO over plain http mis-verify the streaming checksum trailers.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // The body of a GET is polled only as fast as the HTTP client reads it; a slow
            // client must not make the SDK abort the download as "stalled".
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            // The SDK corrects the time it signs with itself, from the same answers (its
            // own time source is this machine's: given the store's, it would add the offset
            // twice).
            .interceptor(ObserveDates(clock.clone()))
            .retry_classifier(RetrySkewed)
            // The SDK's default retry budget is shared by the process: 500 tokens, 10 a retry
            // after a connection error, regained one per request that succeeds at once. A
            // store restarting while parts are in flight empties it (each part retried again
            // and again while the store cannot be connected to), and every request after that
            // failed at its first error. cellar bounds what it sends itself (parts in flight, uploads),
            // as its direct requests do, which have no budget.
            .retry_partition(
                aws_sdk_s3::config::retry::RetryPartition::custom("cellar-s3")
                    .token_bucket(aws_sdk_s3::config::retry::TokenBucket::unlimited())
                    .build(),
            );
        if let Some(ep) = &s.endpoint {
            b = b.endpoint_url(ep);
        }
        let presigner = s.redirect.as_ref().map(|r| {
            let mut p = b.clone();
            if let Some(ep) = &r.public_endpoint {
                p = p.endpoint_url(ep);
            }
            (Client::from_conf(p.build()), r.ttl)
        });
        let conf = b.build();
        let from_env = endpoint_from_env(&shared);
        let endpoint = s
            .endpoint
            .clone()
            .or_else(|| from_env.clone())
            .unwrap_or_else(|| format!("aws:{}", s.region));
        let fast = match (
            direct_endpoint(s, from_env.as_deref()),
            shared.credentials_provider(),
        ) {
            (Some(ep), Some(creds)) => {
                match fast::FastReads::new(
                    ep,
                    &s.bucket,
                    &s.region,
                    creds,
                    s.connect_timeout,
                    timeout,
                    clock.clone(),
                ) {
                    Ok(f) => Some(Arc::new(f)),
                    Err(e) => {
                        tracing::warn!(cause = %e, "S3: reads go through the SDK");
                        None
                    }
                }
            }
            _ => None,
        };
        Self {
            client: Client::from_conf(conf),
            bucket: s.bucket.clone(),
            prefix: s.prefix.clone(),
            endpoint,
            timeout,
            body_idle: body_idle(timeout),
            fast,
            presigner,
            part_concurrency: s.upload_part_concurrency,
            part_permits: Arc::new(tokio::sync::Semaphore::new(writer::PARTS_IN_FLIGHT)),
            clock,
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs the S3 call `send` makes for `key` under the request timeout (time to response
    /// headers); made again while it could not connect if it is made for an upload
    /// ([`crate::store::for_upload`]).
    async fn call<T, E, F>(
        &self,
        what: &'static str,
        key: &str,
        send: impl FnMut() -> F,
    ) -> Result<Result<T, Failure>, StoreError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
    {
        let started = std::time::Instant::now();
        let end = tokio::time::Instant::now() + self.timeout;
        let tries = until_connected(what, key, end, crate::store::for_upload(), send);
        let r = match tokio::time::timeout_at(end, tries).await {
            Err(_) => Err(StoreError::Timeout(self.timeout.as_secs())),
            Ok(Ok(v)) => Ok(Ok(v)),
            Ok(Err(e)) => classify(what, &self.bucket, e),
        };
        crate::metrics::store_request(what, result_label(&r), started.elapsed());
        r
    }
}

/// Tries of a request that could not connect, made for a write or an upload
/// ([`crate::store::for_upload`]): the request never reached the store (restarting, say), so
/// sending it again is safe. The store restarting for a second failed a write within the
/// retries' first milliseconds, and Nix 2.8 retries a 5xx to a PUT without its body (each
/// retry then waits for the body idle timeout and is refused: `nix copy --to` failed after
/// four minutes). A client's GET that fails, Nix retries itself.
pub(super) const CONNECT_ATTEMPTS: u32 = 5;

/// The wait after the `attempt`th try of a write that could not connect: 0.25 s, doubling,
/// 3.75 s over [`CONNECT_ATTEMPTS`].
pub(super) fn connect_wait(attempt: u32) -> Duration {
    Duration::from_millis(250 << attempt.saturating_sub(1).min(4))
}

/// Whether the SDK's request failed because it could not connect (refused, no address, the
/// connect timeout): after the SDK's own three tries (1.5 s on average, 3 s at most), of
/// which the last never reached the store.
fn could_not_connect<E>(e: &SdkError<E, HttpResponse>) -> bool {
    let SdkError::DispatchFailure(d) = e else {
        return false;
    };
    let Some(c) = d.as_connector_error() else {
        return false;
    };
    // A connect timeout is the SDK's own error, not hyper's: the SDK sets no other timeout
    // on its connector (cellar bounds each request itself).
    c.is_timeout()
        || std::iter::successors(Some(c as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
        .any(|e| {
            e.downcast_ref::<hyper_util::client::legacy::Error>()
                .is_some_and(hyper_util::client::legacy::Error::is_connect)
        })
}

/// The SDK request `send` makes, made again up to [`CONNECT_ATTEMPTS`] times
/// [`connect_wait`] apart while it could not connect and `patient`, as long as `end` allows.
async fn until_connected<T, E, F>(
    what: &'static str,
    key: &str,
    end: tokio::time::Instant,
    patient: bool,
    mut send: impl FnMut() -> F,
) -> Result<T, SdkError<E, HttpResponse>>
where
    F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
{
    let mut attempt = 1;
    loop {
        let r = send().await;
        let wait = connect_wait(attempt);
        match r {
            Err(e)
                if patient
                    && could_not_connect(&e)
                    && attempt < CONNECT_ATTEMPTS
                    && tokio::time::Instant::now() + wait < end =>
            {
                tracing::debug!(
                    key,
                    attempt,
                    "S3 {what}: could not connect to the store; trying again"
                );
                attempt += 1;
                tokio::time::sleep(wait).await;
            }
            r => return r,
        }
    }
}

/// The endpoint the AWS environment gives S3, as the SDK reads it: `AWS_ENDPOINT_URL_S3`,
/// else `AWS_ENDPOINT_URL`, else the profile's (its `services` section, then `endpoint_url`).
fn endpoint_from_env(shared: &aws_config::SdkConfig) -> Option<String> {
    let key = ServiceConfigKey::builder()
        .service_id("S3")
        .env("AWS_ENDPOINT_URL")
        .profile("endpoint_url")
        .build()
        .ok()?;
    shared
        .service_config()
        .and_then(|c| c.load_config(key))
        .or_else(|| shared.endpoint_url().map(str::to_owned))
}

/// Where cellar sends the requests it signs itself (`store.direct_requests`): the configured
/// endpoint, else the one the AWS environment gives S3 ([`endpoint_from_env`]); none for AWS itself or virtual-hosted addressing.
fn direct_endpoint<'a>(s: &'a S3StoreConfig, from_env: Option<&'a str>) -> Option<&'a str> {
    if !(s.force_path_style && s.direct_requests) {
        return None;
    }
    s.endpoint.as_deref().or(from_env)
}

/// The `result` label of one S3 call in the metrics.
fn result_label<T>(r: &Result<Result<T, Failure>, StoreError>) -> &'static str {
    match r {
        Ok(Ok(_)) => "ok",
        Ok(Err(Failure::NotFound)) => "not_found",
        Ok(Err(Failure::BadRange)) => "bad_range",
        Err(StoreError::Timeout(_)) => "timeout",
        Err(_) => "error",
    }
}

/// A failure the caller may want to handle (missing object, bad range); all others are
/// already `StoreError`s.
#[derive(Debug)]
enum Failure {
    NotFound,
    BadRange,
}

/// A 401 or 403 from the store: its refusal of the credentials, or, with
/// `InvalidObjectState`, of one object (AWS's answer for an object a lifecycle rule moved to
/// an archive storage class: the credentials are fine, that object cannot be read as it is).
fn refused(what: &str, bucket: &str, code: &str) -> StoreError {
    if code == "InvalidObjectState" {
        return StoreError::Other(format!(
            "{what}: the object is archived (InvalidObjectState); restore it, and keep the \
             cache's objects out of the bucket's transition rules"
        ));
    }
    let code = if code.is_empty() { "403" } else { code };
    StoreError::Misconfigured(format!(
        "{what}: access denied ({code}); check the credentials and that they may read bucket {bucket:?}"
    ))
}

/// Error codes S3 stores answer with for a failure of their own, whatever the status: asking
/// again later may work. `InternalError` and `SlowDown` also come in the body of a 200 to a
/// CompleteMultipartUpload; `RequestTimeout` is a 400 for a request body that arrived too
/// slowly.
const TRANSIENT_CODES: [&str; 5] = [
    "InternalError",
    "SlowDown",
    "ServiceUnavailable",
    "RequestTimeout",
    "OperationAborted",
];

/// Error codes for a request sent to the wrong region or endpoint for the bucket.
const WRONG_REGION_CODES: [&str; 3] = [
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
];

/// What an error answer of the store (other than a missing object or a refusal) means, on the
/// SDK's path and the direct one alike: the store failing (a 5xx, a 429, a code saying so) is
/// [`StoreError::Unavailable`], a bucket in another region a misconfiguration to name, and
/// anything else a broken answer.
fn answered(what: &str, status: u16, code: &str) -> StoreError {
    if status >= 500 || status == 429 || TRANSIENT_CODES.contains(&code) {
        StoreError::Unavailable(format!("{what}: store answered {status} {code}"))
    } else if status == 301 || WRONG_REGION_CODES.contains(&code) {
        StoreError::Misconfigured(format!(
            "{what}: store answered {status} {code}: the bucket is in another region or at \
             another endpoint; check store.region and store.endpoint"
        ))
    } else if status == 400 && code.is_empty() && matches!(what, "HeadObject" | "HeadBucket") {
        // A HEAD's answer has no body to say why; S3 and Garage (and MinIO with a region set)
        // answer a HEAD signed for another region than theirs so (a GET gets
        // `AuthorizationHeaderMalformed`). Another request's 400 without a code (a proxy's
        // page) stays a broken answer.
        StoreError::Misconfigured(format!(
            "{what}: store answered 400 without a reason (the answer to a HEAD has none): most \
             often a request signed for another region than the store's; check store.region \
             (or whether session credentials expired)"
        ))
    } else {
        StoreError::Other(format!("{what}: store answered {status} {code}"))
    }
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
        (SdkError::ServiceError(_), Some(401 | 403), c) => {
            Err(refused(what, bucket, c.unwrap_or("")))
        }
        (SdkError::TimeoutError(_), _, _) => {
            Err(StoreError::Unavailable(format!("{what}: timeout")))
        }
        (SdkError::DispatchFailure(d), _, _) => {
            if d.is_timeout() {
                Err(StoreError::Unavailable(format!("{what}: timeout")))
            } else if d.is_io()
                || matches!(
                    d.as_other(),
                    Some(
                        aws_smithy_types::retry::ErrorKind::TransientError
                            | aws_smithy_types::retry::ErrorKind::ServerError
                            | aws_smithy_types::retry::ErrorKind::ThrottlingError
                    )
                )
            {
                // A connection the store closed mid-response (hyper's IncompleteMessage) comes
                // as a transient "other" error: the store is failing, not misconfigured.
                Err(StoreError::Unavailable(format!(
                    "{what}: {}",
                    aws_smithy_types::error::display::DisplayErrorContext(&e)
                )))
            } else {
                // Usually missing credentials or a bad endpoint.
                let context = aws_smithy_types::error::display::DisplayErrorContext(&e).to_string();
                // No provider of the SDK's chain had any (a provider that has some and fails,
                // an expired token say, is said as it is). The chain's account of each place
                // it looked is kilobytes: for the debug log.
                if context.contains("CredentialsNotLoaded") {
                    tracing::debug!(cause = %context, "{what}: no credentials");
                    return Err(StoreError::Misconfigured(format!(
                        "{what}: no S3 credentials found; set store.access_key_id and \
                         store.secret_access_key, or AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or give the machine a role)"
                    )));
                }
                tracing::debug!(cause = %context, "{what}: misconfigured");
                Err(StoreError::Misconfigured(format!(
                    "{what}: {}",
                    display_chain(&e)
                )))
            }
        }
        (SdkError::ConstructionFailure(_), _, _) => {
            let context = aws_smithy_types::error::display::DisplayErrorContext(&e);
            tracing::debug!(cause = %context, "{what}: misconfigured");
            Err(StoreError::Misconfigured(format!(
                "{what}: {}",
                display_chain(&e)
            )))
        }
        (SdkError::ServiceError(_), Some(s), c) => Err(answered(what, s, c.unwrap_or(""))),
        (_, Some(s), _) if s >= 500 || s == 429 => Err(StoreError::Unavailable(format!(
            "{what}: store answered {s} {}",
            code.as_deref().unwrap_or("")
        ))),
        _ => Err(StoreError::Other(format!(
            "{what}: {}",
            aws_smithy_types::error::display::DisplayErrorContext(&e)
        ))),
    }
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
        if range == Some(ByteRange::Suffix(0)) {
            // No byte of any object: answered from the object's size, not sent to S3, which
            // may ignore such a range and send the whole object (HTTP allows it), a 200 where
            // a part is asked for.
            return match self.head(key).await? {
                Some(size) => Err(StoreError::RangeNotSatisfiable { size }),
                None => Ok(None),
            };
        }
        let full = self.key(key);
        if let Some(fast) = &self.fast {
            return match fast.get(&full, range).await? {
                fast::Read::Found(o) => Ok(Some(Object {
                    body: super::idle_limited(o.body, self.body_idle, full),
                    ..o
                })),
                fast::Read::NotFound => Ok(None),
                fast::Read::BadRange => {
                    let size = self.head(key).await?.unwrap_or(0);
                    Err(StoreError::RangeNotSatisfiable { size })
                }
            };
        }
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .set_range(range.map(ByteRange::to_header));
        let out = match self.call("GetObject", &full, || req.clone().send()).await? {
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
        let told = out.content_range();
        let content_range = match range {
            None => None,
            // The SDK does not say whether this is a 200 or a 206. An answer of no byte is a
            // 200 (a 206 holds at least one): the store sent the whole, empty object, as AWS
            // does for a range an empty object cannot meet, and it is taken as such, as on the
            // direct path.
            Some(_) if told.is_none() && length == 0 => None,
            // MinIO's answer to a range of an empty object (`bytes 0--1/0`).
            Some(_) if told.is_some_and(|t| t.trim_end().ends_with("/0")) => {
                return Err(StoreError::RangeNotSatisfiable { size: 0 });
            }
            // Never serve part of an object as if it were a whole one.
            Some(_) => Some(told.and_then(ContentRange::parse_header).ok_or_else(|| {
                StoreError::Other(format!(
                    "GetObject {full}: ranged answer without a valid Content-Range"
                ))
            })?),
        };
        let encoding = super::content_encoding(out.content_encoding());
        Ok(Some(Object {
            body: super::idle_limited(body_stream(out.body), self.body_idle, full),
            length: Some(length),
            range: content_range,
            encoding,
        }))
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        if let Some(fast) = &self.fast {
            return fast.head(&self.key(key)).await;
        }
        let full = self.key(key);
        let req = self.client.head_object().bucket(&self.bucket).key(&full);
        match self
            .call("HeadObject", &full, || req.clone().send())
            .await?
        {
            // Without its length the answer says nothing of the object's size (see FastReads).
            Ok(o) => o
                .content_length()
                .and_then(|l| u64::try_from(l).ok())
                .map(Some)
                .ok_or_else(|| StoreError::Other(format!("HEAD {key}: no Content-Length"))),
            Err(_) => Ok(None),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // One attempt: a readiness probe wants the store's state now, not after the SDK's
        // retries with back-off (a refused connection would otherwise take seconds to report).
        // Its time refused, one more, with the store's time the refusal told.
        let offset = self.clock.offset_ms();
        let answer = match self.probe_once().await {
            Err(_) if self.clock.moved_since(offset) => self.probe_once().await,
            answer => answer,
        };
        match answer? {
            Ok(_) => Ok(()),
            Err(_) => Err(StoreError::Misconfigured(format!(
                "bucket {:?} does not exist",
                self.bucket
            ))),
        }
    }

    async fn writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>, StoreError> {
        Ok(Box::new(S3Writer::new(
            self.client.clone(),
            self.fast.clone(),
            self.bucket.clone(),
            self.key(key),
            self.timeout,
            self.part_concurrency,
            Arc::clone(&self.part_permits),
            self.clock.clone(),
        )))
    }

    /// Every S3 store of the process at once: the multipart uploads are kept in one table
    /// ([`writer::abort_unfinished`]).
    async fn remove_unfinished(&self) -> usize {
        writer::abort_unfinished().await
    }

    async fn cleanup_staging(&self, older_than: Duration) -> Result<usize, StoreError> {
        let mut n = 0;
        for u in self.stale_uploads(older_than).await? {
            let req = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&u.key)
                .upload_id(&u.upload_id);
            let abort = || req.clone().send();
            if let Ok(Ok(_)) = self.call("AbortMultipartUpload", &u.key, abort).await {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn stale_staging(&self, older_than: Duration) -> Result<Vec<String>, StoreError> {
        Ok(self
            .stale_uploads(older_than)
            .await?
            .into_iter()
            .map(|u| format!("multipart upload of {} ({})", u.key, u.upload_id))
            .collect())
    }

    fn list(&self, prefix: &str) -> ObjectList {
        self.list_objects(prefix, None)
    }

    fn list_after(&self, prefix: &str, after: &str) -> ObjectList {
        self.list_objects(prefix, Some(after))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.key(key);
        let req = self.client.delete_object().bucket(&self.bucket).key(&full);
        match self
            .call("DeleteObject", &full, || req.clone().send())
            .await?
        {
            // S3 answers 204 for a missing key too; some servers answer 404.
            Ok(_) | Err(Failure::NotFound) => Ok(()),
            Err(Failure::BadRange) => Err(StoreError::Other(format!("DeleteObject {key}: 416"))),
        }
    }

    fn describe(&self) -> String {
        format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
    }

    fn now(&self) -> std::time::SystemTime {
        self.clock.now()
    }

    fn redirects_nars(&self) -> bool {
        self.presigner.is_some()
    }

    async fn presigned_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let Some((client, ttl)) = &self.presigner else {
            return Ok(None);
        };
        // Signed from the store's time: the presigning client sends nothing, so the SDK
        // never learns the store's clock for it.
        let config = PresigningConfig::builder()
            .start_time(self.clock.now())
            .expires_in(*ttl)
            .build()
            .map_err(|e| StoreError::Misconfigured(format!("store.redirect_ttl_secs: {e}")))?;
        let signed = client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(key))
            .presigned(config)
            .await
            .map_err(|e| {
                let e = aws_smithy_types::error::display::DisplayErrorContext(&e);
                StoreError::Other(format!("presigning a GET of {key}: {e}"))
            })?;
        Ok(Some(signed.uri().to_owned()))
    }
}

#[cfg(test)]
mod tests;
