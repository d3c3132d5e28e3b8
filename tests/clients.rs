//! The seed's own client examples (curl, JavaScript fetch, Python requests), taken verbatim
//! from `shared/seed/audiolib-api-reference.txt` with only the base URL and the key changed,
//! run against the gateway; each URL they print must serve the object from s3s-fs. The
//! first-run tests do the same against `scripts/run` as a new user starts it, with no S3
//! settings, and play the seed's browser example in a real Chromium.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Fixture, Gateway, agent, free_port, python, read_reply};

const BASE: &str = "https://api.audiolib.ai";
const PLACEHOLDER_KEY: &str = "alp_your_api_key";

fn seed() -> String {
    let path = std::env::var("AUDIOLIB_SEED")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/seed/audiolib-api-reference.txt")
        });
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("seed reference at {}: {e}", path.display()))
}

/// The text from the line starting with `first` through the line containing `last`,
/// searching after `anchor`.
fn block(seed: &str, anchor: &str, first: &str, last: &str) -> String {
    let after = &seed[seed
        .find(anchor)
        .unwrap_or_else(|| panic!("no {anchor:?} in seed"))..];
    let start = after.find(first).unwrap_or_else(|| panic!("no {first:?}"));
    let rest = &after[start..];
    let end = rest.find(last).unwrap_or_else(|| panic!("no {last:?}")) + last.len();
    let end = end + rest[end..].find('\n').unwrap_or(rest.len() - end);
    rest[..end].to_string()
}

/// The example with only the base URL and the key swapped.
fn localise(code: &str, gw: &Gateway, key: &str) -> String {
    localise_to(code, &format!("http://{}", gw.addr), key)
}

fn localise_to(code: &str, base: &str, key: &str) -> String {
    assert!(
        code.contains(BASE) && code.contains(PLACEHOLDER_KEY),
        "{code}"
    );
    code.replace(BASE, base).replace(PLACEHOLDER_KEY, key)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run example");
    assert!(
        out.status.success(),
        "example failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn assert_serves(fx: &Fixture, library: &str, url: &str) {
    let reply = read_reply(agent().get(url.trim()).call().unwrap());
    assert_eq!(reply.status, 200, "{url}");
    assert_eq!(reply.body, fx.bytes_of(library), "{url}");
}

fn setup() -> (Fixture, Gateway, String) {
    let fx = Fixture::new(&[
        ("audio.focus", "focus/deep space drift.mp3"),
        ("audio.ambient", "ambient/café murmur.mp3"),
        ("audio.sleep", "sleep/nachtwind & sterne.mp3"),
    ]);
    let gw = fx.gateway().start();
    let (_, key) = gw.create_key("free", None);
    (fx, gw, key)
}

#[test]
fn curl_examples() {
    let (fx, gw, key) = setup();
    let seed = seed();
    for (anchor, library) in [("Quick Start", "audio.focus"), ("Examples", "audio.sleep")] {
        let code = localise(&block(&seed, anchor, "curl -X POST", "-d '{"), &gw, &key);
        assert!(code.contains(library), "{code}");
        let out = run(Command::new("bash").args(["-c", &code]));
        let body: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(body["code"], 0, "{out}");
        assert_serves(&fx, library, body["data"]["url"].as_str().unwrap());
    }
}

#[test]
fn javascript_fetch_example() {
    let (fx, gw, key) = setup();
    let code = localise(
        &block(
            &seed(),
            "JavaScript (fetch)",
            "const response",
            "console.log(json.data.url)",
        ),
        &gw,
        &key,
    );
    // Top-level await: the example is an ES module.
    let out = run(Command::new("node").args(["--input-type=module", "-e", &code]));
    assert_serves(&fx, "audio.focus", &out);
}

#[test]
fn python_requests_example() {
    let (fx, gw, key) = setup();
    let code = localise(
        &block(
            &seed(),
            "Python (requests)",
            "import requests",
            "print(data['data']['url'])",
        ),
        &gw,
        &key,
    );
    let out = run(Command::new(python()).args(["-c", &code]));
    assert_serves(&fx, "audio.ambient", &out);
}

/// `scripts/run` as a new user starts it, with no S3 settings: it starts s3s-fs with
/// generated audio and the gateway signing for it. Runs the test build of the binary on free
/// ports, in its own process group so Ctrl-C can be sent as a terminal sends it.
struct FirstRun {
    script: std::process::Child,
    base: String,
    s3_port: u16,
    key: String,
    curl_line: String,
    lines: Vec<String>,
    _data: tempfile::TempDir,
}

impl FirstRun {
    fn start() -> FirstRun {
        Self::start_with(&[])
    }

    fn start_with(env: &[(&str, &str)]) -> FirstRun {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let data = tempfile::tempdir().unwrap();
        let (port, admin, s3_port) = (free_port(), free_port(), free_port());
        let portal = free_port();
        let mut script = Command::new("bash")
            .arg(common::repo_path("scripts/run"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("AUDIOLIB_BIN", env!("CARGO_BIN_EXE_audiolib"))
            .env("AUDIOLIB_LISTEN", format!("127.0.0.1:{port}"))
            .env("AUDIOLIB_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("AUDIOLIB_PORTAL_LISTEN", format!("127.0.0.1:{portal}"))
            .env("AUDIOLIB_DATA_DIR", data.path())
            .env("AUDIOLIB_LOCAL_S3_PORT", s3_port.to_string())
            .env("AUDIOLIB_THREADS", "2")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(data.path().join("stderr.log")).unwrap())
            .process_group(0)
            .spawn()
            .expect("run scripts/run");
        let mut stdout = std::io::BufReader::new(script.stdout.take().unwrap());
        let mut lines = Vec::new();
        while !lines
            .iter()
            .any(|l: &String| l.starts_with("developer portal"))
        {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let log = std::fs::read_to_string(data.path().join("stderr.log"));
                panic!("scripts/run ended early: {lines:?}\n{log:?}");
            }
            lines.push(line.trim_end().to_string());
        }
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let find = |prefix: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:?}"))
                .clone()
        };
        let key = find("development key")
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string();
        let curl_line = find("try it: ")["try it: ".len()..].to_string();
        let run = FirstRun {
            script,
            base: format!("http://127.0.0.1:{port}"),
            s3_port,
            key,
            curl_line,
            lines,
            _data: data,
        };
        let ready = format!("{}/readyz", run.base);
        common::wait_until("readiness", std::time::Duration::from_secs(60), || {
            agent().get(&ready).call().is_ok_and(|r| r.status() == 200)
        });
        run
    }

    /// Ctrl-C as a terminal sends it: SIGINT to the whole process group.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        let pgid = format!("-{}", self.script.id());
        let sent = Command::new("kill").args(["-INT", "--", &pgid]).status();
        assert!(sent.unwrap().success());
        self.script.wait().unwrap()
    }

    fn group_alive(&self) -> bool {
        let pgid = format!("-{}", self.script.id());
        Command::new("kill")
            .args(["-0", "--", &pgid])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    }
}

impl Drop for FirstRun {
    fn drop(&mut self) {
        if self.group_alive() {
            let pgid = format!("-{}", self.script.id());
            let _ = Command::new("kill").args(["-KILL", "--", &pgid]).status();
            let _ = self.script.wait();
        }
    }
}

/// A WAV file's format and length: (channels, sample rate, bits, seconds).
fn wav_header(bytes: &[u8]) -> (u16, u32, u16, f64) {
    assert!(bytes.len() > 44, "{} bytes", bytes.len());
    assert_eq!(&bytes[0..4], b"RIFF");
    assert_eq!(&bytes[8..16], b"WAVEfmt ");
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    assert_eq!(u32_at(4) as usize + 8, bytes.len(), "RIFF size");
    assert_eq!(u16_at(20), 1, "PCM");
    assert_eq!(&bytes[36..40], b"data");
    let (channels, rate, bits) = (u16_at(22), u32_at(24), u16_at(34));
    assert_eq!(u32_at(28), rate * u32::from(channels) * u32::from(bits) / 8);
    assert_eq!(u32_at(40) as usize, bytes.len() - 44, "data size");
    let seconds = f64::from(u32_at(40)) / f64::from(u32_at(28));
    (channels, rate, bits, seconds)
}

fn assert_plays(url: &str) {
    let reply = read_reply(agent().get(url.trim()).call().unwrap());
    assert_eq!(reply.status, 200, "{url}");
    assert_eq!(wav_header(&reply.body), (1, 22050, 16, 3.0), "{url}");
}

#[test]
fn first_run_serves_the_seed_examples_and_stops_on_ctrl_c() {
    let mut run = FirstRun::start();
    let local_s3 = format!(
        "local S3 (s3s-fs, signatures verified) on http://127.0.0.1:{}, bucket audiolib-media,",
        run.s3_port
    );
    assert!(
        run.lines.iter().any(|l| l.starts_with(&local_s3)),
        "{:?}",
        run.lines
    );
    assert!(
        run.key.starts_with("alp_") && run.key.len() == 36,
        "{}",
        run.key
    );
    assert_eq!(
        run.curl_line,
        format!(
            "curl -X POST {}/v1/audio -H \"Authorization: Bearer {}\" -H \"Content-Type: application/json\" -d '{{\"library\":\"audio.focus\"}}'",
            run.base, run.key
        )
    );

    // The printed line, pasted.
    let out = self::run(Command::new("bash").args(["-c", &run.curl_line]));
    let body: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(body["code"], 0, "{out}");
    assert_eq!(body["msg"], "ok", "{out}");
    let url = body["data"]["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!(
            "http://127.0.0.1:{}/audiolib-media/focus/",
            run.s3_port
        )),
        "{url}"
    );
    assert_plays(url);

    // The seed's curl, JavaScript and Python examples, base URL and key changed.
    let seed = seed();
    for (anchor, library) in [("Quick Start", "audio.focus"), ("Examples", "audio.sleep")] {
        let code = localise_to(
            &block(&seed, anchor, "curl -X POST", "-d '{"),
            &run.base,
            &run.key,
        );
        let out = self::run(Command::new("bash").args(["-c", &code]));
        let body: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(body["code"], 0, "{library}: {out}");
        assert_plays(body["data"]["url"].as_str().unwrap());
    }
    let js = localise_to(
        &block(
            &seed,
            "JavaScript (fetch)",
            "const response",
            "console.log(json.data.url)",
        ),
        &run.base,
        &run.key,
    );
    assert_plays(&self::run(Command::new("node").args([
        "--input-type=module",
        "-e",
        &js,
    ])));
    let py = localise_to(
        &block(
            &seed,
            "Python (requests)",
            "import requests",
            "print(data['data']['url'])",
        ),
        &run.base,
        &run.key,
    );
    assert_plays(&self::run(Command::new(python()).args(["-c", &py])));

    // A tampered URL is refused: the local store verifies signatures.
    let tampered = url.replace("X-Amz-Expires=", "X-Amz-Expires=1");
    let reply = read_reply(agent().get(&tampered).call().unwrap());
    assert_eq!(reply.status, 403, "{tampered}");

    let status = run.interrupt();
    assert_eq!(status.code(), Some(130));
    assert!(
        !run.group_alive(),
        "something scripts/run started survived Ctrl-C"
    );
    for port in [
        run.base.rsplit(':').next().unwrap().parse().unwrap(),
        run.s3_port,
    ] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "{port}"
        );
    }
}

/// The seed's browser example, `new Audio(url).play()`, in a real Chromium, on a page of
/// another origin than the gateway's and the store's, started from a click as an app's Play
/// button would: the track plays to its end.
#[test]
fn first_run_plays_the_seed_browser_example_in_chromium() {
    let run = FirstRun::start();
    let example = localise_to(
        &block(
            &seed(),
            "Quick Start",
            "const res = await fetch",
            "new Audio(url).play()",
        ),
        &run.base,
        &run.key,
    );
    let (modules, chromium) = common::browser_tools();
    let out = self::run(
        Command::new("node")
            .arg(common::repo_path("tests/oracle/browser_play.mjs"))
            .arg(&chromium)
            .arg(&example)
            .env("AUDIOLIB_NODE_MODULES", modules),
    );
    let seen: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(seen["status"], 200, "{seen}");
    assert_eq!(seen["error"], serde_json::Value::Null, "{seen}");
    assert_eq!(seen["pageErrors"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["audios"], 1, "{seen}");
    assert_eq!(seen["mediaError"], serde_json::Value::Null, "{seen}");
    assert_eq!(seen["ended"], true, "{seen}");
    assert_eq!(seen["duration"], 3.0, "{seen}");
    assert_eq!(seen["currentTime"], 3.0, "{seen}");
    let src = seen["src"].as_str().unwrap();
    assert!(
        src.starts_with(&format!(
            "http://127.0.0.1:{}/audiolib-media/focus/",
            run.s3_port
        )),
        "{seen}"
    );
    assert!(
        seen["origin"]
            .as_str()
            .unwrap()
            .starts_with("http://localhost:"),
        "{seen}"
    );
}

/// With S3 settings given, `scripts/run` starts nothing local and the gateway signs for the
/// given store.
#[test]
fn first_run_with_s3_settings_starts_no_local_store() {
    let mut run = FirstRun::start_with(&[
        ("AUDIOLIB_S3_ENDPOINT", "http://127.0.0.1:9"),
        ("AUDIOLIB_S3_PATH_STYLE", "true"),
        ("AWS_ACCESS_KEY_ID", "AKIDGIVEN"),
        ("AWS_SECRET_ACCESS_KEY", "given-secret"),
    ]);
    assert!(
        !run.lines.iter().any(|l| l.contains("local S3")),
        "{:?}",
        run.lines
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", run.s3_port)).is_err());
    let out = self::run(Command::new("bash").args(["-c", &run.curl_line]));
    let body: serde_json::Value = serde_json::from_str(&out).unwrap();
    let url = body["data"]["url"].as_str().unwrap();
    assert!(
        url.starts_with("http://127.0.0.1:9/audiolib-media/"),
        "{url}"
    );
    assert!(url.contains("X-Amz-Credential=AKIDGIVEN%2F"), "{url}");
    assert_eq!(run.interrupt().code(), Some(130));
    assert!(!run.group_alive());
}
