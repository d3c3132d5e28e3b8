//! TLS and HTTP/2 on the public listener (SPEC §7b), against the real binary: HTTPS with a CA
//! made at test time, ALPN `h2` and `http/1.1`, h2c with prior knowledge, the check table of
//! SPEC §2 over HTTP/2, certificates replaced on disk while a connection stays open, and
//! every bad TLS setting refused by name.

mod common;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{Gateway, RawReply, Upstream, make_certificates, read_raw_reply, test_catalog};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;

const BODY: &str = r#"{"library":"audio.focus"}"#;

/// A CA and a certificate for 127.0.0.1 signed by it, in a directory of their own.
struct Pair {
    dir: tempfile::TempDir,
}

impl Pair {
    fn new() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        make_certificates(dir.path());
        Pair { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }

    fn leaf_der(&self) -> Vec<u8> {
        CertificateDer::from_pem_file(self.path("leaf.pem"))
            .unwrap()
            .to_vec()
    }

    /// Puts this pair at `cert` and `key`, each renamed into place as deployment tools do.
    fn install(&self, cert: &Path, key: &Path) {
        for (from, to) in [("leaf.key", key), ("leaf.pem", cert)] {
            let tmp = to.with_extension("partial");
            std::fs::copy(self.path(from), &tmp).unwrap();
            std::fs::rename(&tmp, to).unwrap();
        }
    }
}

/// A gateway serving HTTPS from `cert` and `key`.
fn https_gateway(cert: &Path, key: &Path) -> common::GatewayBuilder {
    Gateway::builder()
        .env("AUDIOLIB_TLS_CERT", cert.to_str().unwrap())
        .env("AUDIOLIB_TLS_KEY", key.to_str().unwrap())
}

type TlsConn = BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

/// A client trusting `cas`, offering only HTTP/1.1 (so raw requests can be written).
fn client_config(cas: &[PathBuf]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(CertificateDer::from_pem_file(ca).unwrap())
            .unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection with the handshake done (the certificate verified against the CAs).
fn tls_connect(gw: &Gateway, config: &Arc<rustls::ClientConfig>) -> TlsConn {
    let tcp = gw.connect(Duration::from_secs(10));
    let conn =
        rustls::ClientConnection::new(config.clone(), "127.0.0.1".try_into().unwrap()).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("TLS handshake");
    }
    BufReader::new(stream)
}

fn served_certificate(conn: &TlsConn) -> Vec<u8> {
    conn.get_ref().conn.peer_certificates().unwrap()[0].to_vec()
}

fn send(conn: &mut TlsConn, request: &str) -> RawReply {
    conn.get_mut().write_all(request.as_bytes()).unwrap();
    conn.get_mut().flush().unwrap();
    read_raw_reply(conn).expect("an answer on the TLS connection")
}

fn get(conn: &mut TlsConn, path: &str) -> RawReply {
    send(conn, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
}

fn post_audio(conn: &mut TlsConn, key: &str) -> RawReply {
    send(
        conn,
        &format!(
            "POST /v1/audio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Length: {}\r\n\r\n{BODY}",
            BODY.len()
        ),
    )
}

/// One answer as curl saw it.
#[derive(Debug)]
struct Answer {
    /// `2` for HTTP/2, `1.1` for HTTP/1.1.
    version: String,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts the error shape of SPEC §2 and returns the body.
    fn error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        assert_eq!(body["code"], code, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
        body
    }
}

/// How curl reaches a gateway: the base URL and the flags choosing the protocol.
struct Curl {
    base: String,
    flags: Vec<String>,
}

impl Curl {
    /// HTTP/2 negotiated by ALPN over TLS.
    fn h2_tls(gw: &Gateway, ca: &Path) -> Curl {
        Curl {
            base: format!("https://{}", gw.addr),
            flags: vec![
                "--http2".into(),
                "--cacert".into(),
                ca.to_str().unwrap().into(),
            ],
        }
    }

    /// HTTP/2 with prior knowledge on a plain listener.
    fn h2c(gw: &Gateway) -> Curl {
        Curl {
            base: format!("http://{}", gw.addr),
            flags: vec!["--http2-prior-knowledge".into()],
        }
    }

    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "-i",
            "--max-time",
            "20",
            "-H",
            "Expect:",
            "-X",
            method,
        ])
        .args(&self.flags);
        for (name, value) in headers {
            cmd.arg("-H").arg(format!("{name}: {value}"));
        }
        if !body.is_empty() {
            cmd.arg("--data-binary").arg(body);
        }
        let out = cmd
            .arg(format!("{}{path}", self.base))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl {method} {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let split = out
            .stdout
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a head");
        let head = String::from_utf8_lossy(&out.stdout[..split]).into_owned();
        let mut lines = head.lines();
        let mut status_line = lines.next().unwrap().split_whitespace();
        let version = status_line.next().unwrap().trim_start_matches("HTTP/");
        Answer {
            version: version.to_string(),
            status: status_line.next().unwrap().parse().unwrap(),
            headers: lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect(),
            body: out.stdout[split + 4..].to_vec(),
        }
    }

    fn post_audio(&self, key: &str, body: &str) -> Answer {
        let auth = format!("Bearer {key}");
        self.call(
            "POST",
            "/v1/audio",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body,
        )
    }
}

/// SPEC §2's table, rows 1 to 11 and success, over `curl`; every answer over HTTP/2.
fn answers_the_audio_table(gw: &Gateway, curl: &Curl) {
    // Row 1: a CORS preflight, no key needed.
    let preflight = curl.call(
        "OPTIONS",
        "/v1/audio",
        &[("Origin", "https://app.example")],
        "",
    );
    assert_eq!(preflight.status, 204, "{preflight:?}");
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        Some("POST, OPTIONS")
    );
    assert_eq!(preflight.header("access-control-allow-origin"), Some("*"));
    let mut answers = vec![preflight];

    // Row 2.
    let reply = curl.call("GET", "/v1/audio", &[], "");
    reply.error(405, "METHOD_NOT_ALLOWED");
    assert_eq!(reply.header("allow"), Some("POST, OPTIONS"));
    answers.push(reply);

    // Rows 3 to 5: the key, with WWW-Authenticate.
    for (auth, code) in [
        (None, "MISSING_AUTH"),
        (Some("Basic dXNlcjpwdw=="), "MISSING_AUTH"),
        (Some("Bearer alp_short"), "INVALID_KEY_FORMAT"),
        (
            Some("Bearer alp_0123456789abcdefABCDEF0123456789"),
            "INVALID_KEY",
        ),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let reply = curl.call("POST", "/v1/audio", &headers, BODY);
        reply.error(401, code);
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"), "{code}");
        answers.push(reply);
    }

    // Rows 6 to 10: the body.
    let key = &gw.dev_key;
    let too_big = format!(r#"{{"library":"{}"}}"#, "a".repeat(17_000));
    for (body, status, code) in [
        (too_big.as_str(), 413, "PAYLOAD_TOO_LARGE"),
        ("not json", 400, "INVALID_JSON"),
        (r#"{"library":"a","library":"b"}"#, 400, "INVALID_JSON"),
        ("{}", 400, "MISSING_LIBRARY"),
        (r#"{"library":""}"#, 400, "MISSING_LIBRARY"),
        (r#"{"library":"audio.unknown"}"#, 404, "LIBRARY_NOT_FOUND"),
        (r#"{"library":"audio.retired"}"#, 404, "NO_AUDIO_ITEMS"),
    ] {
        let reply = curl.post_audio(key, body);
        let json = reply.error(status, code);
        if code == "LIBRARY_NOT_FOUND" {
            assert_eq!(json["error"], "Library 'audio.unknown' not found");
        }
        answers.push(reply);
    }

    // Success, then row 11 for a key with a limit of one call.
    let (_, limited) = gw.create_key("free", Some(Some(1)));
    let reply = curl.post_audio(&limited, BODY);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(
        (body["code"].as_u64(), body["msg"].as_str()),
        (Some(0), Some("ok"))
    );
    let data = body["data"].as_object().unwrap();
    assert_eq!(data.len(), 3, "{body}");
    assert!(data["url"].as_str().unwrap().contains("X-Amz-Signature="));
    assert!(data["duration_sec"].as_u64().unwrap() > 0);
    assert!(
        reply
            .header("ratelimit")
            .unwrap()
            .starts_with("\"monthly\";r=0;t=")
    );
    answers.push(reply);
    let reply = curl.post_audio(&limited, BODY);
    let body = reply.error(429, "QUOTA_EXCEEDED");
    assert_eq!(body["limit"], 1);
    assert!(
        body["reset_at"]
            .as_str()
            .unwrap()
            .ends_with("-01T00:00:00Z")
    );
    assert!(reply.header("retry-after").unwrap().parse::<u64>().unwrap() > 0);
    answers.push(reply);

    // Our other routes.
    let reply = curl.call("GET", "/healthz", &[], "");
    assert_eq!(
        (reply.status, reply.json()["status"].clone()),
        (200, "ok".into())
    );
    answers.push(reply);
    let reply = curl.call("GET", "/readyz", &[], "");
    assert_eq!(reply.json()["status"], "ready");
    answers.push(reply);

    assert!(!gw.log_text().contains("panicked"), "{}", gw.log_text());
    for reply in &answers {
        assert_eq!(reply.version, "2", "not HTTP/2: {reply:?}");
        assert_eq!(
            reply.header("x-request-id").map(str::len),
            Some(32),
            "{reply:?}"
        );
    }
}

/// A header the origin reports it received (`[[name, value], …]`).
fn seen_header<'a>(seen: &'a Value, name: &str) -> Option<&'a str> {
    seen["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
        .and_then(|h| h[1].as_str())
}

#[test]
fn https_answers_http1_and_http2_by_alpn() {
    let pair = Pair::new();
    let up = Upstream::start(false);
    let gw = https_gateway(&pair.path("leaf.pem"), &pair.path("leaf.key"))
        .env("AUDIOLIB_UPSTREAM", up.address())
        .start();
    // HTTP/1.1 (ALPN http/1.1), two requests on one kept-alive connection.
    let config = client_config(&[pair.ca()]);
    let mut conn = tls_connect(&gw, &config);
    assert_eq!(conn.get_ref().conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let reply = post_audio(&mut conn, &gw.dev_key);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["code"], 0);
    let reply = get(&mut conn, "/elsewhere?x=1");
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.json();
    assert_eq!(seen["target"], "/elsewhere?x=1");
    assert_eq!(
        seen_header(&seen, "x-forwarded-proto"),
        Some("https"),
        "{seen}"
    );

    // HTTP/2 by ALPN, passthrough included (HTTP/2 in front, HTTP/1.1 to the origin).
    let curl = Curl::h2_tls(&gw, &pair.ca());
    let reply = curl.call("GET", "/bytes/100000", &[], "");
    assert_eq!((reply.version.as_str(), reply.status), ("2", 200));
    assert_eq!(reply.body.len(), 100_000);
    let reply = curl.call("GET", "/elsewhere", &[], "");
    assert_eq!(
        seen_header(&reply.json(), "x-forwarded-proto"),
        Some("https")
    );
    let reply = curl.call("GET", "/v1/audio/", &[], "");
    reply.error(405, "METHOD_NOT_ALLOWED");

    // Plain HTTP on the HTTPS port is refused (no answer), never served in clear.
    let raw = gw.raw(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(!raw.contains("200"), "{raw:?}");
    assert!(!gw.log_text().contains("panicked"), "{}", gw.log_text());
}

#[test]
fn the_audio_table_over_http2_with_tls() {
    let pair = Pair::new();
    let catalog = test_catalog();
    let gw = https_gateway(&pair.path("leaf.pem"), &pair.path("leaf.key"))
        .env("AUDIOLIB_CATALOG_DIR", catalog.path().to_str().unwrap())
        .start();
    answers_the_audio_table(&gw, &Curl::h2_tls(&gw, &pair.ca()));
}

#[test]
fn the_audio_table_over_h2c_and_http1_beside_it() {
    let catalog = test_catalog();
    let gw = Gateway::builder()
        .env("AUDIOLIB_CATALOG_DIR", catalog.path().to_str().unwrap())
        .env("AUDIOLIB_H2C", "true")
        .start();
    answers_the_audio_table(&gw, &Curl::h2c(&gw));
    // HTTP/1.1 still works on the same listener, pipelined requests included.
    let mut stream = gw.connect(Duration::from_secs(10));
    stream
        .write_all(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .unwrap();
    let mut reader = BufReader::new(stream);
    assert_eq!(read_raw_reply(&mut reader).unwrap().json()["status"], "ok");
    assert_eq!(
        read_raw_reply(&mut reader).unwrap().json()["status"],
        "ready"
    );
    let reply = common::agent().get(gw.url("/healthz")).call().unwrap();
    assert_eq!(reply.version(), http::Version::HTTP_11);
}

#[test]
fn row_12_over_http2() {
    let gw = Gateway::builder()
        .env("AUDIOLIB_H2C", "true")
        .env("AWS_ACCESS_KEY_ID", "")
        .env("AWS_SECRET_ACCESS_KEY", "")
        .start();
    let reply = Curl::h2c(&gw).post_audio(&gw.dev_key, BODY);
    assert_eq!(reply.version, "2");
    reply.error(503, "PRESIGN_FAILED");
}

#[test]
fn a_replaced_certificate_serves_new_connections_while_an_old_one_keeps_working() {
    let (first, second) = (Pair::new(), Pair::new());
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("cert.pem"), live.path().join("key.pem"));
    first.install(&cert, &key);
    let gw = https_gateway(&cert, &key).start();
    let config = client_config(&[first.ca(), second.ca()]);

    let mut old = tls_connect(&gw, &config);
    assert_eq!(served_certificate(&old), first.leaf_der());
    assert_eq!(get(&mut old, "/healthz").status, 200);

    // Replaced on disk (key first, so for a moment the pair does not match): picked up by
    // the file watch, with no signal.
    second.install(&cert, &key);
    common::wait_until("the new certificate", Duration::from_secs(20), || {
        served_certificate(&tls_connect(&gw, &config)) == second.leaf_der()
    });
    // The connection made before keeps its session and keeps being served.
    assert_eq!(get(&mut old, "/healthz").status, 200);
    let reply = post_audio(&mut old, &gw.dev_key);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(served_certificate(&old), first.leaf_der());
    let reloads = |result: &str| {
        common::metric(
            &gw.metrics_text(),
            &format!("audiolib_tls_certificate_reloads_total{{result=\"{result}\"}}"),
        )
    };
    assert!(reloads("ok") >= 1.0);

    // A broken replacement is refused and the current pair stays.
    let errors = reloads("error");
    std::fs::write(live.path().join("cert.partial"), "not a certificate").unwrap();
    std::fs::rename(live.path().join("cert.partial"), &cert).unwrap();
    common::wait_until("the refused reload", Duration::from_secs(20), || {
        reloads("error") > errors
    });
    let mut fresh = tls_connect(&gw, &config);
    assert_eq!(served_certificate(&fresh), second.leaf_der());
    assert_eq!(get(&mut fresh, "/healthz").status, 200);
    assert!(
        gw.log_text()
            .contains("TLS certificate not reloaded, the old one stays"),
        "{}",
        gw.log_text()
    );

    // Put right and reloaded on SIGHUP as well.
    first.install(&cert, &key);
    gw.signal("HUP");
    common::wait_until(
        "the first certificate again",
        Duration::from_secs(20),
        || served_certificate(&tls_connect(&gw, &config)) == first.leaf_der(),
    );
    assert_eq!(get(&mut old, "/healthz").status, 200);
}

/// `audiolib config check` on an empty file with `env`: (succeeded, stdout + stderr).
fn config_check(env: &[(&str, &PathBuf)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audiolib.toml");
    std::fs::write(&file, "").unwrap();
    let (ok, out, err) = common::run(
        Command::new(env!("CARGO_BIN_EXE_audiolib"))
            .args(["config", "check"])
            .arg(&file)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str()))),
    );
    (ok, out + &err)
}

#[test]
fn bad_tls_settings_are_refused_by_name() {
    let (a, b) = (Pair::new(), Pair::new());
    let (cert, key) = (a.path("leaf.pem"), a.path("leaf.key"));
    let missing = a.path("missing.pem");
    let (ok, out) = config_check(&[("AUDIOLIB_TLS_CERT", &cert), ("AUDIOLIB_TLS_KEY", &key)]);
    assert!(ok, "{out}");
    let cert_setting = "setting `tls.cert_file` (AUDIOLIB_TLS_CERT): ";
    let key_setting = "setting `tls.key_file` (AUDIOLIB_TLS_KEY): ";
    let other_key = b.path("leaf.key");
    let yes = &PathBuf::from("true");
    for (env, problem) in [
        (
            vec![("AUDIOLIB_TLS_CERT", &missing), ("AUDIOLIB_TLS_KEY", &key)],
            format!(
                "{cert_setting}{}: No such file or directory",
                missing.display()
            ),
        ),
        (
            vec![("AUDIOLIB_TLS_CERT", &cert), ("AUDIOLIB_TLS_KEY", &missing)],
            format!(
                "{key_setting}{}: No such file or directory",
                missing.display()
            ),
        ),
        (
            vec![("AUDIOLIB_TLS_CERT", &cert)],
            format!("{key_setting}is needed with tls.cert_file"),
        ),
        (
            vec![("AUDIOLIB_TLS_KEY", &key)],
            format!("{cert_setting}is needed with tls.key_file"),
        ),
        (
            vec![("AUDIOLIB_TLS_CERT", &key), ("AUDIOLIB_TLS_KEY", &key)],
            format!(
                "{cert_setting}{}: no CERTIFICATE in it (a PEM certificate chain is expected)",
                key.display()
            ),
        ),
        (
            vec![("AUDIOLIB_TLS_CERT", &cert), ("AUDIOLIB_TLS_KEY", &cert)],
            format!(
                "{key_setting}{}: no private key in it (a PEM PRIVATE KEY is expected)",
                cert.display()
            ),
        ),
        (
            vec![
                ("AUDIOLIB_TLS_CERT", &cert),
                ("AUDIOLIB_TLS_KEY", &other_key),
            ],
            format!(
                "{key_setting}{}: cannot be used with the certificate in {}",
                other_key.display(),
                cert.display()
            ),
        ),
        (
            vec![
                ("AUDIOLIB_TLS_CERT", &cert),
                ("AUDIOLIB_TLS_KEY", &key),
                ("AUDIOLIB_H2C", yes),
            ],
            "setting `h2c` (AUDIOLIB_H2C): applies to a plain listener only; with TLS, HTTP/2 \
             is negotiated by ALPN"
                .to_string(),
        ),
    ] {
        let (ok, out) = config_check(&env);
        assert!(!ok, "{env:?}: {out}");
        assert!(
            out.contains(&problem),
            "{env:?}: want {problem:?} in\n{out}"
        );
        assert!(!out.contains("panicked"), "{out}");
    }

    // `serve` refuses the same way, at once, with status 1.
    let (ok, out, err) = common::run(
        Command::new(env!("CARGO_BIN_EXE_audiolib"))
            .arg("serve")
            .env_clear()
            .env(
                "AUDIOLIB_LISTEN",
                format!("127.0.0.1:{}", common::free_port()),
            )
            .env("AUDIOLIB_TLS_CERT", &missing)
            .env("AUDIOLIB_TLS_KEY", &key),
    );
    assert!(!ok);
    let all = out + &err;
    assert!(all.contains(cert_setting), "{all}");
    assert!(!all.contains("panicked"), "{all}");
}

#[test]
fn requests_refused_before_their_body_end_cleanly_over_http2() {
    // Answered before the body is read; the stream must still end without a reset the
    // client takes for a failure (curl reported one in about 4 % of such calls otherwise,
    // and for a body over the limit in one run of the audio table).
    let gw = Gateway::builder().env("AUDIOLIB_H2C", "true").start();
    // Over the 16 KiB limit, within four times it: read and dropped too.
    let too_big = format!(r#"{{"library":"{}"}}"#, "a".repeat(17_000));
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                let curl = Curl::h2c(&gw);
                for _ in 0..25 {
                    curl.post_audio("alp_short", BODY)
                        .error(401, "INVALID_KEY_FORMAT");
                    curl.call("POST", "/v1/audio", &[], BODY)
                        .error(401, "MISSING_AUTH");
                    curl.post_audio(&gw.dev_key, &too_big)
                        .error(413, "PAYLOAD_TOO_LARGE");
                }
            });
        }
    });
}

#[test]
fn an_unfinished_tls_handshake_is_cut_at_the_head_timeout_and_counts_against_the_cap() {
    use std::io::Read;
    let pair = Pair::new();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("gateway.toml");
    std::fs::write(&conf, "[limits]\nheader_timeout_secs = 1\n").unwrap();
    let gw = https_gateway(&pair.path("leaf.pem"), &pair.path("leaf.key"))
        .arg("--config")
        .arg(conf.to_str().unwrap())
        .env("AUDIOLIB_MAX_CONNECTIONS", "2")
        .start();
    let metric = |name| common::metric(&gw.metrics_text(), name);
    // The start-up probes' connections, closed without a handshake, count as failed ones,
    // once accepted: a probe may still wait in the listen queue after it was closed.
    common::wait_until(
        "start-up probes to be counted",
        Duration::from_secs(5),
        || {
            metric("audiolib_tls_handshakes_failed_total") == gw.tls_probes()
                && metric("audiolib_connections_open") == 0.0
        },
    );
    let failed_before = gw.tls_probes();

    // One client sends nothing, the other the first bytes of a ClientHello and no more.
    let silent = gw.connect(Duration::from_secs(5));
    let mut partial = gw.connect(Duration::from_secs(5));
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let started = std::time::Instant::now();
    common::wait_until("two handshakes in progress", Duration::from_secs(5), || {
        metric("audiolib_connections_open") == 2.0
    });

    // Connections in their handshake are counted: a third is closed at once.
    let config = client_config(&[pair.ca()]);
    let tcp = gw.connect(Duration::from_secs(5));
    let conn =
        rustls::ClientConnection::new(config.clone(), "127.0.0.1".try_into().unwrap()).unwrap();
    let mut third = rustls::StreamOwned::new(conn, tcp);
    let refused = (|| {
        while third.conn.is_handshaking() {
            third.conn.complete_io(&mut third.sock)?;
        }
        Ok::<_, std::io::Error>(())
    })();
    assert!(refused.is_err(), "a handshake over the cap completed");
    assert_eq!(metric("audiolib_connections_refused_total"), 1.0);

    // Both stalled handshakes are closed at the head timeout, not Pingora's 60 s.
    for mut stalled in [silent, partial] {
        stalled
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        let _ = stalled.read_to_end(&mut rest);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    eprintln!("stalled handshakes closed after {took:?}");
    // A timed-out handshake is counted just after its socket is closed.
    let failed = || metric("audiolib_tls_handshakes_failed_total") - failed_before;
    common::wait_until(
        "the failed handshakes to be counted",
        Duration::from_secs(5),
        || failed() >= 2.0,
    );
    assert_eq!(failed(), 2.0);

    // The slots are free again and a client is served.
    common::wait_until(
        "the stalled connections to close",
        Duration::from_secs(5),
        || metric("audiolib_connections_open") == 0.0,
    );
    let mut conn = tls_connect(&gw, &config);
    assert_eq!(post_audio(&mut conn, &gw.dev_key).status, 200);
}
