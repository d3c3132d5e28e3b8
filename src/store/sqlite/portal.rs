//! [`PortalStore`] on the embedded store: four tables of their own, created on open beside
//! the others (no schema version change: nothing existing is altered).

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{SqliteStore, from_unix, unix};
use crate::locks::lock;
use crate::store::StoreError;
use crate::store::portal::{Invite, PortalStore, Session};

/// Run on open after the main schema.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS portal_passwords (
    account_id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS portal_invites (
    digest TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS portal_sessions (
    digest TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    seen_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS portal_sessions_by_use ON portal_sessions (seen_at);
CREATE TABLE IF NOT EXISTS portal_failures (
    key TEXT PRIMARY KEY,
    started INTEGER NOT NULL,
    count INTEGER NOT NULL
);
";

/// How long a used or expired invite is remembered, to say so instead of "unknown link".
const INVITE_MEMORY_SECS: i64 = 30 * 86_400;

#[async_trait]
impl PortalStore for SqliteStore {
    async fn account_id_by_email(&self, email: &str) -> Result<Option<String>, StoreError> {
        let email = email.to_string();
        self.call(move |db| {
            lock(&db.read)
                .query_row("SELECT id FROM accounts WHERE email = ?1", [email], |r| {
                    r.get(0)
                })
                .optional()
        })
        .await
    }

    async fn password_hash(&self, account_id: &str) -> Result<Option<String>, StoreError> {
        let id = account_id.to_string();
        self.call(move |db| {
            lock(&db.read)
                .query_row(
                    "SELECT hash FROM portal_passwords WHERE account_id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .optional()
        })
        .await
    }

    async fn set_password_hash(&self, account_id: &str, hash: &str) -> Result<(), StoreError> {
        let (id, hash) = (account_id.to_string(), hash.to_string());
        let now = unix(SystemTime::now());
        self.call(move |db| {
            lock(&db.write)
                .execute(
                    "INSERT INTO portal_passwords (account_id, hash, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (account_id) DO UPDATE SET hash = ?2, updated_at = ?3",
                    params![id, hash, now],
                )
                .map(drop)
        })
        .await
    }

    async fn insert_invite(&self, digest: &str, invite: Invite) -> Result<(), StoreError> {
        let digest = digest.to_string();
        let forget_before = unix(SystemTime::now()) - INVITE_MEMORY_SECS;
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "DELETE FROM portal_invites WHERE expires_at < ?1",
                [forget_before],
            )?;
            tx.execute(
                "INSERT INTO portal_invites (digest, account_id, expires_at, used)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    digest,
                    invite.account_id,
                    unix(invite.expires_at),
                    invite.used
                ],
            )?;
            tx.commit()
        })
        .await
    }

    async fn invite(&self, digest: &str) -> Result<Option<Invite>, StoreError> {
        let digest = digest.to_string();
        self.call(move |db| {
            lock(&db.read)
                .query_row(
                    "SELECT account_id, expires_at, used FROM portal_invites WHERE digest = ?1",
                    [digest],
                    |r| {
                        Ok(Invite {
                            account_id: r.get(0)?,
                            expires_at: from_unix(r.get(1)?),
                            used: r.get(2)?,
                        })
                    },
                )
                .optional()
        })
        .await
    }

    async fn use_invite(&self, digest: &str) -> Result<bool, StoreError> {
        let digest = digest.to_string();
        self.call(move |db| {
            lock(&db.write)
                .execute(
                    "UPDATE portal_invites SET used = 1 WHERE digest = ?1 AND used = 0",
                    [digest],
                )
                .map(|n| n == 1)
        })
        .await
    }

    async fn insert_session(
        &self,
        digest: &str,
        session: Session,
        idle: Duration,
    ) -> Result<(), StoreError> {
        let digest = digest.to_string();
        let now = unix(session.created_at);
        let stale = now - idle.as_secs() as i64;
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM portal_sessions WHERE seen_at < ?1", [stale])?;
            tx.execute(
                "INSERT INTO portal_sessions (digest, account_id, created_at, seen_at)
                 VALUES (?1, ?2, ?3, ?3)",
                params![digest, session.account_id, now],
            )?;
            tx.commit()
        })
        .await
    }

    async fn session(
        &self,
        digest: &str,
        idle: Duration,
        now: SystemTime,
    ) -> Result<Option<Session>, StoreError> {
        let digest = digest.to_string();
        let now = unix(now);
        let fresh_after = now - idle.as_secs() as i64;
        self.call(move |db| {
            let conn = lock(&db.write);
            let found = conn
                .query_row(
                    "SELECT account_id, created_at FROM portal_sessions
                     WHERE digest = ?1 AND seen_at >= ?2",
                    params![digest, fresh_after],
                    |r| {
                        Ok(Session {
                            account_id: r.get(0)?,
                            created_at: from_unix(r.get(1)?),
                        })
                    },
                )
                .optional()?;
            if found.is_some() {
                conn.execute(
                    "UPDATE portal_sessions SET seen_at = ?2 WHERE digest = ?1",
                    params![digest, now],
                )?;
            }
            Ok(found)
        })
        .await
    }

    async fn delete_session(&self, digest: &str) -> Result<(), StoreError> {
        let digest = digest.to_string();
        self.call(move |db| {
            lock(&db.write)
                .execute("DELETE FROM portal_sessions WHERE digest = ?1", [digest])
                .map(drop)
        })
        .await
    }

    async fn failures(
        &self,
        key: &str,
        window: Duration,
        now: SystemTime,
    ) -> Result<(u32, u64), StoreError> {
        let key = key.to_string();
        let now = unix(now);
        let started_after = now - window.as_secs() as i64;
        self.call(move |db| {
            let found: Option<(i64, u32)> = lock(&db.read)
                .query_row(
                    "SELECT started, count FROM portal_failures WHERE key = ?1 AND started > ?2",
                    params![key, started_after],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(found.map_or((0, 0), |(started, count)| {
                (count, (now - started).max(0) as u64)
            }))
        })
        .await
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_string();
        self.call(move |db| {
            lock(&db.write).execute("DELETE FROM portal_failures WHERE key = ?1", [key])?;
            Ok(())
        })
        .await
    }

    async fn add_failure(
        &self,
        key: &str,
        window: Duration,
        now: SystemTime,
    ) -> Result<u32, StoreError> {
        let key = key.to_string();
        let now = unix(now);
        let started_after = now - window.as_secs() as i64;
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "DELETE FROM portal_failures WHERE started <= ?1",
                [started_after],
            )?;
            let count = tx.query_row(
                "INSERT INTO portal_failures (key, started, count) VALUES (?1, ?2, 1)
                 ON CONFLICT (key) DO UPDATE SET count = count + 1
                 RETURNING count",
                params![key, now],
                |r| r.get(0),
            )?;
            tx.commit()?;
            Ok(count)
        })
        .await
    }
}
