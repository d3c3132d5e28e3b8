//! What a node knows locally about quota (SPEC §4), so the store is spared work and outages:
//! - keys found exhausted this month are answered 429 without a store call, until the month
//!   ends or the key's limit changes (a changed record reaches the key cache through
//!   invalidation, and a memo only matches the limit it was made under);
//! - under the fail-open policy, calls a cached key makes while the store is unreachable are
//!   admitted against the last usage this node saw and counted here, then written back
//!   ([`Ledger::flush`]) once the store answers again.
//!
//! Over-admission bound of fail-open: during an outage each node admits at most
//! `limit − (usage it last saw)` calls per key, so the month's total for a key is at most
//! `limit + Σ over other nodes (limit − usage they last saw)`; with one node, never more than
//! the limit. Keys a node has never reserved for this month are not admitted (503).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::locks::{PerKey, lock};

use crate::quota::{Period, Reservation};
use crate::store::Store;

#[derive(Default)]
struct Slot {
    period: Option<Period>,
    /// Usage the store last reported for `period`.
    known_used: u64,
    /// The limit under which the key was found exhausted in `period`.
    exhausted_under: Option<Option<u64>>,
    /// Calls admitted locally and not yet written back, by period.
    pending: HashMap<Period, u64>,
}

impl Slot {
    fn enter(&mut self, period: Period) {
        if self.period != Some(period) {
            self.period = Some(period);
            self.known_used = 0;
            self.exhausted_under = None;
        }
    }
}

/// The answer to a local admission during an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalAdmission {
    Admitted {
        used: u64,
    },
    Exhausted {
        used: u64,
    },
    /// Nothing is known about this key's usage this month: it cannot be bounded.
    Unknown,
}

#[derive(Default)]
pub struct Ledger {
    // std locks: critical sections are a map lookup or a few integer updates, never `.await`.
    slots: PerKey<Mutex<Slot>>,
    /// Calls admitted locally and not yet written back, over all keys: checked every tick.
    pending_total: std::sync::atomic::AtomicU64,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self, key_id: &str) -> Arc<Mutex<Slot>> {
        self.slots.get_or_default(key_id)
    }

    /// `Some(used)` when the key is known to be exhausted in `period` under `limit`.
    pub fn exhausted(&self, key_id: &str, period: Period, limit: Option<u64>) -> Option<u64> {
        let slot = self.slots.get(key_id)?;
        let slot = lock(&slot);
        (slot.period == Some(period) && slot.exhausted_under == Some(limit))
            .then_some(slot.known_used)
    }

    /// Remembers what the store answered.
    pub fn record(&self, key_id: &str, period: Period, limit: Option<u64>, answer: Reservation) {
        let slot = self.slot(key_id);
        let mut slot = lock(&slot);
        slot.enter(period);
        match answer {
            Reservation::Granted { used } => {
                slot.known_used = used;
                slot.exhausted_under = None;
            }
            Reservation::Denied { used } => {
                slot.known_used = used;
                slot.exhausted_under = Some(limit);
            }
            // Not exhausted: units held by other nodes may come back.
            Reservation::Held { used } => {
                slot.known_used = used;
            }
        }
    }

    /// Whether anything awaits [`Ledger::flush`].
    pub fn needs_flush(&self) -> bool {
        let slots = self.slots.all();
        slots
            .values()
            .any(|s| lock(s).pending.values().any(|&n| n > 0))
    }

    /// Admits a call locally while the store is unreachable.
    pub fn admit(&self, key_id: &str, period: Period, limit: Option<u64>) -> LocalAdmission {
        let slot = self.slot(key_id);
        let mut slot = lock(&slot);
        let known = slot.period == Some(period);
        let base = if known { slot.known_used } else { 0 };
        let pending = slot.pending.get(&period).copied().unwrap_or(0);
        let used = base + pending;
        match limit {
            Some(_) if !known => LocalAdmission::Unknown,
            Some(limit) if used >= limit => LocalAdmission::Exhausted { used },
            _ => {
                *slot.pending.entry(period).or_default() += 1;
                self.pending_total.fetch_add(1, Ordering::AcqRel);
                LocalAdmission::Admitted { used: used + 1 }
            }
        }
    }

    /// Takes back a local admission (the call failed after all).
    pub fn unadmit(&self, key_id: &str, period: Period) {
        let slot = self.slot(key_id);
        let mut slot = lock(&slot);
        if let Some(n) = slot.pending.get_mut(&period).filter(|n| **n > 0) {
            *n -= 1;
            self.pending_total.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Calls counted locally and not yet written back.
    #[cfg(test)]
    fn pending(&self) -> u64 {
        let slots = self.slots.all();
        slots
            .values()
            .map(|s| lock(s).pending.values().sum::<u64>())
            .sum()
    }

    /// Writes local counts back to the store; what fails stays for the next attempt.
    /// Returns the number of calls written.
    pub async fn flush(&self, store: &dyn Store) -> u64 {
        let work: Vec<(String, Arc<Mutex<Slot>>)> = {
            let slots = self.slots.all();
            slots
                .iter()
                .filter(|(_, s)| lock(s).pending.values().any(|&n| n > 0))
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect()
        };
        let mut written = 0;
        for (key_id, slot) in work {
            let batches: Vec<(Period, u64)> = {
                let mut slot = lock(&slot);
                slot.pending.drain().filter(|&(_, n)| n > 0).collect()
            };
            for (period, count) in batches {
                match store.absorb(&key_id, period, count).await {
                    Ok(()) => {
                        written += count;
                        self.pending_total.fetch_sub(count, Ordering::AcqRel);
                        let mut slot = lock(&slot);
                        if slot.period == Some(period) {
                            slot.known_used += count;
                        }
                    }
                    Err(e) => {
                        log::debug!("write-back of {count} calls for {key_id} failed: {e}");
                        *lock(&slot).pending.entry(period).or_default() += count;
                    }
                }
            }
        }
        if written > 0 {
            log::info!("wrote back {written} calls counted during a store outage");
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

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
        l.record("k", NOV, Some(5), Reservation::Denied { used: 5 });
        assert_eq!(l.exhausted("k", NOV, Some(5)), Some(5));
        assert_eq!(l.exhausted("k", NOV, Some(6)), None, "a new limit forgets");
        assert_eq!(l.exhausted("k", DEC, Some(5)), None, "a new month forgets");
        l.record("k", NOV, Some(6), Reservation::Granted { used: 6 });
        assert_eq!(l.exhausted("k", NOV, Some(5)), None);
    }

    #[test]
    fn local_admission_is_bounded_by_the_last_known_usage() {
        let l = Ledger::new();
        assert_eq!(l.admit("k", NOV, Some(3)), LocalAdmission::Unknown);
        l.record("k", NOV, Some(3), Reservation::Granted { used: 1 });
        assert_eq!(
            l.admit("k", NOV, Some(3)),
            LocalAdmission::Admitted { used: 2 }
        );
        assert_eq!(
            l.admit("k", NOV, Some(3)),
            LocalAdmission::Admitted { used: 3 }
        );
        assert_eq!(
            l.admit("k", NOV, Some(3)),
            LocalAdmission::Exhausted { used: 3 }
        );
        l.unadmit("k", NOV);
        assert_eq!(l.pending(), 1);
        // Unlimited keys are admitted and counted even without history.
        assert_eq!(
            l.admit("u", NOV, None),
            LocalAdmission::Admitted { used: 1 }
        );
        assert_eq!(l.pending(), 2);
    }

    #[tokio::test]
    async fn flush_writes_everything_back_once() {
        let store = MemoryStore::new();
        let l = Ledger::new();
        l.record("k", NOV, Some(10), Reservation::Granted { used: 4 });
        for _ in 0..3 {
            l.admit("k", NOV, Some(10));
        }
        assert_eq!(l.flush(&store).await, 3);
        assert_eq!(store.usage("k", NOV).await.unwrap(), 3);
        assert_eq!(l.flush(&store).await, 0);
        assert_eq!(l.pending(), 0);
    }
}
