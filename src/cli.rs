//! The command line: `serve`, and the small tools around it (`keys`, `accounts`, `catalog
//! check`, `config check`). `keys` and `accounts` are clients of the admin API, so they work
//! against any node.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::catalog;
use crate::config::{self, Config, ProcessEnv};

#[derive(Parser)]
#[command(name = "audiolib", version, about = "AudioLib Gateway")]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default when no command is given).
    Serve {
        /// Config file; default conf/audiolib.toml when present, else built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Take the listening sockets over from the running gateway (send it SIGQUIT), which
        /// then drains: a restart without a refused connection.
        #[arg(long)]
        upgrade: bool,
        /// On the embedded store, also make a development account for the portal and print
        /// its email and a new password (`scripts/run` does).
        #[arg(long)]
        dev_account: bool,
    },
    /// Manage API keys through the admin API.
    Keys(KeysArgs),
    /// Manage accounts (which own keys and share one monthly limit) through the admin API.
    Accounts(AccountsArgs),
    /// List the audit log of admin changes, newest first.
    Audit {
        #[command(flatten)]
        admin: AdminArgs,
        /// Entries per page (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// The `next_cursor` of the previous page.
        #[arg(long)]
        before: Option<String>,
    },
    /// Catalog tools.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Validate every library file in DIR; errors name the file and line.
    Check { dir: PathBuf },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file together with the current environment.
    Check { file: PathBuf },
}

/// Where the admin API is and how to authenticate to it.
#[derive(Args)]
struct AdminArgs {
    /// Admin API base URL.
    #[arg(long, env = "AUDIOLIB_ADMIN_URL", default_value_t = default_admin_url())]
    admin_url: String,
    /// Admin bearer token.
    #[arg(long, env = "AUDIOLIB_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Args)]
struct KeysArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Args)]
struct AccountsArgs {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    command: AccountsCommand,
}

#[derive(Subcommand)]
enum AccountsCommand {
    /// Create an account.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        plan: Option<String>,
    },
    /// List accounts.
    List,
    /// Show an account with this month's usage and its keys.
    Show { id: String },
    /// Change an account's name, plan or status.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        plan: Option<String>,
        /// active or disabled.
        #[arg(long)]
        status: Option<String>,
    },
    /// Close an account and revoke its keys (final).
    Close { id: String },
    /// Calls per UTC day of all the account's keys.
    Usage {
        id: String,
        #[command(flatten)]
        range: RangeArgs,
    },
}

/// The days of a usage history; by default the 30 up to today.
#[derive(Args)]
struct RangeArgs {
    /// First day, YYYY-MM-DD.
    #[arg(long)]
    from: Option<String>,
    /// Last day, YYYY-MM-DD.
    #[arg(long)]
    to: Option<String>,
}

impl RangeArgs {
    fn query(&self) -> String {
        let params: Vec<String> = [("from", &self.from), ("to", &self.to)]
            .into_iter()
            .filter_map(|(name, v)| v.as_ref().map(|v| format!("{name}={v}")))
            .collect();
        if params.is_empty() {
            String::new()
        } else {
            format!("?{}", params.join("&"))
        }
    }
}

#[derive(Args)]
struct LimitArgs {
    /// Monthly limit of successful calls.
    #[arg(long, conflicts_with = "unlimited")]
    limit: Option<u64>,
    /// No monthly limit (calls are still metered).
    #[arg(long)]
    unlimited: bool,
}

impl LimitArgs {
    fn to_json(&self) -> Option<Value> {
        match (self.limit, self.unlimited) {
            (Some(n), _) => Some(json!(n)),
            (None, true) => Some(Value::Null),
            (None, false) => None,
        }
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; prints it once.
    Create {
        #[arg(long)]
        name: String,
        /// The account that owns the key (it then shares the account's limit).
        #[arg(long, conflicts_with_all = ["plan", "limit", "unlimited"])]
        account: Option<String>,
        #[arg(long)]
        plan: Option<String>,
        #[command(flatten)]
        limit: LimitArgs,
    },
    /// List keys.
    List,
    /// Show a key with this month's usage.
    Show { id: String },
    /// Revoke a key (final).
    Revoke { id: String },
    /// Give a key a new secret (printed once); the old one works for the grace.
    Rotate {
        id: String,
        /// Seconds the old secret keeps working (at most 604800, 7 days; 0: none).
        #[arg(long, default_value_t = 0)]
        grace_secs: u64,
    },
    /// Calls per UTC day (the key's account's, for a key of one).
    Usage {
        id: String,
        #[command(flatten)]
        range: RangeArgs,
    },
    /// Change a key's plan, limit or status.
    Update {
        id: String,
        #[arg(long)]
        plan: Option<String>,
        #[command(flatten)]
        limit: LimitArgs,
        /// active, inactive or revoked.
        #[arg(long)]
        status: Option<String>,
    },
}

fn default_admin_url() -> String {
    let listen = std::env::var("AUDIOLIB_ADMIN_LISTEN").unwrap_or_else(|_| "127.0.0.1:9180".into());
    format!("http://{listen}")
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve {
        config: None,
        upgrade: false,
        dev_account: false,
    }) {
        Command::Serve {
            config,
            upgrade,
            dev_account,
        } => serve(config, upgrade, dev_account),
        Command::Keys(args) => keys(args),
        Command::Accounts(args) => accounts(args),
        Command::Audit {
            admin,
            limit,
            before,
        } => {
            let before = before.map(|b| format!("&before={b}")).unwrap_or_default();
            admin_call(
                &admin,
                "GET",
                &format!("/admin/audit?limit={limit}{before}"),
                None,
            )
        }
        Command::Catalog {
            command: CatalogCommand::Check { dir },
        } => catalog_check(dir),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check(file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("audiolib: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
}

fn load_config(path: Option<PathBuf>) -> Result<Config, String> {
    Config::load(path.as_deref(), &ProcessEnv)
        .map_err(|problems| format!("invalid configuration:\n  {}", problems.join("\n  ")))
}

fn serve(config: Option<PathBuf>, upgrade: bool, dev_account: bool) -> Result<(), String> {
    init_logging();
    crate::server::run(load_config(config)?, upgrade, dev_account)
}

fn catalog_check(dir: PathBuf) -> Result<(), String> {
    let catalog = catalog::load_dir(&dir, 1).map_err(|e| e.to_string())?;
    let mut names: Vec<_> = catalog.libraries.iter().collect();
    names.sort_by_key(|(name, _)| name.as_str());
    for (name, lib) in names {
        println!(
            "{name}: {} tracks, {} active",
            lib.track_count(),
            lib.active_count()
        );
    }
    println!("{}: ok", dir.display());
    Ok(())
}

fn config_check(file: PathBuf) -> Result<(), String> {
    let parsed = config::read_file(&file)?;
    let config = Config::build(parsed, &ProcessEnv).map_err(|problems| {
        format!(
            "{}: invalid configuration:\n  {}",
            file.display(),
            problems.join("\n  ")
        )
    })?;
    // A name that does not resolve here may resolve where the gateway runs: a warning, not an
    // error (the gateway itself keeps trying and answers 502 meanwhile).
    if let Some(up) = &config.upstream {
        use std::net::ToSocketAddrs;
        let found = up.address.to_socket_addrs().map(|mut a| a.next().is_some());
        if !matches!(found, Ok(true)) {
            let why = found
                .err()
                .map_or("no addresses".to_string(), |e| e.to_string());
            eprintln!(
                "warning: setting `upstream` (AUDIOLIB_UPSTREAM): '{}' does not resolve ({why})",
                up.address
            );
        }
    }
    println!("{}: ok", file.display());
    Ok(())
}

/// Adds the fields that were given to a JSON object.
fn with_fields(fields: &[(&str, Option<Value>)]) -> Value {
    let mut body = json!({});
    for (name, value) in fields {
        if let Some(value) = value {
            body[*name] = value.clone();
        }
    }
    body
}

fn keys(args: KeysArgs) -> Result<(), String> {
    let (method, path, body) = match args.command {
        KeysCommand::Create {
            name,
            account,
            plan,
            limit,
        } => {
            let body = with_fields(&[
                ("name", Some(json!(name))),
                ("account_id", account.map(Value::from)),
                ("plan", plan.map(Value::from)),
                ("monthly_limit", limit.to_json()),
            ]);
            ("POST", "/admin/keys".to_string(), Some(body))
        }
        KeysCommand::List => return list_all(&args.admin, "/admin/keys", "keys"),
        KeysCommand::Show { id } => ("GET", format!("/admin/keys/{id}"), None),
        KeysCommand::Revoke { id } => ("DELETE", format!("/admin/keys/{id}"), None),
        KeysCommand::Rotate { id, grace_secs } => (
            "POST",
            format!("/admin/keys/{id}/rotate"),
            Some(json!({ "grace_secs": grace_secs })),
        ),
        KeysCommand::Usage { id, range } => (
            "GET",
            format!("/admin/keys/{id}/usage{}", range.query()),
            None,
        ),
        KeysCommand::Update {
            id,
            plan,
            limit,
            status,
        } => {
            let body = with_fields(&[
                ("plan", plan.map(Value::from)),
                ("monthly_limit", limit.to_json()),
                ("status", status.map(Value::from)),
            ]);
            ("PATCH", format!("/admin/keys/{id}"), Some(body))
        }
    };
    admin_call(&args.admin, method, &path, body)
}

fn accounts(args: AccountsArgs) -> Result<(), String> {
    let (method, path, body) = match args.command {
        AccountsCommand::Create { email, name, plan } => {
            let body = with_fields(&[
                ("email", Some(json!(email))),
                ("name", Some(json!(name))),
                ("plan", plan.map(Value::from)),
            ]);
            ("POST", "/admin/accounts".to_string(), Some(body))
        }
        AccountsCommand::List => return list_all(&args.admin, "/admin/accounts", "accounts"),
        AccountsCommand::Show { id } => ("GET", format!("/admin/accounts/{id}"), None),
        AccountsCommand::Update {
            id,
            name,
            plan,
            status,
        } => {
            let body = with_fields(&[
                ("name", name.map(Value::from)),
                ("plan", plan.map(Value::from)),
                ("status", status.map(Value::from)),
            ]);
            ("PATCH", format!("/admin/accounts/{id}"), Some(body))
        }
        AccountsCommand::Close { id } => ("DELETE", format!("/admin/accounts/{id}"), None),
        AccountsCommand::Usage { id, range } => (
            "GET",
            format!("/admin/accounts/{id}/usage{}", range.query()),
            None,
        ),
    };
    admin_call(&args.admin, method, &path, body)
}

/// One admin API call; prints the JSON answer, or fails with its status, code and message.
fn admin_call(
    admin: &AdminArgs,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(), String> {
    let answer = admin_request(admin, method, path, body)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&answer).unwrap_or_default()
    );
    Ok(())
}

/// Every page of a list (following `next_cursor`), printed as one `{"<field>": […]}`.
fn list_all(admin: &AdminArgs, path: &str, field: &str) -> Result<(), String> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page_path = match &cursor {
            Some(c) => format!("{path}?limit=1000&cursor={c}"),
            None => format!("{path}?limit=1000"),
        };
        let mut page = admin_request(admin, "GET", &page_path, None)?;
        if let Some(items) = page[field].as_array_mut() {
            all.append(items);
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({ field: all })).unwrap_or_default()
    );
    Ok(())
}

/// One admin API call: its JSON answer, or its status, code and message.
fn admin_request(
    admin: &AdminArgs,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let token = admin
        .token
        .as_deref()
        .ok_or("an admin token is needed: --token or AUDIOLIB_ADMIN_TOKEN")?;
    let base = admin.admin_url.trim_end_matches('/');
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let request = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("Authorization", format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .body(body.map(|b| b.to_string()).unwrap_or_default())
        .map_err(|e| format!("admin request: {e}"))?;
    let mut response = agent
        .run(request)
        .map_err(|e| format!("admin API at {base}: {e}"))?;
    let status = response.status();
    let body: Value = response
        .body_mut()
        .read_json()
        .map_err(|e| format!("admin API answered {status} without JSON: {e}"))?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!(
            "{} ({}): {}",
            status.as_u16(),
            body["code"].as_str().unwrap_or("?"),
            body["error"].as_str().unwrap_or("no message")
        ))
    }
}
