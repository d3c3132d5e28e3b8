//! The contract every `Store` implementation must meet, run against each of them.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use audiolib::auth::{KeyDigest, mint_key};
use audiolib::metrics::StoreMetrics;
use audiolib::quota::{Period, Reservation, Source};
use audiolib::store::lease::{LeaseBackend, Quota};
use audiolib::store::sqlite::SqliteStore;
use audiolib::store::{KeyRecord, KeyStatus, KeyUpdate, Store};

fn record(id: &str, created: u64) -> KeyRecord {
    let key = mint_key();
    KeyRecord {
        id: id.into(),
        digest: key.digest,
        prefix: key.prefix,
        name: format!("name of {id}"),
        plan: "free".into(),
        monthly_limit: Some(10),
        status: KeyStatus::Active,
        created_at: UNIX_EPOCH + Duration::from_secs(created),
        updated_at: UNIX_EPOCH + Duration::from_secs(created),
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
        .list_keys()
        .await
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
                status: Some(KeyStatus::Inactive),
            },
            later,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.plan, "unlimited");
    assert_eq!(updated.monthly_limit, None);
    assert_eq!(updated.status, KeyStatus::Inactive);
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
    store.refund("k", NOV, Source::Lease).await;
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
    for status in [KeyStatus::Active, KeyStatus::Inactive] {
        let after = store
            .update_key("key_r", update(status), now)
            .await
            .unwrap();
        assert_eq!(after.unwrap().status, KeyStatus::Revoked, "{status:?}");
    }
}

/// Runs the contract on fresh stores from `make`, each a key store and a lease backend.
async fn contract(make: impl Fn() -> (Arc<dyn Store>, Arc<dyn LeaseBackend>)) {
    keys_round_trip(make().0).await;
    revocation_is_final(make().0).await;
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
        (store.clone(), store)
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
        (store.clone(), store)
    })
    .await;
}
