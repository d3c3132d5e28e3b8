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

/// A gateway started with `toml` as its configuration file, which lives as long as `dir`.
fn configured(dir: &tempfile::TempDir, toml: &str) -> Gateway {
    let conf = dir.path().join("gateway.toml");
    std::fs::write(&conf, toml).unwrap();
    Gateway::builder()
        .arg("--config")
        .arg(conf.to_str().unwrap())
        .start()
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
    assert_eq!(value("audiolib_access_log_dropped_total"), 0.0);
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
    assert_eq!(lines.len(), 3, "{lines:#?}");
    // Each request writes its line when it ends, so two requests close together may log in
    // either order: find each by its content.
    let line = |part: &str| {
        *lines
            .iter()
            .find(|l| l.contains(part))
            .unwrap_or_else(|| panic!("no line with {part:?} in {lines:#?}"))
    };
    let ok = line("POST /v1/audio 200 - ");
    assert!(ok.contains("us id="), "{ok}");
    assert!(ok.ends_with(&format!("key={}", &key[..8])), "{ok}");
    line("POST /v1/audio 404 LIBRARY_NOT_FOUND ");
    assert!(line("GET /elsewhere 404 NOT_FOUND ").ends_with("key=-"));
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
    let gw = configured(&dir, "[limits]\nheader_timeout_secs = 1\n");
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

#[test]
fn access_log_in_json_has_one_object_per_request_and_never_the_key() {
    let gw = Gateway::builder()
        .env("AUDIOLIB_LOG_FORMAT", "json")
        .start();
    let (_, key) = gw.create_key("free", None);
    assert_eq!(gw.post_audio(&key, BODY).status, 200);
    gw.post_audio(&key, r#"{"library":"audio.nope"}"#);
    read_reply(
        agent()
            .get(gw.url("/elsewhere?q=1"))
            .header("X-Request-Id", "trace-7")
            .call()
            .unwrap(),
    );
    let ours = |v: &serde_json::Value| v["path"] != "/healthz";
    let objects = || -> Vec<serde_json::Value> {
        gw.log_text()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .filter(ours)
            .collect()
    };
    wait_until("access lines", Duration::from_secs(5), || {
        objects().len() >= 3
    });
    let mut lines = objects();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    // Lines are written as requests end, in either order for two close together: sort them
    // into the order the requests were made.
    lines.sort_by_key(|l| match (l["status"].as_u64(), l["path"].as_str()) {
        (Some(200), _) => 0,
        (_, Some("/v1/audio")) => 1,
        _ => 2,
    });
    assert_eq!(lines[0]["method"], "POST");
    assert_eq!(lines[0]["path"], "/v1/audio");
    assert_eq!(lines[0]["status"], 200);
    assert!(lines[0]["code"].is_null());
    assert_eq!(lines[0]["key"], &key[..8]);
    assert!(lines[0]["latency_us"].as_u64().is_some());
    assert_eq!(lines[0]["request_id"].as_str().unwrap().len(), 32);
    assert!(lines[0]["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["code"], "LIBRARY_NOT_FOUND");
    assert_eq!(lines[2]["path"], "/elsewhere");
    assert_eq!(lines[2]["status"], 404);
    assert_eq!(lines[2]["request_id"], "trace-7");
    assert!(lines[2]["key"].is_null());
    let log = gw.log_text();
    assert!(!log.contains(&key), "the full key must never be logged");
    assert!(!log.contains(" access]"), "no text lines in json mode");
}

/// Writes `head` a byte every 50 ms (well inside the 1 s Pingora allows between reads) until
/// the gateway closes the connection; returns how many bytes went out and what came back.
fn dribble(mut slow: TcpStream, head: &[u8]) -> (usize, Vec<u8>) {
    let mut reader = slow.try_clone().unwrap();
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let closed = closed.clone();
        std::thread::spawn(move || {
            let mut answer = Vec::new();
            let _ = reader.read_to_end(&mut answer);
            closed.store(true, std::sync::atomic::Ordering::SeqCst);
            answer
        })
    };
    let mut sent = 0;
    for byte in head {
        if closed.load(std::sync::atomic::Ordering::SeqCst) || slow.write_all(&[*byte]).is_err() {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = slow.shutdown(std::net::Shutdown::Write);
    (sent, watcher.join().unwrap())
}

#[test]
fn a_head_dribbled_byte_by_byte_is_cut_at_the_whole_head_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let gw = configured(
        &dir,
        "[limits]\nheader_timeout_secs = 1\nkeepalive_secs = 1\n",
    );
    // A head that would take 15 s to finish.
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(270)
    );

    // On a new connection.
    let (sent, answer) = dribble(TcpStream::connect(gw.addr).unwrap(), head.as_bytes());
    assert!(sent < head.len(), "the whole head was accepted");
    assert!(
        answer.is_empty(),
        "no answer is owed: {:?}",
        String::from_utf8_lossy(&answer)
    );
    eprintln!("dribbled head cut after {sent} of {} bytes", head.len());

    // On a kept-alive connection, after a first request was served.
    let mut reused = TcpStream::connect(gw.addr).unwrap();
    reused
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reader = std::io::BufReader::new(reused.try_clone().unwrap());
    let first = common::read_raw_reply(&mut reader).expect("the first answer");
    assert_eq!(first.status, 200);
    let (sent, answer) = dribble(reused, head.as_bytes());
    assert!(
        sent < head.len(),
        "the whole head was accepted on a reused connection"
    );
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    eprintln!(
        "dribbled second head cut after {sent} of {} bytes",
        head.len()
    );

    // Others are served meanwhile and after.
    assert_eq!(gw.post_audio(&gw.dev_key, BODY).status, 200);
}

#[test]
fn an_idle_keep_alive_connection_closes_after_keepalive_secs_and_a_busy_one_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let gw = configured(&dir, "[limits]\nkeepalive_secs = 1\n");
    let conn = TcpStream::connect(gw.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());

    // Busy for three times the limit, a request every 0.4 s: never idle for a whole second,
    // so every request is answered on the same connection.
    for i in 0..8 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(400));
        }
        (&conn)
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let answer = common::read_raw_reply(&mut reader)
            .unwrap_or_else(|| panic!("request {i} on the kept-alive connection unanswered"));
        assert_eq!(answer.status, 200);
    }

    // Then idle: the gateway closes it after the limit, without a word.
    let idle_from = Instant::now();
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .expect("closed by the gateway, not by the read timeout");
    let idle = idle_from.elapsed();
    eprintln!("idle connection closed after {idle:?}");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(4),
        "closed after {idle:?} of idleness with keepalive_secs = 1"
    );
}

#[test]
fn connections_over_the_cap_are_closed_at_once() {
    let gw = Gateway::builder()
        .env("AUDIOLIB_MAX_CONNECTIONS", "2")
        .start();
    let open = || common::metric(&gw.metrics_text(), "audiolib_connections_open");
    wait_until("start-up probes to close", Duration::from_secs(5), || {
        open() == 0.0
    });
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(gw.addr).unwrap())
        .collect();
    wait_until("two open connections", Duration::from_secs(5), || {
        open() == 2.0
    });

    let mut third = gw.connect(Duration::from_secs(5));
    let _ = third.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    let _ = third.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    assert_eq!(
        common::metric(&gw.metrics_text(), "audiolib_connections_refused_total"),
        1.0
    );

    // A slot freed is a slot served.
    drop(idle);
    wait_until(
        "the idle connections to close",
        Duration::from_secs(5),
        || open() == 0.0,
    );
    assert_eq!(gw.post_audio(&gw.dev_key, BODY).status, 200);
}

#[test]
fn a_pending_head_is_never_buffered_past_max_header_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let gw = configured(&dir, "[limits]\nmax_header_bytes = 2048\n");
    // 3 KiB of head that never ends: without the budget Pingora would keep buffering (up to
    // 1 MiB) and wait for the rest; with it, the gateway answers 431 once 2 KiB are in.
    let mut s = gw.connect(Duration::from_secs(20));
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    for _ in 0..3 {
        let _ = s.write_all(format!("X-Pad: {}\r\n", "a".repeat(1014)).as_bytes());
    }
    let mut reader = std::io::BufReader::new(s);
    let reply = common::read_raw_reply(&mut reader).expect("an answer");
    assert_eq!(reply.status, 431);
    assert_eq!(reply.header("connection"), Some("close"));
    assert_eq!(
        reply.json(),
        serde_json::json!({"error": "Request headers are too large", "code": "HEADERS_TOO_LARGE"})
    );
    // A head within the budget is served as usual.
    let reply = read_reply(
        agent()
            .get(gw.url("/healthz"))
            .header("X-Pad", "a".repeat(1500))
            .call()
            .unwrap(),
    );
    assert_eq!(reply.status, 200);
}
