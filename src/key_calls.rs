//! Calls per key for keys of an account (SPEC §9 usage history): the account is the quota
//! subject, so the leases count its calls, not each key's. Each successful call adds one to
//! its cached caller with one atomic operation (and lists the caller on the first call since
//! the last write); the background sync writes the sums into the keys' own day counters once
//! a second. A sum whose write fails is kept and written with the next.
//!
//! One key can have several callers at once: a record refetched after an invalidation or its
//! TTL is a new caller while calls still hold the old one. Each is listed on its own, and
//! their calls are added up by key id when written.
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
    /// Callers with calls since the last write, each once.
    listed: Mutex<Vec<Arc<Caller>>>,
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
        // Acquire: a call counted after a flush's swap sees the flush unlist the caller (the
        // store before the swap), so it lists it again rather than leave its call unwritten.
        caller.unwritten_calls.fetch_add(1, Ordering::AcqRel);
        // A load first: a busy key's callers are listed, and a swap on every call would make
        // its cache line bounce between cores.
        if !caller.listed.load(Ordering::Acquire) && !caller.listed.swap(true, Ordering::AcqRel) {
            lock(&self.listed).push(caller.clone());
        }
    }

    /// The calls counted since the last write (and those a failed write left), by key id.
    fn take(&self) -> HashMap<String, u64> {
        let listed = std::mem::take(&mut *lock(&self.listed));
        let mut sums = std::mem::take(&mut *lock(&self.unwritten));
        for caller in listed {
            // Unlisted first: a call counted after the swap below lists the caller again.
            caller.listed.store(false, Ordering::Release);
            let n = caller.unwritten_calls.swap(0, Ordering::AcqRel);
            if n > 0 {
                *sums.entry(caller.key.id.clone()).or_default() += n;
            }
        }
        sums
    }

    /// Writes the sums since the last write as calls of `today`.
    pub async fn flush(&self, quota: &Quota, today: Day) {
        let sums = self.take();
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

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::auth::KeyDigest;
    use crate::store::{AccountRecord, AccountStatus, KeyRecord};

    fn caller(key_id: &str) -> Arc<Caller> {
        let now = SystemTime::now();
        let mut key = KeyRecord::new(
            key_id.into(),
            KeyDigest([7; 32]),
            "alp_1234".into(),
            String::new(),
            now,
        );
        key.account_id = Some("acct_1".into());
        let account = AccountRecord {
            id: "acct_1".into(),
            email: "a@example.com".into(),
            name: String::new(),
            plan: "team".into(),
            monthly_limit: None,
            status: AccountStatus::Active,
            created_at: now,
            updated_at: now,
        };
        Arc::new(Caller::new(key, Some(account)))
    }

    #[test]
    fn two_callers_of_one_key_add_up_and_neither_is_lost() {
        let calls = KeyCalls::default();
        // The record refetched between two calls: a second caller of the same key.
        let (old, new) = (caller("key_a"), caller("key_a"));
        calls.count(&old);
        calls.count(&new);
        calls.count(&old);
        calls.count(&caller("key_b"));
        let mut sums: Vec<_> = calls.take().into_iter().collect();
        sums.sort();
        assert_eq!(sums, [("key_a".into(), 3), ("key_b".into(), 1)]);
        // Both were unlisted: their next calls are counted again.
        calls.count(&old);
        calls.count(&new);
        assert_eq!(calls.take(), HashMap::from([("key_a".into(), 2)]));
        assert!(calls.take().is_empty());
    }
}
