//! Quota leases: how a node serves most calls without a store round trip and still keeps
//! the monthly count exact (SPEC §4).
//!
//! A node asks the store for a block of units of a key's quota ("lease"); the store grants
//! at most what is left of the limit after counting every node's held units, so the limit can
//! never be exceeded. The node then serves calls from the block locally and reports what it
//! used with its next operation, a few times a second. Blocks shrink as the limit nears (down
//! to one unit), units a node has not used for [`IDLE_RETURN`] go back, and unlimited keys
//! take large blocks: that is batched metering.
//!
//! Every operation of a node on a key carries a sequence number; the store applies each
//! number once and answers a repeat with the earlier grant. An operation whose answer was
//! lost is replayed as is, so nothing is counted twice or lost.
//!
//! Near the limit a call can be refused while another node still holds a few units
//! ([`Reservation::Held`]); that node uses them or gives them back within seconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex as AsyncMutex;

use super::StoreError;
use crate::locks::PerKey;
use crate::quota::{Period, Reservation};

/// Unused units go back to the store after this long without a call.
pub const IDLE_RETURN: Duration = Duration::from_secs(2);
/// Use is reported at most this often per key (and with every refill): usage reads lag by
/// about this much, and 10,000 busy keys cost 10,000 store calls a second, not ten times that.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Largest block for a limited key; blocks are 1/16 of what is left, at least one unit.
const MAX_BLOCK: u64 = 1024;
/// Block for unlimited keys: metering in batches.
const UNLIMITED_BLOCK: u64 = 1024;

/// One operation of this node on one key and month, as sent to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOp {
    pub period: Period,
    pub seq: u64,
    /// Calls served from leased units since the last report; negative after refunds.
    pub consumed: i64,
    /// Leased units given back unused.
    pub returned: u64,
    /// Calls served without a lease while the store was unreachable.
    pub extra: u64,
    /// Units asked for.
    pub want: u64,
    pub limit: Option<u64>,
}

/// The store's answer to a [`LeaseOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseAnswer {
    pub grant: u64,
    /// Calls counted for the month.
    pub used: u64,
    /// Calls counted plus units held by all nodes; `None` when the answer is a replay.
    pub committed: Option<u64>,
}

/// What this node holds and owes for one key and month.
#[derive(Debug)]
struct Lease {
    period: Period,
    limit: Option<u64>,
    units: u64,
    consumed: i64,
    returned: u64,
    extra: u64,
    seq: u64,
    /// An operation sent whose answer never arrived; it is replayed before any other.
    parked: Option<LeaseOp>,
    committed: u64,
    last_use: Instant,
    last_report: Instant,
}

impl Lease {
    fn new(period: Period, limit: Option<u64>, seq: u64) -> Self {
        Self {
            period,
            limit,
            units: 0,
            consumed: 0,
            returned: 0,
            extra: 0,
            seq,
            parked: None,
            committed: 0,
            last_use: Instant::now(),
            last_report: Instant::now(),
        }
    }

    fn want(&self) -> u64 {
        match self.limit {
            None => UNLIMITED_BLOCK,
            Some(limit) => (limit.saturating_sub(self.committed) / 16).clamp(1, MAX_BLOCK),
        }
    }

    fn owes(&self) -> bool {
        self.parked.is_some() || self.consumed != 0 || self.returned > 0 || self.extra > 0
    }

    /// The next operation: the parked one again, or a new one carrying what is owed.
    fn next_op(&mut self, want: u64) -> LeaseOp {
        if let Some(op) = self.parked.take() {
            return op;
        }
        self.seq += 1;
        self.last_report = Instant::now();
        LeaseOp {
            period: self.period,
            seq: self.seq,
            consumed: std::mem::take(&mut self.consumed),
            returned: std::mem::take(&mut self.returned),
            extra: std::mem::take(&mut self.extra),
            want,
            limit: self.limit,
        }
    }

    fn apply(&mut self, answer: LeaseAnswer) {
        self.units += answer.grant;
        if let Some(c) = answer.committed {
            self.committed = c;
        }
    }

    fn take_unit(&mut self) -> Reservation {
        self.units -= 1;
        self.consumed += 1;
        self.last_use = Instant::now();
        Reservation::Granted {
            used: self.committed.saturating_sub(self.units),
        }
    }
}

/// A key's leases: the current month's, and earlier ones still owing a report.
#[derive(Debug, Default)]
struct KeyLeases {
    current: Option<Lease>,
    retired: Vec<Lease>,
    /// Sequence numbers continue across months so a node never reuses one per key.
    seq: u64,
}

impl KeyLeases {
    fn lease(&mut self, period: Period, limit: Option<u64>) -> &mut Lease {
        if self.current.as_ref().is_some_and(|l| l.period != period) {
            let mut old = self.current.take().expect("checked");
            old.returned += std::mem::take(&mut old.units);
            self.seq = old.seq;
            self.retired.push(old);
        }
        let seq = self.seq;
        self.current
            .get_or_insert_with(|| Lease::new(period, limit, seq))
    }

    fn find(&mut self, period: Period) -> Option<&mut Lease> {
        match &mut self.current {
            Some(l) if l.period == period => Some(l),
            _ => self.retired.iter_mut().find(|l| l.period == period),
        }
    }
}

/// This node's leases, by key id.
#[derive(Default)]
pub struct LeaseBook {
    // A Tokio lock per key, held across the store call that refills it so concurrent calls of
    // one key share one refill.
    keys: PerKey<AsyncMutex<KeyLeases>>,
}

impl LeaseBook {
    fn entry(&self, key_id: &str) -> Arc<AsyncMutex<KeyLeases>> {
        self.keys.get_or_default(key_id)
    }

    /// Takes one unit, refilling from the store through `run` when none is left. The whole
    /// call, waiting for another call's refill included, ends by `deadline`; `run` gets it.
    pub async fn reserve<F, Fut>(
        &self,
        key_id: &str,
        period: Period,
        limit: Option<u64>,
        deadline: tokio::time::Instant,
        run: F,
    ) -> Result<Reservation, StoreError>
    where
        F: Fn(LeaseOp, tokio::time::Instant) -> Fut,
        Fut: std::future::Future<Output = Result<LeaseAnswer, StoreError>>,
    {
        let entry = self.entry(key_id);
        let mut leases = tokio::time::timeout_at(deadline, entry.lock())
            .await
            .map_err(|_| StoreError("quota lease busy".into()))?;
        let lease = leases.lease(period, limit);
        if lease.limit != limit {
            // Units leased under another limit go back; the next lease uses the new one.
            lease.returned += std::mem::take(&mut lease.units);
            lease.limit = limit;
        }
        // A parked operation may answer with units; a second round asks for more.
        for _ in 0..2 {
            if lease.units > 0 {
                return Ok(lease.take_unit());
            }
            let want = lease.want();
            let op = lease.next_op(want);
            // Parked before sending: if this call is abandoned midway, the operation is
            // replayed later rather than lost.
            lease.parked = Some(op.clone());
            match run(op.clone(), deadline).await {
                Ok(answer) => {
                    lease.parked = None;
                    lease.apply(answer);
                    if lease.units > 0 {
                        return Ok(lease.take_unit());
                    }
                    if op.want > 0 {
                        return Ok(match limit {
                            Some(l) if answer.used >= l => {
                                Reservation::Denied { used: answer.used }
                            }
                            _ => Reservation::Held {
                                used: lease.committed,
                            },
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError("quota lease not granted".into()))
    }

    /// Gives a unit back for a call that failed after taking it.
    pub async fn refund(&self, key_id: &str, period: Period) {
        let entry = self.entry(key_id);
        let mut leases = entry.lock().await;
        let current = leases.current.as_ref().is_some_and(|l| l.period == period);
        if let Some(lease) = leases.find(period) {
            lease.consumed -= 1;
            // Back into this month's block, or back to the store for a past month.
            if current {
                lease.units += 1;
            } else {
                lease.returned += 1;
            }
        }
    }

    /// Records calls served without a lease during an outage, for the next report.
    pub async fn absorb(&self, key_id: &str, period: Period, count: u64) {
        let entry = self.entry(key_id);
        let mut leases = entry.lock().await;
        if leases.find(period).is_none() {
            leases.lease(period, None);
        }
        if let Some(lease) = leases.find(period) {
            lease.extra += count;
        }
    }

    /// Operations to send now: reports of what was used (every [`REPORT_EVERY`]), units idle
    /// for [`IDLE_RETURN`] (or everything, with `all`), replays of parked operations. Each is parked until
    /// [`Self::settled`] so a failure is replayed.
    pub async fn due(&self, all: bool) -> Vec<(String, LeaseOp)> {
        let keys = self.keys.all();
        let mut ops = Vec::new();
        // Runs every tick over every key: no allocation for keys with nothing to send.
        for (key_id, entry) in keys.iter() {
            // A key busy refilling reports with that refill.
            let Ok(mut leases) = entry.try_lock() else {
                continue;
            };
            let KeyLeases {
                current, retired, ..
            } = &mut *leases;
            for lease in current.iter_mut().chain(retired.iter_mut()) {
                if lease.units > 0 && (all || lease.last_use.elapsed() >= IDLE_RETURN) {
                    lease.returned += std::mem::take(&mut lease.units);
                }
                let report_due = all
                    || lease.parked.is_some()
                    || lease.returned > 0
                    || lease.last_report.elapsed() >= REPORT_EVERY;
                if lease.owes() && report_due {
                    let op = lease.next_op(0);
                    lease.parked = Some(op.clone());
                    ops.push((key_id.clone(), op));
                }
            }
            if !leases.retired.is_empty() {
                leases.retired.retain(|l| l.owes() || l.units > 0);
            }
        }
        ops
    }

    /// Applies the outcome of an operation from [`Self::due`]: the first to answer a parked
    /// operation applies its grant, exactly once.
    pub async fn settled(&self, key_id: &str, op: LeaseOp, answer: Option<LeaseAnswer>) {
        let entry = self.entry(key_id);
        let mut leases = entry.lock().await;
        let Some(lease) = leases.find(op.period) else {
            return;
        };
        if lease.parked.as_ref() != Some(&op) {
            return;
        }
        if let Some(answer) = answer {
            lease.parked = None;
            lease.apply(answer);
        }
    }

    /// Whether anything is owed to the store or held from it.
    pub fn unsynced(&self) -> bool {
        let keys = self.keys.all();
        keys.values().any(|entry| match entry.try_lock() {
            Ok(leases) => leases
                .current
                .iter()
                .chain(leases.retired.iter())
                .any(|l| l.owes() || l.units > 0),
            Err(_) => true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    const NOV: Period = Period {
        year: 2026,
        month: 11,
    };

    /// A store of one key: usage, held units and applied sequence numbers, in memory.
    #[derive(Default)]
    struct FakeStore {
        state: Mutex<(i64, i64, u64, u64)>, // usage, held, last seq, last grant
        calls: AtomicU64,
    }

    impl FakeStore {
        fn run(&self, op: &LeaseOp) -> Result<LeaseAnswer, StoreError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let mut s = self.state.lock().unwrap();
            if op.seq <= s.2 {
                return Ok(LeaseAnswer {
                    grant: s.3,
                    used: s.0 as u64,
                    committed: None,
                });
            }
            s.0 += op.consumed + op.extra as i64;
            s.1 -= op.consumed + op.returned as i64;
            let grant = match op.limit {
                None => op.want,
                Some(l) => op.want.min((l as i64 - s.0 - s.1).max(0) as u64),
            };
            s.1 += grant as i64;
            s.2 = op.seq;
            s.3 = grant;
            Ok(LeaseAnswer {
                grant,
                used: s.0 as u64,
                committed: Some((s.0 + s.1) as u64),
            })
        }
    }

    async fn reserve(book: &LeaseBook, store: &FakeStore, limit: Option<u64>) -> Reservation {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        book.reserve("k", NOV, limit, deadline, |op, _| {
            let r = store.run(&op);
            async move { r }
        })
        .await
        .unwrap()
    }

    async fn sync(book: &LeaseBook, store: &FakeStore, all: bool) {
        for (key, op) in book.due(all).await {
            let answer = store.run(&op).ok();
            book.settled(&key, op, answer).await;
        }
    }

    #[tokio::test]
    async fn never_grants_past_the_limit_and_reports_exactly() {
        let book = LeaseBook::default();
        let store = FakeStore::default();
        for _ in 0..100 {
            assert!(matches!(
                reserve(&book, &store, Some(100)).await,
                Reservation::Granted { .. }
            ));
        }
        // Far fewer store calls than calls served; blocks shrink to one unit near the limit.
        assert!(
            store.calls.load(Ordering::Relaxed) < 60,
            "{:?}",
            store.calls
        );
        for _ in 0..10 {
            assert_eq!(
                reserve(&book, &store, Some(100)).await,
                Reservation::Denied { used: 100 }
            );
        }
        sync(&book, &store, true).await;
        assert_eq!(store.state.lock().unwrap().0, 100);
        assert_eq!(store.state.lock().unwrap().1, 0, "nothing left held");
        assert!(!book.unsynced());
    }

    #[tokio::test]
    async fn refunds_and_idle_units_go_back() {
        let book = LeaseBook::default();
        let store = FakeStore::default();
        assert!(matches!(
            reserve(&book, &store, None).await,
            Reservation::Granted { used: 1 }
        ));
        book.refund("k", NOV).await;
        sync(&book, &store, true).await;
        let s = store.state.lock().unwrap();
        assert_eq!((s.0, s.1), (0, 0));
    }

    #[tokio::test]
    async fn a_lost_answer_is_replayed_not_repeated() {
        let book = LeaseBook::default();
        let store = FakeStore::default();
        for _ in 0..3 {
            reserve(&book, &store, None).await;
        }
        // The report is applied by the store but its answer is lost.
        let ops = book.due(true).await;
        assert_eq!(ops.len(), 1);
        store.run(&ops[0].1).unwrap();
        book.settled(&ops[0].0, ops[0].1.clone(), None).await;
        assert!(book.unsynced());
        // The replay changes nothing more.
        sync(&book, &store, true).await;
        let s = store.state.lock().unwrap();
        assert_eq!((s.0, s.1), (3, 0));
    }

    #[tokio::test]
    async fn outage_counts_are_reported_once() {
        let book = LeaseBook::default();
        let store = FakeStore::default();
        book.absorb("k", NOV, 5).await;
        sync(&book, &store, true).await;
        sync(&book, &store, true).await;
        assert_eq!(store.state.lock().unwrap().0, 5);
    }
}
