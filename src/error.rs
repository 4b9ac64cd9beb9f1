//! The request error type and its one mapping to HTTP responses.
//!
//! Every variant is matched exhaustively in [`Error::status`], so a new failure mode forces a
//! decision about its status code. Clients get a short plain reason; 5xx causes are logged here,
//! once, with details that never reach the client (S3 internals, paths, credentials).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use thiserror::Error;

use crate::nix::names::NameError;
use crate::store::StoreError;
use crate::upload::UploadError;

#[derive(Debug, Clone, Error)]
pub enum Error {
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    BadName(#[from] NameError),
    #[error("range not satisfiable")]
    RangeNotSatisfiable { size: u64 },
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
    /// An object in the store is not what the cache layout says it should be.
    #[error("corrupt object {key} in the store: {reason}")]
    BadObject { key: String, reason: String },
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::BadName(_) => StatusCode::BAD_REQUEST,
            Self::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::Store(e) => match e {
                StoreError::Unavailable(_) | StoreError::Timeout(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                StoreError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
                StoreError::Misconfigured(_)
                | StoreError::TooLarge { .. }
                | StoreError::Other(_) => StatusCode::BAD_GATEWAY,
            },
            Self::BadObject { .. } => StatusCode::BAD_GATEWAY,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Upload(u) => match u {
                UploadError::Rejected(_) | UploadError::Body(_) => StatusCode::BAD_REQUEST,
                UploadError::Store(e) => Self::store_status(e),
                UploadError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    fn store_status(e: &StoreError) -> StatusCode {
        match e {
            StoreError::Unavailable(_) | StoreError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            StoreError::Misconfigured(_) | StoreError::TooLarge { .. } | StoreError::Other(_) => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// What the client is told: short, and free of internals for server-side failures.
    fn public_reason(&self) -> String {
        match self {
            Self::NotFound => "not found".into(),
            Self::BadName(e) => e.to_string(),
            Self::RangeNotSatisfiable { .. } => "range not satisfiable".into(),
            Self::Store(e) | Self::Upload(UploadError::Store(e)) => Self::store_reason(e).into(),
            Self::BadObject { .. } => "corrupt object in the store".into(),
            Self::Unauthorized => {
                "authentication required (a token as netrc password or Bearer)".into()
            }
            Self::Forbidden(why) => (*why).into(),
            Self::Upload(UploadError::Rejected(m)) => format!("upload rejected: {m}"),
            Self::Upload(UploadError::Body(m)) => format!("upload incomplete: {m}"),
            Self::Upload(UploadError::Internal(_)) => "internal error".into(),
        }
    }

    fn store_reason(e: &StoreError) -> &'static str {
        match e {
            StoreError::Unavailable(_) | StoreError::Timeout(_) => "store unavailable",
            StoreError::RangeNotSatisfiable { .. } => "range not satisfiable",
            StoreError::Misconfigured(_) | StoreError::TooLarge { .. } | StoreError::Other(_) => {
                "store error"
            }
        }
    }

    fn log(&self) {
        match self {
            Self::Store(StoreError::Misconfigured(m))
            | Self::Upload(UploadError::Store(StoreError::Misconfigured(m))) => {
                tracing::error!(cause = %m, "store misconfiguration (check credentials, bucket and permissions)")
            }
            Self::Store(StoreError::Unavailable(_) | StoreError::Timeout(_))
            | Self::Upload(UploadError::Store(
                StoreError::Unavailable(_) | StoreError::Timeout(_),
            )) => {
                tracing::warn!(cause = %self, "store unavailable")
            }
            Self::Upload(UploadError::Rejected(m)) => {
                tracing::info!(reason = %m, "upload rejected")
            }
            Self::Upload(UploadError::Body(m)) => {
                tracing::info!(reason = %m, "upload aborted by the client")
            }
            e if e.status().is_server_error() => tracing::error!(cause = %e, "request failed"),
            _ => {}
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.log();
        let status = self.status();
        let mut res = (status, format!("{}\n", self.public_reason())).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status.is_server_error() || matches!(self, Self::Upload(_)) {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"cellar\""),
            );
        }
        let size = match &self {
            Self::RangeNotSatisfiable { size }
            | Self::Store(StoreError::RangeNotSatisfiable { size })
            | Self::Upload(UploadError::Store(StoreError::RangeNotSatisfiable { size })) => {
                Some(*size)
            }
            _ => None,
        };
        if let Some(size) = size {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        assert_eq!(Error::NotFound.status(), StatusCode::NOT_FOUND);
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
                reason: "r".into()
            }
            .status(),
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn internals_do_not_leak() {
        let e = Error::Store(StoreError::Misconfigured(
            "GetObject: access denied for AKIASECRET".into(),
        ));
        assert!(!e.public_reason().contains("AKIA"));
    }
}
