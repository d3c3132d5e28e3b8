//! Passthrough (issue: drop-in gateway): everything that is not ours reaches the upstream
//! unchanged and streams both ways, over plain TCP and TLS, against a real origin process.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use common::{Gateway, Upstream, agent, free_port, read_reply, wait_until};
use serde_json::Value;

fn gateway_for(up: &Upstream) -> Gateway {
    let mut b = Gateway::builder().env("AUDIOLIB_UPSTREAM", up.address());
    if let Some(ca) = &up.ca_file {
        b = b.env("AUDIOLIB_UPSTREAM_CA_FILE", ca.to_str().unwrap());
    }
    b.start()
}

fn header<'a>(report: &'a Value, name: &str) -> Vec<&'a str> {
    report["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|h| h[1].as_str().unwrap())
        .collect()
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 7 + 3) % 251) as u8).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn requests_pass_unchanged(up: &Upstream) {
    let gw = gateway_for(up);
    let target = "/some/path%20x/?q=a%2Bb&empty=&dup=1&dup=2";
    let reply = read_reply(
        agent()
            .get(gw.url(target))
            .header("X-Custom", "kept as is")
            .header("Authorization", "Bearer not-ours")
            .header("Cookie", "session=abc")
            .call()
            .unwrap(),
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-upstream"), Some("yes"));
    let report = reply.json();
    assert_eq!(report["method"], "GET");
    assert_eq!(report["target"], target);
    assert_eq!(header(&report, "x-custom"), ["kept as is"]);
    assert_eq!(header(&report, "authorization"), ["Bearer not-ours"]);
    assert_eq!(header(&report, "cookie"), ["session=abc"]);
    assert_eq!(header(&report, "host"), [gw.addr.to_string()]);

    // Bodies both ways, larger than any buffer, byte for byte.
    let upload = pattern(3 * 1024 * 1024 + 17);
    let reply = read_reply(
        agent()
            .put(gw.url("/upload-target"))
            .header("Content-Type", "application/octet-stream")
            .send(&upload[..])
            .unwrap(),
    );
    assert_eq!(reply.status, 201, "the upstream's status passes through");
    let report = reply.json();
    assert_eq!(report["method"], "PUT");
    assert_eq!(report["body_len"], upload.len());
    assert_eq!(report["body_sha256"], sha256_hex(&upload));

    let n = 5 * 1024 * 1024 + 3;
    let reply = read_reply(agent().get(gw.url(&format!("/bytes/{n}"))).call().unwrap());
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), n);
    assert!(reply.body == pattern(n));

    for method in ["POST", "DELETE", "PATCH", "OPTIONS"] {
        let req = http::Request::builder()
            .method(method)
            .uri(gw.url("/api/other"))
            .body("x=1".to_string())
            .unwrap();
        let reply = read_reply(agent().run(req).unwrap());
        assert_eq!(reply.json()["method"], method);
        assert_eq!(reply.json()["body_len"], 3);
    }

    // Our own routes are still ours.
    let reply = gw.post_audio(&gw.dev_key, r#"{"library":"audio.focus"}"#);
    assert_eq!((reply.status, reply.header("x-upstream")), (200, None));
    let health = read_reply(agent().get(gw.url("/healthz")).call().unwrap());
    assert_eq!((health.status, health.header("x-upstream")), (200, None));
}

#[test]
fn plain_upstream_receives_requests_unchanged() {
    requests_pass_unchanged(&Upstream::start(false));
}

#[test]
fn tls_upstream_receives_requests_unchanged() {
    requests_pass_unchanged(&Upstream::start(true));
}

#[test]
fn host_header_can_be_set_for_the_upstream() {
    let up = Upstream::start(true);
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", up.address())
        .env(
            "AUDIOLIB_UPSTREAM_CA_FILE",
            up.ca_file.as_ref().unwrap().to_str().unwrap(),
        )
        .env("AUDIOLIB_UPSTREAM_HOST", "cdn.example.com")
        .env("AUDIOLIB_H2C", "true")
        .start();
    let report = read_reply(agent().get(gw.url("/x")).call().unwrap()).json();
    assert_eq!(header(&report, "host"), ["cdn.example.com"]);

    // Over HTTP/2, where Pingora makes a `Host` from the request's authority.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--http2-prior-knowledge"])
        .arg(gw.url("/x"))
        .output()
        .expect("curl");
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(header(&report, "host"), ["cdn.example.com"]);
}

#[test]
fn tls_upstream_with_an_untrusted_certificate_is_a_bad_gateway() {
    let up = Upstream::start(true);
    // No CA file: the system roots do not know the test CA.
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", up.address())
        .start();
    let reply = read_reply(agent().get(gw.url("/x")).call().unwrap());
    reply.assert_error(502, "BAD_GATEWAY");
}

#[test]
fn responses_stream_before_the_upstream_finishes() {
    let up = Upstream::start(false);
    let gw = gateway_for(&up);
    let mut stream = gw.connect(Duration::from_secs(10));
    stream
        .write_all(b"GET /gate/r1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut seen = String::new();
    // The upstream holds "second" back until released; "first;" must already be here.
    read_until(&mut reader, &mut seen, "first;");
    assert!(!seen.contains("second"));
    assert_eq!(up.get("/open/r1").status, 200);
    read_until(&mut reader, &mut seen, "second");
}

/// Reads lines into `seen` until it contains `needle`.
fn read_until(reader: &mut impl BufRead, seen: &mut String, needle: &str) {
    while !seen.contains(needle) {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "closed early: {seen}"
        );
        seen.push_str(&line);
    }
}

#[test]
fn request_bodies_stream_before_the_client_finishes() {
    let up = Upstream::start(false);
    let gw = gateway_for(&up);
    let mut stream = gw.connect(Duration::from_secs(10));
    stream
        .write_all(
            b"POST /upload/u1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .unwrap();
    // The upstream sees the first chunk while the client has not sent the rest.
    wait_until(
        "first chunk at the upstream",
        Duration::from_secs(10),
        || {
            up.get("/seen")
                .json()
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e == "u1:first")
        },
    );
    stream.write_all(b"6\r\n world\r\n0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("body_sha256") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0);
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("\"body_len\": 11"), "{text}");
}

#[test]
fn upstream_down_is_a_quick_bad_gateway() {
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", format!("127.0.0.1:{}", free_port()))
        .start();
    let reply = read_reply(agent().get(gw.url("/anything")).call().unwrap());
    reply.assert_error(502, "BAD_GATEWAY");
    // The gateway's own routes do not depend on the upstream.
    assert_eq!(
        gw.post_audio(&gw.dev_key, r#"{"library":"audio.focus"}"#)
            .status,
        200
    );
}

#[test]
fn upstream_given_by_host_name_is_resolved_off_the_request_path() {
    let up = Upstream::start(false);
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", format!("localhost:{}", up.port))
        .start();
    for _ in 0..3 {
        let reply = read_reply(agent().get(gw.url("/by-name")).call().unwrap());
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["target"], "/by-name");
    }
    // Looked up once at start (before the first request), not per request.
    let log = gw.log_text();
    let resolved = format!("upstream localhost:{} resolved to", up.port);
    assert_eq!(log.matches(&resolved).count(), 1, "{log}");
}

#[test]
fn upstream_name_that_does_not_resolve_is_a_bad_gateway_not_a_panic() {
    let gw = Gateway::builder()
        .env("AUDIOLIB_UPSTREAM", "no-such-host.invalid:8000")
        .start();
    for _ in 0..3 {
        let reply = read_reply(agent().get(gw.url("/anything")).call().unwrap());
        let body = reply.assert_error(502, "BAD_GATEWAY");
        assert_eq!(body["error"], "The upstream could not be reached");
    }
    // Our own routes are unaffected.
    assert_eq!(
        gw.post_audio(&gw.dev_key, r#"{"library":"audio.focus"}"#)
            .status,
        200
    );
    let log = gw.log_text();
    assert!(
        log.contains("no-such-host.invalid:8000 does not resolve"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn pipelined_requests_are_all_answered_in_order() {
    let up = Upstream::start(false);
    let gw = gateway_for(&up);
    let body = r#"{"library":"audio.focus"}"#;
    let mut requests = Vec::new();
    for i in 0..100 {
        let request = match i % 3 {
            0 => "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            1 => format!(
                "POST /v1/audio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                gw.dev_key,
                body.len()
            ),
            _ => format!("GET /p/{i} HTTP/1.1\r\nHost: x\r\n\r\n"),
        };
        requests.extend_from_slice(request.as_bytes());
    }
    let mut stream = gw.connect(Duration::from_secs(10));
    // All 100 in one write, before reading any answer.
    stream.write_all(&requests).unwrap();
    let mut reader = BufReader::new(stream);
    for i in 0..100 {
        let reply = common::read_raw_reply(&mut reader)
            .unwrap_or_else(|| panic!("connection closed before answer {i}"));
        assert_eq!(reply.status, 200, "answer {i}");
        let v = reply.json();
        match i % 3 {
            0 => assert_eq!(v["status"], "ok", "answer {i}"),
            1 => assert_eq!(v["code"], 0, "answer {i}: {v}"),
            _ => assert_eq!(v["target"], format!("/p/{i}"), "answer {i}"),
        }
    }
}

/// Header names reach the origin as Pingora writes them for any HTTP/2 client: a dozen common
/// ones in their usual case (`Content-Type`), the rest in lower case (the gateway adds its
/// headers without the map that would keep the client's case, see `headers`); values, order
/// and repeats are kept, as are the target byte for byte and the origin's reason phrase. The
/// client's `Connection` is hop-by-hop and not forwarded.
#[test]
fn header_names_are_sent_in_the_usual_case_and_everything_else_as_it_came() {
    let up = Upstream::start(false);
    let gw = gateway_for(&up);
    let target = "/case/%7Eodd?b=2&a=1";
    let request = format!(
        "GET {target} HTTP/1.1\r\nHOST: {}\r\ncontent-TYPE: text/plain\r\nX-Custom-Thing: 1\r\n\
         ACCEPT: */*\r\nx-custom-thing: 2\r\nConnection: close\r\n\r\n",
        gw.addr
    );
    let reply = gw.raw(request.as_bytes(), Duration::from_secs(10));
    let body = &reply[reply.find("\r\n\r\n").expect("a whole answer") + 4..];
    let report: Value = serde_json::from_str(body).unwrap();
    assert_eq!(report["target"], target);
    let seen: Vec<(&str, &str)> = report["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h[0].as_str().unwrap(), h[1].as_str().unwrap()))
        .filter(|(name, _)| !name.starts_with("x-request-id") && !name.starts_with("x-forwarded"))
        .collect();
    let host = gw.addr.to_string();
    assert_eq!(
        seen,
        [
            ("Host", host.as_str()),
            ("Content-Type", "text/plain"),
            ("x-custom-thing", "1"),
            ("x-custom-thing", "2"),
            ("accept", "*/*"),
        ]
    );

    let reply = gw.raw(
        b"GET /reason HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert!(reply.starts_with("HTTP/1.1 200 Fine By Me\r\n"), "{reply}");
    assert!(reply.contains("\r\nx-mixed-case: kept\r\n"), "{reply}");
    assert!(reply.contains("\r\nx-request-id: "), "{reply}");
}
