//! Keys found exhausted this month, so a flood from an over-quota key reaches the store at
//! most once per [`MEMO_TTL`] per node (SPEC §4). A memo only matches the month and the limit
//! it was made under (a changed record reaches the key cache through invalidation), and it
//! expires so that units a silent node held, counted as spent, are found again once that node
//! reports. Counting during outages lives with the leases ([`crate::store::lease`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::locks::{PerKey, lock};
use crate::quota::{Period, Reservation};

/// How long an exhausted key is refused without asking the store again.
pub const MEMO_TTL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Memo {
    /// The period and limit under which the key was found exhausted, its usage then, and
    /// when that was.
    exhausted: Option<(Period, Option<u64>, u64, Instant)>,
}

#[derive(Default)]
pub struct Ledger {
    // std locks: critical sections are a few field updates, never `.await`.
    memos: PerKey<Mutex<Memo>>,
    /// Memos that say exhausted. While there are none, which is usual, a call does not take
    /// the map's read lock (an atomic write to a line every core shares) twice per call.
    exhausted: AtomicUsize,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// `Some(used)` when the key is known to be exhausted in `period` under `limit`.
    pub fn exhausted(&self, key_id: &str, period: Period, limit: Option<u64>) -> Option<u64> {
        // A memo made meanwhile may be missed: then the store answers, as it would anyway.
        if self.exhausted.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let memo = self.memos.get(key_id)?;
        let memo = lock(&memo);
        match memo.exhausted {
            Some((p, l, used, at)) if p == period && l == limit && at.elapsed() < MEMO_TTL => {
                Some(used)
            }
            _ => None,
        }
    }

    /// Remembers what the store answered.
    pub fn record(&self, key_id: &str, period: Period, limit: Option<u64>, answer: Reservation) {
        match answer {
            Reservation::Denied { used } => {
                let memo = self.memos.get_or_default(key_id);
                let mut memo = lock(&memo);
                if memo.exhausted.is_none() {
                    self.exhausted.fetch_add(1, Ordering::Relaxed);
                }
                memo.exhausted = Some((period, limit, used, Instant::now()));
            }
            Reservation::Granted { .. } => {
                if self.exhausted.load(Ordering::Relaxed) == 0 {
                    return;
                }
                if let Some(memo) = self.memos.get(key_id)
                    && lock(&memo).exhausted.take().is_some()
                {
                    self.exhausted.fetch_sub(1, Ordering::Relaxed);
                }
            }
            // Not exhausted: units held by other nodes may come back.
            Reservation::Held => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV: Period = Period {
        year: 2026,
        month: 11,
    };
    const DEC: Period = Period {
        year: 2026,
        month: 12,
    };

    #[test]
    fn exhaustion_is_remembered_per_period_and_limit() {
        let l = Ledger::new();
        assert_eq!(l.exhausted("k", NOV, Some(5)), None);
        l.record("k", NOV, Some(5), Reservation::Held);
        assert_eq!(
            l.exhausted("k", NOV, Some(5)),
            None,
            "held is not exhausted"
        );
        l.record("k", NOV, Some(5), Reservation::Denied { used: 5 });
        assert_eq!(l.exhausted("k", NOV, Some(5)), Some(5));
        assert_eq!(l.exhausted("k", NOV, Some(6)), None, "a new limit forgets");
        assert_eq!(l.exhausted("k", DEC, Some(5)), None, "a new month forgets");
        l.record("k", NOV, Some(6), Reservation::Granted { used: 6 });
        assert_eq!(l.exhausted("k", NOV, Some(5)), None);
        assert_eq!(
            l.exhausted.load(Ordering::Relaxed),
            0,
            "no memo says exhausted"
        );
    }

    #[test]
    fn the_count_of_exhausted_memos_follows_each_key() {
        let l = Ledger::new();
        l.record("a", NOV, Some(5), Reservation::Denied { used: 5 });
        l.record("a", NOV, Some(5), Reservation::Denied { used: 5 });
        l.record("b", NOV, Some(5), Reservation::Denied { used: 5 });
        assert_eq!(l.exhausted.load(Ordering::Relaxed), 2);
        l.record("c", NOV, Some(5), Reservation::Granted { used: 1 });
        l.record("a", NOV, Some(6), Reservation::Granted { used: 6 });
        assert_eq!(l.exhausted.load(Ordering::Relaxed), 1);
        assert_eq!(l.exhausted("a", NOV, Some(5)), None);
        assert_eq!(l.exhausted("b", NOV, Some(5)), Some(5));
        l.record("b", DEC, Some(5), Reservation::Granted { used: 1 });
        assert_eq!(l.exhausted.load(Ordering::Relaxed), 0);
        assert_eq!(l.exhausted("b", NOV, Some(5)), None);
    }
}
