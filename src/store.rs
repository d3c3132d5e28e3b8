//! Where key records and quota counters live, behind one small async trait (SPEC §3, §4).
//!
//! Two traits, both shaped for a networked store (every method one round trip): [`Store`]
//! for key records, and [`lease::LeaseBackend`] for the atomic step behind quota leases, on
//! which [`lease::Quota`] counts calls. [`redis::RedisStore`] implements both and shares keys
//! and counters between nodes; [`sqlite::SqliteStore`] is the embedded durable store of a
//! single machine (one process, or two during an upgrade).

pub mod instrumented;
pub mod lease;
pub mod redis;
pub mod sqlite;

use std::time::SystemTime;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::auth::KeyDigest;

/// Lifecycle of a key. Only `Active` keys are served; `Revoked` is final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Inactive,
    Revoked,
}

/// What is kept about a key: never the key itself, only its digest (SPEC §3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub digest: KeyDigest,
    /// The account whose monthly limit this key shares (SPEC §9); `None`: the key's own.
    pub account_id: Option<String>,
    /// The first characters of the key, for people and logs.
    pub prefix: String,
    pub name: String,
    pub plan: String,
    /// `None` is unlimited: usage is metered, never refused.
    pub monthly_limit: Option<u64>,
    pub status: KeyStatus,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// A change to a key; `None` fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyUpdate {
    pub plan: Option<String>,
    pub monthly_limit: Option<Option<u64>>,
    pub status: Option<KeyStatus>,
}

/// Lifecycle of an account. Keys of an account that is not `Active` are not served;
/// `Closed` is final (the account's keys are revoked with it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    Active,
    Disabled,
    Closed,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::Disabled => "disabled",
            AccountStatus::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(AccountStatus::Active),
            "disabled" => Some(AccountStatus::Disabled),
            "closed" => Some(AccountStatus::Closed),
            _ => None,
        }
    }
}

/// A customer owning keys (SPEC §9): its plan's monthly limit is shared by all its keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountRecord {
    pub id: String,
    /// Lowercased; unique across accounts.
    pub email: String,
    pub name: String,
    pub plan: String,
    /// The limit shared by the account's keys; `None` is unlimited.
    pub monthly_limit: Option<u64>,
    pub status: AccountStatus,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// A change to an account; `None` fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountUpdate {
    pub name: Option<String>,
    pub plan: Option<String>,
    pub monthly_limit: Option<Option<u64>>,
    pub status: Option<AccountStatus>,
}

/// A change to key records made elsewhere, which caches must forget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    Key(KeyDigest),
    /// Anything may have changed (for example, changes were missed while disconnected).
    All,
}

/// The store could not answer; the caller applies the outage policy.
#[derive(Debug, Clone, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct StoreError(pub String);

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Adds a new key. Ids and digests are unique by construction (random).
    async fn insert_key(&self, record: KeyRecord) -> Result<(), StoreError>;
    async fn key_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError>;
    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    /// Applies `update` and returns the new record, or `None` if there is no such key. A
    /// revoked key stays revoked whatever the update says (checked in the same atomic step, so
    /// a re-activation racing a revocation cannot undo it).
    async fn update_key(
        &self,
        id: &str,
        update: KeyUpdate,
        now: SystemTime,
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// Adds a new account; `false` (and nothing written) when another account has its email.
    async fn insert_account(&self, record: AccountRecord) -> Result<bool, StoreError>;
    async fn account_by_id(&self, id: &str) -> Result<Option<AccountRecord>, StoreError>;
    /// Every account, oldest first.
    async fn list_accounts(&self) -> Result<Vec<AccountRecord>, StoreError>;
    /// Applies `update` and returns the new record, or `None` if there is no such account. A
    /// closed account stays closed whatever the update says (in the same atomic step).
    async fn update_account(
        &self,
        id: &str,
        update: AccountUpdate,
        now: SystemTime,
    ) -> Result<Option<AccountRecord>, StoreError>;
    /// The keys of an account, oldest first.
    async fn keys_of_account(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError>;
    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Tells every node that the key with `digest` changed. A single-process store has no
    /// one to tell.
    async fn announce(&self, _digest: &KeyDigest) -> Result<(), StoreError> {
        Ok(())
    }
    /// Starts delivering changes announced by other nodes to `sink`.
    fn watch(&self, _sink: tokio::sync::mpsc::UnboundedSender<Invalidation>) {}
}

/// RFC 3339 with seconds, the one timestamp format the API shows.
pub fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Secs, true)
}
