//! The shipped configuration, parsed and compared field by field, and `audiolib config check`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use audiolib::access_log::LogFormat;
use audiolib::config::{
    Config, CorsOrigins, FailurePolicy, KeyCacheConfig, Limits, Plan, PortalConfig, Signup,
    read_file,
};
use audiolib::sign::S3Location;
use common::repo_path;

#[test]
fn shipped_config_parses_to_exactly_this() {
    let file = read_file(&repo_path("conf/audiolib.toml")).unwrap();
    let no_env: BTreeMap<&str, &str> = BTreeMap::new();
    let config = Config::build(file, &no_env).unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    let expected = Config {
        listen: "127.0.0.1:8080".parse().unwrap(),
        admin_listen: "127.0.0.1:9180".parse().unwrap(),
        admin_token: None,
        threads: cores,
        catalog_dir: PathBuf::from("catalog"),
        catalog_watch: true,
        upstream: None,
        upstream_ca_file: None,
        cors: CorsOrigins::Any,
        trusted_proxies: vec![],
        max_body_bytes: 16384,
        redis_url: None,
        redis_wait: None,
        data_dir: PathBuf::from("data"),
        failure_policy: FailurePolicy::FailOpen,
        store_timeout: Duration::from_millis(50),
        s3: S3Location {
            scheme: "https".into(),
            endpoint_authority: "s3.us-east-1.amazonaws.com".into(),
            bucket: "audiolib-media".into(),
            region: "us-east-1".into(),
            path_style: false,
        },
        credentials: None,
        url_ttl: Duration::from_secs(3600),
        plans: BTreeMap::from([
            (
                "free".to_string(),
                Plan {
                    monthly_limit: Some(1000),
                    rate: None,
                },
            ),
            (
                "pro".to_string(),
                Plan {
                    monthly_limit: Some(100_000),
                    rate: None,
                },
            ),
            (
                "unlimited".to_string(),
                Plan {
                    monthly_limit: None,
                    rate: None,
                },
            ),
        ]),
        default_plan: "free".into(),
        limits: Limits {
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 16384,
            body_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(60),
            max_connections: 10_000,
        },
        key_cache: KeyCacheConfig {
            capacity: 100_000,
            ttl: Duration::from_secs(60),
            negative_capacity: 10_000,
            negative_ttl: Duration::from_secs(5),
        },
        shutdown_grace: Duration::from_secs(10),
        log_format: LogFormat::Text,
        tls: None,
        h2c: false,
        upgrade_sock: PathBuf::from("/tmp/audiolib-upgrade.sock"),
        webhooks: None,
        portal: PortalConfig {
            listen: "127.0.0.1:8081".parse().unwrap(),
            signup: Signup::Invite,
            public_url: None,
        },
    };
    assert_eq!(config, expected);
}

fn check(text: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let (ok, out, err) = common::run(
        Command::new(env!("CARGO_BIN_EXE_audiolib"))
            .args(["config", "check"])
            .arg(&path)
            .env_clear()
            .envs(env.iter().copied()),
    );
    (ok, out + &err)
}

#[test]
fn config_check_names_the_setting_and_the_problem() {
    let shipped = std::fs::read_to_string(repo_path("conf/audiolib.toml")).unwrap();
    let (ok, out) = check(&shipped, &[]);
    assert!(ok && out.ends_with("ok\n"), "{out}");

    /// (file text, environment, expected part of the message)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 14] = [
        (
            "[webhooks]\nurl = \"https://hooks.example.com/audiolib\"\nsecret = \"short\"\n",
            &[],
            "`webhooks.secret` (AUDIOLIB_WEBHOOK_SECRET): must be at least 16 characters",
        ),
        (
            "",
            &[("AUDIOLIB_WEBHOOK_URL", "https://hooks.example.com/audiolib")],
            "`webhooks.secret` (AUDIOLIB_WEBHOOK_SECRET): is required with `webhooks.url`",
        ),
        (
            "",
            &[("AUDIOLIB_WEBHOOK_SECRET", "0123456789abcdef")],
            "`webhooks.url` (AUDIOLIB_WEBHOOK_URL): is required with `webhooks.secret`",
        ),
        (
            "",
            &[
                ("AUDIOLIB_WEBHOOK_URL", "hooks.example.com"),
                ("AUDIOLIB_WEBHOOK_SECRET", "0123456789abcdef"),
            ],
            "`webhooks.url` (AUDIOLIB_WEBHOOK_URL): 'hooks.example.com' is not an http:// or https:// URL",
        ),
        (
            "",
            &[("AUDIOLIB_MAX_CONNECTIONS", "0")],
            "`limits.max_connections` (AUDIOLIB_MAX_CONNECTIONS): must be between 1 and 1000000",
        ),
        (
            "[log]\nformat = \"xml\"\n",
            &[],
            "`log.format` (AUDIOLIB_LOG_FORMAT): 'xml' is not one of text, json",
        ),
        (
            "",
            &[("AUDIOLIB_TRUSTED_PROXIES", "10.0.0.0/8, 10.0.0.0/33")],
            "`trusted_proxies` (AUDIOLIB_TRUSTED_PROXIES): '10.0.0.0/33' is not an IP address or network like 10.0.0.0/8",
        ),
        ("listen = 8080\n", &[], "gateway.toml:1:"),
        (
            "bogus = true\n",
            &[],
            "gateway.toml:1: unknown field `bogus`",
        ),
        (
            "[s3]\nurl_ttl_secs = 0\n",
            &[],
            "`s3.url_ttl_secs` (AUDIOLIB_URL_TTL_SECS): must be between 1 and 604800",
        ),
        (
            "",
            &[("AUDIOLIB_STORE_FAILURE", "sometimes")],
            "`store.failure` (AUDIOLIB_STORE_FAILURE): 'sometimes' is not one of fail_open, fail_closed",
        ),
        (
            "",
            &[("AUDIOLIB_UPSTREAM", "ftp://x")],
            "`upstream` (AUDIOLIB_UPSTREAM)",
        ),
        (
            "",
            &[("AUDIOLIB_CORS_ORIGINS", "app.example.com")],
            "`cors_origins` (AUDIOLIB_CORS_ORIGINS): 'app.example.com' is not an origin",
        ),
        (
            "default_plan = \"gold\"\n",
            &[],
            "`default_plan` (AUDIOLIB_DEFAULT_PLAN): 'gold' is not one of the plans",
        ),
    ];
    for (text, env, needle) in cases {
        let (ok, out) = check(text, env);
        assert!(!ok, "accepted {text:?} {env:?}");
        assert!(out.contains(needle), "{text:?} {env:?}: {out}");
    }
}

#[test]
fn config_check_warns_about_an_upstream_name_that_does_not_resolve() {
    let (ok, out) = check("", &[("AUDIOLIB_UPSTREAM", "no-such-host.invalid:443")]);
    assert!(ok, "a warning, not an error: {out}");
    assert!(
        out.contains(
            "warning: setting `upstream` (AUDIOLIB_UPSTREAM): 'no-such-host.invalid:443' does not resolve"
        ),
        "{out}"
    );
    let (ok, out) = check("", &[("AUDIOLIB_UPSTREAM", "localhost:443")]);
    assert!(ok && !out.contains("warning"), "{out}");
}

#[test]
fn the_settings_table_is_the_readmes() {
    // One table pairs each setting with its variable (audiolib::config::settings); the
    // README's settings table, which operators script against, lists the same pairs.
    let readme = std::fs::read_to_string(repo_path("README.md")).unwrap();
    let table = &readme[readme.find("## Settings").unwrap()..];
    let start = table.find('|').unwrap();
    let table = &table[start..start + table[start..].find("\n\n").unwrap()];
    for setting in audiolib::config::settings::ALL {
        let row = table
            .lines()
            .find(|l| {
                l.split('|')
                    .nth(1)
                    .is_some_and(|first| first.contains(&format!("`{}", setting.name)))
            })
            .unwrap_or_else(|| panic!("{} is not in the README's table", setting.name));
        if let Some(env) = setting.env {
            assert!(
                row.contains(env),
                "{} should name {env}: {row}",
                setting.name
            );
        }
    }
    let known: Vec<&str> = audiolib::config::settings::ALL
        .iter()
        .filter_map(|s| s.env)
        .collect();
    for word in table.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("AUDIOLIB_") || word.starts_with("AWS_") {
            assert!(
                known.contains(&word),
                "{word} is in the README but not a setting"
            );
        }
    }
}
