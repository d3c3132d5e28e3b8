//! Quota under load and faults (SPEC §4a), against the real binary and real Redis: one-key
//! floods on 1,000 to 10,000 connections, two processes on one embedded data directory, SIGKILL of the
//! embedded store, a partition between a node and Redis (a blackholing TCP proxy), and a node
//! frozen with SIGSTOP. Every test asserts counts — 200s never above the limit, usage equal to
//! the 200s served — never timing.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Gateway, RedisServer, concurrent_calls, wait_until};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const BODY: &str = r#"{"library":"audio.sleep"}"#;

/// Statuses and codes of a load run.
#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    exceeded: u64,
    other: Vec<(u16, String)>,
}

/// One keep-alive client sending calls until the month's quota is refused or `cap` calls. As
/// any HTTP client does, it opens a new connection after an answer that closed its own (a
/// call refused before its body was read: 401, or 503 when the key could not be looked up).
async fn hammer(addr: SocketAddr, key: String, cap: usize) -> std::io::Result<Tally> {
    type Halves = (
        BufReader<tokio::net::tcp::OwnedReadHalf>,
        tokio::net::tcp::OwnedWriteHalf,
    );
    let request = format!(
        "POST /v1/audio HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut tally = Tally::default();
    let mut open: Option<Halves> = None;
    for _ in 0..cap {
        let (read, write) = match &mut open {
            Some(halves) => halves,
            None => {
                let (read, write) = tokio::net::TcpStream::connect(addr).await?.into_split();
                open.insert((BufReader::new(read), write))
            }
        };
        write.write_all(request.as_bytes()).await?;
        let mut line = String::new();
        read.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let (mut length, mut close) = (0, false);
        loop {
            line.clear();
            read.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            close |= lower
                .strip_prefix("connection:")
                .is_some_and(|v| v.trim() == "close");
        }
        let mut body = vec![0; length];
        read.read_exact(&mut body).await?;
        if close {
            open = None;
        }
        let code = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["code"].as_str().map(str::to_string))
            .unwrap_or_default();
        match (status, code.as_str()) {
            (200, _) => tally.ok += 1,
            (429, "QUOTA_EXCEEDED") => {
                tally.exceeded += 1;
                break;
            }
            _ => tally.other.push((status, code)),
        }
    }
    Ok(tally)
}

/// `connections` concurrent keep-alive clients on one key until every one was told the
/// month's quota is used up.
fn flood(gw: &Gateway, key: &str, connections: usize) -> Tally {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tasks: Vec<_> = (0..connections)
            .map(|_| tokio::spawn(hammer(gw.addr, key.to_string(), 200)))
            .collect();
        let mut total = Tally::default();
        for t in tasks {
            let t = t.await.unwrap().expect("a client connection failed");
            total.ok += t.ok;
            total.exceeded += t.exceeded;
            total.other.extend(t.other);
        }
        total
    })
}

fn assert_flood_is_exact(gw: &Gateway, limit: u64, connections: usize) {
    let (id, key) = gw.create_key("pro", Some(Some(limit)));
    let started = Instant::now();
    let tally = flood(gw, &key, connections);
    eprintln!(
        "flood: {} × 200, {} × QUOTA_EXCEEDED, {} others in {:?}",
        tally.ok,
        tally.exceeded,
        tally.other.len(),
        started.elapsed()
    );
    assert_eq!(
        tally.ok, limit,
        "200s with {connections} connections on one key"
    );
    assert_eq!(
        tally.exceeded, connections as u64,
        "every connection ends on QUOTA_EXCEEDED"
    );
    // Waiting behind a busy key may be told to retry. A refill that itself misses the bound
    // on these saturated cores answers its one caller 503 (a slow answer is not an outage:
    // nothing is admitted locally), and the calls queued behind it are told to retry; so 503s
    // stay a few, one per late refill, never the whole queue.
    let unavailable = tally.other.iter().filter(|(s, _)| *s == 503).count();
    assert!(
        tally
            .other
            .iter()
            .all(|(s, c)| (*s == 429 && c == "RATE_LIMITED")
                || (*s == 503 && c == "SERVICE_UNAVAILABLE")),
        "{:?}",
        &tally.other[..tally.other.len().min(5)]
    );
    assert!(
        unavailable <= connections / 100,
        "{unavailable} calls answered 503: more than the late refills alone"
    );
    gw.wait_usage(&id, limit);
}

#[test]
fn a_one_key_flood_on_the_embedded_store_gets_exactly_the_limit() {
    let gw = Gateway::builder()
        .env("AUDIOLIB_STORE_FAILURE", "fail_open")
        .start();
    assert_flood_is_exact(&gw, 3000, 1000);
}

#[test]
fn a_one_key_flood_on_redis_gets_exactly_the_limit() {
    let redis = RedisServer::start();
    // A short bound on store calls (the production default is 50 ms; 1,000 connections on
    // two cores can stall a real round trip longer): queueing behind other calls' refills
    // must never count against it.
    let gw = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", redis.url())
        .env("AUDIOLIB_STORE_FAILURE", "fail_open")
        .env("AUDIOLIB_STORE_TIMEOUT_MS", "200")
        .start();
    assert_flood_is_exact(&gw, 3000, 1000);
}

#[test]
fn a_two_thousand_connection_flood_at_the_production_bound_gets_exactly_the_limit() {
    // The issue's report: limit 20,000, 2,000 connections, the 50 ms production bound. Calls
    // queued behind refills used to time out, count as an outage and be admitted locally.
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", redis.url())
        .env("AUDIOLIB_STORE_FAILURE", "fail_open")
        .env("AUDIOLIB_STORE_TIMEOUT_MS", "50")
        .start();
    assert_flood_is_exact(&gw, 20_000, 2000);
}

#[test]
fn two_processes_on_one_data_directory_share_keys_and_quota_exactly() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_string();
    let a = Gateway::builder().env("AUDIOLIB_DATA_DIR", &dir).start();
    let b = Gateway::builder().env("AUDIOLIB_DATA_DIR", &dir).start();
    let (id, key) = a.create_key("free", Some(Some(100)));
    let statuses = concurrent_calls(&[&a, &b], &key, 20, 1000);
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 100);
    assert!(statuses.iter().all(|&s| s == 200 || s == 429));
    a.wait_usage(&id, 100);
    b.wait_usage(&id, 100);
    // A revocation through one process reaches the other's key cache.
    let (id2, key2) = b.create_key("free", None);
    assert_eq!(a.post_audio(&key2, BODY).status, 200);
    assert_eq!(
        b.admin("DELETE", &format!("/admin/keys/{id2}"), None)
            .status,
        200
    );
    wait_until(
        "revocation on the other process",
        Duration::from_secs(1),
        || a.post_audio(&key2, BODY).status == 401,
    );
}

#[test]
fn sigkill_of_the_embedded_store_never_loses_keys_or_over_admits() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap().to_string();
    let limit = 400;
    let mut gw = Gateway::builder().env("AUDIOLIB_DATA_DIR", &dir).start();
    let (id, key) = gw.create_key("free", Some(Some(limit)));
    // Calls in flight from several clients when the process is killed.
    let served = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = gw.addr;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (served, stop, key) = (served.clone(), stop.clone(), key.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let reply = common::agent()
                        .post(format!("http://{addr}/v1/audio"))
                        .header("Authorization", format!("Bearer {key}"))
                        .send(BODY);
                    if let Ok(r) = reply
                        && r.status() == 200
                    {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    wait_until("calls under way", Duration::from_secs(20), || {
        served.load(Ordering::Relaxed) >= 120
    });
    gw.signal("KILL");
    while gw.try_wait().is_none() {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let before = served.load(Ordering::Relaxed);

    // The same data directory: the key is still there, and usage covers every call served.
    let gw = Gateway::builder().env("AUDIOLIB_DATA_DIR", &dir).start();
    let usage = gw.usage(&id);
    assert!(
        usage >= before,
        "usage {usage} below the {before} calls served"
    );
    assert!(usage <= limit);
    let mut after = 0;
    loop {
        let reply = gw.post_audio(&key, BODY);
        match reply.status {
            200 => after += 1,
            429 => break,
            other => panic!("unexpected {other}: {:?}", reply.json()),
        }
    }
    eprintln!("sigkill: {before} served before, usage {usage} after restart, {after} more");
    assert!(before + after <= limit, "{before} + {after} over {limit}");
    gw.wait_usage(&id, usage + after);
}

/// A TCP proxy that can stop forwarding without closing anything, as a partition would:
/// bytes wait in the kernel's buffers until it heals.
struct Blackhole {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl Blackhole {
    fn start(target: u16) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let cut = flag.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            while cut.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    // Read before the cut, held until it heals.
                                    while cut.load(Ordering::Relaxed) {
                                        std::thread::sleep(Duration::from_millis(10));
                                    }
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Blackhole { port, cut }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn set(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

/// Calls `gw` once: the status and the error code, if any.
fn call(gw: &Gateway, key: &str) -> (u16, String) {
    let reply = gw.post_audio(key, BODY);
    let code = if reply.status == 200 {
        String::new()
    } else {
        reply.json()["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    (reply.status, code)
}

/// Calls `gw` until it answers `status` with `code` (within 40 s); the number of 200s.
/// Any answer other than 200, that one, 429 RATE_LIMITED (quota held elsewhere) and 503
/// SERVICE_UNAVAILABLE (fail-closed while cut off) fails the test.
fn calls_until(gw: &Gateway, key: &str, status: u16, code: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut ok = 0;
    loop {
        assert!(Instant::now() < deadline, "no {status} {code} within 40 s");
        match call(gw, key) {
            (200, _) => ok += 1,
            (s, c) if s == status && c == code => return ok,
            (429, c) if c == "RATE_LIMITED" => std::thread::sleep(Duration::from_millis(50)),
            (503, c) if c == "SERVICE_UNAVAILABLE" => std::thread::sleep(Duration::from_millis(50)),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The fields of `id`'s lease hash for this month (`held:<node>`, `at:<node>`, …) as read
/// from Redis; empty while it cannot be read.
fn lease_fields(redis: &RedisServer, id: &str) -> Vec<(String, String)> {
    let period = audiolib::quota::Period::containing(std::time::SystemTime::now());
    let hash = format!("audiolib:{{{id}}}:lease:{period}");
    let raw = common::redis_cli(redis.port, &["--raw", "HGETALL", &hash]).unwrap_or_default();
    let lines: Vec<&str> = raw.lines().collect();
    lines
        .chunks_exact(2)
        .map(|kv| (kv[0].to_string(), kv[1].trim().to_string()))
        .collect()
}

/// Waits until Redis counts some node of `id`'s lease as silent: its last operation older
/// than the silence threshold (15 s) by Redis's own clock.
fn wait_until_a_node_is_silent(redis: &RedisServer, id: &str) {
    wait_until("a node silent at Redis", Duration::from_secs(40), || {
        let now: i64 = common::redis_cli(redis.port, &["TIME"])
            .and_then(|t| t.lines().next()?.trim().parse().ok())
            .unwrap_or(0);
        lease_fields(redis, id).iter().any(|(name, value)| {
            name.starts_with("at:") && value.parse::<i64>().is_ok_and(|at| now - at > 16)
        })
    });
}

/// A fresh node asks Redis directly (no memo of an earlier refusal): it must get none of the
/// units a silent node holds.
fn assert_a_fresh_node_gets_nothing(redis: &RedisServer, key: &str) {
    let c = fail_closed_node(&redis.url());
    let got = calls_until(&c, key, 429, "QUOTA_EXCEEDED");
    assert_eq!(got, 0, "a silent node's units were handed to another node");
}

fn fail_closed_node(url: &str) -> Gateway {
    Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", url)
        .env("AUDIOLIB_STORE_FAILURE", "fail_closed")
        .env("AUDIOLIB_STORE_TIMEOUT_MS", "100")
        .start()
}

#[test]
fn a_partitioned_node_under_fail_closed_never_over_admits() {
    let redis = RedisServer::start();
    let proxy = Blackhole::start(redis.port);
    let a = fail_closed_node(&proxy.url());
    let b = fail_closed_node(&redis.url());
    let limit = 1000;
    let (id, key) = b.create_key("free", Some(Some(limit)));
    for _ in 0..3 {
        assert_eq!(call(&a, &key).0, 200);
    }
    proxy.set(true);
    // Cut off, the node serves only what it already holds, and only until its lease fence;
    // then it refuses (fail-closed).
    let a_ok = 3 + calls_until(&a, &key, 503, "SERVICE_UNAVAILABLE");
    // The other node gets what is not held by the partitioned one; once the store counts that
    // node as silent its units are spent, never handed over.
    let b_ok = calls_until(&b, &key, 429, "QUOTA_EXCEEDED");
    eprintln!("partition: node A served {a_ok} before its fence, node B {b_ok}");
    assert!(a_ok + b_ok <= limit, "{a_ok} + {b_ok} over {limit}");
    assert!(b_ok < limit - 3, "node B got units node A held");
    wait_until_a_node_is_silent(&redis, &id);
    assert_a_fresh_node_gets_nothing(&redis, &key);
    // Healed: the partitioned node reports late; usage is exactly what was served, and what
    // it held unused serves again.
    proxy.set(false);
    b.wait_usage(&id, a_ok + b_ok);
    let more = calls_until(&a, &key, 429, "QUOTA_EXCEEDED");
    eprintln!("partition healed: node A served {more} more");
    assert_eq!(a_ok + b_ok + more, limit, "nothing lost, nothing doubled");
    b.wait_usage(&id, limit);
}

#[test]
fn a_frozen_node_reports_late_without_over_admission() {
    let redis = RedisServer::start();
    let a = fail_closed_node(&redis.url());
    let b = fail_closed_node(&redis.url());
    let limit = 1000;
    let (id, key) = b.create_key("free", Some(Some(limit)));
    for _ in 0..3 {
        assert_eq!(call(&a, &key).0, 200);
    }
    a.signal("STOP");
    // Held by the frozen node: an honest refusal says retry in a second, not next month…
    let mut b_ok = calls_until(&b, &key, 429, "RATE_LIMITED");
    let held = b.post_audio(&key, BODY);
    held.assert_error(429, "RATE_LIMITED");
    assert_eq!(held.header("retry-after"), Some("1"));
    // …and once the frozen node is silent at the store, its units count as spent.
    b_ok += calls_until(&b, &key, 429, "QUOTA_EXCEEDED");
    wait_until_a_node_is_silent(&redis, &id);
    assert_a_fresh_node_gets_nothing(&redis, &key);
    a.signal("CONT");
    eprintln!("SIGSTOP: node B served {b_ok} while node A was frozen after 3");
    assert!(3 + b_ok <= limit, "3 + {b_ok} over {limit}");
    // Woken, the node reports its 3 calls, counted once; its unused units serve again.
    b.wait_usage(&id, 3 + b_ok);
    let more = calls_until(&a, &key, 429, "QUOTA_EXCEEDED");
    assert_eq!(3 + b_ok + more, limit, "nothing lost, nothing doubled");
    b.wait_usage(&id, limit);
}

#[test]
fn fail_open_admits_one_block_per_outage_and_counts_it() {
    let mut redis = RedisServer::start();
    let gw = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", redis.url())
        .env("AUDIOLIB_STORE_FAILURE", "fail_open")
        .env("AUDIOLIB_STORE_TIMEOUT_MS", "100")
        .start();
    let limit = 1600;
    let (id, key) = gw.create_key("free", Some(Some(limit)));
    for _ in 0..100 {
        assert_eq!(call(&gw, &key).0, 200);
    }
    gw.wait_usage(&id, 100);
    // Idle units go back within seconds: then the node holds nothing, and all it may admit
    // in the outage is the one block.
    wait_until("the node to hold no units", Duration::from_secs(10), || {
        lease_fields(&redis, &id)
            .iter()
            .filter(|(name, _)| name.starts_with("held:"))
            .all(|(_, value)| value == "0")
    });
    redis.kill();
    // Redis gone: one more block at most, then refusals, however long the outage.
    let during = calls_until(&gw, &key, 503, "SERVICE_UNAVAILABLE");
    let mut refused = 0;
    for _ in 0..50 {
        match call(&gw, &key) {
            (503, _) => refused += 1,
            other => panic!("after the outage block: {other:?}"),
        }
    }
    eprintln!(
        "fail_open outage: {during} calls admitted beyond the held units, then {refused} × 503"
    );
    assert!(during <= limit / 16, "{during} over one block");
    assert!(during > 0, "fail_open admitted nothing");
    // Back: the calls admitted during the outage are counted.
    redis.restart();
    wait_until(
        "the gateway to reach Redis again",
        Duration::from_secs(10),
        || gw.admin("GET", &format!("/admin/keys/{id}"), None).status == 200,
    );
    gw.wait_usage(&id, 100 + during);
}

#[test]
fn a_ten_thousand_connection_flood_on_one_key_gets_exactly_the_limit() {
    // SPEC §4a.1's own figure: 10,000 connections on one key, the 50 ms production bound.
    // The connection cap (10,000 by default) is raised so the flood is all admitted.
    let redis = RedisServer::start();
    let gw = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", redis.url())
        .env("AUDIOLIB_STORE_FAILURE", "fail_open")
        .env("AUDIOLIB_STORE_TIMEOUT_MS", "50")
        .env("AUDIOLIB_MAX_CONNECTIONS", "20000")
        .start();
    assert_flood_is_exact(&gw, 20_000, 10_000);
}
