//! Calls per key for keys of an account (SPEC §9 usage history): the account is the quota
//! subject, so the leases count its calls, not each key's. Each successful call adds one to
//! its cached caller with one atomic operation (and lists the caller on the first call since
//! the last write); the background sync writes the sums into the keys' own day counters once
//! a second. A sum whose write fails is kept and written with the next.
//!
//! These counts are not billing data: a node that crashes loses the calls of its last second
//! from them (the account's count, which is, loses nothing).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::cache::Caller;
use crate::locks::lock;
use crate::quota::Day;
use crate::store::lease::Quota;

#[derive(Default)]
pub struct KeyCalls {
    /// Callers with calls since the last write, by key id.
    listed: Mutex<HashMap<String, Arc<Caller>>>,
    /// Sums a failed write left behind, by key id.
    unwritten: Mutex<HashMap<String, u64>>,
}

impl KeyCalls {
    /// Counts a successful call of `caller`, when its key belongs to an account (a key
    /// without one is its own quota subject: the leases count it).
    pub fn count(&self, caller: &Arc<Caller>) {
        if caller.account.is_none() {
            return;
        }
        caller.unwritten_calls.fetch_add(1, Ordering::Relaxed);
        // A load first: a busy key's callers are listed, and a swap on every call would make
        // its cache line bounce between cores.
        if !caller.listed.load(Ordering::Acquire) && !caller.listed.swap(true, Ordering::AcqRel) {
            lock(&self.listed).insert(caller.key.id.clone(), caller.clone());
        }
    }

    /// Writes the sums since the last write as calls of `today`.
    pub async fn flush(&self, quota: &Quota, today: Day) {
        let listed = std::mem::take(&mut *lock(&self.listed));
        let mut sums = std::mem::take(&mut *lock(&self.unwritten));
        for (id, caller) in listed {
            // Unlisted first: a call counted after the swap below lists the caller again.
            caller.listed.store(false, Ordering::Release);
            let n = caller.unwritten_calls.swap(0, Ordering::AcqRel);
            if n > 0 {
                *sums.entry(id).or_default() += n;
            }
        }
        if sums.is_empty() {
            return;
        }
        let rows: Vec<(String, u64)> = sums.into_iter().collect();
        if let Err(e) = quota.count_days(today, &rows).await {
            log::warn!("could not write the calls of {} keys: {e}", rows.len());
            let mut unwritten = lock(&self.unwritten);
            for (id, n) in rows {
                *unwritten.entry(id).or_default() += n;
            }
        }
    }
}
