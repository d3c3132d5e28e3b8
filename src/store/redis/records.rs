//! Key and account records as Redis hashes.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use crate::auth::KeyDigest;
use crate::store::{AccountRecord, AccountStatus, AuditEntry, KeyRecord, KeyStatus, StoreError};

/// The fields of one record hash, read with the record's kind in every error.
struct Fields<'a> {
    kind: &'static str,
    map: &'a HashMap<String, String>,
}

impl Fields<'_> {
    fn get(&self, name: &str) -> Result<String, StoreError> {
        self.map
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError(format!("{} record without '{name}'", self.kind)))
    }

    fn num(&self, name: &str) -> Result<u64, StoreError> {
        self.get(name)?.parse().map_err(|_| {
            StoreError(format!(
                "{} record field '{name}' is not a number",
                self.kind
            ))
        })
    }

    fn time(&self, name: &str) -> Result<std::time::SystemTime, StoreError> {
        Ok(UNIX_EPOCH + Duration::from_secs(self.num(name)?))
    }

    /// A field that may be absent (records written before it existed) or empty: `None`.
    fn optional(&self, name: &str) -> Option<String> {
        self.map.get(name).filter(|v| !v.is_empty()).cloned()
    }

    fn optional_time(&self, name: &str) -> Result<Option<std::time::SystemTime>, StoreError> {
        match self.optional(name) {
            None => Ok(None),
            Some(_) => self.time(name).map(Some),
        }
    }

    /// An empty `monthly_limit` is unlimited.
    fn limit(&self) -> Result<Option<u64>, StoreError> {
        match self.get("monthly_limit")?.as_str() {
            "" => Ok(None),
            _ => self.num("monthly_limit").map(Some),
        }
    }
}

/// Reads a key record hash; `None` when the hash is empty (no such key).
pub(super) fn parse_record(
    fields: HashMap<String, String>,
) -> Result<Option<KeyRecord>, StoreError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let f = Fields {
        kind: "key",
        map: &fields,
    };
    let get = |name: &str| f.get(name);
    Ok(Some(KeyRecord {
        id: get("id")?,
        digest: KeyDigest::parse_hex(&get("digest")?)
            .ok_or_else(|| StoreError("key record digest is not hex".into()))?,
        account_id: f.optional("account_id"),
        prefix: get("prefix")?,
        name: get("name")?,
        plan: get("plan")?,
        monthly_limit: f.limit()?,
        status: {
            let status = get("status")?;
            KeyStatus::parse(&status)
                .ok_or_else(|| StoreError(format!("unknown key status '{status}'")))?
        },
        expires_at: f.optional_time("expires_at")?,
        meta: f.optional("meta"),
        last_used_at: f.optional_time("last_used_at")?,
        previous_digest: match f.optional("previous_digest") {
            Some(hex) => Some(
                KeyDigest::parse_hex(&hex)
                    .ok_or_else(|| StoreError("key record previous digest is not hex".into()))?,
            ),
            None => None,
        },
        previous_expires_at: f.optional_time("previous_expires_at")?,
        created_at: f.time("created_at")?,
        updated_at: f.time("updated_at")?,
    }))
}

/// Reads an account hash; `None` when the hash is empty (no such account).
pub(super) fn parse_account(
    fields: HashMap<String, String>,
) -> Result<Option<AccountRecord>, StoreError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let f = Fields {
        kind: "account",
        map: &fields,
    };
    let status = f.get("status")?;
    Ok(Some(AccountRecord {
        id: f.get("id")?,
        email: f.get("email")?,
        name: f.get("name")?,
        plan: f.get("plan")?,
        monthly_limit: f.limit()?,
        status: AccountStatus::parse(&status)
            .ok_or_else(|| StoreError(format!("unknown account status '{status}'")))?,
        created_at: f.time("created_at")?,
        updated_at: f.time("updated_at")?,
    }))
}

/// The hash fields of an account record.
pub(super) fn account_fields(r: &AccountRecord) -> Vec<(&'static str, String)> {
    vec![
        ("id", r.id.clone()),
        ("email", r.email.clone()),
        ("name", r.name.clone()),
        ("plan", r.plan.clone()),
        ("monthly_limit", limit_str(r.monthly_limit)),
        ("status", r.status.as_str().to_string()),
        ("created_at", super::unix(r.created_at).to_string()),
        ("updated_at", super::unix(r.updated_at).to_string()),
    ]
}

pub(super) fn limit_str(limit: Option<u64>) -> String {
    limit.map(|l| l.to_string()).unwrap_or_default()
}

/// A time as a hash field: seconds, or empty for none.
pub(super) fn time_str(t: Option<std::time::SystemTime>) -> String {
    t.map(|t| super::unix(t).to_string()).unwrap_or_default()
}

/// The hash fields of a key record.
pub(super) fn key_fields(r: &KeyRecord) -> Vec<(&'static str, String)> {
    vec![
        ("id", r.id.clone()),
        ("digest", r.digest.to_string()),
        ("account_id", r.account_id.clone().unwrap_or_default()),
        ("prefix", r.prefix.clone()),
        ("name", r.name.clone()),
        ("plan", r.plan.clone()),
        ("monthly_limit", limit_str(r.monthly_limit)),
        ("status", r.status.as_str().to_string()),
        ("expires_at", time_str(r.expires_at)),
        ("meta", r.meta.clone().unwrap_or_default()),
        ("last_used_at", time_str(r.last_used_at)),
        (
            "previous_digest",
            r.previous_digest.map(|d| d.to_string()).unwrap_or_default(),
        ),
        ("previous_expires_at", time_str(r.previous_expires_at)),
        ("created_at", super::unix(r.created_at).to_string()),
        ("updated_at", super::unix(r.updated_at).to_string()),
    ]
}

/// A stream id `ms-n` as one number (`ms << 20 | n`): the audit log's cursor.
pub(super) fn stream_seq(id: &str) -> Option<u64> {
    let (ms, n) = id.split_once('-')?;
    let (ms, n): (u64, u64) = (ms.parse().ok()?, n.parse().ok()?);
    (n < 1 << 20).then_some(ms << 20 | n)
}

pub(super) fn stream_id(seq: u64) -> String {
    format!("{}-{}", seq >> 20, seq & ((1 << 20) - 1))
}

pub(super) fn parse_audit(
    id: &str,
    fields: HashMap<String, String>,
) -> Result<AuditEntry, StoreError> {
    let f = Fields {
        kind: "audit",
        map: &fields,
    };
    Ok(AuditEntry {
        seq: stream_seq(id).ok_or_else(|| StoreError(format!("audit entry id '{id}'")))?,
        at: f.time("at")?,
        actor: f.get("actor")?,
        action: f.get("action")?,
        target: f.get("target")?,
        changes: f.get("changes")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_round_trip_as_cursors() {
        for id in ["1700000000000-0", "1700000000000-7", "1-1048575"] {
            assert_eq!(stream_id(stream_seq(id).unwrap()), id);
        }
        assert!(stream_seq("1-0").unwrap() < stream_seq("1-1").unwrap());
        assert!(stream_seq("1-1048575").unwrap() < stream_seq("2-0").unwrap());
        for bad in ["", "1", "a-1", "1-1048576"] {
            assert_eq!(stream_seq(bad), None, "{bad}");
        }
    }
}
