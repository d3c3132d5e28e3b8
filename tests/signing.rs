//! Signed URLs (SPEC §6) against references nobody here wrote: botocore's
//! `generate_presigned_url` byte for byte, and s3s-fs, a real S3 server that verifies
//! signatures, serving the object from a URL the gateway returned.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use audiolib::sign::{Credentials, Presigner, S3Location, encode_key};
use common::{Fixture, agent, python, read_reply, repo_path};
use serde_json::{Value, json};

/// Keys that break signers which encode twice, normalise paths or mishandle UTF-8.
const TRICKY_KEYS: [&str; 10] = [
    "plain.mp3",
    "focus/deep space drift.mp3",
    "a+b&c=d~e.mp3",
    "double//slash.mp3",
    "über/Ünïcödé 日本.mp3",
    "./dot/../segments.mp3",
    "100% sure?.mp3",
    "hash#tag;semi:colon,comma'quote.mp3",
    "(parens) [brackets] {braces}!.mp3",
    "emoji 🎧.mp3",
];

fn botocore(cases: &Value) -> Vec<String> {
    let mut child = Command::new(python())
        .arg(repo_path("tests/oracle/botocore_presign.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python with botocore (scripts/test sets up .venv)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cases.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "botocore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

struct Case {
    endpoint: &'static str,
    region: &'static str,
    bucket: &'static str,
    path_style: bool,
    token: Option<&'static str>,
    expires: u64,
    time: u64,
}

fn location(c: &Case) -> S3Location {
    let (scheme, authority) = c.endpoint.split_once("://").unwrap();
    S3Location {
        scheme: scheme.into(),
        endpoint_authority: authority.into(),
        bucket: c.bucket.into(),
        region: c.region.into(),
        path_style: c.path_style,
    }
}

#[test]
fn urls_are_byte_identical_to_botocore() {
    let setups = [
        // MinIO or s3s-fs on loopback, path style, a midnight-adjacent time.
        Case {
            endpoint: "http://127.0.0.1:9000",
            region: "us-east-1",
            bucket: "media",
            path_style: true,
            token: None,
            expires: 3600,
            time: 1_795_996_799, // 2026-11-29T23:59:59Z
        },
        // AWS, virtual-host style, temporary credentials.
        Case {
            endpoint: "https://s3.eu-west-1.amazonaws.com",
            region: "eu-west-1",
            bucket: "audiolib-media",
            path_style: false,
            token: Some("FwoGZXIvYXdzEJr//////////wEaDH+token=/with+special"),
            expires: 604_800,
            time: 1_767_225_600, // 2026-01-01T00:00:00Z
        },
        // Cloudflare R2, path style, region "auto", short lifetime.
        Case {
            endpoint: "https://0123456789abcdef.r2.cloudflarestorage.com",
            region: "auto",
            bucket: "audio.bucket",
            path_style: true,
            token: None,
            expires: 60,
            time: 1_800_000_000,
        },
        // Virtual-host style on a custom endpoint with a port.
        Case {
            endpoint: "http://localhost:9000",
            region: "us-west-2",
            bucket: "media",
            path_style: false,
            token: Some("short-token"),
            expires: 900,
            time: 1_790_000_123,
        },
    ];
    let access_key = "AKIAIOSFODNN7EXAMPLE";
    let secret_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    let mut reference = Vec::new();
    for setup in &setups {
        let presigner = Presigner::new(
            location(setup),
            Some(Credentials {
                access_key_id: access_key.into(),
                secret_access_key: secret_key.into(),
                session_token: setup.token.map(str::to_string),
            }),
            Duration::from_secs(setup.expires),
        );
        let at = UNIX_EPOCH + Duration::from_secs(setup.time);
        for key in TRICKY_KEYS {
            cases.push(json!({
                "endpoint": setup.endpoint, "region": setup.region, "bucket": setup.bucket,
                "path_style": setup.path_style, "access_key": access_key,
                "secret_key": secret_key, "token": setup.token, "expires": setup.expires,
                "time": setup.time, "key": key,
            }));
            ours.push(presigner.presign(&encode_key(key), at).unwrap());
            reference.push(presigner.presign_with_sign(&encode_key(key), at).unwrap());
        }
    }
    let theirs = botocore(&Value::Array(cases));
    assert_eq!(theirs.len(), ours.len());
    for ((ours, reference), theirs) in ours.iter().zip(&reference).zip(&theirs) {
        assert_eq!(ours, theirs, "fast path differs from botocore");
        assert_eq!(reference, theirs, "aws-sigv4 sign() differs from botocore");
    }
}

/// Object keys s3s-fs can hold as files (no `//` or dot segments: a filesystem folds them).
const SERVABLE_KEYS: [&str; 6] = [
    "plain.mp3",
    "focus/deep space drift.mp3",
    "a+b&c=d~e.mp3",
    "über/Ünïcödé 日本.mp3",
    "100% sure?.mp3",
    "(parens) [brackets] {braces}!.mp3",
];

fn fixture() -> Fixture {
    let libraries: Vec<(String, &str)> = SERVABLE_KEYS
        .iter()
        .enumerate()
        .map(|(i, key)| (format!("test.lib{i}"), *key))
        .collect();
    Fixture::new(&libraries)
}

fn fetch(url: &str) -> (u16, Vec<u8>) {
    let reply = read_reply(agent().get(url).call().unwrap());
    (reply.status, reply.body)
}

#[test]
fn returned_urls_fetch_the_exact_object_from_s3s_fs() {
    let fx = fixture();
    let gw = fx.gateway().start();
    for (library, key, bytes) in &fx.objects {
        let reply = gw.post_audio(&gw.dev_key, &format!(r#"{{"library":"{library}"}}"#));
        assert_eq!(reply.status, 200, "{library}");
        let url = reply.json()["data"]["url"].as_str().unwrap().to_string();
        let (status, body) = fetch(&url);
        assert_eq!(
            status,
            200,
            "{key}: {url} -> {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(&body, bytes, "{key}");

        // Any change to what was signed is refused.
        let sig_at = url.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
        let mut tampered = url.clone().into_bytes();
        tampered[sig_at] = if tampered[sig_at] == b'0' { b'1' } else { b'0' };
        assert_eq!(fetch(&String::from_utf8(tampered).unwrap()).0, 403, "{key}");
        let other_object = url.replacen("/media/", "/media/x", 1);
        assert_eq!(fetch(&other_object).0, 403, "{key}");
        let longer = url.replace("X-Amz-Expires=3600", "X-Amz-Expires=7200");
        assert_eq!(fetch(&longer).0, 403, "{key}");
    }
}

#[test]
fn expired_urls_are_refused_by_s3s_fs() {
    let fx = fixture();
    let (_, key, bytes) = &fx.objects[1];
    let (scheme, authority) = fx.s3.endpoint.split_once("://").unwrap();
    let presigner = Presigner::new(
        S3Location {
            scheme: scheme.into(),
            endpoint_authority: authority.into(),
            bucket: "media".into(),
            region: "us-east-1".into(),
            path_style: true,
        },
        Some(Credentials {
            access_key_id: common::S3_ACCESS_KEY.into(),
            secret_access_key: common::S3_SECRET_KEY.into(),
            session_token: None,
        }),
        Duration::from_secs(60),
    );
    let now = SystemTime::now();
    let fresh = presigner.presign(&encode_key(key), now).unwrap();
    let (status, body) = fetch(&fresh);
    assert_eq!((status, &body), (200, bytes));
    // Signed two minutes ago with a one-minute lifetime.
    let expired = presigner
        .presign(&encode_key(key), now - Duration::from_secs(120))
        .unwrap();
    assert_eq!(fetch(&expired).0, 403);
}

#[test]
fn a_lifetime_over_seven_days_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_audiolib"))
        .arg("serve")
        .env("AUDIOLIB_URL_TTL_SECS", "604801")
        .env("AUDIOLIB_CATALOG_DIR", repo_path("catalog"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`s3.url_ttl_secs` (AUDIOLIB_URL_TTL_SECS)"),
        "{err}"
    );
}
