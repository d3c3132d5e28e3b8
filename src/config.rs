//! Configuration (SPEC §7): a TOML file under `conf/`, every setting overridable from the
//! environment, validated once at start-up into [`Config`]. The serde file structs are kept
//! apart from the validated config so the rest of the program never sees a raw string it
//! would have to check again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::access_log::LogFormat;
use crate::forwarding::Cidr;
use crate::sign::{Credentials, MAX_TTL_SECS, S3Location};
use crate::store::redis::Wait;
use crate::store::redis::sentinel::{self, SentinelUrl};
use crate::tls::{TlsError, TlsFiles};

/// The file as written. Every field is optional: a missing one takes its default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub admin_token: Option<Secret>,
    pub threads: Option<usize>,
    pub catalog_dir: Option<PathBuf>,
    pub catalog_watch: Option<bool>,
    pub upstream: Option<String>,
    pub upstream_host: Option<String>,
    pub upstream_ca_file: Option<PathBuf>,
    pub cors_origins: Option<Vec<String>>,
    pub trusted_proxies: Option<Vec<String>>,
    pub max_body_bytes: Option<usize>,
    pub default_plan: Option<String>,
    pub shutdown_grace_secs: Option<u64>,
    pub h2c: Option<bool>,
    pub upgrade_sock: Option<PathBuf>,
    #[serde(default)]
    pub tls: TlsFile,
    #[serde(default)]
    pub store: StoreFile,
    #[serde(default)]
    pub s3: S3File,
    pub plans: Option<BTreeMap<String, PlanFile>>,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub key_cache: KeyCacheFile,
    #[serde(default)]
    pub log: LogFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    pub redis_url: Option<Secret>,
    pub data_dir: Option<PathBuf>,
    pub failure: Option<String>,
    pub timeout_ms: Option<u64>,
    pub redis_wait_replicas: Option<u32>,
    pub redis_wait_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3File {
    pub endpoint: Option<String>,
    pub bucket: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    pub url_ttl_secs: Option<u64>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    /// Absent: unlimited (metered, never refused).
    pub monthly_limit: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub header_timeout_secs: Option<u64>,
    pub max_header_bytes: Option<usize>,
    pub body_timeout_secs: Option<u64>,
    pub keepalive_secs: Option<u64>,
    pub max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyCacheFile {
    pub capacity: Option<u64>,
    pub ttl_secs: Option<u64>,
    pub negative_capacity: Option<u64>,
    pub negative_ttl_secs: Option<u64>,
}

/// What to do while the store cannot be reached (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    FailOpen,
    FailClosed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub monthly_limit: Option<u64>,
}

/// Where passthrough traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port` to connect to.
    pub address: String,
    pub tls: bool,
    /// SNI and certificate name for TLS.
    pub sni: String,
    /// Host header to send instead of the client's, if set.
    pub host_header: Option<String>,
}

/// CORS origins allowed to call the API from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    Any,
    List(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub header_timeout: Duration,
    /// Total size of request headers (names, values, separators) before a 431.
    pub max_header_bytes: usize,
    pub body_timeout: Duration,
    pub keepalive: Duration,
    /// Client connections served at once; more are closed when accepted.
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCacheConfig {
    pub capacity: u64,
    pub ttl: Duration,
    pub negative_capacity: u64,
    pub negative_ttl: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<Secret>,
    pub threads: usize,
    pub catalog_dir: PathBuf,
    /// Reload the catalog when its files change (SIGHUP always reloads).
    pub catalog_watch: bool,
    pub upstream: Option<Upstream>,
    /// CA bundle for verifying a TLS upstream instead of the system roots.
    pub upstream_ca_file: Option<PathBuf>,
    pub cors: CorsOrigins,
    /// Peers whose `X-Forwarded-*` headers are believed (and appended to).
    pub trusted_proxies: Vec<Cidr>,
    pub max_body_bytes: usize,
    /// May hold a password: a [`Secret`]; logs show it through [`redact_url`].
    pub redis_url: Option<Secret>,
    /// `WAIT` for this many replicas after every Redis write (SPEC §4a.6); `None` for 0.
    pub redis_wait: Option<Wait>,
    /// Where the embedded store keeps its file (used when there is no Redis).
    pub data_dir: PathBuf,
    pub failure_policy: FailurePolicy,
    /// Bound on every store call; past it the call counts as failed.
    pub store_timeout: Duration,
    pub s3: S3Location,
    pub credentials: Option<Credentials>,
    pub url_ttl: Duration,
    pub plans: BTreeMap<String, Plan>,
    pub default_plan: String,
    pub limits: Limits,
    pub key_cache: KeyCacheConfig,
    pub shutdown_grace: Duration,
    /// Access log lines: `text` or `json`.
    pub log_format: LogFormat,
    /// HTTPS on the public listener when set (a checked, loadable pair).
    pub tls: Option<TlsFiles>,
    /// HTTP/2 with prior knowledge on a plain public listener.
    pub h2c: bool,
    /// Where `serve --upgrade` receives the listening sockets of the running process.
    pub upgrade_sock: PathBuf,
}

/// A setting that must never reach a log, an error message or `Debug` output (the admin
/// token, the Redis URL with its password, the S3 secret): `Debug` prints `Secret(***)`, and
/// the value is read only through [`Secret::expose`], so every use is visible in review.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// A URL (or a comma-separated list of them) with each password replaced by `***`, for logs
/// and error messages: `redis://user:pw@host:6379/0` → `redis://user:***@host:6379/0`.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let Some((scheme, rest)) = url.split_once("://") else {
                return url.to_string();
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                    let hidden = if userinfo.contains(':') { ":***" } else { "" };
                    format!("{scheme}://{user}{hidden}@{host}{tail}")
                }
                None => url.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `text` with the password of every URL in `urls` replaced by `***`: for error messages from
/// code that quotes a URL whole.
pub fn redact_passwords_in(text: &str, urls: &str) -> String {
    let mut text = text.to_string();
    for url in urls.split(',') {
        let password = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split(['/', '?', '#']).next())
            .and_then(|authority| authority.rsplit_once('@'))
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, password)| password);
        if let Some(password) = password.filter(|p| !p.is_empty()) {
            text = text.replace(password, "***");
        }
    }
    text
}

/// Looks up an environment variable; tests pass a map instead of the process environment.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Env for BTreeMap<&str, &str> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).map(|v| v.to_string())
    }
}

/// The default file `audiolib serve` reads when it exists and no `--config` is given.
pub const DEFAULT_FILE: &str = "conf/audiolib.toml";

/// Reads and parses a config file; the error names the file and line.
pub fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start].matches('\n').count() + 1)
            .unwrap_or(1);
        format!("{}:{line}: {}", path.display(), e.message())
    })
}

/// Collects every problem instead of stopping at the first, so one run shows them all.
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, setting: &str, env: Option<&str>, problem: impl std::fmt::Display) {
        match env {
            Some(env) => self
                .0
                .push(format!("setting `{setting}` ({env}): {problem}")),
            None => self.0.push(format!("setting `{setting}`: {problem}")),
        }
    }
}

/// Takes the environment value if set, else the file's, else `None`, parsing the former.
fn pick<T: std::str::FromStr>(
    problems: &mut Problems,
    env: &dyn Env,
    name: &str,
    setting: &str,
    file: Option<T>,
) -> Option<T>
where
    T::Err: std::fmt::Display,
{
    match env.get(name) {
        Some(raw) => match raw.trim().parse() {
            Ok(v) => Some(v),
            Err(e) => {
                problems.add(setting, Some(name), format!("cannot parse '{raw}': {e}"));
                None
            }
        },
        None => file,
    }
}

fn parse_addr(problems: &mut Problems, setting: &str, env: &str, raw: &str) -> SocketAddr {
    raw.parse().unwrap_or_else(|e| {
        problems.add(
            setting,
            Some(env),
            format!("'{raw}' is not an IP:port address ({e})"),
        );
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

impl Config {
    /// Built-in defaults overridden by `file`, then by the environment, then validated.
    pub fn build(file: FileConfig, env: &dyn Env) -> Result<Config, Vec<String>> {
        let mut p = Problems(Vec::new());
        let p = &mut p;

        let listen = pick(p, env, "AUDIOLIB_LISTEN", "listen", file.listen)
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = parse_addr(p, "listen", "AUDIOLIB_LISTEN", &listen);
        let admin = pick(
            p,
            env,
            "AUDIOLIB_ADMIN_LISTEN",
            "admin_listen",
            file.admin_listen,
        )
        .unwrap_or_else(|| "127.0.0.1:9180".into());
        let admin_listen = parse_addr(p, "admin_listen", "AUDIOLIB_ADMIN_LISTEN", &admin);
        if admin_listen == listen {
            p.add("admin_listen", None, "must differ from `listen`");
        }
        let admin_token = pick(
            p,
            env,
            "AUDIOLIB_ADMIN_TOKEN",
            "admin_token",
            file.admin_token,
        );
        if admin_token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            p.add(
                "admin_token",
                Some("AUDIOLIB_ADMIN_TOKEN"),
                "must be at least 16 characters",
            );
        }

        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = pick(p, env, "AUDIOLIB_THREADS", "threads", file.threads).unwrap_or(cores);
        if !(1..=1024).contains(&threads) {
            p.add(
                "threads",
                Some("AUDIOLIB_THREADS"),
                "must be between 1 and 1024",
            );
        }

        let catalog_dir = pick(
            p,
            env,
            "AUDIOLIB_CATALOG_DIR",
            "catalog_dir",
            file.catalog_dir,
        )
        .unwrap_or_else(|| PathBuf::from("catalog"));
        let catalog_watch = pick(
            p,
            env,
            "AUDIOLIB_CATALOG_WATCH",
            "catalog_watch",
            file.catalog_watch,
        )
        .unwrap_or(true);

        let upstream_host = pick(
            p,
            env,
            "AUDIOLIB_UPSTREAM_HOST",
            "upstream_host",
            file.upstream_host,
        );
        let upstream =
            pick(p, env, "AUDIOLIB_UPSTREAM", "upstream", file.upstream).and_then(|raw| {
                match parse_upstream(&raw, upstream_host) {
                    Ok(u) => Some(u),
                    Err(e) => {
                        p.add("upstream", Some("AUDIOLIB_UPSTREAM"), e);
                        None
                    }
                }
            });

        let upstream_ca_file = pick(
            p,
            env,
            "AUDIOLIB_UPSTREAM_CA_FILE",
            "upstream_ca_file",
            file.upstream_ca_file,
        );
        if let Some(path) = &upstream_ca_file
            && !path.is_file()
        {
            p.add(
                "upstream_ca_file",
                Some("AUDIOLIB_UPSTREAM_CA_FILE"),
                format!("{} is not a readable file", path.display()),
            );
        }

        let cors = match env.get("AUDIOLIB_CORS_ORIGINS") {
            Some(raw) => raw.split(',').map(|s| s.trim().to_string()).collect(),
            None => file.cors_origins.unwrap_or_else(|| vec!["*".into()]),
        };
        let cors = if cors.iter().any(|o| o == "*") {
            CorsOrigins::Any
        } else {
            for origin in &cors {
                if !(origin.starts_with("http://") || origin.starts_with("https://"))
                    || origin.ends_with('/')
                {
                    p.add(
                        "cors_origins",
                        Some("AUDIOLIB_CORS_ORIGINS"),
                        format!("'{origin}' is not an origin like https://app.example.com"),
                    );
                }
            }
            CorsOrigins::List(cors)
        };

        let trusted_proxies = match env.get("AUDIOLIB_TRUSTED_PROXIES") {
            Some(raw) => raw.split(',').map(|s| s.trim().to_string()).collect(),
            None => file.trusted_proxies.unwrap_or_default(),
        };
        let trusted_proxies = trusted_proxies
            .iter()
            .filter_map(|raw| match raw.parse::<Cidr>() {
                Ok(cidr) => Some(cidr),
                Err(e) => {
                    p.add("trusted_proxies", Some("AUDIOLIB_TRUSTED_PROXIES"), e);
                    None
                }
            })
            .collect();

        let max_body_bytes = pick(
            p,
            env,
            "AUDIOLIB_MAX_BODY_BYTES",
            "max_body_bytes",
            file.max_body_bytes,
        )
        .unwrap_or(16 * 1024);
        if !(64..=1 << 20).contains(&max_body_bytes) {
            p.add(
                "max_body_bytes",
                Some("AUDIOLIB_MAX_BODY_BYTES"),
                "must be between 64 and 1048576",
            );
        }

        let redis_url = pick(
            p,
            env,
            "AUDIOLIB_REDIS_URL",
            "store.redis_url",
            file.store.redis_url,
        );
        let redis_kind = redis_url
            .as_ref()
            .map(|url| match check_redis_url(url.expose()) {
                Ok(kind) => kind,
                Err(e) => {
                    let e = redact_passwords_in(&e, url.expose());
                    p.add("store.redis_url", Some("AUDIOLIB_REDIS_URL"), e);
                    RedisKind::Single
                }
            });
        let data_dir = pick(
            p,
            env,
            "AUDIOLIB_DATA_DIR",
            "store.data_dir",
            file.store.data_dir,
        )
        .unwrap_or_else(|| PathBuf::from("data"));
        let failure = pick(
            p,
            env,
            "AUDIOLIB_STORE_FAILURE",
            "store.failure",
            file.store.failure,
        )
        .unwrap_or_else(|| "fail_open".into());
        let failure_policy = match failure.as_str() {
            "fail_open" => FailurePolicy::FailOpen,
            "fail_closed" => FailurePolicy::FailClosed,
            other => {
                p.add(
                    "store.failure",
                    Some("AUDIOLIB_STORE_FAILURE"),
                    format!("'{other}' is not one of fail_open, fail_closed"),
                );
                FailurePolicy::FailOpen
            }
        };

        let store_timeout = Duration::from_millis(
            pick(
                p,
                env,
                "AUDIOLIB_STORE_TIMEOUT_MS",
                "store.timeout_ms",
                file.store.timeout_ms,
            )
            .unwrap_or(50),
        );
        if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&store_timeout) {
            p.add(
                "store.timeout_ms",
                Some("AUDIOLIB_STORE_TIMEOUT_MS"),
                "must be between 1 and 10000",
            );
        }

        // Sentinel is there for failover, which loses unconfirmed writes: WAIT for one
        // replica by default there, not elsewhere.
        let wait_replicas = pick(
            p,
            env,
            "AUDIOLIB_REDIS_WAIT_REPLICAS",
            "store.redis_wait_replicas",
            file.store.redis_wait_replicas,
        )
        .unwrap_or(u32::from(redis_kind == Some(RedisKind::Sentinel)));
        let wait_timeout = Duration::from_millis(
            pick(
                p,
                env,
                "AUDIOLIB_REDIS_WAIT_TIMEOUT_MS",
                "store.redis_wait_timeout_ms",
                file.store.redis_wait_timeout_ms,
            )
            .unwrap_or(store_timeout.as_millis() as u64 / 2),
        );
        if wait_replicas > 0 {
            if redis_kind == Some(RedisKind::Cluster) {
                p.add(
                    "store.redis_wait_replicas",
                    Some("AUDIOLIB_REDIS_WAIT_REPLICAS"),
                    "WAIT is not supported on Redis Cluster; set it to 0",
                );
            }
            if wait_timeout.is_zero() || wait_timeout >= store_timeout {
                p.add(
                    "store.redis_wait_timeout_ms",
                    Some("AUDIOLIB_REDIS_WAIT_TIMEOUT_MS"),
                    format!(
                        "must be at least 1 and below store.timeout_ms ({} ms), or the call gives up before WAIT answers",
                        store_timeout.as_millis()
                    ),
                );
            }
        }
        let redis_wait = (redis_kind.is_some() && wait_replicas > 0).then_some(Wait {
            replicas: wait_replicas,
            timeout: wait_timeout,
        });

        let s3 = file.s3;
        let region = pick(p, env, "AUDIOLIB_S3_REGION", "s3.region", s3.region)
            .unwrap_or_else(|| "us-east-1".into());
        if region.is_empty()
            || !region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            p.add(
                "s3.region",
                Some("AUDIOLIB_S3_REGION"),
                format!("'{region}' is not a region name"),
            );
        }
        let endpoint = pick(p, env, "AUDIOLIB_S3_ENDPOINT", "s3.endpoint", s3.endpoint)
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let bucket = pick(p, env, "AUDIOLIB_S3_BUCKET", "s3.bucket", s3.bucket).unwrap_or_default();
        let path_style = pick(
            p,
            env,
            "AUDIOLIB_S3_PATH_STYLE",
            "s3.path_style",
            s3.path_style,
        )
        .unwrap_or(false);
        let (scheme, endpoint_authority) = match parse_endpoint(&endpoint) {
            Ok(parts) => parts,
            Err(e) => {
                p.add("s3.endpoint", Some("AUDIOLIB_S3_ENDPOINT"), e);
                Default::default()
            }
        };
        if !bucket.is_empty() && !path_style && !is_dns_bucket(&bucket) {
            p.add(
                "s3.bucket",
                Some("AUDIOLIB_S3_BUCKET"),
                format!("'{bucket}' cannot be a host name; set s3.path_style = true"),
            );
        }
        let ttl = pick(
            p,
            env,
            "AUDIOLIB_URL_TTL_SECS",
            "s3.url_ttl_secs",
            s3.url_ttl_secs,
        )
        .unwrap_or(3600);
        if !(1..=MAX_TTL_SECS).contains(&ttl) {
            p.add(
                "s3.url_ttl_secs",
                Some("AUDIOLIB_URL_TTL_SECS"),
                format!(
                    "must be between 1 and {MAX_TTL_SECS} (S3 refuses more than 7 days), got {ttl}"
                ),
            );
        }
        let access = env.get("AWS_ACCESS_KEY_ID").or(s3.access_key_id);
        let secret = env
            .get("AWS_SECRET_ACCESS_KEY")
            .or(s3.secret_access_key.map(Secret::into_inner));
        let token = env
            .get("AWS_SESSION_TOKEN")
            .or(s3.session_token.map(Secret::into_inner));
        let credentials = match (access, secret) {
            (Some(access_key_id), Some(secret_access_key)) => Some(Credentials {
                access_key_id,
                secret_access_key,
                session_token: token,
            }),
            (None, None) => None,
            _ => {
                p.add(
                    "s3.access_key_id",
                    Some("AWS_ACCESS_KEY_ID"),
                    "an access key id and a secret access key go together; one is missing",
                );
                None
            }
        };

        let plans: BTreeMap<String, Plan> = match file.plans {
            Some(plans) => plans
                .into_iter()
                .map(|(name, plan)| {
                    (
                        name,
                        Plan {
                            monthly_limit: plan.monthly_limit,
                        },
                    )
                })
                .collect(),
            None => BTreeMap::from([
                (
                    "free".to_string(),
                    Plan {
                        monthly_limit: Some(1000),
                    },
                ),
                (
                    "pro".to_string(),
                    Plan {
                        monthly_limit: Some(100_000),
                    },
                ),
                (
                    "unlimited".to_string(),
                    Plan {
                        monthly_limit: None,
                    },
                ),
            ]),
        };
        if plans.is_empty() {
            p.add("plans", None, "at least one plan is needed");
        }
        let default_plan = pick(
            p,
            env,
            "AUDIOLIB_DEFAULT_PLAN",
            "default_plan",
            file.default_plan,
        )
        .unwrap_or_else(|| "free".into());
        if !plans.is_empty() && !plans.contains_key(&default_plan) {
            p.add(
                "default_plan",
                Some("AUDIOLIB_DEFAULT_PLAN"),
                format!("'{default_plan}' is not one of the plans"),
            );
        }

        let secs = |v: Option<u64>, default: u64| Duration::from_secs(v.unwrap_or(default));
        let limits = Limits {
            header_timeout: secs(file.limits.header_timeout_secs, 10),
            max_header_bytes: file.limits.max_header_bytes.unwrap_or(16 * 1024),
            body_timeout: secs(file.limits.body_timeout_secs, 10),
            keepalive: secs(file.limits.keepalive_secs, 60),
            max_connections: pick(
                p,
                env,
                "AUDIOLIB_MAX_CONNECTIONS",
                "limits.max_connections",
                file.limits.max_connections,
            )
            .unwrap_or(10_000),
        };
        if !(1..=1_000_000).contains(&limits.max_connections) {
            p.add(
                "limits.max_connections",
                Some("AUDIOLIB_MAX_CONNECTIONS"),
                "must be between 1 and 1000000",
            );
        }
        for (name, value) in [
            ("limits.header_timeout_secs", limits.header_timeout),
            ("limits.body_timeout_secs", limits.body_timeout),
            ("limits.keepalive_secs", limits.keepalive),
        ] {
            if value.is_zero() || value > Duration::from_secs(3600) {
                p.add(name, None, "must be between 1 and 3600 seconds");
            }
        }
        if !(1024..=1 << 20).contains(&limits.max_header_bytes) {
            p.add(
                "limits.max_header_bytes",
                None,
                "must be between 1024 and 1048576",
            );
        }
        let kc = file.key_cache;
        let key_cache = KeyCacheConfig {
            capacity: kc.capacity.unwrap_or(100_000),
            ttl: secs(kc.ttl_secs, 60),
            negative_capacity: kc.negative_capacity.unwrap_or(10_000),
            negative_ttl: secs(kc.negative_ttl_secs, 5),
        };
        if key_cache.capacity == 0 || key_cache.ttl.is_zero() {
            p.add("key_cache", None, "capacity and ttl_secs must be positive");
        }
        let shutdown_grace = Duration::from_secs(
            pick(
                p,
                env,
                "AUDIOLIB_SHUTDOWN_GRACE_SECS",
                "shutdown_grace_secs",
                file.shutdown_grace_secs,
            )
            .unwrap_or(10),
        );

        let log_format =
            match pick(p, env, "AUDIOLIB_LOG_FORMAT", "log.format", file.log.format).as_deref() {
                None | Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    p.add(
                        "log.format",
                        Some("AUDIOLIB_LOG_FORMAT"),
                        format!("'{other}' is not one of text, json"),
                    );
                    LogFormat::Text
                }
            };

        let tls = build_tls(p, env, file.tls);
        let h2c = pick(p, env, "AUDIOLIB_H2C", "h2c", file.h2c).unwrap_or(false);
        if h2c && tls.is_some() {
            p.add(
                "h2c",
                Some("AUDIOLIB_H2C"),
                "applies to a plain listener only; with TLS, HTTP/2 is negotiated by ALPN",
            );
        }
        let upgrade_sock = pick(
            p,
            env,
            "AUDIOLIB_UPGRADE_SOCK",
            "upgrade_sock",
            file.upgrade_sock,
        )
        .unwrap_or_else(|| PathBuf::from(DEFAULT_UPGRADE_SOCK));
        // sockaddr_un holds 108 bytes, the last a NUL.
        if upgrade_sock.as_os_str().len() > 107 || upgrade_sock.as_os_str().is_empty() {
            p.add(
                "upgrade_sock",
                Some("AUDIOLIB_UPGRADE_SOCK"),
                "must be a path of 1 to 107 bytes (a Unix socket)",
            );
        }
        if !p.0.is_empty() {
            return Err(std::mem::take(&mut p.0));
        }
        Ok(Config {
            listen,
            admin_listen,
            admin_token,
            threads,
            catalog_dir,
            catalog_watch,
            upstream,
            upstream_ca_file,
            cors,
            trusted_proxies,
            max_body_bytes,
            redis_url,
            redis_wait,
            data_dir,
            failure_policy,
            store_timeout,
            s3: S3Location {
                scheme,
                endpoint_authority,
                bucket,
                region,
                path_style,
            },
            credentials,
            url_ttl: Duration::from_secs(ttl),
            plans,
            default_plan,
            limits,
            key_cache,
            shutdown_grace,
            log_format,
            tls,
            h2c,
            upgrade_sock,
        })
    }

    /// Loads `path` (or the default file when it exists, or nothing) and the environment.
    pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Config, Vec<String>> {
        let file = match path {
            Some(path) => read_file(path).map_err(|e| vec![e])?,
            None if Path::new(DEFAULT_FILE).exists() => {
                read_file(Path::new(DEFAULT_FILE)).map_err(|e| vec![e])?
            }
            None => FileConfig::default(),
        };
        Config::build(file, env)
    }
}

/// Where `serve --upgrade` and the running process meet, unless `upgrade_sock` says otherwise.
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/audiolib-upgrade.sock";

/// The `[tls]` section: both files or neither, each pair loadable (so a bad one is refused
/// at start and by `config check`, not at the first handshake).
fn build_tls(p: &mut Problems, env: &dyn Env, file: TlsFile) -> Option<TlsFiles> {
    const CERT: (&str, &str) = ("tls.cert_file", "AUDIOLIB_TLS_CERT");
    const KEY: (&str, &str) = ("tls.key_file", "AUDIOLIB_TLS_KEY");
    let cert = pick(p, env, CERT.1, CERT.0, file.cert_file);
    let key = pick(p, env, KEY.1, KEY.0, file.key_file);
    let files = match (cert, key) {
        (None, None) => return None,
        (Some(cert_file), Some(key_file)) => TlsFiles {
            cert_file,
            key_file,
        },
        (Some(_), None) => {
            p.add(KEY.0, Some(KEY.1), "is needed with tls.cert_file");
            return None;
        }
        (None, Some(_)) => {
            p.add(CERT.0, Some(CERT.1), "is needed with tls.key_file");
            return None;
        }
    };
    match crate::tls::load_pair(&files) {
        Ok(_) => Some(files),
        Err(TlsError::Cert(e)) => {
            p.add(CERT.0, Some(CERT.1), e);
            None
        }
        Err(TlsError::Key(e)) => {
            p.add(KEY.0, Some(KEY.1), e);
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RedisKind {
    Single,
    Cluster,
    Sentinel,
}

/// One `redis://` or `rediss://` URL, a comma list of them (cluster seeds), or one
/// `redis+sentinel://` URL (its grammar in [`SentinelUrl`]).
fn check_redis_url(url: &str) -> Result<RedisKind, String> {
    let url = url.trim();
    if url.starts_with(sentinel::SCHEME) {
        return SentinelUrl::parse(url).map(|_| RedisKind::Sentinel);
    }
    let parts: Vec<&str> = url.split(',').map(str::trim).collect();
    for part in &parts {
        if !(part.starts_with("redis://") || part.starts_with("rediss://")) {
            return Err(format!(
                "'{part}' is not a redis://, rediss:// or redis+sentinel:// URL"
            ));
        }
    }
    Ok(if parts.len() == 1 {
        RedisKind::Single
    } else {
        RedisKind::Cluster
    })
}

/// `http[s]://host[:port]` → (scheme, authority without the scheme's default port).
fn parse_endpoint(raw: &str) -> Result<(String, String), String> {
    let uri: http::Uri = raw
        .parse()
        .map_err(|e| format!("'{raw}' is not a URL: {e}"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    if scheme != "http" && scheme != "https" {
        return Err(format!("'{raw}' must start with http:// or https://"));
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!("'{raw}' must not have a path or query"));
    }
    let host = uri.host().ok_or_else(|| format!("'{raw}' has no host"))?;
    let authority = match uri.port_u16() {
        Some(443) if scheme == "https" => host.to_string(),
        Some(80) if scheme == "http" => host.to_string(),
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    Ok((scheme.to_string(), authority))
}

/// `host:port` (plain) or `https://host[:port]` (TLS, port 443 by default).
fn parse_upstream(raw: &str, host_header: Option<String>) -> Result<Upstream, String> {
    let (tls, rest) = match raw.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, raw.strip_prefix("http://").unwrap_or(raw)),
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(format!("'{raw}' must be host:port or https://host[:port]"));
    }
    let authority: http::uri::Authority = rest
        .parse()
        .map_err(|e| format!("'{raw}' is not host:port: {e}"))?;
    let port = match (authority.port_u16(), tls) {
        (Some(p), _) => p,
        (None, true) => 443,
        (None, false) => return Err(format!("'{raw}' needs a port (host:port)")),
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let address = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(Upstream {
        address,
        tls,
        sni: host.to_string(),
        host_header,
    })
}

/// Virtual-host style needs a bucket that is a valid DNS label sequence.
fn is_dns_bucket(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.'])
        && !bucket.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(toml: &str, env: &[(&str, &str)]) -> Result<Config, Vec<String>> {
        let file: FileConfig = toml::from_str(toml).unwrap();
        Config::build(file, &env.iter().copied().collect::<BTreeMap<_, _>>())
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = build("", &[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9180");
        assert_eq!(c.admin_token, None);
        assert_eq!(c.redis_url, None);
        assert_eq!(c.failure_policy, FailurePolicy::FailOpen);
        assert_eq!(c.catalog_dir, PathBuf::from("catalog"));
        assert_eq!(c.s3.region, "us-east-1");
        assert_eq!(c.s3.endpoint_authority, "s3.us-east-1.amazonaws.com");
        assert!(!c.s3.path_style);
        assert_eq!(c.url_ttl, Duration::from_secs(3600));
        assert_eq!(c.credentials, None);
        assert_eq!(c.upstream, None);
        assert_eq!(c.cors, CorsOrigins::Any);
        assert_eq!(c.max_body_bytes, 16384);
        assert_eq!(c.plans["free"].monthly_limit, Some(1000));
        assert_eq!(c.default_plan, "free");
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = build(
            "listen = \"127.0.0.1:1\"\n[s3]\nbucket = \"a-bucket\"\n",
            &[
                ("AUDIOLIB_LISTEN", "127.0.0.1:2"),
                ("AUDIOLIB_S3_ENDPOINT", "http://127.0.0.1:9000"),
                ("AUDIOLIB_S3_PATH_STYLE", "true"),
                ("AUDIOLIB_UPSTREAM", "https://cdn.example.com"),
                (
                    "AUDIOLIB_CORS_ORIGINS",
                    "https://a.example, https://b.example",
                ),
                ("AWS_ACCESS_KEY_ID", "AK"),
                ("AWS_SECRET_ACCESS_KEY", "SK"),
            ],
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:2");
        assert_eq!(c.s3.bucket, "a-bucket");
        assert_eq!(c.s3.scheme, "http");
        assert_eq!(c.s3.endpoint_authority, "127.0.0.1:9000");
        assert!(c.s3.path_style);
        let up = c.upstream.unwrap();
        assert_eq!((up.address.as_str(), up.tls), ("cdn.example.com:443", true));
        assert_eq!(
            c.cors,
            CorsOrigins::List(vec!["https://a.example".into(), "https://b.example".into()])
        );
        assert_eq!(c.credentials.unwrap().access_key_id, "AK");
    }

    #[test]
    fn problems_name_the_setting() {
        let errors = build(
            "[s3]\nurl_ttl_secs = 604801\n",
            &[
                ("AUDIOLIB_LISTEN", "nonsense"),
                ("AUDIOLIB_STORE_FAILURE", "maybe"),
                ("AUDIOLIB_THREADS", "many"),
                ("AWS_ACCESS_KEY_ID", "AK"),
                ("AUDIOLIB_UPSTREAM", "example.com"),
            ],
        )
        .unwrap_err();
        let all = errors.join("\n");
        for needle in [
            "`listen` (AUDIOLIB_LISTEN)",
            "`store.failure` (AUDIOLIB_STORE_FAILURE): 'maybe'",
            "`threads` (AUDIOLIB_THREADS)",
            "`s3.url_ttl_secs`",
            "7 days",
            "AWS_ACCESS_KEY_ID",
            "`upstream`",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn file_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "listen = \"x\"\nbogus = 1\n").unwrap();
        let e = read_file(&path).unwrap_err();
        assert!(e.contains("bad.toml:2:"), "{e}");
    }

    #[test]
    fn upstream_forms() {
        let u = parse_upstream("127.0.0.1:8000", None).unwrap();
        assert_eq!(
            (u.address.as_str(), u.tls, u.sni.as_str()),
            ("127.0.0.1:8000", false, "127.0.0.1")
        );
        let u = parse_upstream("https://cdn.example.com:8443", Some("h".into())).unwrap();
        assert_eq!((u.address.as_str(), u.tls), ("cdn.example.com:8443", true));
        assert_eq!(u.host_header.as_deref(), Some("h"));
        assert!(parse_upstream("cdn.example.com", None).is_err());
        assert!(parse_upstream("https://x/y", None).is_err());
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let c = build(
            "",
            &[
                ("AUDIOLIB_ADMIN_TOKEN", "admin-token-0123456789-secret"),
                (
                    "AUDIOLIB_REDIS_URL",
                    "redis://gw:RedisPw-secret@10.0.0.5:6379/0",
                ),
                ("AWS_ACCESS_KEY_ID", "AKID"),
                ("AWS_SECRET_ACCESS_KEY", "s3-secret-value"),
                ("AWS_SESSION_TOKEN", "session-token-value"),
            ],
        )
        .unwrap();
        let debug = format!("{c:?}");
        for secret in [
            "admin-token-0123456789-secret",
            "RedisPw-secret",
            "s3-secret-value",
            "session-token-value",
        ] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("AKID"), "the key id is not secret: {debug}");
        let file: FileConfig = toml::from_str(
            "admin_token = \"file-token-0123456789\"\n[store]\nredis_url = \"redis://:FilePw@h:1\"\n\
             [s3]\nsecret_access_key = \"file-s3-secret\"\n",
        )
        .unwrap();
        let debug = format!("{file:?}");
        for secret in ["file-token-0123456789", "FilePw", "file-s3-secret"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        let errors = build("", &[("AUDIOLIB_REDIS_URL", "http://u:LeakedPw@h:1")]).unwrap_err();
        assert!(errors[0].contains("'http://u:***@h:1'"), "{errors:?}");
    }

    #[test]
    fn urls_are_redacted_for_logs() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
            ("rediss://user:p@ss@h:1", "rediss://user:***@h:1"),
            ("redis://user@h:1", "redis://user@h:1"),
            (
                "redis://a:1@h:1,redis://b:2@h:2",
                "redis://a:***@h:1,redis://b:***@h:2",
            ),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        assert_eq!(
            redact_passwords_in("redis url 'redis://:pw9@h:1': bad", "redis://:pw9@h:1"),
            "redis url 'redis://:***@h:1': bad"
        );
    }

    #[test]
    fn redis_urls_and_wait() {
        let wait = |replicas, ms| {
            Some(Wait {
                replicas,
                timeout: Duration::from_millis(ms),
            })
        };
        let sentinel = "redis+sentinel://:pw@h1:26379,h2:26379/mymaster/2";
        for (url, env, expected) in [
            ("redis://h:6379/0", vec![], None),
            ("redis://h:1,rediss://h:2", vec![], None),
            (sentinel, vec![], wait(1, 25)),
            (sentinel, vec![("AUDIOLIB_REDIS_WAIT_REPLICAS", "0")], None),
            (
                "redis://h",
                vec![
                    ("AUDIOLIB_REDIS_WAIT_REPLICAS", "2"),
                    ("AUDIOLIB_STORE_TIMEOUT_MS", "1000"),
                ],
                wait(2, 500),
            ),
            (
                sentinel,
                vec![("AUDIOLIB_REDIS_WAIT_TIMEOUT_MS", "40")],
                wait(1, 40),
            ),
        ] {
            let mut env = env;
            env.push(("AUDIOLIB_REDIS_URL", url));
            let c = build("", &env).unwrap_or_else(|e| panic!("{url} {env:?}: {e:?}"));
            assert_eq!(c.redis_url.as_ref().map(Secret::expose), Some(url));
            assert_eq!(c.redis_wait, expected, "{url} {env:?}");
        }
        // Without Redis the setting has nothing to act on.
        let c = build("[store]\nredis_wait_replicas = 1\n", &[]).unwrap();
        assert_eq!(c.redis_wait, None);

        let env_url = "`store.redis_url` (AUDIOLIB_REDIS_URL): ";
        for (env, problem) in [
            (
                vec![("AUDIOLIB_REDIS_URL", "http://h:6379")],
                format!("{env_url}'http://h:6379' is not a redis://, rediss:// or redis+sentinel:// URL"),
            ),
            (
                vec![("AUDIOLIB_REDIS_URL", "redis://a,tcp://b")],
                format!("{env_url}'tcp://b' is not a redis://, rediss:// or redis+sentinel:// URL"),
            ),
            (
                vec![("AUDIOLIB_REDIS_URL", "redis+sentinel://h1:26379")],
                format!(
                    "{env_url}'redis+sentinel://h1:26379' is not a sentinel URL \
                     (redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/master-name[/db]): \
                     the master name is missing"
                ),
            ),
            (
                vec![("AUDIOLIB_REDIS_URL", "redis+sentinel://h1:x/m")],
                format!(
                    "{env_url}'redis+sentinel://h1:x/m' is not a sentinel URL \
                     (redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/master-name[/db]): \
                     'x' in 'h1:x' is not a port"
                ),
            ),
            (
                vec![
                    ("AUDIOLIB_REDIS_URL", "redis://a,redis://b"),
                    ("AUDIOLIB_REDIS_WAIT_REPLICAS", "1"),
                ],
                "setting `store.redis_wait_replicas` (AUDIOLIB_REDIS_WAIT_REPLICAS): WAIT is not \
                 supported on Redis Cluster; set it to 0"
                    .to_string(),
            ),
            (
                vec![
                    ("AUDIOLIB_REDIS_URL", sentinel),
                    ("AUDIOLIB_REDIS_WAIT_TIMEOUT_MS", "50"),
                ],
                "setting `store.redis_wait_timeout_ms` (AUDIOLIB_REDIS_WAIT_TIMEOUT_MS): must be at \
                 least 1 and below store.timeout_ms (50 ms), or the call gives up before WAIT answers"
                    .to_string(),
            ),
            (
                vec![
                    ("AUDIOLIB_REDIS_URL", sentinel),
                    ("AUDIOLIB_REDIS_WAIT_TIMEOUT_MS", "0"),
                ],
                "setting `store.redis_wait_timeout_ms` (AUDIOLIB_REDIS_WAIT_TIMEOUT_MS): must be at \
                 least 1 and below store.timeout_ms (50 ms), or the call gives up before WAIT answers"
                    .to_string(),
            ),
            (
                vec![
                    ("AUDIOLIB_REDIS_URL", sentinel),
                    ("AUDIOLIB_REDIS_WAIT_REPLICAS", "-1"),
                ],
                "setting `store.redis_wait_replicas` (AUDIOLIB_REDIS_WAIT_REPLICAS): cannot parse \
                 '-1': invalid digit found in string"
                    .to_string(),
            ),
        ] {
            let errors = build("", &env).unwrap_err();
            let problem = if problem.starts_with("setting") {
                problem
            } else {
                format!("setting {problem}")
            };
            assert_eq!(errors, vec![problem], "{env:?}");
        }
    }

    #[test]
    fn virtual_host_buckets_must_be_dns_names() {
        assert!(build("[s3]\nbucket = \"Bad_Bucket\"\n", &[]).is_err());
        assert!(build("[s3]\nbucket = \"Bad_Bucket\"\npath_style = true\n", &[]).is_ok());
    }
}
