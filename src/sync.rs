//! Locking shared maps.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, also after a thread panicked while holding it.
///
/// Every map behind these locks (the NAR cache's index and fills, the uploader's remembered
/// digests, the test store's objects) is changed in single steps that leave it consistent, and
/// the worst a stale entry can cause is an object found missing, which its reader detects;
/// refusing to serve from then on would be worse. The locks are std ones, held for map
/// operations only and never across an `.await`.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
