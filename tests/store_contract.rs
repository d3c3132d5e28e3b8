//! The contract every `Store` implementation must meet, run against each of them.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use audiolib::auth::{KeyDigest, mint_key};
use audiolib::events::Event;
use audiolib::metrics::StoreMetrics;
use audiolib::quota::{Day, Period, Reservation, Source};
use audiolib::store::lease::{LeaseBackend, Quota};
use audiolib::store::outbox::{Outbox, Pending};
use audiolib::store::sqlite::SqliteStore;
use audiolib::store::{
    AccountRecord, AccountStatus, AccountUpdate, KeyRecord, KeyStatus, KeyUpdate, Rotation, Store,
};
use serde_json::json;

fn record(id: &str, created: u64) -> KeyRecord {
    let key = mint_key();
    KeyRecord {
        plan: "free".into(),
        monthly_limit: Some(10),
        ..KeyRecord::new(
            id.into(),
            key.digest,
            key.prefix,
            format!("name of {id}"),
            UNIX_EPOCH + Duration::from_secs(created),
        )
    }
}

const NOV: Period = Period {
    year: 2026,
    month: 11,
};
const DEC: Period = Period {
    year: 2026,
    month: 12,
};

async fn keys_round_trip(store: Arc<dyn Store>) {
    let a = record("key_a", 2);
    let b = record("key_b", 1);
    store.insert_key(a.clone()).await.unwrap();
    store.insert_key(b.clone()).await.unwrap();
    assert_eq!(
        store.key_by_digest(&a.digest).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(store.key_by_id("key_b").await.unwrap(), Some(b.clone()));
    assert_eq!(store.key_by_id("key_zz").await.unwrap(), None);
    assert_eq!(
        store
            .key_by_digest(&KeyDigest::of("alp_nobody"))
            .await
            .unwrap(),
        None
    );
    let ids: Vec<_> = store
        .list_keys(None, 100)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["key_b", "key_a"], "listed oldest first");

    // Stores keep timestamps to the second.
    let later = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let updated = store
        .update_key(
            "key_a",
            KeyUpdate {
                plan: Some("unlimited".into()),
                monthly_limit: Some(None),
                status: Some(KeyStatus::Disabled),
                ..Default::default()
            },
            later,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.plan, "unlimited");
    assert_eq!(updated.monthly_limit, None);
    assert_eq!(updated.status, KeyStatus::Disabled);
    assert_eq!(updated.updated_at, later);
    assert_eq!(updated.created_at, a.created_at);
    assert_eq!(store.key_by_digest(&a.digest).await.unwrap(), Some(updated));
    // An empty update changes nothing but the timestamp.
    let same = store
        .update_key("key_b", KeyUpdate::default(), later)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((same.plan, same.monthly_limit), (b.plan, b.monthly_limit));
    assert_eq!(
        store
            .update_key("key_zz", KeyUpdate::default(), later)
            .await
            .unwrap(),
        None
    );
}

fn quota(backend: Arc<dyn LeaseBackend>) -> Arc<Quota> {
    Arc::new(Quota::new(backend, StoreMetrics::new()))
}

async fn reservations_are_exact(store: Arc<Quota>) {
    for used in 1..=3 {
        assert_eq!(
            store.reserve("k", NOV, Some(3)).await.unwrap(),
            Reservation::Granted { used }
        );
    }
    assert_eq!(
        store.reserve("k", NOV, Some(3)).await.unwrap(),
        Reservation::Denied { used: 3 }
    );
    store.sync(true).await;
    assert_eq!(
        store.usage("k", NOV).await.unwrap(),
        3,
        "denials are not counted"
    );
    store.refund("k", NOV, Source::Lease);
    store.sync(true).await;
    assert_eq!(store.usage("k", NOV).await.unwrap(), 2);
    assert_eq!(
        store.reserve("k", NOV, Some(3)).await.unwrap(),
        Reservation::Granted { used: 3 }
    );
    // A raised limit applies at once; a limit of zero refuses everything.
    assert_eq!(
        store.reserve("k", NOV, Some(4)).await.unwrap(),
        Reservation::Granted { used: 4 }
    );
    assert_eq!(
        store.reserve("z", NOV, Some(0)).await.unwrap(),
        Reservation::Denied { used: 0 }
    );
    // Unlimited keys are metered.
    for used in 1..=5 {
        assert_eq!(
            store.reserve("u", NOV, None).await.unwrap(),
            Reservation::Granted { used }
        );
    }
    // A new month starts from zero.
    assert_eq!(
        store.reserve("k", DEC, Some(3)).await.unwrap(),
        Reservation::Granted { used: 1 }
    );
    store.sync(true).await;
    assert_eq!(store.usage("k", DEC).await.unwrap(), 1);
    assert_eq!(store.usage("u", NOV).await.unwrap(), 5);
    assert_eq!(store.usage("nobody", DEC).await.unwrap(), 0);
    assert!(!store.unsynced());
}

async fn concurrent_reservations_never_exceed_the_limit(store: Arc<Quota>) {
    let tasks: Vec<_> = (0..400)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.reserve("hot", NOV, Some(50)).await.unwrap() })
        })
        .collect();
    let mut granted = 0;
    for t in tasks {
        if let Reservation::Granted { .. } = t.await.unwrap() {
            granted += 1;
        }
    }
    assert_eq!(granted, 50);
    store.sync(true).await;
    assert_eq!(store.usage("hot", NOV).await.unwrap(), 50);
}

async fn revocation_is_final(store: Arc<dyn Store>) {
    let r = record("key_r", 1);
    store.insert_key(r.clone()).await.unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let update = |status| KeyUpdate {
        status: Some(status),
        ..Default::default()
    };
    let revoked = store.update_key("key_r", update(KeyStatus::Revoked), now);
    assert_eq!(revoked.await.unwrap().unwrap().status, KeyStatus::Revoked);
    for status in [KeyStatus::Active, KeyStatus::Disabled] {
        let after = store
            .update_key("key_r", update(status), now)
            .await
            .unwrap();
        assert_eq!(after.unwrap().status, KeyStatus::Revoked, "{status:?}");
    }
}

fn account(id: &str, email: &str, created: u64) -> AccountRecord {
    AccountRecord {
        id: id.into(),
        email: email.into(),
        name: format!("name of {id}"),
        plan: "free".into(),
        monthly_limit: Some(100),
        status: AccountStatus::Active,
        created_at: UNIX_EPOCH + Duration::from_secs(created),
        updated_at: UNIX_EPOCH + Duration::from_secs(created),
    }
}

async fn accounts_round_trip(store: Arc<dyn Store>) {
    let a = account("acct_a", "a@example.com", 2);
    let b = account("acct_b", "b@example.com", 1);
    assert!(store.insert_account(a.clone()).await.unwrap());
    assert!(store.insert_account(b.clone()).await.unwrap());
    // One account per email: the second claim writes nothing.
    let twin = account("acct_twin", "a@example.com", 3);
    assert!(!store.insert_account(twin).await.unwrap());
    assert_eq!(store.account_by_id("acct_twin").await.unwrap(), None);
    assert_eq!(
        store.account_by_id("acct_a").await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(store.account_by_id("acct_{x}").await.unwrap(), None);
    let ids: Vec<_> = store
        .list_accounts(None, 100)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["acct_b", "acct_a"], "listed oldest first");

    // Keys of an account, oldest first; keys without one are not among them.
    let mut k1 = record("key_1", 5);
    k1.account_id = Some("acct_a".into());
    let mut k2 = record("key_2", 4);
    k2.account_id = Some("acct_a".into());
    store.insert_key(k1.clone()).await.unwrap();
    store.insert_key(k2.clone()).await.unwrap();
    store.insert_key(record("key_3", 3)).await.unwrap();
    assert_eq!(
        store.keys_of_account("acct_a").await.unwrap(),
        [k2, k1.clone()]
    );
    assert_eq!(store.keys_of_account("acct_b").await.unwrap(), []);
    assert_eq!(store.key_by_digest(&k1.digest).await.unwrap(), Some(k1));

    let later = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let disabled = store
        .update_account(
            "acct_a",
            AccountUpdate {
                plan: Some("pro".into()),
                monthly_limit: Some(None),
                status: Some(AccountStatus::Disabled),
                ..Default::default()
            },
            later,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            disabled.plan.as_str(),
            disabled.monthly_limit,
            disabled.status
        ),
        ("pro", None, AccountStatus::Disabled)
    );
    assert_eq!(disabled.updated_at, later);
    assert_eq!(store.account_by_id("acct_a").await.unwrap(), Some(disabled));
    assert_eq!(
        store
            .update_account("acct_none", AccountUpdate::default(), later)
            .await
            .unwrap(),
        None
    );
    // Closing is final: a later update cannot reopen the account.
    let close = AccountUpdate {
        status: Some(AccountStatus::Closed),
        ..Default::default()
    };
    store.update_account("acct_b", close, later).await.unwrap();
    let reopen = AccountUpdate {
        status: Some(AccountStatus::Active),
        ..Default::default()
    };
    let after = store.update_account("acct_b", reopen, later).await.unwrap();
    assert_eq!(after.unwrap().status, AccountStatus::Closed);
}

async fn rotation_and_touch(store: Arc<dyn Store>) {
    let t = |secs| UNIX_EPOCH + Duration::from_secs(secs);
    let key = record("key_r", 1);
    store.insert_key(key.clone()).await.unwrap();
    let first = mint_key();
    let rotation = Rotation {
        digest: first.digest,
        prefix: first.prefix.clone(),
        previous_expires_at: Some(t(500)),
    };
    let (rotated, dropped) = store
        .rotate_key("key_r", rotation, t(100))
        .await
        .unwrap()
        .unwrap();
    assert!(dropped.is_empty(), "the old secret lives on in its grace");
    assert_eq!(
        (
            rotated.digest,
            rotated.previous_digest,
            rotated.previous_expires_at
        ),
        (first.digest, Some(key.digest), Some(t(500)))
    );
    assert_eq!(
        (rotated.prefix.as_str(), rotated.updated_at),
        (first.prefix.as_str(), t(100))
    );
    // Found by either secret; which one still opens it is decided by `serves`.
    for digest in [first.digest, key.digest] {
        let found = store.key_by_digest(&digest).await.unwrap().unwrap();
        assert_eq!(found, rotated);
        assert!(found.serves(&digest, t(499)));
    }
    assert!(!rotated.serves(&key.digest, t(500)), "the grace is over");

    // A second rotation without grace drops both older secrets.
    let second = mint_key();
    let rotation = Rotation {
        digest: second.digest,
        prefix: second.prefix,
        previous_expires_at: None,
    };
    let (rotated, mut dropped) = store
        .rotate_key("key_r", rotation, t(200))
        .await
        .unwrap()
        .unwrap();
    dropped.sort_by_key(|d| d.0);
    let mut expected = vec![key.digest, first.digest];
    expected.sort_by_key(|d| d.0);
    assert_eq!(dropped, expected);
    assert_eq!(rotated.previous_digest, None);
    for digest in [key.digest, first.digest] {
        let found = store.key_by_digest(&digest).await.unwrap();
        assert!(found.is_none_or(|r| !r.serves(&digest, t(201))));
    }
    assert_eq!(
        store
            .rotate_key(
                "key_none",
                Rotation {
                    digest: mint_key().digest,
                    prefix: "x".into(),
                    previous_expires_at: None
                },
                t(1)
            )
            .await
            .unwrap(),
        None
    );

    // last_used_at only moves forward; unknown keys are ignored.
    store
        .touch_keys(&[("key_r".into(), t(600)), ("key_none".into(), t(600))])
        .await
        .unwrap();
    store.touch_keys(&[("key_r".into(), t(540))]).await.unwrap();
    let r = store.key_by_id("key_r").await.unwrap().unwrap();
    assert_eq!(r.last_used_at, Some(t(600)));
    assert_eq!(store.key_by_id("key_none").await.unwrap(), None);
}

/// Walking the key list page by page while keys are created and revoked lists every key that
/// existed at the start exactly once, in creation order.
async fn pages_list_every_key_once(store: Arc<dyn Store>) {
    // Creation times with ties, inserted out of order.
    let mut ids = Vec::new();
    for i in 0..23u64 {
        let id = format!("key_p{:02}", (i * 7) % 23);
        store
            .insert_key(record(&id, 10 + (i * 7) % 23 / 3))
            .await
            .unwrap();
        ids.push(id);
    }
    let mut expected: Vec<(u64, String)> = ids
        .iter()
        .map(|id| (10 + id[5..].parse::<u64>().unwrap() / 3, id.clone()))
        .collect();
    expected.sort();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut round = 0;
    loop {
        let page = store
            .list_keys(cursor.as_deref(), 4)
            .await
            .unwrap()
            .unwrap();
        seen.extend(page.iter().map(|r| r.id.clone()));
        // During the walk: a new key (created now, after all of them) and a revocation.
        round += 1;
        store
            .insert_key(record(&format!("key_new{round}"), 1_000 + round))
            .await
            .unwrap();
        let revoke = KeyUpdate {
            status: Some(KeyStatus::Revoked),
            ..Default::default()
        };
        store
            .update_key(&expected[round as usize % 23].1, revoke, UNIX_EPOCH)
            .await
            .unwrap();
        if page.len() < 4 {
            break;
        }
        cursor = page.last().map(|r| r.id.clone());
    }
    let walked: Vec<String> = seen
        .iter()
        .filter(|id| id.starts_with("key_p"))
        .cloned()
        .collect();
    let want: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
    assert_eq!(walked, want, "every key once, oldest first");
    assert_eq!(store.list_keys(Some("key_nosuch"), 4).await.unwrap(), None);
    assert_eq!(
        store.list_accounts(Some("acct_nosuch"), 4).await.unwrap(),
        None
    );
}

/// `count_days` adds to a subject's day counters (the per-key history of keys of an
/// account), read back by `days`, and counts nothing towards a month's quota.
async fn days_count_outside_the_quota(backend: Arc<dyn LeaseBackend>) {
    // Recent days: older ones than the history keeps are dropped as they are written.
    let today = Day::containing(std::time::SystemTime::now());
    let (d1, d2) = (Day(today.0 - 1), today);
    let calls = |n: u64| vec![("key_a".to_string(), n), ("key_b".to_string(), 1)];
    backend.count_days(d1, &calls(2)).await.unwrap();
    backend.count_days(d1, &calls(3)).await.unwrap();
    backend.count_days(d2, &calls(1)).await.unwrap();
    assert_eq!(
        backend.days("key_a", d1, d2).await.unwrap(),
        [(d1, 5), (d2, 1)]
    );
    assert_eq!(backend.days("key_b", d1, d1).await.unwrap(), [(d1, 2)]);
    assert_eq!(backend.used("key_a", DEC).await.unwrap(), 0);
    backend.count_days(d1, &[]).await.unwrap();
}

fn ids(pending: &[Pending]) -> Vec<&str> {
    pending.iter().map(|p| p.event.id.as_str()).collect()
}

/// Every event is handed out until it is finished, once per claim, and its id is recorded
/// once.
async fn outbox_hands_out_each_event_until_finished(outbox: Arc<dyn Outbox>) {
    let t0 = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let secs = Duration::from_secs;
    let hold = secs(60);
    let a = Event::once("key.created", "key_a", json!({"id": "key_a"}), t0);
    let b = Event::once("key.created", "key_b", json!({"id": "key_b"}), t0 + secs(1));
    assert!(outbox.enqueue(&a).await.unwrap());
    assert!(!outbox.enqueue(&a).await.unwrap(), "an id is recorded once");
    assert!(outbox.enqueue(&b).await.unwrap());

    let claimed = outbox.claim(t0 + secs(5), hold, 10).await.unwrap();
    assert_eq!(ids(&claimed), [&a.id, &b.id], "due at once, oldest first");
    assert_eq!(claimed[0].event, a);
    assert_eq!(claimed[0].attempts, 0);
    assert!(
        outbox
            .claim(t0 + secs(6), hold, 10)
            .await
            .unwrap()
            .is_empty(),
        "a claimed event is not handed out again while its claim runs"
    );
    // The claimer died: once its claim runs out the event is handed out again.
    let again = outbox.claim(t0 + secs(70), hold, 1).await.unwrap();
    assert_eq!(ids(&again), [&a.id]);
    outbox.retry(&a.id, t0 + secs(100), 1).await.unwrap();
    outbox.finish(&b.id).await.unwrap();
    assert!(
        outbox
            .claim(t0 + secs(99), hold, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let retried = outbox.claim(t0 + secs(100), hold, 10).await.unwrap();
    assert_eq!(ids(&retried), [&a.id]);
    assert_eq!(retried[0].attempts, 1);
    assert_eq!(retried[0].event.body, a.body);
    outbox.finish(&a.id).await.unwrap();
    // Finished: never handed out again, not even by a late retry, and still known.
    outbox.retry(&a.id, t0 + secs(200), 2).await.unwrap();
    assert!(
        outbox
            .claim(t0 + secs(10_000), hold, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!outbox.enqueue(&a).await.unwrap());

    // Claims racing each other never hand one event to two claimers.
    let many: Vec<Event> = (0..40)
        .map(|i| Event::once("key.created", &format!("key_{i}"), json!({}), t0))
        .collect();
    for e in &many {
        assert!(outbox.enqueue(e).await.unwrap());
    }
    let claimers: Vec<_> = (0..4)
        .map(|_| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let batch = outbox.claim(t0 + secs(20_000), hold, 3).await.unwrap();
                    if batch.is_empty() {
                        return got;
                    }
                    got.extend(batch.into_iter().map(|p| p.event.id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for c in claimers {
        all.extend(c.await.unwrap());
    }
    all.sort();
    let mut expected: Vec<String> = many.iter().map(|e| e.id.clone()).collect();
    expected.sort();
    assert_eq!(all, expected, "every event claimed exactly once");
}

/// Runs the contract on fresh stores from `make`, each a key store, a lease backend and an
/// outbox.
async fn contract(make: impl Fn() -> (Arc<dyn Store>, Arc<dyn LeaseBackend>, Arc<dyn Outbox>)) {
    outbox_hands_out_each_event_until_finished(make().2).await;
    keys_round_trip(make().0).await;
    accounts_round_trip(make().0).await;
    rotation_and_touch(make().0).await;
    pages_list_every_key_once(make().0).await;
    revocation_is_final(make().0).await;
    days_count_outside_the_quota(make().1).await;
    reservations_are_exact(quota(make().1)).await;
    concurrent_reservations_never_exceed_the_limit(quota(make().1)).await;
    make().0.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_meets_the_contract() {
    let dirs = std::sync::Mutex::new(Vec::new());
    contract(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        dirs.lock().unwrap().push(dir);
        (store.clone(), store.clone(), store)
    })
    .await;
}

#[path = "common/mod.rs"]
mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_meets_the_contract() {
    let redis = common::RedisServer::start();
    let url = redis.url();
    let port = redis.port;
    contract(move || {
        common::redis_cli(port, &["FLUSHALL"]).unwrap();
        let store = Arc::new(
            audiolib::store::redis::RedisStore::new(&url, Duration::from_millis(500)).unwrap(),
        );
        (store.clone(), store.clone(), store)
    })
    .await;
}

/// A data directory written before accounts existed (schema version 1) opens, keeps its
/// keys, and takes accounts.
#[tokio::test]
async fn a_version_1_data_file_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let key = record("key_old", 1);
    {
        let conn = rusqlite::Connection::open(dir.path().join("audiolib.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE keys (
                 id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL,
                 name TEXT NOT NULL, plan TEXT NOT NULL, monthly_limit INTEGER,
                 status TEXT NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO keys VALUES (?1, ?2, ?3, ?4, 'free', 10, 'active', 1, 1)",
            [&key.id, &key.digest.to_string(), &key.prefix, &key.name],
        )
        .unwrap();
    }
    let store = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(store.key_by_id("key_old").await.unwrap(), Some(key));
    assert!(
        store
            .insert_account(account("acct_new", "new@example.com", 2))
            .await
            .unwrap()
    );
    let mut owned = record("key_new", 3);
    owned.account_id = Some("acct_new".into());
    store.insert_key(owned.clone()).await.unwrap();
    assert_eq!(store.keys_of_account("acct_new").await.unwrap(), [owned]);
    drop(store);
    // Opening it again changes nothing.
    let again = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(again.list_keys(None, 10).await.unwrap().unwrap().len(), 2);
}

/// Keys written without a pause while lookups run and the upkeep checkpoints: the embedded
/// store's write-ahead log stays bounded (a passive checkpoint alone never catches up with a
/// log that is always being appended to, and the file grew without end).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedded_stores_write_ahead_log_stays_bounded_under_continuous_writes() {
    use audiolib::store::sqlite::WAL_LIMIT;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let wal = dir.path().join("audiolib.db-wal");
    let wal_size = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                store.key_by_id("key_nosuch").await.unwrap();
            }
        })
    };
    let upkeep = {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                LeaseBackend::upkeep(store.as_ref()).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut largest = 0;
    for batch in 0..150 {
        let records = (0..2_000)
            .map(|i| record(&format!("key_{batch}x{i}"), batch))
            .collect();
        assert!(store.insert_keys(records).await.unwrap());
        largest = largest.max(wal_size());
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.await.unwrap();
    upkeep.await.unwrap();
    eprintln!("largest write-ahead log: {} MiB", largest >> 20);
    assert!(
        largest < 3 * WAL_LIMIT,
        "the write-ahead log grew to {} MiB",
        largest >> 20
    );
}
