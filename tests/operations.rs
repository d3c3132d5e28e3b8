//! Operating the binary: signals, metrics, the access log and health (issue: drop-in gateway).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Gateway, agent, read_reply, wait_until};

const BODY: &str = r#"{"library":"audio.focus"}"#;

/// Starts a `/v1/audio` call whose body is not finished: a request in flight.
fn half_sent_request(gw: &Gateway) -> TcpStream {
    let mut s = gw.connect(Duration::from_secs(20));
    let head = format!(
        "POST /v1/audio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        gw.dev_key,
        BODY.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&BODY.as_bytes()[..5]).unwrap();
    s
}

fn wait_for_exit(gw: &mut Gateway, limit: Duration) -> Duration {
    let started = Instant::now();
    wait_until("the process to exit", limit, || gw.try_wait().is_some());
    started.elapsed()
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits() {
    let mut gw = Gateway::builder()
        .env("AUDIOLIB_SHUTDOWN_GRACE_SECS", "20")
        .start();
    let mut in_flight = half_sent_request(&gw);
    // The headers must have reached the gateway before the signal.
    std::thread::sleep(Duration::from_millis(100));
    gw.signal("TERM");
    wait_until("draining to start", Duration::from_secs(5), || {
        gw.log_text().contains("SIGTERM: draining 1 in-flight")
    });
    // No new connections once draining.
    wait_until("the listener to close", Duration::from_secs(5), || {
        TcpStream::connect(gw.addr).is_err()
    });
    // The in-flight request completes normally.
    in_flight.write_all(&BODY.as_bytes()[5..]).unwrap();
    let mut answer = String::new();
    in_flight.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // …and the process leaves well before the 20 s grace period.
    let took = wait_for_exit(&mut gw, Duration::from_secs(10));
    assert_eq!(gw.try_wait(), Some(0));
    eprintln!("exit {took:?} after the last request");
}

#[test]
fn sigterm_when_idle_exits_without_waiting_for_the_grace_period() {
    let mut gw = Gateway::builder()
        .env("AUDIOLIB_SHUTDOWN_GRACE_SECS", "30")
        .start();
    // An idle keep-alive connection must not hold the process.
    let client = agent();
    let reply = read_reply(client.get(gw.url("/healthz")).call().unwrap());
    assert_eq!(reply.status, 200);
    gw.signal("TERM");
    let took = wait_for_exit(&mut gw, Duration::from_secs(10));
    assert_eq!(gw.try_wait(), Some(0));
    eprintln!("idle SIGTERM exit took {took:?}");
}

#[test]
fn sigterm_gives_up_on_stuck_requests_after_the_grace_period() {
    let mut gw = Gateway::builder()
        .env("AUDIOLIB_SHUTDOWN_GRACE_SECS", "1")
        .start();
    let _stuck = half_sent_request(&gw);
    std::thread::sleep(Duration::from_millis(100));
    gw.signal("TERM");
    // Grace 1 s plus Pingora's 1 s runtime shutdown: bounded, not the 10 s body timeout.
    let took = wait_for_exit(&mut gw, Duration::from_secs(8));
    eprintln!("SIGTERM with a stuck request exit took {took:?}");
}

#[test]
fn sigint_exits_at_once_even_with_requests_in_flight() {
    let mut gw = Gateway::builder()
        .env("AUDIOLIB_SHUTDOWN_GRACE_SECS", "60")
        .start();
    let _in_flight = half_sent_request(&gw);
    std::thread::sleep(Duration::from_millis(100));
    gw.signal("INT");
    let took = wait_for_exit(&mut gw, Duration::from_secs(5));
    eprintln!("SIGINT exit took {took:?}");
}

#[test]
fn metrics_count_requests_cache_store_and_catalog() {
    let gw = Gateway::start();
    let (_, key) = gw.create_key("free", Some(Some(1)));
    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    assert_eq!(gw.post_audio(&key, BODY).status, 429);
    assert_eq!(
        gw.post_audio("alp_0123456789abcdefABCDEF0123456789", BODY)
            .status,
        401
    );
    let reply = read_reply(agent().get(gw.admin_url("/metrics")).call().unwrap());
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(reply.body).unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value(r#"audiolib_http_requests_total{code="ok",route="audio",status="200"}"#),
        1.0
    );
    assert_eq!(
        value(r#"audiolib_http_requests_total{code="QUOTA_EXCEEDED",route="audio",status="429"}"#),
        1.0
    );
    assert_eq!(
        value(r#"audiolib_http_requests_total{code="INVALID_KEY",route="audio",status="401"}"#),
        1.0
    );
    assert_eq!(value("audiolib_quota_denials_total"), 1.0);
    assert_eq!(
        value(r#"audiolib_http_request_duration_seconds_count{route="audio"}"#),
        3.0
    );
    assert_eq!(
        value(r#"audiolib_store_operation_duration_seconds_count{op="reserve"}"#),
        2.0
    );
    assert_eq!(
        value(r#"audiolib_key_cache_lookups_total{result="hit"}"#),
        1.0
    );
    assert_eq!(
        value(r#"audiolib_key_cache_lookups_total{result="miss"}"#),
        2.0
    );
    assert_eq!(value("audiolib_catalog_version"), 1.0);
    assert_eq!(value("audiolib_catalog_load_errors_total"), 0.0);
    // Metrics never name a key.
    assert!(!text.contains(&key) && !text.contains(&key[..8]));
}

#[test]
fn access_log_has_one_line_per_request_and_never_the_key() {
    let gw = Gateway::start();
    let (_, key) = gw.create_key("free", None);
    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    gw.post_audio(&key, r#"{"library":"audio.nope"}"#);
    read_reply(agent().get(gw.url("/elsewhere")).call().unwrap());
    let ours = |l: &&str| l.contains(" access]") && !l.contains(" /healthz ");
    wait_until("access lines", Duration::from_secs(5), || {
        gw.log_text().lines().filter(ours).count() >= 3
    });
    let log = gw.log_text();
    let lines: Vec<&str> = log.lines().filter(ours).collect();
    assert!(lines[0].contains("POST /v1/audio 200 - "), "{}", lines[0]);
    assert!(
        lines[0].ends_with(&format!("key={}", &key[..8])),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("POST /v1/audio 404 LIBRARY_NOT_FOUND "),
        "{}",
        lines[1]
    );
    assert!(lines[2].contains("GET /elsewhere 404 NOT_FOUND ") && lines[2].ends_with("key=-"));
    assert!(!log.contains(&key), "the full key must never be logged");
}

#[test]
fn access_log_can_be_switched_off() {
    let gw = Gateway::builder()
        .env("RUST_LOG", "info,access=off")
        .start();
    assert_eq!(gw.post_audio(&gw.dev_key, BODY).status, 200);
    // A later line proves the log is flowing.
    gw.signal("HUP");
    wait_until("the reload line", Duration::from_secs(5), || {
        gw.log_text().contains("catalog reloaded")
    });
    assert!(!gw.log_text().contains(" access]"));
}

#[test]
fn readiness_reports_catalog_and_store() {
    let gw = Gateway::start();
    let reply = read_reply(agent().get(gw.url("/readyz")).call().unwrap());
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["catalog_version"], 1);
    assert_eq!(body["store"], "ok");
}

#[test]
fn slow_request_heads_are_cut_off_without_slowing_others() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("gateway.toml");
    std::fs::write(&conf, "[limits]\nheader_timeout_secs = 1\n").unwrap();
    let gw = Gateway::builder()
        .arg("--config")
        .arg(conf.to_str().unwrap())
        .start();
    let mut slow = TcpStream::connect(gw.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"POST /v1/audio HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    // A well-behaved client on another connection is served meanwhile.
    assert_eq!(gw.post_audio(&gw.dev_key, BODY).status, 200);
    let mut rest = Vec::new();
    let n = slow.read_to_end(&mut rest).unwrap_or(0);
    let took = started.elapsed();
    assert_eq!(
        n,
        0,
        "no answer is owed: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(took < Duration::from_secs(5), "cut off after {took:?}");
    eprintln!("slow head cut off after {took:?}");
}
