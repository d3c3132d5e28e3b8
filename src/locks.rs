//! Locks that tolerate poisoning: a std mutex, and the reader-sharded lock of a map of shared
//! per-key entries.
//!
//! Every critical section in this crate is a map lookup or insert or a few integer updates,
//! none with an `.await`: a panic inside one cannot leave data half-updated, so a poisoned lock
//! is still safe to use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_utils::sync::{ShardedLock, ShardedLockReadGuard, ShardedLockWriteGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Entries shared by key id: each request takes a read lock and clones an `Arc`; the write
/// lock (and the key's allocation) is needed only the first time a key is seen.
///
/// The lock is crossbeam's `ShardedLock`: a reader locks a shard of its own thread, so the
/// worker threads' reads, one or more per request, do not write to a cache line they share
/// (a std `RwLock` counts its readers in one word). Writes lock every shard; they are rare.
/// Keys are hashed with aHash under a random key per map, some ten times fewer instructions
/// than std's SipHash for a key id and as unpredictable to a client.
pub struct PerKey<T> {
    map: ShardedLock<Map<T>>,
}

type Map<T> = HashMap<String, Arc<T>, ahash::RandomState>;

impl<T> Default for PerKey<T> {
    fn default() -> Self {
        Self {
            map: ShardedLock::default(),
        }
    }
}

fn read<T>(l: &ShardedLock<T>) -> ShardedLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &ShardedLock<T>) -> ShardedLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl<T: Default> PerKey<T> {
    pub fn get(&self, key: &str) -> Option<Arc<T>> {
        read(&self.map).get(key).cloned()
    }

    pub fn get_or_default(&self, key: &str) -> Arc<T> {
        if let Some(entry) = self.get(key) {
            return entry;
        }
        write(&self.map).entry(key.to_string()).or_default().clone()
    }

    /// Keeps only the entries `keep` says yes to.
    pub fn retain(&self, keep: impl FnMut(&String, &mut Arc<T>) -> bool) {
        write(&self.map).retain(keep);
    }

    /// Removes each of `keys` whose entry `remove` says yes to, under one write lock.
    pub fn remove_if(&self, keys: &[String], remove: impl Fn(&Arc<T>) -> bool) {
        let mut map = write(&self.map);
        for key in keys {
            if map.get(key).is_some_and(&remove) {
                map.remove(key);
            }
        }
    }

    pub fn len(&self) -> usize {
        read(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole map, for walking every entry.
    pub fn all(&self) -> ShardedLockReadGuard<'_, Map<T>> {
        read(&self.map)
    }
}
