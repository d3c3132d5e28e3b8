//! The admin API and the `audiolib keys` CLI against the real binary (SPEC §3, §7).

mod common;

use std::process::Command;

use common::{ADMIN_TOKEN, Gateway, agent, read_reply};
use serde_json::{Value, json};

const BODY: &str = r#"{"library":"audio.ambient"}"#;

#[test]
fn admin_api_is_disabled_without_a_token_and_guarded_with_one() {
    let gw = Gateway::builder().env("AUDIOLIB_ADMIN_TOKEN", "").start();
    let reply = read_reply(agent().get(gw.admin_url("/admin/keys")).call().unwrap());
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json()["code"], "ADMIN_DISABLED");

    let gw = Gateway::start();
    for auth in [None, Some("Bearer wrong-token-0123456789"), Some("Basic x")] {
        let mut req = agent().get(gw.admin_url("/admin/keys"));
        if let Some(auth) = auth {
            req = req.header("Authorization", auth);
        }
        let reply = read_reply(req.call().unwrap());
        assert_eq!(reply.status, 401, "{auth:?}");
        assert_eq!(reply.json()["code"], "UNAUTHORIZED");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
}

#[test]
fn admin_token_shorter_than_16_characters_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_audiolib"))
        .arg("serve")
        .env("AUDIOLIB_ADMIN_TOKEN", "short")
        .env("AUDIOLIB_CATALOG_DIR", common::repo_path("catalog"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`admin_token` (AUDIOLIB_ADMIN_TOKEN)"),
        "{err}"
    );
}

#[test]
fn create_list_show_update_revoke() {
    let gw = Gateway::start();
    let created = gw.admin(
        "POST",
        "/admin/keys",
        Some(json!({"name": "  Mobile app ", "plan": "free"})),
    );
    assert_eq!(created.status, 201);
    let v = created.json();
    let key = v["key"].as_str().unwrap().to_string();
    let id = v["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("alp_") && key.len() == 36);
    assert!(key.starts_with(v["prefix"].as_str().unwrap()));
    assert_eq!(v["name"], "Mobile app");
    assert_eq!(v["plan"], "free");
    assert_eq!(v["monthly_limit"], 1000, "the plan's default limit");
    assert_eq!(v["status"], "active");
    assert!(v["created_at"].as_str().unwrap().ends_with('Z'));

    // The secret is never shown again, nor its digest.
    let list = gw.admin("GET", "/admin/keys", None);
    assert_eq!(list.status, 200);
    let text = String::from_utf8(list.body.clone()).unwrap();
    assert!(!text.contains(&key) && !text.contains(&key[4..]));
    let keys = list.json()["keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 2, "the development key and ours");
    for k in &keys {
        assert!(k.get("key").is_none() && k.get("digest").is_none(), "{k}");
    }

    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    let shown = gw.admin("GET", &format!("/admin/keys/{id}"), None).json();
    assert_eq!(shown["usage"], 2);
    assert!(shown["period"].as_str().unwrap().len() == 7);
    assert!(shown.get("key").is_none());

    // A new plan brings its default limit; an explicit null is unlimited.
    let patched = gw
        .admin(
            "PATCH",
            &format!("/admin/keys/{id}"),
            Some(json!({"plan": "pro"})),
        )
        .json();
    assert_eq!(
        (patched["plan"].clone(), patched["monthly_limit"].clone()),
        (json!("pro"), json!(100000))
    );
    let patched = gw
        .admin(
            "PATCH",
            &format!("/admin/keys/{id}"),
            Some(json!({"monthly_limit": null})),
        )
        .json();
    assert_eq!(patched["monthly_limit"], Value::Null);
    assert_eq!(gw.post_audio(&key, BODY).header("ratelimit"), None);

    let revoked = gw.admin("DELETE", &format!("/admin/keys/{id}"), None);
    assert_eq!(revoked.status, 200);
    assert_eq!(revoked.json()["status"], "revoked");
    gw.post_audio(&key, BODY).assert_error(401, "INVALID_KEY");
    // Revocation is final.
    let reactivate = gw.admin(
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"status": "active"})),
    );
    assert_eq!(reactivate.status, 409);
    assert_eq!(reactivate.json()["code"], "KEY_REVOKED");
    gw.post_audio(&key, BODY).assert_error(401, "INVALID_KEY");
}

#[test]
fn create_with_explicit_limits() {
    let gw = Gateway::start();
    let v = gw
        .admin(
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "plan": "free", "monthly_limit": 7})),
        )
        .json();
    assert_eq!(v["monthly_limit"], 7);
    let v = gw
        .admin(
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "monthly_limit": null})),
        )
        .json();
    assert_eq!(
        (v["plan"].clone(), v["monthly_limit"].clone()),
        (json!("free"), Value::Null)
    );
}

#[test]
fn bad_admin_requests_get_clear_errors() {
    let gw = Gateway::start();
    let cases = [
        ("POST", "/admin/keys", Some(json!({})), 400, "INVALID_FIELD"),
        (
            "POST",
            "/admin/keys",
            Some(json!({"name": ""})),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!({"name": 5})),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "plan": "gold"})),
            400,
            "UNKNOWN_PLAN",
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "monthly_limit": -1})),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "monthly_limit": "5"})),
            400,
            "INVALID_FIELD",
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!({"name": "n", "colour": "red"})),
            400,
            "INVALID_REQUEST",
        ),
        (
            "POST",
            "/admin/keys",
            Some(json!(["n"])),
            400,
            "INVALID_JSON",
        ),
        ("GET", "/admin/keys/key_nope", None, 404, "KEY_NOT_FOUND"),
        (
            "PATCH",
            "/admin/keys/key_nope",
            Some(json!({})),
            404,
            "KEY_NOT_FOUND",
        ),
        ("DELETE", "/admin/keys/key_nope", None, 404, "KEY_NOT_FOUND"),
        ("DELETE", "/admin/keys", None, 405, "METHOD_NOT_ALLOWED"),
        ("GET", "/admin/other", None, 404, "NOT_FOUND"),
        ("GET", "/admin/keys/a/b", None, 404, "NOT_FOUND"),
    ];
    for (method, path, body, status, code) in cases {
        let reply = gw.admin(method, path, body.clone());
        assert_eq!(
            reply.status,
            status,
            "{method} {path} {body:?}: {:?}",
            reply.json()
        );
        assert_eq!(reply.json()["code"], code, "{method} {path} {body:?}");
    }
    let (id, _) = gw.create_key("free", None);
    for body in [
        json!({"status": "paused"}),
        json!({"plan": "gold"}),
        json!({"monthly_limit": 1.5}),
        json!({"name": "renamed"}),
    ] {
        let reply = gw.admin("PATCH", &format!("/admin/keys/{id}"), Some(body.clone()));
        assert_eq!(reply.status, 400, "{body}");
    }
    // Not JSON at all.
    let reply = read_reply(
        agent()
            .post(gw.admin_url("/admin/keys"))
            .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
            .send("name=x")
            .unwrap(),
    );
    assert_eq!(
        (reply.status, reply.json()["code"].clone()),
        (400, json!("INVALID_JSON"))
    );
}

fn cli(gw: &Gateway, args: &[&str]) -> (bool, String, String) {
    common::run(
        Command::new(env!("CARGO_BIN_EXE_audiolib"))
            .arg("keys")
            .args(["--admin-url", &gw.admin_url("")])
            .args(args)
            .env("AUDIOLIB_ADMIN_TOKEN", ADMIN_TOKEN),
    )
}

#[test]
fn cli_manages_keys_through_the_admin_api() {
    let gw = Gateway::start();
    let (ok, out, err) = cli(&gw, &["create", "--name", "cli key", "--limit", "1"]);
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["monthly_limit"], 1);

    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    gw.post_audio(&key, BODY)
        .assert_error(429, "QUOTA_EXCEEDED");

    let (ok, out, _) = cli(&gw, &["show", &id]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["usage"], 1);

    let (ok, out, _) = cli(&gw, &["list"]);
    assert!(ok && out.contains(&id) && !out.contains(&key));

    let (ok, out, err) = cli(&gw, &["update", &id, "--unlimited"]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["monthly_limit"],
        Value::Null
    );
    assert_eq!(gw.post_audio(&key, BODY).status, 200);

    let (ok, _, err) = cli(
        &gw,
        &["update", &id, "--plan", "pro", "--status", "disabled"],
    );
    assert!(ok, "{err}");
    gw.post_audio(&key, BODY).assert_error(401, "INVALID_KEY");

    let (ok, _, _) = cli(&gw, &["revoke", &id]);
    assert!(ok);
    let (ok, _, err) = cli(&gw, &["update", &id, "--status", "active"]);
    assert!(!ok);
    assert!(err.contains("409 (KEY_REVOKED)"), "{err}");

    let (ok, _, err) = cli(&gw, &["show", "key_missing"]);
    assert!(!ok && err.contains("404 (KEY_NOT_FOUND)"), "{err}");

    // Without a token the CLI says what is missing instead of calling.
    let out = Command::new(env!("CARGO_BIN_EXE_audiolib"))
        .args(["keys", "--admin-url", &gw.admin_url(""), "list"])
        .env_remove("AUDIOLIB_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin token"));
}

#[test]
fn key_and_account_lists_come_in_pages() {
    let gw = Gateway::start();
    // The development key, then five more.
    let mut created: Vec<String> = Vec::new();
    for _ in 0..5 {
        created.push(gw.create_key("free", None).0);
    }
    let mut listed = Vec::new();
    let mut query = "limit=2".to_string();
    loop {
        let page = gw.admin("GET", &format!("/admin/keys?{query}"), None);
        assert_eq!(page.status, 200);
        let page = page.json();
        let keys = page["keys"].as_array().unwrap();
        assert!(keys.len() <= 2);
        listed.extend(keys.iter().map(|k| k["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(listed.len(), 6, "{listed:?}");
    // Each once (keys of one second are ordered by id, so compare as sets).
    let mut unique = listed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 6);
    assert!(created.iter().all(|id| listed.contains(id)));
    // Without a limit: a page of 100.
    let all = gw.admin("GET", "/admin/keys", None).json();
    assert_eq!(all["keys"].as_array().unwrap().len(), 6);
    assert_eq!(all["next_cursor"], Value::Null);

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=x", "limit"),
        ("cursor=key_nosuch", "cursor"),
    ] {
        for list in ["keys", "accounts"] {
            let body = gw
                .admin("GET", &format!("/admin/{list}?{query}"), None)
                .assert_error(400, "INVALID_FIELD");
            assert_eq!(body["field"], field, "{list}?{query}");
        }
    }
    gw.admin("GET", "/admin/keys?page=2", None)
        .assert_error(400, "INVALID_REQUEST");

    // The CLI follows the cursor to the end.
    let (ok, out, err) = cli(&gw, &["list"]);
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 6);
}

/// Keys made elsewhere come in by digest, all or none (`POST /admin/keys:import`).
fn import_by_digest(gw: &Gateway) {
    let secrets: Vec<String> = (0..3)
        .map(|i| format!("alp_{:0>32}", format!("import{i}")))
        .collect();
    let item = |secret: &str| {
        json!({
            "digest": audiolib::auth::KeyDigest::of(secret).to_string(),
            "prefix": &secret[..8],
            "name": "imported",
            "plan": "free",
        })
    };
    let items: Vec<Value> = secrets.iter().map(|s| item(s)).collect();
    let imported = gw.admin("POST", "/admin/keys:import", Some(json!({"keys": items})));
    assert_eq!(imported.status, 201, "{:?}", imported.json());
    assert_eq!(imported.json()["imported"], 3);
    let ids = imported.json()["ids"].clone();
    for secret in &secrets {
        assert_eq!(gw.post_audio(secret, BODY).status, 200);
    }
    let shown = gw.admin(
        "GET",
        &format!("/admin/keys/{}", ids[0].as_str().unwrap()),
        None,
    );
    assert_eq!(shown.json()["prefix"], &secrets[0][..8]);
    let text =
        String::from_utf8_lossy(&gw.admin("GET", "/admin/audit?limit=1", None).body).to_string();
    assert!(
        text.contains("key.imported") && !text.contains(&secrets[0]),
        "{text}"
    );

    let count = || {
        gw.admin("GET", "/admin/keys?limit=1000", None).json()["keys"]
            .as_array()
            .unwrap()
            .len()
    };
    let before = count();
    let fresh = item("alp_freshfreshfreshfreshfreshfresh");
    let import = |keys: Value| gw.admin("POST", "/admin/keys:import", Some(json!({"keys": keys})));
    // An existing digest: 409 and nothing imported, not even the fresh one before it.
    import(json!([fresh, items[1]])).assert_error(409, "DIGEST_TAKEN");
    assert_eq!(count(), before);
    let field = |reply: common::Reply, name: &str| {
        let body = reply.assert_error(400, "INVALID_FIELD");
        assert_eq!(body["field"], name, "{body}");
    };
    let mut bad = fresh.clone();
    bad["digest"] = json!("abc");
    field(import(json!([bad])), "digest");
    let mut bad = fresh.clone();
    bad["prefix"] = json!("xyz_1234");
    field(import(json!([bad])), "prefix");
    let mut bad = fresh.clone();
    bad.as_object_mut().unwrap().remove("name");
    field(import(json!([bad])), "name");
    field(import(json!([fresh, fresh])), "keys");
    field(import(json!("all")), "keys");
    let many: Vec<Value> = (0..10_001)
        .map(|i| item(&format!("alp_{:0>32}", i)))
        .collect();
    field(import(json!(many)), "keys");
    let mut with_secret = fresh.clone();
    with_secret["key"] = json!("alp_freshfreshfreshfreshfreshfresh");
    import(json!([with_secret])).assert_error(400, "INVALID_REQUEST");
    assert_eq!(count(), before, "nothing half-applied");
    gw.admin("GET", "/admin/keys:import", None)
        .assert_error(405, "METHOD_NOT_ALLOWED");
}

#[test]
fn keys_are_imported_by_digest_on_the_embedded_store() {
    import_by_digest(&Gateway::start());
}

#[test]
fn keys_are_imported_by_digest_on_redis() {
    let redis = common::RedisServer::start();
    import_by_digest(
        &Gateway::builder()
            .env("AUDIOLIB_REDIS_URL", redis.url())
            .start(),
    );
}
