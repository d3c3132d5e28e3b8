//! The embedded store: one process, no Redis. Exact under concurrency because each key's
//! counter sits behind its own mutex.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use async_trait::async_trait;

use super::{KeyRecord, KeyUpdate, Store, StoreError};
use crate::auth::KeyDigest;
use crate::locks::{PerKey, lock, read, write};
use crate::quota::{Period, Reservation};

#[derive(Default)]
pub struct MemoryStore {
    // std locks, not Tokio ones: no `.await` happens while they are held, and every critical
    // section is a few map operations.
    keys: RwLock<Keys>,
    usage: PerKey<Mutex<Usage>>,
}

#[derive(Default)]
struct Keys {
    by_id: HashMap<String, KeyRecord>,
    id_by_digest: HashMap<KeyDigest, String>,
}

/// The counter of the latest period seen; an older period reads as zero.
#[derive(Default)]
struct Usage {
    period: Option<Period>,
    used: u64,
}

impl Usage {
    /// The counter for `period`, starting it afresh when a new month begins.
    fn for_period(&mut self, period: Period) -> &mut u64 {
        if self.period != Some(period) {
            self.period = Some(period);
            self.used = 0;
        }
        &mut self.used
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn counter(&self, key_id: &str) -> Arc<Mutex<Usage>> {
        self.usage.get_or_default(key_id)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert_key(&self, record: KeyRecord) -> Result<(), StoreError> {
        let mut keys = write(&self.keys);
        keys.id_by_digest.insert(record.digest, record.id.clone());
        keys.by_id.insert(record.id.clone(), record);
        Ok(())
    }

    async fn key_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        let keys = read(&self.keys);
        Ok(keys
            .id_by_digest
            .get(digest)
            .and_then(|id| keys.by_id.get(id))
            .cloned())
    }

    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(read(&self.keys).by_id.get(id).cloned())
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let mut all: Vec<_> = read(&self.keys).by_id.values().cloned().collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(all)
    }

    async fn update_key(
        &self,
        id: &str,
        update: KeyUpdate,
        now: SystemTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut keys = write(&self.keys);
        let Some(record) = keys.by_id.get_mut(id) else {
            return Ok(None);
        };
        if let Some(plan) = update.plan {
            record.plan = plan;
        }
        if let Some(limit) = update.monthly_limit {
            record.monthly_limit = limit;
        }
        if let Some(status) = update.status {
            record.status = status;
        }
        record.updated_at = now;
        Ok(Some(record.clone()))
    }

    async fn reserve(
        &self,
        key_id: &str,
        period: Period,
        limit: Option<u64>,
    ) -> Result<Reservation, StoreError> {
        let counter = self.counter(key_id);
        let mut usage = lock(&counter);
        let used = usage.for_period(period);
        Ok(match limit {
            Some(limit) if *used >= limit => Reservation::Denied { used: *used },
            _ => {
                *used += 1;
                Reservation::Granted { used: *used }
            }
        })
    }

    async fn refund(&self, key_id: &str, period: Period) -> Result<(), StoreError> {
        let counter = self.counter(key_id);
        let mut usage = lock(&counter);
        if usage.period == Some(period) {
            usage.used = usage.used.saturating_sub(1);
        }
        Ok(())
    }

    async fn absorb(&self, key_id: &str, period: Period, count: u64) -> Result<(), StoreError> {
        let counter = self.counter(key_id);
        *lock(&counter).for_period(period) += count;
        Ok(())
    }

    async fn usage(&self, key_id: &str, period: Period) -> Result<u64, StoreError> {
        let Some(counter) = self.usage.get(key_id) else {
            return Ok(0);
        };
        let usage = lock(&counter);
        Ok(if usage.period == Some(period) {
            usage.used
        } else {
            0
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
