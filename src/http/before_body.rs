//! Before an upload's body is read, while the store has been failing
//! ([`super::state::App::store_failing`]): whether it answers now. Nix 2.8 retries a PUT
//! that failed (a 5xx) without its body once it has sent it, and each such retry waits for
//! the body's idle timeout (408): a copy whose upload met a store gone down failed after
//! about four minutes. Asked here, before the body, a store still down answers the PUT 503
//! with its body unread, so:
//!
//! - a client that waits for `100 Continue` (`Expect`, as Nix sends it straight to cellar)
//!   has not sent the body, and its retries (about 4.5 s of them) send it: a builder that
//!   starts uploading while the store is away rides out a store back within them, and one
//!   whose store stays down fails within seconds, saying 503;
//! - a client that sends the body anyway (behind nginx, which answers `Expect` itself) gets
//!   the store waited for as long as a write waits for it to connect, before the 503.
//!
//! While the store works, nothing is asked here: an upload costs no request more.

use std::time::Duration;

use axum::http::{header, HeaderMap};

use super::AppState;
use crate::error::Error;
use crate::store::StoreError;

/// How long a PUT whose client waits for `100 Continue` waits here for the store: curl (Nix)
/// sends the body anyway once it has waited 1 s, and a body sent is not sent again by Nix
/// 2.8's retries.
pub(super) const WAITING_CLIENT: Duration = Duration::from_millis(700);

/// How long a PUT whose body is on its way waits here for the store: as long as a write waits
/// for a store it could not connect to (the S3 store's five tries, 3.75 s).
pub(super) const SENDING_CLIENT: Duration = Duration::from_millis(3750);

/// The pause between two questions to a store that did not answer.
const ASKED_AGAIN_AFTER: Duration = Duration::from_millis(250);

/// `Ok` if the store has not been failing or answers now, within [`WAITING_CLIENT`] or
/// [`SENDING_CLIENT`] by `headers`; else the error to answer the PUT with, its body unread.
pub(super) async fn store_answers(st: &AppState, headers: &HeaderMap) -> Result<(), Error> {
    if !st.store_failing() {
        return Ok(());
    }
    let waits = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let limit = if waits {
        WAITING_CLIENT
    } else {
        SENDING_CLIENT
    };
    let end = tokio::time::Instant::now() + limit;
    loop {
        // One try each: a store that could not be connected to is asked again below.
        let asked = crate::store::not_for_upload(st.store.ping());
        let why = match tokio::time::timeout_at(end, asked).await {
            Ok(Ok(())) => {
                st.note_store_answers();
                return Ok(());
            }
            Ok(Err(StoreError::Unavailable(e) | StoreError::UpstreamDown(e))) => e,
            Ok(Err(StoreError::Timeout(_))) | Err(_) => "it did not answer".to_owned(),
            // It answered: the upload's own requests would fail the same way.
            Ok(Err(e)) => return Err(Error::Store(e)),
        };
        if tokio::time::Instant::now() + ASKED_AGAIN_AFTER >= end {
            return Err(Error::Store(StoreError::Unavailable(format!(
                "asked before the upload's body for {} ms: {why}",
                limit.as_millis()
            ))));
        }
        // The store restarting: asked again shortly (a refused connection fails at once).
        tokio::time::sleep(ASKED_AGAIN_AFTER).await;
    }
}
