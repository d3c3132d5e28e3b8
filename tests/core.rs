//! The request core without HTTP, where time and the store can be controlled: month
//! rollover with an injected clock, the fail-closed store policy (row 13) and the internal
//! error shape (row 14).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use audiolib::api::Gateway;
use audiolib::auth::KeyDigest;
use audiolib::cache::KeyCache;
use audiolib::catalog::CatalogHandle;
use audiolib::clock::{Clock, ManualClock};
use audiolib::config::{Config, FailurePolicy, FileConfig};
use audiolib::error::ApiError;
use audiolib::keys::{CreateKey, KeyService};
use audiolib::quota::{LocalAdmission, Period, Reservation, Source};
use audiolib::sign::Presigner;
use audiolib::store::sqlite::SqliteStore;
use audiolib::store::{KeyRecord, KeyUpdate, Store, StoreError};

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

fn gateway(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    policy: FailurePolicy,
) -> (Gateway, KeyService) {
    let config = config();
    let cache = Arc::new(KeyCache::new(store.clone(), &config.key_cache));
    let catalog = Arc::new(CatalogHandle::load(&config.catalog_dir).unwrap());
    let keys = KeyService::new(
        store.clone(),
        cache.clone(),
        config.plans.clone(),
        config.default_plan.clone(),
        clock.clone(),
    );
    let presigner = Presigner::new(
        config.s3.clone(),
        config.credentials.clone(),
        config.url_ttl,
    );
    let gw = Gateway::new(
        cache,
        store,
        catalog,
        presigner,
        clock,
        policy,
        config.max_body_bytes,
    );
    (gw, keys)
}

fn auth(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test]
async fn quota_starts_afresh_in_a_new_utc_month() {
    let clock = Arc::new(ManualClock::at_unix(END_OF_JANUARY));
    let data = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(data.path()).unwrap());
    let (gw, keys) = gateway(store.clone(), clock.clone(), FailurePolicy::FailOpen);
    let (view, secret) = keys
        .create(CreateKey {
            name: "t".into(),
            plan: None,
            monthly_limit: Some(Some(2)),
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
    store.sync(true).await;
    assert_eq!(store.usage(&view.id, feb).await.unwrap(), 1);
    let jan = Period {
        year: 2026,
        month: 1,
    };
    // Each month keeps its own count; a late report for January leaves February alone.
    assert_eq!(store.usage(&view.id, jan).await.unwrap(), 2);
    store.refund(&view.id, jan, Source::Lease).await;
    store.sync(true).await;
    assert_eq!(store.usage(&view.id, jan).await.unwrap(), 1);
    assert_eq!(store.usage(&view.id, feb).await.unwrap(), 1);
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
    async fn key_by_digest(&self, _: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn key_by_id(&self, _: &str) -> Result<Option<KeyRecord>, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
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
    async fn reserve(&self, _: &str, _: Period, _: Option<u64>) -> Result<Reservation, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn admit_local(&self, _: &str, _: Period, _: Option<u64>) -> LocalAdmission {
        LocalAdmission::Refused
    }
    async fn refund(&self, _: &str, _: Period, _: Source) {}
    async fn usage(&self, _: &str, _: Period) -> Result<u64, StoreError> {
        Err(StoreError("down".into()))
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Err(StoreError("down".into()))
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

#[tokio::test]
async fn concurrent_misses_of_one_key_read_the_store_once() {
    // Counts key lookups reaching the store.
    struct Counting(SqliteStore, std::sync::atomic::AtomicU64);
    #[async_trait]
    impl Store for Counting {
        async fn insert_key(&self, r: KeyRecord) -> Result<(), StoreError> {
            self.0.insert_key(r).await
        }
        async fn key_by_digest(&self, d: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.0.key_by_digest(d).await
        }
        async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
            self.0.key_by_id(id).await
        }
        async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
            self.0.list_keys().await
        }
        async fn update_key(
            &self,
            id: &str,
            u: KeyUpdate,
            t: SystemTime,
        ) -> Result<Option<KeyRecord>, StoreError> {
            self.0.update_key(id, u, t).await
        }
        async fn reserve(
            &self,
            id: &str,
            p: Period,
            l: Option<u64>,
        ) -> Result<Reservation, StoreError> {
            self.0.reserve(id, p, l).await
        }
        async fn admit_local(&self, id: &str, p: Period, l: Option<u64>) -> LocalAdmission {
            self.0.admit_local(id, p, l).await
        }
        async fn refund(&self, id: &str, p: Period, s: Source) {
            self.0.refund(id, p, s).await
        }
        async fn usage(&self, id: &str, p: Period) -> Result<u64, StoreError> {
            self.0.usage(id, p).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }
    let data = tempfile::tempdir().unwrap();
    let store = Arc::new(Counting(
        SqliteStore::open(data.path()).unwrap(),
        Default::default(),
    ));
    let clock = Arc::new(ManualClock::at_unix(END_OF_JANUARY));
    let (gw, keys) = gateway(store.clone(), clock, FailurePolicy::FailOpen);
    let (_, secret) = keys
        .create(CreateKey {
            name: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let header = auth(&secret);
    let gw = Arc::new(gw);
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
    assert_eq!(store.1.load(std::sync::atomic::Ordering::SeqCst), 1);

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
    assert_eq!(store.1.load(std::sync::atomic::Ordering::SeqCst), 2);
}
