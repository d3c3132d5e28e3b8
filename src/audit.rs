//! The audit log (SPEC §9): every change made through the admin API (and the portal), with
//! who made it, listed newest first by `GET /admin/audit`. Recorded by the interface that
//! knows the actor, after the change succeeded; a failure to record is logged, since the
//! change itself cannot be undone. Never holds a key: no request that changes anything
//! carries one.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::clock::{Clock, to_second};
use crate::store::{AuditEntry, Store, StoreError, rfc3339};

/// How long entries are kept.
pub const KEEP: Duration = Duration::from_secs(90 * 86_400);
/// The most entries one page holds.
pub const MAX_PAGE: usize = 1000;

/// The actor of changes made with the admin token.
pub const ADMIN: &str = "admin";

pub struct Audit {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
}

impl Audit {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Self { store, clock }
    }

    /// Records that `actor` did `action` to `target`, with the fields it gave.
    pub async fn record(&self, actor: &str, action: &str, target: &str, changes: Value) {
        let now = to_second(self.clock.now());
        let entry = AuditEntry {
            seq: 0,
            at: now,
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            changes: changes.to_string(),
        };
        if let Err(e) = self.store.append_audit(entry, now - KEEP).await {
            log::warn!("audit: could not record {action} of {target} by {actor}: {e}");
        }
    }

    /// Up to `limit` entries older than the cursor `before`, newest first, and the cursor of
    /// the next page (`None` on the last).
    pub async fn page(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Value>, Option<String>), StoreError> {
        let entries = self.store.audit_page(before, limit).await?;
        let next = (entries.len() == limit)
            .then(|| entries.last().map(|e| e.seq.to_string()))
            .flatten();
        let shown = entries
            .iter()
            .map(|e| {
                json!({
                    "id": e.seq.to_string(),
                    "at": rfc3339(e.at),
                    "actor": e.actor,
                    "action": e.action,
                    "target": e.target,
                    "changes": serde_json::from_str::<Value>(&e.changes).unwrap_or(Value::Null),
                })
            })
            .collect();
        Ok((shown, next))
    }
}
