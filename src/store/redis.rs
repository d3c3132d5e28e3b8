//! The shared store on Redis or Redis Cluster (SPEC §3, §4).
//!
//! # Layout
//! Every key of one API key carries the hash tag `{<id>}`, so its record and counters share a
//! hash slot and one Lua call can touch them on a cluster:
//! - `audiolib:{<id>}:key` — HASH: the key record (never the key, only its digest)
//! - `audiolib:{<id>}:usage:<YYYY-MM>` — STRING counter of successful calls in that UTC month,
//!   `EXPIREAT` the month's end plus [`USAGE_GRACE_SECS`]
//! - `audiolib:{<id>}:lease:<YYYY-MM>` — HASH: per gateway process (node id), the quota units
//!   it holds (`held:`), its last operation (`seq:`, `last:`) and when (`at:`); same expiry
//! - `audiolib:digest:<sha256 hex>` — STRING: the id, the entry point from a presented key
//! - `audiolib:keys` — ZSET of ids scored by creation time, for listing
//! - channel `audiolib:invalidate` — a digest in hex (or `*`) whenever a key changes
//!
//! All I/O runs on a dedicated one-thread runtime that owns the connections, so callers on any
//! Pingora runtime share them. Every call is bounded by a short timeout and guarded by a
//! circuit breaker: a dead Redis costs milliseconds, then nothing.
//!
//! High availability (SPEC §4a.6): a `redis+sentinel://` URL connects to the master the
//! sentinels name and follows it after a failover ([`sentinel`]); with [`Wait`] set, every
//! lease operation and key write is followed by `WAIT` on the same connection and counts as
//! failed unless enough replicas acknowledged it, so no unit is used before a replica has it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncCommands, Cmd, FromRedisValue, Pipeline, RedisFuture, Script, ScriptInvocation, Value,
};
use tokio::sync::{OnceCell, mpsc};

use self::sentinel::{SentinelMaster, SentinelUrl};

use super::lease::{Due, LeaseAnswer, LeaseBackend, LeaseOp, STALE_AFTER};
use super::{Invalidation, KeyRecord, KeyStatus, KeyUpdate, Store, StoreError};
use crate::auth::KeyDigest;
use crate::quota::Period;

pub mod sentinel;

/// Counters outlive their month by this much, for late reads and reconciliation.
pub const USAGE_GRACE_SECS: i64 = 7 * 86_400;
const CHANNEL: &str = "audiolib:invalidate";
const KEY_LIST: &str = "audiolib:keys";
/// Consecutive failures that open the breaker, and how long it stays open.
const BREAKER_THRESHOLD: u32 = 3;
const BREAKER_OPEN: Duration = Duration::from_millis(500);
/// Bound on admin and background calls (key management, usage reads, write-back).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The quota lease protocol, one call per node and subject for many requests (see
/// [`super::lease`]). Per UTC month, `KEYS[1]` counts calls served (usage) and `KEYS[2]` holds,
/// per node, the units leased and not yet reported (`held:`), the last operation applied
/// (`seq:`), its grant (`last:`) and when the node was last heard from (`at:`).
///
/// ARGV: node, seq, consumed (served from the lease; negative for refunds), returned (unused
/// units given back), extra (served without a lease during an outage), want, limit (empty for
/// none), expiry, silent-after seconds. An operation whose seq was already applied answers its
/// earlier grant again without applying anything: a retry after a lost answer is exact.
/// Units of a node silent for longer than silent-after are never handed to anyone else (the
/// node may have served some before it fell silent); they are reported apart as not live.
/// `seq:` is kept for the whole month, so a late replay is still recognised; the other fields
/// of a silent node that holds nothing are dropped.
/// Returns {grant, usage, units held by all nodes after the grant (-1 for a replay), units
/// held by other live nodes}.
const LEASE: &str = r"
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

/// Update fields of an existing record; returns the record or nil. Revocation is final: a
/// revoked record keeps its status whatever the update says.
const UPDATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local revoked = redis.call('HGET', KEYS[1], 'status') == 'revoked'
for i = 1, #ARGV, 2 do
  if not (revoked and ARGV[i] == 'status') then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return redis.call('HGETALL', KEYS[1])
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
    fn cmd(&self) -> Cmd {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(self.replicas).arg(self.timeout.as_millis() as u64);
        cmd
    }

    /// An answer not confirmed by enough replicas is an error: the caller treats it as lost
    /// (a lease operation stays parked and is replayed, which its sequence number makes exact).
    fn check(&self, acked: u32) -> redis::RedisResult<()> {
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
async fn invoke<T: FromRedisValue>(
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

fn record_key(id: &str) -> String {
    format!("audiolib:{{{id}}}:key")
}

fn usage_key(id: &str, period: Period) -> String {
    format!("audiolib:{{{id}}}:usage:{period}")
}

fn lease_key(id: &str, period: Period) -> String {
    format!("audiolib:{{{id}}}:lease:{period}")
}

fn digest_key(digest: &KeyDigest) -> String {
    format!("audiolib:digest:{digest}")
}

fn expire_at(period: Period) -> i64 {
    period.reset_unix() + USAGE_GRACE_SECS
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A single node or a cluster, behind one `ConnectionLike`.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Fails fast while Redis keeps failing; lets a probe through after a pause.
struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which calls are refused.
    open_until: AtomicU64,
    epoch: Instant,
}

impl Breaker {
    fn new() -> Self {
        Self {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    fn allows(&self) -> bool {
        self.now_ms() >= self.open_until.load(Ordering::Relaxed)
    }
    /// A success proves Redis is back: close the breaker at once.
    fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.open_until.store(0, Ordering::Relaxed);
        }
    }
    fn failure(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= BREAKER_THRESHOLD {
            self.open_until.store(
                self.now_ms() + BREAKER_OPEN.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
    }
}

/// Owns the I/O runtime; shut down without blocking so dropping the store is safe anywhere.
struct Io(Option<tokio::runtime::Runtime>);

impl Io {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("runtime lives as long as the store")
            .handle()
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

pub struct RedisStore {
    io: Io,
    single: Option<ConnectionManager>,
    cluster: Option<(ClusterClient, Arc<OnceCell<ClusterConnection>>)>,
    /// The master of a Sentinel deployment, looked up again after failures.
    sentinel: Option<Arc<SentinelMaster>>,
    /// The node the invalidation subscription uses (any node of a cluster will do: cluster
    /// pub/sub reaches every node). Empty with Sentinel: it subscribes on the master.
    pubsub_urls: Vec<String>,
    wait: Option<Wait>,
    timeout: Duration,
    breaker: Breaker,
    /// This process's name in the lease hashes.
    node: String,
    lease: Script,
    update: Script,
}

impl RedisStore {
    /// Connects lazily: the gateway starts even while Redis is down. `urls` is one URL for a
    /// single node, several for Redis Cluster seed nodes, or one `redis+sentinel://` URL.
    pub fn new(urls: &str, timeout: Duration) -> Result<Self, String> {
        Self::with_wait(urls, timeout, None)
    }

    /// As [`Self::new`], confirming every write on replicas with `WAIT` when `wait` is set
    /// (one node or Sentinel; a cluster would need it per shard, which is not supported).
    pub fn with_wait(urls: &str, timeout: Duration, wait: Option<Wait>) -> Result<Self, String> {
        let sentinel = match urls.trim() {
            url if url.starts_with(sentinel::SCHEME) => {
                Some(SentinelMaster::new(SentinelUrl::parse(url)?, timeout, wait))
            }
            _ => None,
        };
        let urls: Vec<String> = match sentinel {
            Some(_) => Vec::new(),
            None => urls.split(',').map(|u| u.trim().to_string()).collect(),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("redis-io")
            .enable_all()
            .build()
            .map_err(|e| format!("redis runtime: {e}"))?;
        let io = Io(Some(runtime));
        let (single, cluster) = if sentinel.is_some() {
            (None, None)
        } else if urls.len() == 1 {
            let client = redis::Client::open(urls[0].as_str())
                .map_err(|e| format!("redis url '{}': {e}", urls[0]))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(200));
            // Entered, not blocked on: the manager's tasks go to the I/O runtime, and this works
            // from inside another runtime too.
            let _context = io.handle().enter();
            let manager = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| format!("redis connection: {e}"))?;
            (Some(manager), None)
        } else {
            if wait.is_some() {
                return Err("WAIT for replicas is not supported on Redis Cluster".into());
            }
            let client = ClusterClient::builder(urls.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1)
                .build()
                .map_err(|e| format!("redis cluster: {e}"))?;
            (None, Some((client, Arc::new(OnceCell::new()))))
        };
        let store = Self {
            io,
            single,
            cluster,
            sentinel,
            pubsub_urls: urls,
            wait,
            timeout,
            breaker: Breaker::new(),
            node: crate::auth::new_id("node"),
            lease: Script::new(LEASE),
            update: Script::new(UPDATE),
        };
        store.check_persistence();
        Ok(store)
    }

    async fn conn(&self) -> Result<Conn, redis::RedisError> {
        if let Some(m) = &self.single {
            return Ok(Conn::Single(m.clone()));
        }
        if let Some(sentinel) = &self.sentinel {
            if let Some(conn) = sentinel.cached() {
                return Ok(Conn::Single(conn));
            }
            let sentinel = sentinel.clone();
            // Looked up and connected on the I/O runtime so the connection's tasks live there.
            return self
                .io
                .handle()
                .spawn(async move { sentinel.connection().await })
                .await
                .map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "sentinel connect task",
                        e.to_string(),
                    ))
                })?
                .map(Conn::Single);
        }
        let (client, cell) = self.cluster.as_ref().expect("single, sentinel or cluster");
        let conn = cell
            .get_or_try_init(|| {
                let client = client.clone();
                let handle = self.io.handle().clone();
                async move {
                    // Spawned on the I/O runtime so its background tasks live there.
                    handle
                        .spawn(async move { client.get_async_connection().await })
                        .await
                        .map_err(|e| {
                            redis::RedisError::from((
                                redis::ErrorKind::Io,
                                "cluster connect task",
                                e.to_string(),
                            ))
                        })?
                }
            })
            .await?;
        Ok(Conn::Cluster(conn.clone()))
    }

    /// Warns once, when Redis first answers, if it persists nothing (SPEC §4a.6): a restart
    /// of such a server forgets every key and count. With Sentinel every new master is
    /// checked when it is first connected to; on a cluster, every seed node.
    fn check_persistence(&self) {
        let single = self.single.clone();
        let sentinel = self.sentinel.clone();
        let seeds = match self.cluster {
            Some(_) => self.pubsub_urls.clone(),
            None => Vec::new(),
        };
        let label = self
            .pubsub_urls
            .first()
            .map_or(String::new(), |u| crate::config::redact_url(u));
        let timeout = self.timeout;
        let wait = self.wait;
        self.io.handle().spawn(async move {
            let mut unchecked = seeds;
            loop {
                let done = if let Some(mut conn) = single.clone() {
                    report_durability(&mut conn, &label, wait).await
                } else if let Some(sentinel) = &sentinel {
                    // Connecting to a new master checks it.
                    sentinel.connection().await.is_ok()
                } else {
                    let mut left = Vec::new();
                    for url in unchecked {
                        let checked = async {
                            let client = redis::Client::open(url.as_str()).ok()?;
                            let connect = client.get_multiplexed_async_connection();
                            let mut conn = tokio::time::timeout(timeout * 4, connect)
                                .await
                                .ok()?
                                .ok()?;
                            report_durability(&mut conn, &crate::config::redact_url(&url), None)
                                .await
                                .then_some(())
                        }
                        .await;
                        if checked.is_none() {
                            left.push(url);
                        }
                    }
                    unchecked = left;
                    unchecked.is_empty()
                };
                if done {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Runs a request-path operation under the breaker and the short timeout.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker.allows() {
            return Err(StoreError("redis circuit open".into()));
        }
        self.call_within(self.timeout, op).await
    }

    /// Runs an admin or background operation: nobody waits on it per request, so a slow
    /// moment should not fail it, and an open breaker does not stop it (it probes instead).
    async fn call_patiently<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.call_within(ADMIN_TIMEOUT.max(self.timeout), op).await
    }

    async fn call_within<T, F, Fut>(&self, timeout: Duration, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = tokio::time::timeout(timeout, async {
            let conn = self.conn().await?;
            op(conn).await
        })
        .await;
        match result {
            Ok(Ok(v)) => {
                self.breaker.success();
                Ok(v)
            }
            Ok(Err(e)) => {
                self.failed();
                Err(StoreError(format!("redis: {e}")))
            }
            Err(_) => {
                self.failed();
                Err(StoreError(format!("redis: no answer within {timeout:?}")))
            }
        }
    }

    /// A call failed: the breaker counts it, and with Sentinel the next call asks the
    /// sentinels first (a failover explains a dead connection, `READONLY` and a `WAIT` that
    /// no replica answers alike; one lookup per failure, bounded by the breaker).
    fn failed(&self) {
        self.breaker.failure();
        if let Some(sentinel) = &self.sentinel {
            sentinel.suspect();
        }
    }

    /// Runs one lease operation for `key_id` (bounded and breaker-guarded like every
    /// request-path call).
    async fn run_lease(
        &self,
        key_id: &str,
        op: LeaseOp,
        deadline: tokio::time::Instant,
    ) -> Result<LeaseAnswer, StoreError> {
        let script = &self.lease;
        let node = &self.node;
        let op = &op;
        let wait = self.wait;
        if !self.breaker.allows() {
            return Err(StoreError("redis circuit open".into()));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (grant, used, held, live_others): (u64, u64, i64, u64) = self
            .call_within(left, |mut c| async move {
                let mut inv = script.key(usage_key(key_id, op.period));
                inv.key(lease_key(key_id, op.period))
                    .arg(node)
                    .arg(op.seq)
                    .arg(op.consumed)
                    .arg(op.returned)
                    .arg(op.extra)
                    .arg(op.want)
                    .arg(op.limit.map(|l| l.to_string()).unwrap_or_default())
                    .arg(expire_at(op.period))
                    .arg(STALE_AFTER.as_secs());
                invoke(&mut c, &inv, wait).await
            })
            .await?;
        Ok(LeaseAnswer {
            grant,
            used,
            committed: u64::try_from(held).ok().map(|h| used + h),
            live_others,
        })
    }

    /// Sends one operation of a sync (background: the patient bound).
    async fn report(&self, due: &Due) -> Option<LeaseAnswer> {
        let until = tokio::time::Instant::now() + ADMIN_TIMEOUT;
        self.run_lease(&due.subject, due.op.clone(), until)
            .await
            .ok()
    }

    /// Reads a record hash; `None` when the hash is empty (no such key).
    fn parse_record(fields: HashMap<String, String>) -> Result<Option<KeyRecord>, StoreError> {
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

    fn status_str(status: KeyStatus) -> &'static str {
        match status {
            KeyStatus::Active => "active",
            KeyStatus::Inactive => "inactive",
            KeyStatus::Revoked => "revoked",
        }
    }

    /// Listens on the invalidation channel for as long as the store lives, reconnecting after
    /// failures; every (re)subscription first sends `All`, since changes may have been missed.
    /// With Sentinel it subscribes on the master and moves when the sentinels name another.
    fn listen(&self, sink: mpsc::UnboundedSender<Invalidation>) {
        let urls = self.pubsub_urls.clone();
        let sentinel = self.sentinel.clone();
        let timeout = self.timeout;
        self.io.handle().spawn(async move {
            let mut next = 0usize;
            loop {
                if sink.is_closed() {
                    return;
                }
                let (url, master) = match &sentinel {
                    Some(sentinel) => match sentinel.master_addr().await {
                        Ok(addr) => (sentinel.url().master_url(&addr), Some(addr)),
                        Err(e) => {
                            log::debug!("invalidation subscription: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    None => {
                        next += 1;
                        (urls[(next - 1) % urls.len()].clone(), None)
                    }
                };
                let shown = crate::config::redact_url(&url);
                let subscribed = async {
                    let client = redis::Client::open(url.as_str())?;
                    let mut pubsub = tokio::time::timeout(timeout * 4, client.get_async_pubsub())
                        .await
                        .map_err(|_| {
                            redis::RedisError::from((
                                redis::ErrorKind::Io,
                                "pubsub connect timeout",
                            ))
                        })??;
                    pubsub.subscribe(CHANNEL).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                }
                .await;
                match subscribed {
                    Ok(pubsub) => {
                        log::info!("subscribed to key invalidations on {shown}");
                        let _ = sink.send(Invalidation::All);
                        let mut messages = pubsub.into_on_message();
                        // With Sentinel, a master that was demoted but still runs keeps the
                        // subscription open (and may lag or be cut off from the new master):
                        // the sentinels are asked every second, to stay on the master.
                        let mut check = tokio::time::interval(Duration::from_secs(1));
                        check.tick().await;
                        loop {
                            tokio::select! {
                                msg = messages.next() => {
                                    let Some(msg) = msg else {
                                        log::warn!("key invalidation subscription lost; reconnecting");
                                        break;
                                    };
                                    let payload: String = msg.get_payload().unwrap_or_default();
                                    let event = match KeyDigest::parse_hex(&payload) {
                                        Some(d) => Invalidation::Key(d),
                                        None => Invalidation::All,
                                    };
                                    if sink.send(event).is_err() {
                                        return;
                                    }
                                }
                                _ = check.tick(), if master.is_some() => {
                                    let sentinel = sentinel.as_ref().expect("master from sentinel");
                                    if let Ok(now) = sentinel.master_addr().await
                                        && Some(&now) != master.as_ref()
                                    {
                                        log::info!("redis master moved; moving the key invalidation subscription");
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => log::debug!("invalidation subscription to {shown} failed: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
}

/// Logs one warning if the server behind `conn` persists nothing (no AOF, no RDB snapshots),
/// at debug level if it will not say (`CONFIG` renamed away or not permitted); and one if it
/// has fewer connected replicas than `wait` needs (every write would fail until they connect).
/// False when it could not be reached, to try again later.
pub(crate) async fn report_durability<C: ConnectionLike + Send>(
    conn: &mut C,
    server: &str,
    wait: Option<Wait>,
) -> bool {
    let get = |name: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        cmd
    };
    let answers: redis::RedisResult<(HashMap<String, String>, HashMap<String, String>)> = async {
        Ok((
            get("appendonly").query_async(conn).await?,
            get("save").query_async(conn).await?,
        ))
    }
    .await;
    match answers {
        Ok((aof, save)) => {
            let aof = aof.get("appendonly").map_or("", String::as_str);
            let save = save.get("save").map_or("", String::as_str);
            if aof != "no" || !save.trim().is_empty() {
                log::debug!("Redis at {server} persists (appendonly {aof}, save \"{save}\")");
            } else {
                log::warn!(
                    "Redis at {server} persists nothing (appendonly no, save \"\"): a restart loses every API key and quota count; enable AOF (appendonly yes, appendfsync everysec or always)"
                );
            }
        }
        Err(e) if unreachable(&e) => return false,
        Err(e) => log::debug!(
            "cannot tell whether Redis at {server} persists anything: CONFIG GET refused ({e})"
        ),
    }
    let Some(wait) = wait else {
        return true;
    };
    let info: redis::RedisResult<String> = redis::cmd("INFO")
        .arg("replication")
        .query_async(conn)
        .await;
    match info {
        Ok(info) => {
            let replicas: Option<u32> = info
                .lines()
                .find_map(|l| l.strip_prefix("connected_slaves:"))
                .and_then(|n| n.trim().parse().ok());
            if let Some(replicas) = replicas.filter(|&n| n < wait.replicas) {
                log::warn!(
                    "Redis at {server} has {replicas} connected replicas but store.redis_wait_replicas is {}: quota operations and key writes fail until enough replicas connect",
                    wait.replicas
                );
            }
            true
        }
        Err(e) => !unreachable(&e),
    }
}

fn unreachable(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped()
}

#[async_trait]
impl Store for RedisStore {
    async fn insert_key(&self, r: KeyRecord) -> Result<(), StoreError> {
        let fields: Vec<(&str, String)> = vec![
            ("id", r.id.clone()),
            ("digest", r.digest.to_string()),
            ("prefix", r.prefix.clone()),
            ("name", r.name.clone()),
            ("plan", r.plan.clone()),
            (
                "monthly_limit",
                r.monthly_limit.map(|l| l.to_string()).unwrap_or_default(),
            ),
            ("status", Self::status_str(r.status).to_string()),
            ("created_at", unix(r.created_at).to_string()),
            ("updated_at", unix(r.updated_at).to_string()),
        ];
        let id = r.id.clone();
        let created = unix(r.created_at);
        let wait = self.wait;
        // The record first, the digest index last: a key is usable only once complete.
        self.call_patiently(|mut c| async move {
            let Some(wait) = wait else {
                let _: () = c.hset_multiple(record_key(&id), &fields).await?;
                let _: () = c.zadd(KEY_LIST, &id, created).await?;
                return c.set(digest_key(&r.digest), &id).await;
            };
            // Created (201) only once the replicas have it. One pipeline, so WAIT runs on the
            // connection that wrote: on a new one (after a reconnect) it would wait for
            // nothing and confirm writes no replica has.
            let (acked,): (u32,) = redis::pipe()
                .hset_multiple(record_key(&id), &fields)
                .ignore()
                .zadd(KEY_LIST, &id, created)
                .ignore()
                .set(digest_key(&r.digest), &id)
                .ignore()
                .add_command(wait.cmd())
                .query_async(&mut c)
                .await?;
            wait.check(acked)
        })
        .await
    }

    async fn key_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        let fields = self
            .call(|mut c| async move {
                let id: Option<String> = c.get(digest_key(digest)).await?;
                match id {
                    Some(id) => c.hgetall(record_key(&id)).await,
                    None => Ok(HashMap::new()),
                }
            })
            .await?;
        Self::parse_record(fields)
    }

    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Ok(None);
        }
        let fields = self
            .call_patiently(|mut c| async move { c.hgetall(record_key(id)).await })
            .await?;
        Self::parse_record(fields)
    }

    async fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let ids: Vec<String> = self
            .call_patiently(|mut c| async move { c.zrange(KEY_LIST, 0, -1).await })
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(r) = self.key_by_id(&id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    async fn update_key(
        &self,
        id: &str,
        update: KeyUpdate,
        now: SystemTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Ok(None);
        }
        let mut args: Vec<String> = vec!["updated_at".into(), unix(now).to_string()];
        if let Some(plan) = update.plan {
            args.extend(["plan".into(), plan]);
        }
        if let Some(limit) = update.monthly_limit {
            args.extend([
                "monthly_limit".into(),
                limit.map(|l| l.to_string()).unwrap_or_default(),
            ]);
        }
        if let Some(status) = update.status {
            args.extend(["status".into(), Self::status_str(status).into()]);
        }
        let script = &self.update;
        let wait = self.wait;
        let fields: Option<HashMap<String, String>> = self
            .call_patiently(|mut c| async move {
                let mut inv = script.key(record_key(id));
                for a in &args {
                    inv.arg(a);
                }
                invoke(&mut c, &inv, wait).await
            })
            .await?;
        match fields {
            Some(fields) => Self::parse_record(fields),
            None => Ok(None),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
    }

    async fn announce(&self, digest: &KeyDigest) -> Result<(), StoreError> {
        let payload = digest.to_string();
        let _: i64 = self
            .call_patiently(|mut c| async move { c.publish(CHANNEL, payload).await })
            .await?;
        Ok(())
    }

    fn watch(&self, sink: mpsc::UnboundedSender<Invalidation>) {
        self.listen(sink);
    }
}

#[async_trait]
impl LeaseBackend for RedisStore {
    async fn apply(
        &self,
        subject: &str,
        op: &LeaseOp,
        until: tokio::time::Instant,
    ) -> Result<LeaseAnswer, StoreError> {
        self.run_lease(subject, op.clone(), until).await
    }

    /// Many subjects at once, 64 in flight: the multiplexed connection pipelines them.
    async fn apply_all(&self, due: &[Due]) -> Vec<Option<LeaseAnswer>> {
        let mut answers = Vec::with_capacity(due.len());
        for chunk in due.chunks(64) {
            answers
                .extend(futures_util::future::join_all(chunk.iter().map(|d| self.report(d))).await);
        }
        answers
    }

    async fn used(&self, subject: &str, period: Period) -> Result<u64, StoreError> {
        let used: Option<u64> = self
            .call_patiently(|mut c| async move { c.get(usage_key(subject, period)).await })
            .await?;
        Ok(used.unwrap_or(0))
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }
}
