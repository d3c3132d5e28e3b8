//! The Redis key names of one API key, the Lua scripts that change them, and `WAIT`.

use std::time::Duration;

use redis::{Cmd, FromRedisValue, ScriptInvocation};

use super::conn::Conn;
use crate::auth::KeyDigest;
use crate::quota::{Day, Period};

/// Counters outlive their month by this much, for late reads and reconciliation.
pub const USAGE_GRACE_SECS: i64 = 7 * 86_400;
pub(super) const CHANNEL: &str = "audiolib:invalidate";
pub(super) const KEY_LIST: &str = "audiolib:keys";
pub(super) const ACCOUNT_LIST: &str = "audiolib:accounts";
pub(super) const AUDIT_STREAM: &str = "audiolib:audit";

/// The quota lease protocol, one call per node and subject for many requests (see
/// [`crate::store::lease`]). Per UTC month, `KEYS[1]` counts calls served (usage) and `KEYS[2]` holds,
/// per node, the units leased and not yet reported (`held:`), the last operation applied
/// (`seq:`), its grant (`last:`) and when the node was last heard from (`at:`).
///
/// `KEYS[3]` counts the calls of one UTC day (usage history), kept [`Day::KEPT`] days.
///
/// ARGV: node, seq, consumed (served from the lease; negative for refunds), returned (unused
/// units given back), extra (served without a lease during an outage), want, limit (empty for
/// none), expiry, silent-after seconds, the day counter's expiry. An operation whose seq was already applied answers its
/// earlier grant again without applying anything: a retry after a lost answer is exact.
/// Units of a node silent for longer than silent-after are never handed to anyone else (the
/// node may have served some before it fell silent); they are reported apart as not live.
/// `seq:` is kept for the whole month, so a late replay is still recognised; the other fields
/// of a silent node that holds nothing are dropped.
/// Returns {grant, usage, units held by all nodes after the grant (-1 for a replay), units
/// held by other live nodes}.
pub(super) const LEASE: &str = r"
local node = ARGV[1]
local seq = tonumber(ARGV[2])
local now = tonumber(redis.call('TIME')[1])
local last_seq = tonumber(redis.call('HGET', KEYS[2], 'seq:' .. node) or '0')
if seq <= last_seq then
  redis.call('HSET', KEYS[2], 'at:' .. node, now)
  local used = tonumber(redis.call('GET', KEYS[1]) or '0')
  return {tonumber(redis.call('HGET', KEYS[2], 'last:' .. node) or '0'), used, -1, 0}
end
local consumed, returned, extra = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local want = tonumber(ARGV[6])
local used = redis.call('INCRBY', KEYS[1], consumed + extra)
if used < 0 then redis.call('SET', KEYS[1], 0); used = 0 end
if consumed + extra ~= 0 then
  redis.call('INCRBY', KEYS[3], consumed + extra)
  redis.call('EXPIREAT', KEYS[3], ARGV[10])
end
local settled = consumed + returned
if settled ~= 0 then
  local mine = redis.call('HINCRBY', KEYS[2], 'held:' .. node, 0 - settled)
  if mine < 0 then redis.call('HSET', KEYS[2], 'held:' .. node, 0) end
end
local held, live = 0, 0
local silent_after = tonumber(ARGV[9])
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local name = fields[i]
  if string.sub(name, 1, 5) == 'held:' then
    local owner = string.sub(name, 6)
    local n = math.max(0, tonumber(fields[i + 1]))
    held = held + n
    if owner ~= node then
      local at = tonumber(redis.call('HGET', KEYS[2], 'at:' .. owner) or '0')
      if now - at <= silent_after then
        live = live + n
      elseif n == 0 then
        redis.call('HDEL', KEYS[2], name, 'last:' .. owner, 'at:' .. owner)
      end
    end
  end
end
local grant = want
if ARGV[7] ~= '' then grant = math.max(0, math.min(want, tonumber(ARGV[7]) - used - held)) end
if grant > 0 then redis.call('HINCRBY', KEYS[2], 'held:' .. node, grant) end
redis.call('HSET', KEYS[2], 'seq:' .. node, seq, 'last:' .. node, grant, 'at:' .. node, now)
redis.call('EXPIREAT', KEYS[1], ARGV[8])
redis.call('EXPIREAT', KEYS[2], ARGV[8])
return {grant, used, held + grant, live}
";

/// Update fields of an existing record (a key or an account); returns the record or nil.
/// ARGV[1] is the final status (`revoked`, `closed`): a record in it keeps its status whatever
/// the update says. Field/value pairs follow.
pub(super) const UPDATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local final = redis.call('HGET', KEYS[1], 'status') == ARGV[1]
for i = 2, #ARGV, 2 do
  if not (final and ARGV[i] == 'status') then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return redis.call('HGETALL', KEYS[1])
";

/// Sets fields of a record only while its field ARGV[1] still has the value ARGV[2] (and the
/// record exists): a compare-and-set for changes computed from a read, such as a rotation.
/// Field/value pairs follow. Returns 1 when applied.
pub(super) const SET_IF: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
";

/// Raises a key's `last_used_at` to ARGV[1] (seconds) if the key exists and it is later.
pub(super) const TOUCH: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local seen = tonumber(redis.call('HGET', KEYS[1], 'last_used_at') or '') or 0
if tonumber(ARGV[1]) > seen then redis.call('HSET', KEYS[1], 'last_used_at', ARGV[1]) end
return 1
";

/// `WAIT replicas timeout` after every lease operation and key write (SPEC §4a.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Replicas that must acknowledge a write before it counts as done (at least 1).
    pub replicas: u32,
    /// How long Redis waits for them; shorter than the call's own bound.
    pub timeout: Duration,
}

impl Wait {
    pub(super) fn cmd(&self) -> Cmd {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(self.replicas).arg(self.timeout.as_millis() as u64);
        cmd
    }

    /// An answer not confirmed by enough replicas is an error: the caller treats it as lost
    /// (a lease operation stays parked and is replayed, which its sequence number makes exact).
    pub(super) fn check(&self, acked: u32) -> redis::RedisResult<()> {
        if acked >= self.replicas {
            return Ok(());
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "write not confirmed by the replicas",
            format!(
                "WAIT: {acked} of {} replicas acknowledged within {:?}",
                self.replicas, self.timeout
            ),
        )))
    }
}

/// Runs a script, followed by `WAIT` in the same pipeline when `wait` is set. Pipelines do not
/// load scripts: on `NOSCRIPT` the script is loaded and the pipeline sent again (the script
/// did not run, so nothing happens twice).
pub(super) async fn invoke<T: FromRedisValue>(
    c: &mut Conn,
    inv: &ScriptInvocation<'_>,
    wait: Option<Wait>,
) -> redis::RedisResult<T> {
    let Some(wait) = wait else {
        return inv.invoke_async(c).await;
    };
    let mut pipe = redis::pipe();
    pipe.invoke_script(inv).add_command(wait.cmd());
    let (value, acked): (T, u32) = match pipe.query_async(c).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            inv.load_async(c).await?;
            pipe.query_async(c).await?
        }
        other => other?,
    };
    wait.check(acked)?;
    Ok(value)
}

pub(super) fn record_key(id: &str) -> String {
    format!("audiolib:{{{id}}}:key")
}

pub(super) fn usage_key(id: &str, period: Period) -> String {
    format!("audiolib:{{{id}}}:usage:{period}")
}

pub(super) fn lease_key(id: &str, period: Period) -> String {
    format!("audiolib:{{{id}}}:lease:{period}")
}

/// Calls of `id` (a key or an account) on `day`.
pub(super) fn day_key(id: &str, day: Day) -> String {
    format!("audiolib:{{{id}}}:day:{day}")
}

/// When a day's counter is dropped.
pub(super) fn day_expire_at(day: Day) -> i64 {
    day.end_unix() + i64::from(Day::KEPT) * 86_400
}

pub(super) fn account_key(id: &str) -> String {
    format!("audiolib:{{{id}}}:account")
}

/// The keys of an account, by creation time.
pub(super) fn account_keys_key(id: &str) -> String {
    format!("audiolib:{{{id}}}:keys")
}

/// The index that makes account emails unique.
pub(super) fn email_key(email: &str) -> String {
    format!("audiolib:email:{email}")
}

pub(super) fn digest_key(digest: &KeyDigest) -> String {
    format!("audiolib:digest:{digest}")
}

pub(super) fn expire_at(period: Period) -> i64 {
    period.reset_unix() + USAGE_GRACE_SECS
}

pub(super) use crate::clock::unix_secs as unix;
