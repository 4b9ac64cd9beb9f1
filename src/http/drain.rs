//! The body of an upload answered before it was read (refused on its headers: no token, a bad
//! name, too large by its `Content-Length`, no slot free; or not needed: a NAR already stored),
//! read to its end before the answer goes out, when the client is sending it anyway.
//!
//! A client that sends `Expect: 100-continue` (Nix, curl for larger bodies) waits for the
//! answer before sending the body, and gets it. A reverse proxy does not pass `Expect` on:
//! nginx answers it itself and streams the body to cellar at once (`proxy_request_buffering
//! off`). Answered with the body unread, the connection is closed with bytes pending, the
//! kernel resets it, and the proxy, still writing the body, loses the answer in the reset: the
//! client got nginx's 502 instead of cellar's 401, 403, 400 or 413 (measured: 3 to 7 times in
//! 10 with a 2 MiB body), and Nix retried an upload that could only be refused again.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as _, Frame};

/// What is read of a body left unread, at most, before the answer (within [`DRAIN_TIME`]):
/// more than that and the connection is closed with the rest unread.
pub(super) const DRAIN_MAX: u64 = 64 << 20;
pub(super) const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads what the handler left of a `PUT`'s body that the client sends without waiting for
/// an answer (no `Expect: 100-continue`), whatever the answer, before it goes out: at most
/// [`DRAIN_MAX`] (as far as `Content-Length` says), for at most [`DRAIN_TIME`].
pub(super) async fn drain_unread(req: Request, next: Next) -> Response {
    let headers = req.headers();
    let sent_anyway = req.method() == Method::PUT
        && !headers.contains_key(header::EXPECT)
        && (headers.contains_key(header::TRANSFER_ENCODING) || declared(headers) > Some(0));
    if !sent_anyway {
        return next.run(req).await;
    }
    let size = declared(headers);
    let (parts, body) = req.into_parts();
    let held = Held(Arc::new(Mutex::new(Some(body))));
    let res = next
        .run(Request::from_parts(parts, Body::new(held.clone())))
        .await;
    held.drain(size).await;
    res
}

/// The body's size as its `Content-Length` says, if it says one.
fn declared(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A request body whose rest can be taken back once the handler has answered: `None` once
/// it ended or failed (never polled again then).
#[derive(Clone)]
struct Held(Arc<Mutex<Option<Body>>>);

impl Held {
    async fn drain(&self, size: Option<u64>) {
        let Some(mut rest) = crate::sync::lock(&self.0).take() else {
            return;
        };
        if size.is_some_and(|n| n > DRAIN_MAX) {
            return;
        }
        let drained = tokio::time::timeout(DRAIN_TIME, async {
            let mut n = 0u64;
            while let Some(Ok(frame)) =
                std::future::poll_fn(|cx| Pin::new(&mut rest).poll_frame(cx)).await
            {
                n += frame.data_ref().map_or(0, |d| d.len() as u64);
                if n > DRAIN_MAX {
                    break;
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::debug!("an unread request body was not read to its end in time");
        }
    }
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut held = crate::sync::lock(&self.0);
        let Some(body) = held.as_mut() else {
            return Poll::Ready(None);
        };
        let next = Pin::new(body).poll_frame(cx);
        if matches!(next, Poll::Ready(None | Some(Err(_)))) {
            *held = None;
        }
        next
    }

    fn size_hint(&self) -> http_body::SizeHint {
        crate::sync::lock(&self.0)
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }

    fn is_end_stream(&self) -> bool {
        crate::sync::lock(&self.0)
            .as_ref()
            .is_none_or(|b| b.is_end_stream())
    }
}
