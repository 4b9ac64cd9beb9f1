//! The collectors' announcements ([`crate::gc::deleting`]) as uploads read them: an upload
//! must see every announcement made before its record was complete, and a read that began at
//! most [`TRUSTED_FOR`] before that moment serves (collectors wait longer than that before
//! they act on an announcement). So the latest read is kept and used by every upload whose
//! record it qualifies for, and read again in the background once it is older than
//! [`REFRESH_AFTER`]: a server uploading path after path reads the announcements about once a
//! second, off the paths' critical path, instead of once per path after each record.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::gc::deleting::{self, TRUSTED_FOR};
use crate::store::{Store, StoreError};

/// Past this age, the latest read is renewed in the background when an upload uses it.
const REFRESH_AFTER: Duration = Duration::from_secs(1);

/// The NAR files announced, as one read found them, and when that read began.
#[derive(Clone)]
struct Read {
    began: Instant,
    nars: Arc<HashSet<String>>,
}

pub(super) struct Announcements {
    store: Arc<dyn Store>,
    latest: Mutex<Option<Read>>,
    refreshing: AtomicBool,
    /// Notified after each read made in the background (for tests).
    #[cfg(test)]
    pub(super) refreshed: tokio::sync::Notify,
}

impl Announcements {
    pub(super) fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            store,
            latest: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            #[cfg(test)]
            refreshed: tokio::sync::Notify::new(),
        })
    }

    /// The NARs announced, as a read found them that began no earlier than [`TRUSTED_FOR`]
    /// before `recorded`, the moment an upload record was complete: the latest read if it
    /// qualifies, else one made now.
    pub(super) async fn after(
        self: &Arc<Self>,
        recorded: Instant,
    ) -> Result<Arc<HashSet<String>>, StoreError> {
        let latest = self.lock().clone();
        if let Some(read) = latest.filter(|r| r.began + TRUSTED_FOR >= recorded) {
            if read.began.elapsed() > REFRESH_AFTER {
                self.refresh_in_background();
            }
            return Ok(read.nars);
        }
        self.read_now().await
    }

    /// Reads the announcements now, and keeps the result if no later read has been kept.
    pub(super) async fn read_now(&self) -> Result<Arc<HashSet<String>>, StoreError> {
        let began = Instant::now();
        let nars = Arc::new(deleting::announced(self.store.as_ref(), self.store.now()).await?);
        let mut latest = self.lock();
        if latest.as_ref().is_none_or(|r| r.began < began) {
            *latest = Some(Read {
                began,
                nars: nars.clone(),
            });
        }
        Ok(nars)
    }

    fn refresh_in_background(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.read_now().await {
                tracing::debug!(cause = %e, "reading the collectors' announcements failed");
            }
            this.refreshing.store(false, Ordering::SeqCst);
            #[cfg(test)]
            this.refreshed.notify_one();
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Read>> {
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
