//! Events for webhooks (SPEC §9), without I/O: what an event is, its ids, how a delivery is
//! signed, and when a failed one is tried again. [`crate::webhooks`] records and delivers them.
//!
//! Every event is `{"id","type","created_at","data"}`. A `quota.threshold` event's id is
//! derived from its subject, month and threshold, so however many nodes see the crossing,
//! the outbox holds it once (it refuses an id it already has); other events get random ids.

use std::time::{Duration, SystemTime};

use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::quota::Period;
use crate::store::rfc3339;

/// Percentages of a monthly limit whose crossing is announced.
pub const THRESHOLDS: [u64; 2] = [80, 100];
/// A failed delivery is tried again for this long after the event was made.
pub const RETRY_FOR: Duration = Duration::from_secs(24 * 3600);
/// The first retry's delay; each later one doubles it, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);
/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "AudioLib-Signature";

/// One event as recorded in the outbox: its id, when it was made, and its JSON body as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub created_at: SystemTime,
    /// The whole JSON document POSTed to the receiver.
    pub body: String,
}

impl Event {
    /// An event of `kind` with a random id.
    pub fn new(kind: &str, data: Value, now: SystemTime) -> Self {
        let mut raw = [0u8; 12];
        rand::rng().fill_bytes(&mut raw);
        Self::with_id(format!("evt_{}", hex::encode(raw)), kind, data, now)
    }

    /// An event that happens once to `target` (a key is created or revoked once): its id is
    /// derived from both, so however often it is recorded, it is delivered as one.
    pub fn once(kind: &str, target: &str, data: Value, now: SystemTime) -> Self {
        Self::with_id(derived_id(&[kind, target]), kind, data, now)
    }

    fn with_id(id: String, kind: &str, data: Value, now: SystemTime) -> Self {
        let body = json!({
            "id": id,
            "type": kind,
            "created_at": rfc3339(now),
            "data": data,
        })
        .to_string();
        Self {
            id,
            created_at: now,
            body,
        }
    }
}

/// A subject's use reached `threshold` percent of its monthly limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub subject: String,
    pub period: Period,
    pub threshold: u64,
    pub used: u64,
    pub limit: u64,
}

impl Crossing {
    /// The `quota.threshold` event; its id is the same on every node.
    pub fn event(&self, now: SystemTime) -> Event {
        let id = derived_id(&[
            "quota.threshold",
            &self.subject,
            &self.period.to_string(),
            &self.threshold.to_string(),
        ]);
        let data = json!({
            "subject": self.subject,
            "threshold": self.threshold,
            "used": self.used,
            "limit": self.limit,
            "period": self.period.to_string(),
        });
        Event::with_id(id, "quota.threshold", data, now)
    }
}

/// The thresholds `used` of `limit` has reached, as a bit per entry of [`THRESHOLDS`]. A
/// limit of 0 refuses every call from the start: nothing is crossed by use.
pub fn reached(used: u64, limit: u64) -> u8 {
    if limit == 0 {
        return 0;
    }
    THRESHOLDS
        .iter()
        .enumerate()
        .filter(|(_, t)| u128::from(used) * 100 >= u128::from(**t) * u128::from(limit))
        .fold(0, |bits, (i, _)| bits | 1 << i)
}

/// The `AudioLib-Signature` value for `body` sent at `t` (Unix seconds): the receiver
/// recomputes the HMAC over `"<t>.<raw body>"` and compares, and refuses old `t`s to stop
/// replays.
pub fn signature(secret: &str, t: u64, body: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// When to try again after the `attempts`-th failed delivery of an event made at `created`,
/// or `None` when its [`RETRY_FOR`] is over.
pub fn next_attempt(created: SystemTime, attempts: u32, now: SystemTime) -> Option<SystemTime> {
    let doublings = attempts.saturating_sub(1).min(20);
    let delay = (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF);
    let at = now + delay;
    (at < created + RETRY_FOR).then_some(at)
}

/// `evt_` and 96 bits of the SHA-256 of `parts` (NUL-separated): the same on every node.
fn derived_id(parts: &[&str]) -> String {
    let digest = Sha256::digest(parts.join("\0").as_bytes());
    format!("evt_{}", hex::encode(&digest[..12]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn thresholds_are_reached_at_80_and_100_percent() {
        assert_eq!(reached(79, 100), 0);
        assert_eq!(reached(80, 100), 0b01);
        assert_eq!(reached(99, 100), 0b01);
        assert_eq!(reached(100, 100), 0b11);
        // 80 % of 3 is 2.4 calls: reached at the third.
        assert_eq!(reached(2, 3), 0);
        assert_eq!(reached(3, 3), 0b11);
        assert_eq!(reached(5, 0), 0);
        assert_eq!(reached(u64::MAX, u64::MAX), 0b11);
    }

    #[test]
    fn a_crossing_has_the_same_id_on_every_node_and_differs_by_threshold_and_month() {
        let crossing = |threshold, month, used| Crossing {
            subject: "acct_1".into(),
            period: Period { year: 2026, month },
            threshold,
            used,
            limit: 100,
        };
        let a = crossing(80, 12, 80).event(at(1));
        let b = crossing(80, 12, 83).event(at(2));
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, crossing(100, 12, 100).event(at(1)).id);
        assert_ne!(a.id, crossing(80, 11, 80).event(at(1)).id);
        let body: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(body["type"], "quota.threshold");
        assert_eq!(body["id"], a.id.as_str());
        assert_eq!(body["created_at"], "1970-01-01T00:00:01Z");
        assert_eq!(
            body["data"],
            json!({"subject": "acct_1", "threshold": 80, "used": 80, "limit": 100,
                   "period": "2026-12"})
        );
    }

    #[test]
    fn a_once_event_has_one_id_per_kind_and_target() {
        let a = Event::once("key.revoked", "key_1", json!({}), at(0));
        assert_eq!(
            a.id,
            Event::once("key.revoked", "key_1", json!({"x": 1}), at(9)).id
        );
        assert_ne!(
            a.id,
            Event::once("key.created", "key_1", json!({}), at(0)).id
        );
        assert_ne!(
            a.id,
            Event::once("key.revoked", "key_2", json!({}), at(0)).id
        );
    }

    #[test]
    fn random_ids_differ() {
        let a = Event::new("key.created", json!({}), at(0));
        let b = Event::new("key.created", json!({}), at(0));
        assert_ne!(a.id, b.id);
        assert!(a.id.starts_with("evt_") && a.id.len() == 28);
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_time_dot_body() {
        // The value Python's hmac module computes for the same secret, time and body.
        assert_eq!(
            signature("whsec_0123456789abcdef", 1_700_000_000, "{}"),
            "t=1700000000,v1=d0c329a0542d1a8e66b0b5503cf2d2f8f8e174c98224b843c11f74ea14c341e9"
        );
    }

    #[test]
    fn retries_back_off_and_stop_after_a_day() {
        let made = at(0);
        assert_eq!(next_attempt(made, 1, at(0)), Some(at(1)));
        assert_eq!(next_attempt(made, 2, at(1)), Some(at(3)));
        assert_eq!(next_attempt(made, 3, at(3)), Some(at(7)));
        assert_eq!(next_attempt(made, 30, at(100)), Some(at(100 + 900)));
        assert_eq!(next_attempt(made, 40, at(86_000)), None);
    }
}
