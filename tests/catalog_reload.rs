//! Catalog snapshots (SPEC §5) on the real binary: reload on SIGHUP and on file change, a bad
//! file never replaces a good snapshot, loads that never stop serving (the first one runs
//! after the listeners are up, a reload while the old snapshot answers), and
//! `audiolib catalog check`.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Gateway, agent, read_reply, test_catalog, wait_until, write_big_library};

const NEW_LIBRARY: &str =
    "name = \"New\"\n[[track]]\ntitle = \"Fresh\"\nkey = \"new/fresh.mp3\"\nduration_sec = 42\n";

fn catalog_version(gw: &Gateway) -> u64 {
    gw.catalog_version()
}

/// Tracks in the big library: its load takes seconds in a debug build, far longer than the
/// few requests each test makes while it runs.
const BIG: usize = 200_000;

fn library_status(gw: &Gateway, lib: &str) -> u16 {
    gw.post_audio(&gw.dev_key, &format!(r#"{{"library":"{lib}"}}"#))
        .status
}

#[test]
fn sighup_reloads_the_catalog() {
    let dir = test_catalog();
    let gw = Gateway::builder()
        .env("AUDIOLIB_CATALOG_DIR", dir.path().to_str().unwrap())
        .env("AUDIOLIB_CATALOG_WATCH", "false")
        .start();
    assert_eq!(catalog_version(&gw), 1);
    std::fs::write(dir.path().join("audio.new.toml"), NEW_LIBRARY).unwrap();
    assert_eq!(library_status(&gw, "audio.new"), 404);
    gw.signal("HUP");
    wait_until("reload after SIGHUP", Duration::from_secs(10), || {
        catalog_version(&gw) == 2
    });
    let reply = gw.post_audio(&gw.dev_key, r#"{"library":"audio.new"}"#);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["data"]["title"], "Fresh");
    assert_eq!(reply.json()["data"]["duration_sec"], 42);
}

#[test]
fn file_changes_reload_the_catalog() {
    let dir = test_catalog();
    let gw = Gateway::builder()
        .env("AUDIOLIB_CATALOG_DIR", dir.path().to_str().unwrap())
        .start();
    std::fs::write(dir.path().join("audio.new.toml"), NEW_LIBRARY).unwrap();
    wait_until(
        "reload after a file change",
        Duration::from_secs(10),
        || library_status(&gw, "audio.new") == 200,
    );
    std::fs::remove_file(dir.path().join("audio.new.toml")).unwrap();
    wait_until("reload after a removal", Duration::from_secs(10), || {
        library_status(&gw, "audio.new") == 404
    });
}

#[test]
fn a_bad_file_keeps_the_old_snapshot_and_names_file_and_line() {
    let dir = test_catalog();
    let gw = Gateway::builder()
        .env("AUDIOLIB_CATALOG_DIR", dir.path().to_str().unwrap())
        .env("AUDIOLIB_CATALOG_WATCH", "false")
        .start();
    let bad = "name = \"Focus\"\n[[track]]\ntitle = \"Broken\"\nkey = \"b.mp3\"\nduration_sec = \"long\"\n";
    std::fs::write(dir.path().join("audio.focus.toml"), bad).unwrap();
    std::fs::write(dir.path().join("audio.new.toml"), NEW_LIBRARY).unwrap();
    gw.signal("HUP");
    wait_until(
        "the reload error in the log",
        Duration::from_secs(10),
        || gw.log_text().contains("audio.focus.toml:5:"),
    );
    let log = gw.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("audio.focus.toml:5:"))
        .unwrap();
    assert!(
        line.contains("ERROR") && line.contains("keeping version 1"),
        "{line}"
    );
    // The old snapshot still serves, and nothing of the new files leaked in.
    assert_eq!(catalog_version(&gw), 1);
    let reply = gw.post_audio(&gw.dev_key, r#"{"library":"audio.focus"}"#);
    assert_eq!(reply.status, 200);
    assert_ne!(reply.json()["data"]["title"], "Broken");
    assert_eq!(library_status(&gw, "audio.new"), 404);

    // Fixed, the next reload takes everything.
    std::fs::write(
        dir.path().join("audio.focus.toml"),
        bad.replace("\"long\"", "60"),
    )
    .unwrap();
    gw.signal("HUP");
    wait_until("reload after the fix", Duration::from_secs(10), || {
        catalog_version(&gw) == 2
    });
    let reply = gw.post_audio(&gw.dev_key, r#"{"library":"audio.focus"}"#);
    assert_eq!(reply.json()["data"]["title"], "Broken");
    assert_eq!(library_status(&gw, "audio.new"), 200);
}

fn check(dir: &std::path::Path) -> (bool, String) {
    let (ok, out, err) = common::run(
        Command::new(env!("CARGO_BIN_EXE_audiolib"))
            .args(["catalog", "check"])
            .arg(dir),
    );
    (ok, out + &err)
}

#[test]
fn catalog_check_command() {
    let (ok, out) = check(&common::repo_path("catalog"));
    assert!(ok, "{out}");
    assert!(out.contains("audio.focus: 4 tracks, 3 active"), "{out}");

    let dir = test_catalog();
    std::fs::write(
        dir.path().join("audio.sleep.toml"),
        "[[track]]\ntitle = \"A\"\nkey = \"a\"\nduration_sec = 5\nweight = 0\n",
    )
    .unwrap();
    let (ok, out) = check(dir.path());
    assert!(!ok);
    assert!(
        out.contains("audio.sleep.toml:1: weight must be at least 1"),
        "{out}"
    );

    std::fs::remove_file(dir.path().join("audio.sleep.toml")).unwrap();
    std::fs::write(dir.path().join("Audio Sleep.toml"), NEW_LIBRARY).unwrap();
    let (ok, out) = check(dir.path());
    assert!(
        !ok && out.contains("is not a standard library name"),
        "{out}"
    );

    let (ok, out) = check(std::path::Path::new("/nonexistent/catalog"));
    assert!(!ok && out.contains("cannot read directory"), "{out}");
}

#[test]
fn a_bad_catalog_stops_start_up() {
    let dir = test_catalog();
    std::fs::write(dir.path().join("audio.bad.toml"), "[[track]]\ntitle = 3\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_audiolib"))
        .arg("serve")
        .env("AUDIOLIB_CATALOG_DIR", dir.path())
        .env(
            "AUDIOLIB_LISTEN",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .env(
            "AUDIOLIB_ADMIN_LISTEN",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .env("AUDIOLIB_PORTAL_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audio.bad.toml:2:"), "{err}");
}

#[test]
fn the_first_load_runs_while_healthz_answers_and_readyz_says_not_ready() {
    let dir = test_catalog();
    write_big_library(dir.path(), "audio.big", BIG);
    let gw = Gateway::builder()
        .env("AUDIOLIB_CATALOG_DIR", dir.path().to_str().unwrap())
        .no_wait_for_catalog()
        .start();
    // `start` returned on the first /healthz 200: the listeners are up with the load running.
    let ready = read_reply(agent().get(gw.url("/readyz")).call().unwrap());
    assert_eq!(ready.status, 503, "{:?}", ready.json());
    assert_eq!(
        ready.json(),
        serde_json::json!({"status": "not_ready", "catalog_version": 0, "store": "ok"})
    );
    // No library is known yet, and the answer says so rather than LIBRARY_NOT_FOUND.
    let reply = gw.post_audio(&gw.dev_key, r#"{"library":"audio.focus"}"#);
    let body = reply.assert_error(503, "SERVICE_UNAVAILABLE");
    assert_eq!(
        body["error"],
        "Service temporarily unavailable; retry later"
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
    // Checks before the catalog still come first.
    gw.post_audio("alp_0000000000000000000000000000000x", "{}")
        .assert_error(401, "INVALID_KEY");

    wait_until("the first load", Duration::from_secs(60), || {
        agent()
            .get(gw.url("/readyz"))
            .call()
            .is_ok_and(|r| r.status() == 200)
    });
    let ready = read_reply(agent().get(gw.url("/readyz")).call().unwrap());
    assert_eq!(ready.json()["catalog_version"], 1);
    for library in ["audio.focus", "audio.big"] {
        let reply = gw.post_audio(&gw.dev_key, &format!(r#"{{"library":"{library}"}}"#));
        assert_eq!(reply.status, 200, "{library}: {:?}", reply.json());
    }
    assert!(
        gw.log_text()
            .contains(&format!("version 1, 6 libraries, {} tracks", BIG + 11)),
        "{}",
        gw.log_text()
    );
}

#[test]
fn a_reload_under_load_fails_no_request() {
    let dir = test_catalog();
    let gw = Gateway::builder()
        .env("AUDIOLIB_CATALOG_DIR", dir.path().to_str().unwrap())
        .env("AUDIOLIB_CATALOG_WATCH", "false")
        .start();
    // Unlimited: the development key's 1,000 calls a month would run out under this loop.
    let (_, key) = gw.create_key("unlimited", None);
    let stop = AtomicBool::new(false);
    let served = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let first_failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        // Stops the clients however this scope ends, so a failed wait cannot hang the test.
        let _stop = StopOnDrop(&stop);
        for _ in 0..4 {
            scope.spawn(|| {
                let client = agent();
                while !stop.load(Ordering::Relaxed) {
                    let reply = client
                        .post(gw.url("/v1/audio"))
                        .header("Authorization", format!("Bearer {key}"))
                        .send(r#"{"library":"audio.focus"}"#)
                        .map(read_reply);
                    match reply {
                        Ok(r) if r.status == 200 => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                first_failures.lock().unwrap().push(format!("{other:?}"));
                            }
                        }
                    }
                }
            });
        }
        let failing = || failed.load(Ordering::Relaxed) > 0;
        wait_until(
            "the clients' first answers",
            Duration::from_secs(20),
            || served.load(Ordering::Relaxed) > 100 || failing(),
        );
        write_big_library(dir.path(), "audio.big", BIG);
        gw.signal("HUP");
        let at_signal = served.load(Ordering::Relaxed);
        wait_until("the reload", Duration::from_secs(60), || {
            catalog_version(&gw) == 2 || failing()
        });
        let during_load = served.load(Ordering::Relaxed) - at_signal;
        wait_until(
            "answers from the new snapshot",
            Duration::from_secs(20),
            || served.load(Ordering::Relaxed) > at_signal + during_load + 100 || failing(),
        );
        // The old snapshot answered all along: requests kept being served while loading.
        assert!(during_load > 0, "nothing served during the reload");
    });
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "first failures: {:?}",
        first_failures.lock().unwrap()
    );
    assert_eq!(catalog_version(&gw), 2);
    assert_eq!(library_status(&gw, "audio.big"), 200);
    assert!(
        gw.log_text().contains("version 2, 6 libraries"),
        "{}",
        gw.log_text()
    );
}

/// Sets its flag when dropped, on success or panic alike.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
