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
