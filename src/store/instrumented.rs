//! A `Store` decorator that records each operation's latency and failures for `/metrics`
//! (quota reservations are timed by [`super::lease::Quota`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;

use super::{
    AccountRecord, AccountUpdate, AuditEntry, Invalidation, KeyRecord, KeyUpdate, Rotation, Store,
    StoreError,
};
use crate::auth::KeyDigest;
use crate::metrics::StoreMetrics;

pub struct Instrumented {
    inner: Arc<dyn Store>,
    metrics: StoreMetrics,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Store>, metrics: StoreMetrics) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .latency
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.errors.with_label_values(&[op]).inc();
        }
        result
    }
}

#[async_trait]
impl Store for Instrumented {
    async fn insert_key(&self, record: KeyRecord) -> Result<(), StoreError> {
        self.timed("insert_key", self.inner.insert_key(record))
            .await
    }
    async fn key_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        self.timed("key_by_digest", self.inner.key_by_digest(digest))
            .await
    }
    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.timed("key_by_id", self.inner.key_by_id(id)).await
    }
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.timed("list_keys", self.inner.list_keys()).await
    }
    async fn update_key(
        &self,
        id: &str,
        update: KeyUpdate,
        now: SystemTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.timed("update_key", self.inner.update_key(id, update, now))
            .await
    }
    async fn rotate_key(
        &self,
        id: &str,
        rotation: Rotation,
        now: SystemTime,
    ) -> Result<Option<(KeyRecord, Vec<KeyDigest>)>, StoreError> {
        self.timed("rotate_key", self.inner.rotate_key(id, rotation, now))
            .await
    }
    async fn touch_keys(&self, used: &[(String, SystemTime)]) -> Result<(), StoreError> {
        self.timed("touch_keys", self.inner.touch_keys(used)).await
    }
    async fn append_audit(
        &self,
        entry: AuditEntry,
        keep_after: SystemTime,
    ) -> Result<(), StoreError> {
        self.timed("append_audit", self.inner.append_audit(entry, keep_after))
            .await
    }
    async fn audit_page(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.timed("audit_page", self.inner.audit_page(before, limit))
            .await
    }
    async fn insert_account(&self, record: AccountRecord) -> Result<bool, StoreError> {
        self.timed("insert_account", self.inner.insert_account(record))
            .await
    }
    async fn account_by_id(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        self.timed("account_by_id", self.inner.account_by_id(id))
            .await
    }
    async fn list_accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        self.timed("list_accounts", self.inner.list_accounts())
            .await
    }
    async fn update_account(
        &self,
        id: &str,
        update: AccountUpdate,
        now: SystemTime,
    ) -> Result<Option<AccountRecord>, StoreError> {
        self.timed("update_account", self.inner.update_account(id, update, now))
            .await
    }
    async fn keys_of_account(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        self.timed("keys_of_account", self.inner.keys_of_account(id))
            .await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", self.inner.ping()).await
    }
    async fn announce(&self, digest: &KeyDigest) -> Result<(), StoreError> {
        self.timed("announce", self.inner.announce(digest)).await
    }
    fn watch(&self, sink: tokio::sync::mpsc::UnboundedSender<Invalidation>) {
        self.inner.watch(sink)
    }
}
