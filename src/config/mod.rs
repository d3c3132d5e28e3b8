//! Configuration (SPEC §7): a TOML file under `conf/`, every setting overridable from the
//! environment, validated once at start-up into [`Config`]. As in river, the serde file
//! structs ([`file`]) are kept apart from the validated config, so the rest of the program
//! never sees a raw string it would have to check again.
//!
//! # Layout
//! - [`settings`]: every setting's file name and environment variable, written once, and how
//!   a value is picked (environment, then file, then default).
//! - [`file`]: the file as written, one struct per section.
//! - `build`: one builder per section, each reporting every problem it finds.
//! - [`secret`]: values kept out of logs and `Debug` output, and URL redaction.

mod build;
pub mod file;
pub mod secret;
pub mod settings;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use file::{FileConfig, read_file};
pub use secret::{Secret, redact_passwords_in, redact_url};
pub use settings::{Env, ProcessEnv};

use crate::access_log::LogFormat;
use crate::forwarding::Cidr;
use crate::rate::Rate;
use crate::sign::{Credentials, S3Location};
use crate::store::redis::Wait;
use crate::store::redis::sentinel::{self, SentinelUrl};
use crate::tls::TlsFiles;

/// What to do while the store cannot be reached (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    FailOpen,
    FailClosed,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub monthly_limit: Option<u64>,
    /// `None`: no per-second rate.
    pub rate: Option<Rate>,
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
    pub host_header: Option<http::HeaderValue>,
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

/// How accounts come to exist in the developer portal (SPEC §10 `portal.signup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signup {
    /// Only through `POST /admin/accounts`, whose `invite_url` sets the first password.
    Invite,
    /// Anyone may create an account on the default plan.
    Open,
}

/// The developer portal (SPEC §10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalConfig {
    pub listen: SocketAddr,
    pub signup: Signup,
    /// The address users reach the portal at (invite links, `Secure` cookies when it is
    /// `https://`); `None`: `http://` and the listener's address.
    pub public_url: Option<String>,
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
    /// Where events are delivered (SPEC §9); `None`: no events are recorded.
    pub webhooks: Option<Webhooks>,
    /// The developer portal's listener and sign-up mode.
    pub portal: PortalConfig,
}

/// The webhook receiver and the secret its deliveries are signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhooks {
    /// An `http://` or `https://` URL.
    pub url: String,
    pub secret: Secret,
}

/// The default file `audiolib serve` reads when it exists and no `--config` is given.
pub const DEFAULT_FILE: &str = "conf/audiolib.toml";

/// Where `serve --upgrade` and the running process meet, unless `upgrade_sock` says otherwise.
pub const DEFAULT_UPGRADE_SOCK: &str = "/tmp/audiolib-upgrade.sock";

impl Config {
    /// Built-in defaults overridden by `file`, then by the environment, then validated; every
    /// problem is reported, each naming its setting and variable.
    pub fn build(mut file: FileConfig, env: &dyn Env) -> Result<Config, Vec<String>> {
        let mut problems = settings::Problems::default();
        let p = &mut problems;
        let process = build::process(p, env, &mut file);
        let (catalog_dir, catalog_watch) = build::catalog(p, env, &mut file);
        let (upstream, upstream_ca_file) = build::upstream(p, env, &mut file);
        let (cors, trusted_proxies) = build::clients(p, env, &mut file);
        let max_body_bytes = build::max_body_bytes(p, env, &file);
        let store = build::store(p, env, std::mem::take(&mut file.store));
        let s3 = build::s3(p, env, std::mem::take(&mut file.s3));
        let (plans, default_plan) = build::plans(p, env, &mut file);
        let limits = build::limits(p, env, std::mem::take(&mut file.limits));
        let key_cache = build::key_cache(p, std::mem::take(&mut file.key_cache));
        let shutdown_grace = build::shutdown_grace(p, env, &file);
        let log_format = build::log(p, env, std::mem::take(&mut file.log));
        let tls = build::tls(p, env, std::mem::take(&mut file.tls));
        let (h2c, upgrade_sock) = build::listener_extras(p, env, &mut file, tls.is_some());
        let webhooks = build::webhooks(p, env, std::mem::take(&mut file.webhooks));
        let portal = build::portal(p, env, std::mem::take(&mut file.portal), &process);
        if !problems.0.is_empty() {
            return Err(problems.0);
        }
        Ok(Config {
            listen: process.listen,
            admin_listen: process.admin_listen,
            admin_token: process.admin_token,
            threads: process.threads,
            catalog_dir,
            catalog_watch,
            upstream,
            upstream_ca_file,
            cors,
            trusted_proxies,
            max_body_bytes,
            redis_url: store.redis_url,
            redis_wait: store.redis_wait,
            data_dir: store.data_dir,
            failure_policy: store.failure_policy,
            store_timeout: store.timeout,
            s3: s3.location,
            credentials: s3.credentials,
            url_ttl: s3.url_ttl,
            plans,
            default_plan,
            limits,
            key_cache,
            shutdown_grace,
            log_format,
            tls,
            h2c,
            upgrade_sock,
            webhooks,
            portal,
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
fn parse_upstream(raw: &str, host_header: Option<http::HeaderValue>) -> Result<Upstream, String> {
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
            "upstream_host = \"cdn\\nexample\"\n[s3]\nurl_ttl_secs = 604801\n",
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
            "`upstream_host` (AUDIOLIB_UPSTREAM_HOST): is not a valid Host header value",
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
        let u = parse_upstream(
            "https://cdn.example.com:8443",
            Some(http::HeaderValue::from_static("h")),
        )
        .unwrap();
        assert_eq!((u.address.as_str(), u.tls), ("cdn.example.com:8443", true));
        assert_eq!(u.host_header.unwrap(), "h");
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
