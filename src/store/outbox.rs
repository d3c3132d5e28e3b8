//! The event outbox (SPEC §9): events wait here, durable, until a webhook delivery of them
//! succeeds or their day of retries is over. Both stores implement it beside their records
//! ([`super::sqlite`], [`super::redis`]), so an event survives a restart of any node.
//!
//! Deliveries are at least once: an event is claimed for [`CLAIM_FOR`] while one node sends
//! it, and handed out again if that node dies before it says how the delivery went.
//! Receivers deduplicate by the event's `id`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::StoreError;
use crate::events::Event;

/// An event id is remembered this long after it was recorded, so the same crossing seen by
/// another node, or later in the month, is not recorded twice.
pub const KEEP_IDS: Duration = Duration::from_secs(40 * 86_400);
/// A claimed event is not handed out again before this: three times a delivery's timeout
/// (10 s), and the longest a crashed node's events wait for another node.
pub const CLAIM_FOR: Duration = Duration::from_secs(30);

/// An event waiting for delivery, and how many attempts failed so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub event: Event,
    pub attempts: u32,
}

#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Records `event`, due at once; `false` (nothing written) when an event with its id was
    /// recorded in the last [`KEEP_IDS`].
    async fn enqueue(&self, event: &Event) -> Result<bool, StoreError>;
    /// Up to `limit` events due at `now`, oldest due first, each claimed until `now + hold`.
    async fn claim(
        &self,
        now: SystemTime,
        hold: Duration,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError>;
    /// Delivered, or given up: never handed out again (its id stays known).
    async fn finish(&self, id: &str) -> Result<(), StoreError>;
    /// The delivery failed: due again at `at`, `attempts` attempts made.
    async fn retry(&self, id: &str, at: SystemTime, attempts: u32) -> Result<(), StoreError>;
}

/// Instants as the outboxes keep them: milliseconds since the epoch.
pub(super) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
