//! Before an upload's body is read, while the store has been failing
//! ([`super::state::App::store_failing`]): whether it answers now. Nix 2.8 retries a PUT
//! that failed (a 5xx) without its body once it has sent it, and each such retry waits for
//! the body's idle timeout (408): a copy whose upload met a store gone down failed after
//! about four minutes. Asked here, before the body, a store still down answers the PUT 503
//! with its body unread, so:
//!
//! - a client that waits for `100 Continue` (`Expect`, which the libcurl of Debian's Nix 2.8
//!   sends with every PUT straight to cellar) has not sent the body, and its retries (about
//!   4.5 s of them) send it: a builder that starts uploading while the store is away rides
//!   out a store back within them, and one whose store stays down fails within seconds,
//!   saying 503;
//! - a client that sends the body anyway (behind nginx, which answers `Expect` itself) gets
//!   the store waited for as long as a write waits for it to connect, before the 503.
//!
//! The store is asked one question at a time, shared by every PUT waiting ([`Asking`]), each
//! within `store.ready_timeout_secs` whatever the PUTs' own waits: a slow store that answers
//! late still ends its failing state. While the store works, nothing is asked here: an
//! upload costs no request more.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::Response;

use super::AppState;
use crate::error::{Error, StoreFailed};
use crate::store::StoreError;

/// How long a PUT whose client waits for `100 Continue` waits here for the store: curl (Nix)
/// sends the body anyway once it has waited 1 s, and a body sent is not sent again by Nix
/// 2.8's retries.
pub(super) const WAITING_CLIENT: Duration = Duration::from_millis(700);

/// How long a PUT whose body is on its way waits here for the store: as long as a write waits
/// for a store it could not connect to (the S3 store's five tries, 3.75 s).
pub(super) const SENDING_CLIENT: Duration = Duration::from_millis(3750);

/// The pause between a question the store did not answer and the next.
const ASKED_AGAIN_AFTER: Duration = Duration::from_millis(250);

/// The question to the store under way, if one is, and the answers so far.
pub struct Asking {
    under_way: AtomicBool,
    /// How many questions were answered or not (`.0`), and whether the last was (`.1`).
    answers: tokio::sync::watch::Sender<(u64, bool)>,
    /// PUTs refused since the log last said so, and when it did.
    refused: AtomicU64,
    said: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Default for Asking {
    fn default() -> Self {
        Self {
            under_way: AtomicBool::new(false),
            answers: tokio::sync::watch::channel((0, false)).0,
            refused: AtomicU64::new(0),
            said: std::sync::Mutex::new(None),
        }
    }
}

impl Asking {
    /// Asks the store whether it answers, unless a question is under way: in a task of its
    /// own, within `store.ready_timeout_secs`. An answer, whatever it says (credentials
    /// refused too: the upload's own requests then say so), ends the store's failing state;
    /// none (unreachable, timed out) renews it.
    fn ask(st: &AppState) {
        if st.asking.under_way.swap(true, Ordering::SeqCst) {
            return;
        }
        let st = st.clone();
        tokio::spawn(crate::store::not_for_upload(async move {
            let limit = st.config.store.ready_timeout;
            let answered = match tokio::time::timeout(limit, st.store.ping()).await {
                Ok(Ok(())) => true,
                Ok(Err(
                    StoreError::Unavailable(_)
                    | StoreError::Timeout(_)
                    | StoreError::UpstreamDown(_),
                ))
                | Err(_) => false,
                Ok(Err(_)) => true,
            };
            if answered {
                st.note_store_answers();
            } else {
                st.note_store_failed();
            }
            st.asking.under_way.store(false, Ordering::SeqCst);
            st.asking.answers.send_modify(|a| *a = (a.0 + 1, answered));
        }));
    }

    /// Says that an upload was refused for the store, at most once a minute, with how many
    /// were since it last said so (each of Nix's retries is one).
    fn say_refused(&self, why: &str) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if crate::sync::once_per(&self.said, Duration::from_secs(60)) {
            self.refused.store(0, Ordering::Relaxed);
            tracing::warn!(
                cause = why,
                refused = n,
                "uploads refused (503) before their body: the store does not answer; Nix \
                 retries them with their body (said at most once a minute)"
            );
        }
    }
}

/// `Ok` if the store has not been failing, or answers now, within [`WAITING_CLIENT`] or
/// [`SENDING_CLIENT`] by `headers`; else the answer to the PUT, its body unread.
pub(super) async fn store_answers(st: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    if !st.store_failing() {
        return Ok(());
    }
    let limit = if super::drain::waits_for_continue(headers) {
        WAITING_CLIENT
    } else {
        SENDING_CLIENT
    };
    let end = tokio::time::Instant::now() + limit;
    let mut answers = st.asking.answers.subscribe();
    loop {
        Asking::ask(st);
        if tokio::time::timeout_at(end, answers.changed())
            .await
            .is_err()
        {
            break;
        }
        if answers.borrow_and_update().1 {
            return Ok(());
        }
        if tokio::time::Instant::now() + ASKED_AGAIN_AFTER >= end {
            break;
        }
        // The store restarting: asked again shortly (a refused connection fails at once).
        tokio::time::sleep(ASKED_AGAIN_AFTER).await;
    }
    let why = format!(
        "asked before the upload's body, the store did not answer within {} ms",
        limit.as_millis()
    );
    st.asking.say_refused(&why);
    let mut res = Error::Store(StoreError::Unavailable(why)).into_unlogged_response();
    // No news of the store: the questions' own answers say whether it fails.
    res.extensions_mut().remove::<StoreFailed>();
    Err(res)
}
