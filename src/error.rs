//! The request error type and its one mapping to HTTP responses.
//!
//! Every variant is matched exhaustively in [`Error::status`], so a new failure mode forces a
//! decision about its status code. Clients get a short plain reason; 5xx causes are logged here,
//! once, with details that never reach the client (S3 internals, paths, credentials).
//!
//! A store failure is always [`Error::Store`], whichever handler or upload step met it;
//! [`UploadError`] holds only what is wrong with an upload itself.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use thiserror::Error;

use crate::nix::names::NameError;
use crate::nix::NarInfoError;
use crate::store::StoreError;

#[derive(Debug, Clone, Error)]
pub enum Error {
    #[error("not found")]
    NotFound,
    /// Not found in the store nor by the upstreams asked, while some upstream could not be
    /// asked (down, skipped after failures): a 404 as a narinfo lookup must answer, but one
    /// neither this server nor anything in front of it keeps.
    #[error("not found; an upstream cache could not be asked")]
    NotFoundForNow,
    #[error("{0}")]
    BadName(#[from] NameError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No credentials where a token is needed.
    #[error("authentication required")]
    Unauthorized,
    /// Credentials that match no token, or a token without the needed scope.
    #[error("{0}")]
    Forbidden(&'static str),
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// A narinfo in the store that is not what the cache layout says it should be.
    #[error("corrupt object {key} in the store: {reason}")]
    BadObject { key: String, reason: NarInfoError },
    /// A read that needs a slot of a bounded pool (a log decoded for the client) found none
    /// free in time; the client should retry (503, `Retry-After: 1`). Says what was busy.
    #[error("{0}")]
    Busy(&'static str),
}

/// What is wrong with an upload (or a path copied into the store: mirroring, `cellar import`),
/// as opposed to the store failing while it is written.
#[derive(Debug, Clone, Error)]
pub enum UploadError {
    /// The upload is wrong; the message names the failed check.
    #[error("{0}")]
    Rejected(String),
    /// The request body ended early or broke.
    #[error("upload body: {0}")]
    Body(String),
    /// The server failed while processing it (a worker task died, an encoder failed).
    #[error("internal upload error: {0}")]
    Internal(String),
    /// The upload is larger than its limit: `upload.max_nar_bytes` for a NAR (as sent or
    /// decompressed), a fixed bound for listings, logs and realisations.
    #[error("larger than {limit} bytes, its limit (upload.max_nar_bytes for a NAR; fixed for other uploads, and a compressed narinfo or realisation may decode to 64 times its size at most)")]
    TooLarge { limit: u64 },
    /// The body sent nothing for this many seconds.
    #[error("the upload body sent nothing for {0} s")]
    IdleTimeout(u64),
    /// A body read into memory whole (a narinfo, a realisation, a debug info link) did not
    /// arrive within this many seconds.
    #[error("the body did not arrive within {secs} s")]
    TooSlow { secs: u64 },
    /// `upload.max_concurrent` uploads are running; the client should retry after this long.
    #[error("too many uploads in progress")]
    Busy { retry_after_secs: u64 },
    /// The body is sent with a `Content-Encoding` cellar does not decode.
    #[error("Content-Encoding {0:?} is not one cellar decodes (xz, zstd, bzip2, br, gzip)")]
    UnsupportedEncoding(String),
}

/// [`Error::label`] of the error a response was made from, in the response's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ErrorLabel(pub &'static str);

/// In the extensions of a response made from the store failing to answer (unavailable, or
/// timed out): the server notes when its store last failed.
#[derive(Debug, Clone, Copy)]
pub struct StoreFailed;

/// In the extensions of a response made from a failure of the store itself ([`Error::is_store_fault`]),
/// with its [`Error::label`]: counted in `cellar status`.
#[derive(Debug, Clone, Copy)]
pub struct StoreFault(pub &'static str);

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound | Self::NotFoundForNow => StatusCode::NOT_FOUND,
            Self::BadName(_) => StatusCode::BAD_REQUEST,
            Self::Store(
                StoreError::Unavailable(_) | StoreError::Timeout(_) | StoreError::UpstreamDown(_),
            ) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(StoreError::RangeNotSatisfiable { .. }) => {
                StatusCode::RANGE_NOT_SATISFIABLE
            }
            Self::Store(
                StoreError::Misconfigured(_)
                | StoreError::TooLarge { .. }
                | StoreError::Encoded { .. }
                | StoreError::WrongSize { .. }
                | StoreError::Other(_),
            ) => StatusCode::BAD_GATEWAY,
            Self::BadObject { .. } => StatusCode::BAD_GATEWAY,
            Self::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Upload(UploadError::Rejected(_) | UploadError::Body(_)) => {
                StatusCode::BAD_REQUEST
            }
            Self::Upload(UploadError::Internal(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Upload(UploadError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Upload(UploadError::IdleTimeout(_) | UploadError::TooSlow { .. }) => {
                StatusCode::REQUEST_TIMEOUT
            }
            // Nix retries 5xx (with back-off); a 4xx would fail the whole `nix copy`.
            Self::Upload(UploadError::Busy { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upload(UploadError::UnsupportedEncoding(_)) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    /// Whether the store itself failed (did not answer, refused the credentials, broke, or
    /// holds an object that cannot be served), as opposed to the request, an upstream, or
    /// this server's limits: what `cellar status` counts as the store's failures.
    pub fn is_store_fault(&self) -> bool {
        match self {
            Self::Store(
                StoreError::Unavailable(_)
                | StoreError::Timeout(_)
                | StoreError::Misconfigured(_)
                | StoreError::WrongSize { .. }
                | StoreError::TooLarge { .. }
                | StoreError::Encoded { .. }
                | StoreError::Other(_),
            )
            | Self::BadObject { .. } => true,
            Self::Store(StoreError::UpstreamDown(_) | StoreError::RangeNotSatisfiable { .. })
            | Self::NotFound
            | Self::NotFoundForNow
            | Self::BadName(_)
            | Self::Busy(_)
            | Self::Unauthorized
            | Self::Forbidden(_)
            | Self::Upload(_) => false,
        }
    }

    /// A short, bounded name for the failure: the `verdict` of a refused upload in the
    /// metrics (never the free-text reason, which could carry a hash).
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::NotFoundForNow => "not_found_upstream_down",
            Self::BadName(_) => "bad_name",
            Self::Store(StoreError::Unavailable(_)) => "store_unavailable",
            Self::Store(StoreError::UpstreamDown(_)) => "upstream_unavailable",
            Self::Store(StoreError::Timeout(_)) => "store_timeout",
            Self::Store(StoreError::RangeNotSatisfiable { .. }) => "range_not_satisfiable",
            Self::Store(StoreError::Misconfigured(_)) => "store_misconfigured",
            Self::Store(StoreError::TooLarge { .. }) => "too_large",
            Self::Store(StoreError::Encoded { .. }) => "encoded_object",
            Self::Store(StoreError::Other(_)) => "store_error",
            Self::Store(StoreError::WrongSize { .. }) => "corrupt_object",
            Self::BadObject { .. } => "corrupt_object",
            Self::Busy(_) => "busy",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::Upload(UploadError::Rejected(_)) => "rejected",
            Self::Upload(UploadError::Body(_)) => "incomplete",
            Self::Upload(UploadError::Internal(_)) => "internal",
            Self::Upload(UploadError::TooLarge { .. }) => "too_large",
            Self::Upload(UploadError::IdleTimeout(_)) => "idle_timeout",
            Self::Upload(UploadError::TooSlow { .. }) => "too_slow",
            Self::Upload(UploadError::Busy { .. }) => "busy",
            Self::Upload(UploadError::UnsupportedEncoding(_)) => "unsupported_encoding",
        }
    }

    /// What the client is told: short, and free of internals for server-side failures.
    fn public_reason(&self) -> String {
        match self {
            Self::NotFound => "not found".into(),
            Self::NotFoundForNow => "not found (an upstream cache could not be asked)".into(),
            Self::BadName(e) => e.to_string(),
            Self::Store(StoreError::Unavailable(_) | StoreError::Timeout(_)) => {
                "store unavailable".into()
            }
            Self::Store(StoreError::UpstreamDown(_)) => {
                "not in the store, and an upstream cache could not be asked".into()
            }
            Self::Store(StoreError::RangeNotSatisfiable { .. }) => "range not satisfiable".into(),
            Self::Store(
                StoreError::Misconfigured(_)
                | StoreError::TooLarge { .. }
                | StoreError::Encoded { .. }
                | StoreError::Other(_),
            ) => "store error".into(),
            Self::Store(StoreError::WrongSize { .. }) => "corrupt object in the store".into(),
            Self::BadObject { .. } => "corrupt object in the store".into(),
            Self::Busy(what) => format!("{what}, retry later"),
            Self::Unauthorized => {
                "authentication required (a token as netrc password or Bearer)".into()
            }
            Self::Forbidden(why) => (*why).into(),
            Self::Upload(UploadError::Rejected(m)) => format!("upload rejected: {m}"),
            Self::Upload(UploadError::Body(m)) => format!("upload incomplete: {m}"),
            Self::Upload(UploadError::Internal(_)) => "internal error".into(),
            Self::Upload(
                e @ (UploadError::TooLarge { .. }
                | UploadError::IdleTimeout(_)
                | UploadError::TooSlow { .. }
                | UploadError::UnsupportedEncoding(_)),
            ) => format!("upload rejected: {e}"),
            Self::Upload(UploadError::Busy { .. }) => {
                "too many uploads in progress, retry later".into()
            }
        }
    }

    fn log(&self) {
        match self {
            Self::Store(StoreError::Misconfigured(m)) => {
                tracing::error!(cause = %m, "store misconfiguration (check credentials, bucket and permissions)")
            }
            Self::Store(StoreError::Unavailable(_) | StoreError::Timeout(_)) => {
                tracing::warn!(cause = %self, "store unavailable")
            }
            // Each upstream's own failures are said where they happen, by name, and at most
            // once per outage and every 10 s ([`crate::upstream`]): a line for each 503 a
            // fleet's retries cause was hundreds of lines per NAR (walk).
            Self::Store(StoreError::UpstreamDown(_)) => {
                tracing::debug!(cause = %self, "upstream unavailable")
            }
            Self::Upload(UploadError::Rejected(m)) => {
                tracing::info!(reason = %m, "upload rejected")
            }
            Self::Upload(UploadError::Body(m)) => {
                tracing::info!(reason = %m, "upload aborted by the client")
            }
            Self::Upload(
                e @ (UploadError::TooLarge { .. }
                | UploadError::IdleTimeout(_)
                | UploadError::TooSlow { .. }
                | UploadError::UnsupportedEncoding(_)),
            ) => tracing::info!(reason = %e, "upload rejected"),
            Self::Upload(UploadError::Busy { .. }) => {
                tracing::info!(
                    "upload refused: upload.max_concurrent uploads (of its pool) in progress"
                )
            }
            Self::Busy(what) => tracing::info!("request refused for now: {what}"),
            e if e.status().is_server_error() => tracing::error!(cause = %e, "request failed"),
            _ => {}
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.log();
        self.into_unlogged_response()
    }
}

impl Error {
    /// The answer [`IntoResponse::into_response`] makes, without its log line: for a caller
    /// that says it its own way (once a minute, say).
    pub fn into_unlogged_response(self) -> Response {
        let status = self.status();
        let mut res = (status, format!("{}\n", self.public_reason())).into_response();
        // For the metrics middleware, which sees only the response.
        res.extensions_mut().insert(ErrorLabel(self.label()));
        if matches!(
            self,
            Self::Store(StoreError::Unavailable(_) | StoreError::Timeout(_))
        ) {
            res.extensions_mut().insert(StoreFailed);
        }
        if self.is_store_fault() {
            res.extensions_mut().insert(StoreFault(self.label()));
        }
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status.is_server_error() || matches!(self, Self::Upload(_) | Self::NotFoundForNow) {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"cellar\""),
            );
        }
        if let Self::Upload(UploadError::Busy { retry_after_secs }) = &self {
            h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        if let Self::Busy(_) = &self {
            h.insert(header::RETRY_AFTER, HeaderValue::from(1));
        }
        if let Self::Store(StoreError::RangeNotSatisfiable { size }) = &self {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        res
    }
}

/// `e` and its sources, each as it displays itself, `: ` between: what the SDK's
/// `DisplayErrorContext` says without the `Debug` of the whole error it adds (kilobytes for a
/// chain of credential providers), which goes to the debug log instead.
pub(crate) fn display_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // Some errors repeat their source in their own text.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(Error::NotFound.status(), StatusCode::NOT_FOUND);
        let unsure = Error::NotFoundForNow.into_response();
        assert_eq!(unsure.status(), StatusCode::NOT_FOUND);
        assert_eq!(unsure.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(
            Error::Store(StoreError::Timeout(3)).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            Error::Store(StoreError::Misconfigured("x".into())).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            Error::BadObject {
                key: "k".into(),
                reason: NarInfoError::NotUtf8
            }
            .status(),
            StatusCode::BAD_GATEWAY
        );
    }

    /// `cellar status` counts the store's own failures, and those of objects in it, and
    /// no other 5xx: an upstream down, too many uploads, an upload's own failure.
    #[test]
    fn store_faults_are_marked_for_status() {
        let fault = |e: Error| {
            e.into_response()
                .extensions()
                .get::<StoreFault>()
                .map(|f| f.0)
        };
        assert_eq!(
            fault(Error::Store(StoreError::Unavailable("x".into()))),
            Some("store_unavailable")
        );
        assert_eq!(
            fault(Error::Store(StoreError::Encoded {
                key: "k".into(),
                encoding: "br".into(),
                why: "w".into()
            })),
            Some("encoded_object")
        );
        assert_eq!(
            fault(Error::Store(StoreError::WrongSize {
                key: "k".into(),
                got: 1,
                expected: 2
            })),
            Some("corrupt_object")
        );
        for e in [
            Error::Store(StoreError::UpstreamDown("x".into())),
            Error::Busy("x"),
            Error::Upload(UploadError::Internal("x".into())),
            Error::Upload(UploadError::Busy {
                retry_after_secs: 1,
            }),
        ] {
            let label = e.label();
            assert_eq!(fault(e), None, "{label}");
        }
    }

    #[test]
    fn upload_statuses() {
        let rejected = Error::Upload(UploadError::Rejected("NarSize 1 does not match".into()));
        assert_eq!(rejected.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            rejected.public_reason(),
            "upload rejected: NarSize 1 does not match"
        );
        assert_eq!(
            Error::Upload(UploadError::Body("reset".into())).status(),
            StatusCode::BAD_REQUEST
        );
        let internal = Error::Upload(UploadError::Internal("join error: panic".into()));
        assert_eq!(internal.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(internal.public_reason(), "internal error");
    }

    #[test]
    fn bounded_upload_statuses() {
        let res = Error::Upload(UploadError::Busy {
            retry_after_secs: 2,
        })
        .into_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            Error::Upload(UploadError::TooLarge { limit: 1 }).status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            Error::Upload(UploadError::IdleTimeout(1)).status(),
            StatusCode::REQUEST_TIMEOUT
        );
    }

    #[test]
    fn a_range_outside_the_object_carries_its_size() {
        let res = Error::Store(StoreError::RangeNotSatisfiable { size: 624 }).into_response();
        assert_eq!(res.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(res.headers()[header::CONTENT_RANGE], "bytes */624");
    }

    #[test]
    fn internals_do_not_leak() {
        let e = Error::Store(StoreError::Misconfigured(
            "GetObject: access denied for AKIASECRET".into(),
        ));
        assert!(!e.public_reason().contains("AKIA"));
    }
}
