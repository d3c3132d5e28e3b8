//! `audiolib serve --upgrade` (SPEC §7b): the new process takes the listening sockets over
//! from the running one, which drains, under continuous load, with no connection refused,
//! no request failed, and usage equal to the calls answered by both processes.

mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Gateway, read_raw_reply};

const BODY: &str = r#"{"library":"audio.focus"}"#;

/// What the clients saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    /// The first few failures, for the assertion message.
    problems: Mutex<Vec<String>>,
}

impl Tally {
    fn problem(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut problems = self.problems.lock().unwrap();
        if problems.len() < 10 {
            problems.push(what);
        }
    }
}

fn request(key: &str, close: bool) -> String {
    format!(
        "POST /v1/audio HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: {}\r\n{}\r\n{BODY}",
        BODY.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// Calls `/v1/audio` in a loop until `stop`: on a new connection each time, or on one
/// kept-alive connection replaced whenever the gateway says `Connection: close`.
fn client(addr: SocketAddr, key: &str, keep_alive: bool, stop: &AtomicBool, tally: &Tally) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::Relaxed) {
        let reused = conn.is_some();
        let mut reader = match conn.take() {
            Some(reader) => reader,
            None => match TcpStream::connect(addr) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    BufReader::new(s)
                }
                Err(e) => {
                    tally.problem(&tally.refused, format!("connect: {e}"));
                    continue;
                }
            },
        };
        if let Err(e) = reader
            .get_mut()
            .write_all(request(key, !keep_alive).as_bytes())
        {
            tally.problem(&tally.failed, format!("write (reused {reused}): {e}"));
            continue;
        }
        match read_raw_reply(&mut reader) {
            Some(reply) if reply.status == 200 => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                if keep_alive && reply.header("connection") != Some("close") {
                    conn = Some(reader);
                }
            }
            Some(reply) => tally.problem(
                &tally.failed,
                format!("{} {}", reply.status, String::from_utf8_lossy(&reply.body)),
            ),
            None => tally.problem(&tally.failed, format!("no answer (reused {reused})")),
        }
    }
}

#[test]
fn an_upgrade_under_load_refuses_nothing_and_fails_nothing() {
    upgrade_under_load(false);
}

#[test]
fn usage_is_exact_through_an_upgrade() {
    upgrade_under_load(true);
}

fn upgrade_under_load(exact_usage: bool) {
    // Stands in for systemd's notify socket (`Type=notify`, NotifyAccess=all).
    let systemd = tempfile::tempdir().unwrap();
    let notify_path = systemd.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut old = Gateway::builder()
        .env("NOTIFY_SOCKET", notify_path.to_str().unwrap())
        .start();
    let (id, key) = old.create_key("unlimited", None);
    let stop = AtomicBool::new(false);
    let tally = Tally::default();
    let new = std::thread::scope(|s| {
        for keep_alive in [false, false, true, true] {
            let (addr, key, stop, tally) = (old.addr, &key, &stop, &tally);
            s.spawn(move || client(addr, key, keep_alive, stop, tally));
        }
        let at_least = |n: u64| {
            common::wait_until("answers", Duration::from_secs(60), || {
                tally.ok.load(Ordering::Relaxed) >= n
            })
        };
        at_least(100);

        // The new process waits on the handoff socket; the old one is told to hand over.
        let new = old.upgrade();
        let sock = old.upgrade_sock();
        common::wait_until(
            "the new process's handoff socket",
            Duration::from_secs(20),
            || sock.exists(),
        );
        old.signal("QUIT");
        assert_eq!(
            old.wait_exit(Duration::from_secs(60)),
            0,
            "{}",
            old.log_text()
        );
        // The new process alone serves from here on.
        at_least(tally.ok.load(Ordering::Relaxed) + 200);
        stop.store(true, Ordering::Relaxed);
        new
    });

    let problems = tally.problems.lock().unwrap().clone();
    eprintln!(
        "answered {} calls through the upgrade, refused {}, failed {}",
        tally.ok.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed)
    );
    assert_eq!(tally.refused.load(Ordering::Relaxed), 0, "{problems:?}");
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "{problems:?}");
    let old_log = old.log_text();
    assert!(old_log.contains("listener sockets sent"), "{old_log}");
    assert!(!old_log.contains("panicked"), "{old_log}");
    let new_log = new.log_text();
    assert!(new_log.contains("Bootstrap done"), "{new_log}");
    assert!(new_log.contains("POST /v1/audio 200"), "{new_log}");
    // Both processes counted into the one store: nothing answered goes uncounted.
    let answered = tally.ok.load(Ordering::Relaxed);
    common::wait_until(
        "usage of every answered call",
        Duration::from_secs(10),
        || new.usage(&id) >= answered,
    );
    // Exactly the calls answered is SPEC §4a.4; 3 runs in 58 counted one lease block more
    // (the old process slow to exit): kept apart in `usage_is_exact_through_an_upgrade`.
    if exact_usage {
        new.wait_usage(&id, answered);
    }
    let ready = common::read_reply(common::agent().get(new.url("/readyz")).call().unwrap());
    assert_eq!(ready.json()["status"], "ready");
    // Each process told systemd it serves and is the main process, the new one after the old.
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0; 256];
    let notices: Vec<String> = (0..2)
        .map(|_| {
            let n = notify.recv(&mut buf).expect("a notice");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .collect();
    assert_eq!(
        notices,
        [
            format!("READY=1\nMAINPID={}\n", old.pid()),
            format!("READY=1\nMAINPID={}\n", new.pid())
        ]
    );
}

#[test]
fn sigquit_without_a_new_process_drains_and_exits() {
    let mut gw = Gateway::start();
    assert_eq!(gw.post_audio(&gw.dev_key, BODY).status, 200);
    gw.signal("QUIT");
    assert_eq!(gw.wait_exit(Duration::from_secs(60)), 0);
    let log = gw.log_text();
    assert!(
        log.contains("Unable to send listener sockets to new process"),
        "{log}"
    );
}

#[test]
fn a_second_gateway_on_a_taken_address_exits_with_the_setting_named() {
    let gw = Gateway::start();
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_audiolib"))
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("AUDIOLIB_LISTEN", gw.addr.to_string())
        .env(
            "AUDIOLIB_ADMIN_LISTEN",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .env("AUDIOLIB_PORTAL_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot listen on {} (setting `listen`, AUDIOLIB_LISTEN): ",
            gw.addr
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The running one is untouched.
    assert_eq!(gw.post_audio(&gw.dev_key, BODY).status, 200);
}
