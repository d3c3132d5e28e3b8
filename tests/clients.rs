//! The seed's own client examples (curl, JavaScript fetch, Python requests), taken verbatim
//! from `shared/seed/audiolib-api-reference.txt` with only the base URL and the key changed,
//! run against the gateway; each URL they print must serve the object from s3s-fs.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Fixture, Gateway, agent, python, read_reply};

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
    assert!(
        code.contains(BASE) && code.contains(PLACEHOLDER_KEY),
        "{code}"
    );
    code.replace(BASE, &format!("http://{}", gw.addr))
        .replace(PLACEHOLDER_KEY, key)
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
