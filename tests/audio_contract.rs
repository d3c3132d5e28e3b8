//! `POST /v1/audio` against the real binary: one test per row of SPEC §2's check table, in
//! order, asserting status, code, body shape and headers.

mod common;

use std::time::Duration;

use common::{Gateway, agent, read_reply, test_catalog};
use serde_json::json;

const BODY: &str = r#"{"library":"audio.focus"}"#;

fn request(gw: &Gateway, method: &str, headers: &[(&str, &str)], body: &str) -> common::Reply {
    let mut req = http::Request::builder()
        .method(method)
        .uri(gw.url("/v1/audio"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    read_reply(agent().run(req.body(body.to_string()).unwrap()).unwrap())
}

#[test]
fn success_returns_a_track_with_a_signed_url() {
    let gw = Gateway::start();
    let reply = gw.post_audio(&gw.dev_key, BODY);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["code"], 0);
    assert_eq!(body["msg"], "ok");
    let data = body["data"].as_object().unwrap();
    assert_eq!(data.len(), 3, "{body}");
    let title = data["title"].as_str().unwrap();
    assert!(
        ["Deep Space Drift", "Quiet Circuits", "Über den Wolken"].contains(&title),
        "{title}"
    );
    assert!(data["duration_sec"].as_u64().unwrap() > 0);
    let url = data["url"].as_str().unwrap();
    assert!(url.starts_with("http://127.0.0.1:9/media/focus/"), "{url}");
    assert!(url.contains("X-Amz-Signature="), "{url}");
    // The development key is on the free plan: rate-limit fields are present.
    // The window is the length of this UTC month.
    let month = audiolib::quota::Period::containing(std::time::SystemTime::now());
    assert_eq!(
        reply.header("ratelimit-policy").map(str::to_string),
        Some(format!("\"monthly\";q=1000;w={}", month.window_secs()))
    );
    assert!(
        reply
            .header("ratelimit")
            .unwrap()
            .starts_with("\"monthly\";r=999;t=")
    );
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
}

#[test]
fn form_encoded_content_type_is_accepted() {
    // curl -d sends application/x-www-form-urlencoded.
    let gw = Gateway::start();
    let auth = format!("Bearer {}", gw.dev_key);
    let reply = request(
        &gw,
        "POST",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        BODY,
    );
    assert_eq!(reply.status, 200);
    let reply = request(&gw, "POST", &[("Authorization", &auth)], BODY);
    assert_eq!(reply.status, 200);
}

#[test]
fn row_1_options_is_a_cors_preflight_without_auth() {
    let gw = Gateway::start();
    let reply = request(
        &gw,
        "OPTIONS",
        &[
            ("Origin", "https://app.example.com"),
            ("Access-Control-Request-Method", "POST"),
        ],
        "",
    );
    assert_eq!(reply.status, 204);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        reply.header("access-control-allow-methods"),
        Some("POST, OPTIONS")
    );
    let allowed = reply.header("access-control-allow-headers").unwrap();
    assert!(allowed.contains("Authorization") && allowed.contains("Content-Type"));
}

#[test]
fn row_1_preflight_honours_the_configured_origins() {
    let gw = Gateway::builder()
        .env("AUDIOLIB_CORS_ORIGINS", "https://app.example.com")
        .start();
    let preflight = |origin: &str| {
        request(
            &gw,
            "OPTIONS",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
            ],
            "",
        )
    };
    let allowed = preflight("https://app.example.com");
    assert_eq!(allowed.status, 204);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(allowed.header("vary"), Some("Origin"));
    let other = preflight("https://evil.example.net");
    assert_eq!(other.status, 204);
    assert_eq!(other.header("access-control-allow-origin"), None);
    // Actual responses follow the same rule.
    let auth = format!("Bearer {}", gw.dev_key);
    let ok = request(
        &gw,
        "POST",
        &[
            ("Authorization", &auth),
            ("Origin", "https://app.example.com"),
        ],
        BODY,
    );
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let denied = request(
        &gw,
        "POST",
        &[
            ("Authorization", &auth),
            ("Origin", "https://evil.example.net"),
        ],
        BODY,
    );
    assert_eq!(denied.header("access-control-allow-origin"), None);
}

#[test]
fn row_2_other_methods_are_not_allowed() {
    let gw = Gateway::start();
    let auth = format!("Bearer {}", gw.dev_key);
    for method in ["GET", "PUT", "DELETE", "PATCH"] {
        let reply = request(&gw, method, &[("Authorization", &auth)], "");
        reply.assert_error(405, "METHOD_NOT_ALLOWED");
        assert_eq!(reply.header("allow"), Some("POST, OPTIONS"), "{method}");
        assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
    }
    // HEAD gets the status and headers without a body.
    let reply = request(&gw, "HEAD", &[("Authorization", &auth)], "");
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("POST, OPTIONS"));
}

#[test]
fn row_3_missing_or_malformed_authorization() {
    let gw = Gateway::start();
    let key = gw.dev_key.clone();
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("Authorization", String::new())],
        vec![("Authorization", "Bearer".into())],
        vec![("Authorization", "Bearer ".into())],
        vec![("Authorization", format!("Basic {key}"))],
        vec![("Authorization", key.clone())],
        vec![
            ("Authorization", format!("Bearer {key}")),
            ("Authorization", format!("Bearer {key}")),
        ],
    ];
    for headers in cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let reply = request(&gw, "POST", &h, BODY);
        reply.assert_error(401, "MISSING_AUTH");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"), "{h:?}");
    }
    // The scheme is case-insensitive.
    let lower = format!("bearer {key}");
    assert_eq!(
        request(&gw, "POST", &[("Authorization", &lower)], BODY).status,
        200
    );
}

#[test]
fn row_4_key_with_the_wrong_format() {
    let gw = Gateway::start();
    for token in [
        "alp_short",
        "alp_0123456789abcdefABCDEF01234567890",
        "xyz_0123456789abcdefABCDEF0123456789",
        "alp_0123456789abcdefABCDEF012345678!",
        "alp_your_api_key",
    ] {
        let reply = gw.post_audio(token, BODY);
        reply.assert_error(401, "INVALID_KEY_FORMAT");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
}

#[test]
fn row_5_unknown_inactive_or_revoked_key() {
    let gw = Gateway::start();
    let unknown = "alp_0123456789abcdefABCDEF0123456789";
    let reply = gw.post_audio(unknown, BODY);
    reply.assert_error(401, "INVALID_KEY");
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));

    let (id, key) = gw.create_key("free", None);
    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    let patch = gw.admin(
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"status": "disabled"})),
    );
    assert_eq!(patch.status, 200);
    gw.post_audio(&key, BODY).assert_error(401, "INVALID_KEY");
    let patch = gw.admin(
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"status": "active"})),
    );
    assert_eq!(patch.status, 200);
    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    assert_eq!(
        gw.admin("DELETE", &format!("/admin/keys/{id}"), None)
            .status,
        200
    );
    gw.post_audio(&key, BODY).assert_error(401, "INVALID_KEY");
}

#[test]
fn row_5_comes_before_the_body_checks() {
    let gw = Gateway::start();
    let unknown = "alp_0123456789abcdefABCDEF0123456789";
    gw.post_audio(unknown, "not json")
        .assert_error(401, "INVALID_KEY");
    gw.post_audio(unknown, &"x".repeat(20_000))
        .assert_error(401, "INVALID_KEY");
}

#[test]
fn row_6_body_over_the_limit() {
    let gw = Gateway::start();
    // 16 KiB exactly is fine (padding inside the object keeps it valid JSON).
    let pad = 16 * 1024 - r#"{"library":"audio.focus","p":""}"#.len();
    let exact = format!(r#"{{"library":"audio.focus","p":"{}"}}"#, "x".repeat(pad));
    assert_eq!(exact.len(), 16 * 1024);
    assert_eq!(gw.post_audio(&gw.dev_key, &exact).status, 200);
    let over = format!(
        r#"{{"library":"audio.focus","p":"{}"}}"#,
        "x".repeat(pad + 1)
    );
    gw.post_audio(&gw.dev_key, &over)
        .assert_error(413, "PAYLOAD_TOO_LARGE");
}

#[test]
fn row_6_limit_is_enforced_while_reading_without_a_length() {
    let gw = Gateway::builder()
        .env("AUDIOLIB_MAX_BODY_BYTES", "1024")
        .start();
    // Chunked, no Content-Length: 8 chunks of 200 bytes cross the limit mid-stream.
    let mut req = format!(
        "POST /v1/audio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
        gw.dev_key
    )
    .into_bytes();
    for _ in 0..8 {
        req.extend_from_slice(format!("c8\r\n{}\r\n", "x".repeat(200)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let answer = gw.raw(&req, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"code\":\"PAYLOAD_TOO_LARGE\""),
        "{answer}"
    );
}

#[test]
fn row_6_declared_length_over_the_limit_is_refused_before_the_body_arrives() {
    let gw = Gateway::start();
    // Announce 1 MB and send nothing: the answer must not wait for the body.
    let req = format!(
        "POST /v1/audio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 1000000\r\n\r\n",
        gw.dev_key
    );
    let answer = gw.raw(req.as_bytes(), Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

#[test]
fn row_7_body_is_not_a_json_object() {
    let gw = Gateway::start();
    for body in [
        "",
        "not json",
        "{\"library\":",
        "[\"audio.focus\"]",
        "\"audio.focus\"",
        "null",
        r#"{"library":"audio.focus","library":"audio.sleep"}"#,
        r#"{"library":"audio.focus"} extra"#,
        "library=audio.focus",
    ] {
        gw.post_audio(&gw.dev_key, body)
            .assert_error(400, "INVALID_JSON");
    }
}

#[test]
fn row_8_library_missing_null_not_a_string_or_empty() {
    let gw = Gateway::start();
    for body in [
        "{}",
        r#"{"library":null}"#,
        r#"{"library":42}"#,
        r#"{"library":["audio.focus"]}"#,
        r#"{"library":""}"#,
        r#"{"name":"audio.focus"}"#,
    ] {
        gw.post_audio(&gw.dev_key, body)
            .assert_error(400, "MISSING_LIBRARY");
    }
}

#[test]
fn row_9_unknown_library() {
    let gw = Gateway::start();
    let body = gw
        .post_audio(&gw.dev_key, r#"{"library":"audio.unknown"}"#)
        .assert_error(404, "LIBRARY_NOT_FOUND");
    assert_eq!(body["error"], "Library 'audio.unknown' not found");
    // Names are matched exactly.
    gw.post_audio(&gw.dev_key, r#"{"library":"Audio.Focus"}"#)
        .assert_error(404, "LIBRARY_NOT_FOUND");
}

#[test]
fn row_10_library_without_active_items() {
    let catalog = test_catalog();
    let gw = Gateway::builder()
        .env("AUDIOLIB_CATALOG_DIR", catalog.path().to_str().unwrap())
        .start();
    for lib in ["audio.empty", "audio.retired"] {
        gw.post_audio(&gw.dev_key, &format!(r#"{{"library":"{lib}"}}"#))
            .assert_error(404, "NO_AUDIO_ITEMS");
    }
}

#[test]
fn row_11_quota_exceeded() {
    let gw = Gateway::start();
    let (id, key) = gw.create_key("free", Some(Some(2)));
    for remaining in [1, 0] {
        let reply = gw.post_audio(&key, BODY);
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .header("ratelimit")
                .unwrap()
                .starts_with(&format!("\"monthly\";r={remaining};t="))
        );
    }
    let reply = gw.post_audio(&key, BODY);
    let body = reply.assert_error(429, "QUOTA_EXCEEDED");
    assert_eq!(body["limit"], 2);
    let reset_at = body["reset_at"].as_str().unwrap();
    assert!(
        reset_at.ends_with("-01T00:00:00Z") && reset_at.len() == 20,
        "{reset_at}"
    );
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=31 * 86_400).contains(&retry));
    assert!(
        reply
            .header("ratelimit")
            .unwrap()
            .starts_with("\"monthly\";r=0;t=")
    );
    assert!(
        reply
            .header("ratelimit-policy")
            .unwrap()
            .starts_with("\"monthly\";q=2;w=")
    );
    // Denied calls are not counted, so raising the limit takes effect at once.
    assert_eq!(gw.usage(&id), 2);
    let patch = gw.admin(
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"monthly_limit": 3})),
    );
    assert_eq!(patch.status, 200);
    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    gw.post_audio(&key, BODY)
        .assert_error(429, "QUOTA_EXCEEDED");
    assert_eq!(gw.usage(&id), 3);
}

#[test]
fn row_11_unlimited_keys_are_metered_without_rate_fields() {
    let gw = Gateway::start();
    let (id, key) = gw.create_key("unlimited", None);
    for _ in 0..3 {
        let reply = gw.post_audio(&key, BODY);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("ratelimit"), None);
        assert_eq!(reply.header("ratelimit-policy"), None);
    }
    assert_eq!(gw.usage(&id), 3);
}

#[test]
fn row_12_presign_failure_refunds_the_unit() {
    let gw = Gateway::builder()
        .env("AWS_ACCESS_KEY_ID", "")
        .env("AWS_SECRET_ACCESS_KEY", "")
        .start();
    let (id, key) = gw.create_key("free", Some(Some(5)));
    for _ in 0..3 {
        let reply = gw.post_audio(&key, BODY);
        reply.assert_error(503, "PRESIGN_FAILED");
        assert!(
            reply
                .header("ratelimit")
                .unwrap()
                .starts_with("\"monthly\";r=5;t=")
        );
    }
    assert_eq!(gw.usage(&id), 0);
    // Quota is checked first: an exhausted key hears 429, not 503.
    let patch = gw.admin(
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(json!({"monthly_limit": 0})),
    );
    assert_eq!(patch.status, 200);
    gw.post_audio(&key, BODY)
        .assert_error(429, "QUOTA_EXCEEDED");
}

#[test]
fn other_routes_without_an_upstream_are_not_found() {
    let gw = Gateway::start();
    for path in ["/", "/v1/audios", "/v2/audio", "/index.html?x=1"] {
        let reply = read_reply(agent().get(gw.url(path)).call().unwrap());
        reply.assert_error(404, "NOT_FOUND");
    }
    // With a trailing slash it is still the audio route (SPEC §7b), so GET is refused as such.
    let reply = read_reply(agent().get(gw.url("/v1/audio/")).call().unwrap());
    reply.assert_error(405, "METHOD_NOT_ALLOWED");
    let health = read_reply(agent().get(gw.url("/healthz")).call().unwrap());
    assert_eq!(
        (health.status, health.json()["status"].clone()),
        (200, json!("ok"))
    );
    let ready = read_reply(agent().get(gw.url("/readyz")).call().unwrap());
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");
}

#[test]
fn query_strings_do_not_change_the_route() {
    let gw = Gateway::start();
    let reply = read_reply(
        agent()
            .post(gw.url("/v1/audio?debug=1"))
            .header("Authorization", format!("Bearer {}", gw.dev_key))
            .send(BODY)
            .unwrap(),
    );
    assert_eq!(reply.status, 200);
}

#[test]
fn keep_alive_connections_serve_many_requests() {
    let gw = Gateway::start();
    let client = agent();
    for _ in 0..20 {
        let reply = read_reply(
            client
                .post(gw.url("/v1/audio"))
                .header("Authorization", format!("Bearer {}", gw.dev_key))
                .send(BODY)
                .unwrap(),
        );
        assert_eq!(reply.status, 200);
    }
}

#[test]
fn oversized_headers_get_431_not_a_5xx() {
    let gw = Gateway::start();
    let auth = format!("Bearer {}", gw.dev_key);
    let just_under = "a".repeat(15 * 1024);
    let reply = request(
        &gw,
        "POST",
        &[("Authorization", &auth), ("X-Pad", &just_under)],
        BODY,
    );
    assert_eq!(reply.status, 200);
    let over = "a".repeat(17 * 1024);
    for path in ["/v1/audio", "/elsewhere"] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {auth}\r\nX-Pad: {over}\r\nContent-Length: 0\r\n\r\n"
        );
        let answer = gw.raw(req.as_bytes(), Duration::from_secs(5));
        assert!(answer.starts_with("HTTP/1.1 431"), "{path}: {answer}");
        assert!(
            answer.contains("\"code\":\"HEADERS_TOO_LARGE\""),
            "{answer}"
        );
    }
    // Far beyond any limit the server itself refuses with a 4xx, never a 5xx.
    let huge = "a".repeat(2 * 1024 * 1024);
    let req = format!("GET /v1/audio HTTP/1.1\r\nHost: x\r\nX-Pad: {huge}\r\n\r\n");
    let answer = gw.raw(req.as_bytes(), Duration::from_secs(5));
    assert!(
        answer.starts_with("HTTP/1.1 4"),
        "{}",
        &answer[..answer.len().min(80)]
    );
}
