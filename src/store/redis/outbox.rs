//! The outbox on Redis. Every key has the hash tag `{events}`, so one Lua call can touch them
//! all on a cluster (the outbox is small: events are rare next to calls):
//! - `audiolib:{events}:id:<id>` — STRING, set when the event is recorded, expiring after
//!   [`KEEP_IDS`]: the memory of ids that makes a second recording a no-op
//! - `audiolib:{events}:body` — HASH id → the event's JSON
//! - `audiolib:{events}:meta` — HASH id → `<created ms>:<attempts>`
//! - `audiolib:{events}:due` — ZSET of waiting ids scored by when they are due (ms)

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::Script;

use super::scripts::invoke;
use super::{RedisStore, valid_id};
use crate::events::Event;
use crate::store::StoreError;
use crate::store::outbox::{KEEP_IDS, Outbox, Pending, from_ms, to_ms as ms};

const BODY: &str = "audiolib:{events}:body";
const META: &str = "audiolib:{events}:meta";
const DUE: &str = "audiolib:{events}:due";

fn id_key(id: &str) -> String {
    format!("audiolib:{{events}}:id:{id}")
}

/// KEYS: id, body, meta, due. ARGV: id, body, created ms, id memory ms. 0 when known.
static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[4]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3] .. ':0')
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
return 1
",
    )
});

/// KEYS: due, body, meta. ARGV: now ms, claimed-until ms, limit. Returns id, body, meta
/// triples of the events claimed.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id)
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
  out[#out + 1] = redis.call('HGET', KEYS[3], id) or '0:0'
end
return out
",
    )
});

/// KEYS: due, meta. ARGV: id, due ms, attempts. Only an event still waiting is rescheduled.
static RETRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local created = string.match(redis.call('HGET', KEYS[2], ARGV[1]) or '0:0', '^(%d+)')
redis.call('HSET', KEYS[2], ARGV[1], created .. ':' .. ARGV[3])
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
return 1
",
    )
});

fn pending(id: String, body: String, meta: &str) -> Pending {
    let (created, attempts) = meta.split_once(':').unwrap_or(("0", "0"));
    Pending {
        event: Event {
            id,
            body,
            created_at: from_ms(created.parse().unwrap_or(0)),
        },
        attempts: attempts.parse().unwrap_or(0),
    }
}

#[async_trait]
impl Outbox for RedisStore {
    async fn enqueue(&self, event: &Event) -> Result<bool, StoreError> {
        if !valid_id(&event.id) {
            return Err(StoreError(format!("event id '{}' is not ours", event.id)));
        }
        let wait = self.wait;
        let added: i64 = self
            .call_patiently(|mut c| async move {
                let mut inv = ENQUEUE.key(id_key(&event.id));
                inv.key(BODY).key(META).key(DUE);
                inv.arg(&event.id)
                    .arg(&event.body)
                    .arg(ms(event.created_at))
                    .arg(KEEP_IDS.as_millis() as u64);
                invoke(&mut c, &inv, wait).await
            })
            .await?;
        Ok(added == 1)
    }

    async fn claim(
        &self,
        now: SystemTime,
        hold: Duration,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        let wait = self.wait;
        let flat: Vec<String> = self
            .call_patiently(|mut c| async move {
                let mut inv = CLAIM.key(DUE);
                inv.key(BODY).key(META);
                inv.arg(ms(now)).arg(ms(now + hold)).arg(limit);
                invoke(&mut c, &inv, wait).await
            })
            .await?;
        let mut out = Vec::with_capacity(flat.len() / 3);
        let mut it = flat.into_iter();
        while let (Some(id), Some(body), Some(meta)) = (it.next(), it.next(), it.next()) {
            out.push(pending(id, body, &meta));
        }
        Ok(out)
    }

    async fn finish(&self, id: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrem(DUE, id)
            .ignore()
            .hdel(BODY, id)
            .ignore()
            .hdel(META, id)
            .ignore();
        self.call_patiently(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    async fn retry(&self, id: &str, at: SystemTime, attempts: u32) -> Result<(), StoreError> {
        let wait = self.wait;
        let _: i64 = self
            .call_patiently(|mut c| async move {
                let mut inv = RETRY.key(DUE);
                inv.key(META);
                inv.arg(id).arg(ms(at)).arg(attempts);
                invoke(&mut c, &inv, wait).await
            })
            .await?;
        Ok(())
    }
}
