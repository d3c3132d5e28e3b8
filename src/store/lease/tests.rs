//! The lease protocol against a model of the store's script, one node at a time and as a
//! deterministic simulation of several nodes under faults (proptest picks the schedules).

use super::*;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use proptest::prelude::*;

const NOV: Period = Period {
    year: 2026,
    month: 11,
};

/// What the store keeps per node for one subject and month.
#[derive(Default, Clone)]
struct NodeState {
    held: i64,
    seq: u64,
    last: u64,
    at: Option<Instant>,
}

/// The lease script of the Redis and embedded stores, for one subject and month, in memory.
#[derive(Default)]
struct ModelStore {
    used: Mutex<i64>,
    nodes: Mutex<HashMap<usize, NodeState>>,
    calls: AtomicU64,
    /// Per node, when the store granted nothing of what it asked for, and whether the month
    /// was used up for it then: the calls counted and the units held by itself and by silent
    /// nodes reached the limit (units of live nodes may still come back).
    verdicts: Mutex<HashMap<usize, Vec<(Instant, bool)>>>,
}

impl ModelStore {
    fn apply(&self, node: usize, op: &LeaseOp) -> LeaseAnswer {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut used = self.used.lock().unwrap();
        let mut nodes = self.nodes.lock().unwrap();
        let me = nodes.entry(node).or_default();
        if op.seq <= me.seq {
            me.at = Some(now);
            return LeaseAnswer {
                grant: me.last,
                used: *used as u64,
                committed: None,
                live_others: 0,
            };
        }
        *used = (*used + op.consumed + op.extra as i64).max(0);
        me.held = (me.held - op.consumed - op.returned as i64).max(0);
        let mine = me.held;
        let (mut held, mut live) = (mine, 0);
        for (&other, state) in nodes.iter() {
            if other == node {
                continue;
            }
            held += state.held;
            let silent = state.at.is_none_or(|at| now - at > STALE_AFTER);
            if !silent {
                live += state.held;
            }
        }
        let grant = match op.limit {
            None => op.want,
            Some(l) => op.want.min((l as i64 - *used - held).max(0) as u64),
        };
        if let (Some(l), true, 0) = (op.limit, op.want > 0, grant) {
            let used_up = *used + held - live >= l as i64;
            let mut verdicts = self.verdicts.lock().unwrap();
            verdicts.entry(node).or_default().push((now, used_up));
        }
        let me = nodes.get_mut(&node).expect("inserted");
        me.held += grant as i64;
        me.seq = op.seq;
        me.last = grant;
        me.at = Some(now);
        LeaseAnswer {
            grant,
            used: *used as u64,
            committed: Some((*used + held) as u64 + grant),
            live_others: live as u64,
        }
    }

    fn used(&self) -> u64 {
        *self.used.lock().unwrap() as u64
    }

    fn held(&self) -> i64 {
        self.nodes.lock().unwrap().values().map(|s| s.held).sum()
    }
}

async fn reserve(book: &LeaseBook, store: &ModelStore, limit: Option<u64>) -> Reservation {
    reserve_on(0, book, store, limit).await
}

/// A call on node `node`, whose book is `book`.
async fn reserve_on(
    node: usize,
    book: &LeaseBook,
    store: &ModelStore,
    limit: Option<u64>,
) -> Reservation {
    let run = |op: LeaseOp, _| {
        let answer = store.apply(node, &op);
        async move { Ok(answer) }
    };
    let (reservation, top_up) = book
        .reserve("k", NOV, limit, Duration::from_secs(1), run, || true)
        .await
        .unwrap();
    send_top_up(node, book, store, top_up);
    reservation
}

/// A call whose refill the store answers after `delay`.
async fn reserve_slowly(
    book: &LeaseBook,
    store: &ModelStore,
    limit: u64,
    delay: Duration,
) -> Reservation {
    let run = |op: LeaseOp, _| async move {
        tokio::time::sleep(delay).await;
        Ok(store.apply(0, &op))
    };
    let (reservation, top_up) = book
        .reserve("k", NOV, Some(limit), Duration::from_secs(1), run, || true)
        .await
        .unwrap();
    send_top_up(0, book, store, top_up);
    reservation
}

/// Sends the top-up a call of node `node` handed back, answered at once.
fn send_top_up(node: usize, book: &LeaseBook, store: &ModelStore, top_up: Option<Due>) {
    if let Some(due) = top_up {
        let answer = store.apply(node, &due.op);
        book.topped_up(due, Ok(answer));
    }
}

async fn sync(book: &LeaseBook, store: &ModelStore, all: bool) {
    for due in book.due(all) {
        let answer = store.apply(0, &due.op);
        book.settled(due, Some(answer));
    }
}

#[tokio::test(start_paused = true)]
async fn never_grants_past_the_limit_and_reports_exactly() {
    let book = LeaseBook::default();
    let store = ModelStore::default();
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
    assert_eq!(store.used(), 100);
    assert_eq!(store.held(), 0, "nothing left held");
    assert!(!book.unsynced());
}

/// An idle subject is forgotten, and when it is used again its operations are numbered past
/// every earlier one: the store applies them instead of answering them as replays.
#[tokio::test(start_paused = true)]
async fn idle_subjects_are_forgotten_and_numbered_past_their_old_operations() {
    let book = LeaseBook::default();
    let store = ModelStore::default();
    for _ in 0..5 {
        assert!(matches!(
            reserve(&book, &store, Some(100)).await,
            Reservation::Granted { .. }
        ));
    }
    sync(&book, &store, true).await;
    assert_eq!(store.used(), 5);
    assert_eq!(book.len(), 1, "kept while recently used");
    tokio::time::advance(FORGET_AFTER).await;
    sync(&book, &store, false).await;
    assert_eq!(book.len(), 0, "forgotten once idle");
    for _ in 0..3 {
        assert!(matches!(
            reserve(&book, &store, Some(100)).await,
            Reservation::Granted { .. }
        ));
    }
    sync(&book, &store, true).await;
    assert_eq!(
        store.used(),
        8,
        "the new operations counted, not taken for replays"
    );
    assert_eq!(store.held(), 0);
}

#[tokio::test(start_paused = true)]
async fn refunds_and_idle_units_go_back() {
    let book = LeaseBook::default();
    let store = ModelStore::default();
    assert!(matches!(
        reserve(&book, &store, None).await,
        Reservation::Granted { used: 1 }
    ));
    book.refund("k", NOV, Source::Lease);
    // Not yet idle: nothing is due but nothing is owed either.
    tokio::time::advance(IDLE_RETURN).await;
    sync(&book, &store, false).await;
    assert_eq!((store.used(), store.held()), (0, 0));
    assert!(!book.unsynced());
}

#[tokio::test(start_paused = true)]
async fn a_lost_answer_is_replayed_not_repeated() {
    let book = LeaseBook::default();
    let store = ModelStore::default();
    for _ in 0..3 {
        reserve(&book, &store, None).await;
    }
    // The report is applied by the store but its answer is lost.
    let ops = book.due(true);
    assert_eq!(ops.len(), 1);
    store.apply(0, &ops[0].op);
    book.settled(ops[0].clone(), None);
    assert!(book.unsynced());
    // The replay changes nothing more.
    sync(&book, &store, true).await;
    assert_eq!((store.used(), store.held()), (3, 0));
}

#[tokio::test(start_paused = true)]
async fn a_lease_not_confirmed_for_the_fence_time_is_not_served() {
    let book = LeaseBook::default();
    let store = ModelStore::default();
    assert!(matches!(
        reserve(&book, &store, Some(1000)).await,
        Reservation::Granted { .. }
    ));
    // Keep using it so nothing goes back idle, but let the store never answer.
    tokio::time::advance(FENCE_AFTER).await;
    let unreachable = book
        .reserve(
            "k",
            NOV,
            Some(1000),
            Duration::from_secs(1),
            |_, _| async { Err(StoreError("partitioned".into())) },
            || true,
        )
        .await;
    assert!(unreachable.is_err(), "a fenced lease needs the store");
    // Once the store answers, the held units serve again.
    let before = store.calls.load(Ordering::Relaxed);
    assert!(matches!(
        reserve(&book, &store, Some(1000)).await,
        Reservation::Granted { .. }
    ));
    assert!(store.calls.load(Ordering::Relaxed) > before);
}

#[tokio::test(start_paused = true)]
async fn fail_open_admits_one_block_per_outage() {
    let book = LeaseBook::default();
    let store = ModelStore::default();
    // Never seen: refused.
    assert_eq!(
        book.admit_local("k", NOV, Some(160), true),
        LocalAdmission::Refused
    );
    // Seen, then the store goes away with the node holding nothing.
    for _ in 0..150 {
        reserve(&book, &store, Some(160)).await;
    }
    sync(&book, &store, true).await;
    let mut admitted = 0;
    for _ in 0..100 {
        if let LocalAdmission::Admitted { .. } = book.admit_local("k", NOV, Some(160), true) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "one block: 160 / 16");
    // The store answers again: the outage is reported, and only then another block.
    sync(&book, &store, true).await;
    assert_eq!(store.used(), 160);
    assert_eq!(
        book.admit_local("k", NOV, Some(160), true),
        LocalAdmission::Exhausted { used: 160 }
    );
}

/// In an outage, units a live node held at the last answer may still come back: running
/// out of what was committed is then a 503, not a month used up (SPEC §4a.7).
#[tokio::test(start_paused = true)]
async fn an_outage_refuses_with_503_while_live_nodes_hold_units() {
    let (a, b) = (LeaseBook::default(), LeaseBook::default());
    let store = ModelStore::default();
    // Node B, live, holds a block; node A takes the rest.
    assert!(matches!(
        reserve_on(1, &b, &store, Some(160)).await,
        Reservation::Granted { used: 1 }
    ));
    let mut a_served = 0;
    while let Reservation::Granted { .. } = reserve(&a, &store, Some(160)).await {
        a_served += 1;
    }
    // (B's block, one of it served, is all held as far as the store knows.)
    let b_block = store.nodes.lock().unwrap()[&1].held as u64;
    assert_eq!(a_served + b_block, 160);
    // The store goes away: what A holds (nothing) and the committed total admit nothing more,
    // and B's units may come back, so the answer is "unavailable".
    assert_eq!(
        a.admit_local("k", NOV, Some(160), true),
        LocalAdmission::Refused
    );
    // B serves its block, and A hears so before the next outage: the month is over.
    for _ in 1..b_block {
        assert!(matches!(
            reserve_on(1, &b, &store, Some(160)).await,
            Reservation::Granted { .. }
        ));
    }
    for due in b.due(true) {
        let answer = store.apply(1, &due.op);
        b.settled(due, Some(answer));
    }
    assert!(matches!(
        reserve(&a, &store, Some(160)).await,
        Reservation::Denied { used: 160 }
    ));
    assert_eq!(
        a.admit_local("k", NOV, Some(160), true),
        LocalAdmission::Exhausted { used: 160 }
    );
}

/// One refill too slow to answer in time: its caller sees the failure; the calls queued
/// behind it are told to retry while the store is not known to be down, and fail with it
/// when it is.
async fn behind_a_slow_refill(store_down: bool) -> (usize, usize, usize) {
    let book = Arc::new(LeaseBook::default());
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let book = book.clone();
            tokio::spawn(async move {
                let run = move |_: LeaseOp, _| async move {
                    if i == 0 {
                        tokio::time::sleep(Duration::from_millis(60)).await;
                    }
                    Err(StoreError("no answer in time".into()))
                };
                book.reserve("k", NOV, Some(300), Duration::from_millis(50), run, || {
                    store_down
                })
                .await
                .map(|(reservation, _)| reservation)
            })
        })
        .collect();
    let (mut failed, mut held, mut other) = (0, 0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Err(_) => failed += 1,
            Ok(Reservation::Held) => held += 1,
            Ok(_) => other += 1,
        }
    }
    (failed, held, other)
}

#[tokio::test(start_paused = true)]
async fn calls_behind_a_slow_refill_retry_unless_the_store_is_down() {
    assert_eq!(behind_a_slow_refill(false).await, (1, 19, 0));
    assert_eq!(behind_a_slow_refill(true).await, (20, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn concurrent_callers_share_one_refill() {
    let book = Arc::new(LeaseBook::default());
    let store = Arc::new(ModelStore::default());
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let (book, store) = (book.clone(), store.clone());
            // A store that takes a while: every caller queues behind the refill.
            tokio::spawn(async move {
                reserve_slowly(&book, &store, 300, Duration::from_millis(5)).await
            })
        })
        .collect();
    let mut granted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Reservation::Granted { .. } => granted += 1,
            Reservation::Denied { .. } => {}
            Reservation::Held => panic!("load alone must not refuse"),
        }
    }
    assert_eq!(granted, 300);
    assert!(
        store.calls.load(Ordering::Relaxed) < 40,
        "{:?}",
        store.calls
    );
}

/// A refill whose grant reaches the lease first by another path (a top-up or a sync sending
/// the same operation) and is taken by calls arriving meanwhile: the refilling call finds no
/// unit, but the store granted some, so the month is not used up. It asks again; it must not
/// answer `QUOTA_EXCEEDED` (a failover test caught it refusing 12 units short of the limit,
/// on a busy machine where the unit went to another worker thread's call).
#[tokio::test(start_paused = true)]
async fn a_grant_taken_by_other_calls_is_not_a_used_up_month() {
    let book = LeaseBook::default();
    let store = ModelStore::default();
    // Limit 3: blocks of one unit, so the refill's whole grant can go to another call.
    assert!(matches!(
        reserve(&book, &store, Some(3)).await,
        Reservation::Granted { used: 1 }
    ));
    let raced = AtomicBool::new(false);
    let run = |op: LeaseOp, _| {
        let (book, store, raced) = (&book, &store, &raced);
        async move {
            let answer = store.apply(0, &op);
            if !raced.swap(true, Ordering::Relaxed) {
                // The same operation's answer arrives first by another path and is applied...
                let due = Due {
                    subject: "k".into(),
                    op: op.clone(),
                    sent: Instant::now(),
                };
                book.settled(due, Some(answer));
                // ...and a call arriving meanwhile takes the unit it granted.
                assert!(matches!(
                    reserve(book, store, Some(3)).await,
                    Reservation::Granted { used: 2 }
                ));
            }
            Ok(answer)
        }
    };
    let (reservation, _) = book
        .reserve("k", NOV, Some(3), Duration::from_secs(1), run, || true)
        .await
        .unwrap();
    assert!(
        matches!(reservation, Reservation::Granted { used: 3 }),
        "{reservation:?}"
    );
    sync(&book, &store, true).await;
    assert_eq!((store.used(), store.held()), (3, 0));
}

/// Near a limit blocks shrink to 1/16 of what is left; a crowd told to retry in the last
/// second (it is coming back) sizes the next block as the calls still waiting do.
#[test]
fn calls_told_to_retry_count_toward_the_next_block() {
    let now = Instant::now();
    let mut lease = Lease::new(NOV, Some(16_000), 0, now);
    lease.committed = Some(15_000);
    assert_eq!(lease.want(0), 62, "1,000 left: 1/16 of it");
    assert_eq!(lease.want(300), 300, "the calls waiting");
    for _ in 0..1500 {
        lease.turn_away(now);
    }
    lease.close_window(now + RATE_WINDOW);
    assert_eq!(
        lease.want(0),
        BASE_BLOCK,
        "the crowd, up to a second of calls"
    );
    assert_eq!(lease.want(300), BASE_BLOCK);
    // A second later, nobody turned away: back to 1/16.
    lease.close_window(now + 2 * RATE_WINDOW);
    assert_eq!(lease.want(0), 62);
}

/// A busy subject's blocks grow to about a second of its calls (up to [`MAX_BLOCK`]), so it
/// refills a couple of times a second whatever its rate; a limit still caps them at 1/16 of
/// what is left.
#[tokio::test(start_paused = true)]
async fn blocks_grow_to_a_second_of_calls() {
    for (limit, busiest) in [
        (None, 10_000),
        (Some(10_000_000), 10_000),
        (Some(64_000), 4_000),
    ] {
        let book = LeaseBook::default();
        let store = ModelStore::default();
        let mut calls_per_second = Vec::new();
        for _ in 0..3 {
            let before = store.calls.load(Ordering::Relaxed);
            // 10,000 calls a second.
            for _ in 0..10_000 {
                assert!(matches!(
                    reserve(&book, &store, limit).await,
                    Reservation::Granted { .. }
                ));
                tokio::time::advance(Duration::from_micros(100)).await;
            }
            calls_per_second.push(store.calls.load(Ordering::Relaxed) - before);
        }
        // The first second refills about every 1,024 calls; then the block is the rate (or the
        // limit's share), topped up at half.
        assert!(calls_per_second[0] >= 9, "{limit:?}: {calls_per_second:?}");
        let expected = 10_000 / (busiest / 2);
        assert!(
            calls_per_second[2] <= expected + 1,
            "{limit:?}: {calls_per_second:?}"
        );
    }
}

/// A limit lowered while a refill under the old one is out: the units granted under the old
/// limit go back instead of being served under the new one, and the refilling call is told to
/// retry rather than that the month is used up.
#[tokio::test(start_paused = true)]
async fn a_grant_made_under_an_old_limit_goes_back() {
    let book = Arc::new(LeaseBook::default());
    let store = Arc::new(ModelStore::default());
    let slow = {
        let (book, store) = (book.clone(), store.clone());
        tokio::spawn(
            async move { reserve_slowly(&book, &store, 1000, Duration::from_millis(10)).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(1)).await;
    // The limit drops to 3 meanwhile; this call waits for the refill under way, then asks
    // under its own limit.
    let lowered = reserve(&book, &store, Some(3)).await;
    assert_eq!(slow.await.unwrap(), Reservation::Held);
    assert_eq!(lowered, Reservation::Granted { used: 1 });
    for _ in 0..2 {
        assert!(matches!(
            reserve(&book, &store, Some(3)).await,
            Reservation::Granted { .. }
        ));
    }
    assert_eq!(
        reserve(&book, &store, Some(3)).await,
        Reservation::Denied { used: 3 }
    );
    sync(&book, &store, true).await;
    assert_eq!((store.used(), store.held()), (3, 0));
}

// ---------------------------------------------------------------------------------------
// Simulation: several nodes, one store, faults picked by proptest. Calls are tasks: a slow
// call's store operation stays out until a later step delivers it (or its deadline passes), so
// other calls, syncs, waits and faults of its node interleave with it.

#[derive(Debug, Clone)]
enum Step {
    /// A call on a node, its store operation (if any) answered at once.
    Call(usize),
    /// A call on a node whose store operation is answered only by a later [`Step::Deliver`].
    SlowCall(usize),
    /// The store applies a node's oldest operation still out and answers it.
    Deliver(usize),
    /// A node's background sync tick.
    Sync(usize),
    /// A node loses (or regains) its path to the store.
    TogglePartition(usize),
    /// The next answer the store sends to a node is lost (the operation is applied).
    LoseAnswer(usize),
    /// Time passes; a paused node is simply one that takes no steps meanwhile.
    Wait(u64),
    /// A node is killed: whatever it did not report is gone with it, its calls in flight too.
    Kill(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => (0..3usize).prop_map(Step::Call),
        3 => (0..3usize).prop_map(Step::SlowCall),
        3 => (0..3usize).prop_map(Step::Deliver),
        3 => (0..3usize).prop_map(Step::Sync),
        1 => (0..3usize).prop_map(Step::TogglePartition),
        1 => (0..3usize).prop_map(Step::LoseAnswer),
        2 => prop_oneof![Just(10u64), Just(100), Just(1_000), Just(3_000), Just(20_000)]
            .prop_map(Step::Wait),
        1 => (0..3usize).prop_map(Step::Kill),
    ]
}

type Answer = Result<LeaseAnswer, StoreError>;

/// A node's path to the store and what its calls served, shared with its call tasks.
#[derive(Default)]
struct Link {
    partitioned: bool,
    lose_next: bool,
    /// Operations sent and not yet delivered, oldest first.
    out: std::collections::VecDeque<(LeaseOp, tokio::sync::oneshot::Sender<Answer>)>,
    /// Successful calls served, by where the unit came from.
    served: u64,
    served_local: u64,
    outages: u64,
    /// Calls refused as over the limit without the store's word that the month is used up.
    dishonest: Vec<String>,
}

impl Link {
    /// Sends `op` from node `i` to the store, subject to the node's faults.
    fn send(&mut self, i: usize, store: &ModelStore, op: &LeaseOp) -> Option<LeaseAnswer> {
        if self.partitioned {
            return None;
        }
        let answer = store.apply(i, op);
        if std::mem::take(&mut self.lose_next) {
            return None;
        }
        Some(answer)
    }
}

struct Node {
    book: Arc<LeaseBook>,
    /// The thresholds the book told.
    crossings: mpsc::UnboundedReceiver<Crossing>,
    link: Arc<Mutex<Link>>,
    calls: Vec<tokio::task::JoinHandle<()>>,
    dead: bool,
}

impl Node {
    fn new() -> Self {
        let (tx, crossings) = mpsc::unbounded_channel();
        Self {
            book: Arc::new(LeaseBook {
                crossings: Some(tx),
                ..LeaseBook::default()
            }),
            crossings,
            link: Arc::default(),
            calls: Vec::new(),
            dead: false,
        }
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap()
    }

    fn sync(&self, i: usize, store: &ModelStore, all: bool) {
        for due in self.book.due(all) {
            let answer = self.link().send(i, store, &due.op);
            self.book.settled(due, answer);
        }
    }
}

/// Sends `op` of node `i` to the store: answered at once, or (`slow`) when a later step
/// delivers it, unless `until` passes first.
async fn exchange(
    store: Arc<ModelStore>,
    link: Arc<Mutex<Link>>,
    i: usize,
    op: LeaseOp,
    until: Instant,
    slow: bool,
) -> Answer {
    if !slow {
        let answer = link.lock().unwrap().send(i, &store, &op);
        return answer.ok_or_else(|| StoreError("no answer".into()));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    link.lock().unwrap().out.push_back((op, tx));
    match tokio::time::timeout_at(until, rx).await {
        Ok(Ok(answer)) => answer,
        _ => {
            // The store may still apply it later: that answer is lost.
            link.lock().unwrap().outages += 1;
            Err(StoreError("no answer in time".into()))
        }
    }
}

/// One call of node `i` as the request path makes it: reserve, and under fail-open admit
/// locally when the store fails. A slow call's operation waits in the link for delivery.
async fn call(
    book: Arc<LeaseBook>,
    store: Arc<ModelStore>,
    link: Arc<Mutex<Link>>,
    (i, limit, fail_open, slow): (usize, u64, bool, bool),
) {
    let run =
        |op: LeaseOp, until: Instant| exchange(store.clone(), link.clone(), i, op, until, slow);
    // A failed refill is an outage: calls behind it fail too.
    let timeout = Duration::from_millis(50);
    let reserved = book
        .reserve("k", NOV, Some(limit), timeout, run, || true)
        .await;
    if let Ok((_, Some(due))) = &reserved {
        // The top-up goes out beside the call, as the gateway sends it.
        let (book, store, link, due) = (book.clone(), store.clone(), link.clone(), due.clone());
        tokio::spawn(async move {
            let until = Instant::now() + timeout;
            let result = exchange(store, link, i, due.op.clone(), until, slow).await;
            book.topped_up(due, result);
        });
    }
    let source = match reserved.map(|(reservation, _)| reservation) {
        Ok(Reservation::Granted { .. }) => Some(Source::Lease),
        Ok(Reservation::Denied { used }) => {
            // Honest refusals (SPEC §4a.7): a refusal stands on the store's verdict that the
            // month is used up for this node, given at most [`SPENT_TTL`] ago (calls queued
            // behind that answer are refused without asking again).
            let now = Instant::now();
            let verdicts = store.verdicts.lock().unwrap();
            let backed = verdicts.get(&i).is_some_and(|v| {
                v.iter()
                    .any(|(at, used_up)| *used_up && now - *at <= SPENT_TTL)
            });
            if !backed {
                let why = format!("node {i} refused at {used} without a used-up verdict");
                link.lock().unwrap().dishonest.push(why);
            }
            None
        }
        Ok(_) => None,
        Err(_) if fail_open => match book.admit_local("k", NOV, Some(limit), true) {
            LocalAdmission::Admitted { source, .. } => Some(source),
            _ => None,
        },
        Err(_) => None,
    };
    let mut link = link.lock().unwrap();
    match source {
        Some(Source::Lease) => link.served += 1,
        Some(Source::Local) => {
            link.served += 1;
            link.served_local += 1;
        }
        None => {}
    }
}

/// Lets every task that can run do so.
async fn settle_tasks() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

async fn simulate(steps: Vec<Step>, limit: u64, fail_open: bool) -> Result<(), TestCaseError> {
    let store = Arc::new(ModelStore::default());
    let mut nodes: Vec<Node> = (0..3).map(|_| Node::new()).collect();
    let mut killed_served = 0;
    let mut any_killed = false;
    for step in steps {
        match step {
            Step::Call(i) | Step::SlowCall(i) if !nodes[i].dead => {
                let slow = matches!(step, Step::SlowCall(_));
                let node = &mut nodes[i];
                let task = call(
                    node.book.clone(),
                    store.clone(),
                    node.link.clone(),
                    (i, limit, fail_open, slow),
                );
                node.calls.push(tokio::spawn(task));
            }
            Step::Deliver(i) if !nodes[i].dead => {
                let mut link = nodes[i].link();
                if let Some((op, reply)) = link.out.pop_front() {
                    let answer = link.send(i, &store, &op);
                    let _ = reply.send(answer.ok_or_else(|| StoreError("lost".into())));
                }
            }
            Step::Sync(i) if !nodes[i].dead => nodes[i].sync(i, &store, false),
            Step::TogglePartition(i) => {
                let mut link = nodes[i].link();
                link.partitioned = !link.partitioned;
                if link.partitioned {
                    link.outages += 1;
                }
            }
            Step::LoseAnswer(i) => {
                let mut link = nodes[i].link();
                link.lose_next = true;
                link.outages += 1;
            }
            Step::Wait(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
            Step::Kill(i) if !nodes[i].dead => {
                let node = &mut nodes[i];
                node.dead = true;
                for task in node.calls.drain(..) {
                    task.abort();
                }
                any_killed = true;
                killed_served += node.link().served;
            }
            _ => {}
        }
        settle_tasks().await;
        for node in nodes.iter_mut() {
            node.calls.retain(|t| !t.is_finished());
        }
        let served: u64 = nodes.iter().map(|n| n.link().served).sum();
        let local: u64 = nodes.iter().map(|n| n.link().served_local).sum();
        for n in &nodes {
            let link = n.link();
            prop_assert!(link.dishonest.is_empty(), "{:?}", link.dishonest);
        }
        if !fail_open {
            prop_assert!(
                served <= limit,
                "fail_closed over-admitted: {served} > {limit}"
            );
        } else {
            // Leased units never exceed the limit; beyond them each node admits at most one
            // block per outage it went through (a lost or late answer is a blip of one).
            prop_assert!(served - local <= limit, "leased units over the limit");
            let block = (limit / 16).max(1);
            for (i, n) in nodes.iter().enumerate() {
                let link = n.link();
                prop_assert!(
                    link.served_local <= block * link.outages,
                    "node {i}: {} local admissions in {} outages",
                    link.served_local,
                    link.outages
                );
            }
        }
    }
    // Heal everything, deliver what is out, let the calls finish and every live node hand
    // back what it holds.
    for (i, node) in nodes.iter_mut().enumerate() {
        let mut link = node.link();
        link.partitioned = false;
        link.lose_next = false;
        while let Some((op, reply)) = link.out.pop_front() {
            if !node.dead {
                let answer = link.send(i, &store, &op);
                let _ = reply.send(answer.ok_or_else(|| StoreError("lost".into())));
            }
        }
    }
    settle_tasks().await;
    tokio::time::advance(BUSY_WAIT + Duration::from_secs(1)).await;
    settle_tasks().await;
    for (i, node) in nodes.iter_mut().enumerate() {
        node.calls.retain(|t| !t.is_finished());
        if node.dead {
            continue;
        }
        prop_assert!(node.calls.is_empty(), "node {i}: calls still waiting");
        for _ in 0..2 {
            node.sync(i, &store, true);
        }
        prop_assert!(!node.book.unsynced(), "node {i} still owes the store");
    }
    let live_served: u64 = nodes
        .iter()
        .filter(|n| !n.dead)
        .map(|n| n.link().served)
        .sum();
    let used = store.used();
    // Nothing doubled: usage never exceeds what was served; nothing lost from live nodes:
    // usage covers all they served, and a killed node can only have lost what it never
    // reported.
    prop_assert!(
        used <= live_served + killed_served,
        "usage {used} counts calls twice"
    );
    prop_assert!(
        used >= live_served,
        "usage {used} lost calls of live nodes ({live_served})"
    );
    if !any_killed {
        prop_assert_eq!(used, live_served);
        prop_assert_eq!(store.held(), 0, "units left held with every node synced");
    }
    // Thresholds: told only once use has reached them, and with no node killed a threshold
    // that use reached was told by some node (the one whose report crossed it saw the new
    // count, if not at once then in the replay). A node tells one again only after it has
    // forgotten the subject; the outbox keeps one event whoever tells it how often.
    let mut told = [0u64; events::THRESHOLDS.len()];
    for node in nodes.iter_mut() {
        while let Ok(c) = node.crossings.try_recv() {
            let t = events::THRESHOLDS
                .iter()
                .position(|t| *t == c.threshold)
                .unwrap();
            prop_assert!(c.used * 100 >= c.threshold * limit, "told too early: {c:?}");
            prop_assert_eq!(c.limit, limit);
            told[t] += 1;
        }
    }
    for (t, threshold) in events::THRESHOLDS.iter().enumerate() {
        if !any_killed && used * 100 >= threshold * limit {
            prop_assert!(
                told[t] >= 1,
                "use {used} of {limit} reached {threshold}% untold"
            );
        }
    }
    Ok(())
}

fn run_simulation(steps: Vec<Step>, limit: u64, fail_open: bool) -> Result<(), TestCaseError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
        .block_on(simulate(steps, limit, fail_open))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn fail_closed_never_over_admits_and_never_loses_or_doubles(
        steps in prop::collection::vec(step(), 1..400),
        limit in prop_oneof![Just(1u64), Just(7), Just(50), Just(1000)],
    ) {
        run_simulation(steps, limit, false)?;
    }

    #[test]
    fn fail_open_stays_within_one_block_per_outage(
        steps in prop::collection::vec(step(), 1..400),
        limit in prop_oneof![Just(16u64), Just(160), Just(1000)],
    ) {
        run_simulation(steps, limit, true)?;
    }
}

/// A node tells each threshold once while it remembers the subject, however many reports
/// show it reached.
#[tokio::test(start_paused = true)]
async fn each_threshold_is_told_once_per_subject_and_month() {
    let (tx, mut told) = mpsc::unbounded_channel();
    let book = LeaseBook {
        crossings: Some(tx),
        ..LeaseBook::default()
    };
    let store = ModelStore::default();
    let mut seen = Vec::new();
    for _ in 0..10 {
        reserve(&book, &store, Some(10)).await;
        tokio::time::advance(REPORT_EVERY).await;
        sync(&book, &store, false).await;
        while let Ok(c) = told.try_recv() {
            seen.push((c.threshold, c.used));
        }
    }
    for _ in 0..5 {
        assert!(matches!(
            reserve(&book, &store, Some(10)).await,
            Reservation::Denied { .. }
        ));
        sync(&book, &store, true).await;
    }
    while let Ok(c) = told.try_recv() {
        seen.push((c.threshold, c.used));
    }
    let [(80, at_80), (100, 10)] = seen[..] else {
        panic!("told {seen:?}")
    };
    assert!((8..=10).contains(&at_80), "80 % told at {at_80} of 10");
}
