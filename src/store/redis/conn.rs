//! Connections: one node, a cluster or a Sentinel-named master behind one `ConnectionLike`,
//! the circuit breaker, the I/O runtime, and the start-up durability checks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::Wait;

/// Consecutive failures that open the breaker, and how long it stays open.
const BREAKER_THRESHOLD: u32 = 3;
const BREAKER_OPEN: Duration = Duration::from_millis(500);

/// A single node or a cluster, behind one `ConnectionLike`.
#[derive(Clone)]
pub(super) enum Conn {
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
pub(super) struct Breaker {
    failures: AtomicU32,
    /// The last failure was a refused or dropped connection (Redis is not there), not a slow
    /// answer; cleared by a success.
    refused: std::sync::atomic::AtomicBool,
    /// Milliseconds since `epoch` until which calls are refused.
    open_until: AtomicU64,
    epoch: Instant,
}

impl Breaker {
    pub(super) fn new() -> Self {
        Self {
            failures: AtomicU32::new(0),
            refused: std::sync::atomic::AtomicBool::new(false),
            open_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    pub(super) fn allows(&self) -> bool {
        self.now_ms() >= self.open_until.load(Ordering::Relaxed)
    }
    /// A success proves Redis is back: close the breaker at once.
    pub(super) fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.open_until.store(0, Ordering::Relaxed);
            self.refused.store(false, Ordering::Relaxed);
        }
    }
    /// Redis is down, not slow: a connection was refused or dropped, or several calls in a
    /// row failed, and none succeeded since.
    pub(super) fn tripped(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
            || self.failures.load(Ordering::Relaxed) >= BREAKER_THRESHOLD
    }
    /// Marks the failure being counted as one that says Redis is not there at all.
    pub(super) fn refusal(&self) {
        self.refused.store(true, Ordering::Relaxed);
    }
    pub(super) fn failure(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= BREAKER_THRESHOLD {
            self.open_until.store(
                self.now_ms() + BREAKER_OPEN.as_millis() as u64,
                Ordering::Relaxed,
            );
        }
    }
}

/// Owns the I/O runtime; shut down without blocking so dropping the store is safe anywhere.
pub(super) struct Io(pub(super) Option<tokio::runtime::Runtime>);

impl Io {
    pub(super) fn handle(&self) -> &tokio::runtime::Handle {
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

/// Logs one warning if the server behind `conn` persists nothing (no AOF, no RDB snapshots),
/// at debug level if it will not say (`CONFIG` renamed away or not permitted); and one if it
/// has fewer connected replicas than `wait` needs (every write would fail until they connect).
/// False when it could not be reached, to try again later.
pub(super) async fn report_durability<C: ConnectionLike + Send>(
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

pub(super) fn unreachable(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped()
}
