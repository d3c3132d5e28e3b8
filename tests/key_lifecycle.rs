//! The key lifecycle of SPEC §9: rotation with a grace period on every node, expiry, `meta`,
//! `last_used_at`, and the states `active|disabled|revoked|expired`.

mod common;

use std::time::{Duration, SystemTime};

use common::{Gateway, RedisServer, wait_until};
use serde_json::{Value, json};

const BODY: &str = r#"{"library":"audio.sleep"}"#;

fn rfc3339_in(secs: i64) -> String {
    let t = chrono::Utc::now() + chrono::Duration::seconds(secs);
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn rotate(gw: &Gateway, id: &str, body: Value) -> common::Reply {
    gw.admin("POST", &format!("/admin/keys/{id}/rotate"), Some(body))
}

/// Rotation on two nodes: during the grace both secrets work everywhere; after it the old one
/// is refused everywhere; usage and limits stay with the key.
#[test]
fn a_rotated_keys_old_secret_works_on_every_node_until_its_grace_ends() {
    let redis = RedisServer::start();
    let (a, b) = Gateway::two_on(&redis);
    let (id, old) = a.create_key("free", Some(Some(50)));
    for gw in [&a, &b] {
        assert_eq!(
            gw.post_audio(&old, BODY).status,
            200,
            "cached before the rotation"
        );
    }

    let reply = rotate(&a, &id, json!({"grace_secs": 3}));
    assert_eq!(reply.status, 201, "{:?}", reply.json());
    let rotated = reply.json();
    assert_eq!(rotated["id"], id.as_str(), "the same key");
    let new = rotated["key"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert!(new.starts_with(rotated["prefix"].as_str().unwrap()));
    assert_eq!(rotated["monthly_limit"], 50, "limits stay with the key");
    let until = rotated["previous_expires_at"].as_str().unwrap();
    let until: SystemTime = chrono::DateTime::parse_from_rfc3339(until).unwrap().into();

    for gw in [&a, &b] {
        assert_eq!(gw.post_audio(&new, BODY).status, 200);
        assert_eq!(gw.post_audio(&old, BODY).status, 200, "within the grace");
    }
    wait_until("the grace to end", Duration::from_secs(10), || {
        SystemTime::now() > until + Duration::from_millis(100)
    });
    for gw in [&a, &b] {
        gw.post_audio(&old, BODY).assert_error(401, "INVALID_KEY");
        assert_eq!(gw.post_audio(&new, BODY).status, 200);
    }
    // Two calls before the rotation, six after: one count for the key, whichever secret.
    a.wait_usage(&id, 8);
    let shown = a.admin("GET", &format!("/admin/keys/{id}"), None).json();
    assert_eq!(
        shown["previous_expires_at"],
        Value::Null,
        "absent once over"
    );
}

/// A key in its rotation grace is cached under both secrets: disabling it, or its account,
/// stops the old secret on every node within a second too, not when its cache entry expires.
#[test]
fn disabling_a_key_or_its_account_stops_the_old_secret_during_the_grace() {
    let redis = RedisServer::start();
    let (a, b) = Gateway::two_on(&redis);
    let account = a.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": "grace@example.com", "name": "Grace"})),
    );
    assert_eq!(account.status, 201);
    let acct = account.json()["id"].as_str().unwrap().to_string();
    let mut keys = Vec::new();
    for _ in 0..2 {
        let created = a.admin(
            "POST",
            "/admin/keys",
            Some(json!({"name": "k", "account_id": acct})),
        );
        assert_eq!(created.status, 201);
        let v = created.json();
        let (id, old) = (v["id"].as_str().unwrap(), v["key"].as_str().unwrap());
        let rotated = rotate(&a, id, json!({"grace_secs": 3600}));
        assert_eq!(rotated.status, 201);
        // Cached under the old secret on the other node.
        assert_eq!(b.post_audio(old, BODY).status, 200);
        keys.push((id.to_string(), old.to_string()));
    }
    let (first_id, first_old) = &keys[0];
    let disabled = a.admin(
        "PATCH",
        &format!("/admin/keys/{first_id}"),
        Some(json!({"status": "disabled"})),
    );
    assert_eq!(disabled.status, 200);
    wait_until("the old secret refused", Duration::from_secs(1), || {
        b.post_audio(first_old, BODY).status == 401
    });
    let (_, second_old) = &keys[1];
    assert_eq!(b.post_audio(second_old, BODY).status, 200);
    let disabled = a.admin(
        "PATCH",
        &format!("/admin/accounts/{acct}"),
        Some(json!({"status": "disabled"})),
    );
    assert_eq!(disabled.status, 200);
    wait_until(
        "the old secret of the account's key refused",
        Duration::from_secs(1),
        || b.post_audio(second_old, BODY).status == 401,
    );
}

#[test]
fn a_rotation_without_grace_stops_the_old_secret_at_once_on_every_node() {
    let redis = RedisServer::start();
    let (a, b) = Gateway::two_on(&redis);
    let (id, old) = a.create_key("free", None);
    assert_eq!(b.post_audio(&old, BODY).status, 200);
    let reply = rotate(&a, &id, json!({"grace_secs": 0}));
    assert_eq!(reply.status, 201);
    assert_eq!(reply.json()["previous_expires_at"], Value::Null);
    let new = reply.json()["key"].as_str().unwrap().to_string();
    a.post_audio(&old, BODY).assert_error(401, "INVALID_KEY");
    wait_until(
        "the other node forgets the old secret",
        Duration::from_secs(1),
        || b.post_audio(&old, BODY).status == 401,
    );
    assert_eq!(b.post_audio(&new, BODY).status, 200);

    // A second rotation ends the first one's grace at once: only one old secret at a time.
    let second = rotate(&a, &id, json!({"grace_secs": 600})).json();
    let newest = second["key"].as_str().unwrap().to_string();
    let third = rotate(&a, &id, json!({"grace_secs": 600})).json();
    let latest = third["key"].as_str().unwrap().to_string();
    assert_eq!(a.post_audio(&latest, BODY).status, 200);
    assert_eq!(
        a.post_audio(&newest, BODY).status,
        200,
        "the previous secret, in grace"
    );
    a.post_audio(&new, BODY).assert_error(401, "INVALID_KEY");
}

#[test]
fn an_imported_key_tried_before_its_import_works_at_once_on_every_node() {
    let redis = RedisServer::start();
    let (a, b) = Gateway::two_on(&redis);
    let secret = format!("alp_{:0>32}", "importedbeforeitwasknown");
    // Node b now holds the secret as unknown, for the negative TTL (5 s).
    b.post_audio(&secret, BODY).assert_error(401, "INVALID_KEY");
    let item = json!({
        "digest": audiolib::auth::KeyDigest::of(&secret).to_string(),
        "prefix": &secret[..8],
        "name": "imported",
        "plan": "free",
    });
    let imported = a.admin("POST", "/admin/keys:import", Some(json!({"keys": [item]})));
    assert_eq!(imported.status, 201, "{:?}", imported.json());
    assert_eq!(a.post_audio(&secret, BODY).status, 200);
    wait_until(
        "the other node forgets the secret was unknown",
        Duration::from_secs(1),
        || b.post_audio(&secret, BODY).status == 200,
    );
}

#[test]
fn bad_rotations_are_refused() {
    let gw = Gateway::start();
    let (id, key) = gw.create_key("free", None);
    let field = |reply: common::Reply, name: &str| {
        let body = reply.assert_error(400, "INVALID_FIELD");
        assert_eq!(body["field"], name, "{body}");
    };
    field(
        rotate(&gw, &id, json!({"grace_secs": 7 * 86_400 + 1})),
        "grace_secs",
    );
    field(rotate(&gw, &id, json!({"grace_secs": -1})), "grace_secs");
    field(rotate(&gw, &id, json!({"grace_secs": "1h"})), "grace_secs");
    rotate(&gw, &id, json!({"grace": 5})).assert_error(400, "INVALID_REQUEST");
    rotate(&gw, "key_nosuch", json!({})).assert_error(404, "KEY_NOT_FOUND");
    gw.admin("GET", &format!("/admin/keys/{id}/rotate"), None)
        .assert_error(405, "METHOD_NOT_ALLOWED");
    assert_eq!(gw.post_audio(&key, BODY).status, 200, "nothing changed");
    // Seven days is the longest grace.
    assert_eq!(
        rotate(&gw, &id, json!({"grace_secs": 7 * 86_400})).status,
        201
    );
    assert_eq!(
        gw.admin("DELETE", &format!("/admin/keys/{id}"), None)
            .status,
        200
    );
    rotate(&gw, &id, json!({})).assert_error(409, "KEY_REVOKED");
}

/// Both stores keep the new fields the same way.
fn expiry_and_meta(gw: &Gateway) {
    let soon = rfc3339_in(2);
    let created = gw.admin(
        "POST",
        "/admin/keys",
        Some(json!({"name": "k", "expires_at": soon, "meta": {"customer": "c-42", "tier": 3}})),
    );
    assert_eq!(created.status, 201, "{:?}", created.json());
    let created = created.json();
    assert_eq!(created["expires_at"], soon.as_str());
    assert_eq!(created["meta"], json!({"customer": "c-42", "tier": 3}));
    assert_eq!(created["last_used_at"], Value::Null);
    let (id, key) = (
        created["id"].as_str().unwrap().to_string(),
        created["key"].as_str().unwrap().to_string(),
    );
    let path = format!("/admin/keys/{id}");
    let reply = gw.post_audio(&key, BODY);
    assert_eq!(reply.status, 200);
    assert!(
        !String::from_utf8_lossy(&reply.body).contains("c-42"),
        "meta is not for clients"
    );

    // last_used_at, to the minute, written in the background within seconds.
    wait_until("last_used_at", Duration::from_secs(10), || {
        gw.admin("GET", &path, None).json()["last_used_at"].is_string()
    });
    let used = gw.admin("GET", &path, None).json()["last_used_at"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(used.ends_with(":00Z"), "{used}");

    wait_until("the expiry", Duration::from_secs(10), || {
        gw.post_audio(&key, BODY).status == 401
    });
    gw.post_audio(&key, BODY).assert_error(401, "INVALID_KEY");
    assert_eq!(gw.admin("GET", &path, None).json()["status"], "expired");
    // A later expiry brings it back; none at all too.
    let later = rfc3339_in(3600);
    let patched = gw.admin("PATCH", &path, Some(json!({"expires_at": later})));
    assert_eq!(patched.status, 200, "{:?}", patched.json());
    assert_eq!(patched.json()["status"], "active");
    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    let patched = gw.admin(
        "PATCH",
        &path,
        Some(json!({"expires_at": null, "meta": null})),
    );
    assert_eq!(
        (&patched.json()["expires_at"], &patched.json()["meta"]),
        (&Value::Null, &Value::Null)
    );
    let patched = gw.admin("PATCH", &path, Some(json!({"meta": {"a": [1, 2]}})));
    assert_eq!(patched.json()["meta"], json!({"a": [1, 2]}));
    // Disabled is not revoked: it can come back.
    let disabled = gw.admin("PATCH", &path, Some(json!({"status": "disabled"})));
    assert_eq!(disabled.json()["status"], "disabled");
    gw.post_audio(&key, BODY).assert_error(401, "INVALID_KEY");
    assert_eq!(
        gw.admin("PATCH", &path, Some(json!({"status": "active"})))
            .json()["status"],
        "active"
    );
}

#[test]
fn keys_expire_and_carry_meta_on_the_embedded_store() {
    expiry_and_meta(&Gateway::start());
}

#[test]
fn keys_expire_and_carry_meta_on_redis() {
    let redis = RedisServer::start();
    expiry_and_meta(
        &Gateway::builder()
            .env("AUDIOLIB_REDIS_URL", redis.url())
            .start(),
    );
}

#[test]
fn bad_key_fields_are_refused_naming_the_field() {
    let gw = Gateway::start();
    let field = |reply: common::Reply, name: &str| {
        let body = reply.assert_error(400, "INVALID_FIELD");
        assert_eq!(body["field"], name, "{body}");
    };
    let create = |extra: Value| {
        let mut body = json!({"name": "k"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        gw.admin("POST", "/admin/keys", Some(body))
    };
    field(create(json!({"expires_at": rfc3339_in(-60)})), "expires_at");
    field(create(json!({"expires_at": "tomorrow"})), "expires_at");
    field(create(json!({"expires_at": "2027-01-01"})), "expires_at");
    field(create(json!({"expires_at": 1_800_000_000})), "expires_at");
    field(create(json!({"meta": [1, 2]})), "meta");
    field(create(json!({"meta": "text"})), "meta");
    field(create(json!({"meta": {"big": "x".repeat(1100)}})), "meta");
    // Exactly at the limit is fine: {"big":"…"} of 1,024 bytes.
    let at_limit = json!({"big": "x".repeat(1024 - 10)});
    assert_eq!(at_limit.to_string().len(), 1024);
    assert_eq!(create(json!({"meta": at_limit})).status, 201);

    let (id, _) = gw.create_key("free", None);
    let path = format!("/admin/keys/{id}");
    let patch = |body: Value| gw.admin("PATCH", &path, Some(body));
    field(patch(json!({"expires_at": rfc3339_in(-1)})), "expires_at");
    field(patch(json!({"meta": 5})), "meta");
    field(patch(json!({"status": "expired"})), "status");
    field(patch(json!({"status": "paused"})), "status");
    // Nothing half-applied: a bad field leaves the others as they were.
    field(
        patch(json!({"meta": {"ok": true}, "expires_at": "never"})),
        "expires_at",
    );
    assert_eq!(gw.admin("GET", &path, None).json()["meta"], Value::Null);
}

#[test]
fn cli_rotates_keys_and_reads_their_usage() {
    let gw = Gateway::start();
    let (id, old) = gw.create_key("free", None);
    assert_eq!(gw.post_audio(&old, BODY).status, 200);
    let cli = |args: &[&str]| {
        common::run(
            std::process::Command::new(env!("CARGO_BIN_EXE_audiolib"))
                .arg("keys")
                .args(["--admin-url", &gw.admin_url("")])
                .args(args)
                .env("AUDIOLIB_ADMIN_TOKEN", common::ADMIN_TOKEN),
        )
    };
    let (ok, out, err) = cli(&["rotate", &id, "--grace-secs", "600"]);
    assert!(ok, "{err}");
    let rotated: Value = serde_json::from_str(&out).unwrap();
    let new = rotated["key"].as_str().unwrap();
    assert!(rotated["previous_expires_at"].is_string());
    assert_eq!(gw.post_audio(new, BODY).status, 200);
    assert_eq!(gw.post_audio(&old, BODY).status, 200);
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    wait_until("three calls reported", Duration::from_secs(10), || {
        let (ok, out, _) = cli(&["usage", &id, "--from", &today, "--to", &today]);
        ok && serde_json::from_str::<Value>(&out).unwrap()["days"][0]["calls"] == 3
    });
    let (ok, _, err) = cli(&["rotate", &id, "--grace-secs", "700000"]);
    assert!(!ok);
    assert!(err.contains("400 (INVALID_FIELD)"), "{err}");
    let (ok, _, err) = cli(&["usage", &id, "--from", "soon"]);
    assert!(!ok);
    assert!(err.contains("400 (INVALID_FIELD)"), "{err}");
}

/// Create, rotate, update, revoke: four entries, newest first, none holding a key; pages
/// follow `next_cursor`.
fn audit_trail(gw: &Gateway) {
    let created = gw.admin(
        "POST",
        "/admin/keys",
        Some(json!({"name": "audited", "plan": "free"})),
    );
    let id = created.json()["id"].as_str().unwrap().to_string();
    let first_secret = created.json()["key"].as_str().unwrap().to_string();
    let rotated = rotate(gw, &id, json!({"grace_secs": 60}));
    let second_secret = rotated.json()["key"].as_str().unwrap().to_string();
    let path = format!("/admin/keys/{id}");
    assert_eq!(
        gw.admin("PATCH", &path, Some(json!({"meta": {"n": 1}})))
            .status,
        200
    );
    assert_eq!(gw.admin("DELETE", &path, None).status, 200);
    // A refused change is not a change.
    assert_eq!(
        gw.admin("PATCH", &path, Some(json!({"status": "active"})))
            .status,
        409
    );

    let page = gw.admin("GET", "/admin/audit?limit=4", None);
    assert_eq!(page.status, 200);
    let text = String::from_utf8_lossy(&page.body).to_string();
    for secret in [&first_secret, &second_secret] {
        assert!(
            !text.contains(secret.as_str()) && !text.contains("alp_"),
            "{text}"
        );
    }
    let page = page.json();
    let entries = page["entries"].as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["key.revoked", "key.updated", "key.rotated", "key.created"]
    );
    for e in entries {
        assert_eq!(
            (e["actor"].as_str(), e["target"].as_str()),
            (Some("admin"), Some(id.as_str()))
        );
        assert!(e["at"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(entries[1]["changes"], json!({"meta": {"n": 1}}));
    assert_eq!(entries[2]["changes"], json!({"grace_secs": 60}));
    assert_eq!(
        entries[3]["changes"],
        json!({"name": "audited", "plan": "free"})
    );

    // Pages of two, following the cursor, list the same entries once each.
    let mut seen = Vec::new();
    let mut query = "limit=2".to_string();
    loop {
        let page = gw
            .admin("GET", &format!("/admin/audit?{query}"), None)
            .json();
        seen.extend(
            page["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].clone()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("limit=2&before={cursor}"),
            None => break,
        }
    }
    let all = gw.admin("GET", "/admin/audit", None).json();
    let all: Vec<Value> = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(seen, all);

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("before=x", "before"),
    ] {
        let body = gw
            .admin("GET", &format!("/admin/audit?{query}"), None)
            .assert_error(400, "INVALID_FIELD");
        assert_eq!(body["field"], field);
    }
    gw.admin("GET", "/admin/audit?after=1", None)
        .assert_error(400, "INVALID_REQUEST");
    gw.admin("DELETE", "/admin/audit", None)
        .assert_error(405, "METHOD_NOT_ALLOWED");
}

#[test]
fn every_admin_change_is_in_the_audit_log_on_the_embedded_store() {
    let gw = Gateway::start();
    audit_trail(&gw);
    // Accounts too.
    let account = gw.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": "a@example.com", "name": "A"})),
    );
    let acct = account.json()["id"].as_str().unwrap().to_string();
    gw.admin("DELETE", &format!("/admin/accounts/{acct}"), None);
    let page = gw.admin("GET", "/admin/audit?limit=2", None).json();
    let actions: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["account.closed", "account.created"]);
}

#[test]
fn every_admin_change_is_in_the_audit_log_on_redis() {
    let redis = RedisServer::start();
    audit_trail(
        &Gateway::builder()
            .env("AUDIOLIB_REDIS_URL", redis.url())
            .start(),
    );
}

#[test]
fn cli_lists_the_audit_log() {
    let gw = Gateway::start();
    let (id, _) = gw.create_key("free", None);
    let (ok, out, err) = common::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_audiolib"))
            .args(["audit", "--admin-url", &gw.admin_url(""), "--limit", "1"])
            .env("AUDIOLIB_ADMIN_TOKEN", common::ADMIN_TOKEN),
    );
    assert!(ok, "{err}");
    let page: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(page["entries"][0]["target"], id.as_str());
    assert_eq!(page["entries"][0]["action"], "key.created");
}
