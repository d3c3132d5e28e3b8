//! [`PortalStore`] on Redis: every node reads the same sessions, so a session made on one
//! node is valid on all; Redis expiry does the forgetting (idle sessions, old invites, the
//! failed sign-in window).
//!
//! - `audiolib:{<account>}:password` — STRING: the argon2id PHC string
//! - `audiolib:portal:invite:<sha256 hex>` — HASH `account`, `expires`, `used`
//! - `audiolib:portal:session:<sha256 hex>` — HASH `account`, `created`; `EXPIRE` the idle time,
//!   renewed on each use
//! - `audiolib:portal:failures:<sha256 hex>` — STRING counter, `EXPIRE` the window from the
//!   first failure

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::AsyncCommands;

use super::scripts::{email_key, invoke, unix};
use super::{RedisStore, valid_id, write_all};
use crate::store::StoreError;
use crate::store::portal::{Invite, PortalStore, Session};

/// `used` + 1 on an invite that exists; 0 for one that does not.
const USE_INVITE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], 'used', 1)
";

/// How long a used or expired invite is remembered, to say so instead of "unknown link".
const INVITE_MEMORY_SECS: i64 = 30 * 86_400;

fn password_key(account: &str) -> String {
    format!("audiolib:{{{account}}}:password")
}

fn invite_key(digest: &str) -> String {
    format!("audiolib:portal:invite:{digest}")
}

fn session_key(digest: &str) -> String {
    format!("audiolib:portal:session:{digest}")
}

fn failures_key(key: &str) -> String {
    format!("audiolib:portal:failures:{key}")
}

fn from_unix(secs: i64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

fn bad_record(what: &str) -> StoreError {
    StoreError(format!("redis: a malformed portal {what} record"))
}

#[async_trait]
impl PortalStore for RedisStore {
    async fn account_id_by_email(&self, email: &str) -> Result<Option<String>, StoreError> {
        self.call_patiently(|mut c| async move { c.get(email_key(email)).await })
            .await
    }

    async fn password_hash(&self, account_id: &str) -> Result<Option<String>, StoreError> {
        if !valid_id(account_id) {
            return Ok(None);
        }
        self.call_patiently(|mut c| async move { c.get(password_key(account_id)).await })
            .await
    }

    async fn set_password_hash(&self, account_id: &str, hash: &str) -> Result<(), StoreError> {
        if !valid_id(account_id) {
            return Err(StoreError("redis: not an account id".into()));
        }
        let set = redis::Cmd::set(password_key(account_id), hash);
        let wait = self.wait;
        self.call_patiently(|c| write_all(c, vec![set], wait)).await
    }

    async fn insert_invite(&self, digest: &str, invite: Invite) -> Result<(), StoreError> {
        let key = invite_key(digest);
        let expires = unix(invite.expires_at) as i64;
        let fields = [
            ("account", invite.account_id.clone()),
            ("expires", expires.to_string()),
            ("used", u8::from(invite.used).to_string()),
        ];
        let writes = vec![
            redis::Cmd::hset_multiple(&key, &fields),
            redis::Cmd::expire_at(&key, expires + INVITE_MEMORY_SECS),
        ];
        let wait = self.wait;
        self.call_patiently(|c| write_all(c, writes, wait)).await
    }

    async fn invite(&self, digest: &str) -> Result<Option<Invite>, StoreError> {
        let fields: HashMap<String, String> = self
            .call_patiently(|mut c| async move { c.hgetall(invite_key(digest)).await })
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let account_id = fields.get("account").ok_or_else(|| bad_record("invite"))?;
        let expires: i64 = fields
            .get("expires")
            .and_then(|e| e.parse().ok())
            .ok_or_else(|| bad_record("invite"))?;
        Ok(Some(Invite {
            account_id: account_id.clone(),
            expires_at: from_unix(expires),
            used: fields.get("used").is_some_and(|u| u != "0"),
        }))
    }

    async fn use_invite(&self, digest: &str) -> Result<bool, StoreError> {
        // One script: only the caller that takes `used` from 0 to 1 gets the invite, and an
        // invite gone (forgotten) is not brought back as a bare counter.
        let script = redis::Script::new(USE_INVITE);
        let wait = self.wait;
        let used: i64 = self
            .call_patiently(|mut c| {
                let script = &script;
                async move {
                    let inv = script.key(invite_key(digest));
                    invoke(&mut c, &inv, wait).await
                }
            })
            .await?;
        Ok(used == 1)
    }

    async fn insert_session(
        &self,
        digest: &str,
        session: Session,
        idle: Duration,
    ) -> Result<(), StoreError> {
        let key = session_key(digest);
        let fields = [
            ("account", session.account_id.clone()),
            ("created", unix(session.created_at).to_string()),
        ];
        let writes = vec![
            redis::Cmd::hset_multiple(&key, &fields),
            redis::Cmd::expire(&key, idle.as_secs() as i64),
        ];
        let wait = self.wait;
        self.call_patiently(|c| write_all(c, writes, wait)).await
    }

    async fn session(
        &self,
        digest: &str,
        idle: Duration,
        _now: SystemTime,
    ) -> Result<Option<Session>, StoreError> {
        let key = session_key(digest);
        let fields: HashMap<String, String> = self
            .call_patiently(|mut c| {
                let key = &key;
                async move {
                    let fields: HashMap<String, String> = c.hgetall(key).await?;
                    if !fields.is_empty() {
                        // A new idle period from now (EXPIRE on a key gone meanwhile is a no-op).
                        c.expire::<_, ()>(key, idle.as_secs() as i64).await?;
                    }
                    Ok(fields)
                }
            })
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let account_id = fields.get("account").ok_or_else(|| bad_record("session"))?;
        let created: i64 = fields
            .get("created")
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| bad_record("session"))?;
        Ok(Some(Session {
            account_id: account_id.clone(),
            created_at: from_unix(created),
        }))
    }

    async fn delete_session(&self, digest: &str) -> Result<(), StoreError> {
        let del = redis::Cmd::del(session_key(digest));
        let wait = self.wait;
        self.call_patiently(|c| write_all(c, vec![del], wait)).await
    }

    async fn failures(
        &self,
        key: &str,
        window: Duration,
        _now: SystemTime,
    ) -> Result<(u32, u64), StoreError> {
        let key = failures_key(key);
        let (count, ttl): (Option<u32>, i64) = self
            .call_patiently(|mut c| {
                let key = &key;
                async move { redis::pipe().get(key).ttl(key).query_async(&mut c).await }
            })
            .await?;
        let age = window.as_secs().saturating_sub(ttl.max(0) as u64);
        Ok((count.unwrap_or(0), age))
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        let key = failures_key(key);
        self.call_patiently(|mut c| async move { c.del::<_, ()>(key).await })
            .await
    }

    async fn add_failure(
        &self,
        key: &str,
        window: Duration,
        _now: SystemTime,
    ) -> Result<u32, StoreError> {
        let key = failures_key(key);
        // The window starts with the first failure: SET NX EX creates the counter with its
        // expiry, INCR counts; later failures leave the expiry as it is.
        let (count,): (u32,) = self
            .call_patiently(|mut c| {
                let key = &key;
                async move {
                    redis::pipe()
                        .cmd("SET")
                        .arg(key)
                        .arg(0)
                        .arg("EX")
                        .arg(window.as_secs().max(1))
                        .arg("NX")
                        .ignore()
                        .incr(key, 1)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(count)
    }
}
