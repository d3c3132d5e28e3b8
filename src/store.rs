//! Where key records and quota counters live, behind one small async trait (SPEC §3, §4).
//!
//! Two traits, both shaped for a networked store (every method one round trip): [`Store`]
//! for key records, and [`lease::LeaseBackend`] for the atomic step behind quota leases, on
//! which [`lease::Quota`] counts calls. [`redis::RedisStore`] implements both and shares keys
//! and counters between nodes; [`sqlite::SqliteStore`] is the embedded durable store of a
//! single machine (one process, or two during an upgrade).

pub mod instrumented;
pub mod lease;
pub mod outbox;
pub mod portal;
pub mod redis;
pub mod sqlite;

use std::time::SystemTime;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::auth::KeyDigest;

/// Lifecycle of a key (SPEC §9). Only `Active` keys are served; `Revoked` is final.
/// `Expired` is never stored: it is how an active key past its `expires_at` is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Disabled,
    Revoked,
    Expired,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Disabled => "disabled",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Expired => "expired",
        }
    }

    /// A stored status; `inactive` is what records written before `disabled` say.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(KeyStatus::Active),
            "disabled" | "inactive" => Some(KeyStatus::Disabled),
            "revoked" => Some(KeyStatus::Revoked),
            _ => None,
        }
    }
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
    /// After this instant the key is no longer served (shown as `expired`).
    pub expires_at: Option<SystemTime>,
    /// The admin's JSON object about the key (at most 1 KiB), as text; never shown to clients.
    pub meta: Option<String>,
    /// The last minute the key was used in, as last reported by a node.
    pub last_used_at: Option<SystemTime>,
    /// The secret replaced by the last rotation, served until `previous_expires_at`.
    pub previous_digest: Option<KeyDigest>,
    pub previous_expires_at: Option<SystemTime>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

impl KeyRecord {
    /// A new active key with nothing optional set.
    pub fn new(
        id: String,
        digest: KeyDigest,
        prefix: String,
        name: String,
        now: SystemTime,
    ) -> Self {
        Self {
            id,
            digest,
            account_id: None,
            prefix,
            name,
            plan: String::new(),
            monthly_limit: None,
            status: KeyStatus::Active,
            expires_at: None,
            meta: None,
            last_used_at: None,
            previous_digest: None,
            previous_expires_at: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Whether the secret with `digest` opens this key at `now`: the current one while the
    /// key is active and unexpired, the previous one also only within its rotation grace.
    pub fn serves(&self, digest: &KeyDigest, now: SystemTime) -> bool {
        let secret_ok = if *digest == self.digest {
            true
        } else {
            self.previous_digest.as_ref() == Some(digest)
                && self.previous_expires_at.is_some_and(|t| now < t)
        };
        secret_ok && self.state(now) == KeyStatus::Active
    }

    /// Applies `rotation` at `now`; returns the digests that no longer open the key.
    pub fn rotate(&mut self, rotation: Rotation, now: SystemTime) -> Vec<KeyDigest> {
        let old = std::mem::replace(&mut self.digest, rotation.digest);
        let mut dropped: Vec<KeyDigest> = self.previous_digest.take().into_iter().collect();
        match rotation.previous_expires_at {
            Some(until) if until > now => {
                self.previous_digest = Some(old);
                self.previous_expires_at = Some(until);
            }
            _ => {
                dropped.push(old);
                self.previous_expires_at = None;
            }
        }
        self.prefix = rotation.prefix;
        self.updated_at = now;
        dropped
    }

    /// The status as shown at `now`: an active key past its expiry is `Expired`.
    pub fn state(&self, now: SystemTime) -> KeyStatus {
        match (self.status, self.expires_at) {
            (KeyStatus::Active, Some(t)) if now >= t => KeyStatus::Expired,
            (status, _) => status,
        }
    }
}

/// A change to a key; `None` fields stay as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyUpdate {
    pub plan: Option<String>,
    pub monthly_limit: Option<Option<u64>>,
    pub status: Option<KeyStatus>,
    pub expires_at: Option<Option<SystemTime>>,
    pub meta: Option<Option<String>>,
}

/// A rotation: the new secret's digest and prefix, and until when the old one still works
/// (`None`: not at all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub digest: KeyDigest,
    pub prefix: String,
    pub previous_expires_at: Option<SystemTime>,
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

/// One recorded change (SPEC §9 audit log): who did what to which record, and the fields
/// given. Never a key: the admin API and the portal never take one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// Assigned by the store, increasing; the page cursor.
    pub seq: u64,
    pub at: SystemTime,
    /// `admin`, or the account id for changes made in the portal.
    pub actor: String,
    /// `key.created`, `account.closed`, …
    pub action: String,
    /// The id of the key or account changed.
    pub target: String,
    /// The changed fields as a JSON object (text).
    pub changes: String,
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
    /// Adds many keys at once (a bulk import); `false`, with nothing written, when a digest
    /// is already a key's.
    async fn insert_keys(&self, records: Vec<KeyRecord>) -> Result<bool, StoreError>;
    async fn key_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError>;
    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Up to `limit` keys in creation order, after the key with id `after` if given; `None`
    /// when there is no such key. A walk lists every key that exists throughout it once.
    async fn list_keys(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<KeyRecord>>, StoreError>;
    /// Applies `update` and returns the new record, or `None` if there is no such key. A
    /// revoked key stays revoked whatever the update says (checked in the same atomic step, so
    /// a re-activation racing a revocation cannot undo it).
    async fn update_key(
        &self,
        id: &str,
        update: KeyUpdate,
        now: SystemTime,
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// Replaces the key's secret; the old one keeps working until `previous_expires_at`, an
    /// older previous one stops at once. `None` if there is no such key. A revoked key is not
    /// rotated (returned unchanged). Returns the record and the digests that no longer open it.
    async fn rotate_key(
        &self,
        id: &str,
        rotation: Rotation,
        now: SystemTime,
    ) -> Result<Option<(KeyRecord, Vec<KeyDigest>)>, StoreError>;
    /// Records the minute each key was last used in (keeping the later of what is stored and
    /// what is given).
    async fn touch_keys(&self, used: &[(String, SystemTime)]) -> Result<(), StoreError>;
    /// Appends an entry (its `seq` is ignored and assigned); entries older than `keep_after`
    /// may be dropped on the way.
    async fn append_audit(
        &self,
        entry: AuditEntry,
        keep_after: SystemTime,
    ) -> Result<(), StoreError>;
    /// Up to `limit` entries, newest first, all older than the entry `before` if given.
    async fn audit_page(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError>;
    /// Adds a new account; `false` (and nothing written) when another account has its email.
    async fn insert_account(&self, record: AccountRecord) -> Result<bool, StoreError>;
    async fn account_by_id(&self, id: &str) -> Result<Option<AccountRecord>, StoreError>;
    /// Up to `limit` accounts in creation order, after the account `after` if given (`None`
    /// when there is no such account).
    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<AccountRecord>>, StoreError>;
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
