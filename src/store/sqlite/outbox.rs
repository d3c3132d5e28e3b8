//! The outbox in the embedded store: one row per event (see the schema in [`super`]).

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rusqlite::{TransactionBehavior, params};

use super::SqliteStore;
use crate::events::Event;
use crate::locks::lock;
use crate::store::StoreError;
use crate::store::outbox::{self, KEEP_IDS, Outbox, Pending};

fn ms(t: SystemTime) -> i64 {
    outbox::to_ms(t) as i64
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn enqueue(&self, event: &Event) -> Result<bool, StoreError> {
        let event = event.clone();
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let created = ms(event.created_at);
            let added = tx.execute(
                "INSERT OR IGNORE INTO outbox (id, body, created_ms, due_ms, attempts)
                 VALUES (?1, ?2, ?3, ?3, 0)",
                params![event.id, event.body, created],
            )?;
            // Ids of finished events are remembered for a while, then dropped on the way.
            tx.execute(
                "DELETE FROM outbox WHERE due_ms IS NULL AND created_ms < ?1",
                [created - KEEP_IDS.as_millis() as i64],
            )?;
            tx.commit()?;
            Ok(added == 1)
        })
        .await
    }

    async fn claim(
        &self,
        now: SystemTime,
        hold: Duration,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let due: Vec<Pending> = tx
                .prepare(
                    "SELECT id, body, created_ms, attempts FROM outbox
                     WHERE due_ms IS NOT NULL AND due_ms <= ?1 ORDER BY due_ms LIMIT ?2",
                )?
                .query_map(params![ms(now), limit as i64], |r| {
                    Ok(Pending {
                        event: Event {
                            id: r.get(0)?,
                            body: r.get(1)?,
                            created_at: outbox::from_ms(r.get::<_, i64>(2)?.max(0) as u64),
                        },
                        attempts: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            {
                let mut hold_until = tx.prepare("UPDATE outbox SET due_ms = ?2 WHERE id = ?1")?;
                for p in &due {
                    hold_until.execute(params![p.event.id, ms(now + hold)])?;
                }
            }
            tx.commit()?;
            Ok(due)
        })
        .await
    }

    async fn finish(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.call(move |db| {
            lock(&db.write).execute("UPDATE outbox SET due_ms = NULL WHERE id = ?1", [id])?;
            Ok(())
        })
        .await
    }

    async fn retry(&self, id: &str, at: SystemTime, attempts: u32) -> Result<(), StoreError> {
        let id = id.to_string();
        self.call(move |db| {
            lock(&db.write).execute(
                "UPDATE outbox SET due_ms = ?2, attempts = ?3 WHERE id = ?1 AND due_ms IS NOT NULL",
                params![id, ms(at), attempts],
            )?;
            Ok(())
        })
        .await
    }
}
