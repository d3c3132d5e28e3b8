//! What the developer portal keeps (SPEC §10), beside the [`super::Store`] of keys and
//! accounts: password hashes, invites, sessions and the count of failed sign-ins. A trait of
//! its own so the key store's contract stays as it is; [`super::sqlite::SqliteStore`] and
//! [`super::redis::RedisStore`] implement both.
//!
//! Nothing secret is kept in the clear: passwords as argon2id PHC strings, invite and session
//! tokens as SHA-256 digests (in hex), so a copy of the store opens no account.

use std::time::SystemTime;

use async_trait::async_trait;

use super::StoreError;

/// An invite as stored: whose it is, until when it works, and whether it was used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invite {
    pub account_id: String,
    pub expires_at: SystemTime,
    pub used: bool,
}

/// A signed-in session as stored (under the digest of its token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub account_id: String,
    pub created_at: SystemTime,
}

#[async_trait]
pub trait PortalStore: Send + Sync + 'static {
    /// The id of the account with this (normalized) email.
    async fn account_id_by_email(&self, email: &str) -> Result<Option<String>, StoreError>;
    /// The account's argon2id hash (PHC string), `None` before a password is set.
    async fn password_hash(&self, account_id: &str) -> Result<Option<String>, StoreError>;
    async fn set_password_hash(&self, account_id: &str, hash: &str) -> Result<(), StoreError>;

    /// Keeps an invite under `digest` (kept a while after it expires, so a late or second
    /// use can be told apart from a link that never existed).
    async fn insert_invite(&self, digest: &str, invite: Invite) -> Result<(), StoreError>;
    async fn invite(&self, digest: &str) -> Result<Option<Invite>, StoreError>;
    /// Marks the invite used; `true` for the one caller that did (atomic: two tabs
    /// submitting one link set one password).
    async fn use_invite(&self, digest: &str) -> Result<bool, StoreError>;

    /// Keeps a session under `digest`, forgotten after `idle` without a [`Self::session`].
    async fn insert_session(
        &self,
        digest: &str,
        session: Session,
        idle: std::time::Duration,
    ) -> Result<(), StoreError>;
    /// The session, if it has been used within `idle`; each call restarts the idle time.
    async fn session(
        &self,
        digest: &str,
        idle: std::time::Duration,
        now: SystemTime,
    ) -> Result<Option<Session>, StoreError>;
    async fn delete_session(&self, digest: &str) -> Result<(), StoreError>;

    /// Failed sign-ins under `key` in the window that started with the first of them, and
    /// the window's age in seconds; the window ends `window` after its first failure.
    async fn failures(
        &self,
        key: &str,
        window: std::time::Duration,
        now: SystemTime,
    ) -> Result<(u32, u64), StoreError>;
    /// Forgets the attempts counted under `key` (a sign-in succeeded).
    async fn clear_failures(&self, key: &str) -> Result<(), StoreError>;
    /// Counts one more failed sign-in under `key`; returns the count in the window.
    async fn add_failure(
        &self,
        key: &str,
        window: std::time::Duration,
        now: SystemTime,
    ) -> Result<u32, StoreError>;
}
