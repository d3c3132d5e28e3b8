//! Key management (SPEC §3, §7): the operations behind the admin API, on any store.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::auth::{NewKey, mint_key, new_id};
use crate::cache::KeyCache;
use crate::clock::Clock;
use crate::config::Plan;
use crate::quota::Period;
use crate::store::lease::Quota;
use crate::store::{KeyRecord, KeyStatus, KeyUpdate, Store, StoreError, rfc3339};

/// A key as the admin API shows it: never the secret, never the digest.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyView {
    pub id: String,
    pub prefix: String,
    pub name: String,
    pub plan: String,
    pub monthly_limit: Option<u64>,
    pub status: KeyStatus,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&KeyRecord> for KeyView {
    fn from(r: &KeyRecord) -> Self {
        Self {
            id: r.id.clone(),
            prefix: r.prefix.clone(),
            name: r.name.clone(),
            plan: r.plan.clone(),
            monthly_limit: r.monthly_limit,
            status: r.status,
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
        }
    }
}

/// What an admin asked for when creating a key.
#[derive(Debug, Clone, Default)]
pub struct CreateKey {
    pub name: String,
    pub plan: Option<String>,
    /// `None`: the plan's default; `Some(None)`: unlimited.
    pub monthly_limit: Option<Option<u64>>,
}

/// A change requested through `PATCH`.
#[derive(Debug, Clone, Default)]
pub struct ChangeKey {
    pub plan: Option<String>,
    pub monthly_limit: Option<Option<u64>>,
    pub status: Option<KeyStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unknown plan '{0}'")]
    UnknownPlan(String),
    #[error("no key with id '{0}'")]
    NotFound(String),
    #[error("key '{0}' is revoked; revocation is final")]
    Revoked(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct KeyService {
    store: Arc<dyn Store>,
    quota: Arc<Quota>,
    cache: Arc<KeyCache>,
    plans: BTreeMap<String, Plan>,
    default_plan: String,
    clock: Arc<dyn Clock>,
}

impl KeyService {
    pub fn new(
        store: Arc<dyn Store>,
        quota: Arc<Quota>,
        cache: Arc<KeyCache>,
        plans: BTreeMap<String, Plan>,
        default_plan: String,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            quota,
            cache,
            plans,
            default_plan,
            clock,
        }
    }

    /// Now, to the second: what every store keeps and the API shows.
    fn now(&self) -> std::time::SystemTime {
        let since = self
            .clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(since.as_secs())
    }

    fn plan(&self, name: &str) -> Result<&Plan, KeyError> {
        self.plans
            .get(name)
            .ok_or_else(|| KeyError::UnknownPlan(name.to_string()))
    }

    /// Creates a key and returns it with its secret, the only time the secret exists.
    pub async fn create(&self, req: CreateKey) -> Result<(KeyView, String), KeyError> {
        let name = req.name.trim();
        if name.is_empty() || name.len() > 200 {
            return Err(KeyError::Invalid("name must be 1 to 200 characters".into()));
        }
        let plan_name = req.plan.unwrap_or_else(|| self.default_plan.clone());
        let plan = self.plan(&plan_name)?;
        let monthly_limit = req.monthly_limit.unwrap_or(plan.monthly_limit);
        let NewKey {
            secret,
            digest,
            prefix,
        } = mint_key();
        let now = self.now();
        let record = KeyRecord {
            id: new_id("key"),
            digest,
            prefix,
            name: name.to_string(),
            plan: plan_name,
            monthly_limit,
            status: KeyStatus::Active,
            created_at: now,
            updated_at: now,
        };
        self.store.insert_key(record.clone()).await?;
        // A negative entry from someone guessing this very key must not outlive its creation.
        self.forget(&digest).await;
        Ok((KeyView::from(&record), secret))
    }

    pub async fn list(&self) -> Result<Vec<KeyView>, KeyError> {
        Ok(self
            .store
            .list_keys()
            .await?
            .iter()
            .map(KeyView::from)
            .collect())
    }

    /// The key and its usage in the current month.
    pub async fn show(&self, id: &str) -> Result<(KeyView, Period, u64), KeyError> {
        let record = self.find(id).await?;
        let period = Period::containing(self.clock.now());
        let used = self.quota.usage(&record.id, period).await?;
        Ok((KeyView::from(&record), period, used))
    }

    pub async fn change(&self, id: &str, change: ChangeKey) -> Result<KeyView, KeyError> {
        let record = self.find(id).await?;
        if record.status == KeyStatus::Revoked && change.status != Some(KeyStatus::Revoked) {
            return Err(KeyError::Revoked(id.to_string()));
        }
        // A new plan brings its default limit unless a limit is given too.
        let monthly_limit = match (&change.plan, change.monthly_limit) {
            (_, Some(limit)) => Some(limit),
            (Some(plan), None) => Some(self.plan(plan)?.monthly_limit),
            (None, None) => None,
        };
        if let Some(plan) = &change.plan {
            self.plan(plan)?;
        }
        let update = KeyUpdate {
            plan: change.plan,
            monthly_limit,
            status: change.status,
        };
        let reactivating = update.status.is_some_and(|s| s != KeyStatus::Revoked);
        let updated = self
            .store
            .update_key(id, update, self.now())
            .await?
            .ok_or_else(|| KeyError::NotFound(id.to_string()))?;
        self.forget(&updated.digest).await;
        // Revoked between our read and the store's atomic update: the store kept it revoked.
        if reactivating && updated.status == KeyStatus::Revoked {
            return Err(KeyError::Revoked(id.to_string()));
        }
        Ok(KeyView::from(&updated))
    }

    pub async fn revoke(&self, id: &str) -> Result<KeyView, KeyError> {
        self.change(
            id,
            ChangeKey {
                status: Some(KeyStatus::Revoked),
                ..Default::default()
            },
        )
        .await
    }

    /// Drops the key from this node's cache and tells the other nodes to do the same.
    async fn forget(&self, digest: &crate::auth::KeyDigest) {
        self.cache.invalidate(digest).await;
        if let Err(e) = self.store.announce(digest).await {
            // The other nodes' cache TTL is the backstop.
            log::warn!("could not announce a key change: {e}");
        }
    }

    async fn find(&self, id: &str) -> Result<KeyRecord, KeyError> {
        self.store
            .key_by_id(id)
            .await?
            .ok_or_else(|| KeyError::NotFound(id.to_string()))
    }
}
