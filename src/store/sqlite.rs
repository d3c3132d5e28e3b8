//! The embedded durable store: keys and quota in one SQLite file under the data directory
//! (SPEC §4a.5, §7 `AUDIOLIB_DATA_DIR`), for a gateway that runs without Redis.
//!
//! # Why SQLite
//! WAL mode with `synchronous=FULL` makes every commit durable and atomic, so the file
//! survives SIGKILL (and power loss) at any moment; several processes can open it at once
//! (the old and the new process of a zero-downtime upgrade), serialised by SQLite's own file
//! locks; and the `bundled` build needs no system library. redb and fjall lock their files
//! to one process.
//!
//! # Quota off the disk
//! Calls are served from quota leases exactly as on Redis ([`super::lease`]): each process is
//! a node, takes blocks of units in one transaction and reports use once a second, so the hot
//! path never waits for the disk. A block is written (as `held`) before any of it is served.
//! When a process dies without reporting, the next process to look (at start and every few
//! seconds) sees that its pid is gone and counts its whole held block as used: after a crash
//! usage can only be above the calls served (by at most the unserved part of one block per
//! key), and no key ever gets more than its limit.
//!
//! # Schema (`PRAGMA user_version` 2)
//! - `keys`: the key records (digest in hex, never the key), with the account they belong to.
//! - `accounts`: the accounts (version 2 added them and `keys.account_id`; a version-1 file is
//!   upgraded in place when opened).
//! - `usage(subject, period, used)`: calls counted per subject (a key id, or an account id
//!   for keys of an account) and UTC month.
//! - `usage_days(subject, day, calls)`: the same per UTC day (days since the epoch), kept
//!   [`Day::KEPT`] days: the usage history.
//! - `leases(subject, period, node, held, seq, last_grant)`: units each process holds and
//!   the last operation of it applied, as in the Redis lease hash.
//! - `nodes(node, pid, started, heard_at)`: the processes using the file; `started` is the
//!   kernel's start time of the pid, so a reused pid is not mistaken for a live process.
//! - `audit(seq, at, actor, action, target, changes)`: the audit log, newest by `seq`.
//! - `key_changes(seq, digest, at)`: changes to key records, polled by the other process so its
//!   key cache forgets them (the embedded analogue of Redis pub/sub).
//! - `outbox(id, body, created_ms, due_ms, attempts)`: webhook events ([`super::outbox`]);
//!   `due_ms` is NULL once an event is delivered or given up, and the row stays for
//!   [`KEEP_IDS`](super::outbox::KEEP_IDS) so its id is not recorded twice. A table added
//!   without a version change: `CREATE TABLE IF NOT EXISTS` brings any file up to date.
//! - `portal_passwords`, `portal_invites`, `portal_sessions`, `portal_failures`: the developer
//!   portal's ([`portal`]; created when missing, outside the version number).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use tokio::sync::mpsc;

use super::lease::{Due, LeaseAnswer, LeaseBackend, LeaseOp, STALE_AFTER};
use super::{
    AccountRecord, AccountStatus, AccountUpdate, AuditEntry, Invalidation, KeyRecord, KeyStatus,
    KeyUpdate, Rotation, Store, StoreError,
};
use crate::auth::KeyDigest;
use crate::locks::lock;
use crate::quota::{Day, Period};

mod outbox;
mod portal;

/// The database file inside the data directory.
pub const FILE_NAME: &str = "audiolib.db";
/// A disk has no network: a call waits this long (a stalled disk, the other process's
/// write) before it counts as failed and the outage policy applies.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often key changes made by another process are looked for.
const CHANGES_POLL: Duration = Duration::from_millis(100);
/// Key changes older than this are pruned (every process has long seen them).
const CHANGES_KEEP_SECS: i64 = 300;
/// Dead processes are looked for every this many syncs (about 2 s).
const REAP_EVERY: u64 = 20;
/// A write-ahead log larger than this is emptied by the next upkeep.
pub const WAL_LIMIT: u64 = 64 << 20;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    account_id TEXT,
    expires_at INTEGER,
    meta TEXT,
    last_used_at INTEGER,
    previous_digest TEXT,
    previous_expires_at INTEGER,
    prefix TEXT NOT NULL,
    name TEXT NOT NULL,
    plan TEXT NOT NULL,
    monthly_limit INTEGER,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_by_creation ON keys (created_at, id);
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    plan TEXT NOT NULL,
    monthly_limit INTEGER,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS accounts_by_creation ON accounts (created_at, id);
CREATE TABLE IF NOT EXISTS usage (
    subject TEXT NOT NULL,
    period TEXT NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (subject, period)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_days (
    subject TEXT NOT NULL,
    day INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    PRIMARY KEY (subject, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    subject TEXT NOT NULL,
    period TEXT NOT NULL,
    node TEXT NOT NULL,
    held INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    last_grant INTEGER NOT NULL,
    PRIMARY KEY (subject, period, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    started INTEGER NOT NULL,
    heard_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    changes TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS key_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    digest TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    due_ms INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (due_ms) WHERE due_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_finished ON outbox (created_ms) WHERE due_ms IS NULL;
-- The prunes by age (every audit append, every upkeep) read these instead of every row.
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at);
CREATE INDEX IF NOT EXISTS usage_days_by_day ON usage_days (day);
CREATE INDEX IF NOT EXISTS key_changes_by_time ON key_changes (at);
";

/// After [`SCHEMA`]: what a version-1 file lacks, then the version.
const MIGRATE: &str = "
CREATE INDEX IF NOT EXISTS keys_by_account ON keys (account_id, created_at, id);
CREATE INDEX IF NOT EXISTS keys_by_previous_digest ON keys (previous_digest);
PRAGMA user_version = 2;
";

/// The connections: writes go through one, reads (key lookups, usage, polling) through
/// another so they never wait behind a commit's fsync, checkpoints through a third. std
/// locks: the holder is a blocking thread doing SQLite work, never an `.await`.
struct Db {
    write: Mutex<Connection>,
    read: Mutex<Connection>,
    /// Kept open for the upkeep's checkpoints: opening a connection parses the schema again
    /// (some 650 k instructions, every few seconds).
    checkpointer: Mutex<Connection>,
}

pub struct SqliteStore {
    db: Arc<Db>,
    path: PathBuf,
    node: String,
    /// Syncs so far, to do the upkeep every few.
    syncs: std::sync::atomic::AtomicU64,
    /// The last key change this process has applied to its cache.
    changes_seen: Arc<AtomicI64>,
}

fn db_error(e: rusqlite::Error) -> StoreError {
    StoreError(format!("embedded store: {e}"))
}

fn unix_now() -> i64 {
    unix(SystemTime::now())
}

fn unix(t: SystemTime) -> i64 {
    crate::clock::unix_secs(t) as i64
}

fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

const KEY_COLUMNS: &str = "id, digest, prefix, name, plan, monthly_limit, status, created_at, \
    updated_at, account_id, expires_at, meta, last_used_at, previous_digest, previous_expires_at";

/// Columns added to `keys` after version 1, with their types.
const KEY_COLUMNS_ADDED: [(&str, &str); 6] = [
    ("account_id", "TEXT"),
    ("expires_at", "INTEGER"),
    ("meta", "TEXT"),
    ("last_used_at", "INTEGER"),
    ("previous_digest", "TEXT"),
    ("previous_expires_at", "INTEGER"),
];

const ACCOUNT_COLUMNS: &str =
    "id, email, name, plan, monthly_limit, status, created_at, updated_at";

fn bad_column(i: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        i,
        rusqlite::types::Type::Text,
        format!("bad {what}").into(),
    )
}

fn account_from_row(row: &Row) -> rusqlite::Result<AccountRecord> {
    let status: String = row.get(5)?;
    let limit: Option<i64> = row.get(4)?;
    Ok(AccountRecord {
        id: row.get(0)?,
        email: row.get(1)?,
        name: row.get(2)?,
        plan: row.get(3)?,
        monthly_limit: limit.map(|l| l.max(0) as u64),
        status: AccountStatus::parse(&status).ok_or_else(|| bad_column(5, "status"))?,
        created_at: from_unix(row.get(6)?),
        updated_at: from_unix(row.get(7)?),
    })
}

fn key_from_row(row: &Row) -> rusqlite::Result<KeyRecord> {
    let bad = bad_column;
    let digest: String = row.get(1)?;
    let status: String = row.get(6)?;
    let limit: Option<i64> = row.get(5)?;
    let time = |i| -> rusqlite::Result<Option<SystemTime>> {
        Ok(row.get::<_, Option<i64>>(i)?.map(from_unix))
    };
    let previous: Option<String> = row.get(13)?;
    Ok(KeyRecord {
        id: row.get(0)?,
        digest: KeyDigest::parse_hex(&digest).ok_or_else(|| bad(1, "digest"))?,
        account_id: row.get(9)?,
        prefix: row.get(2)?,
        name: row.get(3)?,
        plan: row.get(4)?,
        monthly_limit: limit.map(|l| l.max(0) as u64),
        status: KeyStatus::parse(&status).ok_or_else(|| bad(6, "status"))?,
        expires_at: time(10)?,
        meta: row.get(11)?,
        last_used_at: time(12)?,
        previous_digest: match previous {
            Some(hex) => Some(KeyDigest::parse_hex(&hex).ok_or_else(|| bad(13, "digest"))?),
            None => None,
        },
        previous_expires_at: time(14)?,
        created_at: from_unix(row.get(7)?),
        updated_at: from_unix(row.get(8)?),
    })
}

/// A page of `table` in creation order, after the row with id `after` (`None` if there is no
/// such row): keyset pagination on the `(created_at, id)` index, so a page costs the same
/// however deep the walk.
fn page<T>(
    conn: &Connection,
    table: &str,
    columns: &str,
    after: Option<String>,
    limit: usize,
    row: impl Fn(&Row) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<Vec<T>>> {
    let limit = limit as i64;
    let Some(after) = after else {
        let sql = format!("SELECT {columns} FROM {table} ORDER BY created_at, id LIMIT ?1");
        return conn
            .prepare(&sql)?
            .query_map([limit], row)?
            .collect::<rusqlite::Result<_>>()
            .map(Some);
    };
    let start: Option<i64> = conn
        .query_row(
            &format!("SELECT created_at FROM {table} WHERE id = ?1"),
            [&after],
            |r| r.get(0),
        )
        .optional()?;
    let Some(start) = start else {
        return Ok(None);
    };
    let sql = format!(
        "SELECT {columns} FROM {table} WHERE (created_at, id) > (?1, ?2)
         ORDER BY created_at, id LIMIT ?3"
    );
    conn.prepare(&sql)?
        .query_map(params![start, after, limit], row)?
        .collect::<rusqlite::Result<_>>()
        .map(Some)
}

/// The kernel's start time of `pid` (clock ticks since boot), `None` if no such process.
fn process_start(pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Adds `calls` to `subject`'s count of `day`.
fn count_day(tx: &Transaction, subject: &str, day: Day, calls: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO usage_days (subject, day, calls) VALUES (?1, ?2, ?3)
         ON CONFLICT (subject, day) DO UPDATE SET calls = MAX(0, calls + excluded.calls)",
    )?
    .execute(params![subject, day.0, calls])?;
    Ok(())
}

/// Applies one lease operation of `node` (the same steps as the Redis script).
fn apply(
    tx: &Transaction,
    node: &str,
    subject: &str,
    op: &LeaseOp,
) -> rusqlite::Result<LeaseAnswer> {
    let period = op.period.to_string();
    let mine: Option<(i64, i64, i64)> = tx
        .prepare_cached(
            "SELECT held, seq, last_grant FROM leases WHERE subject = ?1 AND period = ?2 AND node = ?3",
        )?
        .query_row(params![subject, period, node], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let used: i64 = tx
        .prepare_cached("SELECT used FROM usage WHERE subject = ?1 AND period = ?2")?
        .query_row(params![subject, period], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    if let Some((_, seq, last)) = mine
        && op.seq as i64 <= seq
    {
        return Ok(LeaseAnswer {
            grant: last.max(0) as u64,
            used: used.max(0) as u64,
            committed: None,
            live_others: 0,
        });
    }
    let delta = op.consumed + op.extra as i64;
    let used = (used + delta).max(0);
    if delta != 0 {
        count_day(tx, subject, op.day, delta)?;
    }
    tx.prepare_cached(
        "INSERT INTO usage (subject, period, used) VALUES (?1, ?2, ?3)
         ON CONFLICT (subject, period) DO UPDATE SET used = excluded.used",
    )?
    .execute(params![subject, period, used])?;
    let held = (mine.map_or(0, |m| m.0) - op.consumed - op.returned as i64).max(0);
    let silent_before = unix_now() - STALE_AFTER.as_secs() as i64;
    let (others, live): (i64, i64) = tx
        .prepare_cached(
            "SELECT COALESCE(SUM(l.held), 0),
                    COALESCE(SUM(CASE WHEN n.heard_at >= ?4 THEN l.held ELSE 0 END), 0)
             FROM leases l LEFT JOIN nodes n ON n.node = l.node
             WHERE l.subject = ?1 AND l.period = ?2 AND l.node != ?3",
        )?
        .query_row(params![subject, period, node, silent_before], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let grant = match op.limit {
        None => op.want,
        Some(limit) => op
            .want
            .min((limit as i64 - used - others - held).max(0) as u64),
    };
    tx.prepare_cached(
        "INSERT INTO leases (subject, period, node, held, seq, last_grant) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (subject, period, node) DO UPDATE
         SET held = excluded.held, seq = excluded.seq, last_grant = excluded.last_grant",
    )?
    .execute(params![subject, period, node, held + grant as i64, op.seq as i64, grant as i64])?;
    Ok(LeaseAnswer {
        grant,
        used: used as u64,
        committed: Some((used + others + held) as u64 + grant),
        live_others: live.max(0) as u64,
    })
}

impl Db {
    fn open(path: &Path) -> rusqlite::Result<Connection> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(CALL_TIMEOUT)?;
        // The lease and key-change statements run many times a second: parsed and planned
        // once (rusqlite's default keeps 16, fewer than the write connection's kinds).
        conn.set_prepared_statement_cache_capacity(64);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Checkpoints run from the upkeep on a connection of their own, never inside a
        // commit that a waiting call depends on.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(conn)
    }

    /// Brings a file of an earlier schema version up to date.
    fn migrate(conn: &Connection) -> rusqlite::Result<()> {
        for (column, kind) in KEY_COLUMNS_ADDED {
            let present = conn
                .prepare("SELECT 1 FROM pragma_table_info('keys') WHERE name = ?1")?
                .exists([column])?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE keys ADD COLUMN {column} {kind}"))?;
            }
        }
        conn.execute_batch(MIGRATE)
    }

    /// Copies the write-ahead log into the database without blocking writers (PASSIVE). Under
    /// continuous writes a passive checkpoint never catches up with the log's end, so the log
    /// is never started again and grows without bound (seen: 8 GB beside a 400 MB database
    /// while accounts were created from 16 clients). Past [`WAL_LIMIT`], a TRUNCATE checkpoint
    /// under this process's write lock finishes the copy (most of it was just done) and
    /// empties the file; in-process writers wait for it, briefly.
    fn checkpoint(&self, path: &Path) -> rusqlite::Result<()> {
        lock(&self.checkpointer).query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        if std::fs::metadata(&wal).map_or(0, |m| m.len()) > WAL_LIMIT {
            lock(&self.write).query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        }
        Ok(())
    }

    /// Applies `ops` of `node` in one transaction: one fsync for a whole sync tick.
    fn apply_all(
        &self,
        node: &str,
        ops: &[(&str, &LeaseOp)],
    ) -> rusqlite::Result<Vec<LeaseAnswer>> {
        let mut conn = lock(&self.write);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let answers = ops
            .iter()
            .map(|(subject, op)| apply(&tx, node, subject, op))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        tx.prepare_cached("UPDATE nodes SET heard_at = ?2 WHERE node = ?1")?
            .execute(params![node, unix_now()])?;
        tx.commit()?;
        Ok(answers)
    }

    /// Counts the held units of every process that is gone as used, and forgets it.
    fn reap_dead(&self, me: &str) -> rusqlite::Result<u64> {
        let mut conn = lock(&self.write);
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let nodes: Vec<(String, u32, i64)> = tx
            .prepare("SELECT node, pid, started FROM nodes WHERE node != ?1")?
            .query_map([me], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut folded = 0u64;
        for (node, pid, started) in nodes {
            if process_start(pid) == Some(started) {
                continue;
            }
            let held: Vec<(String, String, i64)> = tx
                .prepare("SELECT subject, period, held FROM leases WHERE node = ?1 AND held > 0")?
                .query_map([&node], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut units = 0u64;
            let today = Day::containing(SystemTime::now());
            for (subject, period, n) in held {
                tx.execute(
                    "INSERT INTO usage (subject, period, used) VALUES (?1, ?2, ?3)
                     ON CONFLICT (subject, period) DO UPDATE SET used = used + excluded.used",
                    params![subject, period, n],
                )?;
                count_day(&tx, &subject, today, n)?;
                units += n as u64;
            }
            tx.execute("DELETE FROM leases WHERE node = ?1", [&node])?;
            tx.execute("DELETE FROM nodes WHERE node = ?1", [&node])?;
            if units > 0 {
                log::warn!(
                    "embedded store: process {pid} ended without reporting; the {units} quota units it held are counted as used"
                );
            }
            folded += units;
        }
        tx.execute(
            "DELETE FROM key_changes WHERE at < ?1",
            [unix_now() - CHANGES_KEEP_SECS],
        )?;
        let oldest = Day::containing(SystemTime::now())
            .0
            .saturating_sub(Day::KEPT);
        tx.execute("DELETE FROM usage_days WHERE day < ?1", [oldest])?;
        tx.commit()?;
        Ok(folded)
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir` and registers this process as a node.
    pub fn open(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("data directory {}: {e}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let fail = |e: rusqlite::Error| format!("embedded store {}: {e}", path.display());
        let write = Db::open(&path).map_err(fail)?;
        write.execute_batch(SCHEMA).map_err(fail)?;
        write.execute_batch(portal::SCHEMA).map_err(fail)?;
        Db::migrate(&write).map_err(fail)?;
        let read = Db::open(&path).map_err(fail)?;
        let checkpointer = Db::open(&path).map_err(fail)?;
        let node = crate::auth::new_id("node");
        let pid = std::process::id();
        let started = process_start(pid).unwrap_or(0);
        write
            .execute(
                "INSERT INTO nodes (node, pid, started, heard_at) VALUES (?1, ?2, ?3, ?4)",
                params![node, pid, started, unix_now()],
            )
            .map_err(fail)?;
        let seen: i64 = read
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM key_changes", [], |r| {
                r.get(0)
            })
            .map_err(fail)?;
        let db = Arc::new(Db {
            write: Mutex::new(write),
            read: Mutex::new(read),
            checkpointer: Mutex::new(checkpointer),
        });
        db.reap_dead(&node).map_err(fail)?;
        Ok(Self {
            db,
            path,
            node,
            syncs: Default::default(),
            changes_seen: Arc::new(AtomicI64::new(seen)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs blocking SQLite work off the async threads, bounded by `until`.
    async fn blocking<T: Send + 'static>(
        &self,
        until: tokio::time::Instant,
        work: impl FnOnce(&Db) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        let task = tokio::task::spawn_blocking(move || work(&db));
        match tokio::time::timeout_at(until, task).await {
            Ok(Ok(result)) => result.map_err(db_error),
            Ok(Err(e)) => Err(StoreError(format!("embedded store task: {e}"))),
            Err(_) => Err(StoreError("embedded store: no answer in time".into())),
        }
    }

    async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Db) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.blocking(tokio::time::Instant::now() + CALL_TIMEOUT, work)
            .await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_key(&self, r: KeyRecord) -> Result<(), StoreError> {
        if self.insert_keys(vec![r]).await? {
            Ok(())
        } else {
            Err(StoreError(
                "embedded store: a key with this digest exists".into(),
            ))
        }
    }

    /// One transaction: all the keys or none.
    async fn insert_keys(&self, records: Vec<KeyRecord>) -> Result<bool, StoreError> {
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut insert = tx.prepare(&format!(
                    "INSERT INTO keys ({KEY_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
                ))?;
                for r in records {
                    let inserted = insert.execute(params![
                        r.id,
                        r.digest.to_string(),
                        r.prefix,
                        r.name,
                        r.plan,
                        r.monthly_limit.map(|l| l as i64),
                        r.status.as_str(),
                        unix(r.created_at),
                        unix(r.updated_at),
                        r.account_id,
                        r.expires_at.map(unix),
                        r.meta,
                        r.last_used_at.map(unix),
                        r.previous_digest.map(|d| d.to_string()),
                        r.previous_expires_at.map(unix)
                    ]);
                    match inserted {
                        Ok(_) => {}
                        Err(rusqlite::Error::SqliteFailure(e, _))
                            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                        {
                            return Ok(false);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn key_by_digest(&self, digest: &KeyDigest) -> Result<Option<KeyRecord>, StoreError> {
        let digest = digest.to_string();
        self.call(move |db| {
            lock(&db.read)
                .query_row(
                    // A rotated key is found by its previous secret too; whether that one
                    // still opens it is the caller's decision (KeyRecord::serves).
                    &format!(
                        "SELECT {KEY_COLUMNS} FROM keys WHERE digest = ?1 OR previous_digest = ?1"
                    ),
                    [digest],
                    key_from_row,
                )
                .optional()
        })
        .await
    }

    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |db| {
            lock(&db.read)
                .query_row(
                    &format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1"),
                    [id],
                    key_from_row,
                )
                .optional()
        })
        .await
    }

    async fn list_keys(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<KeyRecord>>, StoreError> {
        let after = after.map(str::to_string);
        self.call(move |db| {
            page(
                &lock(&db.read),
                "keys",
                KEY_COLUMNS,
                after,
                limit,
                key_from_row,
            )
        })
        .await
    }

    async fn update_key(
        &self,
        id: &str,
        update: KeyUpdate,
        now: SystemTime,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let select = format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1");
            let Some(mut record) = tx.query_row(&select, [&id], key_from_row).optional()? else {
                return Ok(None);
            };
            if let Some(plan) = update.plan {
                record.plan = plan;
            }
            if let Some(limit) = update.monthly_limit {
                record.monthly_limit = limit;
            }
            // Revocation is final, decided inside the transaction.
            if let Some(status) = update.status
                && record.status != KeyStatus::Revoked
            {
                record.status = status;
            }
            if let Some(expires_at) = update.expires_at {
                record.expires_at = expires_at;
            }
            if let Some(meta) = update.meta {
                record.meta = meta;
            }
            record.updated_at = from_unix(unix(now));
            tx.execute(
                "UPDATE keys SET plan = ?2, monthly_limit = ?3, status = ?4, updated_at = ?5,
                 expires_at = ?6, meta = ?7 WHERE id = ?1",
                params![
                    id,
                    record.plan,
                    record.monthly_limit.map(|l| l as i64),
                    record.status.as_str(),
                    unix(now),
                    record.expires_at.map(unix),
                    record.meta
                ],
            )?;
            tx.commit()?;
            Ok(Some(record))
        })
        .await
    }

    async fn rotate_key(
        &self,
        id: &str,
        rotation: Rotation,
        now: SystemTime,
    ) -> Result<Option<(KeyRecord, Vec<KeyDigest>)>, StoreError> {
        let id = id.to_string();
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let select = format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1");
            let Some(mut record) = tx.query_row(&select, [&id], key_from_row).optional()? else {
                return Ok(None);
            };
            if record.status == KeyStatus::Revoked {
                return Ok(Some((record, Vec::new())));
            }
            let dropped = record.rotate(rotation, now);
            tx.execute(
                "UPDATE keys SET digest = ?2, prefix = ?3, previous_digest = ?4,
                 previous_expires_at = ?5, updated_at = ?6 WHERE id = ?1",
                params![
                    id,
                    record.digest.to_string(),
                    record.prefix,
                    record.previous_digest.map(|d| d.to_string()),
                    record.previous_expires_at.map(unix),
                    unix(record.updated_at)
                ],
            )?;
            tx.commit()?;
            Ok(Some((record, dropped)))
        })
        .await
    }

    async fn touch_keys(&self, used: &[(String, SystemTime)]) -> Result<(), StoreError> {
        let used: Vec<(String, i64)> = used.iter().map(|(id, t)| (id.clone(), unix(*t))).collect();
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (id, at) in &used {
                tx.execute(
                    "UPDATE keys SET last_used_at = MAX(COALESCE(last_used_at, 0), ?2) WHERE id = ?1",
                    params![id, at],
                )?;
            }
            tx.commit()
        })
        .await
    }

    async fn append_audit(&self, e: AuditEntry, keep_after: SystemTime) -> Result<(), StoreError> {
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO audit (at, actor, action, target, changes) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![unix(e.at), e.actor, e.action, e.target, e.changes],
            )?;
            tx.execute("DELETE FROM audit WHERE at < ?1", [unix(keep_after)])?;
            tx.commit()
        })
        .await
    }

    async fn audit_page(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let before = before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64);
        self.call(move |db| {
            lock(&db.read)
                .prepare(
                    "SELECT seq, at, actor, action, target, changes FROM audit
                     WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
                )?
                .query_map(params![before, limit as i64], |r| {
                    Ok(AuditEntry {
                        seq: r.get::<_, i64>(0)? as u64,
                        at: from_unix(r.get(1)?),
                        actor: r.get(2)?,
                        action: r.get(3)?,
                        target: r.get(4)?,
                        changes: r.get(5)?,
                    })
                })?
                .collect()
        })
        .await
    }

    async fn insert_account(&self, r: AccountRecord) -> Result<bool, StoreError> {
        self.call(move |db| {
            let inserted = lock(&db.write).execute(
                &format!(
                    "INSERT INTO accounts ({ACCOUNT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (email) DO NOTHING"
                ),
                params![
                    r.id,
                    r.email,
                    r.name,
                    r.plan,
                    r.monthly_limit.map(|l| l as i64),
                    r.status.as_str(),
                    unix(r.created_at),
                    unix(r.updated_at)
                ],
            )?;
            Ok(inserted == 1)
        })
        .await
    }

    async fn account_by_id(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |db| {
            lock(&db.read)
                .query_row(
                    &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"),
                    [id],
                    account_from_row,
                )
                .optional()
        })
        .await
    }

    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<AccountRecord>>, StoreError> {
        let after = after.map(str::to_string);
        self.call(move |db| {
            let conn = lock(&db.read);
            page(
                &conn,
                "accounts",
                ACCOUNT_COLUMNS,
                after,
                limit,
                account_from_row,
            )
        })
        .await
    }

    async fn update_account(
        &self,
        id: &str,
        update: AccountUpdate,
        now: SystemTime,
    ) -> Result<Option<AccountRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let select = format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1");
            let Some(mut record) = tx.query_row(&select, [&id], account_from_row).optional()?
            else {
                return Ok(None);
            };
            // Closing is final, decided inside the transaction.
            if record.status != AccountStatus::Closed {
                if let Some(name) = update.name {
                    record.name = name;
                }
                if let Some(plan) = update.plan {
                    record.plan = plan;
                }
                if let Some(limit) = update.monthly_limit {
                    record.monthly_limit = limit;
                }
                if let Some(status) = update.status {
                    record.status = status;
                }
                record.updated_at = from_unix(unix(now));
            }
            tx.execute(
                "UPDATE accounts SET name = ?2, plan = ?3, monthly_limit = ?4, status = ?5, updated_at = ?6
                 WHERE id = ?1",
                params![
                    id,
                    record.name,
                    record.plan,
                    record.monthly_limit.map(|l| l as i64),
                    record.status.as_str(),
                    unix(record.updated_at)
                ],
            )?;
            tx.commit()?;
            Ok(Some(record))
        })
        .await
    }

    async fn keys_of_account(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |db| {
            lock(&db.read)
                .prepare(&format!(
                    "SELECT {KEY_COLUMNS} FROM keys WHERE account_id = ?1 ORDER BY created_at, id"
                ))?
                .query_map([id], key_from_row)?
                .collect()
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(|db| lock(&db.read).query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    async fn announce(&self, digest: &KeyDigest) -> Result<(), StoreError> {
        let digest = digest.to_string();
        self.call(move |db| {
            lock(&db.write).execute(
                "INSERT INTO key_changes (digest, at) VALUES (?1, ?2)",
                params![digest, unix_now()],
            )?;
            Ok(())
        })
        .await
    }

    fn watch(&self, sink: mpsc::UnboundedSender<Invalidation>) {
        let db = self.db.clone();
        let seen = self.changes_seen.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHANGES_POLL);
            while !sink.is_closed() {
                tick.tick().await;
                let db = db.clone();
                let after = seen.load(Ordering::Relaxed);
                let changes = tokio::task::spawn_blocking(move || {
                    lock(&db.read)
                        .prepare_cached(
                            "SELECT seq, digest FROM key_changes WHERE seq > ?1 ORDER BY seq",
                        )?
                        .query_map([after], |r| {
                            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .await;
                let Ok(Ok(changes)) = changes else {
                    continue;
                };
                for (seq, digest) in changes {
                    seen.store(seq, Ordering::Relaxed);
                    let event =
                        KeyDigest::parse_hex(&digest).map_or(Invalidation::All, Invalidation::Key);
                    if sink.send(event).is_err() {
                        return;
                    }
                }
            }
        });
    }
}

#[async_trait]
impl LeaseBackend for SqliteStore {
    async fn apply(
        &self,
        subject: &str,
        op: &LeaseOp,
        until: tokio::time::Instant,
    ) -> Result<LeaseAnswer, StoreError> {
        let (node, subject, op) = (self.node.clone(), subject.to_string(), op.clone());
        let mut answers = self
            .blocking(until, move |db| db.apply_all(&node, &[(&subject, &op)]))
            .await?;
        answers
            .pop()
            .ok_or_else(|| StoreError("embedded store: no answer".into()))
    }

    /// One transaction, one fsync, for the whole tick.
    async fn apply_all(&self, due: &[Due]) -> Vec<Option<LeaseAnswer>> {
        let node = self.node.clone();
        let ops: Vec<(String, LeaseOp)> = due
            .iter()
            .map(|d| (d.subject.clone(), d.op.clone()))
            .collect();
        let count = ops.len();
        let answers = self
            .call(move |db| {
                let refs: Vec<(&str, &LeaseOp)> =
                    ops.iter().map(|(s, op)| (s.as_str(), op)).collect();
                db.apply_all(&node, &refs)
            })
            .await;
        match answers {
            Ok(answers) => answers.into_iter().map(Some).collect(),
            Err(e) => {
                log::warn!("embedded store: quota report failed: {e}");
                vec![None; count]
            }
        }
    }

    async fn used(&self, subject: &str, period: Period) -> Result<u64, StoreError> {
        let (id, period) = (subject.to_string(), period.to_string());
        self.call(move |db| {
            lock(&db.read)
                .query_row(
                    "SELECT used FROM usage WHERE subject = ?1 AND period = ?2",
                    [id, period],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
                .map(|u| u.unwrap_or(0).max(0) as u64)
        })
        .await
    }

    async fn days(&self, subject: &str, from: Day, to: Day) -> Result<Vec<(Day, u64)>, StoreError> {
        let subject = subject.to_string();
        self.call(move |db| {
            lock(&db.read)
                .prepare(
                    "SELECT day, calls FROM usage_days WHERE subject = ?1 AND day BETWEEN ?2 AND ?3",
                )?
                .query_map(params![subject, from.0, to.0], |r| {
                    Ok((Day(r.get(0)?), r.get::<_, i64>(1)?.max(0) as u64))
                })?
                .collect()
        })
        .await
    }

    async fn count_days(&self, day: Day, calls: &[(String, u64)]) -> Result<(), StoreError> {
        let calls = calls.to_vec();
        self.call(move |db| {
            let mut conn = lock(&db.write);
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (subject, n) in &calls {
                count_day(&tx, subject, day, *n as i64)?;
            }
            tx.commit()
        })
        .await
    }

    fn timeout(&self) -> Duration {
        CALL_TIMEOUT
    }

    /// Every [`REAP_EVERY`] syncs: count what dead processes held as used.
    async fn upkeep(&self) {
        if self.syncs.fetch_add(1, Ordering::Relaxed) % REAP_EVERY != REAP_EVERY - 1 {
            return;
        }
        let node = self.node.clone();
        if let Err(e) = self.call(move |db| db.reap_dead(&node)).await {
            log::warn!("embedded store: looking for dead processes failed: {e}");
        }
        let path = self.path.clone();
        if let Err(e) = self.call(move |db| db.checkpoint(&path)).await {
            log::warn!("embedded store: checkpoint failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every prune by age runs on each audit append or every upkeep: each must search an
    /// index, never scan its table (a scan made an audit append cost grow with the log).
    #[test]
    fn prunes_by_age_search_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let conn = lock(&store.db.read);
        for prune in [
            "DELETE FROM audit WHERE at < 1",
            "DELETE FROM usage_days WHERE day < 1",
            "DELETE FROM key_changes WHERE at < 1",
            "DELETE FROM outbox WHERE due_ms IS NULL AND created_ms < 1",
            "DELETE FROM portal_sessions WHERE seen_at < 1",
        ] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {prune}"))
                .unwrap()
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().all(|step| !step.starts_with("SCAN")),
                "{prune}: {plan:?}"
            );
        }
    }
}
