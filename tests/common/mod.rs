//! Test harness: runs the real `audiolib` binary (and s3s-fs) on free loopback ports and
//! talks to them over HTTP. Readiness is polled, never slept for.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A port for a process a test starts, reserved until this test process exits.
///
/// Asking the kernel for a free port and releasing it races with everything else on the host:
/// a test running beside this one can be handed the same port before our process binds it, and
/// an outgoing connection can take it as its local port. Either way the process we start meets
/// someone else's listener, or a stopped and restarted one finds its port gone. So ports come
/// from below the kernel's ephemeral range, where no outgoing connection takes one, and each is
/// held with a lock on a file named after it, which the tests of every other process respect
/// and which the kernel drops when this process exits, however it exits.
pub fn free_port() -> u16 {
    reserve_ports(None)
}

/// A free port for a Redis Cluster node, with its bus port (the port + 10,000) reserved too:
/// both must be free, and `redis-server` refuses a cluster port above 55,535.
pub fn free_cluster_port() -> u16 {
    reserve_ports(Some(10_000))
}

/// The next port (and the one `bus` above it) that no other test process holds and nothing
/// listens on, taken in turn from a random start so that test processes rarely meet.
fn reserve_ports(bus: Option<u16>) -> u16 {
    struct Held {
        /// Where the next search starts, as an offset into the range.
        next: Option<u32>,
        /// The locks, released when the process exits.
        locks: Vec<std::fs::File>,
    }
    static HELD: std::sync::Mutex<Held> = std::sync::Mutex::new(Held {
        next: None,
        locks: Vec::new(),
    });
    // Outside the kernel's ephemeral range, where outgoing connections take their ports:
    // below it from 10,000 (Debian's range starts at 32,768), or above it on a host whose
    // range leaves more room there.
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let mut bounds = range
        .iter()
        .flat_map(|r| r.split_whitespace())
        .map_while(|n| n.parse::<u32>().ok());
    let (first, last) = (
        bounds.next().unwrap_or(32_768),
        bounds.next().unwrap_or(60_999),
    );
    // A port and its bus port both.
    let bus_gap = u32::from(bus.unwrap_or(0));
    let top = 65_536 - bus_gap;
    let below = 10_000..first.saturating_sub(bus_gap);
    let above = (last + 1).min(top)..top;
    let ports = if below.len() >= above.len() {
        below
    } else {
        above
    };
    let (low, span) = (ports.start, ports.len() as u32);
    assert!(
        span > 0,
        "no ports outside the ephemeral range {first}-{last}"
    );
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    let start = *held.next.get_or_insert_with(|| rand::random_range(0..span));
    for i in 0..span {
        let port = (low + (start + i) % span) as u16;
        let Some(lock) = reserve_port(port) else {
            continue;
        };
        let bus_lock = match bus {
            Some(offset) => match reserve_port(port + offset) {
                Some(l) => Some(l),
                None => continue,
            },
            None => None,
        };
        held.next = Some((start + i + 1) % span);
        held.locks
            .extend([Some(lock), bus_lock].into_iter().flatten());
        return port;
    }
    panic!("no free port in {low}..{}", low + span);
}

/// Locks `port`'s file in the shared directory, if no other test process holds it and
/// nothing listens on the port.
fn reserve_port(port: u16) -> Option<std::fs::File> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join("audiolib-test-ports");
    if std::fs::create_dir(&dir).is_ok() {
        // Shared by every user's tests, as /tmp is.
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777));
    }
    // A lock needs no write access: another user's file is opened for reading.
    let path = dir.join(port.to_string());
    let file = std::fs::File::open(&path)
        .or_else(|_| std::fs::File::create(&path))
        .ok()?;
    file.try_lock().ok()?;
    TcpListener::bind(("127.0.0.1", port)).ok()?;
    Some(file)
}

/// Polls `check` until it holds or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Where the browser tests find `playwright-core` and Chromium: `AUDIOLIB_NODE_MODULES` and
/// `AUDIOLIB_CHROMIUM`, else where `scripts/test` installs them.
pub fn browser_tools() -> (String, String) {
    let modules = std::env::var("AUDIOLIB_NODE_MODULES").unwrap_or_else(|_| {
        repo_path(".tools/node/node_modules")
            .to_string_lossy()
            .into_owned()
    });
    let chromium =
        std::env::var("AUDIOLIB_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    (modules, chromium)
}

/// An HTTP client that reports every status instead of failing on 4xx/5xx.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the error shape of the spec: status, code, and nothing but `error` and `code`
    /// (plus `limit` and `reset_at` on 429, `field` on INVALID_FIELD).
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        let body = self.json();
        assert_eq!(self.status, status, "body: {body}");
        assert_eq!(body["code"], code, "body: {body}");
        assert!(
            body["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        let allowed: &[&str] = match (status, code) {
            (429, _) => &["error", "code", "limit", "reset_at"],
            // The admin API names the field it refuses.
            (400, "INVALID_FIELD") => &["error", "code", "field"],
            _ => &["error", "code"],
        };
        for k in body.as_object().unwrap().keys() {
            assert!(
                allowed.contains(&k.as_str()),
                "unexpected field {k} in {body}"
            );
        }
        assert_eq!(self.header("content-type"), Some("application/json"));
        body
    }
}

pub fn read_reply(resp: http::Response<ureq::Body>) -> Reply {
    let (parts, mut body) = resp.into_parts();
    let mut bytes = Vec::new();
    body.as_reader().read_to_end(&mut bytes).expect("read body");
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: bytes,
    }
}

/// A running gateway process; killed when dropped.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The developer portal's listener.
    pub portal: SocketAddr,
    pub dev_key: String,
    pub log: PathBuf,
    /// How it was started, for [`Gateway::upgrade`].
    spec: GatewayBuilder,
    /// The working directory (and data directory), shared with an upgraded process.
    dir: std::sync::Arc<tempfile::TempDir>,
    /// Connections the readiness probe opened to an HTTPS listener and closed unused (0 or 1).
    tls_probes: AtomicU32,
}

#[derive(Clone)]
pub struct GatewayBuilder {
    env: Vec<(String, String)>,
    args: Vec<String>,
    /// Whether `start` waits for the first catalog load (it runs after the listeners are up).
    wait_for_catalog: bool,
}

impl GatewayBuilder {
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Returns from `start` as soon as the gateway answers `/healthz`, while the catalog may
    /// still be loading.
    pub fn no_wait_for_catalog(mut self) -> Self {
        self.wait_for_catalog = false;
        self
    }

    pub fn start(self) -> Gateway {
        let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
        let port = free_port();
        let mut admin_port = free_port();
        while admin_port == port {
            admin_port = free_port();
        }
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let mut portal_port = free_port();
        while portal_port == port || portal_port == admin_port {
            portal_port = free_port();
        }
        let portal: SocketAddr = format!("127.0.0.1:{portal_port}").parse().unwrap();
        let gateway = self.spawn(dir, addr, admin, portal, "gateway.log", &[]);
        gateway.wait_until_ready();
        gateway
    }

    /// Starts the process in `dir` on `addr` and `admin`, reads its development key.
    fn spawn(
        self,
        dir: std::sync::Arc<tempfile::TempDir>,
        addr: SocketAddr,
        admin: SocketAddr,
        portal: SocketAddr,
        log_name: &str,
        extra_args: &[&str],
    ) -> Gateway {
        let log = dir.path().join(log_name);
        // AUDIOLIB_TEST_BIN runs the suite against another build (an older release, say).
        let bin = std::env::var("AUDIOLIB_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_audiolib").to_string());
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .args(&self.args)
            .args(extra_args)
            // Run from an empty directory so conf/audiolib.toml is not picked up by accident.
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("AUDIOLIB_LISTEN", addr.to_string())
            .env("AUDIOLIB_ADMIN_LISTEN", admin.to_string())
            .env("AUDIOLIB_PORTAL_LISTEN", portal.to_string())
            .env("AUDIOLIB_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("AUDIOLIB_THREADS", "2")
            .env("AUDIOLIB_CATALOG_DIR", repo_path("catalog"))
            .env("AUDIOLIB_S3_BUCKET", "media")
            .env("AUDIOLIB_S3_ENDPOINT", "http://127.0.0.1:9")
            .env("AUDIOLIB_S3_PATH_STYLE", "true")
            .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
            .env("AWS_SECRET_ACCESS_KEY", "test-secret")
            // Tests share two cores; only the fault tests want the 50 ms production bound.
            .env("AUDIOLIB_STORE_TIMEOUT_MS", "1000")
            // Each gateway's own handoff socket, so parallel tests never meet.
            .env(
                "AUDIOLIB_UPGRADE_SOCK",
                dir.path().join("upgrade.sock").to_str().unwrap(),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in &self.env {
            if v.is_empty() {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        let mut child = cmd.spawn().expect("start audiolib");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        // Only the embedded store prints a development key.
        let embedded = !self
            .env
            .iter()
            .any(|(k, v)| k == "AUDIOLIB_REDIS_URL" && !v.is_empty());
        let dev_key = if embedded {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            line.split_whitespace()
                .last()
                .filter(|k| k.starts_with("alp_"))
                .unwrap_or_else(|| {
                    let log = std::fs::read_to_string(&log).unwrap_or_default();
                    panic!("no development key printed: {line:?}\nlog:\n{log}")
                })
                .to_string()
        } else {
            String::new()
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        Gateway {
            child,
            addr,
            admin,
            portal,
            dev_key,
            log,
            spec: self,
            dir,
            tls_probes: Default::default(),
        }
    }
}

impl Gateway {
    /// Polls until the public and admin listeners answer (and the catalog is loaded, unless
    /// the builder said not to wait for it).
    fn wait_until_ready(&self) {
        let url = self.url("/healthz");
        let admin_url = format!("http://{}/admin/keys", self.admin);
        // An HTTPS listener is up once it accepts (the tests' TLS clients are their own).
        let tls = self
            .spec
            .env
            .iter()
            .any(|(k, v)| k == "AUDIOLIB_TLS_CERT" && !v.is_empty());
        wait_until("gateway health", Duration::from_secs(20), || {
            let public = if tls {
                // One probe once it is up, so the probes stay within any connection cap.
                self.tls_probes() > 0.0 || {
                    let up = TcpStream::connect(self.addr).is_ok();
                    self.tls_probes.fetch_add(up.into(), Ordering::Relaxed);
                    up
                }
            } else {
                agent().get(&url).call().is_ok_and(|r| r.status() == 200)
            };
            public && agent().get(&admin_url).call().is_ok()
        });
        if self.spec.wait_for_catalog {
            wait_until("the first catalog load", Duration::from_secs(60), || {
                self.catalog_version() > 0
            });
        }
    }

    /// How many connections the readiness probe opened to an HTTPS listener: each ends in a
    /// failed handshake, counted whenever the gateway gets round to accepting it.
    pub fn tls_probes(&self) -> f64 {
        self.tls_probes.load(Ordering::Relaxed).into()
    }

    /// Starts `serve --upgrade` with the same settings and directory, which waits for this
    /// process's listening sockets (send this one SIGQUIT); returns once it has printed its
    /// development key, before it has the sockets.
    pub fn upgrade(&self) -> Gateway {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        self.spec.clone().spawn(
            self.dir.clone(),
            self.addr,
            self.admin,
            self.portal,
            &format!("gateway-upgraded-{n}.log"),
            &["--upgrade"],
        )
    }

    /// The path of the handoff socket.
    pub fn upgrade_sock(&self) -> PathBuf {
        self.dir.path().join("upgrade.sock")
    }

    /// Waits for the process to exit and returns its code (-1 for a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(code) = self.try_wait() {
                return code;
            }
            assert!(
                Instant::now() < deadline,
                "gateway still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            env: Vec::new(),
            args: Vec::new(),
            wait_for_catalog: true,
        }
    }

    pub fn start() -> Gateway {
        Self::builder().start()
    }

    /// Two gateway processes on one Redis: how tests show what holds on every node.
    pub fn two_on(redis: &RedisServer) -> (Gateway, Gateway) {
        let node = || {
            Self::builder()
                .env("AUDIOLIB_REDIS_URL", redis.url())
                .start()
        };
        (node(), node())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit code once the process has ended (-1 for a signal), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<i32> {
        self.child
            .try_wait()
            .unwrap()
            .map(|s| s.code().unwrap_or(-1))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn portal_url(&self, path: &str) -> String {
        format!("http://{}{}", self.portal, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The catalog version in use (0 while the first load runs), read from the admin
    /// listener's metrics so that polling it leaves no line in the access log.
    pub fn catalog_version(&self) -> u64 {
        metric(&self.metrics_text(), "audiolib_catalog_version") as u64
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `POST /v1/audio` with a bearer key and a body.
    pub fn post_audio(&self, key: &str, body: &str) -> Reply {
        let resp = agent()
            .post(self.url("/v1/audio"))
            .header("Authorization", format!("Bearer {key}"))
            .header("Content-Type", "application/json")
            .send(body)
            .expect("request");
        read_reply(resp)
    }

    /// Calls the admin API with the admin token.
    pub fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        let req = http::Request::builder()
            .method(method)
            .uri(self.admin_url(path))
            .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("Content-Type", "application/json")
            .body(body.map(|b| b.to_string()).unwrap_or_default())
            .unwrap();
        read_reply(agent().run(req).expect("admin request"))
    }

    /// Creates a key through the admin API and returns (id, secret).
    pub fn create_key(&self, plan: &str, monthly_limit: Option<Option<u64>>) -> (String, String) {
        let mut body = json!({"name": "test", "plan": plan});
        if let Some(limit) = monthly_limit {
            body["monthly_limit"] = json!(limit);
        }
        let reply = self.admin("POST", "/admin/keys", Some(body));
        assert_eq!(reply.status, 201, "{:?}", reply.json());
        let v = reply.json();
        (
            v["id"].as_str().unwrap().to_string(),
            v["key"].as_str().unwrap().to_string(),
        )
    }

    pub fn usage(&self, id: &str) -> u64 {
        let reply = self.admin("GET", &format!("/admin/keys/{id}"), None);
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        reply.json()["usage"].as_u64().unwrap()
    }

    /// Waits (up to 10 s) for usage to read `expected`: on Redis, nodes report what they served
    /// from quota leases a few times a second.
    pub fn wait_usage(&self, id: &str, expected: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut last = self.usage(id);
        while last != expected && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            last = self.usage(id);
        }
        assert_eq!(last, expected, "usage of {id}");
    }

    pub fn signal(&self, sig: &str) {
        send_signal(self.pid(), sig);
    }

    /// A new connection to the public listener whose reads give up after `limit`.
    pub fn connect(&self, limit: Duration) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(limit)).unwrap();
        s
    }

    /// Sends raw bytes on a fresh connection and returns everything read until close or
    /// `limit`.
    pub fn raw(&self, request: &[u8], limit: Duration) -> String {
        let mut s = self.connect(limit);
        s.write_all(request).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // A failing test says how its gateway ended and what it logged; the log's directory
        // goes with the test.
        if std::thread::panicking() {
            let status = match self.child.try_wait() {
                Ok(Some(status)) => format!("had exited: {status}"),
                _ => "was running".to_string(),
            };
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "gateway on {} (admin {}) {status}; the end of its log:",
                self.addr, self.admin
            );
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds a tool: an environment override, then `~/.cargo/bin`, then PATH.
pub fn tool(env: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_bin = Path::new(&home).join(".cargo/bin").join(name);
    if cargo_bin.exists() {
        return cargo_bin;
    }
    PathBuf::from(name)
}

/// An s3s-fs process serving `root` (buckets are its subdirectories); killed when dropped.
pub struct S3Server {
    child: Child,
    pub endpoint: String,
}

pub const S3_ACCESS_KEY: &str = "AKIDS3SFSTEST";
pub const S3_SECRET_KEY: &str = "s3s-fs-test-secret/with+chars";

impl S3Server {
    pub fn start(root: &Path) -> S3Server {
        let port = free_port();
        let bin = tool("S3S_FS", "s3s-fs");
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}); `scripts/test` installs it",
                    bin.display()
                )
            });
        let server = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        wait_until("s3s-fs", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        server
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A catalog directory with the shipped libraries plus two that cannot serve: one with no
/// tracks and one whose tracks are all inactive.
pub fn test_catalog() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo_path("catalog")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(dir.path().join("audio.empty.toml"), "name = \"Empty\"\n").unwrap();
    std::fs::write(
        dir.path().join("audio.retired.toml"),
        "[[track]]\ntitle = \"Old\"\nkey = \"old.mp3\"\nduration_sec = 5\nactive = false\n",
    )
    .unwrap();
    dir
}

/// Writes `<dir>/<library>.toml` with `tracks` tracks, big enough for a load that takes a
/// while (200,000 tracks: 18 MB, seconds in a debug build).
pub fn write_big_library(dir: &Path, library: &str, tracks: usize) {
    let mut text = String::with_capacity(tracks * 100);
    text.push_str("name = \"Big\"\n");
    for i in 0..tracks {
        text.push_str(&format!(
            "\n[[track]]\ntitle = \"Big {i}\"\nkey = \"big/{i}.mp3\"\nduration_sec = {}\n",
            1 + i % 600
        ));
    }
    // Written aside and renamed, so a watcher never sees half a file.
    let tmp = dir.join(format!(".{library}.partial"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{library}.toml"))).unwrap();
}

/// The passthrough origin (`tests/oracle/upstream.py`), plain or TLS; killed when dropped.
pub struct Upstream {
    child: Child,
    pub port: u16,
    /// The CA that signed the TLS certificate, when TLS is on.
    pub ca_file: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

pub fn python() -> String {
    std::env::var("AUDIOLIB_PYTHON").unwrap_or_else(|_| {
        let venv = repo_path(".venv/bin/python");
        if venv.exists() {
            venv.to_string_lossy().into_owned()
        } else {
            "python3".into()
        }
    })
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (scripts/test installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA (`ca.pem`) and a certificate for 127.0.0.1 and localhost signed by it
/// (`leaf.pem`, `leaf.key`).
pub fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=audiolib test CA",
    ]);
    openssl(dir, &ca);
    let mut leaf = vec!["req"];
    leaf.extend(ec);
    leaf.extend([
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &leaf);
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    );
}

impl Upstream {
    pub fn start(tls: bool) -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(python());
        cmd.arg(repo_path("tests/oracle/upstream.py"))
            .arg(port.to_string());
        let ca_file = if tls {
            make_certificates(dir.path());
            cmd.arg(dir.path().join("leaf.pem"))
                .arg(dir.path().join("leaf.key"));
            Some(dir.path().join("ca.pem"))
        } else {
            None
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python upstream");
        wait_until("upstream", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Upstream {
            child,
            port,
            ca_file,
            _dir: dir,
        }
    }

    /// The value for `AUDIOLIB_UPSTREAM`.
    pub fn address(&self) -> String {
        match self.ca_file {
            Some(_) => format!("https://127.0.0.1:{}", self.port),
            None => format!("127.0.0.1:{}", self.port),
        }
    }

    /// Calls the upstream directly (plain only).
    pub fn get(&self, path: &str) -> Reply {
        read_reply(
            agent()
                .get(format!("http://127.0.0.1:{}{path}", self.port))
                .call()
                .unwrap(),
        )
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An s3s-fs bucket `media` holding one object per library, and a catalog pointing at them.
pub struct Fixture {
    _root: tempfile::TempDir,
    pub catalog: tempfile::TempDir,
    pub s3: S3Server,
    /// (library, object key, bytes)
    pub objects: Vec<(String, String, Vec<u8>)>,
}

impl Fixture {
    pub fn new<S: AsRef<str>>(libraries: &[(S, &str)]) -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let catalog = tempfile::tempdir().unwrap();
        let mut objects = Vec::new();
        for (i, (library, key)) in libraries.iter().enumerate() {
            let path = root.path().join("media").join(key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let bytes: Vec<u8> = (0..4096u32).map(|b| (b * 31 + i as u32) as u8).collect();
            std::fs::write(&path, &bytes).unwrap();
            std::fs::write(
                catalog.path().join(format!("{}.toml", library.as_ref())),
                format!(
                    "[[track]]\ntitle = \"Track {i}\"\nkey = {}\nduration_sec = 10\n",
                    serde_json::to_string(key).unwrap()
                ),
            )
            .unwrap();
            objects.push((library.as_ref().to_string(), key.to_string(), bytes));
        }
        let s3 = S3Server::start(root.path());
        Fixture {
            _root: root,
            catalog,
            s3,
            objects,
        }
    }

    /// A gateway serving this catalog and signing for this bucket.
    pub fn gateway(&self) -> GatewayBuilder {
        Gateway::builder()
            .env(
                "AUDIOLIB_CATALOG_DIR",
                self.catalog.path().to_str().unwrap(),
            )
            .env("AUDIOLIB_S3_ENDPOINT", self.s3.endpoint.clone())
            .env("AUDIOLIB_S3_BUCKET", "media")
            .env("AUDIOLIB_S3_PATH_STYLE", "true")
            .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    }

    /// The bytes stored for `library`'s track.
    pub fn bytes_of(&self, library: &str) -> &[u8] {
        &self
            .objects
            .iter()
            .find(|(l, _, _)| l == library)
            .unwrap_or_else(|| panic!("no object for {library}"))
            .2
    }
}

/// A redis-server of the test's own on a free loopback port, persisting every write (AOF,
/// fsync always) so it can be killed and restarted without losing acknowledged data.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_on(free_port(), extra)
    }

    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server the hard way, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `sig` to the running server (`STOP`: a pause, as a stalled disk or a swapped-out
    /// process would cause).
    pub fn signal(&self, sig: &str) {
        send_signal(self.child.as_ref().expect("running").id(), sig);
    }

    /// Starts (again) on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test installs it)");
        self.child = Some(child);
        let port = self.port;
        wait_until("redis-server", Duration::from_secs(20), || {
            redis_cli(port, &["PING"]).is_some_and(|r| r.trim() == "PONG")
        });
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `sig` (`STOP`, `CONT`, `TERM`, ...) to process `pid`.
pub fn send_signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Runs a command to completion: (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run command");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs redis-cli against a port; `None` when it fails.
pub fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Three masters on loopback joined into a Redis Cluster.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_on(
                    free_cluster_port(),
                    &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                )
            })
            .collect();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend([
            "--cluster-replicas".into(),
            "0".into(),
            "--cluster-yes".into(),
        ]);
        let out = Command::new("redis-cli").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for node in &nodes {
            wait_until("cluster state ok", Duration::from_secs(20), || {
                redis_cli(node.port, &["CLUSTER", "INFO"])
                    .is_some_and(|i| i.contains("cluster_state:ok"))
            });
        }
        RedisCluster { nodes }
    }

    /// The value for `AUDIOLIB_REDIS_URL`: every node as a seed.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Fires `total` POST /v1/audio calls for `key` across `connections` threads spread over the
/// gateways (one keep-alive connection per thread), all released at once; returns statuses.
pub fn concurrent_calls(
    gateways: &[&Gateway],
    key: &str,
    connections: usize,
    total: usize,
) -> Vec<u16> {
    let start = std::sync::Arc::new(std::sync::Barrier::new(connections));
    let per = total / connections;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..connections)
            .map(|i| {
                let gw = gateways[i % gateways.len()];
                let start = start.clone();
                scope.spawn(move || {
                    let client = agent();
                    start.wait();
                    (0..per)
                        .map(|_| {
                            read_reply(
                                client
                                    .post(gw.url("/v1/audio"))
                                    .header("Authorization", format!("Bearer {key}"))
                                    .send(r#"{"library":"audio.sleep"}"#)
                                    .unwrap(),
                            )
                            .status
                        })
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

/// A value from a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

impl Gateway {
    pub fn metrics_text(&self) -> String {
        String::from_utf8(read_reply(agent().get(self.admin_url("/metrics")).call().unwrap()).body)
            .unwrap()
    }
}

/// One HTTP/1.1 response read off a raw connection.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads the next response (Content-Length or chunked body); `None` when the connection
/// closed before a status line.
pub fn read_raw_reply(reader: &mut impl BufRead) -> Option<RawReply> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (name, value) = l.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut reply = RawReply {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(n) = reply.header("content-length") {
        let mut body = vec![0; n.parse().ok()?];
        reader.read_exact(&mut body).ok()?;
        reply.body = body;
    } else if reply.header("transfer-encoding") == Some("chunked") {
        loop {
            line.clear();
            reader.read_line(&mut line).ok()?;
            let size = usize::from_str_radix(line.trim(), 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            reply.body.extend_from_slice(&chunk[..size]);
        }
    }
    Some(reply)
}
