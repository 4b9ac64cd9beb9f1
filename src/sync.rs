//! Locking shared maps.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

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

/// Gives back the room of `m`'s table that its entries leave unused: all of it once empty,
/// the rest once they fill less than a quarter of it (a map that shrank after a busy hour
/// would otherwise keep that hour's table until the process ends).
pub(crate) fn give_back_room<K: Eq + Hash, V>(m: &mut HashMap<K, V>) {
    if m.is_empty() {
        *m = HashMap::new();
    } else if m.len() < m.capacity() / 4 {
        m.shrink_to_fit();
    }
}

/// One async lock per key, for work that must not run twice at once on one thing (two copies
/// of one path, two uploads of one path): made when first asked for, and forgotten once no
/// one holds it or waits for it, so the map holds only the keys being worked on.
pub(crate) struct KeyedLocks<K> {
    locks: Mutex<HashMap<K, Weak<tokio::sync::Mutex<()>>>>,
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    pub(crate) fn new() -> Self {
        Self {
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The lock of `key`, the same for everyone who asks while one of them has it.
    pub(crate) fn get(&self, key: &K) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.locks);
        if let Some(held) = locks.get(key).and_then(Weak::upgrade) {
            return held;
        }
        locks.retain(|_, w| w.strong_count() > 0);
        let new = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(key.clone(), Arc::downgrade(&new));
        new
    }

    /// How many keys are remembered (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.locks).len()
    }
}

/// Whether something last done at `last` may be done again (at most once per `period`),
/// noting now as done if so: for warnings said at most so often.
pub fn once_per(last: &Mutex<Option<tokio::time::Instant>>, period: std::time::Duration) -> bool {
    let now = tokio::time::Instant::now();
    let mut last = lock(last);
    if last.is_some_and(|t| now.duration_since(t) < period) {
        return false;
    }
    *last = Some(now);
    true
}

#[cfg(test)]
mod tests {
    use super::KeyedLocks;

    /// One lock per key while it is asked for; a key no one holds is forgotten when another
    /// is asked for.
    #[test]
    fn keyed_locks_are_shared_per_key_and_forgotten_when_free() {
        let locks = KeyedLocks::new();
        let a = locks.get(&1);
        assert!(std::sync::Arc::ptr_eq(&a, &locks.get(&1)));
        let b = locks.get(&2);
        assert!(!std::sync::Arc::ptr_eq(&a, &b));
        assert_eq!(locks.len(), 2);
        drop(a);
        let _c = locks.get(&3);
        assert_eq!(locks.len(), 2, "1, no longer held, is forgotten");
        let held = b.try_lock().unwrap();
        assert!(locks.get(&2).try_lock().is_err(), "2 is the lock held");
        drop(held);
    }
}
