//! The command line: `serve`, and the small tools around it (`keys`, `catalog check`,
//! `config check`). `keys` is a client of the admin API, so it works against any node.

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
    },
    /// Manage API keys through the admin API.
    Keys(KeysArgs),
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

#[derive(Args)]
struct KeysArgs {
    /// Admin API base URL.
    #[arg(long, env = "AUDIOLIB_ADMIN_URL", default_value_t = default_admin_url())]
    admin_url: String,
    /// Admin bearer token.
    #[arg(long, env = "AUDIOLIB_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: KeysCommand,
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
    }) {
        Command::Serve { config, upgrade } => serve(config, upgrade),
        Command::Keys(args) => keys(args),
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

fn serve(config: Option<PathBuf>, upgrade: bool) -> Result<(), String> {
    init_logging();
    crate::server::run(load_config(config)?, upgrade)
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

fn keys(args: KeysArgs) -> Result<(), String> {
    let token = args
        .token
        .ok_or("an admin token is needed: --token or AUDIOLIB_ADMIN_TOKEN")?;
    let base = args.admin_url.trim_end_matches('/');
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let auth = format!("Bearer {token}");
    let url = |id: Option<&str>| match id {
        Some(id) => format!("{base}/admin/keys/{id}"),
        None => format!("{base}/admin/keys"),
    };
    let response = match args.command {
        KeysCommand::Create { name, plan, limit } => {
            let mut body = json!({ "name": name });
            if let Some(plan) = plan {
                body["plan"] = json!(plan);
            }
            if let Some(limit) = limit.to_json() {
                body["monthly_limit"] = limit;
            }
            agent
                .post(url(None))
                .header("Authorization", &auth)
                .send_json(body)
        }
        KeysCommand::List => agent.get(url(None)).header("Authorization", &auth).call(),
        KeysCommand::Show { id } => agent
            .get(url(Some(&id)))
            .header("Authorization", &auth)
            .call(),
        KeysCommand::Revoke { id } => agent
            .delete(url(Some(&id)))
            .header("Authorization", &auth)
            .call(),
        KeysCommand::Update {
            id,
            plan,
            limit,
            status,
        } => {
            let mut body = json!({});
            if let Some(plan) = plan {
                body["plan"] = json!(plan);
            }
            if let Some(limit) = limit.to_json() {
                body["monthly_limit"] = limit;
            }
            if let Some(status) = status {
                body["status"] = json!(status);
            }
            agent
                .patch(url(Some(&id)))
                .header("Authorization", &auth)
                .send_json(body)
        }
    };
    let mut response = response.map_err(|e| format!("admin API at {base}: {e}"))?;
    let status = response.status();
    let body: Value = response
        .body_mut()
        .read_json()
        .map_err(|e| format!("admin API answered {status} without JSON: {e}"))?;
    if status.is_success() {
        println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
        Ok(())
    } else {
        Err(format!(
            "{} ({}): {}",
            status.as_u16(),
            body["code"].as_str().unwrap_or("?"),
            body["error"].as_str().unwrap_or("no message")
        ))
    }
}
