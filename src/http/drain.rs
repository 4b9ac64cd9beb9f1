//! The body of an upload answered before it was read (refused on its headers: no token, a bad
//! name, too large by its `Content-Length`, no slot free; or not needed: a NAR already stored),
//! read to its end before the answer goes out, when the client is sending it anyway.
//!
//! A client that sends `Expect: 100-continue` (Nix, curl for larger bodies) waits for the
//! answer before sending the body, and gets it, unless the handler asked for the body first
//! (a NAR refused midway): then it is sending too. A reverse proxy does not pass `Expect` on:
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
/// with more left than that (as `Content-Length` says), or still coming after it, the
/// connection is closed with the rest unread.
pub(super) const DRAIN_MAX: u64 = 64 << 20;
pub(super) const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads what the handler left of a `PUT`'s body before the answer goes out, whatever the
/// answer, when the client is sending it: it did not wait for `100 Continue` (no `Expect`),
/// or the handler asked for the body (which sent `100 Continue`) before it gave up on it. At
/// most [`DRAIN_MAX`] left (as far as `Content-Length` says), for at most [`DRAIN_TIME`].
pub(super) async fn drain_unread(req: Request, next: Next) -> Response {
    let headers = req.headers();
    let has_body = req.method() == Method::PUT
        && (headers.contains_key(header::TRANSFER_ENCODING) || declared(headers) > Some(0));
    if !has_body {
        return next.run(req).await;
    }
    let waits = waits_for_continue(headers);
    let size = declared(headers);
    let (parts, body) = req.into_parts();
    let held = Held(Arc::new(Mutex::new(State {
        body: Some(body),
        read: 0,
        asked: false,
    })));
    let res = next
        .run(Request::from_parts(parts, Body::new(held.clone())))
        .await;
    held.drain(waits, size).await;
    res
}

/// Whether the client waits for `100 Continue` before it sends the body (`Expect`, whose
/// one value is `100-continue`).
pub(super) fn waits_for_continue(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(header::EXPECT)
}

/// The body's size as its `Content-Length` says, if it says one.
fn declared(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A request body whose rest can be taken back once the handler has answered.
#[derive(Clone)]
struct Held(Arc<Mutex<State>>);

struct State {
    /// `None` once it ended or failed (never polled again then), or was taken back.
    body: Option<Body>,
    /// Bytes the handler read of it.
    read: u64,
    /// Whether the handler asked for it (which sends `100 Continue` to a client waiting).
    asked: bool,
}

impl Held {
    /// Reads the rest of the body if the client is sending it (it did not wait for
    /// `100 Continue`, or was sent one) and not more than [`DRAIN_MAX`] is left.
    async fn drain(&self, waits: bool, size: Option<u64>) {
        let (rest, read, asked) = {
            let mut st = crate::sync::lock(&self.0);
            (st.body.take(), st.read, st.asked)
        };
        let Some(mut rest) = rest else {
            return;
        };
        let left = size.map(|n| n.saturating_sub(read));
        if (waits && !asked) || left.is_some_and(|n| n > DRAIN_MAX) {
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
        let mut st = crate::sync::lock(&self.0);
        st.asked = true;
        let Some(body) = st.body.as_mut() else {
            return Poll::Ready(None);
        };
        let next = Pin::new(body).poll_frame(cx);
        match &next {
            Poll::Ready(Some(Ok(frame))) => {
                st.read += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            Poll::Ready(None | Some(Err(_))) => st.body = None,
            Poll::Pending => {}
        }
        next
    }

    fn size_hint(&self) -> http_body::SizeHint {
        crate::sync::lock(&self.0)
            .body
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }

    fn is_end_stream(&self) -> bool {
        crate::sync::lock(&self.0)
            .body
            .as_ref()
            .is_none_or(|b| b.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// What is left is what counts against [`DRAIN_MAX`], not the whole body: a large upload
    /// refused near its end is read to its end.
    #[tokio::test]
    async fn what_is_left_counts_not_the_whole_body() {
        let chunk = 1usize << 20;
        let chunks = (DRAIN_MAX as usize / chunk) + 8;
        let read = Arc::new(AtomicUsize::new(0));
        let r = read.clone();
        let body = futures::StreamExt::map(futures::stream::iter(0..chunks), move |_| {
            r.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(vec![0u8; chunk]))
        });
        let held = Held(Arc::new(Mutex::new(State {
            body: Some(Body::from_stream(body)),
            read: 0,
            asked: false,
        })));
        let mut handler = held.clone();
        for _ in 0..8 {
            std::future::poll_fn(|cx| Pin::new(&mut handler).poll_frame(cx))
                .await
                .unwrap()
                .unwrap();
        }
        held.drain(true, Some((chunks * chunk) as u64)).await;
        assert_eq!(read.load(Ordering::SeqCst), chunks);
    }
}
