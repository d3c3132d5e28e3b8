//! The front door for real traffic (SPEC §7b, issue 9), on raw connections to the real binary:
//! connection reuse, route spellings, request targets, request ids and forwarding headers.

mod common;

use std::io::{BufReader, Read, Write};
use std::time::Duration;

use common::{Gateway, Upstream, read_raw_reply};

const BODY: &str = r#"{"library":"audio.focus"}"#;

/// Sends `request` then a pipelined `GET /healthz`; returns the answers read until close.
fn answers_on_one_connection(gw: &Gateway, request: &str) -> Vec<common::RawReply> {
    let mut stream = gw.connect(Duration::from_secs(10));
    stream.write_all(request.as_bytes()).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    std::iter::from_fn(|| read_raw_reply(&mut reader)).collect()
}

#[test]
fn a_request_with_content_length_and_transfer_encoding_closes_its_connection() {
    let up = Upstream::start(false);
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", up.address())
        .start();
    let chunked = format!("{:x}\r\n{BODY}\r\n0\r\n\r\n", BODY.len());
    for (target, auth) in [
        (
            "/v1/audio",
            format!("Authorization: Bearer {}\r\n", gw.dev_key),
        ),
        ("/elsewhere", String::new()),
    ] {
        let request = format!(
            "POST {target} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 3\r\n\
             Transfer-Encoding: chunked\r\n\r\n{chunked}"
        );
        let answers = answers_on_one_connection(&gw, &request);
        // The body was read whole (chunked wins, RFC 9112 §6.3), then the connection closed:
        // the pipelined request behind it is never parsed from a possibly smuggled body.
        assert_eq!(answers.len(), 1, "{target}: {answers:?}");
        assert_eq!(answers[0].status, 200, "{target}: {answers:?}");
        assert_eq!(answers[0].header("connection"), Some("close"), "{target}");
    }
    // Without the conflict the same connection serves the next request.
    let request = format!(
        "POST /v1/audio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{chunked}",
        gw.dev_key
    );
    let answers = answers_on_one_connection_until(&gw, &request, 2);
    assert_eq!(answers[0].header("connection"), Some("keep-alive"));
    assert_eq!(answers[1].json()["status"], "ok");
}

/// Like [`answers_on_one_connection`] but stops after `n` answers (a kept-alive connection
/// does not close by itself).
fn answers_on_one_connection_until(gw: &Gateway, request: &str, n: usize) -> Vec<common::RawReply> {
    let mut stream = gw.connect(Duration::from_secs(10));
    stream.write_all(request.as_bytes()).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    (0..n)
        .map(|i| read_raw_reply(&mut reader).unwrap_or_else(|| panic!("no answer {i}")))
        .collect()
}

#[test]
fn http_1_0_without_keep_alive_is_closed_after_the_answer() {
    let gw = Gateway::start();
    let mut stream = gw.connect(Duration::from_secs(10));
    stream.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    // read_to_string returns only once the gateway closes the connection.
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
}

#[test]
fn a_request_refused_before_its_body_is_read_closes_its_connection() {
    let gw = Gateway::start();
    let request = format!(
        "POST /v1/audio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alp_nope\r\n\
         Content-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let answers = answers_on_one_connection(&gw, &request);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].status, 401);
    assert_eq!(answers[0].header("connection"), Some("close"));
}

/// One request on a fresh connection; its answer.
fn exchange(gw: &Gateway, request: &[u8]) -> common::RawReply {
    let mut stream = gw.connect(Duration::from_secs(10));
    stream.write_all(request).unwrap();
    read_raw_reply(&mut BufReader::new(stream)).expect("an answer")
}

fn audio_request(target: &str, key: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    )
    .into_bytes()
}

#[test]
fn every_spelling_of_the_audio_route_is_answered_by_the_gateway() {
    let up = Upstream::start(false);
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", up.address())
        .start();
    for target in [
        "/v1/audio",
        "/v1/audio/",
        "//v1/audio",
        "/v1/%61udio",
        "/v1/./audio",
        "/x/../v1/audio",
        "/v1/audio?x=1",
    ] {
        let reply = exchange(&gw, &audio_request(target, &gw.dev_key));
        assert_eq!(reply.header("x-upstream"), None, "{target} was forwarded");
        assert_eq!(reply.status, 200, "{target}");
        assert_eq!(reply.json()["code"], 0, "{target}");
        // A refusal is ours too, in the JSON shape.
        let reply = exchange(&gw, &audio_request(target, "alp_nope"));
        assert_eq!(reply.header("x-upstream"), None, "{target} was forwarded");
        assert_eq!(reply.status, 401, "{target}");
        assert_eq!(reply.json()["code"], "INVALID_KEY_FORMAT", "{target}");
    }
    // Near misses are not ours: they pass through exactly as sent.
    for target in ["/v1/audios", "/v1/audio/x", "/v1%2Faudio"] {
        let reply = exchange(&gw, &audio_request(target, "alp_nope"));
        assert_eq!(reply.header("x-upstream"), Some("yes"), "{target}");
        assert_eq!(reply.json()["target"], target);
    }
}

#[test]
fn request_targets_with_control_characters_are_refused_not_forwarded() {
    let up = Upstream::start(false);
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", up.address())
        .start();
    let mut targets: Vec<Vec<u8>> = Vec::new();
    for byte in [0x00u8, 0x01, 0x09, 0x0d, 0x1b, 0x1f, 0x7f] {
        targets.push([&b"/p/a"[..], &[byte], b"b"].concat());
        targets.push([&b"/p?q=a"[..], &[byte], b"b"].concat());
        targets.push([&b"/v1/audio"[..], &[byte]].concat());
    }
    for encoded in ["%00", "%0a", "%0D", "%0d%0aX-Injected:%20yes", "%1F", "%7f"] {
        targets.push(format!("/p/a{encoded}b").into_bytes());
        targets.push(format!("/p?q={encoded}").into_bytes());
    }
    for target in &targets {
        let request = [&b"GET "[..], target, b" HTTP/1.1\r\nHost: x\r\n\r\n"].concat();
        let reply = exchange(&gw, &request);
        let shown = target.escape_ascii().to_string();
        assert_eq!(reply.header("x-upstream"), None, "{shown} was forwarded");
        assert_eq!(reply.status, 400, "{shown}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{shown}"
        );
        assert_eq!(
            reply.json(),
            serde_json::json!({"error": "Malformed HTTP request", "code": "BAD_REQUEST"}),
            "{shown}"
        );
    }
    // A raw LF ends the request line early: Pingora's parser refuses it (400, no body)
    // before any filter runs. Never forwarded either.
    let reply = exchange(&gw, b"GET /p/a\nb HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((reply.status, reply.header("x-upstream")), (400, None));
    // Encoded characters that are not controls still pass.
    let reply = exchange(&gw, b"GET /p/a%20b?q=%7E HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(reply.header("x-upstream"), Some("yes"));
    assert_eq!(reply.json()["target"], "/p/a%20b?q=%7E");
}

#[test]
fn secrets_never_reach_the_log() {
    const PASSWORD: &str = "RedisPw-0123456789-secret";
    let redis = common::RedisServer::start_with(&[
        "--user",
        "gw",
        "on",
        &format!(">{PASSWORD}"),
        "~*",
        "&*",
        "+@all",
    ]);
    let url = format!("redis://gw:{PASSWORD}@127.0.0.1:{}", redis.port);
    let gw = Gateway::builder()
        .env("AUDIOLIB_REDIS_URL", url)
        .env("RUST_LOG", "debug")
        .start();
    let (_, key) = gw.create_key("free", None);
    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    let shown = format!(
        "subscribed to key invalidations on redis://gw:***@127.0.0.1:{}",
        redis.port
    );
    common::wait_until("the subscription line", Duration::from_secs(10), || {
        gw.log_text().contains(&shown)
    });
    let log = gw.log_text();
    for secret in [PASSWORD, common::ADMIN_TOKEN, "test-secret", &key] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[test]
fn secrets_never_reach_start_up_errors() {
    let (ok, _, err) = common::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_audiolib"))
            .arg("serve")
            .env_clear()
            .env(
                "AUDIOLIB_REDIS_URL",
                "http://gw:LeakedPw-secret@127.0.0.1:1",
            )
            .env("AUDIOLIB_ADMIN_TOKEN", "short-Token"),
    );
    assert!(!ok);
    assert!(
        err.contains("'http://gw:***@127.0.0.1:1' is not a redis://"),
        "{err}"
    );
    assert!(
        err.contains("`admin_token` (AUDIOLIB_ADMIN_TOKEN)"),
        "{err}"
    );
    assert!(
        !err.contains("LeakedPw-secret") && !err.contains("short-Token"),
        "{err}"
    );
}

/// The values of `name` the python upstream reports having received.
fn upstream_saw(report: &serde_json::Value, name: &str) -> Vec<String> {
    report["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|h| h[1].as_str().unwrap().to_string())
        .collect()
}

fn is_generated(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[test]
fn request_ids_are_kept_or_generated_answered_forwarded_and_logged() {
    let up = Upstream::start(false);
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", up.address())
        .start();
    let get = |path: &str, id: Option<&str>| {
        let mut req = common::agent().get(gw.url(path));
        if let Some(id) = id {
            req = req.header("X-Request-Id", id);
        }
        common::read_reply(req.call().unwrap())
    };

    // Kept, on our answers and on passthrough (to the upstream and back).
    let reply = get("/p", Some("trace-01.A_b"));
    assert_eq!(reply.header("x-request-id"), Some("trace-01.A_b"));
    assert_eq!(
        upstream_saw(&reply.json(), "x-request-id"),
        ["trace-01.A_b"]
    );
    assert_eq!(
        get("/healthz", Some("h-1")).header("x-request-id"),
        Some("h-1")
    );

    // Replaced when not acceptable: the upstream sees the same new id as the client.
    let too_long = "a".repeat(129);
    for bad in ["has space", "a/b", too_long.as_str(), "ü"] {
        let reply = get("/p", Some(bad));
        let id = reply.header("x-request-id").unwrap().to_string();
        assert!(is_generated(&id), "{bad:?} → {id}");
        assert_eq!(upstream_saw(&reply.json(), "x-request-id"), [id]);
    }
    let max = "b".repeat(128);
    assert_eq!(
        get("/p", Some(&max)).header("x-request-id"),
        Some(max.as_str())
    );

    // Generated on every kind of answer, each its own.
    let a = get("/healthz", None)
        .header("x-request-id")
        .unwrap()
        .to_string();
    let b = get("/healthz", None)
        .header("x-request-id")
        .unwrap()
        .to_string();
    assert!(is_generated(&a) && is_generated(&b) && a != b);
    let audio = gw.post_audio(&gw.dev_key, BODY);
    assert!(is_generated(audio.header("x-request-id").unwrap()));
    let refused = gw.post_audio("alp_nope", BODY);
    assert!(is_generated(refused.header("x-request-id").unwrap()));
    let bad_target = exchange(&gw, b"GET /p%00 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(is_generated(bad_target.header("x-request-id").unwrap()));
    drop(up);
    let down = get("/p", Some("down-1"));
    down.assert_error(502, "BAD_GATEWAY");
    assert_eq!(down.header("x-request-id"), Some("down-1"));

    // And in the access log.
    common::wait_until("the access line", Duration::from_secs(5), || {
        gw.log_text().contains("GET /p 502 BAD_GATEWAY")
    });
    let log = gw.log_text();
    let line = log.lines().find(|l| l.contains("GET /p 502")).unwrap();
    assert!(line.contains(" id=down-1 key=-"), "{line}");
}

/// What the upstream saw of the forwarding headers for one passthrough request.
fn forwarded(gw: &Gateway, headers: &[(&str, &str)]) -> serde_json::Value {
    let mut req = common::agent().get(gw.url("/fwd"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let report = common::read_reply(req.call().unwrap()).json();
    serde_json::json!({
        "for": upstream_saw(&report, "x-forwarded-for"),
        "proto": upstream_saw(&report, "x-forwarded-proto"),
        "host": upstream_saw(&report, "x-forwarded-host"),
    })
}

#[test]
fn forwarding_headers_are_set_and_trusted_only_from_trusted_proxies() {
    let up = Upstream::start(false);
    let forged = [
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "app.example"),
    ];
    // Default: nobody is trusted; what the client sent is replaced.
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", up.address())
        .start();
    let ours = serde_json::json!({"for": ["127.0.0.1"], "proto": ["http"], "host": []});
    assert_eq!(forwarded(&gw, &forged), ours);
    assert_eq!(forwarded(&gw, &[]), ours);
    drop(gw);

    // Loopback trusted: the chain is appended to, the proto kept.
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", up.address())
        .env("AUDIOLIB_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1")
        .start();
    assert_eq!(
        forwarded(&gw, &forged),
        serde_json::json!({
            "for": ["1.2.3.4, 127.0.0.1"], "proto": ["https"], "host": ["app.example"]
        })
    );
    assert_eq!(forwarded(&gw, &[]), ours);
    drop(gw);

    // Trusting someone else does not trust us.
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", up.address())
        .env("AUDIOLIB_TRUSTED_PROXIES", "10.0.0.0/8")
        .start();
    assert_eq!(forwarded(&gw, &forged), ours);
}
