//! Every setting's name in the file and its environment variable, written once (the table
//! operators script against, SPEC §7), and the two ways a section builder reads one: the
//! environment first, then the file, then the default.

use std::collections::BTreeMap;

/// One setting: its dotted name in the file and the environment variable overriding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub name: &'static str,
    /// `None` for settings only the file sets.
    pub env: Option<&'static str>,
}

const fn both(name: &'static str, env: &'static str) -> Setting {
    Setting {
        name,
        env: Some(env),
    }
}

const fn file_only(name: &'static str) -> Setting {
    Setting { name, env: None }
}

pub const LISTEN: Setting = both("listen", "AUDIOLIB_LISTEN");
pub const ADMIN_LISTEN: Setting = both("admin_listen", "AUDIOLIB_ADMIN_LISTEN");
pub const ADMIN_TOKEN: Setting = both("admin_token", "AUDIOLIB_ADMIN_TOKEN");
pub const THREADS: Setting = both("threads", "AUDIOLIB_THREADS");
pub const CATALOG_DIR: Setting = both("catalog_dir", "AUDIOLIB_CATALOG_DIR");
pub const CATALOG_WATCH: Setting = both("catalog_watch", "AUDIOLIB_CATALOG_WATCH");
pub const UPSTREAM: Setting = both("upstream", "AUDIOLIB_UPSTREAM");
pub const UPSTREAM_HOST: Setting = both("upstream_host", "AUDIOLIB_UPSTREAM_HOST");
pub const UPSTREAM_CA_FILE: Setting = both("upstream_ca_file", "AUDIOLIB_UPSTREAM_CA_FILE");
pub const CORS_ORIGINS: Setting = both("cors_origins", "AUDIOLIB_CORS_ORIGINS");
pub const TRUSTED_PROXIES: Setting = both("trusted_proxies", "AUDIOLIB_TRUSTED_PROXIES");
pub const MAX_BODY_BYTES: Setting = both("max_body_bytes", "AUDIOLIB_MAX_BODY_BYTES");
pub const DEFAULT_PLAN: Setting = both("default_plan", "AUDIOLIB_DEFAULT_PLAN");
pub const SHUTDOWN_GRACE: Setting = both("shutdown_grace_secs", "AUDIOLIB_SHUTDOWN_GRACE_SECS");
pub const H2C: Setting = both("h2c", "AUDIOLIB_H2C");
pub const UPGRADE_SOCK: Setting = both("upgrade_sock", "AUDIOLIB_UPGRADE_SOCK");
pub const TLS_CERT: Setting = both("tls.cert_file", "AUDIOLIB_TLS_CERT");
pub const TLS_KEY: Setting = both("tls.key_file", "AUDIOLIB_TLS_KEY");
pub const REDIS_URL: Setting = both("store.redis_url", "AUDIOLIB_REDIS_URL");
pub const DATA_DIR: Setting = both("store.data_dir", "AUDIOLIB_DATA_DIR");
pub const STORE_FAILURE: Setting = both("store.failure", "AUDIOLIB_STORE_FAILURE");
pub const STORE_TIMEOUT: Setting = both("store.timeout_ms", "AUDIOLIB_STORE_TIMEOUT_MS");
pub const REDIS_WAIT_REPLICAS: Setting =
    both("store.redis_wait_replicas", "AUDIOLIB_REDIS_WAIT_REPLICAS");
pub const REDIS_WAIT_TIMEOUT: Setting = both(
    "store.redis_wait_timeout_ms",
    "AUDIOLIB_REDIS_WAIT_TIMEOUT_MS",
);
pub const S3_ENDPOINT: Setting = both("s3.endpoint", "AUDIOLIB_S3_ENDPOINT");
pub const S3_BUCKET: Setting = both("s3.bucket", "AUDIOLIB_S3_BUCKET");
pub const S3_REGION: Setting = both("s3.region", "AUDIOLIB_S3_REGION");
pub const S3_PATH_STYLE: Setting = both("s3.path_style", "AUDIOLIB_S3_PATH_STYLE");
pub const URL_TTL: Setting = both("s3.url_ttl_secs", "AUDIOLIB_URL_TTL_SECS");
pub const S3_ACCESS_KEY_ID: Setting = both("s3.access_key_id", "AWS_ACCESS_KEY_ID");
pub const S3_SECRET_ACCESS_KEY: Setting = both("s3.secret_access_key", "AWS_SECRET_ACCESS_KEY");
pub const S3_SESSION_TOKEN: Setting = both("s3.session_token", "AWS_SESSION_TOKEN");
pub const MAX_CONNECTIONS: Setting = both("limits.max_connections", "AUDIOLIB_MAX_CONNECTIONS");
pub const HEADER_TIMEOUT: Setting = file_only("limits.header_timeout_secs");
pub const BODY_TIMEOUT: Setting = file_only("limits.body_timeout_secs");
pub const KEEPALIVE: Setting = file_only("limits.keepalive_secs");
pub const MAX_HEADER_BYTES: Setting = file_only("limits.max_header_bytes");
pub const KEY_CACHE: Setting = file_only("key_cache");
pub const PLANS: Setting = file_only("plans");
pub const LOG_FORMAT: Setting = both("log.format", "AUDIOLIB_LOG_FORMAT");
pub const WEBHOOK_URL: Setting = both("webhooks.url", "AUDIOLIB_WEBHOOK_URL");
pub const WEBHOOK_SECRET: Setting = both("webhooks.secret", "AUDIOLIB_WEBHOOK_SECRET");
pub const PORTAL_LISTEN: Setting = both("portal.listen", "AUDIOLIB_PORTAL_LISTEN");
pub const PORTAL_SIGNUP: Setting = both("portal.signup", "AUDIOLIB_PORTAL_SIGNUP");
pub const PORTAL_URL: Setting = both("portal.public_url", "AUDIOLIB_PORTAL_URL");

/// Every setting, in the order the README's table lists them.
pub const ALL: &[Setting] = &[
    LISTEN,
    ADMIN_LISTEN,
    ADMIN_TOKEN,
    PORTAL_LISTEN,
    PORTAL_SIGNUP,
    PORTAL_URL,
    REDIS_URL,
    DATA_DIR,
    REDIS_WAIT_REPLICAS,
    REDIS_WAIT_TIMEOUT,
    STORE_FAILURE,
    STORE_TIMEOUT,
    CATALOG_DIR,
    CATALOG_WATCH,
    S3_ENDPOINT,
    S3_BUCKET,
    S3_REGION,
    S3_PATH_STYLE,
    URL_TTL,
    S3_ACCESS_KEY_ID,
    S3_SECRET_ACCESS_KEY,
    S3_SESSION_TOKEN,
    UPSTREAM,
    UPSTREAM_HOST,
    UPSTREAM_CA_FILE,
    THREADS,
    CORS_ORIGINS,
    TRUSTED_PROXIES,
    MAX_BODY_BYTES,
    DEFAULT_PLAN,
    SHUTDOWN_GRACE,
    PLANS,
    HEADER_TIMEOUT,
    BODY_TIMEOUT,
    KEEPALIVE,
    MAX_HEADER_BYTES,
    MAX_CONNECTIONS,
    LOG_FORMAT,
    KEY_CACHE,
    TLS_CERT,
    TLS_KEY,
    H2C,
    UPGRADE_SOCK,
    WEBHOOK_URL,
    WEBHOOK_SECRET,
];

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

/// Collects every problem instead of stopping at the first, so one run shows them all.
#[derive(Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    /// A problem with `setting`, named with its variable when it has one.
    pub fn add(&mut self, setting: Setting, problem: impl std::fmt::Display) {
        match setting.env {
            Some(env) => self
                .0
                .push(format!("setting `{}` ({env}): {problem}", setting.name)),
            None => self.plain(setting.name, problem),
        }
    }

    /// A problem named by the file's setting alone (one between settings, say).
    pub fn plain(&mut self, name: &str, problem: impl std::fmt::Display) {
        self.0.push(format!("setting `{name}`: {problem}"));
    }
}

impl Setting {
    /// The variable's raw value, when the setting has one and it is set.
    pub fn from_env(self, env: &dyn Env) -> Option<String> {
        self.env.and_then(|name| env.get(name))
    }

    /// The environment's value if set (parsed), else the file's, else `None`.
    pub fn pick<T: std::str::FromStr>(
        self,
        p: &mut Problems,
        env: &dyn Env,
        file: Option<T>,
    ) -> Option<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.from_env(env) {
            Some(raw) => match raw.trim().parse() {
                Ok(v) => Some(v),
                Err(e) => {
                    p.add(self, format!("cannot parse '{raw}': {e}"));
                    None
                }
            },
            None => file,
        }
    }

    /// A comma list from the environment, else the file's list, else `default`.
    pub fn list(self, env: &dyn Env, file: Option<Vec<String>>, default: &[&str]) -> Vec<String> {
        match self.from_env(env) {
            Some(raw) => raw.split(',').map(|s| s.trim().to_string()).collect(),
            None => file.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect()),
        }
    }
}
