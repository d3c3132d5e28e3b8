//! Redis high availability (SPEC §4a.6): a Sentinel failover under load with `WAIT`, `WAIT`
//! failing closed without a replica, and the start-up warning when Redis persists nothing.
//! Every Redis and sentinel here is the test's own process on loopback (Debian's
//! `redis-server` and `redis-sentinel`; `scripts/test` installs them).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Gateway, RedisServer, agent, free_port, read_reply, redis_cli, wait_until};
use serde_json::json;

const BODY: &str = r#"{"library":"audio.focus"}"#;
const MASTER: &str = "mymaster";

/// Sentinels watching one master, each with its config file in a temporary directory
/// (sentinel rewrites it); killed when dropped.
struct Sentinels {
    children: Vec<Child>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Sentinels {
    /// `count` sentinels with `quorum`, declaring the master down after 1 s of silence.
    fn start(count: usize, quorum: usize, master_port: u16) -> Sentinels {
        let dir = tempfile::tempdir().unwrap();
        let mut children = Vec::new();
        let mut ports = Vec::new();
        for i in 0..count {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {master_port} {quorum}\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 4000\n\
                     sentinel parallel-syncs {MASTER} 1\n",
                    dir.path().display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join(format!("sentinel-{i}.log"))).unwrap();
            children.push(
                Command::new("redis-sentinel")
                    .arg(&conf)
                    .stdout(log)
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-sentinel (scripts/test installs it)"),
            );
            ports.push(port);
        }
        let sentinels = Sentinels {
            children,
            ports,
            _dir: dir,
        };
        for &port in &sentinels.ports {
            wait_until("sentinel", Duration::from_secs(20), || {
                redis_cli(port, &["PING"]).is_some_and(|r| r.trim() == "PONG")
            });
        }
        sentinels
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/{MASTER}", hosts.join(","))
    }

    /// The master's port as every sentinel names it, when they agree.
    fn master_port(&self) -> Option<u16> {
        let named: Vec<Option<u16>> = self
            .ports
            .iter()
            .map(|&p| {
                redis_cli(p, &["--raw", "SENTINEL", "get-master-addr-by-name", MASTER])
                    .and_then(|out| out.lines().nth(1).and_then(|l| l.trim().parse().ok()))
            })
            .collect();
        named[0].filter(|_| named.iter().all(|n| *n == named[0]))
    }

    /// Waits until the sentinels see each other and the replica on `replica_port`, so a
    /// failover can be authorised and has somewhere to go.
    fn wait_ready(&self, replica_port: u16) {
        for &port in &self.ports {
            wait_until("sentinel quorum", Duration::from_secs(30), || {
                redis_cli(port, &["SENTINEL", "ckquorum", MASTER])
                    .is_some_and(|r| r.starts_with(&format!("OK {} usable", self.ports.len())))
            });
            wait_until("sentinel sees the replica", Duration::from_secs(30), || {
                redis_cli(port, &["--raw", "SENTINEL", "replicas", MASTER])
                    .is_some_and(|r| r.lines().any(|l| l.trim() == replica_port.to_string()))
            });
        }
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A replica of `master_port` (AOF, fsync always, like every test Redis), synced.
fn replica_of(master_port: u16) -> RedisServer {
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master_port.to_string()]);
    wait_until("replica in sync", Duration::from_secs(20), || {
        redis_cli(replica.port, &["INFO", "replication"])
            .is_some_and(|i| i.contains("master_link_status:up"))
    });
    replica
}

/// An integer read with `redis-cli GET`; 0 when absent.
fn get_u64(port: u16, key: &str) -> Option<u64> {
    let out = redis_cli(port, &["--raw", "GET", key])?;
    Some(out.trim().parse().unwrap_or(0))
}

/// Usage of `id` in the current month as stored on the server at `port`.
fn stored_usage(port: u16, id: &str) -> Option<u64> {
    let keys = redis_cli(
        port,
        &["--raw", "KEYS", &format!("audiolib:{{{id}}}:usage:*")],
    )?;
    match keys.lines().next() {
        Some(key) => get_u64(port, key.trim()),
        None => Some(0),
    }
}

/// Units any node holds for `id` this month, as stored on the server at `port`.
fn stored_held(port: u16, id: &str) -> Option<u64> {
    let keys = redis_cli(
        port,
        &["--raw", "KEYS", &format!("audiolib:{{{id}}}:lease:*")],
    )?;
    let Some(key) = keys.lines().next() else {
        return Some(0);
    };
    let fields = redis_cli(port, &["--raw", "HGETALL", key.trim()])?;
    let fields: Vec<&str> = fields.lines().collect();
    Some(
        fields
            .chunks(2)
            .filter(|f| f[0].starts_with("held:"))
            .map(|f| f[1].trim().parse::<u64>().unwrap_or(0))
            .sum(),
    )
}

/// What the clients saw for one key.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    ok_after_kill: u64,
    exhausted: bool,
    rate_limited: u64,
    unavailable: u64,
    /// 503s before the kill (a WAIT timing out on these busy cores).
    unavailable_before_kill: u64,
    other: Vec<(u16, String)>,
}

#[test]
fn sentinel_failover_under_wait_loses_nothing_and_over_admits_nothing() {
    failover_under_load("fail_closed");
}

/// The default policy: during the failover a node may serve one block per key on a local
/// count; with one node that never goes over the limit, and the count is written back.
#[test]
fn sentinel_failover_under_fail_open_writes_local_counts_back_exactly() {
    failover_under_load("fail_open");
}

fn failover_under_load(policy: &str) {
    const LIMIT: u64 = 300;
    // Two replicas: after the failover the new master still has one to confirm WAIT 1.
    let mut master = RedisServer::start();
    let replicas = [replica_of(master.port), replica_of(master.port)];
    let sentinels = Sentinels::start(3, 2, master.port);
    for replica in &replicas {
        sentinels.wait_ready(replica.port);
    }
    assert_eq!(sentinels.master_port(), Some(master.port));

    let gw = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", sentinels.url())
        .env("AUDIOLIB_STORE_FAILURE", policy)
        .env("AUDIOLIB_REDIS_WAIT_REPLICAS", "1")
        // The harness's store timeout is 1 s on these shared cores; WAIT gets half of it.
        .env("AUDIOLIB_REDIS_WAIT_TIMEOUT_MS", "500")
        .start();
    wait_until("gateway ready", Duration::from_secs(20), || {
        read_reply(agent().get(gw.url("/readyz")).call().unwrap()).status == 200
    });
    // A second node, idle: its key cache must hear of changes made after the failover.
    let other = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", sentinels.url())
        .start();
    let busy: Vec<(String, String)> = (0..3)
        .map(|_| gw.create_key("free", Some(Some(LIMIT))))
        .collect();

    let killed = AtomicBool::new(false);
    let served = AtomicU64::new(0);
    // When calls were refused after the kill: the first and the last 503.
    let refused: Mutex<Option<(Instant, Instant)>> = Mutex::new(None);
    let tallies: Vec<Mutex<Tally>> = busy.iter().map(|_| Mutex::new(Tally::default())).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (kill_at, promoted_after, late_keys) = std::thread::scope(|scope| {
        for worker in 0..4 {
            let (busy, tallies, killed, served, refused) =
                (&busy, &tallies, &killed, &served, &refused);
            let gw = &gw;
            scope.spawn(move || {
                let client = agent();
                let mut turn = worker;
                loop {
                    let open: Vec<usize> = (0..busy.len())
                        .filter(|&i| !tallies[i].lock().unwrap().exhausted)
                        .collect();
                    if open.is_empty() || Instant::now() > deadline {
                        return;
                    }
                    turn += 1;
                    let i = open[turn % open.len()];
                    let after_kill = killed.load(Ordering::SeqCst);
                    let reply = read_reply(
                        client
                            .post(gw.url("/v1/audio"))
                            .header("Authorization", format!("Bearer {}", busy[i].1))
                            .send(BODY)
                            .unwrap(),
                    );
                    let code = if reply.status == 200 {
                        String::new()
                    } else {
                        reply.json()["code"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string()
                    };
                    let mut t = tallies[i].lock().unwrap();
                    match (reply.status, code.as_str()) {
                        (200, _) => {
                            t.ok += 1;
                            served.fetch_add(1, Ordering::SeqCst);
                            if after_kill {
                                t.ok_after_kill += 1;
                            }
                        }
                        (429, "QUOTA_EXCEEDED") => t.exhausted = true,
                        (429, "RATE_LIMITED") => t.rate_limited += 1,
                        (503, "SERVICE_UNAVAILABLE") => {
                            assert_eq!(reply.header("retry-after"), Some("1"));
                            t.unavailable += 1;
                            if !after_kill {
                                t.unavailable_before_kill += 1;
                            }
                            let now = Instant::now();
                            let mut window = refused.lock().unwrap();
                            let first = window.map_or(now, |(first, _)| first);
                            *window = Some((first, now));
                        }
                        (status, code) => t.other.push((status, code.to_string())),
                    }
                }
            });
        }
        wait_until("calls before the kill", Duration::from_secs(60), || {
            served.load(Ordering::SeqCst) >= 150
        });
        // Keys acknowledged just before the crash: WAIT says the replica has them.
        let late: Vec<(String, String)> = (0..3)
            .map(|_| gw.create_key("free", Some(Some(LIMIT))))
            .collect();
        killed.store(true, Ordering::SeqCst);
        master.kill();
        let kill_at = Instant::now();
        let mut promoted = None;
        wait_until("a replica promoted", Duration::from_secs(60), || {
            promoted = sentinels
                .master_port()
                .filter(|p| replicas.iter().any(|r| r.port == *p));
            promoted.is_some()
        });
        (kill_at, kill_at.elapsed(), (late, promoted.unwrap()))
    });
    let (late_keys, new_master) = late_keys;
    let window = refused.lock().unwrap().map(|(first, last)| {
        (
            first.saturating_duration_since(kill_at),
            last.saturating_duration_since(kill_at),
        )
    });
    let mut failed = 0;
    let log = gw.log_text();
    let redis_log: Vec<&str> = log.lines().filter(|l| l.contains("redis")).collect();
    for ((id, _), tally) in busy.iter().zip(&tallies) {
        let t = tally.lock().unwrap();
        eprintln!("key {id}: {t:?}");
        assert!(
            t.exhausted,
            "key {id} never reached its limit: {t:?}\n{}",
            redis_log.join("\n")
        );
        assert!(t.other.is_empty(), "unexpected answers for {id}: {t:?}");
        assert!(t.ok <= LIMIT, "{id} over-admitted: {t:?}");
        assert_eq!(t.ok, LIMIT, "{id}: units lost in the failover: {t:?}");
        assert!(t.ok_after_kill > 0, "{id} served nothing after the kill");
        failed += t.unavailable;
    }
    eprintln!(
        "failover ({policy}): replica promoted {promoted_after:?} after the SIGKILL; {failed} calls answered \
         503, from {:?} to {:?} after the kill",
        window.map(|w| w.0),
        window.map(|w| w.1)
    );
    // Writes need WAIT 1 answered: the other replica must have attached to the new master.
    // The sentinels move it during the failover, or, when that step outlasts the failover
    // timeout, at one of their periodic checks afterwards (+fix-slave-config).
    let attached = || {
        redis_cli(new_master, &["INFO", "replication"])
            .is_some_and(|i| i.contains("connected_slaves:1") && i.contains("state=online"))
    };
    let waited = Instant::now();
    while !attached() {
        if waited.elapsed() > Duration::from_secs(120) {
            let info = |port: u16| redis_cli(port, &["INFO", "replication"]).unwrap_or_default();
            panic!(
                "no replica attached to the new master in 120 s\nnew master:\n{}\nreplicas:\n{}",
                info(new_master),
                replicas
                    .iter()
                    .map(|r| info(r.port))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "the other replica attached to the new master after {:?}",
        waited.elapsed()
    );
    // Every key acknowledged before the kill works on the new master.
    for (id, key) in &late_keys {
        assert_eq!(gw.post_audio(key, BODY).status, 200, "key {id}");
        assert_eq!(
            redis_cli(
                new_master,
                &["--raw", "HGET", &format!("audiolib:{{{id}}}:key"), "status"]
            )
            .map(|s| s.trim().to_string()),
            Some("active".into())
        );
    }
    // The other node's invalidation subscription followed the master: a revocation made
    // now reaches its cache (which holds the key) within a second.
    wait_until(
        "the subscription on the new master",
        Duration::from_secs(20),
        || {
            other.log_text().contains(&format!(
                "subscribed to key invalidations on redis://127.0.0.1:{new_master}/"
            ))
        },
    );
    // The other node's first call since the failover.
    let (revoked_id, revoked_key) = &late_keys[0];
    let first = other.post_audio(revoked_key, BODY);
    assert_eq!(first.status, 200, "{}", other.log_text());
    assert_eq!(
        gw.admin("DELETE", &format!("/admin/keys/{revoked_id}"), None)
            .status,
        200
    );
    // Calls the other node serves before the invalidation reaches it are counted too.
    let mut served_before_revocation = 1;
    wait_until(
        "the revocation on the other node",
        Duration::from_secs(1),
        || match other.post_audio(revoked_key, BODY).status {
            200 => {
                served_before_revocation += 1;
                false
            }
            status => status == 401,
        },
    );
    eprintln!("the revoked key was served {served_before_revocation} time(s) by the other node");

    // Nothing lost, nothing doubled: the new master's usage is what was served.
    for ((id, _), tally) in busy.iter().zip(&tallies) {
        let ok = tally.lock().unwrap().ok;
        wait_until("usage on the new master", Duration::from_secs(20), || {
            stored_usage(new_master, id) == Some(ok)
        });
    }
    for (i, (id, _)) in late_keys.iter().enumerate() {
        // Each late key was served once by this node; the revoked one also by the other.
        let served = if i == 0 {
            1 + served_before_revocation
        } else {
            1
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut stored = stored_usage(new_master, id);
        while stored != Some(served) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            stored = stored_usage(new_master, id);
        }
        assert_eq!(
            stored,
            Some(served),
            "usage of late key {i} ({id}) on the new master"
        );
    }
    // The old master comes back as a replica of the new one and converges on its data:
    // nothing it held unconfirmed survives.
    master.restart();
    // Sentinel reconfigures a returning master some seconds after it reports its old role,
    // and not at all while in TILT (entered when its timer stalls, as on these cores under the
    // whole suite), 30 s at a time. Give it a minute; past that, demote it as an operator
    // would: what is checked is that the old master converges on the new one's data.
    let replica_of_new = || {
        redis_cli(master.port, &["INFO", "replication"]).is_some_and(|i| {
            i.contains("role:slave")
                && i.contains(&format!("master_port:{new_master}"))
                && i.contains("master_link_status:up")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !replica_of_new() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !replica_of_new() {
        eprintln!("sentinel did not demote the old master within 60 s (TILT?): REPLICAOF by hand");
        redis_cli(
            master.port,
            &["REPLICAOF", "127.0.0.1", &new_master.to_string()],
        );
        wait_until(
            "the old master synced",
            Duration::from_secs(30),
            replica_of_new,
        );
    }
    for ((id, _), tally) in busy.iter().zip(&tallies) {
        let ok = tally.lock().unwrap().ok;
        wait_until("usage on the old master", Duration::from_secs(20), || {
            stored_usage(master.port, id) == Some(ok)
        });
    }
    assert!(gw.log_text().contains(&format!(
        "redis master '{MASTER}' is 127.0.0.1:{new_master} (named by sentinel)"
    )));

    // A sentinel URL naming a master nobody monitors: not ready, and admin calls refused.
    let lost = Gateway::builder()
        .env(
            "AUDIOLIB_REDIS_URL",
            format!("redis+sentinel://127.0.0.1:{}/nosuch", sentinels.ports[0]),
        )
        .start();
    let ready = read_reply(agent().get(lost.url("/readyz")).call().unwrap());
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["store"], "unreachable");
    lost.admin(
        "POST",
        "/admin/keys",
        Some(json!({"name": "x", "plan": "free"})),
    )
    .assert_error(503, "SERVICE_UNAVAILABLE");
}

#[test]
fn without_a_replica_wait_fails_quota_operations_closed() {
    let master = RedisServer::start();
    let mut replica = replica_of(master.port);
    let gw = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", master.url())
        .env("AUDIOLIB_STORE_FAILURE", "fail_closed")
        .env("AUDIOLIB_REDIS_WAIT_REPLICAS", "1")
        .env("AUDIOLIB_REDIS_WAIT_TIMEOUT_MS", "200")
        .start();
    let (id, key) = gw.create_key("free", Some(Some(100)));
    for _ in 0..10 {
        assert_eq!(gw.post_audio(&key, BODY).status, 200);
    }
    // Once idle, the node reports and returns its block: the replica knows it holds nothing.
    wait_until(
        "the block returned, as the replica sees it",
        Duration::from_secs(20),
        || stored_usage(replica.port, &id) == Some(10) && stored_held(replica.port, &id) == Some(0),
    );

    replica.kill();
    for _ in 0..20 {
        let reply = gw.post_audio(&key, BODY);
        reply.assert_error(503, "SERVICE_UNAVAILABLE");
        assert_eq!(reply.header("retry-after"), Some("1"));
    }
    // Key writes are refused too: a key is created only once a replica has it.
    gw.admin(
        "POST",
        "/admin/keys",
        Some(json!({"name": "x", "plan": "free"})),
    )
    .assert_error(503, "SERVICE_UNAVAILABLE");
    gw.admin(
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"monthly_limit": 50})),
    )
    .assert_error(503, "SERVICE_UNAVAILABLE");
    // The parked operations the master applied but no replica confirmed are replayed, never
    // applied twice: back with a replica, the key serves exactly its remaining 90 calls.
    replica.restart();
    wait_until("calls served again", Duration::from_secs(30), || {
        gw.post_audio(&key, BODY).status == 200
    });
    let mut ok = 11;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "the limit never reached: {ok} served"
        );
        let reply = gw.post_audio(&key, BODY);
        match reply.status {
            200 => ok += 1,
            429 if reply.json()["code"] == "QUOTA_EXCEEDED" => break,
            _ => assert!(ok <= 100, "{:?}", reply.json()),
        }
        assert!(ok <= 100, "over-admitted: {ok}");
    }
    assert_eq!(ok, 100);
    wait_until("usage on both servers", Duration::from_secs(20), || {
        stored_usage(master.port, &id) == Some(100) && stored_usage(replica.port, &id) == Some(100)
    });
}

#[test]
fn the_masters_password_comes_from_the_url() {
    let master = RedisServer::start();
    let sentinels = Sentinels::start(1, 1, master.port);
    // Set once everything is up (the harness polls with a plain PING): the master wants
    // `p@ss`, and the sentinel authenticates to it.
    for (port, args) in [
        (master.port, &["CONFIG", "SET", "requirepass", "p@ss"][..]),
        (
            sentinels.ports[0],
            &["SENTINEL", "SET", MASTER, "auth-pass", "p@ss"][..],
        ),
    ] {
        assert_eq!(
            redis_cli(port, args).map(|r| r.trim().to_string()),
            Some("OK".into())
        );
    }
    let with = |userinfo: &str| {
        Gateway::builder()
            .env(
                "AUDIOLIB_REDIS_URL",
                format!(
                    "redis+sentinel://{userinfo}127.0.0.1:{}/{MASTER}",
                    sentinels.ports[0]
                ),
            )
            .env("AUDIOLIB_REDIS_WAIT_REPLICAS", "0")
            .start()
    };
    let ready = |gw: &Gateway| read_reply(agent().get(gw.url("/readyz")).call().unwrap()).status;
    let gw = with(":p%40ss@");
    wait_until("ready with the password", Duration::from_secs(20), || {
        ready(&gw) == 200
    });
    let (_, key) = gw.create_key("free", Some(Some(5)));
    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    // Each readiness probe connects afresh (no master connection yet) and fails on AUTH.
    for userinfo in [":nope@", ""] {
        let gw = with(userinfo);
        for _ in 0..3 {
            assert_eq!(ready(&gw), 503, "{userinfo:?}");
        }
        gw.admin(
            "POST",
            "/admin/keys",
            Some(json!({"name": "x", "plan": "free"})),
        )
        .assert_error(503, "SERVICE_UNAVAILABLE");
    }
}

#[test]
fn wait_without_any_replica_is_warned_about_and_refuses_every_write() {
    let lone = RedisServer::start();
    let gw = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", lone.url())
        .env("AUDIOLIB_STORE_FAILURE", "fail_closed")
        .env("AUDIOLIB_REDIS_WAIT_REPLICAS", "1")
        .env("AUDIOLIB_REDIS_WAIT_TIMEOUT_MS", "100")
        .start();
    let warning = format!(
        "Redis at redis://127.0.0.1:{} has 0 connected replicas but store.redis_wait_replicas is \
         1: quota operations and key writes fail until enough replicas connect",
        lone.port
    );
    wait_until("the replica warning", Duration::from_secs(20), || {
        gw.log_text().contains(&warning)
    });
    gw.admin(
        "POST",
        "/admin/keys",
        Some(json!({"name": "x", "plan": "free"})),
    )
    .assert_error(503, "SERVICE_UNAVAILABLE");
    // A key made by a node without WAIT is found (reads need no replica) but never served.
    let plain = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", lone.url())
        .start();
    assert!(!plain.log_text().contains("connected replicas"));
    let (id, key) = plain.create_key("free", Some(Some(10)));
    for _ in 0..5 {
        let reply = gw.post_audio(&key, BODY);
        reply.assert_error(503, "SERVICE_UNAVAILABLE");
        assert_eq!(reply.header("retry-after"), Some("1"));
    }
    // The lease operations the master applied without a replica stay parked on `gw`: the
    // units they were granted are held, never served, and nothing is counted.
    assert_eq!(stored_usage(lone.port, &id), Some(0));
    assert_eq!(plain.post_audio(&key, BODY).status, 200);
}

/// The gateway's log once the persistence check has answered (debug level for this module).
fn persistence_log(redis: &RedisServer, needle: &str) -> String {
    let gw = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", redis.url())
        .env("RUST_LOG", "info,audiolib::store::redis=debug")
        .start();
    wait_until("the persistence check", Duration::from_secs(20), || {
        gw.log_text().contains(needle)
    });
    gw.log_text()
}

#[test]
fn redis_that_persists_nothing_is_warned_about_once() {
    let volatile = RedisServer::start_with(&["--appendonly", "no"]);
    let log = persistence_log(&volatile, "persists nothing");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("persists")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("WARN"), "{log}");
    assert!(
        warnings[0].contains(&format!(
            "Redis at redis://127.0.0.1:{} persists nothing (appendonly no, save \"\"): a restart \
             loses every API key and quota count",
            volatile.port
        )),
        "{log}"
    );

    // AOF on (the harness default): no warning.
    let durable = RedisServer::start();
    let log = persistence_log(&durable, "persists (appendonly yes");
    assert!(!log.contains("persists nothing"), "{log}");

    // RDB snapshots alone also persist.
    let snapshots = RedisServer::start_with(&["--appendonly", "no", "--save", "60 1"]);
    let log = persistence_log(&snapshots, "persists (appendonly no, save \"60 1\")");
    assert!(!log.contains("persists nothing"), "{log}");

    // CONFIG renamed away: the gateway cannot tell, and says so at debug level only.
    let hidden = RedisServer::start_with(&["--appendonly", "no", "--rename-command", "CONFIG", ""]);
    let log = persistence_log(&hidden, "cannot tell whether Redis");
    assert!(!log.contains("persists nothing"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("DEBUG") && l.contains("CONFIG GET refused")),
        "{log}"
    );
}

#[test]
fn a_forced_failover_is_followed_through_readonly_and_the_subscription_moves() {
    // `SENTINEL FAILOVER`: the old master stays up and is demoted, so nothing breaks a
    // connection. Writes to it answer READONLY and its subscription goes silent.
    let master = RedisServer::start();
    let replica = replica_of(master.port);
    let sentinels = Sentinels::start(1, 1, master.port);
    sentinels.wait_ready(replica.port);
    let a = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", sentinels.url())
        .env("AUDIOLIB_STORE_FAILURE", "fail_closed")
        .start();
    let b = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", sentinels.url())
        .env("AUDIOLIB_STORE_FAILURE", "fail_closed")
        .start();
    // C serves one call, gives its unused units back and then makes no call until after the
    // switch. The demoted master still answers its reads, so only the sentinels can tell it
    // the master moved (without WAIT, which has no replica to count on for a moment).
    let c = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", sentinels.url())
        .env("AUDIOLIB_STORE_FAILURE", "fail_closed")
        .env("AUDIOLIB_REDIS_WAIT_REPLICAS", "0")
        .start();
    let (c_id, c_key) = a.create_key("free", Some(Some(50)));
    assert_eq!(c.post_audio(&c_key, BODY).status, 200);
    wait_until("C's units back", Duration::from_secs(20), || {
        stored_usage(master.port, &c_id) == Some(1) && stored_held(master.port, &c_id) == Some(0)
    });
    let (id, key) = a.create_key("free", Some(Some(50)));
    let mut served = 0;
    for _ in 0..5 {
        assert_eq!(a.post_audio(&key, BODY).status, 200);
        assert_eq!(b.post_audio(&key, BODY).status, 200);
        served += 2;
    }

    let failover = redis_cli(sentinels.ports[0], &["SENTINEL", "FAILOVER", MASTER]).unwrap();
    assert_eq!(failover.trim(), "OK");
    wait_until("the replica promoted", Duration::from_secs(30), || {
        sentinels.master_port() == Some(replica.port)
    });
    wait_until("the old master demoted", Duration::from_secs(30), || {
        redis_cli(master.port, &["INFO", "replication"])
            .is_some_and(|i| i.contains("role:slave") && i.contains("master_link_status:up"))
    });
    // The first writes after the switch may meet READONLY (503); then both nodes use the new
    // master.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    while served < 50 {
        assert!(
            Instant::now() < deadline,
            "served {served}, refused {refused}"
        );
        for gw in [&a, &b] {
            let reply = gw.post_audio(&key, BODY);
            match reply.status {
                200 => served += 1,
                _ => {
                    reply.assert_error(503, "SERVICE_UNAVAILABLE");
                    refused += 1;
                }
            }
            if served == 50 {
                break;
            }
        }
    }
    eprintln!("forced failover: {refused} calls refused while the nodes moved");
    // Nothing more. A node whose first store call since the switch meets the demoted master
    // (READONLY) answers that call 503; once both nodes have reported, the refusal says the
    // month is used up.
    for gw in [&a, &b] {
        wait_until("QUOTA_EXCEEDED", Duration::from_secs(10), || {
            let reply = gw.post_audio(&key, BODY);
            let body = reply.json();
            match reply.status {
                503 => assert_eq!(body["code"], "SERVICE_UNAVAILABLE"),
                429 => {}
                _ => panic!("over the limit: {body}"),
            }
            body["code"] == "QUOTA_EXCEEDED"
        });
    }
    wait_until("usage on the new master", Duration::from_secs(20), || {
        stored_usage(replica.port, &id) == Some(50)
    });
    for gw in [&a, &b, &c] {
        wait_until("the subscription moved", Duration::from_secs(20), || {
            gw.log_text().contains(&format!(
                "subscribed to key invalidations on redis://127.0.0.1:{}/",
                replica.port
            ))
        });
    }
    // C's calls moved with its subscription: its first write goes to the new master, not to
    // the demoted one (READONLY).
    let first = c.post_audio(&c_key, BODY);
    assert_eq!(first.status, 200, "{}", c.log_text());
    // B caches a key made on the new master; revoked through A, B refuses it within a second.
    let (id2, key2) = a.create_key("free", None);
    assert_eq!(b.post_audio(&key2, BODY).status, 200);
    assert_eq!(
        a.admin("DELETE", &format!("/admin/keys/{id2}"), None)
            .status,
        200
    );
    wait_until("the revocation on B", Duration::from_secs(1), || {
        b.post_audio(&key2, BODY).status == 401
    });
}
