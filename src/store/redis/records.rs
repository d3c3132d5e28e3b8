//! Key records as Redis hashes.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use crate::auth::KeyDigest;
use crate::store::{KeyRecord, KeyStatus, StoreError};

/// Reads a record hash; `None` when the hash is empty (no such key).
pub(super) fn parse_record(
    fields: HashMap<String, String>,
) -> Result<Option<KeyRecord>, StoreError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let get = |name: &str| {
        fields
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError(format!("key record without '{name}'")))
    };
    let num = |name: &str| -> Result<u64, StoreError> {
        get(name)?
            .parse()
            .map_err(|_| StoreError(format!("key record field '{name}' is not a number")))
    };
    let limit = get("monthly_limit")?;
    Ok(Some(KeyRecord {
        id: get("id")?,
        digest: KeyDigest::parse_hex(&get("digest")?)
            .ok_or_else(|| StoreError("key record digest is not hex".into()))?,
        prefix: get("prefix")?,
        name: get("name")?,
        plan: get("plan")?,
        monthly_limit: if limit.is_empty() {
            None
        } else {
            Some(
                limit
                    .parse()
                    .map_err(|_| StoreError("bad monthly_limit".into()))?,
            )
        },
        status: match get("status")?.as_str() {
            "active" => KeyStatus::Active,
            "inactive" => KeyStatus::Inactive,
            "revoked" => KeyStatus::Revoked,
            other => return Err(StoreError(format!("unknown key status '{other}'"))),
        },
        created_at: UNIX_EPOCH + Duration::from_secs(num("created_at")?),
        updated_at: UNIX_EPOCH + Duration::from_secs(num("updated_at")?),
    }))
}

pub(super) fn status_str(status: KeyStatus) -> &'static str {
    match status {
        KeyStatus::Active => "active",
        KeyStatus::Inactive => "inactive",
        KeyStatus::Revoked => "revoked",
    }
}
