//! The contract of `PortalStore`, run against the embedded store and Redis alike: passwords,
//! invites used once, sessions that end after their idle time and at deletion, and the failed
//! sign-in window.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use audiolib::store::portal::{Invite, PortalStore, Session};
use audiolib::store::sqlite::SqliteStore;
use audiolib::store::{AccountRecord, AccountStatus, Store};

async fn contract(store: Arc<dyn PortalStore>, accounts: Arc<dyn Store>) {
    let now = SystemTime::now();
    let account = AccountRecord {
        id: "acct_portal".into(),
        email: "p@example.com".into(),
        name: "P".into(),
        plan: "free".into(),
        monthly_limit: Some(10),
        status: AccountStatus::Active,
        created_at: UNIX_EPOCH + Duration::from_secs(1),
        updated_at: UNIX_EPOCH + Duration::from_secs(1),
    };
    assert!(accounts.insert_account(account).await.unwrap());

    // Emails and passwords.
    assert_eq!(
        store.account_id_by_email("p@example.com").await.unwrap(),
        Some("acct_portal".into())
    );
    assert_eq!(
        store.account_id_by_email("q@example.com").await.unwrap(),
        None
    );
    assert_eq!(store.password_hash("acct_portal").await.unwrap(), None);
    store
        .set_password_hash("acct_portal", "$argon2id$one")
        .await
        .unwrap();
    store
        .set_password_hash("acct_portal", "$argon2id$two")
        .await
        .unwrap();
    assert_eq!(
        store.password_hash("acct_portal").await.unwrap().as_deref(),
        Some("$argon2id$two")
    );

    // An invite is used once, whoever asks.
    let invite = Invite {
        account_id: "acct_portal".into(),
        expires_at: UNIX_EPOCH
            + Duration::from_secs(now.duration_since(UNIX_EPOCH).unwrap().as_secs() + 600),
        used: false,
    };
    store.insert_invite("d1", invite.clone()).await.unwrap();
    assert_eq!(store.invite("d1").await.unwrap(), Some(invite.clone()));
    assert_eq!(store.invite("d2").await.unwrap(), None);
    let (first, second) = tokio::join!(store.use_invite("d1"), store.use_invite("d1"));
    assert!(first.unwrap() ^ second.unwrap(), "exactly one use wins");
    assert!(!store.use_invite("d1").await.unwrap());
    assert!(!store.use_invite("d2").await.unwrap());
    assert!(store.invite("d1").await.unwrap().unwrap().used);

    // A session lasts while used, ends after its idle time, and at deletion.
    let session = Session {
        account_id: "acct_portal".into(),
        created_at: UNIX_EPOCH
            + Duration::from_secs(now.duration_since(UNIX_EPOCH).unwrap().as_secs()),
    };
    let idle = Duration::from_secs(2);
    store
        .insert_session("s1", session.clone(), idle)
        .await
        .unwrap();
    store
        .insert_session("s2", session.clone(), idle)
        .await
        .unwrap();
    assert_eq!(
        store.session("s1", idle, SystemTime::now()).await.unwrap(),
        Some(session.clone())
    );
    assert_eq!(
        store.session("s3", idle, SystemTime::now()).await.unwrap(),
        None
    );
    store.delete_session("s2").await.unwrap();
    assert_eq!(
        store.session("s2", idle, SystemTime::now()).await.unwrap(),
        None
    );
    let started = std::time::Instant::now();
    loop {
        let found = store.session("s1", idle, SystemTime::now()).await.unwrap();
        // Polled every 0.5 s, each use restarting its idle time: it stays.
        assert!(found.is_some(), "a used session ended");
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let idle_since = std::time::Instant::now();
    loop {
        if store
            .session("s1", Duration::from_secs(2), SystemTime::now())
            .await
            .unwrap()
            .is_none()
        {
            break;
        }
        // Looking restarts the idle time: look rarely, and only give up well after it.
        assert!(
            idle_since.elapsed() < Duration::from_secs(10),
            "an idle session lasted"
        );
        tokio::time::sleep(Duration::from_millis(2600)).await;
    }

    // Failed sign-ins count within the window from the first, then start again.
    let window = Duration::from_secs(2);
    assert_eq!(
        store
            .failures("f", window, SystemTime::now())
            .await
            .unwrap()
            .0,
        0
    );
    for n in 1..=3 {
        assert_eq!(
            store
                .add_failure("f", window, SystemTime::now())
                .await
                .unwrap(),
            n
        );
    }
    assert_eq!(
        store
            .add_failure("g", window, SystemTime::now())
            .await
            .unwrap(),
        1
    );
    let (count, age) = store
        .failures("f", window, SystemTime::now())
        .await
        .unwrap();
    assert_eq!(count, 3);
    assert!(age <= 2, "{age}");
    // A cleared key starts again; the others keep their count.
    store.clear_failures("g").await.unwrap();
    let now = SystemTime::now();
    assert_eq!(store.failures("g", window, now).await.unwrap().0, 0);
    assert_eq!(store.failures("f", window, now).await.unwrap().0, 3);
    common::wait_until("the window to pass", Duration::from_secs(10), || {
        block_on(store.failures("f", window, SystemTime::now())).0 == 0
    });
    assert_eq!(
        store
            .add_failure("f", window, SystemTime::now())
            .await
            .unwrap(),
        1
    );
}

/// Runs a store future from the synchronous polling helper (inside a multi-thread runtime).
fn block_on<T>(f: impl std::future::Future<Output = Result<T, audiolib::store::StoreError>>) -> T {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_meets_the_portal_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    contract(store.clone(), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_meets_the_portal_contract() {
    let redis = common::RedisServer::start();
    let store = Arc::new(
        audiolib::store::redis::RedisStore::new(&redis.url(), Duration::from_millis(500)).unwrap(),
    );
    contract(store.clone(), store).await;
}
