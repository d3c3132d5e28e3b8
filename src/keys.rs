//! Key management (SPEC §3, §7, §9): the operations behind the admin API, on any store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};

use crate::auth::{KeyDigest, NewKey, mint_key, new_id};
use crate::cache::KeyCache;
use crate::clock::Clock;
use crate::config::Plan;
use crate::events::Event;
use crate::quota::{Day, Period};
use crate::store::lease::Quota;
use crate::store::{
    AccountRecord, AccountStatus, KeyRecord, KeyStatus, KeyUpdate, Rotation, Store, StoreError,
    rfc3339,
};
use crate::webhooks::Webhooks;

/// Longest rotation grace (SPEC §9).
pub const MAX_GRACE: Duration = Duration::from_secs(7 * 86_400);
/// Largest `meta` object, as JSON text.
pub const MAX_META_BYTES: usize = 1024;

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
    /// `expired` once past `expires_at`.
    pub status: KeyStatus,
    pub expires_at: Option<String>,
    /// The admin's own data about the key: an object, or null.
    pub meta: Value,
    /// The minute of the last call, as reported by the nodes (about a minute behind).
    pub last_used_at: Option<String>,
    /// Until when the secret replaced by the last rotation still works; absent when none does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_expires_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl KeyView {
    /// The key as shown at `now`: a key of an account shows its account's plan and limit,
    /// the ones that apply to it.
    fn of(r: &KeyRecord, account: Option<&AccountRecord>, now: SystemTime) -> Self {
        Self {
            id: r.id.clone(),
            account_id: r.account_id.clone(),
            prefix: r.prefix.clone(),
            name: r.name.clone(),
            plan: account.map_or(&r.plan, |a| &a.plan).clone(),
            monthly_limit: account.map_or(r.monthly_limit, |a| a.monthly_limit),
            status: r.state(now),
            expires_at: r.expires_at.map(rfc3339),
            meta: r
                .meta
                .as_deref()
                .and_then(|m| serde_json::from_str(m).ok())
                .unwrap_or(Value::Null),
            last_used_at: r.last_used_at.map(rfc3339),
            previous_expires_at: r
                .previous_expires_at
                .filter(|t| *t > now && r.previous_digest.is_some())
                .map(rfc3339),
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
        }
    }
}

/// `expires_at` as given: absent, `null` (no expiry) or a future instant.
pub fn check_expiry(t: Option<SystemTime>, now: SystemTime) -> Result<(), AdminError> {
    match t {
        Some(t) if t <= now => Err(AdminError::field("expires_at", "must be in the future")),
        _ => Ok(()),
    }
}

/// `meta` as stored: an object of at most [`MAX_META_BYTES`] as JSON text, or `None`.
pub fn meta_text(meta: Value) -> Result<Option<String>, AdminError> {
    match meta {
        Value::Null => Ok(None),
        Value::Object(_) => {
            let text = meta.to_string();
            if text.len() > MAX_META_BYTES {
                return Err(AdminError::field(
                    "meta",
                    format!("must be at most {MAX_META_BYTES} bytes of JSON"),
                ));
            }
            Ok(Some(text))
        }
        _ => Err(AdminError::field("meta", "must be a JSON object or null")),
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
    pub expires_at: Option<SystemTime>,
    /// An object or null (checked by [`meta_text`]).
    pub meta: Option<Value>,
}

/// A change requested through `PATCH`.
#[derive(Debug, Clone, Default)]
pub struct ChangeKey {
    pub plan: Option<String>,
    pub monthly_limit: Option<Option<u64>>,
    pub status: Option<KeyStatus>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<SystemTime>>,
    pub meta: Option<Value>,
}

/// A key of a bulk import: its digest, never the key itself.
#[derive(Debug, Clone)]
pub struct ImportKey {
    pub digest: KeyDigest,
    pub prefix: String,
    pub fields: CreateKey,
}

/// Most keys one import takes.
pub const MAX_IMPORT: usize = 10_000;

/// A key's new secret, shown once, and the key as it is after the rotation.
#[derive(Debug)]
pub struct Rotated {
    pub view: KeyView,
    pub secret: String,
    /// Until when the old secret works (`None`: it stopped at once).
    pub previous_expires_at: Option<SystemTime>,
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
    #[error("a key with one of these digests exists; nothing was imported")]
    DigestTaken,
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
    /// Where `key.*` events go; `None` without webhooks.
    events: Option<Arc<Webhooks>>,
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
            events: None,
        }
    }

    /// Records `key.created`, `key.rotated` and `key.revoked` in `events` (SPEC §9).
    pub fn with_events(mut self, events: Option<Arc<Webhooks>>) -> Self {
        self.events = events;
        self
    }

    /// Records the event `make` builds, when there are webhooks.
    pub(crate) async fn tell(&self, make: impl FnOnce(SystemTime) -> Event) {
        if let Some(events) = &self.events {
            events.emit(make(self.now())).await;
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
        let NewKey {
            secret,
            digest,
            prefix,
        } = mint_key();
        let now = self.now();
        let mut accounts = BTreeMap::new();
        let record = self
            .checked_record(req, digest, prefix, now, &mut accounts)
            .await?;
        self.store.insert_key(record.clone()).await?;
        // A negative entry from someone guessing this very key must not outlive its creation.
        self.forget(&digest).await;
        let account = record.account_id.as_ref().and_then(|id| accounts.get(id));
        let view = KeyView::of(&record, account, now);
        self.tell(|now| Event::once("key.created", &view.id, json!(view), now))
            .await;
        Ok((view, secret))
    }

    /// The record of a new key with `digest`, its fields checked as given and its plan and
    /// limit resolved: its account's for a key of one (read once into `accounts`, which a
    /// batch shares), else its own or its plan's. Not stored yet.
    async fn checked_record(
        &self,
        req: CreateKey,
        digest: KeyDigest,
        prefix: String,
        now: SystemTime,
        accounts: &mut BTreeMap<String, AccountRecord>,
    ) -> Result<KeyRecord, AdminError> {
        let name = req.name.trim();
        if name.is_empty() || name.len() > 200 {
            return Err(AdminError::field("name", "must be 1 to 200 characters"));
        }
        check_expiry(req.expires_at, now)?;
        let meta = meta_text(req.meta.unwrap_or(Value::Null))?;
        let (plan, monthly_limit) = match &req.account_id {
            Some(id) => {
                accounts_plan_only(req.plan.is_some(), req.monthly_limit.is_some())?;
                if !accounts.contains_key(id) {
                    accounts.insert(id.clone(), self.owning_account(id).await?);
                }
                let a = &accounts[id];
                (a.plan.clone(), a.monthly_limit)
            }
            None => {
                let plan = req.plan.unwrap_or_else(|| self.default_plan.clone());
                let limit = req.monthly_limit.unwrap_or(self.plan(&plan)?.monthly_limit);
                (plan, limit)
            }
        };
        Ok(KeyRecord {
            account_id: req.account_id,
            plan,
            monthly_limit,
            expires_at: req.expires_at,
            meta,
            ..KeyRecord::new(new_id("key"), digest, prefix, name.to_string(), now)
        })
    }

    /// A page of keys in creation order after the cursor, and the next page's cursor.
    pub async fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<KeyView>, Option<String>), AdminError> {
        let records = self
            .store
            .list_keys(cursor, limit)
            .await?
            .ok_or_else(unknown_cursor)?;
        let next = next_cursor(&records, limit, |r| &r.id);
        let now = self.clock.now();
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
            views.push(KeyView::of(r, account, now));
        }
        Ok((views, next))
    }

    /// The keys of `account`, as shown.
    pub async fn of_account(&self, account: &AccountRecord) -> Result<Vec<KeyView>, AdminError> {
        let keys = self.store.keys_of_account(&account.id).await?;
        let now = self.clock.now();
        Ok(keys
            .iter()
            .map(|k| KeyView::of(k, Some(account), now))
            .collect())
    }

    /// The key and its usage in the current month: for a key of an account, the account's
    /// usage, which all its keys share.
    pub async fn show(&self, id: &str) -> Result<(KeyView, Period, u64), AdminError> {
        let record = self.find(id).await?;
        let account = self.account_of(&record).await?;
        let period = Period::containing(self.clock.now());
        let subject = account.as_ref().map_or(&record.id, |a| &a.id);
        let used = self.quota.usage(subject, period).await?;
        Ok((
            KeyView::of(&record, account.as_ref(), self.clock.now()),
            period,
            used,
        ))
    }

    /// The key's own calls per UTC day from `from` to `to` (for a key of an account, its share
    /// of the account's), with the key id as the subject.
    pub async fn history(
        &self,
        id: &str,
        from: Day,
        to: Day,
    ) -> Result<(String, Vec<(Day, u64)>), AdminError> {
        // The leases count a key without an account; one inside an account has its own day
        // counters beside the account's ([`crate::key_calls`]).
        let record = self.find(id).await?;
        let days = self.quota.history(&record.id, from, to).await?;
        Ok((record.id, days))
    }

    /// Today on this node's clock, for the default range of a history.
    pub fn today(&self) -> Day {
        Day::containing(self.clock.now())
    }

    pub async fn change(&self, id: &str, change: ChangeKey) -> Result<KeyView, AdminError> {
        let record = self.find(id).await?;
        if record.status == KeyStatus::Revoked && change.status != Some(KeyStatus::Revoked) {
            return Err(AdminError::Revoked(id.to_string()));
        }
        if record.account_id.is_some() {
            accounts_plan_only(change.plan.is_some(), change.monthly_limit.is_some())?;
        }
        if change.status == Some(KeyStatus::Expired) {
            return Err(AdminError::field(
                "status",
                "a key expires at its expires_at: set that instead",
            ));
        }
        if let Some(expires_at) = change.expires_at {
            check_expiry(expires_at, self.clock.now())?;
        }
        let meta = change.meta.map(meta_text).transpose()?;
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
            expires_at: change.expires_at,
            meta,
        };
        let reactivating = update.status.is_some_and(|s| s != KeyStatus::Revoked);
        let updated = self
            .store
            .update_key(id, update, self.now())
            .await?
            .ok_or_else(|| AdminError::NotFound(id.to_string()))?;
        // Both secrets: during a rotation's grace the old one is cached on its own, and a
        // revoked or disabled key must stop under it too, not when its cache entry expires.
        for digest in std::iter::once(&updated.digest).chain(&updated.previous_digest) {
            self.forget(digest).await;
        }
        // Revoked between our read and the store's atomic update: the store kept it revoked.
        if reactivating && updated.status == KeyStatus::Revoked {
            return Err(AdminError::Revoked(id.to_string()));
        }
        let account = self.account_of(&updated).await?;
        let view = KeyView::of(&updated, account.as_ref(), self.clock.now());
        if record.status != KeyStatus::Revoked && updated.status == KeyStatus::Revoked {
            self.tell(|now| Event::once("key.revoked", id, json!(view), now))
                .await;
        }
        Ok(view)
    }

    /// Adds keys made elsewhere, by digest (`POST /admin/keys:import`): all or none. Each
    /// is checked as `create` checks a key; returns their new ids in order.
    pub async fn import(&self, keys: Vec<ImportKey>) -> Result<Vec<String>, AdminError> {
        if keys.len() > MAX_IMPORT {
            return Err(AdminError::field(
                "keys",
                format!("at most {MAX_IMPORT} keys an import"),
            ));
        }
        let now = self.now();
        let mut records = Vec::with_capacity(keys.len());
        let mut digests = std::collections::HashSet::new();
        let mut accounts: BTreeMap<String, AccountRecord> = BTreeMap::new();
        for key in keys {
            if !digests.insert(key.digest) {
                return Err(AdminError::field("keys", "a digest appears twice"));
            }
            let record = self
                .checked_record(key.fields, key.digest, key.prefix, now, &mut accounts)
                .await?;
            records.push(record);
        }
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        let digests: Vec<KeyDigest> = records.iter().map(|r| r.digest).collect();
        if !self.store.insert_keys(records).await? {
            return Err(AdminError::DigestTaken);
        }
        // Told to every node, as a created key is: one that a client tried before the import
        // is in their caches of unknown keys (for `negative_ttl_secs`).
        for digest in &digests {
            self.forget(digest).await;
        }
        Ok(ids)
    }

    /// Gives the key a new secret; the old one keeps working for `grace` (at most
    /// [`MAX_GRACE`]; zero: it stops at once), on every node: the cached key carries the
    /// instant. Usage, limits and metadata stay with the key.
    pub async fn rotate(&self, id: &str, grace: Duration) -> Result<Rotated, AdminError> {
        if grace > MAX_GRACE {
            return Err(AdminError::field(
                "grace_secs",
                format!("must be at most {} (7 days)", MAX_GRACE.as_secs()),
            ));
        }
        let NewKey {
            secret,
            digest,
            prefix,
        } = mint_key();
        let now = self.now();
        let previous_expires_at = (!grace.is_zero()).then(|| now + grace);
        let rotation = Rotation {
            digest,
            prefix,
            previous_expires_at,
        };
        let (record, dropped) = self
            .store
            .rotate_key(id, rotation, now)
            .await?
            .ok_or_else(|| AdminError::NotFound(id.to_string()))?;
        if record.digest != digest {
            return Err(AdminError::Revoked(id.to_string()));
        }
        // Every node forgets what it cached under each secret; the old one's entry comes
        // back with its end of grace.
        for d in dropped
            .iter()
            .chain([&digest])
            .chain(&record.previous_digest)
        {
            self.forget(d).await;
        }
        let account = self.account_of(&record).await?;
        let view = KeyView::of(&record, account.as_ref(), now);
        let mut data = json!(view);
        data["previous_expires_at"] = json!(previous_expires_at.map(rfc3339));
        self.tell(|now| Event::new("key.rotated", data, now)).await;
        Ok(Rotated {
            view,
            secret,
            previous_expires_at,
        })
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
    pub(crate) async fn forget(&self, digest: &KeyDigest) {
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

/// A key of an account takes its account's plan and limit: neither may be given for it.
fn accounts_plan_only(plan_given: bool, limit_given: bool) -> Result<(), AdminError> {
    for (field, given) in [("plan", plan_given), ("monthly_limit", limit_given)] {
        if given {
            return Err(AdminError::field(
                field,
                "a key of an account uses its account's plan and limit: change the account",
            ));
        }
    }
    Ok(())
}

/// The cursor of the page after `page`: its last id, when the page is full.
pub(crate) fn next_cursor<T>(
    page: &[T],
    limit: usize,
    id: impl Fn(&T) -> &String,
) -> Option<String> {
    (page.len() == limit)
        .then(|| page.last().map(|last| id(last).clone()))
        .flatten()
}

pub(crate) fn unknown_cursor() -> AdminError {
    AdminError::field("cursor", "is not a next_cursor of this list")
}
