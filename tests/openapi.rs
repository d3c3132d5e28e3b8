//! The OpenAPI 3.1 documents in `docs/openapi/`: valid OpenAPI (openapi-spec-validator),
//! served as kept in the repo on the admin listener, and true of the running binary:
//! schemathesis (every check it has) finds nothing on either API.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{ADMIN_TOKEN, Gateway, agent, python, read_reply, repo_path};

const DOCUMENTS: [(&str, &str); 2] = [
    ("/openapi.json", "docs/openapi/public.json"),
    ("/openapi/admin.json", "docs/openapi/admin.json"),
];

/// A tool the venv installs beside its python (`scripts/requirements-test.txt`).
fn venv_tool(name: &str) -> PathBuf {
    PathBuf::from(python()).with_file_name(name)
}

#[test]
fn documents_are_valid_openapi() {
    for (_, file) in DOCUMENTS {
        let out = Command::new(python())
            .args(["-m", "openapi_spec_validator"])
            .arg(repo_path(file))
            .output()
            .expect("openapi-spec-validator (scripts/test sets up .venv)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{file}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.trim_end().ends_with(": OK"), "{text}");
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(repo_path(file)).unwrap()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0", "{file}");
    }
}

#[test]
fn documents_are_served_on_the_admin_listener_as_kept() {
    let gw = Gateway::start();
    for (path, file) in DOCUMENTS {
        let reply = read_reply(agent().get(&gw.admin_url(path)).call().unwrap());
        assert_eq!(reply.status, 200, "{path}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(
            reply.body,
            std::fs::read(repo_path(file)).unwrap(),
            "{path}"
        );
        let reply = read_reply(agent().post(&gw.admin_url(path)).send("").unwrap());
        assert_eq!(reply.status, 405, "{path}");
        assert_eq!(reply.header("allow"), Some("GET, HEAD"));
    }
    // Not on the public listener: it passes such paths through (here: no upstream).
    let reply = read_reply(agent().get(&gw.url("/openapi.json")).call().unwrap());
    reply.assert_error(404, "NOT_FOUND");
}

/// Runs schemathesis with every check, a fixed seed and at most `cases` cases per operation;
/// `extra` names what it may not check and why.
fn schemathesis(schema: &str, base: &str, token: &str, cases: u32, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(venv_tool("schemathesis"))
        .arg("run")
        .arg(schema)
        .args(["--url", base])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all", "--seed", "1"])
        .args(["--max-examples", &cases.to_string()])
        .args(["--workers", "1", "--no-color"])
        .args(extra)
        .current_dir(dir.path())
        .output()
        .expect("schemathesis (scripts/test sets up .venv)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No issues found"),
        "schemathesis on {schema}:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn schemathesis_finds_nothing_on_the_public_api() {
    let gw = Gateway::start();
    // Unlimited, so thousands of calls never meet the quota.
    let (_, key) = gw.create_key("unlimited", None);
    schemathesis(
        &gw.admin_url("/openapi.json"),
        &format!("http://{}", gw.addr),
        &key,
        150,
        &[],
    );
}

#[test]
fn schemathesis_finds_nothing_on_the_admin_api() {
    let gw = Gateway::start();
    schemathesis(
        &gw.admin_url("/openapi/admin.json"),
        &format!("http://{}", gw.admin),
        ADMIN_TOKEN,
        40,
        // DELETE revokes: a revoked key stays readable (status `revoked`, its usage kept),
        // which this check takes for a deleted resource still served. And some inputs valid
        // by their schema are refused for what a schema cannot say (an `expires_at` in the
        // past, a cursor that is not one of the list's, a range older than the history
        // kept): their 400s are documented, with the field named.
        &[
            "--exclude-checks",
            "use_after_free,positive_data_acceptance",
        ],
    );
}

/// Found by schemathesis: probes and documents answered any method with 200.
#[test]
fn undocumented_methods_get_405_with_allow() {
    let gw = Gateway::start();
    for path in ["/healthz", "/readyz"] {
        let reply = read_reply(agent().delete(&gw.url(path)).call().unwrap());
        reply.assert_error(405, "METHOD_NOT_ALLOWED");
        assert_eq!(reply.header("allow"), Some("GET, HEAD"), "{path}");
        let head = read_reply(agent().head(&gw.url(path)).call().unwrap());
        assert_eq!(head.status, 200, "{path}");
    }
    let reply = read_reply(agent().get(&gw.url("/v1/audio")).call().unwrap());
    reply.assert_error(405, "METHOD_NOT_ALLOWED");
    assert_eq!(reply.header("allow"), Some("POST, OPTIONS"));
    for (path, allow) in [
        ("/admin/keys", "GET, POST"),
        ("/admin/keys/key_x", "GET, PATCH, DELETE"),
    ] {
        let reply = read_reply(
            agent()
                .put(&gw.admin_url(path))
                .header("Authorization", &format!("Bearer {ADMIN_TOKEN}"))
                .send("{}")
                .unwrap(),
        );
        reply.assert_error(405, "METHOD_NOT_ALLOWED");
        assert_eq!(reply.header("allow"), Some(allow), "{path}");
    }
}
