//! GetObject, HeadObject, ListObjectsV2 and single-request PutObject without the SDK's
//! request pipeline: one SigV4-signed request over a pooled HTTP client. On a cold cache
//! every narinfo and small NAR is one such read, and an upload writes a few small objects and
//! reads the collectors' announcements (a listing) per path; the SDK's per-request work
//! (interceptors, endpoint resolution, retry bookkeeping) cost more than the request itself
//! against a nearby store (under an upload's load: a PutObject 1.7-2.2 ms through the SDK
//! against 1.0-1.2 ms here, a listing 3.4 against 2.4 ms). Multipart uploads, deletes and
//! the rest stay with the SDK.
//!
//! Path-style addressing only (`{endpoint}/{bucket}/{key}`), as MinIO and Garage are used;
//! a virtual-hosted bucket keeps using the SDK for everything.

use std::time::{Duration, SystemTime};

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::{Credentials, ProvideCredentials as _, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use aws_smithy_types::date_time::{DateTime, Format};
use aws_smithy_xml::decode::{try_data, Document, XmlDecodeError};
use bytes::Bytes;
use futures::TryStreamExt as _;
use reqwest::header::{HeaderMap, CONTENT_LENGTH, CONTENT_RANGE};
use reqwest::StatusCode;
use sha2::{Digest as _, Sha256};
use std::sync::atomic::Ordering;
use tokio::sync::Mutex;

use super::{connect_wait, CONNECT_ATTEMPTS};
use crate::store::clock::StoreClock;
use crate::store::{ByteRange, ContentRange, Object, StoreError};

/// SHA-256 of the empty body: what a GET or HEAD signs as its payload.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Credentials are fetched again this long before they expire (as the SDK's cache does, with
/// room for clocks that disagree a little). Until then, and while fetching new ones fails,
/// the ones held are used.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// Credentials this close to their expiry are not signed with: a request signed now may reach
/// the store after they expired.
const STILL_VALID_FOR: Duration = Duration::from_secs(10);

/// Credentials that say nothing of their expiry (a `credential_process` may leave it out) are
/// fetched again after this long, as the SDK's cache does: keys rotated behind them reach
/// cellar's own requests as soon as the SDK's. Until new ones come, they are still used.
const UNDATED_REFRESH: Duration = Duration::from_secs(15 * 60);

pub(super) struct FastReads {
    http: reqwest::Client,
    /// `{endpoint}/{bucket}/`, to which an encoded key is appended.
    base: String,
    region: String,
    bucket: String,
    credentials: SharedCredentialsProvider,
    /// The credentials held, and when they were fetched (by the store's clock).
    cached: std::sync::Mutex<Option<(Credentials, SystemTime)>>,
    /// Held by the one request that fetches new credentials.
    refreshing: Mutex<()>,
    /// Set while renewals fail: the failure is logged once, and the recovery.
    renewal_failing: std::sync::atomic::AtomicBool,
    timeout: Duration,
    /// The store's time, which requests are signed with; each answer's `Date` sets it.
    clock: StoreClock,
}

/// A request before it is signed: it is signed again for each try, with the store's time
/// then (an answer may just have shown that this machine's clock is off).
struct Unsigned {
    method: reqwest::Method,
    url: String,
    /// Sent and signed.
    headers: Vec<(&'static str, String)>,
    /// The body's SHA-256 (hex).
    payload_sha256: String,
    body: Option<Bytes>,
}

/// What a credentials provider's failure is to cellar: one that did not answer in time (an STS
/// or metadata service down) makes the store unavailable for now; the others are
/// misconfiguration (no credentials, a bad profile, and the provider's own errors, which
/// include STS refusing the role as well as STS failing).
fn credentials_failure(e: &CredentialsError) -> StoreError {
    let text = format!(
        "S3 credentials: {}",
        aws_smithy_types::error::display::DisplayErrorContext(e)
    );
    match e {
        CredentialsError::ProviderTimedOut(_) => StoreError::Unavailable(text),
        _ => StoreError::Misconfigured(text),
    }
}

/// What a read found: the object (or the response it comes from), no object, or a range
/// past its end.
pub(super) enum Read<T> {
    Found(T),
    NotFound,
    BadRange,
}

impl FastReads {
    pub(super) fn new(
        endpoint: &str,
        bucket: &str,
        region: &str,
        credentials: SharedCredentialsProvider,
        connect_timeout: Duration,
        timeout: Duration,
        clock: StoreClock,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            // As the SDK's client (`sdk_http_client`): proxies from the environment
            // (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`, reqwest's default), no redirect
            // followed (a signed request sent elsewhere fails anyway; S3's region redirects
            // carry no Location).
            .redirect(reqwest::redirect::Policy::none())
            // Over TLS a server may offer HTTP/2, and then every request shares one
            // connection and its flow-control window: a few NAR bodies read slowly (a slow
            // client, a slow disk cache) would stall every other read, narinfos included.
            .http1_only()
            .build()?;
        Ok(Self {
            http,
            base: format!("{}/{}/", endpoint.trim_end_matches('/'), encode(bucket)),
            region: region.to_owned(),
            bucket: bucket.to_owned(),
            credentials,
            cached: std::sync::Mutex::new(None),
            refreshing: Mutex::new(()),
            renewal_failing: std::sync::atomic::AtomicBool::new(false),
            timeout,
            clock,
        })
    }

    /// The credentials held, if they are not due for renewal at `now`: they expire after
    /// [`REFRESH_BEFORE`] from now, or, undated, were fetched within [`UNDATED_REFRESH`].
    fn fresh(&self, now: SystemTime) -> Option<Credentials> {
        self.held(|c, fetched| match c.expiry() {
            Some(e) => e > now + REFRESH_BEFORE,
            None => now < fetched + UNDATED_REFRESH,
        })
    }

    /// The credentials held, if they may still be signed with at `now`: they expire after
    /// [`STILL_VALID_FOR`] from now, or are undated.
    fn usable(&self, now: SystemTime) -> Option<Credentials> {
        self.held(|c, _| c.expiry().is_none_or(|e| e > now + STILL_VALID_FOR))
    }

    fn held(&self, keep: impl Fn(&Credentials, SystemTime) -> bool) -> Option<Credentials> {
        let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached
            .as_ref()
            .filter(|(c, fetched)| keep(c, *fetched))
            .map(|(c, _)| c.clone())
    }

    /// Credentials for the next request. Held ones are used until [`REFRESH_BEFORE`] their
    /// expiry; then one request fetches new ones (within the request timeout) while the others
    /// go on with the held ones, which are also used if the fetch fails, until
    /// [`STILL_VALID_FOR`] before they expire.
    async fn credentials(&self) -> Result<Credentials, StoreError> {
        // Expiry times are the issuer's (STS, IMDS): judged by the store's clock, which this
        // machine's may be minutes off (see `StoreClock`), as requests are signed with it.
        let now = self.clock.now();
        if let Some(c) = self.fresh(now) {
            return Ok(c);
        }
        let usable = self.usable(now);
        let _refreshing = match (&usable, self.refreshing.try_lock()) {
            (_, Ok(guard)) => guard,
            // Another request is fetching: these still do meanwhile.
            (Some(c), Err(_)) => return Ok(c.clone()),
            (None, Err(_)) => {
                let guard = tokio::time::timeout(self.timeout, self.refreshing.lock())
                    .await
                    .map_err(|_| StoreError::Timeout(self.timeout.as_secs()))?;
                // The request that held the lock may have fetched them (perhaps ones that
                // last less than REFRESH_BEFORE: signed with, not fetched again at once).
                if let Some(c) = self.usable(self.clock.now()) {
                    return Ok(c);
                }
                guard
            }
        };
        let fetched =
            tokio::time::timeout(self.timeout, self.credentials.provide_credentials()).await;
        let failure = match fetched {
            Ok(Ok(c)) => {
                *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((c.clone(), now));
                if self.renewal_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("S3 credentials renewed");
                }
                return Ok(c);
            }
            Ok(Err(e)) => credentials_failure(&e),
            Err(_) => StoreError::Timeout(self.timeout.as_secs()),
        };
        match usable {
            Some(c) => {
                // Once per streak of failures, not per request.
                if !self.renewal_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!("S3 credentials could not be renewed ({failure}); using the current ones until they expire");
                }
                Ok(c)
            }
            None => Err(failure),
        }
    }

    /// A request without a body for `key` (the full object key, prefix included).
    fn request(&self, method: reqwest::Method, key: &str, range: Option<ByteRange>) -> Unsigned {
        Unsigned {
            method,
            url: format!("{}{}", self.base, encode_key(key)),
            headers: range
                .map(|r| ("range", r.to_header()))
                .into_iter()
                .collect(),
            payload_sha256: EMPTY_SHA256.to_owned(),
            body: None,
        }
    }

    /// `u` signed with SigV4 with `creds` at the store's time now, and the offset of the
    /// store's clock that time was taken with.
    fn signed(
        &self,
        u: &Unsigned,
        creds: &Credentials,
    ) -> Result<(reqwest::RequestBuilder, i64), StoreError> {
        // Signed as it is sent: reqwest normalises what it parses (a host in lower case, an
        // IPv6 address shortened), and a signature over the other spelling does not match.
        let url = reqwest::Url::parse(&u.url)
            .map_err(|e| StoreError::Misconfigured(format!("S3 request URL {}: {e}", u.url)))?;
        let offset = self.clock.offset_ms();
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let identity = creds.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("s3")
            .time(self.clock.at(offset))
            .settings(settings)
            .build()
            .map_err(|e| StoreError::Misconfigured(format!("signing an S3 request: {e}")))?
            .into();
        // The signer adds x-amz-date and x-amz-content-sha256 itself.
        let signable = SignableRequest::new(
            u.method.as_str(),
            url.as_str(),
            u.headers.iter().map(|(n, v)| (*n, v.as_str())),
            SignableBody::Precomputed(u.payload_sha256.clone()),
        )
        .map_err(|e| StoreError::Other(format!("signing {url}: {e}")))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| StoreError::Other(format!("signing {url}: {e}")))?
            .into_parts();
        let mut req = self.http.request(u.method.clone(), url);
        for (name, value) in &u.headers {
            req = req.header(*name, value);
        }
        for (name, value) in instructions.headers() {
            req = req.header(name, value);
        }
        if let Some(body) = &u.body {
            // Said outright: over HTTP/1 an empty body would go without it, which AWS S3
            // refuses (411 MissingContentLength): an empty build log.
            req = req.header(CONTENT_LENGTH, body.len()).body(body.clone());
        }
        Ok((req, offset))
    }

    /// Sends `u` under the request timeout (time to response headers) and counts it.
    async fn send(
        &self,
        what: &'static str,
        key: &str,
        u: Unsigned,
    ) -> Result<Read<reqwest::Response>, StoreError> {
        self.send_within(self.timeout, what, key, u).await
    }

    /// [`Self::send`] with `limit` instead of the request timeout: a write sends its whole
    /// body before the answer starts.
    async fn send_within(
        &self,
        limit: Duration,
        what: &'static str,
        key: &str,
        u: Unsigned,
    ) -> Result<Read<reqwest::Response>, StoreError> {
        let started = std::time::Instant::now();
        // Before the limit, as the wait for a renewal is bounded on its own (and its failure
        // is a credentials error, not a timeout of this request).
        let creds = self.credentials().await?;
        let deadline = tokio::time::Instant::now() + limit;
        let r = match tokio::time::timeout(limit, self.attempts(what, &u, &creds, deadline)).await {
            Err(_) => Err(StoreError::Timeout(limit.as_secs())),
            Ok(r) => r,
        };
        let label = match &r {
            Ok(Read::Found(_)) => "ok",
            Ok(Read::NotFound) => "not_found",
            Ok(Read::BadRange) => "bad_range",
            Err(StoreError::Timeout(_)) => "timeout",
            Err(_) => "error",
        };
        let took = started.elapsed();
        crate::metrics::store_request(what, label, took);
        tracing::trace!(
            op = what,
            key,
            result = label,
            us = took.as_micros() as u64,
            "S3 request"
        );
        r
    }

    /// Up to [`ATTEMPTS`] tries, as the SDK makes: again after a connection failure, a 5xx
    /// or a 429, after a random pause that doubles each time; one that asks to slow down
    /// (503 SlowDown, 429) waits at least [`THROTTLED_PAUSE`]. Again at once after a 4xx
    /// whose `Date` shows the request was signed with a time off by [`crate::store::clock::SKEW_RETRY`] or more.
    /// The whole stays within the caller's timeout (`deadline`).
    ///
    /// A write, or any request made for an upload ([`crate::store::for_upload`]), that could
    /// not connect (the request never left: asking again is safe) is tried up to
    /// [`CONNECT_ATTEMPTS`] times, [`connect_wait`] apart, as long as the deadline allows: the
    /// store restarting for a second failed a PutObject within 75 ms, and Nix 2.8 retries a
    /// 5xx to a PUT without its body (each retry then waits for the body idle timeout and is
    /// refused: `nix copy --to` failed after four minutes).
    async fn attempts(
        &self,
        what: &'static str,
        u: &Unsigned,
        creds: &Credentials,
        deadline: tokio::time::Instant,
    ) -> Result<Read<reqwest::Response>, StoreError> {
        let mut pause = Duration::from_millis(25);
        let mut attempt = 1;
        // Tries that could not connect, counted apart: the first try after the store went
        // away usually fails on a kept-alive connection it closed (a transient failure),
        // which must not shorten the 3.75 s the store is waited for.
        let mut unconnected_tries = 0;
        loop {
            let (req, signed_with) = self.signed(u, creds)?;
            let sent = req.send().await;
            let (transient, throttled, skewed) = match &sent {
                Ok(res) => {
                    if let Some(date) = res.headers().get(reqwest::header::DATE) {
                        if res.headers().get(reqwest::header::AGE).is_none() {
                            self.clock.observe(date.to_str().unwrap_or_default());
                        }
                    }
                    let s = res.status();
                    let throttled = matches!(
                        s,
                        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
                    );
                    let skewed =
                        s.is_client_error() && !throttled && self.clock.moved_since(signed_with);
                    (s.is_server_error() || throttled, throttled, skewed)
                }
                Err(_) => (true, false, false),
            };
            let unconnected = sent.as_ref().err().is_some_and(reqwest::Error::is_connect);
            if unconnected && (u.method == reqwest::Method::PUT || crate::store::for_upload()) {
                unconnected_tries += 1;
                let wait = connect_wait(unconnected_tries);
                if unconnected_tries < CONNECT_ATTEMPTS
                    && tokio::time::Instant::now() + wait < deadline
                {
                    tracing::debug!(
                        attempt = unconnected_tries + 1,
                        "S3 {what}: could not connect; trying again"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
                return self.answer(what, sent).await;
            }
            if !(transient || skewed) || attempt >= ATTEMPTS {
                return self.answer(what, sent).await;
            }
            attempt += 1;
            if skewed {
                tracing::debug!(
                    attempt,
                    "S3 {what}: signed with a time the store refused; signing again with its own"
                );
                continue;
            }
            tracing::debug!(attempt, "S3 {what}: retrying after a transient failure");
            let wait = if throttled {
                jitter(pause) + THROTTLED_PAUSE
            } else {
                jitter(pause)
            };
            tokio::time::sleep(wait).await;
            pause *= 2;
        }
    }

    async fn answer(
        &self,
        what: &'static str,
        sent: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Read<reqwest::Response>, StoreError> {
        match sent {
            Ok(res) => self.check(what, res).await,
            // With its causes: reqwest's own text is "error sending request", the reason
            // (connection refused, too many open files) is in its source.
            Err(e) => Err(StoreError::Unavailable(format!(
                "{what}: {}",
                super::display_chain(&e)
            ))),
        }
    }

    /// What the caller handles (found, missing, a range past the end); the rest becomes the
    /// errors the SDK path gives.
    async fn check(
        &self,
        what: &'static str,
        res: reqwest::Response,
    ) -> Result<Read<reqwest::Response>, StoreError> {
        let status = res.status();
        if status.is_success() {
            return Ok(Read::Found(res));
        }
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(Read::BadRange);
        }
        let code = error_code(res).await;
        let bucket = &self.bucket;
        match (status.as_u16(), code.as_str()) {
            (404, "NoSuchBucket") => Err(StoreError::Misconfigured(format!(
                "bucket {bucket:?} does not exist"
            ))),
            (404, _) => Ok(Read::NotFound),
            (401 | 403, c) => Err(super::refused(what, bucket, c)),
            (s, c) => Err(super::answered(what, s, c)),
        }
    }

    pub(super) async fn get(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<Read<Object>, StoreError> {
        let req = self.request(reqwest::Method::GET, key, range);
        let res = match self.send("GetObject", key, req).await? {
            Read::Found(res) => res,
            Read::NotFound => return Ok(Read::NotFound),
            Read::BadRange => return Ok(Read::BadRange),
        };
        let headers = res.headers();
        let length = header_u64(headers, CONTENT_LENGTH.as_str())
            .ok_or_else(|| StoreError::Other(format!("GetObject {key}: no Content-Length")))?;
        let told = headers.get(CONTENT_RANGE).and_then(|v| v.to_str().ok());
        let content_range = match range {
            None => None,
            // A store that ignores the range sends the whole object, with a 200 (AWS does
            // for a range an empty object cannot meet): taken as such, as HTTP allows.
            Some(_) if res.status() == StatusCode::OK && told.is_none() => None,
            // MinIO's answer to a range of an empty object (`bytes 0--1/0`).
            Some(_) if told.is_some_and(|t| t.trim_end().ends_with("/0")) => {
                return Ok(Read::BadRange)
            }
            // Never serve part of an object as if it were a whole one.
            Some(_) => Some(
                told.and_then(ContentRange::parse_header)
                    .filter(|_| res.status() == StatusCode::PARTIAL_CONTENT)
                    .ok_or_else(|| {
                        StoreError::Other(format!(
                            "GetObject {key}: ranged answer without a valid Content-Range"
                        ))
                    })?,
            ),
        };
        let encoding = crate::store::content_encoding(
            headers
                .get(reqwest::header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok()),
        );
        let body = res.bytes_stream().map_err(std::io::Error::other);
        Ok(Read::Found(Object {
            body: Box::pin(body),
            length: Some(length),
            range: content_range,
            encoding,
        }))
    }

    pub(super) async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let req = self.request(reqwest::Method::HEAD, key, None);
        match self.send("HeadObject", key, req).await? {
            // Without its length the answer says nothing of the object's size: an error, not
            // an empty object (`verify` would take that for a NAR of the wrong size).
            Read::Found(res) => header_u64(res.headers(), CONTENT_LENGTH.as_str())
                .map(Some)
                .ok_or_else(|| StoreError::Other(format!("HEAD {key}: no Content-Length"))),
            Read::NotFound | Read::BadRange => Ok(None),
        }
    }
}

/// Bodies hashed on the blocking pool rather than where they are sent from: hashing 8 MiB
/// (the largest single PUT) takes milliseconds, which would hold an async worker, and every
/// request on it, that long; a hop to the pool costs less than hashing this much.
const HASH_INLINE_MAX: usize = 256 << 10;

/// The SHA-256 of `body` in hex, as a signed PUT carries it.
async fn sha256_hex(body: &Bytes) -> Result<String, StoreError> {
    if body.len() <= HASH_INLINE_MAX {
        return Ok(hex::encode(Sha256::digest(body)));
    }
    let body = body.clone();
    tokio::task::spawn_blocking(move || hex::encode(Sha256::digest(&body)))
        .await
        .map_err(|e| StoreError::Other(format!("hashing a body to send: {e}")))
}

impl FastReads {
    /// PutObject of a body held in memory, in one request. Retried like a read: the body is
    /// whole, so sending it again is the same write.
    pub(super) async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        let body_len = body.len();
        let req = Unsigned {
            method: reqwest::Method::PUT,
            url: format!("{}{}", self.base, encode_key(key)),
            headers: Vec::new(),
            payload_sha256: sha256_hex(&body).await?,
            body: Some(body),
        };
        // As the SDK path's writes.
        let deadline = super::writer::write_deadline(self.timeout, body_len);
        match self.send_within(deadline, "PutObject", key, req).await? {
            Read::Found(res) => {
                // Read to the end, so the connection goes back to the pool; a store that
                // stalls there (the write is done) costs its connection, not the upload.
                let _ = tokio::time::timeout(self.timeout, res.bytes()).await;
                Ok(())
            }
            Read::NotFound | Read::BadRange => Err(StoreError::Other(format!(
                "PutObject {key}: the store refused the write"
            ))),
        }
    }

    /// One ListObjectsV2 page of the keys under `prefix` (a full key prefix) after
    /// `token`: the objects, and the token of the next page if there is one.
    pub(super) async fn list_page(
        &self,
        prefix: &str,
        token: Option<&str>,
        start_after: Option<&str>,
    ) -> Result<(Vec<Listed>, Option<String>), StoreError> {
        let mut url = format!(
            "{}?list-type=2&prefix={}",
            self.base.trim_end_matches('/'),
            encode(prefix)
        );
        if let Some(t) = token {
            url.push_str("&continuation-token=");
            url.push_str(&encode(t));
        }
        if let Some(a) = start_after {
            url.push_str("&start-after=");
            url.push_str(&encode(a));
        }
        let req = Unsigned {
            method: reqwest::Method::GET,
            url,
            headers: Vec::new(),
            payload_sha256: EMPTY_SHA256.to_owned(),
            body: None,
        };
        let res = match self.send("ListObjectsV2", prefix, req).await? {
            Read::Found(res) => res,
            Read::NotFound | Read::BadRange => {
                return Err(StoreError::Other(format!(
                    "ListObjectsV2 {prefix}: the store answered 404"
                )))
            }
        };
        let body = match tokio::time::timeout(self.timeout, res.bytes()).await {
            Err(_) => return Err(StoreError::Timeout(self.timeout.as_secs())),
            Ok(Err(e)) => {
                return Err(StoreError::Unavailable(format!(
                    "ListObjectsV2: {}",
                    super::display_chain(&e)
                )))
            }
            Ok(Ok(b)) => b,
        };
        parse_list(&body).map_err(|e| {
            StoreError::Other(format!("ListObjectsV2 {prefix}: unreadable answer: {e}"))
        })
    }
}

/// An object in a listing page, by its full key.
#[derive(Debug, PartialEq)]
pub(super) struct Listed {
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// A ListObjectsV2 answer: its objects, and the next page's token if it is truncated.
fn parse_list(body: &[u8]) -> Result<(Vec<Listed>, Option<String>), XmlDecodeError> {
    let mut doc = Document::try_from(body)?;
    let mut root = doc.root_element()?;
    if !root.start_el().matches("ListBucketResult") {
        return Err(XmlDecodeError::custom("not a ListBucketResult"));
    }
    let mut items = Vec::new();
    let mut truncated = false;
    let mut next = None;
    while let Some(mut tag) = root.next_tag() {
        if tag.start_el().matches("Contents") {
            // Each field is required and must parse: an object dated 1970 would look expired
            // to a collector (announcements, access records, grace periods).
            let mut key = None;
            let mut size = None;
            let mut modified = None;
            while let Some(mut field) = tag.next_tag() {
                if field.start_el().matches("Key") {
                    key = Some(try_data(&mut field)?.into_owned());
                } else if field.start_el().matches("Size") {
                    let s = try_data(&mut field)?;
                    size = Some(s.trim().parse::<u64>().map_err(|_| {
                        XmlDecodeError::custom(format!("a Size that is not a size: {s}"))
                    })?);
                } else if field.start_el().matches("LastModified") {
                    let t = try_data(&mut field)?;
                    let parsed = DateTime::from_str(t.trim(), Format::DateTimeWithOffset)
                        .ok()
                        .and_then(|d| SystemTime::try_from(d).ok());
                    modified = Some(parsed.ok_or_else(|| {
                        XmlDecodeError::custom(format!("a LastModified that is not a date: {t}"))
                    })?);
                }
            }
            let key = key.ok_or_else(|| XmlDecodeError::custom("an object without a Key"))?;
            let size = size.ok_or_else(|| XmlDecodeError::custom(format!("{key}: no Size")))?;
            let modified = modified
                .ok_or_else(|| XmlDecodeError::custom(format!("{key}: no LastModified")))?;
            items.push(Listed {
                key,
                size,
                modified,
            });
        } else if tag.start_el().matches("IsTruncated") {
            truncated = try_data(&mut tag)?.trim() == "true";
        } else if tag.start_el().matches("NextContinuationToken") {
            next = Some(try_data(&mut tag)?.into_owned());
        }
    }
    if truncated && next.is_none() {
        return Err(XmlDecodeError::custom(
            "a truncated page without a NextContinuationToken",
        ));
    }
    Ok((items, next.filter(|_| truncated)))
}

/// Tries of one read (the SDK's standard retry mode makes as many).
const ATTEMPTS: u32 = 3;

/// The least a retry waits after the store asked to slow down (503 SlowDown, 429): sooner
/// would add to what it is shedding.
const THROTTLED_PAUSE: Duration = Duration::from_millis(200);

/// A random pause up to `max` (full jitter), so replicas retrying together spread out.
fn jitter(max: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = getrandom::getrandom(&mut b).map_or(u16::MAX, |()| u16::from_le_bytes(b));
    max.mul_f64(f64::from(r) / f64::from(u16::MAX))
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.parse().ok()
}

/// The `<Code>` of an S3 error body, if it has one (a HEAD has no body).
async fn error_code(res: reqwest::Response) -> String {
    let Ok(body) = res.text().await else {
        return String::new();
    };
    body.split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code.to_owned())
        .unwrap_or_default()
}

/// Percent-encodes everything but the unreserved characters (RFC 3986), as SigV4 wants.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An object key in a URL path: each segment encoded, `/` kept.
fn encode_key(key: &str) -> String {
    key.split('/').map(encode).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap as AxumHeaders, StatusCode as S};
    use axum::response::{IntoResponse as _, Response};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A fake S3 answering by key, counting requests; every request must be signed.
    async fn fake_s3(hits: Arc<AtomicUsize>) -> String {
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, h: AxumHeaders| {
            let n = hits.fetch_add(1, Ordering::SeqCst);
            async move {
                let auth = h.get("authorization").and_then(|v| v.to_str().ok());
                assert!(auth.is_some_and(|a| a.starts_with("AWS4-HMAC-SHA256 ")));
                assert!(h.contains_key("x-amz-date") && h.contains_key("x-amz-content-sha256"));
                let xml = |code: &str| format!("<Error><Code>{code}</Code></Error>");
                let r: Response = match uri.path() {
                    "/b/p/ok" => "hello".into_response(),
                    "/b/p/gone" => (S::NOT_FOUND, xml("NoSuchKey")).into_response(),
                    "/b/p/nobucket" => (S::NOT_FOUND, xml("NoSuchBucket")).into_response(),
                    "/b/p/denied" => (S::FORBIDDEN, xml("AccessDenied")).into_response(),
                    "/b/p/archived" => (S::FORBIDDEN, xml("InvalidObjectState")).into_response(),
                    "/b/p/range" => (S::RANGE_NOT_SATISFIABLE, "").into_response(),
                    "/b/p/flaky" if n == 0 => (S::INTERNAL_SERVER_ERROR, "").into_response(),
                    "/b/p/flaky" => "later".into_response(),
                    "/b/p/down" => (S::SERVICE_UNAVAILABLE, xml("SlowDown")).into_response(),
                    "/b/p/busy" if n == 0 => (S::TOO_MANY_REQUESTS, "").into_response(),
                    "/b/p/busy" => "later".into_response(),
                    "/b/p/refusing" => (S::TOO_MANY_REQUESTS, "").into_response(),
                    "/b/p/invalid" => (S::BAD_REQUEST, xml("InvalidArgument")).into_response(),
                    "/b/p/partial" => (S::PARTIAL_CONTENT, "el").into_response(),
                    "/b/p/ranged" => (
                        S::PARTIAL_CONTENT,
                        [(axum::http::header::CONTENT_RANGE, "bytes 1-2/5")],
                        "el",
                    )
                        .into_response(),
                    "/b/p/empty" => (
                        S::PARTIAL_CONTENT,
                        [(axum::http::header::CONTENT_RANGE, "bytes 0--1/0")],
                        "",
                    )
                        .into_response(),
                    // Streamed: no Content-Length, on HEAD either.
                    "/b/p/unsized" => axum::body::Body::from_stream(futures::stream::once(async {
                        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x"))
                    }))
                    .into_response(),
                    other => panic!("unexpected {other}"),
                };
                r
            }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        url
    }

    async fn reads(hits: &Arc<AtomicUsize>) -> FastReads {
        let url = fake_s3(hits.clone()).await;
        let creds = SharedCredentialsProvider::new(Credentials::new("k", "s", None, None, "t"));
        let d = Duration::from_secs(5);
        FastReads::new(&url, "b", "us-east-1", creds, d, d, StoreClock::default()).unwrap()
    }

    /// A store whose clock is days away refuses the first request (signed with this
    /// machine's time); its `Date` gives its time, the request is signed again with it and
    /// succeeds, and later requests are signed with it from the start.
    #[tokio::test]
    async fn requests_are_signed_with_the_stores_time() {
        let hits = Arc::new(AtomicUsize::new(0));
        let r = reads(&hits).await;
        // A refusal from a store whose clock agrees with this machine's is not tried again.
        assert!(r.get("p/denied", None).await.is_err());
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        hits.store(0, Ordering::SeqCst);
        let ahead = super::super::tests::store_two_days_ahead(hits.clone()).await;
        let creds = SharedCredentialsProvider::new(Credentials::new("k", "s", None, None, "t"));
        let d = Duration::from_secs(5);
        let r =
            FastReads::new(&ahead, "b", "us-east-1", creds, d, d, StoreClock::default()).unwrap();
        assert!(matches!(r.get("p/skewed", None).await, Ok(Read::Found(_))));
        assert_eq!(hits.load(Ordering::SeqCst), 2, "refused, then signed again");
        let ahead = r.clock.offset_ms() - 2 * 86_400_000;
        assert!(ahead.abs() <= 5000, "{ahead} ms off the store's offset");
        hits.store(0, Ordering::SeqCst);
        assert!(matches!(r.head("p/skewed").await, Ok(Some(_))));
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "signed right the first time"
        );
        // Refused for another reason, by a store whose offset is the one known: not again.
        hits.store(0, Ordering::SeqCst);
        assert!(r.get("p/denied", None).await.is_err());
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn answers_map_to_what_the_store_trait_promises() {
        let hits = Arc::new(AtomicUsize::new(0));
        let r = reads(&hits).await;
        let Read::Found(o) = r.get("p/ok", None).await.unwrap() else {
            panic!("not found")
        };
        assert_eq!(o.length, Some(5));
        assert_eq!(r.head("p/ok").await.unwrap(), Some(5));
        assert!(matches!(r.get("p/gone", None).await, Ok(Read::NotFound)));
        assert_eq!(r.head("p/gone").await.unwrap(), None);
        assert!(
            matches!(r.head("p/unsized").await, Err(StoreError::Other(m)) if m.contains("Content-Length")),
            "a HEAD without a length taken for a size"
        );
        let range = Some(ByteRange::From {
            start: 9,
            end: None,
        });
        assert!(matches!(r.get("p/range", range).await, Ok(Read::BadRange)));
        assert!(matches!(
            r.get("p/nobucket", None).await,
            Err(StoreError::Misconfigured(m)) if m.contains("does not exist")
        ));
        assert!(matches!(
            r.get("p/denied", None).await,
            Err(StoreError::Misconfigured(m)) if m.contains("AccessDenied")
        ));
        // Another refusal is the request's trouble, not the store being down: not retried.
        hits.store(0, Ordering::SeqCst);
        assert!(matches!(
            r.get("p/invalid", None).await,
            Err(StoreError::Other(m)) if m.contains("400 InvalidArgument")
        ));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        // An archived object is refused alone: the credentials are not in question.
        assert!(matches!(
            r.get("p/archived", None).await,
            Err(StoreError::Other(m)) if m.contains("archived")
        ));
        // A 206 must say which part it is.
        let one = Some(ByteRange::From {
            start: 1,
            end: Some(2),
        });
        let Read::Found(part) = r.get("p/ranged", one).await.unwrap() else {
            panic!("a ranged answer refused")
        };
        assert_eq!(
            (part.length, part.range),
            (
                Some(2),
                Some(ContentRange {
                    start: 1,
                    end: 2,
                    total: 5
                })
            )
        );
        assert!(matches!(
            r.get("p/partial", one).await,
            Err(StoreError::Other(_))
        ));
        // A store that ignores the range answers 200 with the whole object: taken whole,
        // not as the part asked for.
        let Read::Found(o) = r.get("p/ok", one).await.unwrap() else {
            panic!("not found")
        };
        assert_eq!((o.length, o.range), (Some(5), None));
        // MinIO's answer to a range of an empty object.
        assert!(matches!(r.get("p/empty", one).await, Ok(Read::BadRange)));
    }

    #[tokio::test]
    async fn server_errors_are_tried_three_times() {
        let hits = Arc::new(AtomicUsize::new(0));
        let r = reads(&hits).await;
        assert!(matches!(r.get("p/flaky", None).await, Ok(Read::Found(_))));
        assert_eq!(hits.load(Ordering::SeqCst), 2, "one failure, one retry");
        hits.store(0, Ordering::SeqCst);
        assert!(matches!(
            r.get("p/down", None).await,
            Err(StoreError::Unavailable(m)) if m.contains("503")
        ));
        assert_eq!(hits.load(Ordering::SeqCst), ATTEMPTS as usize);
    }

    /// A credentials provider that gives credentials expiring `lasting` from now on its
    /// first call, then fails (an STS or metadata service gone for a while), counting calls.
    #[derive(Debug)]
    struct FailsAfterFirst {
        /// How long they last; `None`: undated.
        lasting: Option<Duration>,
        calls: Arc<AtomicUsize>,
    }

    impl aws_sdk_s3::config::ProvideCredentials for FailsAfterFirst {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let expiry = self.lasting.map(|l| SystemTime::now() + l);
            aws_credential_types::provider::future::ProvideCredentials::ready(if n == 0 {
                Ok(Credentials::new("k", "s", Some("t".into()), expiry, "t"))
            } else {
                Err(aws_credential_types::provider::error::CredentialsError::provider_error("down"))
            })
        }
    }

    /// Reads from a fake S3 signed with credentials from [`FailsAfterFirst`] lasting
    /// `lasting`, and the count of the provider's calls.
    async fn reads_with(
        hits: &Arc<AtomicUsize>,
        lasting: Option<Duration>,
    ) -> (FastReads, Arc<AtomicUsize>) {
        let url = fake_s3(hits.clone()).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let provider = FailsAfterFirst {
            lasting,
            calls: calls.clone(),
        };
        let d = Duration::from_secs(5);
        let r = FastReads::new(
            &url,
            "b",
            "us-east-1",
            SharedCredentialsProvider::new(provider),
            d,
            d,
            StoreClock::default(),
        )
        .unwrap();
        (r, calls)
    }

    /// Credentials due for renewal are still signed with while the renewal fails, and the
    /// provider is asked once per request meanwhile, not by every request at once; ones about
    /// to expire are not.
    #[tokio::test]
    async fn held_credentials_outlive_a_failed_renewal_until_they_expire() {
        let logs = crate::test_logs::capture();
        let hits = Arc::new(AtomicUsize::new(0));
        let (r, calls) = reads_with(&hits, Some(REFRESH_BEFORE - Duration::from_secs(60))).await;
        let renewals_failed = || logs.text().matches("could not be renewed").count();
        // The first request fetches them; the second finds them due, and the renewal fails.
        for _ in 0..2 {
            assert!(matches!(r.get("p/ok", None).await, Ok(Read::Found(_))));
        }
        assert_eq!(renewals_failed(), 1, "the first failure is logged");
        assert!(matches!(r.get("p/ok", None).await, Ok(Read::Found(_))));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "a renewal tried per request"
        );
        let logged = logs.text();
        assert_eq!(
            logged.matches("could not be renewed").count(),
            1,
            "logged once per streak: {logged}"
        );

        let (r, _) = reads_with(&hits, Some(STILL_VALID_FOR - Duration::from_secs(1))).await;
        assert!(matches!(r.get("p/ok", None).await, Ok(Read::Found(_))));
        assert!(
            matches!(r.get("p/ok", None).await, Err(StoreError::Misconfigured(m)) if m.contains("credentials")),
            "signed with credentials about to expire"
        );
    }

    /// Credentials expire by their issuer's clock (STS, IMDS): judged by the store's, which
    /// this machine's may be off, not signed with once expired there.
    #[tokio::test]
    async fn credentials_expire_by_the_stores_clock() {
        use aws_smithy_types::date_time::{DateTime, Format};
        let hits = Arc::new(AtomicUsize::new(0));
        let (r, _) = reads_with(&hits, Some(Duration::from_secs(30 * 60))).await;
        assert!(r.credentials().await.is_ok());
        assert!(r.credentials().await.is_ok(), "the ones held");
        // The store's clock is an hour ahead of this machine's: they have expired.
        let ahead = DateTime::from(SystemTime::now() + Duration::from_secs(3600))
            .fmt(Format::HttpDate)
            .unwrap();
        assert!(r.clock.observe(&ahead));
        assert!(r.credentials().await.is_err());
    }

    /// Credentials that give no expiry are fetched again after [`UNDATED_REFRESH`] (by the
    /// store's clock), as the SDK does, and still signed with while that fails: rotated keys
    /// reached the SDK's requests but never cellar's own, which failed with 403s until a
    /// restart.
    #[tokio::test]
    async fn undated_credentials_are_fetched_again_after_a_while() {
        use aws_smithy_types::date_time::{DateTime, Format};
        let hits = Arc::new(AtomicUsize::new(0));
        let (r, calls) = reads_with(&hits, None).await;
        assert!(r.credentials().await.is_ok());
        assert!(r.credentials().await.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the ones held");
        let later = DateTime::from(SystemTime::now() + UNDATED_REFRESH + Duration::from_secs(60))
            .fmt(Format::HttpDate)
            .unwrap();
        assert!(r.clock.observe(&later));
        assert!(
            r.credentials().await.is_ok(),
            "the renewal failed: still held"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2, "not fetched again");
    }

    /// Retries wait a random share of their pause, so that replicas retrying together spread
    /// out: never more than the pause, and not always nothing. (64 draws of 65536 values: the
    /// chance that all are zero is nil.)
    #[test]
    fn retry_pauses_are_jittered_within_their_bound() {
        let max = Duration::from_millis(100);
        let waits: Vec<Duration> = (0..64).map(|_| jitter(max)).collect();
        assert!(waits.iter().all(|w| *w <= max), "{waits:?}");
        assert!(waits.iter().any(|w| !w.is_zero()), "{waits:?}");
        assert!(waits.iter().any(|w| *w != waits[0]), "{waits:?}");
    }

    #[test]
    fn a_credentials_provider_timing_out_is_no_misconfiguration() {
        use aws_credential_types::provider::error::CredentialsError as E;
        let e = E::provider_timed_out(Duration::from_secs(5));
        assert!(matches!(
            credentials_failure(&e),
            StoreError::Unavailable(_)
        ));
        let misconfigured = [
            E::provider_error("STS: AccessDenied"),
            E::not_loaded("no credentials in the environment"),
            E::invalid_configuration("a profile that assumes itself"),
            E::unhandled("not UTF-8"),
        ];
        for e in misconfigured {
            assert!(
                matches!(credentials_failure(&e), StoreError::Misconfigured(_)),
                "{e:?}"
            );
        }
    }

    /// A store asking to slow down with 429 is asked again (after a pause), and one that
    /// keeps asking is unavailable, not a client error.
    #[tokio::test]
    async fn too_many_requests_is_retried() {
        let hits = Arc::new(AtomicUsize::new(0));
        let r = reads(&hits).await;
        let asked = std::time::Instant::now();
        assert!(matches!(r.get("p/busy", None).await, Ok(Read::Found(_))));
        assert_eq!(hits.load(Ordering::SeqCst), 2, "one refusal, one retry");
        // Asked to slow down, it waits at least the throttled pause before asking again (a
        // lower bound: a sleep never ends early).
        assert!(asked.elapsed() >= THROTTLED_PAUSE, "{:?}", asked.elapsed());
        hits.store(0, Ordering::SeqCst);
        assert!(matches!(
            r.head("p/refusing").await,
            Err(StoreError::Unavailable(m)) if m.contains("429")
        ));
        assert_eq!(hits.load(Ordering::SeqCst), ATTEMPTS as usize);
    }

    /// What a fake S3 saw of one request.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        uri: String,
        sha256: String,
        body: Vec<u8>,
    }

    /// A fake S3 that records each request and answers a PUT with 200 and a listing with
    /// one object and, on the first page, a continuation token.
    async fn recording_s3(seen: Arc<std::sync::Mutex<Vec<Seen>>>) -> FastReads {
        let app = axum::Router::new().fallback(
            move |method: axum::http::Method, uri: axum::http::Uri, h: AxumHeaders, body: Bytes| {
                let seen = seen.clone();
                async move {
                    let sha256 = h
                        .get("x-amz-content-sha256")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    seen.lock().unwrap().push(Seen {
                        method: method.to_string(),
                        uri: uri.to_string(),
                        sha256,
                        body: body.to_vec(),
                    });
                    let q = uri.query().unwrap_or_default().to_owned();
                    let r: Response = if method == axum::http::Method::PUT {
                        S::OK.into_response()
                    } else if q.contains("continuation-token") {
                        "<ListBucketResult><IsTruncated>false</IsTruncated>\
                         <Contents><Key>p/b</Key><Size>2</Size>\
                         <LastModified>2026-12-01T00:00:00Z</LastModified></Contents></ListBucketResult>"
                            .into_response()
                    } else {
                        "<ListBucketResult><IsTruncated>true</IsTruncated>\
                         <NextContinuationToken>t+1/=</NextContinuationToken>\
                         <Contents><Key>p/a</Key><Size>1</Size>\
                         <LastModified>2026-12-01T00:00:00Z</LastModified></Contents></ListBucketResult>"
                            .into_response()
                    };
                    r
                }
            },
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        let creds = SharedCredentialsProvider::new(Credentials::new("k", "s", None, None, "t"));
        let d = Duration::from_secs(5);
        FastReads::new(&url, "b", "us-east-1", creds, d, d, StoreClock::default()).unwrap()
    }

    /// Direct requests to `addr`, with a request timeout of 10 s.
    fn reads_at(addr: std::net::SocketAddr) -> FastReads {
        let creds = SharedCredentialsProvider::new(Credentials::new("k", "s", None, None, "t"));
        let d = Duration::from_secs(10);
        let url = format!("http://{addr}");
        FastReads::new(&url, "b", "us-east-1", creds, d, d, StoreClock::default()).unwrap()
    }

    /// A PUT through `r` to a store that cannot be connected to fails, unavailable, after the
    /// whole wait for it (3.75 s).
    async fn a_write_fails_after_the_whole_wait(r: &FastReads) {
        let started = std::time::Instant::now();
        let e = r.put("p/x", Bytes::from_static(b"x")).await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(
            started.elapsed() >= Duration::from_millis(3750),
            "{:?}",
            started.elapsed()
        );
    }

    /// A write that cannot connect (the store restarting) is tried again over seconds,
    /// within its deadline: the store here comes back 0.6 s after the first try (an outage),
    /// which the three tries within 75 ms missed; a store that stays away fails it after
    /// the last try.
    #[tokio::test]
    async fn a_write_that_cannot_connect_is_tried_again_over_seconds() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let r = reads_at(addr);
        a_write_fails_after_the_whole_wait(&r).await;
        let app = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
        tokio::spawn(async move {
            // The store's outage: not a wait for anything.
            tokio::time::sleep(Duration::from_millis(600)).await;
            let l = tokio::net::TcpListener::bind(addr).await.unwrap();
            axum::serve(l, app).await
        });
        r.put("p/x", Bytes::from_static(b"x")).await.unwrap();
    }

    /// A store that answers a 5xx and then goes away (it is restarting) is still waited for
    /// the whole 3.75 s: the transient failure before the refusals does not count among the
    /// tries that could not connect.
    #[tokio::test]
    async fn a_failure_before_the_store_goes_away_leaves_the_wait_whole() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            // Gone before it answers: every later connection is refused.
            drop(l);
            let mut head = [0u8; 4096];
            let _ = c.read(&mut head).await;
            let _ = c
                .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        });
        let r = reads_at(addr);
        a_write_fails_after_the_whole_wait(&r).await;
    }

    /// A read that cannot connect fails at once (Nix retries a GET itself), unless it is
    /// made for an upload: then it is tried again over seconds, as a write is (the store here
    /// comes back 0.6 s after the first try).
    #[tokio::test]
    async fn a_read_for_an_upload_that_cannot_connect_is_tried_again() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let r = reads_at(addr);
        let started = std::time::Instant::now();
        let e = r.head("p/x").await.unwrap_err();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e}");
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        let app = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
        tokio::spawn(async move {
            // The store's outage: not a wait for anything.
            tokio::time::sleep(Duration::from_millis(600)).await;
            let l = tokio::net::TcpListener::bind(addr).await.unwrap();
            axum::serve(l, app).await
        });
        let found = crate::store::serving_upload(r.head("p/x")).await.unwrap();
        assert_eq!(found, Some(0));
    }

    #[tokio::test]
    async fn a_put_sends_the_body_with_its_sha256() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = recording_s3(seen.clone()).await;
        r.put("p/nar/x y.nar", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        let s = seen.lock().unwrap()[0].clone();
        assert_eq!(s.method, "PUT");
        assert_eq!(s.uri, "/b/p/nar/x%20y.nar");
        assert_eq!(s.body, b"hello");
        assert_eq!(
            s.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }

    /// A body hashed on the blocking pool (over [`HASH_INLINE_MAX`]) is signed with the same
    /// hash as one hashed in place.
    #[tokio::test]
    async fn a_large_put_is_signed_with_its_sha256() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = recording_s3(seen.clone()).await;
        let body = Bytes::from(vec![7u8; HASH_INLINE_MAX + 1]);
        r.put("p/nar/big.nar", body.clone()).await.unwrap();
        let s = seen.lock().unwrap()[0].clone();
        assert_eq!(s.body, body);
        assert_eq!(s.sha256, hex::encode(Sha256::digest(&body)));
        let small = Bytes::from(vec![7u8; HASH_INLINE_MAX]);
        assert_eq!(
            sha256_hex(&small).await.unwrap(),
            hex::encode(Sha256::digest(&small))
        );
    }

    /// A small body is hashed at once; a large one is handed to the blocking pool (here one
    /// thread, kept busy until the test lets it go, so the hash cannot be done before it is
    /// first polled).
    #[test]
    fn large_bodies_are_hashed_off_the_async_worker() {
        use futures::FutureExt as _;
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        rt.block_on(async {
            let small = Bytes::from(vec![7u8; HASH_INLINE_MAX]);
            assert!(sha256_hex(&small).now_or_never().is_some());
            let (release, held) = std::sync::mpsc::channel::<()>();
            let busy = tokio::task::spawn_blocking(move || held.recv());
            let large = Bytes::from(vec![7u8; HASH_INLINE_MAX + 1]);
            let mut hash = Box::pin(sha256_hex(&large));
            assert!((&mut hash).now_or_never().is_none(), "hashed in place");
            release.send(()).unwrap();
            assert_eq!(hash.await.unwrap(), hex::encode(Sha256::digest(&large)));
            busy.await.unwrap().unwrap();
        });
    }

    /// A write may take longer than a read to be answered (its body goes first): six request
    /// timeouts, as the SDK path's writes.
    #[tokio::test]
    async fn a_put_waits_longer_than_a_read() {
        let app = axum::Router::new().fallback(|| async {
            // A store that takes 3 request timeouts to answer (simulated latency, with
            // a request timeout's margin either way on a loaded machine).
            tokio::time::sleep(Duration::from_millis(1200)).await;
            S::OK
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        let creds = SharedCredentialsProvider::new(Credentials::new("k", "s", None, None, "t"));
        let d = Duration::from_millis(400);
        let r = FastReads::new(&url, "b", "us-east-1", creds, d, d, StoreClock::default()).unwrap();
        r.put("p/x", Bytes::from_static(b"x")).await.unwrap();
        assert!(matches!(r.head("p/x").await, Err(StoreError::Timeout(_))));
    }

    #[tokio::test]
    async fn a_listing_asks_for_its_prefix_and_follows_the_token() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = recording_s3(seen.clone()).await;
        let (first, next) = r.list_page("p/_cellar/", None, None).await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(next.as_deref(), Some("t+1/="));
        let (second, next) = r
            .list_page("p/_cellar/", next.as_deref(), None)
            .await
            .unwrap();
        assert_eq!(second[0].key, "p/b");
        assert_eq!(next, None);
        r.list_page("p/_cellar/", None, Some("p/_cellar/-0900 x"))
            .await
            .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].method, "GET");
        assert_eq!(seen[0].uri, "/b?list-type=2&prefix=p%2F_cellar%2F");
        assert_eq!(
            seen[1].uri,
            "/b?list-type=2&prefix=p%2F_cellar%2F&continuation-token=t%2B1%2F%3D"
        );
        assert_eq!(
            seen[2].uri,
            "/b?list-type=2&prefix=p%2F_cellar%2F&start-after=p%2F_cellar%2F-0900%20x"
        );
    }

    #[test]
    fn listing_pages_are_read_with_their_continuation() {
        let page = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys>
  <IsTruncated>true</IsTruncated>
  <Contents><Key>p/a&amp;b.narinfo</Key><LastModified>2026-12-01T21:57:24.107Z</LastModified>
    <ETag>"x"</ETag><Size>42</Size><StorageClass>STANDARD</StorageClass></Contents>
  <Contents><Key>p/nar/c.nar</Key><LastModified>1970-01-01T00:00:10.000Z</LastModified><Size>7</Size></Contents>
  <NextContinuationToken>tok/en=</NextContinuationToken>
</ListBucketResult>"#;
        let (items, next) = parse_list(page).unwrap();
        assert_eq!(
            items,
            vec![
                Listed {
                    key: "p/a&b.narinfo".into(),
                    size: 42,
                    modified: SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_162_244_107),
                },
                Listed {
                    key: "p/nar/c.nar".into(),
                    size: 7,
                    modified: SystemTime::UNIX_EPOCH + Duration::from_secs(10),
                },
            ]
        );
        assert_eq!(next.as_deref(), Some("tok/en="));
        // The last page: a token, if any, is not followed.
        let last = b"<ListBucketResult><IsTruncated>false</IsTruncated>\
            <NextContinuationToken>t</NextContinuationToken></ListBucketResult>";
        assert_eq!(parse_list(last).unwrap(), (vec![], None));
        // A listing cut short without a way on, or no listing at all, is an error (a
        // collector must never take a partial listing for the whole bucket).
        let cut = b"<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>";
        assert!(parse_list(cut).is_err());
        assert!(parse_list(b"<Error><Code>NoSuchKey</Code></Error>").is_err());
        // Every field of an object is required and must parse (an object dated 1970 would
        // look expired to a collector); a date may carry an offset.
        let one = |fields: &str| {
            format!("<ListBucketResult><Contents>{fields}</Contents></ListBucketResult>")
        };
        let date = "<LastModified>1970-01-01T01:00:10+01:00</LastModified>";
        let (items, _) =
            parse_list(one(&format!("<Key>k</Key><Size>1</Size>{date}")).as_bytes()).unwrap();
        assert_eq!(
            items[0].modified,
            SystemTime::UNIX_EPOCH + Duration::from_secs(10)
        );
        for broken in [
            format!("<Size>1</Size>{date}"),
            format!("<Key>k</Key>{date}"),
            "<Key>k</Key><Size>1</Size>".to_owned(),
            "<Key>k</Key><Size>1</Size><LastModified>yesterday</LastModified>".to_owned(),
            format!("<Key>k</Key><Size>-1</Size>{date}"),
        ] {
            assert!(parse_list(one(&broken).as_bytes()).is_err(), "{broken}");
        }
    }

    #[test]
    fn keys_are_encoded_as_sigv4_wants() {
        assert_eq!(encode_key("nar/abc.nar.xz"), "nar/abc.nar.xz");
        assert_eq!(
            encode_key("p/realisations/sha256:ab!out.doi"),
            "p/realisations/sha256%3Aab%21out.doi"
        );
        assert_eq!(encode_key("log/x y+z~"), "log/x%20y%2Bz~");
    }
}
