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
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncCommands, Script};
use tokio::sync::{OnceCell, mpsc};

use self::sentinel::{SentinelMaster, SentinelUrl};

use super::lease::{Due, LeaseAnswer, LeaseBackend, LeaseOp, STALE_AFTER};
use super::{
    AccountRecord, AccountUpdate, AuditEntry, Invalidation, KeyRecord, KeyStatus, KeyUpdate,
    Rotation, Store, StoreError,
};
use crate::auth::KeyDigest;
use crate::quota::{Day, Period};

mod conn;
mod outbox;
mod portal;
mod pubsub;
mod records;
mod scripts;
pub mod sentinel;

use self::conn::{Breaker, Conn, Io, report_durability};
use self::scripts::{
    ACCOUNT_LIST, AUDIT_STREAM, CHANNEL, KEY_LIST, LEASE, SET_IF, TOUCH, UPDATE, account_key,
    account_keys_key, day_expire_at, day_key, digest_key, email_key, expire_at, invoke, lease_key,
    record_key, unix, usage_key,
};
pub use self::scripts::{USAGE_GRACE_SECS, Wait};

/// Bound on admin and background calls (key management, usage reads, lease reports).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The bound of a patient call: never shorter than the request path's.
fn patient(timeout: Duration) -> Duration {
    ADMIN_TIMEOUT.max(timeout)
}

/// A connection manager's settings. Its response timeout is the patient bound, so it never
/// cuts an admin or background call short (the request path's shorter bound is
/// `call_within`'s); a connection attempt keeps the short bound, so one that hangs while Redis
/// restarts is given up and tried again soon.
fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(patient(timeout)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200))
}

/// Commands a bulk import keeps in flight at once.
const IMPORT_DEPTH: usize = 64;

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
    set_if: Script,
    touch: Script,
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
            let config = manager_config(timeout);
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
                .response_timeout(patient(timeout))
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
            set_if: Script::new(SET_IF),
            touch: Script::new(TOUCH),
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
        self.call_within(patient(self.timeout), op).await
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
                if e.is_connection_refusal() || e.is_connection_dropped() {
                    self.breaker.refusal();
                }
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
        op: &LeaseOp,
        deadline: tokio::time::Instant,
    ) -> Result<LeaseAnswer, StoreError> {
        let script = &self.lease;
        let node = &self.node;
        let wait = self.wait;
        if !self.breaker.allows() {
            return Err(StoreError("redis circuit open".into()));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (grant, used, held, live_others): (u64, u64, i64, u64) = self
            .call_within(left, |mut c| async move {
                let mut inv = script.key(usage_key(key_id, op.period));
                inv.key(lease_key(key_id, op.period))
                    .key(day_key(key_id, op.day))
                    .arg(node)
                    .arg(op.seq)
                    .arg(op.consumed)
                    .arg(op.returned)
                    .arg(op.extra)
                    .arg(op.want)
                    .arg(op.limit.map(|l| l.to_string()).unwrap_or_default())
                    .arg(expire_at(op.period))
                    .arg(STALE_AFTER.as_secs())
                    .arg(day_expire_at(op.day));
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
    /// Up to `limit` ids of the sorted set `list` (scored by creation time) after the member
    /// `after`, found by its rank at the time of the call: members are never removed, so a
    /// walk lists each existing one once (`None` if `after` is not a member).
    async fn page_ids(
        &self,
        list: &'static str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<String>>, StoreError> {
        self.call_patiently(|mut c| async move {
            let start = match after {
                None => 0,
                Some(member) => match c.zrank::<_, _, Option<isize>>(list, member).await? {
                    Some(rank) => rank + 1,
                    None => return Ok(None),
                },
            };
            let ids: Vec<String> = c.zrange(list, start, start + limit as isize - 1).await?;
            Ok(Some(ids))
        })
        .await
    }

    /// Runs [`UPDATE`] on the hash `key` (`args`: the final status, then field/value pairs).
    async fn update_hash(
        &self,
        key: String,
        args: Vec<String>,
    ) -> Result<Option<HashMap<String, String>>, StoreError> {
        let script = &self.update;
        let wait = self.wait;
        self.call_patiently(|mut c| {
            let (key, args) = (&key, &args);
            async move {
                let mut inv = script.key(key);
                for a in args {
                    inv.arg(a);
                }
                invoke(&mut c, &inv, wait).await
            }
        })
        .await
    }

    async fn report(&self, due: &Due) -> Option<LeaseAnswer> {
        let until = tokio::time::Instant::now() + ADMIN_TIMEOUT;
        self.run_lease(&due.subject, &due.op, until).await.ok()
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn insert_key(&self, r: KeyRecord) -> Result<(), StoreError> {
        let fields = records::key_fields(&r);
        let id = r.id.clone();
        let created = unix(r.created_at);
        let wait = self.wait;
        // The record first, the digest index last: a key is usable only once complete.
        let mut writes = vec![
            redis::Cmd::hset_multiple(record_key(&id), &fields),
            redis::Cmd::zadd(KEY_LIST, &id, created),
        ];
        if let Some(account) = &r.account_id {
            writes.push(redis::Cmd::zadd(account_keys_key(account), &id, created));
        }
        writes.push(redis::Cmd::set(digest_key(&r.digest), &id));
        self.call_patiently(|c| write_all(c, writes, wait)).await
    }

    /// Checks every digest, then writes the keys: an import races nothing but another import
    /// of the same digests (they are random 256-bit values). Both steps keep [`IMPORT_DEPTH`]
    /// commands in flight on the multiplexed connection, so a batch costs round trips by the
    /// hundred, not one per key (and each command stays in its own cluster slot).
    async fn insert_keys(&self, records: Vec<KeyRecord>) -> Result<bool, StoreError> {
        for batch in records.chunks(IMPORT_DEPTH) {
            let checks = batch.iter().map(|r| {
                let key = digest_key(&r.digest);
                self.call_patiently(move |mut c| async move { c.exists::<_, bool>(key).await })
            });
            for taken in join_all(checks).await {
                if taken? {
                    return Ok(false);
                }
            }
        }
        for batch in records.chunks(IMPORT_DEPTH) {
            let writes = batch.iter().map(|r| self.insert_key(r.clone()));
            for written in join_all(writes).await {
                written?;
            }
        }
        Ok(true)
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
        records::parse_record(fields)
    }

    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let fields = self
            .call_patiently(|mut c| async move { c.hgetall(record_key(id)).await })
            .await?;
        records::parse_record(fields)
    }

    async fn list_keys(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<KeyRecord>>, StoreError> {
        let Some(ids) = self.page_ids(KEY_LIST, after, limit).await? else {
            return Ok(None);
        };
        fetch_each(ids, |id| async move { self.key_by_id(&id).await })
            .await
            .map(Some)
    }

    async fn update_key(
        &self,
        id: &str,
        update: KeyUpdate,
        now: SystemTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let mut args: Vec<String> = vec![
            KeyStatus::Revoked.as_str().into(),
            "updated_at".into(),
            unix(now).to_string(),
        ];
        if let Some(expires_at) = update.expires_at {
            args.extend(["expires_at".into(), records::time_str(expires_at)]);
        }
        if let Some(meta) = update.meta {
            args.extend(["meta".into(), meta.unwrap_or_default()]);
        }
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
            args.extend(["status".into(), status.as_str().into()]);
        }
        match self.update_hash(record_key(id), args).await? {
            Some(fields) => records::parse_record(fields),
            None => Ok(None),
        }
    }

    /// Read, rotate in memory ([`KeyRecord::rotate`]), write back if the digest is still the
    /// one read (else another rotation won: read again). The new digest's index is written
    /// first and the dropped ones' removed last; in between, an index that points at a
    /// record whose digests do not match opens nothing ([`KeyRecord::serves`]).
    async fn rotate_key(
        &self,
        id: &str,
        rotation: Rotation,
        now: SystemTime,
    ) -> Result<Option<(KeyRecord, Vec<KeyDigest>)>, StoreError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let wait = self.wait;
        let (new_index, owner) = (digest_key(&rotation.digest), id.to_string());
        self.call_patiently(|c| write_all(c, vec![redis::Cmd::set(&new_index, &owner)], wait))
            .await?;
        for _ in 0..8 {
            let Some(mut record) = self.key_by_id(id).await? else {
                return Ok(None);
            };
            if record.status == KeyStatus::Revoked {
                return Ok(Some((record, Vec::new())));
            }
            let read = record.digest.to_string();
            let dropped = record.rotate(rotation.clone(), now);
            let mut args: Vec<String> = vec!["digest".into(), read];
            for (name, value) in records::key_fields(&record) {
                if matches!(
                    name,
                    "digest" | "prefix" | "previous_digest" | "previous_expires_at" | "updated_at"
                ) {
                    args.extend([name.to_string(), value]);
                }
            }
            let script = &self.set_if;
            let applied: i64 = self
                .call_patiently(|mut c| {
                    let args = &args;
                    async move {
                        let mut inv = script.key(record_key(id));
                        for a in args {
                            inv.arg(a);
                        }
                        invoke(&mut c, &inv, wait).await
                    }
                })
                .await?;
            if applied == 1 {
                let stale: Vec<redis::Cmd> = dropped
                    .iter()
                    .map(|d| redis::Cmd::del(digest_key(d)))
                    .collect();
                self.call_patiently(|c| write_all(c, stale, wait)).await?;
                return Ok(Some((record, dropped)));
            }
        }
        Err(StoreError("key rotation: the record kept changing".into()))
    }

    async fn touch_keys(&self, used: &[(String, SystemTime)]) -> Result<(), StoreError> {
        let script = &self.touch;
        for (id, at) in used.iter().filter(|(id, _)| valid_id(id)) {
            let at = unix(*at);
            let _: i64 = self
                .call_patiently(|mut c| async move {
                    script
                        .key(record_key(id))
                        .arg(at)
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
        }
        Ok(())
    }

    /// A stream: its ids are the entries' order, and `MINID` drops the old ones as it goes.
    async fn append_audit(&self, e: AuditEntry, keep_after: SystemTime) -> Result<(), StoreError> {
        let minid = keep_after
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut add = redis::cmd("XADD");
        add.arg(AUDIT_STREAM)
            .arg("MINID")
            .arg("~")
            .arg(minid)
            .arg("*")
            .arg("at")
            .arg(unix(e.at))
            .arg("actor")
            .arg(&e.actor)
            .arg("action")
            .arg(&e.action)
            .arg("target")
            .arg(&e.target)
            .arg("changes")
            .arg(&e.changes);
        let wait = self.wait;
        self.call_patiently(|c| write_all(c, vec![add], wait)).await
    }

    async fn audit_page(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let end = match before {
            Some(seq) => format!("({}", records::stream_id(seq)),
            None => "+".to_string(),
        };
        let entries: Vec<(String, HashMap<String, String>)> = self
            .call_patiently(|mut c| {
                let end = &end;
                async move {
                    redis::cmd("XREVRANGE")
                        .arg(AUDIT_STREAM)
                        .arg(end)
                        .arg("-")
                        .arg("COUNT")
                        .arg(limit)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        entries
            .into_iter()
            .map(|(id, fields)| records::parse_audit(&id, fields))
            .collect()
    }

    async fn insert_account(&self, r: AccountRecord) -> Result<bool, StoreError> {
        let fields = records::account_fields(&r);
        let created = unix(r.created_at);
        let wait = self.wait;
        let (id, email) = (&r.id, &r.email);
        // The email is claimed first: of two accounts created with one email, one wins and
        // the other writes nothing.
        let claimed: bool = self
            .call_patiently(|mut c| async move {
                let claimed: Option<String> = redis::cmd("SET")
                    .arg(email_key(email))
                    .arg(id)
                    .arg("NX")
                    .query_async(&mut c)
                    .await?;
                Ok(claimed.is_some())
            })
            .await?;
        if !claimed {
            return Ok(false);
        }
        let writes = vec![
            redis::Cmd::hset_multiple(account_key(id), &fields),
            redis::Cmd::zadd(ACCOUNT_LIST, id, created),
        ];
        let written = self.call_patiently(|c| write_all(c, writes, wait)).await;
        if let Err(e) = written {
            // Give the email back so a retry can succeed; if this fails too, the email stays
            // taken by an account that does not exist (visible as a 409 on retry).
            let _ = self
                .call(|mut c| async move { c.del::<_, ()>(email_key(email)).await })
                .await;
            return Err(e);
        }
        Ok(true)
    }

    async fn account_by_id(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let fields = self
            .call_patiently(|mut c| async move { c.hgetall(account_key(id)).await })
            .await?;
        records::parse_account(fields)
    }

    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<AccountRecord>>, StoreError> {
        let Some(ids) = self.page_ids(ACCOUNT_LIST, after, limit).await? else {
            return Ok(None);
        };
        fetch_each(ids, |id| async move { self.account_by_id(&id).await })
            .await
            .map(Some)
    }

    async fn update_account(
        &self,
        id: &str,
        update: AccountUpdate,
        now: SystemTime,
    ) -> Result<Option<AccountRecord>, StoreError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let mut args: Vec<String> = vec![
            super::AccountStatus::Closed.as_str().into(),
            "updated_at".into(),
            unix(now).to_string(),
        ];
        if let Some(name) = update.name {
            args.extend(["name".into(), name]);
        }
        if let Some(plan) = update.plan {
            args.extend(["plan".into(), plan]);
        }
        if let Some(limit) = update.monthly_limit {
            args.extend(["monthly_limit".into(), records::limit_str(limit)]);
        }
        if let Some(status) = update.status {
            args.extend(["status".into(), status.as_str().into()]);
        }
        match self.update_hash(account_key(id), args).await? {
            Some(fields) => records::parse_account(fields),
            None => Ok(None),
        }
    }

    async fn keys_of_account(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        if !valid_id(id) {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = self
            .call_patiently(|mut c| async move { c.zrange(account_keys_key(id), 0, -1).await })
            .await?;
        fetch_each(ids, |key| async move { self.key_by_id(&key).await }).await
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
        self.run_lease(subject, op, until).await
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

    /// One `MGET` of the day counters, which share the subject's slot.
    async fn days(&self, subject: &str, from: Day, to: Day) -> Result<Vec<(Day, u64)>, StoreError> {
        let days: Vec<Day> = (from.0..=to.0).map(Day).collect();
        if days.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = days.iter().map(|d| day_key(subject, *d)).collect();
        let counts: Vec<Option<i64>> = self
            .call_patiently(|mut c| {
                let keys = &keys;
                async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await }
            })
            .await?;
        Ok(days
            .into_iter()
            .zip(counts)
            .filter_map(|(d, n)| Some((d, n?.max(0) as u64)))
            .collect())
    }

    /// One `INCRBY` and `EXPIREAT` per subject (each in its own cluster slot).
    async fn count_days(&self, day: Day, calls: &[(String, u64)]) -> Result<(), StoreError> {
        let mut writes = Vec::with_capacity(calls.len() * 2);
        for (subject, n) in calls.iter().filter(|(s, _)| valid_id(s)) {
            let key = day_key(subject, day);
            writes.push(redis::Cmd::incr(&key, *n));
            writes.push(redis::Cmd::expire_at(&key, day_expire_at(day)));
        }
        let wait = self.wait;
        self.call_patiently(|c| write_all(c, writes, wait)).await
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn confirmed_down(&self) -> bool {
        self.breaker.tripped()
    }
}

/// Runs `writes` in order. With `wait`, in one pipeline ending in `WAIT`, so the write counts
/// as done (201) only once the replicas have it: WAIT must run on the connection that wrote,
/// since on a new one (after a reconnect) it would confirm writes no replica has. Without,
/// one by one, as a cluster needs for writes to several slots.
async fn write_all(
    mut c: Conn,
    writes: Vec<redis::Cmd>,
    wait: Option<Wait>,
) -> redis::RedisResult<()> {
    let Some(wait) = wait else {
        for write in writes {
            write.query_async::<()>(&mut c).await?;
        }
        return Ok(());
    };
    let mut pipe = redis::pipe();
    for write in writes {
        pipe.add_command(write).ignore();
    }
    let (acked,): (u32,) = pipe.add_command(wait.cmd()).query_async(&mut c).await?;
    wait.check(acked)
}

/// The records of `ids` in order, each read by its own command (each in its own cluster
/// slot), [`IMPORT_DEPTH`] at a time on the multiplexed connection; ids whose record is gone
/// are left out.
async fn fetch_each<T, F, Fut>(ids: Vec<String>, fetch: F) -> Result<Vec<T>, StoreError>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, StoreError>>,
{
    let mut out = Vec::with_capacity(ids.len());
    for batch in ids.chunks(IMPORT_DEPTH) {
        for record in join_all(batch.iter().cloned().map(&fetch)).await {
            if let Some(record) = record? {
                out.push(record);
            }
        }
    }
    Ok(out)
}

/// Ids are ours (`key_…`, `acct_…`): anything else names no record, and never reaches a key
/// name where a brace could move it to another cluster slot.
fn valid_id(id: &str) -> bool {
    id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
