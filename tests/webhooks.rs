//! Webhooks (SPEC §9) against the real binary and a real HTTP receiver: signed events, retries
//! until a 2xx, `quota.threshold` once per subject, month and threshold across nodes (Redis
//! and two processes on one data directory), and events that survive a SIGKILL before
//! delivery.

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{Gateway, GatewayBuilder, RedisServer, wait_until};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "whsec_test_0123456789abcdef";
const BODY: &str = r#"{"library":"audio.sleep"}"#;

/// One POST the receiver got, and what it answered.
#[derive(Clone, Debug)]
struct Delivery {
    path: String,
    signature: String,
    content_type: String,
    body: String,
    status: u16,
}

impl Delivery {
    fn event(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON event")
    }
}

/// A webhook receiver on loopback: records every request and answers from a script of
/// statuses (then 200).
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Delivery>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start() -> Receiver {
        Self::start_on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn start_on(listener: TcpListener) -> Receiver {
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s, st) = (got.clone(), script.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(5)))
                            .unwrap();
                        serve_one(stream, &g, &s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Receiver {
            addr,
            got,
            script,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/audiolib", self.addr)
    }

    fn fail_next(&self, statuses: &[u16]) {
        self.script.lock().unwrap().extend(statuses);
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// Events answered 2xx, one per delivery.
    fn accepted(&self) -> Vec<Value> {
        self.deliveries()
            .iter()
            .filter(|d| d.status == 200)
            .map(Delivery::event)
            .collect()
    }

    fn accepted_of(&self, kind: &str) -> Vec<Value> {
        self.accepted()
            .into_iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_one(
    stream: std::net::TcpStream,
    got: &Mutex<Vec<Delivery>>,
    script: &Mutex<VecDeque<u16>>,
) {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let (mut length, mut signature, mut content_type) = (0usize, String::new(), String::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim().to_string();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "audiolib-signature" => signature = value,
                "content-type" => content_type = value,
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let status = script.lock().unwrap().pop_front().unwrap_or(200);
    got.lock().unwrap().push(Delivery {
        path,
        signature,
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
        status,
    });
    let mut stream = reader.into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}

/// Checks the signature as a receiver would, with an HMAC of its own: `t=<secs>,v1=<hex>`
/// over `"<t>.<raw body>"`, and `t` recent.
fn assert_signed(d: &Delivery) {
    let (t, v1) = d
        .signature
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .unwrap_or_else(|| panic!("signature {:?}", d.signature));
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.{}", d.body).as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, expected, "signature of {}", d.body);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t: u64 = t.parse().unwrap();
    assert!(now.abs_diff(t) < 120, "t={t} is not the time of sending");
}

fn with_webhooks(dir: &std::path::Path, receiver_url: &str) -> GatewayBuilder {
    let conf = dir.join("plans.toml");
    std::fs::write(
        &conf,
        "default_plan = \"free\"\n\
         [plans.free]\nmonthly_limit = 1000\n\
         [plans.team]\nmonthly_limit = 20\n",
    )
    .unwrap();
    Gateway::builder()
        .arg("--config")
        .arg(conf.to_str().unwrap())
        .env("AUDIOLIB_WEBHOOK_URL", receiver_url)
        .env("AUDIOLIB_WEBHOOK_SECRET", SECRET)
}

fn created(reply: common::Reply) -> Value {
    assert_eq!(reply.status, 201, "{:?}", reply.json());
    reply.json()
}

#[test]
fn events_are_signed_and_retried_until_the_receiver_takes_them() {
    let receiver = Receiver::start();
    // The first two deliveries fail: whichever events they carry must come again, same id.
    receiver.fail_next(&[500, 503]);
    let dir = tempfile::tempdir().unwrap();
    let gw = with_webhooks(dir.path(), &receiver.url()).start();

    let account = created(gw.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": "hooks@example.com", "name": "Hooks", "plan": "team"})),
    ));
    let acct = account["id"].as_str().unwrap();
    let key = created(gw.admin(
        "POST",
        "/admin/keys",
        Some(json!({"name": "app", "account_id": acct})),
    ));
    let key_id = key["id"].as_str().unwrap();
    let secret = key["key"].as_str().unwrap();
    let rotated = created(gw.admin(
        "POST",
        &format!("/admin/keys/{key_id}/rotate"),
        Some(json!({"grace_secs": 60})),
    ));
    let new_secret = rotated["key"].as_str().unwrap();
    let revoked = gw.admin("DELETE", &format!("/admin/keys/{key_id}"), None);
    assert_eq!(revoked.status, 200);
    // A second revocation changes nothing and tells nothing.
    assert_eq!(
        gw.admin("DELETE", &format!("/admin/keys/{key_id}"), None)
            .status,
        200
    );

    wait_until("every event accepted", Duration::from_secs(30), || {
        let kinds: Vec<String> = receiver
            .accepted()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect();
        [
            "account.created",
            "key.created",
            "key.rotated",
            "key.revoked",
        ]
        .iter()
        .all(|k| kinds.iter().any(|got| got == k))
    });
    let deliveries = receiver.deliveries();
    let failed: Vec<&Delivery> = deliveries.iter().filter(|d| d.status != 200).collect();
    assert_eq!(failed.len(), 2, "{deliveries:?}");
    for f in &failed {
        let id = &f.event()["id"];
        assert!(
            deliveries
                .iter()
                .any(|d| d.status == 200 && d.event()["id"] == *id && d.body == f.body),
            "failed delivery of {id} not retried with the same body"
        );
    }
    for d in &deliveries {
        assert_signed(d);
        assert_eq!(d.path, "/hooks/audiolib");
        assert_eq!(d.content_type, "application/json");
        assert!(!d.body.contains(secret) && !d.body.contains(new_secret));
        let e = d.event();
        let mut fields: Vec<&str> = e.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        fields.sort();
        assert_eq!(fields, ["created_at", "data", "id", "type"]);
        assert!(e["id"].as_str().unwrap().starts_with("evt_"));
    }

    let of = |kind: &str| -> Vec<Value> {
        receiver
            .accepted_of(kind)
            .into_iter()
            .filter(|e| e["data"]["id"] != gw_dev_key_id(&gw))
            .collect()
    };
    let [account_created] = &of("account.created")[..] else {
        panic!("{:?}", of("account.created"))
    };
    assert_eq!(account_created["data"]["id"], acct);
    assert_eq!(account_created["data"]["email"], "hooks@example.com");
    let [key_created] = &of("key.created")[..] else {
        panic!("{:?}", of("key.created"))
    };
    assert_eq!(key_created["data"]["id"], key_id);
    assert_eq!(key_created["data"]["account_id"], acct);
    assert_eq!(key_created["data"]["prefix"], key["prefix"]);
    let [key_rotated] = &of("key.rotated")[..] else {
        panic!("{:?}", of("key.rotated"))
    };
    assert_eq!(key_rotated["data"]["prefix"], rotated["prefix"]);
    assert_eq!(
        key_rotated["data"]["previous_expires_at"],
        rotated["previous_expires_at"]
    );
    let [key_revoked] = &of("key.revoked")[..] else {
        panic!("{:?}", of("key.revoked"))
    };
    assert_eq!(key_revoked["data"]["status"], "revoked");

    assert_events_match_the_documented_schemas(&receiver.accepted());

    let metrics = gw.metrics_text();
    assert!(
        common::metric(
            &metrics,
            "audiolib_webhook_events_total{outcome=\"failed\"}"
        ) >= 2.0,
        "{metrics}"
    );
}

/// Every event validates against its schema in the admin OpenAPI document's `webhooks`
/// (JSON Schema 2020-12, as OpenAPI 3.1 uses), checked by Python's jsonschema.
fn assert_events_match_the_documented_schemas(events: &[Value]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.json");
    std::fs::write(&path, serde_json::to_string(events).unwrap()).unwrap();
    let check = r#"
import json, sys, jsonschema
doc = json.load(open(sys.argv[1]))
events = json.load(open(sys.argv[2]))
for event in events:
    ref = doc["webhooks"][event["type"]]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = dict(doc, **{"$ref": ref, "$schema": "https://json-schema.org/draft/2020-12/schema"})
    jsonschema.Draft202012Validator(schema).validate(event)
print(len(events), "events match")
"#;
    let (ok, out, err) = common::run(
        std::process::Command::new(common::python())
            .args(["-c", check])
            .arg(common::repo_path("docs/openapi/admin.json"))
            .arg(&path),
    );
    assert!(ok, "{out}{err}");
}

/// The id of the development key the embedded store prints at start (its `key.created` is
/// an event like any other).
fn gw_dev_key_id(gw: &Gateway) -> Value {
    let keys = gw.admin("GET", "/admin/keys", None).json();
    keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "development")
        .map_or(Value::Null, |k| k["id"].clone())
}

/// An account of limit 20 with two keys, 100 calls at once over both keys and both nodes: one
/// `quota.threshold` event at 80 % and one at 100 %, each delivered once.
fn thresholds_are_told_once(a: &Gateway, b: &Gateway, receiver: &Receiver) {
    let account = created(a.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": "limits@example.com", "name": "Limits", "plan": "team"})),
    ));
    let acct = account["id"].as_str().unwrap();
    let key = |gw: &Gateway| {
        created(gw.admin(
            "POST",
            "/admin/keys",
            Some(json!({"name": "k", "account_id": acct})),
        ))["key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (k1, k2) = (key(a), key(b));
    // Four clients at once, each key on each node, racing past 80 % and 100 %.
    let served: usize = std::thread::scope(|scope| {
        let clients: Vec<_> = [(a, &k1), (b, &k2), (b, &k1), (a, &k2)]
            .into_iter()
            .map(|(gw, k)| {
                scope.spawn(move || {
                    (0..25)
                        .filter(|_| gw.post_audio(k, BODY).status == 200)
                        .count()
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).sum()
    });
    assert_eq!(served, 20);
    let thresholds = || -> Vec<Value> {
        receiver
            .accepted_of("quota.threshold")
            .into_iter()
            .filter(|e| e["data"]["subject"] == acct)
            .collect()
    };
    wait_until("both thresholds told", Duration::from_secs(15), || {
        thresholds().len() >= 2
    });
    // Both nodes saw both thresholds reached; more time gives more chances to tell twice.
    std::thread::sleep(Duration::from_secs(3));
    let mut told = thresholds();
    told.sort_by_key(|e| e["data"]["threshold"].as_u64());
    assert_eq!(told.len(), 2, "{told:?}");
    let period = chrono::Utc::now().format("%Y-%m").to_string();
    for (event, threshold) in told.iter().zip([80, 100]) {
        let data = &event["data"];
        assert_eq!(data["threshold"], threshold);
        assert_eq!(data["limit"], 20);
        assert_eq!(data["period"], period);
        let used = data["used"].as_u64().unwrap();
        assert!(
            used * 100 >= threshold * 20 && used <= 20,
            "used {used} at {threshold}"
        );
    }
    assert_ne!(told[0]["id"], told[1]["id"]);
    let deliveries = receiver
        .deliveries()
        .iter()
        .filter(|d| d.event()["type"] == "quota.threshold")
        .count();
    assert_eq!(deliveries, 2, "each event delivered once");
}

#[test]
fn quota_threshold_is_told_once_across_nodes_on_redis() {
    let redis = RedisServer::start();
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let node = || {
        with_webhooks(dir.path(), &receiver.url())
            .env("AUDIOLIB_REDIS_URL", redis.url())
            .start()
    };
    let (a, b) = (node(), node());
    thresholds_are_told_once(&a, &b, &receiver);
}

#[test]
fn quota_threshold_is_told_once_across_processes_on_one_data_dir() {
    let receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = || {
        with_webhooks(dir.path(), &receiver.url())
            .env("AUDIOLIB_DATA_DIR", data.to_str().unwrap())
            .start()
    };
    let (a, b) = (node(), node());
    thresholds_are_told_once(&a, &b, &receiver);
}

#[test]
fn an_event_survives_a_sigkill_before_its_delivery() {
    // The receiver's port is reserved but nobody answers yet: deliveries fail.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let url = format!("http://{addr}/hooks/audiolib");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let node = || {
        with_webhooks(dir.path(), &url)
            .env("AUDIOLIB_DATA_DIR", data.to_str().unwrap())
            .start()
    };
    let mut gw = node();
    let key = created(gw.admin("POST", "/admin/keys", Some(json!({"name": "durable"}))));
    let key_id = key["id"].as_str().unwrap().to_string();
    wait_until("a failed attempt", Duration::from_secs(10), || {
        common::metric(
            &gw.metrics_text(),
            "audiolib_webhook_events_total{outcome=\"failed\"}",
        ) >= 1.0
    });
    gw.signal("KILL");
    gw.wait_exit(Duration::from_secs(10));

    let receiver = Receiver::start_on(TcpListener::bind(addr).unwrap());
    let _restarted = node();
    // Killed mid-delivery, the event waits out its 30 s claim; else the next retry (seconds).
    wait_until(
        "the event made before the kill",
        Duration::from_secs(60),
        || {
            receiver
                .accepted_of("key.created")
                .iter()
                .any(|e| e["data"]["id"] == key_id.as_str())
        },
    );
}

#[test]
fn a_receiver_that_never_answers_holds_up_no_call() {
    // Accepts connections and never answers: every delivery waits for its 10 s timeout.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            h.lock().unwrap().push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let gw = with_webhooks(dir.path(), &url).start();
    let account = created(gw.admin(
        "POST",
        "/admin/accounts",
        Some(json!({"email": "slow@example.com", "name": "Slow", "plan": "team"})),
    ));
    let key = created(gw.admin(
        "POST",
        "/admin/keys",
        Some(json!({"name": "k", "account_id": account["id"]})),
    ));
    let secret = key["key"].as_str().unwrap();
    wait_until("a delivery hanging", Duration::from_secs(10), || {
        !held.lock().unwrap().is_empty()
    });
    // Both thresholds are crossed while deliveries hang: every call is answered as usual,
    // and the admin API goes on recording events.
    let statuses: Vec<u16> = (0..25)
        .map(|_| gw.post_audio(secret, BODY).status)
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 20);
    assert!(statuses[20..].iter().all(|s| *s == 429));
    created(gw.admin("POST", "/admin/keys", Some(json!({"name": "more"}))));
    wait_until("the thresholds recorded", Duration::from_secs(10), || {
        common::metric(
            &gw.metrics_text(),
            "audiolib_webhook_events_total{outcome=\"recorded\"}",
        ) >= 6.0
    });
}
