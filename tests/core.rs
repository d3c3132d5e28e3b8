//! The request core without HTTP, where time and the store can be controlled: month
//! rollover with an injected clock, the fail-closed store policy (row 13) and the internal
//! error shape (row 14).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use audiolib::api::Gateway;
use audiolib::auth::KeyDigest;
use audiolib::clock::{Clock, ManualClock};
use audiolib::config::{Config, FailurePolicy, FileConfig};
use audiolib::error::ApiError;
use audiolib::keys::{CreateKey, KeyService, KeyView};
use audiolib::quota::{Day, Period, Source};
use audiolib::server::build_app_with;
use audiolib::store::lease::{Due, LeaseAnswer, LeaseBackend, LeaseOp};
use audiolib::store::sqlite::SqliteStore;
use audiolib::store::{
    AccountRecord, AccountUpdate, AuditEntry, KeyRecord, KeyUpdate, Rotation, Store, StoreError,
};
use tokio::time::Instant;

/// 2026-01-31T23:59:50Z
const END_OF_JANUARY: u64 = 1_769_903_990;
const BODY: &[u8] = br#"{"library":"audio.focus"}"#;

fn config() -> Config {
    let mut env = std::collections::BTreeMap::new();
    env.insert("AWS_ACCESS_KEY_ID", "AK");
    env.insert("AWS_SECRET_ACCESS_KEY", "SK");
    env.insert("AUDIOLIB_S3_BUCKET", "media");
    let mut config = Config::build(FileConfig::default(), &env).unwrap();
    config.catalog_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/catalog").into();
    config
}

/// The app as the server wires it, over `store` and `clock`.
fn gateway<S: Store + LeaseBackend>(
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    policy: FailurePolicy,
) -> (Arc<Gateway>, Arc<KeyService>) {
    let mut config = config();
    config.failure_policy = policy;
    let app = build_app_with(&config, store.clone(), store, clock).unwrap();
    // The server loads the catalog once its listeners are up; here, at once.
    app.catalog.reload().unwrap();
    (app.gateway, app.keys)
}

fn auth(key: &str) -> String {
    format!("Bearer {key}")
}

/// A new key of no account on the default plan, and its `Authorization` header.
async fn new_key(keys: &KeyService) -> (KeyView, String) {
    let (view, secret) = keys
        .create(CreateKey {
            name: "t".into(),
            account_id: None,
            ..Default::default()
        })
        .await
        .unwrap();
    (view, auth(&secret))
}

#[tokio::test]
async fn quota_starts_afresh_in_a_new_utc_month() {
    let clock = Arc::new(ManualClock::at_unix(END_OF_JANUARY));
    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(data.path()).unwrap());
    let (gw, keys) = gateway(store.clone(), clock.clone(), FailurePolicy::FailOpen);
    let quota = gw.quota().clone();
    let (view, secret) = keys
        .create(CreateKey {
            name: "t".into(),
            account_id: None,
            plan: None,
            monthly_limit: Some(Some(2)),
            ..Default::default()
        })
        .await
        .unwrap();
    let header = auth(&secret);
    let key = gw
        .authenticate(std::iter::once(header.as_bytes()))
        .await
        .unwrap();

    for _ in 0..2 {
        assert!(gw.audio(&key, BODY).await.result.is_ok());
    }
    let denied = gw.audio(&key, BODY).await;
    match denied.result {
        Err(ApiError::QuotaExceeded {
            limit,
            reset_at,
            retry_after,
        }) => {
            assert_eq!(limit, 2);
            assert_eq!(reset_at, "2026-02-01T00:00:00Z");
            assert_eq!(retry_after, 10);
        }
        other => panic!("expected 429, got {other:?}"),
    }
    assert_eq!(denied.rate.unwrap().remaining, 0);

    // Ten seconds later it is February.
    clock.set_unix(END_OF_JANUARY + 10);
    let outcome = gw.audio(&key, BODY).await;
    assert!(outcome.result.is_ok());
    let rate = outcome.rate.unwrap();
    assert_eq!((rate.remaining, rate.window_secs), (1, 28 * 86_400));
    let feb = Period::containing(clock.now());
    assert_eq!(feb.to_string(), "2026-02");
    quota.sync(true).await;
    assert_eq!(quota.usage(&view.id, feb).await.unwrap(), 1);
    let jan = Period {
        year: 2026,
        month: 1,
    };
    // Each month keeps its own count; a late report for January leaves February alone.
    assert_eq!(quota.usage(&view.id, jan).await.unwrap(), 2);
    quota.refund(&view.id, jan, Source::Lease);
    quota.sync(true).await;
    assert_eq!(quota.usage(&view.id, jan).await.unwrap(), 1);
    assert_eq!(quota.usage(&view.id, feb).await.unwrap(), 1);
    let (_, period, used) = keys.show(&view.id).await.unwrap();
    assert_eq!((period.to_string(), used), ("2026-02".to_string(), 1));
}

/// A store whose every call fails, standing in for an unreachable one.
struct DownStore;

#[async_trait]
impl Store for DownStore {
    async fn insert_key(&self, _: KeyRecord) -> Result<(), StoreError> {
        Err(StoreError("down".into()))
    }
    async fn insert_keys(&self, _: Vec<KeyRecord>) -> Result<bool, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn key_by_digest(&self, _: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn key_by_id(&self, _: &str) -> Result<Option<KeyRecord>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn list_keys(
        &self,
        _: Option<&str>,
        _: usize,
    ) -> Result<Option<Vec<KeyRecord>>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn update_key(
        &self,
        _: &str,
        _: KeyUpdate,
        _: SystemTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn rotate_key(
        &self,
        _: &str,
        _: Rotation,
        _: SystemTime,
    ) -> Result<Option<(KeyRecord, Vec<KeyDigest>)>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn touch_keys(&self, _: &[(String, SystemTime)]) -> Result<(), StoreError> {
        Err(StoreError("down".into()))
    }
    async fn append_audit(&self, _: AuditEntry, _: SystemTime) -> Result<(), StoreError> {
        Err(StoreError("down".into()))
    }
    async fn audit_page(&self, _: Option<u64>, _: usize) -> Result<Vec<AuditEntry>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn insert_account(&self, _: AccountRecord) -> Result<bool, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn account_by_id(&self, _: &str) -> Result<Option<AccountRecord>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn list_accounts(
        &self,
        _: Option<&str>,
        _: usize,
    ) -> Result<Option<Vec<AccountRecord>>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn update_account(
        &self,
        _: &str,
        _: AccountUpdate,
        _: SystemTime,
    ) -> Result<Option<AccountRecord>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn keys_of_account(&self, _: &str) -> Result<Vec<KeyRecord>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Err(StoreError("down".into()))
    }
}

#[async_trait]
impl LeaseBackend for DownStore {
    async fn apply(&self, _: &str, _: &LeaseOp, _: Instant) -> Result<LeaseAnswer, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn apply_all(&self, due: &[Due]) -> Vec<Option<LeaseAnswer>> {
        vec![None; due.len()]
    }
    async fn used(&self, _: &str, _: Period) -> Result<u64, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn days(&self, _: &str, _: Day, _: Day) -> Result<Vec<(Day, u64)>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn count_days(&self, _: Day, _: &[(String, u64)]) -> Result<(), StoreError> {
        Err(StoreError("down".into()))
    }
    fn timeout(&self) -> Duration {
        Duration::from_millis(10)
    }
}

#[tokio::test]
async fn row_13_unreachable_store_fails_closed_with_retry_after() {
    let clock = Arc::new(ManualClock::at_unix(END_OF_JANUARY));
    let (gw, _) = gateway(Arc::new(DownStore), clock, FailurePolicy::FailClosed);
    let header = auth("alp_0123456789abcdefABCDEF0123456789");
    let err = gw
        .authenticate(std::iter::once(header.as_bytes()))
        .await
        .unwrap_err();
    assert_eq!(err, ApiError::ServiceUnavailable { retry_after: 1 });
    assert_eq!((err.status(), err.code()), (503, "SERVICE_UNAVAILABLE"));
    assert_eq!(err.retry_after(), Some(1));
}

#[test]
fn row_14_internal_errors_leak_nothing() {
    let e = ApiError::Internal;
    assert_eq!((e.status(), e.code()), (500, "INTERNAL_ERROR"));
    let body: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "An unexpected server error occurred", "code": "INTERNAL_ERROR"})
    );
}

/// The embedded store with a hook run inside every key lookup, after the record is read.
struct Hooked {
    inner: SqliteStore,
    lookups: std::sync::atomic::AtomicU64,
    hook: Box<dyn Fn() -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>,
    _dir: tempfile::TempDir,
}

impl Hooked {
    fn new(
        hook: impl Fn() -> futures_util::future::BoxFuture<'static, ()> + Send + Sync + 'static,
    ) -> Arc<Self> {
        let dir = tempfile::tempdir().unwrap();
        Arc::new(Self {
            inner: SqliteStore::open(dir.path()).unwrap(),
            lookups: Default::default(),
            hook: Box::new(hook),
            _dir: dir,
        })
    }

    fn lookups(&self) -> u64 {
        self.lookups.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl Store for Hooked {
    async fn insert_key(&self, r: KeyRecord) -> Result<(), StoreError> {
        self.inner.insert_key(r).await
    }
    async fn insert_keys(&self, r: Vec<KeyRecord>) -> Result<bool, StoreError> {
        self.inner.insert_keys(r).await
    }
    async fn key_by_digest(&self, d: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let record = self.inner.key_by_digest(d).await;
        (self.hook)().await;
        record
    }
    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.key_by_id(id).await
    }
    async fn list_keys(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<KeyRecord>>, StoreError> {
        self.inner.list_keys(after, limit).await
    }
    async fn update_key(
        &self,
        id: &str,
        u: KeyUpdate,
        t: SystemTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.update_key(id, u, t).await
    }
    async fn rotate_key(
        &self,
        id: &str,
        r: Rotation,
        t: SystemTime,
    ) -> Result<Option<(KeyRecord, Vec<KeyDigest>)>, StoreError> {
        self.inner.rotate_key(id, r, t).await
    }
    async fn touch_keys(&self, used: &[(String, SystemTime)]) -> Result<(), StoreError> {
        self.inner.touch_keys(used).await
    }
    async fn append_audit(&self, e: AuditEntry, keep: SystemTime) -> Result<(), StoreError> {
        self.inner.append_audit(e, keep).await
    }
    async fn audit_page(&self, b: Option<u64>, n: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit_page(b, n).await
    }
    async fn insert_account(&self, r: AccountRecord) -> Result<bool, StoreError> {
        self.inner.insert_account(r).await
    }
    async fn account_by_id(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        self.inner.account_by_id(id).await
    }
    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<AccountRecord>>, StoreError> {
        self.inner.list_accounts(after, limit).await
    }
    async fn update_account(
        &self,
        id: &str,
        u: AccountUpdate,
        t: SystemTime,
    ) -> Result<Option<AccountRecord>, StoreError> {
        self.inner.update_account(id, u, t).await
    }
    async fn keys_of_account(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.keys_of_account(id).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait]
impl LeaseBackend for Hooked {
    async fn apply(&self, s: &str, op: &LeaseOp, t: Instant) -> Result<LeaseAnswer, StoreError> {
        self.inner.apply(s, op, t).await
    }
    async fn apply_all(&self, due: &[Due]) -> Vec<Option<LeaseAnswer>> {
        self.inner.apply_all(due).await
    }
    async fn used(&self, s: &str, p: Period) -> Result<u64, StoreError> {
        self.inner.used(s, p).await
    }
    async fn days(&self, s: &str, from: Day, to: Day) -> Result<Vec<(Day, u64)>, StoreError> {
        self.inner.days(s, from, to).await
    }
    async fn count_days(&self, day: Day, calls: &[(String, u64)]) -> Result<(), StoreError> {
        self.inner.count_days(day, calls).await
    }
    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }
}

#[tokio::test]
async fn concurrent_misses_of_one_key_read_the_store_once() {
    let store = Hooked::new(|| Box::pin(tokio::time::sleep(Duration::from_millis(20))));
    let clock = Arc::new(ManualClock::at_unix(END_OF_JANUARY));
    let (gw, keys) = gateway(store.clone(), clock, FailurePolicy::FailOpen);
    let (_, header) = new_key(&keys).await;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let gw = gw.clone();
            let header = header.clone();
            tokio::spawn(async move {
                gw.authenticate(std::iter::once(header.as_bytes()))
                    .await
                    .is_ok()
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap());
    }
    assert_eq!(store.lookups(), 1);

    // Unknown keys are remembered too: a flood of one junk key reads the store once.
    let junk = auth("alp_0123456789abcdefABCDEF0123456789");
    for _ in 0..10 {
        assert_eq!(
            gw.authenticate(std::iter::once(junk.as_bytes()))
                .await
                .unwrap_err(),
            ApiError::InvalidKey
        );
    }
    assert_eq!(store.lookups(), 2);
}

#[tokio::test]
async fn a_revocation_during_a_key_fetch_is_not_undone_by_the_fetch() {
    // The first lookup stops after reading the (still active) record until told to go on.
    let (fetched_tx, fetched_rx) = tokio::sync::oneshot::channel::<()>();
    let fetched_tx = std::sync::Mutex::new(Some(fetched_tx));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = release.clone();
    let store = Hooked::new(move || {
        let first = fetched_tx.lock().unwrap().take();
        let gate = gate.clone();
        Box::pin(async move {
            if let Some(tx) = first {
                let _ = tx.send(());
                let _ = gate.acquire().await.map(|p| p.forget());
            }
        })
    });
    let clock = Arc::new(ManualClock::at_unix(END_OF_JANUARY));
    let (gw, keys) = gateway(store.clone(), clock, FailurePolicy::FailClosed);
    let (view, header) = new_key(&keys).await;
    let first = {
        let (gw, header) = (gw.clone(), header.clone());
        tokio::spawn(async move { gw.authenticate(std::iter::once(header.as_bytes())).await })
    };
    fetched_rx.await.unwrap();
    keys.revoke(&view.id).await.unwrap();
    release.add_permits(1);
    // The call whose fetch began before the revocation may finish with what it read…
    assert!(first.await.unwrap().is_ok());
    // …but the cache does not keep it: the next call reads the store and is refused.
    assert_eq!(
        gw.authenticate(std::iter::once(header.as_bytes()))
            .await
            .unwrap_err(),
        ApiError::InvalidKey
    );
    assert_eq!(store.lookups(), 2);
    // Revoked is final: re-activation is refused, and the record stays revoked.
    let reactivate = keys
        .change(
            &view.id,
            audiolib::keys::ChangeKey {
                status: Some(audiolib::store::KeyStatus::Active),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(
        reactivate,
        Err(audiolib::keys::AdminError::Revoked(_))
    ));
    let stored = store.update_key(
        &view.id,
        KeyUpdate {
            status: Some(audiolib::store::KeyStatus::Active),
            ..Default::default()
        },
        SystemTime::now(),
    );
    assert_eq!(
        stored.await.unwrap().unwrap().status,
        audiolib::store::KeyStatus::Revoked,
        "a racing re-activation cannot undo a revocation"
    );
}

#[tokio::test]
async fn a_key_changed_within_the_second_it_was_used_is_seen_changed_at_once() {
    // The clock stands still: every call falls in the second the thread's recent callers
    // were filled in, so only the invalidation can void them.
    let store = Hooked::new(|| Box::pin(async {}));
    let clock = Arc::new(ManualClock::at_unix(END_OF_JANUARY));
    let (gw, keys) = gateway(store.clone(), clock.clone(), FailurePolicy::FailClosed);
    let (view, header) = new_key(&keys).await;
    let call = |gw: Arc<Gateway>| {
        let header = header.clone();
        async move { gw.authenticate(std::iter::once(header.as_bytes())).await }
    };
    for _ in 0..5 {
        assert!(call(gw.clone()).await.is_ok());
    }
    assert_eq!(store.lookups(), 1, "served from the caches");

    // A second gateway on the same thread and store has slots of its own.
    let (other, _) = gateway(store.clone(), clock, FailurePolicy::FailClosed);
    assert!(call(other.clone()).await.is_ok());
    assert_eq!(store.lookups(), 2);

    keys.change(
        &view.id,
        audiolib::keys::ChangeKey {
            status: Some(audiolib::store::KeyStatus::Disabled),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(call(gw.clone()).await.unwrap_err(), ApiError::InvalidKey);
    keys.revoke(&view.id).await.unwrap();
    assert_eq!(call(gw).await.unwrap_err(), ApiError::InvalidKey);
}

#[tokio::test]
async fn a_key_in_use_is_read_again_before_its_cache_entry_expires() {
    // The key cache's TTL is 60 s: a key in use is read again from 45 s on, in the background,
    // so its calls never wait on (or fail with) a fetch when the entry would have expired.
    let store = Hooked::new(|| Box::pin(async {}));
    let clock = Arc::new(ManualClock::at_unix(END_OF_JANUARY));
    let (gw, keys) = gateway(store.clone(), clock.clone(), FailurePolicy::FailClosed);
    let (view, header) = new_key(&keys).await;
    let call = || gw.authenticate(std::iter::once(header.as_bytes()));
    let read_again = |lookups: u64| {
        let store = store.clone();
        async move {
            for _ in 0..1000 {
                if store.lookups() == lookups {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            panic!("{} lookups, expected {lookups}", store.lookups());
        }
    };
    assert!(call().await.is_ok());
    clock.set_unix(END_OF_JANUARY + 44);
    assert!(call().await.is_ok());
    assert_eq!(store.lookups(), 1, "not due yet");
    clock.set_unix(END_OF_JANUARY + 45);
    assert!(call().await.is_ok(), "served while it is read again");
    read_again(2).await;
    // What the read found replaced the entry: a change made behind the cache's back (no
    // invalidation; the TTL was the only backstop) is seen at the next read.
    let disabled = KeyUpdate {
        status: Some(audiolib::store::KeyStatus::Disabled),
        ..Default::default()
    };
    store
        .update_key(&view.id, disabled, SystemTime::now())
        .await
        .unwrap();
    clock.set_unix(END_OF_JANUARY + 89);
    assert!(
        call().await.is_ok(),
        "the entry read at 45 s is not due before 90 s"
    );
    clock.set_unix(END_OF_JANUARY + 90);
    let _ = call().await;
    read_again(3).await;
    clock.set_unix(END_OF_JANUARY + 91);
    assert_eq!(call().await.unwrap_err(), ApiError::InvalidKey);
    assert_eq!(store.lookups(), 3);
}

/// Usage history (SPEC §9): calls on two days of the gateway's clock are counted on each, on
/// both stores. The clock starts 10 s before the end of today (Redis drops counters whose
/// expiry, reckoned from the day, has passed on its own clock).
async fn history_follows_the_clock<S: Store + LeaseBackend>(store: Arc<S>) {
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let end_of_today = (now / 86_400 + 1) * 86_400;
    let clock = Arc::new(ManualClock::at_unix(end_of_today - 10));
    let (gw, keys) = gateway(store, clock.clone(), FailurePolicy::FailClosed);
    let (view, header) = new_key(&keys).await;
    let key = gw
        .authenticate(std::iter::once(header.as_bytes()))
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(gw.audio(&key, BODY).await.result.is_ok());
    }
    gw.quota().sync(true).await;
    clock.set_unix(end_of_today + 5);
    for _ in 0..2 {
        assert!(gw.audio(&key, BODY).await.result.is_ok());
    }
    gw.quota().sync(true).await;
    let today = Day((now / 86_400) as u32);
    let (subject, days) = keys
        .history(&view.id, Day(today.0 - 1), Day(today.0 + 2))
        .await
        .unwrap();
    assert_eq!(subject, view.id);
    let counts: Vec<u64> = days.iter().map(|(_, n)| *n).collect();
    assert_eq!(counts, [0, 3, 2, 0], "{days:?}");
    assert_eq!(days[1].0, today);
}

#[tokio::test]
async fn usage_history_counts_each_day_on_the_embedded_store() {
    let data = tempfile::tempdir().unwrap();
    history_follows_the_clock(Arc::new(SqliteStore::open(data.path()).unwrap())).await;
}

#[path = "common/mod.rs"]
mod common;

#[tokio::test]
async fn usage_history_counts_each_day_on_redis() {
    let redis = common::RedisServer::start();
    let store =
        audiolib::store::redis::RedisStore::new(&redis.url(), Duration::from_secs(1)).unwrap();
    history_follows_the_clock(Arc::new(store)).await;
}
