//! Key management (SPEC §3, §7, §9): the operations behind the admin API, on any store.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::auth::{NewKey, mint_key, new_id};
use crate::cache::KeyCache;
use crate::clock::Clock;
use crate::config::Plan;
use crate::quota::Period;
use crate::store::lease::Quota;
use crate::store::{
    AccountRecord, AccountStatus, KeyRecord, KeyStatus, KeyUpdate, Store, StoreError, rfc3339,
};

/// A key as the admin API shows it: never the secret, never the digest.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyView {
    pub id: String,
    /// The account whose plan and monthly limit the key shares, if any.
    pub account_id: Option<String>,
    pub prefix: String,
    pub name: String,
    pub plan: String,
    pub monthly_limit: Option<u64>,
    pub status: KeyStatus,
    pub created_at: String,
    pub updated_at: String,
}

impl KeyView {
    /// The key as shown: a key of an account shows its account's plan and limit, the ones
    /// that apply to it.
    fn of(r: &KeyRecord, account: Option<&AccountRecord>) -> Self {
        Self {
            id: r.id.clone(),
            account_id: r.account_id.clone(),
            prefix: r.prefix.clone(),
            name: r.name.clone(),
            plan: account.map_or(&r.plan, |a| &a.plan).clone(),
            monthly_limit: account.map_or(r.monthly_limit, |a| a.monthly_limit),
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
    /// The account that owns the key; its plan and limit then apply (no `plan` or
    /// `monthly_limit` of the key's own).
    pub account_id: Option<String>,
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

/// Why a key or account operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("unknown plan '{0}'")]
    UnknownPlan(String),
    #[error("no key with id '{0}'")]
    NotFound(String),
    #[error("key '{0}' is revoked; revocation is final")]
    Revoked(String),
    #[error("{0}")]
    Invalid(String),
    /// A field of the request that cannot be used as given.
    #[error("{field}: {message}")]
    InvalidField {
        field: &'static str,
        message: String,
    },
    #[error("no account with id '{0}'")]
    AccountNotFound(String),
    #[error("account '{0}' is closed; closing is final")]
    AccountClosed(String),
    #[error("an account with email '{0}' already exists")]
    EmailTaken(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AdminError {
    pub fn field(field: &'static str, message: impl Into<String>) -> Self {
        AdminError::InvalidField {
            field,
            message: message.into(),
        }
    }
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

    fn now(&self) -> std::time::SystemTime {
        crate::clock::to_second(self.clock.now())
    }

    pub(crate) fn plan(&self, name: &str) -> Result<&Plan, AdminError> {
        self.plans
            .get(name)
            .ok_or_else(|| AdminError::UnknownPlan(name.to_string()))
    }

    pub(crate) fn default_plan(&self) -> &str {
        &self.default_plan
    }

    /// The account of a key being created, which must exist and be active.
    async fn owning_account(&self, id: &str) -> Result<AccountRecord, AdminError> {
        let account =
            self.store.account_by_id(id).await?.ok_or_else(|| {
                AdminError::field("account_id", format!("no account with id '{id}'"))
            })?;
        if account.status != AccountStatus::Active {
            return Err(AdminError::field(
                "account_id",
                format!("account '{id}' is {}", account.status.as_str()),
            ));
        }
        Ok(account)
    }

    /// The key's account, for showing it (`None` for a key without one, or one whose
    /// account is gone).
    async fn account_of(&self, r: &KeyRecord) -> Result<Option<AccountRecord>, AdminError> {
        match &r.account_id {
            Some(id) => Ok(self.store.account_by_id(id).await?),
            None => Ok(None),
        }
    }

    /// Creates a key and returns it with its secret, the only time the secret exists.
    pub async fn create(&self, req: CreateKey) -> Result<(KeyView, String), AdminError> {
        let name = req.name.trim();
        if name.is_empty() || name.len() > 200 {
            return Err(AdminError::Invalid(
                "name must be 1 to 200 characters".into(),
            ));
        }
        let account = match &req.account_id {
            Some(id) => {
                for (field, given) in [
                    ("plan", req.plan.is_some()),
                    ("monthly_limit", req.monthly_limit.is_some()),
                ] {
                    if given {
                        return Err(AdminError::field(
                            field,
                            "a key of an account uses its account's plan and limit",
                        ));
                    }
                }
                Some(self.owning_account(id).await?)
            }
            None => None,
        };
        let (plan_name, monthly_limit) = match &account {
            Some(a) => (a.plan.clone(), a.monthly_limit),
            None => {
                let plan_name = req.plan.unwrap_or_else(|| self.default_plan.clone());
                let limit = req
                    .monthly_limit
                    .unwrap_or(self.plan(&plan_name)?.monthly_limit);
                (plan_name, limit)
            }
        };
        let NewKey {
            secret,
            digest,
            prefix,
        } = mint_key();
        let now = self.now();
        let record = KeyRecord {
            id: new_id("key"),
            digest,
            account_id: req.account_id,
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
        Ok((KeyView::of(&record, account.as_ref()), secret))
    }

    pub async fn list(&self) -> Result<Vec<KeyView>, AdminError> {
        let records = self.store.list_keys().await?;
        // Each account read once, however many of its keys are listed.
        let mut accounts: BTreeMap<String, Option<AccountRecord>> = BTreeMap::new();
        let mut views = Vec::with_capacity(records.len());
        for r in &records {
            let account = match &r.account_id {
                Some(id) if !accounts.contains_key(id) => {
                    let account = self.store.account_by_id(id).await?;
                    accounts.entry(id.clone()).or_insert(account).as_ref()
                }
                Some(id) => accounts[id].as_ref(),
                None => None,
            };
            views.push(KeyView::of(r, account));
        }
        Ok(views)
    }

    /// The keys of `account`, as shown.
    pub async fn of_account(&self, account: &AccountRecord) -> Result<Vec<KeyView>, AdminError> {
        let keys = self.store.keys_of_account(&account.id).await?;
        Ok(keys.iter().map(|k| KeyView::of(k, Some(account))).collect())
    }

    /// The key and its usage in the current month: for a key of an account, the account's
    /// usage, which all its keys share.
    pub async fn show(&self, id: &str) -> Result<(KeyView, Period, u64), AdminError> {
        let record = self.find(id).await?;
        let account = self.account_of(&record).await?;
        let period = Period::containing(self.clock.now());
        let subject = account.as_ref().map_or(&record.id, |a| &a.id);
        let used = self.quota.usage(subject, period).await?;
        Ok((KeyView::of(&record, account.as_ref()), period, used))
    }

    pub async fn change(&self, id: &str, change: ChangeKey) -> Result<KeyView, AdminError> {
        let record = self.find(id).await?;
        if record.status == KeyStatus::Revoked && change.status != Some(KeyStatus::Revoked) {
            return Err(AdminError::Revoked(id.to_string()));
        }
        if record.account_id.is_some() {
            for (field, given) in [
                ("plan", change.plan.is_some()),
                ("monthly_limit", change.monthly_limit.is_some()),
            ] {
                if given {
                    return Err(AdminError::field(
                        field,
                        "a key of an account uses its account's plan and limit: change the account",
                    ));
                }
            }
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
            .ok_or_else(|| AdminError::NotFound(id.to_string()))?;
        self.forget(&updated.digest).await;
        // Revoked between our read and the store's atomic update: the store kept it revoked.
        if reactivating && updated.status == KeyStatus::Revoked {
            return Err(AdminError::Revoked(id.to_string()));
        }
        let account = self.account_of(&updated).await?;
        Ok(KeyView::of(&updated, account.as_ref()))
    }

    pub async fn revoke(&self, id: &str) -> Result<KeyView, AdminError> {
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
    pub(crate) async fn forget(&self, digest: &crate::auth::KeyDigest) {
        self.cache.invalidate(digest).await;
        if let Err(e) = self.store.announce(digest).await {
            // The other nodes' cache TTL is the backstop.
            log::warn!("could not announce a key change: {e}");
        }
    }

    async fn find(&self, id: &str) -> Result<KeyRecord, AdminError> {
        self.store
            .key_by_id(id)
            .await?
            .ok_or_else(|| AdminError::NotFound(id.to_string()))
    }
}
