//! The lease protocol against a model of the store's script, one node at a time and as a
//! deterministic simulation of several nodes under faults (proptest picks the schedules).

use super::*;
use std::collections::HashMap;
use std::sync::Mutex;

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
    let run = |op: LeaseOp, _| {
        let answer = store.apply(0, &op);
        async move { Ok(answer) }
    };
    book.reserve("k", NOV, limit, Duration::from_secs(1), run, || true)
        .await
        .unwrap()
}

async fn sync(book: &LeaseBook, store: &ModelStore, all: bool) {
    for due in book.due(all).await {
        let answer = store.apply(0, &due.op);
        book.settled(due, Some(answer)).await;
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
    book.refund("k", NOV, Source::Lease).await;
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
    let ops = book.due(true).await;
    assert_eq!(ops.len(), 1);
    store.apply(0, &ops[0].op);
    book.settled(ops[0].clone(), None).await;
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
        book.admit_local("k", NOV, Some(160), true).await,
        LocalAdmission::Refused
    );
    // Seen, then the store goes away with the node holding nothing.
    for _ in 0..150 {
        reserve(&book, &store, Some(160)).await;
    }
    sync(&book, &store, true).await;
    let mut admitted = 0;
    for _ in 0..100 {
        if let LocalAdmission::Admitted { .. } = book.admit_local("k", NOV, Some(160), true).await {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 10, "one block: 160 / 16");
    // The store answers again: the outage is reported, and only then another block.
    sync(&book, &store, true).await;
    assert_eq!(store.used(), 160);
    assert_eq!(
        book.admit_local("k", NOV, Some(160), true).await,
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
            tokio::spawn(async move {
                let run = |op: LeaseOp, _| {
                    let store = store.clone();
                    async move {
                        // A store that takes a while: every caller queues behind the refill.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        Ok(store.apply(0, &op))
                    }
                };
                book.reserve("k", NOV, Some(300), Duration::from_secs(1), run, || true)
                    .await
                    .unwrap()
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

// ---------------------------------------------------------------------------------------
// Simulation: several nodes, one store, faults picked by proptest.

#[derive(Debug, Clone)]
enum Step {
    /// A call on a node.
    Call(usize),
    /// A node's background sync tick.
    Sync(usize),
    /// A node loses (or regains) its path to the store.
    TogglePartition(usize),
    /// The next answer the store sends to a node is lost (the operation is applied).
    LoseAnswer(usize),
    /// Time passes; a paused node is simply one that takes no steps meanwhile.
    Wait(u64),
    /// A node is killed: whatever it did not report is gone with it.
    Kill(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => (0..3usize).prop_map(Step::Call),
        3 => (0..3usize).prop_map(Step::Sync),
        1 => (0..3usize).prop_map(Step::TogglePartition),
        1 => (0..3usize).prop_map(Step::LoseAnswer),
        2 => prop_oneof![Just(100u64), Just(1_000), Just(3_000), Just(20_000)].prop_map(Step::Wait),
        1 => (0..3usize).prop_map(Step::Kill),
    ]
}

struct Node {
    book: LeaseBook,
    /// The thresholds the book told.
    crossings: mpsc::UnboundedReceiver<Crossing>,
    partitioned: bool,
    lose_next: bool,
    dead: bool,
    /// Successful calls served, by where the unit came from.
    served: u64,
    served_local: u64,
    outages: u64,
}

impl Node {
    fn new() -> Self {
        let (tx, crossings) = mpsc::unbounded_channel();
        Self {
            book: LeaseBook {
                crossings: Some(tx),
                ..LeaseBook::default()
            },
            crossings,
            partitioned: false,
            lose_next: false,
            dead: false,
            served: 0,
            served_local: 0,
            outages: 0,
        }
    }
}

/// Sends `op` from node `i` to the store, subject to the node's faults.
fn send(node: &mut Node, i: usize, store: &ModelStore, op: &LeaseOp) -> Option<LeaseAnswer> {
    if node.partitioned {
        return None;
    }
    let answer = store.apply(i, op);
    if std::mem::take(&mut node.lose_next) {
        return None;
    }
    Some(answer)
}

async fn simulate(steps: Vec<Step>, limit: u64, fail_open: bool) -> Result<(), TestCaseError> {
    let store = ModelStore::default();
    let mut nodes: Vec<Node> = (0..3).map(|_| Node::new()).collect();
    let mut killed_served = 0;
    let mut any_killed = false;
    for step in steps {
        match step {
            Step::Call(i) if !nodes[i].dead => {
                let node = &mut nodes[i];
                let faults = std::cell::RefCell::new((node.partitioned, node.lose_next));
                let answer = node
                    .book
                    .reserve(
                        "k",
                        NOV,
                        Some(limit),
                        Duration::from_millis(50),
                        |op, _| {
                            let mut f = faults.borrow_mut();
                            let result = if f.0 {
                                Err(StoreError("partitioned".into()))
                            } else {
                                let answer = store.apply(i, &op);
                                if std::mem::take(&mut f.1) {
                                    Err(StoreError("answer lost".into()))
                                } else {
                                    Ok(answer)
                                }
                            };
                            async move { result }
                        },
                        // A partition is an outage: calls behind a failed refill fail too.
                        || true,
                    )
                    .await;
                node.lose_next = faults.borrow().1;
                match answer {
                    Ok(Reservation::Granted { .. }) => node.served += 1,
                    Ok(_) => {}
                    Err(_) if fail_open => {
                        if let LocalAdmission::Admitted { source, .. } =
                            node.book.admit_local("k", NOV, Some(limit), true).await
                        {
                            node.served += 1;
                            if source == Source::Local {
                                node.served_local += 1;
                            }
                        }
                    }
                    Err(_) => {}
                }
            }
            Step::Sync(i) if !nodes[i].dead => {
                for due in nodes[i].book.due(false).await {
                    let answer = send(&mut nodes[i], i, &store, &due.op);
                    nodes[i].book.settled(due, answer).await;
                }
            }
            Step::TogglePartition(i) => {
                nodes[i].partitioned = !nodes[i].partitioned;
                if nodes[i].partitioned {
                    nodes[i].outages += 1;
                }
            }
            Step::LoseAnswer(i) => {
                nodes[i].lose_next = true;
                nodes[i].outages += 1;
            }
            Step::Wait(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
            Step::Kill(i) if !nodes[i].dead => {
                nodes[i].dead = true;
                any_killed = true;
                killed_served += nodes[i].served;
            }
            _ => {}
        }
        let served: u64 = nodes.iter().map(|n| n.served).sum();
        let local: u64 = nodes.iter().map(|n| n.served_local).sum();
        if !fail_open {
            prop_assert!(
                served <= limit,
                "fail_closed over-admitted: {served} > {limit}"
            );
        } else {
            // Leased units never exceed the limit; beyond them each node admits at most one
            // block per outage it went through (a lost answer is a blip of an outage too).
            prop_assert!(served - local <= limit, "leased units over the limit");
            let block = (limit / 16).max(1);
            for (i, n) in nodes.iter().enumerate() {
                prop_assert!(
                    n.served_local <= block * n.outages,
                    "node {i}: {} local admissions in {} outages",
                    n.served_local,
                    n.outages
                );
            }
        }
    }
    // Heal everything and let every live node hand back what it holds.
    for (i, node) in nodes.iter_mut().enumerate() {
        node.partitioned = false;
        node.lose_next = false;
        if node.dead {
            continue;
        }
        for _ in 0..2 {
            for due in node.book.due(true).await {
                let answer = send(node, i, &store, &due.op);
                node.book.settled(due, answer).await;
            }
        }
        prop_assert!(!node.book.unsynced(), "node {i} still owes the store");
    }
    let live_served: u64 = nodes.iter().filter(|n| !n.dead).map(|n| n.served).sum();
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
