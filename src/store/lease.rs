//! Quota leases: how a node serves most calls without a store round trip and still keeps
//! the monthly count exact (SPEC §4, §4a).
//!
//! A node asks the store for a block of units of a subject's quota ("lease"); the store
//! grants at most what is left of the limit after counting every node's held units, so the
//! limit can never be exceeded. The node then serves calls from the block locally and reports
//! what it used with its next operation, at least once a second. Blocks shrink as the limit
//! nears (down to one unit, or the number of calls waiting), units a node has not used for
//! [`IDLE_RETURN`] go back, and unlimited keys take large blocks: that is batched metering.
//!
//! Every operation of a node on a subject carries a sequence number; the store applies each
//! number once and answers a repeat with the earlier grant. An operation whose answer was
//! lost is replayed as is, so nothing is counted twice or lost.
//!
//! **Fencing.** A node serves leased units only while its lease is confirmed: within
//! [`FENCE_AFTER`] of sending an operation the store answered, on this node's monotonic
//! clock. The store counts a node as silent only [`STALE_AFTER`] after it last applied one of
//! its operations (its own clock), which is later than the fence by the margin between the
//! two. Units a silent node holds are never handed to another node (it may have served some of
//! them before it fell silent): they stay counted against the limit until it reports, and are
//! treated as spent when deciding a refusal. A node that reports late (after a pause or a
//! partition) settles them exactly.
//!
//! **Outages.** Under fail-open a node whose store is unreachable serves the units it holds,
//! then — once the store is known to be down, not merely slow
//! ([`LeaseBackend::confirmed_down`]) — at most one more block (1/16 of the limit, at least one
//! call) per subject and outage,
//! counted as `extra` and reported once the store answers; the block is granted again only
//! after that report is acknowledged.
//!
//! **Memory.** A subject that holds and owes nothing is forgotten [`FORGET_AFTER`] after its
//! last call; seen again, it numbers its operations after the highest this node has issued,
//! so the store's record of the node's last number never mistakes them for replays.
//!
//! Time is Tokio's [`Instant`], so tests drive it with a paused clock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use prometheus::IntCounter;
use tokio::sync::Mutex as AsyncMutex;
use tokio::sync::Notify;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::StoreError;
use crate::clock::{Clock, SystemClock};
use crate::events::{self, Crossing};
use crate::locks::{PerKey, lock};
use crate::metrics::{ShardedHistogram, StoreMetrics};
use crate::quota::{Day, LocalAdmission, Period, Reservation, Source};

/// Unused units go back to the store after this long without a call.
pub const IDLE_RETURN: Duration = Duration::from_secs(2);
/// Use is reported at most this often per subject (and with every refill): usage reads lag by
/// about this much, and 10,000 busy keys cost 10,000 store calls a second, not ten times that.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A node stops serving leased units this long after sending the last operation the store
/// answered, until a new one is answered.
pub const FENCE_AFTER: Duration = Duration::from_secs(10);
/// The store counts a node as silent this long after it last applied one of its operations;
/// the 5 s over [`FENCE_AFTER`] cover clock-rate differences and scheduling delays.
pub const STALE_AFTER: Duration = Duration::from_secs(15);
/// How long a call waits for other calls' refills of the same subject before it is told to
/// retry (429, `Retry-After: 1`). Waiting is load, not an outage: it never fails over to the
/// outage policy.
pub const BUSY_WAIT: Duration = Duration::from_secs(2);
/// A subject with nothing held or owed is forgotten after this long without a call, so the
/// book holds the subjects in use, not every one ever seen.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);
/// How long a "used up" answer stands for the calls that queued behind it.
const SPENT_TTL: Duration = Duration::from_secs(1);
/// The block a subject gets before its rate is known, and the floor of the block for a busy
/// one; blocks of a limited subject are also at most 1/16 of what is left, at least one unit.
const BASE_BLOCK: u64 = 1024;
/// The ceiling of a block: about a second of a subject's calls on this node, so a busy
/// subject refills once or twice a second whatever its rate (each refill is a store round
/// trip, and on the embedded store a transaction and an fsync) while a killed node strands
/// about a second of its calls, as many as it may have served unreported.
const MAX_BLOCK: u64 = 65_536;
/// Over how long a subject's rate of calls on this node is measured.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// One operation of this node on one subject and month, as sent to the store.
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
    /// The UTC day (on this node's clock) the calls of `consumed` and `extra` are counted on
    /// in the usage history: the day of the report, a second at most after the calls.
    pub day: Day,
}

/// The store's answer to a [`LeaseOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseAnswer {
    pub grant: u64,
    /// Calls counted for the month.
    pub used: u64,
    /// Calls counted plus units held by all nodes; `None` when the answer is a replay.
    pub committed: Option<u64>,
    /// Units held by other nodes that are not silent: what may still come back.
    pub live_others: u64,
}

/// What this node holds and owes for one subject and month.
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
    /// Used plus held by all nodes, as of the last fresh answer; `None` until one arrives.
    committed: Option<u64>,
    /// Of `committed`, the units live other nodes held then: they may still come back.
    live_others: u64,
    /// Leased units may be served until then.
    confirmed_until: Option<Instant>,
    /// Calls admitted locally during the current outage, not yet acknowledged by the store.
    outage: u64,
    /// Set when the store said the month's quota is used up under `limit`: calls queued
    /// behind that answer (for [`SPENT_TTL`]) are refused without asking again.
    spent: Option<(u64, Instant)>,
    last_use: Instant,
    last_report: Instant,
    /// Thresholds of [`THRESHOLDS`](crate::events::THRESHOLDS) already announced, a bit each.
    announced: u8,
    /// Calls served in the last complete [`RATE_WINDOW`], and so far in the current one.
    rate: u64,
    window_calls: u64,
    /// Calls told to retry (no unit in time) in the last complete window, and so far in the
    /// current one: a crowd that is coming back.
    turned_away: u64,
    window_turned_away: u64,
    window_start: Instant,
}

impl Lease {
    fn new(period: Period, limit: Option<u64>, seq: u64, now: Instant) -> Self {
        Self {
            period,
            limit,
            units: 0,
            consumed: 0,
            returned: 0,
            extra: 0,
            seq,
            parked: None,
            committed: None,
            live_others: 0,
            confirmed_until: None,
            outage: 0,
            spent: None,
            last_use: now,
            last_report: now,
            announced: 0,
            rate: 0,
            window_calls: 0,
            turned_away: 0,
            window_turned_away: 0,
            window_start: now,
        }
    }

    /// Units to ask for: about a second of this subject's calls (at least [`BASE_BLOCK`], at
    /// most [`MAX_BLOCK`]), no more than 1/16 of what is left of a limit, and at least enough
    /// for the calls waiting and those told to retry in the last second. Near a limit the
    /// 1/16 shrinks the blocks, and a crowd larger than a block would need a refill per
    /// block; on a saturated node each refill waits its turn to run, the crowd outwaits
    /// [`BUSY_WAIT`], and counting only the calls still waiting would keep the blocks small.
    fn want(&self, waiting: u64) -> u64 {
        let busy = self.rate.clamp(BASE_BLOCK, MAX_BLOCK);
        let block = match self.limit {
            None => busy,
            Some(limit) => (limit.saturating_sub(self.committed.unwrap_or(0)) / 16).clamp(1, busy),
        };
        block.max((waiting + self.turned_away).min(busy))
    }

    fn confirmed(&self, now: Instant) -> bool {
        self.confirmed_until.is_some_and(|t| now < t)
    }

    fn owes(&self) -> bool {
        self.parked.is_some() || self.consumed != 0 || self.returned > 0 || self.extra > 0
    }

    /// The next operation: the parked one again, or a new one carrying what is owed.
    fn next_op(&mut self, want: u64, now: Instant, day: Day) -> LeaseOp {
        if let Some(op) = self.parked.take() {
            return op;
        }
        self.seq += 1;
        self.last_report = now;
        LeaseOp {
            period: self.period,
            seq: self.seq,
            consumed: std::mem::take(&mut self.consumed),
            returned: std::mem::take(&mut self.returned),
            extra: std::mem::take(&mut self.extra),
            want,
            limit: self.limit,
            day,
        }
    }

    /// Applies the answer to `op`, sent at `sent`: the store applied it at or after that
    /// instant, so the lease is confirmed from then. Returns the thresholds the month's use
    /// has newly reached, as far as this node has announced them.
    fn apply(&mut self, op: &LeaseOp, answer: LeaseAnswer, sent: Instant) -> u8 {
        if op.limit == self.limit {
            self.units += answer.grant;
        } else {
            // The limit changed while the operation was out: units granted under the old
            // one go back, and the next refill asks under the new one.
            self.returned += answer.grant;
        }
        if let Some(c) = answer.committed {
            self.committed = Some(c);
            self.live_others = answer.live_others;
        }
        self.confirmed_until = Some(sent + FENCE_AFTER);
        self.outage = self.outage.saturating_sub(op.extra);
        let reached = op
            .limit
            .map_or(0, |limit| events::reached(answer.used, limit));
        let new = reached & !self.announced;
        self.announced |= new;
        new
    }

    /// A unit from the block when it holds one and is confirmed, or the refusal that stands
    /// for the calls queued behind a "used up" answer; `None` when the store must be asked.
    fn take(&mut self, now: Instant) -> Option<Reservation> {
        if self.units > 0 && self.confirmed(now) {
            return Some(Reservation::Granted {
                used: self.take_unit(now),
            });
        }
        match self.spent {
            Some((used, at)) if self.units == 0 && now - at < SPENT_TTL => {
                Some(Reservation::Denied { used })
            }
            _ => None,
        }
    }

    fn take_unit(&mut self, now: Instant) -> u64 {
        self.units -= 1;
        self.consumed += 1;
        self.last_use = now;
        self.window_calls += 1;
        self.close_window(now);
        self.committed.unwrap_or(0).saturating_sub(self.units)
    }

    /// Notes a call told to retry.
    fn turn_away(&mut self, now: Instant) {
        self.window_turned_away += 1;
        self.close_window(now);
    }

    /// Closes the rate window once it is [`RATE_WINDOW`] old: calls a second over it (a
    /// window left idle for longer counts as the slower rate it was).
    fn close_window(&mut self, now: Instant) {
        if now - self.window_start >= RATE_WINDOW {
            let secs = (now - self.window_start).as_secs_f64();
            self.rate = (self.window_calls as f64 / secs) as u64;
            self.turned_away = (self.window_turned_away as f64 / secs) as u64;
            self.window_calls = 0;
            self.window_turned_away = 0;
            self.window_start = now;
        }
    }
}

/// A subject's leases: the current month's, and earlier ones still owing a report.
#[derive(Debug, Default)]
struct SubjectLeases {
    current: Option<Lease>,
    retired: Vec<Lease>,
    /// Sequence numbers continue across months so a node never reuses one per subject.
    seq: u64,
}

impl SubjectLeases {
    /// A subject holding no lease (new, or forgotten and seen again) numbers its next
    /// operations after `issued`, the node's highest.
    fn start_after(&mut self, issued: u64) {
        if self.current.is_none() && self.retired.is_empty() {
            self.seq = self.seq.max(issued);
        }
    }

    fn lease(&mut self, period: Period, limit: Option<u64>, now: Instant) -> &mut Lease {
        if self.current.as_ref().is_some_and(|l| l.period != period) {
            let mut old = self.current.take().expect("checked");
            old.returned += std::mem::take(&mut old.units);
            self.seq = old.seq;
            self.retired.push(old);
        }
        let seq = self.seq;
        let lease = self
            .current
            .get_or_insert_with(|| Lease::new(period, limit, seq, now));
        if lease.limit != limit {
            // Units leased under another limit go back; the next lease uses the new one.
            lease.returned += std::mem::take(&mut lease.units);
            lease.limit = limit;
            lease.spent = None;
        }
        lease
    }

    fn find(&mut self, period: Period) -> Option<&mut Lease> {
        match &mut self.current {
            Some(l) if l.period == period => Some(l),
            _ => self.retired.iter_mut().find(|l| l.period == period),
        }
    }
}

#[derive(Default)]
struct Entry {
    /// Calls waiting for a refill: a refill asks for at least this many units.
    waiting: AtomicU64,
    /// Refills that failed: a call that waited through one does not queue for its own
    /// timeout (it fails at once if the store is down, else is told to retry); waiting
    /// itself is never a failure.
    failures: AtomicU64,
    /// The leases, under a lock never held across an `.await`: taking a unit is a critical
    /// section of nanoseconds, and an async lock there turns into a convoy under load (a
    /// worker preempted while holding it makes every call queue, and each hand-over then
    /// waits for the next task to be polled).
    leases: Mutex<SubjectLeases>,
    /// Held by the call refilling the subject across its store call, so concurrent calls
    /// that find no units share one refill instead of each asking the store. Only ever
    /// tried, never queued for: see [`LeaseBook::turn`].
    refill: AsyncMutex<()>,
    /// Told when a refill ends: every call waiting for it looks again at once.
    refilled: Notify,
}

/// The refill gate, held: released before the calls waiting are told, so the one of them
/// that refills next finds it free.
struct Refilling<'a> {
    gate: Option<tokio::sync::MutexGuard<'a, ()>>,
    done: &'a Notify,
}

impl Drop for Refilling<'_> {
    fn drop(&mut self) {
        drop(self.gate.take());
        self.done.notify_waiters();
    }
}

/// How a call that found no unit goes on: served (or refused) by what another call's refill
/// brought, or refilling itself.
enum Turn<'a> {
    Done(Result<Reservation, StoreError>),
    Refill(Refilling<'a>),
}

/// Whether a subject holds and owes nothing, has nobody waiting and has not been used for
/// [`FORGET_AFTER`]: forgetting it loses nothing (its next call refills, as after a restart).
fn forgettable(entry: &Entry, leases: &SubjectLeases, now: Instant) -> bool {
    entry.waiting.load(Ordering::Relaxed) == 0
        && leases.retired.is_empty()
        && leases.current.as_ref().is_none_or(|l| {
            l.units == 0 && !l.owes() && l.outage == 0 && now - l.last_use >= FORGET_AFTER
        })
}

/// An operation from [`LeaseBook::due`] (or a top-up from [`LeaseBook::reserve`]), to send
/// and then hand to [`LeaseBook::settled`] (or [`LeaseBook::topped_up`]).
#[derive(Debug, Clone)]
pub struct Due {
    pub subject: String,
    pub op: LeaseOp,
    sent: Instant,
}

/// This node's leases, by subject (a key id).
#[derive(Default)]
pub struct LeaseBook {
    // A Tokio lock per subject, held across the store call that refills it so concurrent
    // calls of one subject share one refill.
    subjects: PerKey<Entry>,
    /// The UTC day new operations are dated with ([`LeaseOp::day`]), set by [`Quota`].
    today: AtomicU32,
    /// The highest sequence number issued for any subject. A subject seen anew (or again,
    /// after it was forgotten) numbers its operations from here, so the store never takes a
    /// new operation for a replay of an old one.
    issued: AtomicU64,
    /// Where thresholds reached are told ([`Quota::with_crossings`]). Every node that sees
    /// one tells it; the outbox keeps one event per subject, month and threshold.
    crossings: Option<mpsc::UnboundedSender<Crossing>>,
}

impl LeaseBook {
    fn today(&self) -> Day {
        Day(self.today.load(Ordering::Relaxed))
    }

    pub fn set_today(&self, day: Day) {
        // Called on every call: a load first, so the line is written once a day, not bounced
        // between cores on every call.
        if self.today.load(Ordering::Relaxed) != day.0 {
            self.today.store(day.0, Ordering::Relaxed);
        }
    }

    fn entry(&self, subject: &str) -> Arc<Entry> {
        self.subjects.get_or_default(subject)
    }

    /// The lease of `period`, for a subject numbered from [`Self::issued`] if it is new.
    fn lease<'a>(
        &self,
        leases: &'a mut SubjectLeases,
        period: Period,
        limit: Option<u64>,
        now: Instant,
    ) -> &'a mut Lease {
        leases.start_after(self.issued.load(Ordering::Relaxed));
        leases.lease(period, limit, now)
    }

    /// The next operation of `lease`, counted in [`Self::issued`].
    fn next_op(&self, lease: &mut Lease, want: u64, now: Instant) -> LeaseOp {
        let op = lease.next_op(want, now, self.today());
        self.issued.fetch_max(op.seq, Ordering::Relaxed);
        op
    }

    /// Applies a fresh answer to `lease` of `subject` and tells the thresholds it reached.
    fn apply(
        &self,
        subject: &str,
        lease: &mut Lease,
        op: &LeaseOp,
        answer: LeaseAnswer,
        sent: Instant,
    ) {
        let new = lease.apply(op, answer, sent);
        let (Some(sink), Some(limit)) = (&self.crossings, op.limit) else {
            return;
        };
        for (i, threshold) in events::THRESHOLDS.iter().enumerate() {
            if new & (1 << i) != 0 {
                let _ = sink.send(Crossing {
                    subject: subject.to_string(),
                    period: op.period,
                    threshold: *threshold,
                    used: answer.used,
                    limit,
                });
            }
        }
    }

    /// Subjects the book holds.
    pub fn len(&self) -> usize {
        self.subjects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes one unit, refilling from the store through `run` when none is left or the lease
    /// needs confirming. `run` gets the operation and its deadline (`timeout` from sending).
    /// A store failure is an `Err` (the caller applies the outage policy); waiting longer
    /// than [`BUSY_WAIT`] for another call's refill is [`Reservation::Held`]. A call that
    /// waited through another call's failed refill fails at once when `down()` says the store
    /// is down, and is told to retry ([`Reservation::Held`]) when it was only slow: on a
    /// saturated node one late answer must not fail every call queued behind it.
    ///
    /// With a unit taken from a block running low comes an operation topping it up: the
    /// caller sends it without holding up its call (which is answered at once, so a node
    /// killed meanwhile has not counted a call it never answered) and hands the outcome to
    /// [`Self::topped_up`].
    pub async fn reserve<F, Fut>(
        &self,
        subject: &str,
        period: Period,
        limit: Option<u64>,
        timeout: Duration,
        run: F,
        down: impl Fn() -> bool,
    ) -> Result<(Reservation, Option<Due>), StoreError>
    where
        F: Fn(LeaseOp, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<LeaseAnswer, StoreError>>,
    {
        let entry = self.entry(subject);
        let failures = entry.failures.load(Ordering::Acquire);
        let taken = {
            let mut leases = lock(&entry.leases);
            // Read under the lock: a call held up before it must not judge the fence by the
            // time it had before the wait.
            let now = Instant::now();
            let lease = self.lease(&mut leases, period, limit, now);
            lease.take(now).map(|reservation| {
                // Running low: top the block up now, so the calls behind this one keep being
                // served from what is left instead of waiting for the store (on the embedded
                // store, for an fsync).
                let want = lease.want(0);
                let low = matches!(reservation, Reservation::Granted { .. })
                    && lease.parked.is_none()
                    && lease.units < want / 2;
                let top_up = low.then(|| Due {
                    subject: subject.to_string(),
                    op: self.park_next(lease, want, now),
                    // Confirming from before it is sent: never later than the store applies it.
                    sent: now,
                });
                (reservation, top_up)
            })
        };
        if let Some(taken) = taken {
            return Ok(taken);
        }
        let reservation = self
            .refill(&entry, subject, period, limit, failures, timeout, run, down)
            .await?;
        if reservation == Reservation::Held
            && let Some(lease) = lock(&entry.leases).find(period)
        {
            lease.turn_away(Instant::now());
        }
        Ok((reservation, None))
    }

    /// [`Self::reserve`] when no unit could be taken: one call refills, the others wait for it
    /// and take from its grant.
    #[allow(clippy::too_many_arguments)]
    async fn refill<F, Fut>(
        &self,
        entry: &Entry,
        subject: &str,
        period: Period,
        limit: Option<u64>,
        failures: u64,
        timeout: Duration,
        run: F,
        down: impl Fn() -> bool,
    ) -> Result<Reservation, StoreError>
    where
        F: Fn(LeaseOp, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<LeaseAnswer, StoreError>>,
    {
        entry.waiting.fetch_add(1, Ordering::Relaxed);
        let turn =
            tokio::time::timeout(BUSY_WAIT, self.turn(entry, period, limit, failures, &down)).await;
        entry.waiting.fetch_sub(1, Ordering::Relaxed);
        let _refilling = match turn {
            Err(_) => return Ok(Reservation::Held),
            Ok(Turn::Done(result)) => return result,
            Ok(Turn::Refill(refilling)) => refilling,
        };
        // A parked operation may answer with units (a replay); a second round asks for more.
        for _ in 0..2 {
            let op = {
                let mut leases = lock(&entry.leases);
                let now = Instant::now();
                let lease = self.lease(&mut leases, period, limit, now);
                if let Some(reservation) = lease.take(now) {
                    return Ok(reservation);
                }
                let want = lease.want(entry.waiting.load(Ordering::Relaxed));
                self.park_next(lease, want, now)
            };
            let sent = Instant::now();
            let answer = match run(op.clone(), sent + timeout).await {
                Ok(answer) => answer,
                Err(e) => {
                    entry.failures.fetch_add(1, Ordering::Release);
                    return Err(e);
                }
            };
            // Applied and taken under one lock: a unit granted to this call is not left for
            // another worker's call to take before this one looks.
            let mut leases = lock(&entry.leases);
            self.settle_in(&mut leases, subject, &op, sent, Some(answer));
            let Some(lease) = leases.find(period) else {
                return Ok(Reservation::Held);
            };
            let now = Instant::now();
            if lease.units > 0 && lease.confirmed(now) {
                return Ok(Reservation::Granted {
                    used: lease.take_unit(now),
                });
            }
            if lease.limit != op.limit {
                // The key's limit changed while the refill was out: its grant went back, and
                // the next call asks under the new limit.
                return Ok(Reservation::Held);
            }
            // Only an answer that granted nothing though units were asked for says the month
            // may be used up. Units granted and already gone went to calls that arrived while
            // the answer came back by another path (a top-up or a sync sending the same
            // operation): the next round asks again.
            if let (Some(committed), true, 0) = (answer.committed, op.want > 0, answer.grant) {
                // The limit is used up unless live nodes hold units that may come back. Units
                // of silent nodes count as spent.
                if limit.is_some() && answer.live_others > 0 {
                    return Ok(Reservation::Held);
                }
                let used = committed - answer.live_others;
                lease.spent = Some((used, now));
                return Ok(Reservation::Denied { used });
            }
        }
        Ok(Reservation::Held)
    }

    /// Waits until a unit can be taken or this call's turn to refill has come. Every call
    /// waiting for a refill looks again as soon as it ends, rather than queueing for the gate
    /// to take a unit under it one by one: with thousands of calls on one key, each hand-over
    /// of a queued lock waits for the next task to be polled behind all the others, and the
    /// queue outlasts [`BUSY_WAIT`]. A call that waited through a refill that failed does not
    /// try its own (see [`Self::reserve`]).
    async fn turn<'a>(
        &self,
        entry: &'a Entry,
        period: Period,
        limit: Option<u64>,
        failures: u64,
        down: &impl Fn() -> bool,
    ) -> Turn<'a> {
        loop {
            // Registered before looking, so a refill ending meanwhile is not missed.
            let refilled = entry.refilled.notified();
            tokio::pin!(refilled);
            refilled.as_mut().enable();
            {
                let mut leases = lock(&entry.leases);
                let now = Instant::now();
                if let Some(reservation) = self.lease(&mut leases, period, limit, now).take(now) {
                    return Turn::Done(Ok(reservation));
                }
            }
            if entry.failures.load(Ordering::Acquire) != failures {
                return Turn::Done(match down() {
                    false => Ok(Reservation::Held),
                    true => Err(StoreError(
                        "the store failed a refill this call waited for".into(),
                    )),
                });
            }
            if let Ok(gate) = entry.refill.try_lock() {
                return Turn::Refill(Refilling {
                    gate: Some(gate),
                    done: &entry.refilled,
                });
            }
            refilled.await;
        }
    }

    /// The next operation of `lease`, parked before it is sent: if the call sending it is
    /// abandoned midway, the operation is replayed later rather than lost.
    fn park_next(&self, lease: &mut Lease, want: u64, now: Instant) -> LeaseOp {
        let op = self.next_op(lease, want, now);
        lease.parked = Some(op.clone());
        op
    }

    /// Applies the outcome of `op` of `subject`, sent at `sent`, if it is still the parked
    /// operation: the first answer to an operation (a refill's or a sync's replay of it)
    /// applies its grant, exactly once.
    fn settle(
        &self,
        entry: &Entry,
        subject: &str,
        op: &LeaseOp,
        sent: Instant,
        answer: Option<LeaseAnswer>,
    ) {
        self.settle_in(&mut lock(&entry.leases), subject, op, sent, answer);
    }

    /// [`Self::settle`] with the subject's leases already locked.
    fn settle_in(
        &self,
        leases: &mut SubjectLeases,
        subject: &str,
        op: &LeaseOp,
        sent: Instant,
        answer: Option<LeaseAnswer>,
    ) {
        let Some(lease) = leases.find(op.period) else {
            return;
        };
        if lease.parked.as_ref() != Some(op) {
            return;
        }
        if let Some(answer) = answer {
            lease.parked = None;
            self.apply(subject, lease, op, answer, sent);
        }
    }

    /// Admits a call while the store is unreachable (fail-open): from units this node holds
    /// (already counted), else — when `beyond_held` — from the one block an outage allows.
    pub fn admit_local(
        &self,
        subject: &str,
        period: Period,
        limit: Option<u64>,
        beyond_held: bool,
    ) -> LocalAdmission {
        let entry = self.entry(subject);
        let mut leases = lock(&entry.leases);
        let now = Instant::now();
        let lease = self.lease(&mut leases, period, limit, now);
        if lease.units > 0 {
            return LocalAdmission::Admitted {
                used: lease.take_unit(now),
                source: Source::Lease,
            };
        }
        if !beyond_held {
            return LocalAdmission::Refused;
        }
        let seen = lease.committed.unwrap_or(0) + lease.outage;
        match limit {
            Some(_) if lease.committed.is_none() => return LocalAdmission::Refused,
            Some(limit) if seen >= limit => {
                // Admission stops at what was committed, but the month is over only if it is
                // without the units live nodes held (they may come back) and those this node
                // is giving back (not yet in `committed`'s answer).
                let giving_back =
                    lease.returned + lease.parked.as_ref().map_or(0, |op| op.returned);
                let spent = seen.saturating_sub(lease.live_others + giving_back);
                return match spent >= limit {
                    true => LocalAdmission::Exhausted { used: spent },
                    false => LocalAdmission::Refused,
                };
            }
            Some(limit) if lease.outage >= (limit / 16).max(1) => return LocalAdmission::Refused,
            _ => {}
        }
        lease.extra += 1;
        lease.outage += 1;
        lease.last_use = now;
        LocalAdmission::Admitted {
            used: seen + 1,
            source: Source::Local,
        }
    }

    /// Gives a unit back for a call that failed after taking it.
    pub fn refund(&self, subject: &str, period: Period, source: Source) {
        let entry = self.entry(subject);
        let mut leases = lock(&entry.leases);
        let current = leases.current.as_ref().is_some_and(|l| l.period == period);
        if leases.find(period).is_none() {
            // A past month whose lease was already settled and dropped: a new one carries
            // the refund (its sequence numbers continue past the old one's).
            leases.start_after(self.issued.load(Ordering::Relaxed));
            let lease = Lease::new(period, None, leases.seq, Instant::now());
            leases.retired.push(lease);
        }
        let Some(lease) = leases.find(period) else {
            return;
        };
        lease.spent = None;
        match source {
            Source::Lease => {
                lease.consumed -= 1;
                // Back into this month's block, or back to the store for a past month.
                if current {
                    lease.units += 1;
                } else {
                    lease.returned += 1;
                }
            }
            Source::Local => {
                lease.extra = lease.extra.saturating_sub(1);
                lease.outage = lease.outage.saturating_sub(1);
            }
        }
    }

    /// Operations to send now: reports of what was used (every [`REPORT_EVERY`]), units idle
    /// for [`IDLE_RETURN`] (or everything, with `all`), replays of parked operations. Each is
    /// parked until [`Self::settled`] so a failure is replayed.
    pub fn due(&self, all: bool) -> Vec<Due> {
        let subjects = self.subjects.all();
        let now = Instant::now();
        let mut ops = Vec::new();
        let mut idle = Vec::new();
        // Runs every tick over every subject: no allocation for those with nothing to send.
        for (subject, entry) in subjects.iter() {
            // A subject busy refilling reports with that refill.
            if entry.refill.try_lock().is_err() {
                continue;
            }
            let mut leases = lock(&entry.leases);
            let SubjectLeases {
                current, retired, ..
            } = &mut *leases;
            for lease in current.iter_mut().chain(retired.iter_mut()) {
                if lease.units > 0 && (all || now - lease.last_use >= IDLE_RETURN) {
                    lease.returned += std::mem::take(&mut lease.units);
                }
                let report_due = all
                    || lease.parked.is_some()
                    || lease.returned > 0
                    || now - lease.last_report >= REPORT_EVERY;
                if lease.owes() && report_due {
                    let op = self.next_op(lease, 0, now);
                    lease.parked = Some(op.clone());
                    ops.push(Due {
                        subject: subject.clone(),
                        op,
                        sent: now,
                    });
                }
            }
            if !leases.retired.is_empty() {
                leases.retired.retain(|l| l.owes() || l.units > 0);
            }
            if forgettable(entry, &leases, now) {
                idle.push(subject.clone());
            }
        }
        drop(subjects);
        if !idle.is_empty() {
            // Checked again under the map's write lock: a call that got the entry since holds
            // a reference to it, and keeps it.
            self.subjects.remove_if(&idle, |entry| {
                Arc::strong_count(entry) == 1 && forgettable(entry, &lock(&entry.leases), now)
            });
        }
        ops
    }

    /// Applies the outcome of an operation from [`Self::due`]: the first to answer a parked
    /// operation applies its grant, exactly once.
    pub fn settled(&self, due: Due, answer: Option<LeaseAnswer>) {
        let entry = self.entry(&due.subject);
        self.settle(&entry, &due.subject, &due.op, due.sent, answer);
    }

    /// Applies the outcome of a top-up from [`Self::reserve`]. A failure counts as a failed
    /// refill for the calls waiting meanwhile.
    pub fn topped_up(&self, due: Due, result: Result<LeaseAnswer, StoreError>) {
        let entry = self.entry(&due.subject);
        if result.is_err() {
            entry.failures.fetch_add(1, Ordering::Release);
        }
        self.settle(&entry, &due.subject, &due.op, due.sent, result.ok());
    }

    /// Calls this node served in `period` and has not reported yet (an operation in flight
    /// excluded: it may or may not have been applied). Added to usage reads so a node's own
    /// calls show at once.
    pub fn unreported(&self, subject: &str, period: Period) -> u64 {
        let Some(entry) = self.subjects.get(subject) else {
            return 0;
        };
        lock(&entry.leases)
            .find(period)
            .map_or(0, |l| (l.consumed + l.extra as i64).max(0) as u64)
    }

    /// Whether anything is owed to the store or held from it.
    pub fn unsynced(&self) -> bool {
        let subjects = self.subjects.all();
        subjects.values().any(|entry| {
            let leases = lock(&entry.leases);
            leases
                .current
                .iter()
                .chain(leases.retired.iter())
                .any(|l| l.owes() || l.units > 0)
        })
    }
}

/// What a store does for the leases: apply this node's operations atomically, read usage.
#[async_trait]
pub trait LeaseBackend: Send + Sync + 'static {
    /// Applies one operation of this node on `subject`, answering by `until`.
    async fn apply(
        &self,
        subject: &str,
        op: &LeaseOp,
        until: Instant,
    ) -> Result<LeaseAnswer, StoreError>;
    /// Applies the operations of one sync; per operation its answer, `None` where it failed.
    async fn apply_all(&self, ops: &[Due]) -> Vec<Option<LeaseAnswer>>;
    /// Calls reported for `subject` in `period`.
    async fn used(&self, subject: &str, period: Period) -> Result<u64, StoreError>;
    /// Calls reported for `subject` on each day from `from` to `to` (both included; days
    /// without calls may be left out).
    async fn days(&self, subject: &str, from: Day, to: Day) -> Result<Vec<(Day, u64)>, StoreError>;
    /// Adds `calls` to each subject's count of `day` in the usage history, outside any
    /// month's quota: the per-key history of keys inside an account.
    async fn count_days(&self, day: Day, calls: &[(String, u64)]) -> Result<(), StoreError>;
    /// The bound on a refill made while a call waits.
    fn timeout(&self) -> Duration;
    /// Housekeeping once per sync.
    async fn upkeep(&self) {}
    /// Whether the store is known to be unreachable (several calls in a row failed), rather
    /// than one call having been slow. Fail-open admits beyond held units only then.
    fn confirmed_down(&self) -> bool {
        true
    }
}

/// A node's quota counting: its lease book over a store's [`LeaseBackend`]. The one place
/// the request path, the admin API and the background sync meet the leases.
pub struct Quota {
    /// Shared with the top-ups sent in the background.
    book: Arc<LeaseBook>,
    backend: Arc<dyn LeaseBackend>,
    /// Dates the usage history.
    clock: Arc<dyn Clock>,
    /// The `reserve` series of the store metrics, resolved once (every call updates them).
    reserve_latency: Arc<ShardedHistogram>,
    reserve_errors: IntCounter,
}

impl Quota {
    pub fn new(backend: Arc<dyn LeaseBackend>, metrics: StoreMetrics) -> Self {
        Self {
            book: Arc::default(),
            backend,
            clock: Arc::new(SystemClock),
            reserve_latency: metrics.reserve_latency.clone(),
            reserve_errors: metrics.errors.with_label_values(&["reserve"]),
        }
    }

    /// Tells `sink` of every threshold of a monthly limit this node sees reached (SPEC §9
    /// `quota.threshold`), once per subject and month while the node remembers the subject.
    pub fn with_crossings(mut self, sink: mpsc::UnboundedSender<Crossing>) -> Self {
        Arc::get_mut(&mut self.book)
            .expect("set up before any call shares the book")
            .crossings = Some(sink);
        self
    }

    /// Dates the usage history by `clock` (the system clock by default).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Calls of `subject` per UTC day from `from` to `to`, every day listed (zero when none),
    /// as reported by the nodes so far (within a second or so of the calls).
    pub async fn history(
        &self,
        subject: &str,
        from: Day,
        to: Day,
    ) -> Result<Vec<(Day, u64)>, StoreError> {
        let counted: std::collections::HashMap<Day, u64> = self
            .backend
            .days(subject, from, to)
            .await?
            .into_iter()
            .collect();
        Ok((from.0..=to.0)
            .map(|d| (Day(d), counted.get(&Day(d)).copied().unwrap_or(0)))
            .collect())
    }

    /// Counts one call for `subject` in `period` unless `limit` is reached. An `Err` means the
    /// store could not be reached (the caller applies the outage policy), never contention.
    pub async fn reserve(
        &self,
        subject: &str,
        period: Period,
        limit: Option<u64>,
    ) -> Result<Reservation, StoreError> {
        let started = std::time::Instant::now();
        self.book.set_today(Day::containing(self.clock.now()));
        let backend = &self.backend;
        let timeout = backend.timeout();
        let result = self
            .book
            .reserve(
                subject,
                period,
                limit,
                timeout,
                |op, until| async move { backend.apply(subject, &op, until).await },
                || backend.confirmed_down(),
            )
            .await;
        self.reserve_latency
            .observe(started.elapsed().as_secs_f64());
        let (reservation, top_up) = result.inspect_err(|_| self.reserve_errors.inc())?;
        if let Some(due) = top_up {
            let (book, backend) = (self.book.clone(), self.backend.clone());
            tokio::spawn(async move {
                let result = backend
                    .apply(&due.subject, &due.op, due.sent + timeout)
                    .await;
                book.topped_up(due, result);
            });
        }
        Ok(reservation)
    }

    /// Admits a call without the store, after [`Self::reserve`] failed, under the fail-open
    /// policy's bound (SPEC §4a.3). Beyond the units this node holds, only once the store is
    /// confirmed unreachable: one slow answer on a busy machine is load, not an outage, and
    /// must not admit a block the store never granted.
    pub fn admit_local(&self, subject: &str, period: Period, limit: Option<u64>) -> LocalAdmission {
        let down = self.backend.confirmed_down();
        self.book.admit_local(subject, period, limit, down)
    }

    /// Gives back one unit taken in `period` from `source` (the call failed afterwards).
    pub fn refund(&self, subject: &str, period: Period, source: Source) {
        self.book.refund(subject, period, source)
    }

    /// Calls counted for `subject` in `period`: what the store has, plus what this node has
    /// served and not reported yet, so a node's own calls show at once.
    pub async fn usage(&self, subject: &str, period: Period) -> Result<u64, StoreError> {
        Ok(self.backend.used(subject, period).await? + self.book.unreported(subject, period))
    }

    /// Adds calls to subjects' history of `day` outside any quota (see
    /// [`LeaseBackend::count_days`]).
    pub async fn count_days(&self, day: Day, calls: &[(String, u64)]) -> Result<(), StoreError> {
        self.backend.count_days(day, calls).await
    }

    /// Today on this node's clock.
    pub fn today(&self) -> Day {
        Day::containing(self.clock.now())
    }

    /// Reports use and gives back idle units (`all`: everything held, before exit). Called a
    /// few times a second.
    pub async fn sync(&self, all: bool) {
        self.book.set_today(Day::containing(self.clock.now()));
        self.backend.upkeep().await;
        let due = self.book.due(all);
        if due.is_empty() {
            return;
        }
        let answers = self.backend.apply_all(&due).await;
        for (due, answer) in due.into_iter().zip(answers) {
            self.book.settled(due, answer);
        }
    }

    /// Whether [`Self::sync`] still has something to send or give back.
    pub fn unsynced(&self) -> bool {
        self.book.unsynced()
    }
}

#[cfg(test)]
mod tests;
