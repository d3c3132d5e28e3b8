//! Catalog snapshots (SPEC §5) on the real binary: reload on SIGHUP and on file change, a bad
//! file never replaces a good snapshot, and `audiolib catalog check`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Gateway, agent, read_reply, test_catalog, wait_until};

const NEW_LIBRARY: &str =
    "name = \"New\"\n[[track]]\ntitle = \"Fresh\"\nkey = \"new/fresh.mp3\"\nduration_sec = 42\n";

fn catalog_version(gw: &Gateway) -> u64 {
    let reply = read_reply(agent().get(gw.url("/readyz")).call().unwrap());
    reply.json()["catalog_version"].as_u64().unwrap()
}

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
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("audio.bad.toml:2:"), "{err}");
}
