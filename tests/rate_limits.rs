//! Per-second rates of plans (SPEC §2 row 5b, §9): a token bucket per key, or per account for
//! its keys, on each node. Counts, never timings of single requests.

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, GatewayBuilder, RedisServer};
use serde_json::json;

const BODY: &str = r#"{"library":"audio.sleep"}"#;

/// `burst`: 50 a second, 50 at once; `free` has no rate.
fn with_plans(dir: &std::path::Path) -> GatewayBuilder {
    let conf = dir.join("plans.toml");
    std::fs::write(
        &conf,
        "[plans.free]\nmonthly_limit = 1000000\n\
         [plans.burst]\nmonthly_limit = 1000000\nrate_per_sec = 50\nburst = 50\n",
    )
    .unwrap();
    Gateway::builder()
        .arg("--config")
        .arg(conf.to_str().unwrap())
}

/// Calls from 8 connections spread over `targets` (node, key) for `secs`; (served, refused).
fn hammer(targets: &[(&Gateway, &str)], secs: u64) -> (u64, u64) {
    let until = Instant::now() + Duration::from_secs(secs);
    let counts: Vec<(u64, u64)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|i| {
                let (gw, key) = targets[i % targets.len()];
                scope.spawn(move || {
                    let client = common::agent();
                    let (mut ok, mut limited) = (0, 0);
                    while Instant::now() < until {
                        let reply = common::read_reply(
                            client
                                .post(gw.url("/v1/audio"))
                                .header("Authorization", format!("Bearer {key}"))
                                .send(BODY)
                                .unwrap(),
                        );
                        match reply.status {
                            200 => ok += 1,
                            _ => {
                                reply.assert_error(429, "RATE_LIMITED");
                                assert_eq!(reply.header("retry-after"), Some("1"));
                                limited += 1;
                            }
                        }
                    }
                    (ok, limited)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    counts
        .iter()
        .fold((0, 0), |(a, b), (ok, limited)| (a + ok, b + limited))
}

#[test]
fn a_key_over_its_rate_gets_429_and_only_its_200s_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let gw = with_plans(dir.path()).start();
    let (id, key) = gw.create_key("burst", None);
    let (ok, limited) = hammer(&[(&gw, &key)], 3);
    eprintln!("rate 50/s, burst 50, 3 s on one node: {ok} served, {limited} refused");
    // The burst, then 50 a second for the 3 s (and a little for the time the first and last
    // calls take).
    assert!((150..=210).contains(&ok), "{ok} served");
    assert!(limited > 0, "the hammer went over the rate");
    gw.wait_usage(&id, ok);
    // A plan without a rate is not limited at all.
    let (_, free) = gw.create_key("free", None);
    let (ok, limited) = hammer(&[(&gw, &free)], 1);
    assert_eq!(limited, 0, "{ok} served");
}

#[test]
fn the_keys_of_an_account_share_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let gw = with_plans(dir.path()).start();
    let account = gw.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": "r@example.com", "name": "R", "plan": "burst"})),
    );
    let id = account.json()["id"].as_str().unwrap().to_string();
    let key = || {
        let reply = gw.admin(
            "POST",
            "/admin/keys",
            Some(json!({"name": "k", "account_id": id})),
        );
        reply.json()["key"].as_str().unwrap().to_string()
    };
    let (k1, k2) = (key(), key());
    let (ok, _) = hammer(&[(&gw, &k1), (&gw, &k2)], 2);
    eprintln!("rate 50/s, burst 50, 2 s over two keys of one account: {ok} served");
    assert!(
        (100..=160).contains(&ok),
        "{ok} served: one bucket, not one per key"
    );
}

/// The rate is kept per node: a key whose calls are spread over two nodes gets up to twice
/// its rate (docs/accounts.md).
#[test]
fn with_two_nodes_a_key_gets_up_to_twice_its_rate() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let node = || {
        with_plans(dir.path())
            .env("AUDIOLIB_REDIS_URL", redis.url())
            .start()
    };
    let (a, b) = (node(), node());
    let (id, key) = a.create_key("burst", None);
    let (ok, limited) = hammer(&[(&a, &key), (&b, &key)], 3);
    eprintln!("rate 50/s, burst 50, 3 s over two nodes: {ok} served, {limited} refused");
    assert!(
        (250..=420).contains(&ok),
        "{ok} served: each node allows the rate"
    );
    a.wait_usage(&id, ok);
}

#[test]
fn bad_rates_are_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    for (plan, problem) in [
        ("burst = 5", "setting `plans.p.burst`: needs rate_per_sec"),
        (
            "rate_per_sec = 0",
            "setting `plans.p.rate_per_sec`: must be at least 1",
        ),
        (
            "rate_per_sec = 5\nburst = 0",
            "setting `plans.p.burst`: must be at least 1",
        ),
        // A wrong type is named by its file and line.
        ("rate_per_sec = -1", "bad.toml:3: invalid value"),
    ] {
        let conf = dir.path().join("bad.toml");
        std::fs::write(&conf, format!("default_plan = \"p\"\n[plans.p]\n{plan}\n")).unwrap();
        let (ok, out, err) = common::run(
            std::process::Command::new(env!("CARGO_BIN_EXE_audiolib"))
                .args(["config", "check"])
                .arg(&conf),
        );
        assert!(!ok, "{plan}: {out}");
        assert!(err.contains(problem), "{plan}: {err}");
    }
}
