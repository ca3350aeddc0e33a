//! Serialises work on one key inside one process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Serialises work on the same key inside one process (two deliveries of one command id).
#[derive(Debug, Default)]
pub(super) struct KeyedLock {
    pub(super) locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub(super) struct KeyedGuard<'a> {
    pub(super) owner: &'a KeyedLock,
    pub(super) key: String,
    pub(super) guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLock {
    pub(super) async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            locks.entry(key.to_owned()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        KeyedGuard {
            owner: self,
            key: key.to_owned(),
            guard: Some(guard),
        }
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self
            .owner
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Only the map holds it: nobody waits, so the entry can go.
        if locks
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.key);
        }
    }
}
