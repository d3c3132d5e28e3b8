//! The file as written (`conf/audiolib.toml`): serde structs, one per section, every field
//! optional. Nothing here is validated; `super::build` turns them into the `Config`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Secret;

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
    #[serde(default)]
    pub webhooks: WebhooksFile,
    #[serde(default)]
    pub portal: PortalFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksFile {
    pub url: Option<String>,
    pub secret: Option<Secret>,
}

/// `[portal]`: the developer portal's listener and sign-up mode (SPEC §10).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalFile {
    pub listen: Option<String>,
    pub signup: Option<String>,
    pub public_url: Option<String>,
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
    /// Calls a second per key (per account for its keys) on each node; absent: no rate.
    pub rate_per_sec: Option<u32>,
    /// Calls at once above the rate; absent: `rate_per_sec` (a second's worth).
    pub burst: Option<u32>,
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
