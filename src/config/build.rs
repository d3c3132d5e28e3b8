//! One builder per section of the file: each reads its settings (environment first, then the
//! file, then the default), validates them, and adds every problem it finds to [`Problems`]
//! rather than stopping at the first. [`Config::build`](super::Config::build) runs them in
//! the order problems are reported.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::file::{
    FileConfig, KeyCacheFile, LimitsFile, LogFile, PlanFile, PortalFile, S3File, StoreFile,
    TlsFile, WebhooksFile,
};
use super::settings::{self as s, Env, Problems, Setting};
use super::{
    CorsOrigins, DEFAULT_UPGRADE_SOCK, FailurePolicy, KeyCacheConfig, Limits, Plan, PortalConfig,
    RedisKind, Secret, Signup, Upstream, Webhooks, check_redis_url, is_dns_bucket, parse_endpoint,
    parse_upstream, redact_passwords_in,
};
use crate::access_log::LogFormat;
use crate::forwarding::Cidr;
use crate::rate::Rate;
use crate::sign::{Credentials, MAX_TTL_SECS, S3Location};
use crate::store::redis::Wait;
use crate::tls::{TlsError, TlsFiles};

fn parse_addr(p: &mut Problems, setting: Setting, raw: &str) -> SocketAddr {
    raw.parse().unwrap_or_else(|e| {
        p.add(setting, format!("'{raw}' is not an IP:port address ({e})"));
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// The listeners, the admin token and the worker threads.
pub struct Process {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<Secret>,
    pub threads: usize,
}

pub fn process(p: &mut Problems, env: &dyn Env, file: &mut FileConfig) -> Process {
    let listen = s::LISTEN
        .pick(p, env, file.listen.take())
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listen = parse_addr(p, s::LISTEN, &listen);
    let admin = s::ADMIN_LISTEN
        .pick(p, env, file.admin_listen.take())
        .unwrap_or_else(|| "127.0.0.1:9180".into());
    let admin_listen = parse_addr(p, s::ADMIN_LISTEN, &admin);
    if admin_listen == listen {
        p.plain(s::ADMIN_LISTEN.name, "must differ from `listen`");
    }
    let admin_token = s::ADMIN_TOKEN.pick(p, env, file.admin_token.take());
    if admin_token.as_ref().is_some_and(|t| t.expose().len() < 16) {
        p.add(s::ADMIN_TOKEN, "must be at least 16 characters");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = s::THREADS.pick(p, env, file.threads).unwrap_or(cores);
    if !(1..=1024).contains(&threads) {
        p.add(s::THREADS, "must be between 1 and 1024");
    }
    Process {
        listen,
        admin_listen,
        admin_token,
        threads,
    }
}

/// `[portal]`: its listener (apart from the other two; port 0 picks a free one, for tests
/// and scripts running several gateways), sign-up mode and public address.
pub fn portal(
    p: &mut Problems,
    env: &dyn Env,
    file: PortalFile,
    process: &Process,
) -> PortalConfig {
    let raw = s::PORTAL_LISTEN
        .pick(p, env, file.listen)
        .unwrap_or_else(|| "127.0.0.1:8081".into());
    let listen = parse_addr(p, s::PORTAL_LISTEN, &raw);
    if listen.port() != 0 && (listen == process.listen || listen == process.admin_listen) {
        p.add(
            s::PORTAL_LISTEN,
            "must differ from `listen` and `admin_listen`",
        );
    }
    let signup = match s::PORTAL_SIGNUP
        .pick::<String>(p, env, file.signup)
        .as_deref()
    {
        None | Some("invite") => Signup::Invite,
        Some("open") => Signup::Open,
        Some(other) => {
            p.add(
                s::PORTAL_SIGNUP,
                format!("'{other}' is not one of invite, open"),
            );
            Signup::Invite
        }
    };
    let public_url = s::PORTAL_URL
        .pick::<String>(p, env, file.public_url)
        .map(|u| u.trim_end_matches('/').to_string());
    if let Some(url) = &public_url {
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
            p.add(
                s::PORTAL_URL,
                format!("'{url}' is not an http:// or https:// address"),
            );
        }
    }
    PortalConfig {
        listen,
        signup,
        public_url,
    }
}

/// `h2c` and `upgrade_sock`: the protocols beside TLS and the upgrade handoff.
pub fn listener_extras(
    p: &mut Problems,
    env: &dyn Env,
    file: &mut FileConfig,
    tls: bool,
) -> (bool, PathBuf) {
    let h2c = s::H2C.pick(p, env, file.h2c).unwrap_or(false);
    if h2c && tls {
        p.add(
            s::H2C,
            "applies to a plain listener only; with TLS, HTTP/2 is negotiated by ALPN",
        );
    }
    let upgrade_sock = s::UPGRADE_SOCK
        .pick(p, env, file.upgrade_sock.take())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_UPGRADE_SOCK));
    // sockaddr_un holds 108 bytes, the last a NUL.
    let len = upgrade_sock.as_os_str().len();
    if len > 107 || len == 0 {
        p.add(
            s::UPGRADE_SOCK,
            "must be a path of 1 to 107 bytes (a Unix socket)",
        );
    }
    (h2c, upgrade_sock)
}

pub fn shutdown_grace(p: &mut Problems, env: &dyn Env, file: &FileConfig) -> Duration {
    Duration::from_secs(
        s::SHUTDOWN_GRACE
            .pick(p, env, file.shutdown_grace_secs)
            .unwrap_or(10),
    )
}

/// `catalog_dir` and `catalog_watch`.
pub fn catalog(p: &mut Problems, env: &dyn Env, file: &mut FileConfig) -> (PathBuf, bool) {
    let dir = s::CATALOG_DIR
        .pick(p, env, file.catalog_dir.take())
        .unwrap_or_else(|| PathBuf::from("catalog"));
    let watch = s::CATALOG_WATCH
        .pick(p, env, file.catalog_watch)
        .unwrap_or(true);
    (dir, watch)
}

/// `upstream`, `upstream_host` and `upstream_ca_file`.
pub fn upstream(
    p: &mut Problems,
    env: &dyn Env,
    file: &mut FileConfig,
) -> (Option<Upstream>, Option<PathBuf>) {
    let host = s::UPSTREAM_HOST
        .pick(p, env, file.upstream_host.take())
        .and_then(|raw| match http::HeaderValue::try_from(raw) {
            Ok(value) => Some(value),
            Err(_) => {
                p.add(s::UPSTREAM_HOST, "is not a valid Host header value");
                None
            }
        });
    let upstream = s::UPSTREAM
        .pick(p, env, file.upstream.take())
        .and_then(|raw| match parse_upstream(&raw, host) {
            Ok(u) => Some(u),
            Err(e) => {
                p.add(s::UPSTREAM, e);
                None
            }
        });
    let ca_file = s::UPSTREAM_CA_FILE.pick(p, env, file.upstream_ca_file.take());
    if let Some(path) = &ca_file
        && !path.is_file()
    {
        p.add(
            s::UPSTREAM_CA_FILE,
            format!("{} is not a readable file", path.display()),
        );
    }
    (upstream, ca_file)
}

/// `cors_origins` and `trusted_proxies`: what the public listener believes of a client.
pub fn clients(p: &mut Problems, env: &dyn Env, file: &mut FileConfig) -> (CorsOrigins, Vec<Cidr>) {
    let cors = s::CORS_ORIGINS.list(env, file.cors_origins.take(), &["*"]);
    let cors = if cors.iter().any(|o| o == "*") {
        CorsOrigins::Any
    } else {
        for origin in &cors {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.ends_with('/')
            {
                p.add(
                    s::CORS_ORIGINS,
                    format!("'{origin}' is not an origin like https://app.example.com"),
                );
            }
        }
        CorsOrigins::List(cors)
    };
    let trusted = s::TRUSTED_PROXIES
        .list(env, file.trusted_proxies.take(), &[])
        .iter()
        .filter_map(|raw| match raw.parse::<Cidr>() {
            Ok(cidr) => Some(cidr),
            Err(e) => {
                p.add(s::TRUSTED_PROXIES, e);
                None
            }
        })
        .collect();
    (cors, trusted)
}

pub fn max_body_bytes(p: &mut Problems, env: &dyn Env, file: &FileConfig) -> usize {
    let max = s::MAX_BODY_BYTES
        .pick(p, env, file.max_body_bytes)
        .unwrap_or(16 * 1024);
    if !(64..=1 << 20).contains(&max) {
        p.add(s::MAX_BODY_BYTES, "must be between 64 and 1048576");
    }
    max
}

/// The `[store]` section.
pub struct Store {
    pub redis_url: Option<Secret>,
    pub redis_wait: Option<Wait>,
    pub data_dir: PathBuf,
    pub failure_policy: FailurePolicy,
    pub timeout: Duration,
}

pub fn store(p: &mut Problems, env: &dyn Env, file: StoreFile) -> Store {
    let redis_url = s::REDIS_URL.pick(p, env, file.redis_url);
    let redis_kind = redis_url
        .as_ref()
        .map(|url| match check_redis_url(url.expose()) {
            Ok(kind) => kind,
            Err(e) => {
                p.add(s::REDIS_URL, redact_passwords_in(&e, url.expose()));
                RedisKind::Single
            }
        });
    let data_dir = s::DATA_DIR
        .pick(p, env, file.data_dir)
        .unwrap_or_else(|| PathBuf::from("data"));
    let failure = s::STORE_FAILURE
        .pick(p, env, file.failure)
        .unwrap_or_else(|| "fail_open".into());
    let failure_policy = match failure.as_str() {
        "fail_open" => FailurePolicy::FailOpen,
        "fail_closed" => FailurePolicy::FailClosed,
        other => {
            p.add(
                s::STORE_FAILURE,
                format!("'{other}' is not one of fail_open, fail_closed"),
            );
            FailurePolicy::FailOpen
        }
    };
    let timeout =
        Duration::from_millis(s::STORE_TIMEOUT.pick(p, env, file.timeout_ms).unwrap_or(50));
    if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&timeout) {
        p.add(s::STORE_TIMEOUT, "must be between 1 and 10000");
    }
    // Sentinel is there for failover, which loses unconfirmed writes: WAIT for one replica
    // by default there, not elsewhere.
    let wait_replicas = s::REDIS_WAIT_REPLICAS
        .pick(p, env, file.redis_wait_replicas)
        .unwrap_or(u32::from(redis_kind == Some(RedisKind::Sentinel)));
    let wait_timeout = Duration::from_millis(
        s::REDIS_WAIT_TIMEOUT
            .pick(p, env, file.redis_wait_timeout_ms)
            .unwrap_or(timeout.as_millis() as u64 / 2),
    );
    if wait_replicas > 0 {
        if redis_kind == Some(RedisKind::Cluster) {
            p.add(
                s::REDIS_WAIT_REPLICAS,
                "WAIT is not supported on Redis Cluster; set it to 0",
            );
        }
        if wait_timeout.is_zero() || wait_timeout >= timeout {
            p.add(
                s::REDIS_WAIT_TIMEOUT,
                format!(
                    "must be at least 1 and below store.timeout_ms ({} ms), or the call gives up before WAIT answers",
                    timeout.as_millis()
                ),
            );
        }
    }
    let redis_wait = (redis_kind.is_some() && wait_replicas > 0).then_some(Wait {
        replicas: wait_replicas,
        timeout: wait_timeout,
    });
    Store {
        redis_url,
        redis_wait,
        data_dir,
        failure_policy,
        timeout,
    }
}

/// The `[s3]` section: where signed URLs point, for how long, signed with what.
pub struct S3 {
    pub location: S3Location,
    pub credentials: Option<Credentials>,
    pub url_ttl: Duration,
}

pub fn s3(p: &mut Problems, env: &dyn Env, file: S3File) -> S3 {
    let region = s::S3_REGION
        .pick(p, env, file.region)
        .unwrap_or_else(|| "us-east-1".into());
    if region.is_empty()
        || !region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        p.add(s::S3_REGION, format!("'{region}' is not a region name"));
    }
    let endpoint = s::S3_ENDPOINT
        .pick(p, env, file.endpoint)
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let bucket = s::S3_BUCKET.pick(p, env, file.bucket).unwrap_or_default();
    let path_style = s::S3_PATH_STYLE
        .pick(p, env, file.path_style)
        .unwrap_or(false);
    let (scheme, endpoint_authority) = match parse_endpoint(&endpoint) {
        Ok(parts) => parts,
        Err(e) => {
            p.add(s::S3_ENDPOINT, e);
            Default::default()
        }
    };
    if !bucket.is_empty() && !path_style && !is_dns_bucket(&bucket) {
        p.add(
            s::S3_BUCKET,
            format!("'{bucket}' cannot be a host name; set s3.path_style = true"),
        );
    }
    let ttl = s::URL_TTL.pick(p, env, file.url_ttl_secs).unwrap_or(3600);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        p.add(
            s::URL_TTL,
            format!(
                "must be between 1 and {MAX_TTL_SECS} (S3 refuses more than 7 days), got {ttl}"
            ),
        );
    }
    let access = s::S3_ACCESS_KEY_ID.from_env(env).or(file.access_key_id);
    let secret = s::S3_SECRET_ACCESS_KEY
        .from_env(env)
        .or(file.secret_access_key.map(Secret::into_inner));
    let token = s::S3_SESSION_TOKEN
        .from_env(env)
        .or(file.session_token.map(Secret::into_inner));
    let credentials = match (access, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Some(Credentials {
            access_key_id,
            secret_access_key,
            session_token: token,
        }),
        (None, None) => None,
        _ => {
            p.add(
                s::S3_ACCESS_KEY_ID,
                "an access key id and a secret access key go together; one is missing",
            );
            None
        }
    };
    S3 {
        location: S3Location {
            scheme,
            endpoint_authority,
            bucket,
            region,
            path_style,
        },
        credentials,
        url_ttl: Duration::from_secs(ttl),
    }
}

/// `[plans.*]` and `default_plan`.
pub fn plans(
    p: &mut Problems,
    env: &dyn Env,
    file: &mut FileConfig,
) -> (BTreeMap<String, Plan>, String) {
    let plans: BTreeMap<String, Plan> = match file.plans.take() {
        Some(plans) => plans
            .into_iter()
            .map(|(name, plan)| {
                let rate = plan_rate(p, &name, &plan);
                let plan = Plan {
                    monthly_limit: plan.monthly_limit,
                    rate,
                };
                (name, plan)
            })
            .collect(),
        None => [
            ("free", Some(1000)),
            ("pro", Some(100_000)),
            ("unlimited", None),
        ]
        .into_iter()
        .map(|(name, monthly_limit)| {
            let plan = Plan {
                monthly_limit,
                rate: None,
            };
            (name.to_string(), plan)
        })
        .collect(),
    };
    if plans.is_empty() {
        p.add(s::PLANS, "at least one plan is needed");
    }
    let default_plan = s::DEFAULT_PLAN
        .pick(p, env, file.default_plan.take())
        .unwrap_or_else(|| "free".into());
    if !plans.is_empty() && !plans.contains_key(&default_plan) {
        p.add(
            s::DEFAULT_PLAN,
            format!("'{default_plan}' is not one of the plans"),
        );
    }
    (plans, default_plan)
}

/// A plan's per-second rate: `rate_per_sec` of at least 1, `burst` (at least 1) only with it.
fn plan_rate(p: &mut Problems, name: &str, plan: &PlanFile) -> Option<Rate> {
    let setting = |field: &str| format!("plans.{name}.{field}");
    match (plan.rate_per_sec, plan.burst) {
        (None, None) => None,
        (None, Some(_)) => {
            p.plain(&setting("burst"), "needs rate_per_sec");
            None
        }
        (Some(0), _) => {
            p.plain(&setting("rate_per_sec"), "must be at least 1");
            None
        }
        (Some(_), Some(0)) => {
            p.plain(&setting("burst"), "must be at least 1");
            None
        }
        (Some(per_sec), burst) => Some(Rate {
            per_sec,
            burst: burst.unwrap_or(per_sec),
        }),
    }
}

fn secs(value: Option<u64>, default: u64) -> Duration {
    Duration::from_secs(value.unwrap_or(default))
}

/// The `[limits]` section.
pub fn limits(p: &mut Problems, env: &dyn Env, file: LimitsFile) -> Limits {
    let limits = Limits {
        header_timeout: secs(file.header_timeout_secs, 10),
        max_header_bytes: file.max_header_bytes.unwrap_or(16 * 1024),
        body_timeout: secs(file.body_timeout_secs, 10),
        keepalive: secs(file.keepalive_secs, 60),
        max_connections: s::MAX_CONNECTIONS
            .pick(p, env, file.max_connections)
            .unwrap_or(10_000),
    };
    if !(1..=1_000_000).contains(&limits.max_connections) {
        p.add(s::MAX_CONNECTIONS, "must be between 1 and 1000000");
    }
    for (setting, value) in [
        (s::HEADER_TIMEOUT, limits.header_timeout),
        (s::BODY_TIMEOUT, limits.body_timeout),
        (s::KEEPALIVE, limits.keepalive),
    ] {
        if value.is_zero() || value > Duration::from_secs(3600) {
            p.add(setting, "must be between 1 and 3600 seconds");
        }
    }
    if !(1024..=1 << 20).contains(&limits.max_header_bytes) {
        p.add(s::MAX_HEADER_BYTES, "must be between 1024 and 1048576");
    }
    limits
}

/// The `[key_cache]` section.
pub fn key_cache(p: &mut Problems, file: KeyCacheFile) -> KeyCacheConfig {
    let key_cache = KeyCacheConfig {
        capacity: file.capacity.unwrap_or(100_000),
        ttl: secs(file.ttl_secs, 60),
        negative_capacity: file.negative_capacity.unwrap_or(10_000),
        negative_ttl: secs(file.negative_ttl_secs, 5),
    };
    if key_cache.capacity == 0 || key_cache.ttl.is_zero() {
        p.add(s::KEY_CACHE, "capacity and ttl_secs must be positive");
    }
    key_cache
}

/// The `[log]` section.
pub fn log(p: &mut Problems, env: &dyn Env, file: LogFile) -> LogFormat {
    match s::LOG_FORMAT.pick(p, env, file.format).as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            p.add(s::LOG_FORMAT, format!("'{other}' is not one of text, json"));
            LogFormat::Text
        }
    }
}

/// The `[tls]` section: both files or neither, the pair loadable (so a bad one is refused at
/// start and by `config check`, not at the first handshake).
pub fn tls(p: &mut Problems, env: &dyn Env, file: TlsFile) -> Option<TlsFiles> {
    let cert = s::TLS_CERT.pick(p, env, file.cert_file);
    let key = s::TLS_KEY.pick(p, env, file.key_file);
    let files = match (cert, key) {
        (None, None) => return None,
        (Some(cert_file), Some(key_file)) => TlsFiles {
            cert_file,
            key_file,
        },
        (Some(_), None) => {
            p.add(s::TLS_KEY, "is needed with tls.cert_file");
            return None;
        }
        (None, Some(_)) => {
            p.add(s::TLS_CERT, "is needed with tls.key_file");
            return None;
        }
    };
    match crate::tls::load_pair(&files) {
        Ok(_) => Some(files),
        Err(TlsError::Cert(e)) => {
            p.add(s::TLS_CERT, e);
            None
        }
        Err(TlsError::Key(e)) => {
            p.add(s::TLS_KEY, e);
            None
        }
    }
}

/// `webhooks.url` and `webhooks.secret`: both or neither; the secret at least 16 characters,
/// so a receiver's signature check means something.
pub fn webhooks(p: &mut Problems, env: &dyn Env, file: WebhooksFile) -> Option<Webhooks> {
    let url = s::WEBHOOK_URL.pick(p, env, file.url);
    let secret = s::WEBHOOK_SECRET.pick(p, env, file.secret);
    if let Some(secret) = &secret
        && secret.expose().chars().count() < 16
    {
        p.add(s::WEBHOOK_SECRET, "must be at least 16 characters");
    }
    match (url, secret) {
        (None, None) => None,
        (Some(url), Some(secret)) => {
            let parsed = http::Uri::try_from(url.as_str());
            let ok = parsed.as_ref().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                p.add(
                    s::WEBHOOK_URL,
                    format!("'{url}' is not an http:// or https:// URL"),
                );
            }
            Some(Webhooks { url, secret })
        }
        (Some(_), None) => {
            p.add(s::WEBHOOK_SECRET, "is required with `webhooks.url`");
            None
        }
        (None, Some(_)) => {
            p.add(s::WEBHOOK_URL, "is required with `webhooks.secret`");
            None
        }
    }
}
