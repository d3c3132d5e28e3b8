//! `last_used_at` (SPEC §9, to the minute): noted on the request path with one atomic load
//! per call (and a write once a minute), written to the store by the background sync at most
//! once a minute per key, never by a request.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cache::Caller;
use crate::locks::lock;
use crate::store::Store;

/// Keys used in a minute not yet written, with that minute.
#[derive(Default)]
pub struct LastUsed {
    pending: Mutex<HashMap<String, u64>>,
}

fn minute_of(t: SystemTime) -> u64 {
    crate::clock::unix_secs(t) / 60
}

impl LastUsed {
    /// Notes a call of `caller` at `now`. Only the first call of a minute takes the lock: the
    /// cached caller remembers the minute it was last noted in.
    pub fn note(&self, caller: &Caller, now: SystemTime) {
        let minute = minute_of(now);
        // A load first: a busy key is noted from every core, and a read-modify-write on every
        // call would make its cache line bounce between them.
        let last = &caller.last_minute;
        if last.load(Ordering::Relaxed) >= minute
            || last.fetch_max(minute, Ordering::Relaxed) >= minute
        {
            return;
        }
        let mut pending = lock(&self.pending);
        let seen = pending.entry(caller.key.id.clone()).or_default();
        *seen = (*seen).max(minute);
    }

    /// Writes what was noted. A failed write is dropped, not retried: the next minute's
    /// calls note the key again, and the field is informational.
    pub async fn flush(&self, store: &dyn Store) {
        let pending = std::mem::take(&mut *lock(&self.pending));
        if pending.is_empty() {
            return;
        }
        let used: Vec<(String, SystemTime)> = pending
            .into_iter()
            .map(|(id, minute)| (id, UNIX_EPOCH + Duration::from_secs(minute * 60)))
            .collect();
        if let Err(e) = store.touch_keys(&used).await {
            log::warn!(
                "could not record when {} keys were last used: {e}",
                used.len()
            );
        }
    }
}
