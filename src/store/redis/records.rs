//! Key and account records as Redis hashes.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use crate::auth::KeyDigest;
use crate::store::{AccountRecord, AccountStatus, KeyRecord, KeyStatus, StoreError};

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
        // Records written before accounts existed have no such field.
        account_id: fields.get("account_id").filter(|a| !a.is_empty()).cloned(),
        prefix: get("prefix")?,
        name: get("name")?,
        plan: get("plan")?,
        monthly_limit: f.limit()?,
        status: match get("status")?.as_str() {
            "active" => KeyStatus::Active,
            "inactive" => KeyStatus::Inactive,
            "revoked" => KeyStatus::Revoked,
            other => return Err(StoreError(format!("unknown key status '{other}'"))),
        },
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

pub(super) fn status_str(status: KeyStatus) -> &'static str {
    match status {
        KeyStatus::Active => "active",
        KeyStatus::Inactive => "inactive",
        KeyStatus::Revoked => "revoked",
    }
}
