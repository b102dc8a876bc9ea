//! Per-key async mutexes: the Node service serialises every operation on one
//! target path (publish, republish, unpublish) while operations on different
//! volumes run in parallel. Entries disappear when nobody holds or awaits
//! them, so the map does not grow with the number of volumes ever seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

type LockMap = HashMap<String, Arc<AsyncMutex<()>>>;

/// A map of async mutexes keyed by string.
#[derive(Debug, Default, Clone)]
pub struct KeyedLocks {
    locks: Arc<Mutex<LockMap>>,
}

/// Holds the lock of one key until dropped.
#[derive(Debug)]
pub struct KeyGuard {
    key: String,
    locks: Arc<Mutex<LockMap>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for and takes the lock of `key`.
    pub async fn lock(&self, key: &str) -> KeyGuard {
        let mutex = {
            let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
            locks.entry(key.to_owned()).or_default().clone()
        };
        // The clone keeps the entry alive while we wait.
        let guard = mutex.lock_owned().await;
        KeyGuard {
            key: key.to_owned(),
            locks: self.locks.clone(),
            guard: Some(guard),
        }
    }

    /// Number of keys currently held or awaited.
    pub fn len(&self) -> usize {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        // Release the mutex (and the guard's reference to it) first.
        self.guard.take();
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        // Only the map itself still refers to the mutex: nobody waits.
        if locks
            .get(&self.key)
            .is_some_and(|mutex| Arc::strong_count(mutex) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_key_is_serialised_and_entries_are_cleaned_up() {
        let locks = KeyedLocks::new();
        let inside = Arc::new(AtomicUsize::new(0));
        let max_inside = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let locks = locks.clone();
            let inside = inside.clone();
            let max_inside = max_inside.clone();
            tasks.push(tokio::spawn(async move {
                let _guard = locks.lock("/target").await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for task in tasks {
            assert!(task.await.is_ok());
        }
        assert_eq!(max_inside.load(Ordering::SeqCst), 1);
        assert!(locks.is_empty());
    }

    #[tokio::test]
    async fn different_keys_do_not_block_each_other() {
        let locks = KeyedLocks::new();
        let _a = locks.lock("a").await;
        let b = tokio::time::timeout(Duration::from_secs(1), locks.lock("b")).await;
        assert!(b.is_ok());
        assert_eq!(locks.len(), 2);
        drop(b);
        assert_eq!(locks.len(), 1);
    }
}
