//! Accounts (SPEC §9): the admin API for them, and one monthly limit shared by all of an
//! account's keys on every node, on Redis and on the embedded store.

mod common;

use std::time::Duration;

use common::{Gateway, GatewayBuilder, RedisServer, wait_until};
use serde_json::{Value, json};

const BODY: &str = r#"{"library":"audio.sleep"}"#;

/// Plans of these tests: `team` shares 100 calls a month across an account's keys.
fn with_plans(dir: &std::path::Path) -> GatewayBuilder {
    let conf = dir.join("plans.toml");
    std::fs::write(
        &conf,
        "default_plan = \"free\"\n\
         [plans.free]\nmonthly_limit = 1000\n\
         [plans.team]\nmonthly_limit = 100\n\
         [plans.unlimited]\n",
    )
    .unwrap();
    Gateway::builder()
        .arg("--config")
        .arg(conf.to_str().unwrap())
}

fn create_account(gw: &Gateway, email: &str, plan: &str) -> Value {
    let reply = gw.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": email, "name": "Team A", "plan": plan})),
    );
    assert_eq!(reply.status, 201, "{:?}", reply.json());
    reply.json()
}

fn create_account_key(gw: &Gateway, account: &str) -> (String, String) {
    let reply = gw.admin(
        "POST",
        "/admin/keys",
        Some(json!({"name": "k", "account_id": account})),
    );
    assert_eq!(reply.status, 201, "{:?}", reply.json());
    let v = reply.json();
    assert_eq!(v["account_id"], account);
    (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

fn account_usage(gw: &Gateway, id: &str) -> u64 {
    let reply = gw.admin("GET", &format!("/admin/accounts/{id}"), None);
    assert_eq!(reply.status, 200, "{:?}", reply.json());
    reply.json()["usage"].as_u64().unwrap()
}

#[test]
fn accounts_are_created_listed_changed_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let gw = with_plans(dir.path()).start();

    let created = create_account(&gw, "  Ops@Example.COM ", "team");
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("acct_"), "{id}");
    assert_eq!(
        created["email"], "ops@example.com",
        "trimmed and lowercased"
    );
    assert_eq!(
        (
            &created["name"],
            &created["plan"],
            &created["monthly_limit"]
        ),
        (&json!("Team A"), &json!("team"), &json!(100))
    );
    assert_eq!(created["status"], "active");
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));

    // One account per email, however it is written.
    let twin = gw.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": "ops@example.com", "name": "Again"})),
    );
    twin.assert_error(409, "EMAIL_TAKEN");

    let (key_id, key) = create_account_key(&gw, id);
    let listed = gw
        .admin("GET", &format!("/admin/keys/{key_id}"), None)
        .json();
    assert_eq!(
        (&listed["plan"], &listed["monthly_limit"]),
        (&json!("team"), &json!(100)),
        "a key of an account shows the account's plan"
    );
    assert_eq!(gw.post_audio(&key, BODY).status, 200);

    let shown = gw.admin("GET", &format!("/admin/accounts/{id}"), None);
    assert_eq!(shown.status, 200);
    let shown = shown.json();
    assert_eq!(shown["usage"], 1);
    assert_eq!(shown["keys"].as_array().unwrap().len(), 1);
    assert_eq!(shown["keys"][0]["id"], key_id.as_str());

    let all = gw.admin("GET", "/admin/accounts", None).json();
    let ids: Vec<&str> = all["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id]);

    // A new plan brings its limit to every key of the account.
    let patched = gw.admin(
        "PATCH",
        &format!("/admin/accounts/{id}"),
        Some(json!({"plan": "unlimited", "name": "Team B"})),
    );
    assert_eq!(patched.status, 200);
    assert_eq!(
        (&patched.json()["plan"], &patched.json()["monthly_limit"]),
        (&json!("unlimited"), &Value::Null)
    );
    let reply = gw.post_audio(&key, BODY);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("ratelimit"), None, "unlimited: no RateLimit");

    // Disabled: its keys are refused as any unusable key; enabled again: served.
    let path = format!("/admin/accounts/{id}");
    let disable = gw.admin("PATCH", &path, Some(json!({"status": "disabled"})));
    assert_eq!(disable.json()["status"], "disabled");
    gw.post_audio(&key, BODY).assert_error(401, "INVALID_KEY");
    let enable = gw.admin("PATCH", &path, Some(json!({"status": "active"})));
    assert_eq!(enable.json()["status"], "active");
    assert_eq!(gw.post_audio(&key, BODY).status, 200);

    // Closed: final, and its keys are revoked with it.
    let closed = gw.admin("DELETE", &path, None);
    assert_eq!(closed.status, 200);
    assert_eq!(closed.json()["status"], "closed");
    gw.post_audio(&key, BODY).assert_error(401, "INVALID_KEY");
    let key_now = gw
        .admin("GET", &format!("/admin/keys/{key_id}"), None)
        .json();
    assert_eq!(key_now["status"], "revoked");
    gw.admin("PATCH", &path, Some(json!({"status": "active"})))
        .assert_error(409, "ACCOUNT_CLOSED");
    gw.admin(
        "POST",
        "/admin/keys",
        Some(json!({"name": "k", "account_id": id})),
    )
    .assert_error(400, "INVALID_FIELD");
}

#[test]
fn bad_account_requests_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let gw = with_plans(dir.path()).start();
    let field = |reply: common::Reply, field: &str| {
        let body = reply.assert_error(400, "INVALID_FIELD");
        assert_eq!(body["field"], field, "{body}");
    };
    for email in [
        "",
        "nobody",
        "a@b",
        "two@@example.com",
        "a b@example.com",
        "@example.com",
    ] {
        let reply = gw.admin(
            "POST",
            "/admin/accounts",
            Some(json!({"email": email, "name": "n"})),
        );
        field(reply, "email");
    }
    let no_name = gw.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": "a@example.com"})),
    );
    field(no_name, "name");
    let blank = json!({"email": "a@example.com", "name": "  "});
    field(gw.admin("POST", "/admin/accounts", Some(blank)), "name");
    let number = json!({"email": 5, "name": "n"});
    field(gw.admin("POST", "/admin/accounts", Some(number)), "email");
    gw.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": "a@example.com", "name": "n", "plan": "gold"})),
    )
    .assert_error(400, "UNKNOWN_PLAN");
    gw.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": "a@example.com", "name": "n", "limit": 3})),
    )
    .assert_error(400, "INVALID_REQUEST");
    gw.admin("GET", "/admin/accounts/acct_nosuch", None)
        .assert_error(404, "ACCOUNT_NOT_FOUND");
    gw.admin("DELETE", "/admin/accounts/acct_nosuch", None)
        .assert_error(404, "ACCOUNT_NOT_FOUND");
    gw.admin("PUT", "/admin/accounts", None)
        .assert_error(405, "METHOD_NOT_ALLOWED");
    gw.admin("GET", "/admin/accounts/a/b", None)
        .assert_error(404, "NOT_FOUND");

    let account = create_account(&gw, "a@example.com", "team");
    let id = account["id"].as_str().unwrap();
    let path = format!("/admin/accounts/{id}");
    field(
        gw.admin("PATCH", &path, Some(json!({"status": "closed"}))),
        "status",
    );
    field(
        gw.admin("PATCH", &path, Some(json!({"status": "paused"}))),
        "status",
    );
    gw.admin("PATCH", &path, Some(json!({"plan": "gold"})))
        .assert_error(400, "UNKNOWN_PLAN");

    // Keys and accounts: the account must exist and be active, and its plan is the key's.
    let key = |body: Value| gw.admin("POST", "/admin/keys", Some(body));
    field(
        key(json!({"name": "k", "account_id": "acct_nosuch"})),
        "account_id",
    );
    field(key(json!({"name": "k", "account_id": 7})), "account_id");
    field(
        key(json!({"name": "k", "account_id": id, "plan": "free"})),
        "plan",
    );
    field(
        key(json!({"name": "k", "account_id": id, "monthly_limit": 5})),
        "monthly_limit",
    );
    let (key_id, _) = create_account_key(&gw, id);
    let key_path = format!("/admin/keys/{key_id}");
    field(
        gw.admin("PATCH", &key_path, Some(json!({"plan": "free"}))),
        "plan",
    );
    gw.admin("PATCH", &path, Some(json!({"status": "disabled"})));
    field(key(json!({"name": "k", "account_id": id})), "account_id");
}

/// Fires 1,000 calls from 20 connections spread over both keys and both nodes at once;
/// returns how many were served and checks every other answer is a quota refusal.
fn spread_calls(nodes: [&Gateway; 2], keys: [&str; 2]) -> usize {
    let statuses = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..20)
            .map(|i| {
                let (gw, key) = (nodes[i % 2], keys[(i / 2) % 2]);
                scope.spawn(move || {
                    let client = common::agent();
                    (0..50)
                        .map(|_| {
                            let reply = common::read_reply(
                                client
                                    .post(gw.url("/v1/audio"))
                                    .header("Authorization", format!("Bearer {key}"))
                                    .send(BODY)
                                    .unwrap(),
                            );
                            let code = reply.json()["code"].as_str().map(str::to_string);
                            (reply.status, code)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(statuses.len(), 1000);
    for (status, code) in &statuses {
        match (status, code.as_deref()) {
            (200, _) | (429, Some("QUOTA_EXCEEDED" | "RATE_LIMITED")) => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }
    statuses.iter().filter(|(s, _)| *s == 200).count()
}

/// The issue's test: an account of limit 100 with two keys, 1,000 calls over both keys and
/// two nodes: exactly 100 served, and the account's usage says so.
fn shared_limit_is_exact(a: &Gateway, b: &Gateway) {
    let account = create_account(a, "team@example.com", "team");
    let id = account["id"].as_str().unwrap();
    let (_, k1) = create_account_key(a, id);
    let (_, k2) = create_account_key(b, id);
    let served = spread_calls([a, b], [&k1, &k2]);
    assert_eq!(
        served, 100,
        "one limit for the account, not one per key or node"
    );
    wait_until(
        "usage reported by both nodes",
        Duration::from_secs(10),
        || account_usage(a, id) == 100 && account_usage(b, id) == 100,
    );
    // A third key of the account finds the limit used up.
    let (_, k3) = create_account_key(b, id);
    a.post_audio(&k3, BODY).assert_error(429, "QUOTA_EXCEEDED");

    // Disabling the account reaches the other node's cache within a second.
    let path = format!("/admin/accounts/{id}");
    let disabled = a.admin("PATCH", &path, Some(json!({"status": "disabled"})));
    assert_eq!(disabled.status, 200);
    wait_until("the other node refuses", Duration::from_secs(1), || {
        b.post_audio(&k2, BODY).status == 401
    });
}

#[test]
fn an_accounts_limit_is_shared_by_its_keys_across_nodes_on_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let node = || {
        with_plans(dir.path())
            .env("AUDIOLIB_REDIS_URL", redis.url())
            .start()
    };
    let (a, b) = (node(), node());
    shared_limit_is_exact(&a, &b);
}

#[test]
fn an_accounts_limit_is_shared_by_its_keys_across_processes_on_one_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = || {
        with_plans(dir.path())
            .env("AUDIOLIB_DATA_DIR", data.to_str().unwrap())
            .start()
    };
    let (a, b) = (node(), node());
    shared_limit_is_exact(&a, &b);
}

#[test]
fn an_accounts_limit_is_shared_by_its_keys_on_a_redis_cluster() {
    let cluster = common::RedisCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let node = || {
        with_plans(dir.path())
            .env("AUDIOLIB_REDIS_URL", cluster.url())
            .start()
    };
    let (a, b) = (node(), node());
    shared_limit_is_exact(&a, &b);
}

fn cli(gw: &Gateway, args: &[&str]) -> (bool, Value, String) {
    let (ok, out, err) = common::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_audiolib"))
            // The command group, then where its admin API is, then the command.
            .arg(args[0])
            .args(["--admin-url", &gw.admin_url("")])
            .args(&args[1..])
            .env("AUDIOLIB_ADMIN_TOKEN", common::ADMIN_TOKEN),
    );
    (ok, serde_json::from_str(&out).unwrap_or(Value::Null), err)
}

#[test]
fn cli_manages_accounts_through_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let gw = with_plans(dir.path()).start();
    let create = [
        "accounts",
        "create",
        "--email",
        "cli@example.com",
        "--name",
        "CLI",
    ];
    let (ok, account, err) = cli(&gw, &[&create[..], &["--plan", "team"]].concat());
    assert!(ok, "{err}");
    let id = account["id"].as_str().unwrap().to_string();
    assert_eq!(account["monthly_limit"], 100);

    let (ok, key, err) = cli(&gw, &["keys", "create", "--name", "k", "--account", &id]);
    assert!(ok, "{err}");
    assert_eq!(key["account_id"], id.as_str());
    let secret = key["key"].as_str().unwrap().to_string();
    assert_eq!(gw.post_audio(&secret, BODY).status, 200);

    let (ok, shown, _) = cli(&gw, &["accounts", "show", &id]);
    assert!(ok);
    assert_eq!(
        (shown["usage"].as_u64(), shown["keys"][0]["id"].clone()),
        (Some(1), key["id"].clone())
    );
    let (ok, listed, _) = cli(&gw, &["accounts", "list"]);
    assert!(ok);
    assert_eq!(listed["accounts"][0]["id"], id.as_str());

    let (ok, updated, err) = cli(&gw, &["accounts", "update", &id, "--status", "disabled"]);
    assert!(ok, "{err}");
    assert_eq!(updated["status"], "disabled");
    gw.post_audio(&secret, BODY)
        .assert_error(401, "INVALID_KEY");

    let (ok, closed, _) = cli(&gw, &["accounts", "close", &id]);
    assert!(ok);
    assert_eq!(closed["status"], "closed");
    let (ok, _, err) = cli(&gw, &["accounts", "update", &id, "--status", "active"]);
    assert!(!ok);
    assert!(err.contains("409 (ACCOUNT_CLOSED)"), "{err}");
    let (ok, _, err) = cli(&gw, &["accounts", "show", "acct_nosuch"]);
    assert!(!ok);
    assert!(err.contains("404 (ACCOUNT_NOT_FOUND)"), "{err}");
    // A key of an account takes the account's plan: clap refuses both at once.
    let (ok, _, err) = cli(
        &gw,
        &[
            "keys",
            "create",
            "--name",
            "k",
            "--account",
            &id,
            "--plan",
            "free",
        ],
    );
    assert!(!ok);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn usage_history_per_day_for_keys_and_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let gw = with_plans(dir.path()).start();
    let account = create_account(&gw, "h@example.com", "team");
    let acct = account["id"].as_str().unwrap();
    let (key_id, key) = create_account_key(&gw, acct);
    let (other_id, other) = create_account_key(&gw, acct);
    let (own_id, own) = gw.create_key("free", None);
    for _ in 0..2 {
        assert_eq!(gw.post_audio(&key, BODY).status, 200);
    }
    assert_eq!(gw.post_audio(&other, BODY).status, 200);
    assert_eq!(gw.post_audio(&own, BODY).status, 200);
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let history = |path: &str| {
        let reply = gw.admin("GET", path, None);
        assert_eq!(reply.status, 200, "{:?}", reply.json());
        reply.json()
    };
    // The default range: the 30 days up to today, every day listed.
    wait_until("the calls reported", Duration::from_secs(10), || {
        history(&format!("/admin/accounts/{acct}/usage"))["days"][29]["calls"] == 3
    });
    let account_days = history(&format!("/admin/accounts/{acct}/usage"));
    assert_eq!(account_days["days"].as_array().unwrap().len(), 30);
    assert_eq!(account_days["days"][29], json!({"date": today, "calls": 3}));
    assert_eq!(account_days["days"][0]["calls"], 0);
    // A key of an account: its own calls, its share of the account's.
    for (id, calls) in [(&key_id, 2), (&other_id, 1)] {
        let path = format!("/admin/keys/{id}/usage?from={today}&to={today}");
        wait_until("the key's calls written", Duration::from_secs(10), || {
            history(&path)["days"][0]["calls"] == calls
        });
        assert_eq!(
            history(&path),
            json!({"subject": id, "days": [{"date": today, "calls": calls}]})
        );
    }
    wait_until("the other key reported", Duration::from_secs(10), || {
        history(&format!("/admin/keys/{own_id}/usage?from={today}"))["days"][0]["calls"] == 1
    });

    let path = format!("/admin/keys/{own_id}/usage");
    let field = |query: &str, name: &str| {
        let body = gw
            .admin("GET", &format!("{path}?{query}"), None)
            .assert_error(400, "INVALID_FIELD");
        assert_eq!(body["field"], name, "{query}: {body}");
    };
    field("from=2026-13-01", "from");
    field("to=yesterday", "to");
    field("from=2026-11-02&to=2026-11-01", "from");
    field("from=2026-01-01&to=2026-12-01", "from");
    gw.admin("GET", &format!("{path}?day=2026-11-01"), None)
        .assert_error(400, "INVALID_REQUEST");
    gw.admin("GET", "/admin/keys/key_nosuch/usage", None)
        .assert_error(404, "KEY_NOT_FOUND");
    gw.admin("GET", "/admin/accounts/acct_nosuch/usage", None)
        .assert_error(404, "ACCOUNT_NOT_FOUND");
    gw.admin("POST", &path, None)
        .assert_error(405, "METHOD_NOT_ALLOWED");
}
