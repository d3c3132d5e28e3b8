//! The per-node key cache (SPEC §3): key records by digest, in front of the store.
//!
//! Known keys and unknown keys live in two separate `moka` caches so a flood of random keys
//! can only churn the small negative cache, never evict a good key. Concurrent misses of one
//! digest share a single store fetch (`try_get_with`). TTLs are the backstop; changes made
//! through the admin API invalidate entries at once.

use std::sync::Arc;

use moka::future::Cache;

use crate::auth::KeyDigest;
use crate::config::KeyCacheConfig;
use crate::metrics::CacheMetrics;
use crate::store::{KeyRecord, Store, StoreError};

/// Why a lookup produced no record.
#[derive(Debug, Clone)]
enum Miss {
    Unknown,
    Store(StoreError),
}

pub struct KeyCache {
    store: Arc<dyn Store>,
    known: Cache<KeyDigest, Arc<KeyRecord>>,
    unknown: Cache<KeyDigest, ()>,
    /// Hits count answers from either cache: both spare the store a read.
    pub metrics: CacheMetrics,
}

impl KeyCache {
    pub fn new(store: Arc<dyn Store>, config: &KeyCacheConfig) -> Self {
        Self {
            store,
            known: Cache::builder()
                .max_capacity(config.capacity)
                .time_to_live(config.ttl)
                .build(),
            unknown: Cache::builder()
                .max_capacity(config.negative_capacity)
                .time_to_live(config.negative_ttl)
                .build(),
            metrics: CacheMetrics::new(),
        }
    }

    /// The record for `digest`, `None` if no such key exists.
    pub async fn get(&self, digest: KeyDigest) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        if let Some(record) = self.known.get(&digest).await {
            self.metrics.hits.inc();
            return Ok(Some(record));
        }
        if self.unknown.contains_key(&digest) {
            self.metrics.hits.inc();
            return Ok(None);
        }
        self.metrics.misses.inc();
        let store = &self.store;
        let fetched = self
            .known
            .try_get_with(digest, async move {
                match store.key_by_digest(&digest).await {
                    Ok(Some(record)) => Ok(Arc::new(record)),
                    Ok(None) => Err(Miss::Unknown),
                    Err(e) => Err(Miss::Store(e)),
                }
            })
            .await;
        match fetched {
            Ok(record) => Ok(Some(record)),
            Err(miss) => match &*miss {
                Miss::Unknown => {
                    self.unknown.insert(digest, ()).await;
                    Ok(None)
                }
                Miss::Store(e) => Err(e.clone()),
            },
        }
    }

    /// Forgets everything (after missed invalidations).
    pub fn invalidate_all(&self) {
        self.known.invalidate_all();
        self.unknown.invalidate_all();
    }

    /// Forgets `digest` so the next lookup reads the store (after a create, update or revoke).
    pub async fn invalidate(&self, digest: &KeyDigest) {
        self.known.invalidate(digest).await;
        self.unknown.invalidate(digest).await;
    }
}
