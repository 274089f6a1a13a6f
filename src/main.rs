//! The `fhir-edge` command line: `run` (the default), `check`, `keygen` and `clients …`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use fhir_edge::config::Settings;
use fhir_edge::edge::{self, RunOptions};
use fhir_edge::reload::{Live, Loadable};
use fhir_edge::routing::RoutingTable;
use fhir_edge::tenant::TenantId;
use fhir_edge::time::{now_unix, parse_duration};
use fhir_edge::token::clients::{self, ClientRegistry, Issued};
use fhir_edge::token::keys::{keygen, KeyAlg};

#[derive(Parser)]
#[command(
    name = "fhir-edge",
    version,
    about = "Multi-tenant FHIR edge proxy on Pingora"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_CONFIG: &str = "conf/fhir-edge.yaml";

#[derive(Subcommand)]
enum Command {
    /// Start the proxy (the default when no subcommand is given).
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Take over the listening sockets of the running instance (send it SIGQUIT).
        #[arg(long, short)]
        upgrade: bool,
        /// Run in the background.
        #[arg(long, short)]
        daemon: bool,
    },
    /// Validate the config and every file it names; print every problem; exit 1 on any.
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Write a new token-signing private key (PKCS#8 PEM, mode 0600) and print its kid.
    Keygen {
        /// ES256 (P-256) or RS256 (RSA 2048).
        #[arg(long, default_value = "ES256")]
        alg: KeyAlg,
        /// The file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Manage the client registry (clients.yaml); a running proxy picks changes up at once.
    Clients(ClientsArgs),
}

#[derive(Args)]
struct ClientsArgs {
    /// The config whose token_endpoint.clients_file to manage.
    #[arg(long, short, default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,
    /// Manage this clients file directly instead of the one the config names.
    #[arg(long, global = true)]
    file: Option<PathBuf>,
    /// Print JSON (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: ClientsAction,
}

#[derive(Subcommand)]
enum ClientsAction {
    /// Register a client; prints its client_id and its first secret (once).
    Add {
        #[arg(long)]
        name: String,
        /// A tenant GUID the client may ask tokens for (repeatable).
        #[arg(long = "tenant", required_unless_present = "all_tenants")]
        tenants: Vec<String>,
        /// Allow every tenant in the routing table.
        #[arg(long, conflicts_with = "tenants")]
        all_tenants: bool,
    },
    /// List clients and their secrets (never the secrets themselves).
    List,
    /// Add a new secret (printed once). The old ones keep working until revoked, or for --keep-old.
    Rotate {
        client_id: String,
        /// Expire the client's other secrets after this long (90s, 30m, 12h, 7d).
        #[arg(long)]
        keep_old: Option<String>,
    },
    /// Revoke one secret now; tokens minted with it stop working.
    RevokeSecret {
        client_id: String,
        secret_id: String,
    },
    /// Disable a client (its tokens stop working); `enable` undoes it.
    Disable {
        client_id: String,
    },
    Enable {
        client_id: String,
    },
    /// Remove a client and everything it holds.
    Remove {
        client_id: String,
    },
}

fn main() -> ExitCode {
    // Before the runtime's threads and the routing table allocate (src/memory.rs says why).
    fhir_edge::memory::disable_huge_pages();
    // Before anything can touch jsonwebtoken (which would settle on its own provider for good).
    fhir_edge::auth::install_crypto();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run {
        config: PathBuf::from(DEFAULT_CONFIG),
        upgrade: false,
        daemon: false,
    });
    let result = match command {
        Command::Run {
            config,
            upgrade,
            daemon,
        } => run(config, RunOptions { upgrade, daemon }),
        Command::Check { config } => check(config),
        Command::Keygen { alg, out } => keygen(alg, &out)
            .map(|kid| {
                println!("wrote {} ({alg:?}), kid {kid}", out.display());
                ExitCode::SUCCESS
            })
            .map_err(|e| anyhow!(e)),
        Command::Clients(args) => manage_clients(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fhir-edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: PathBuf, opts: RunOptions) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(&config).map_err(|p| anyhow!("invalid configuration:\n{p}"))?;
    fhir_edge::ops::logging::init(settings.log_level);
    let listeners: Vec<String> = settings
        .listen
        .iter()
        .map(|a| format!("http://{a}"))
        .chain(
            settings
                .tls_listeners
                .iter()
                .map(|l| format!("https://{}", l.addr)),
        )
        .collect();
    log::info!(
        "fhir-edge {} starting: listening on {}, public base {}, routing table {}",
        env!("CARGO_PKG_VERSION"),
        listeners.join(", "),
        settings.public.url,
        settings.routes_file.display()
    );
    if let Some(t) = &settings.token {
        log::info!(
            "token endpoint {} (issuer {}, signing key {} {:?}), clients {}",
            t.url,
            t.issuer,
            t.keys.active.kid,
            t.keys.active.alg,
            t.clients_file.display()
        );
    }
    log::info!(
        "JWT crypto: {}",
        if fhir_edge::auth::install_crypto() {
            "aws-lc-rs, RSA and ECDSA keys parsed once per thread"
        } else {
            "jsonwebtoken's default provider"
        }
    );
    let server = edge::build(settings, opts).context("cannot start")?;
    server.run_forever()
}

fn check(config: PathBuf) -> anyhow::Result<ExitCode> {
    let settings = match Settings::load(&config) {
        Ok(s) => s,
        Err(p) => {
            println!("{p}");
            return Ok(ExitCode::FAILURE);
        }
    };
    fhir_edge::auth::jwt::self_test().map_err(|e| anyhow!("JWT self-test: {e}"))?;
    let mut problems = Vec::new();
    let mut summary = vec![format!("{} keys", settings.verifier.key_count())];
    match Live::<RoutingTable>::load_file(
        settings.routes_file.clone(),
        settings.route_defaults.clone(),
    ) {
        Ok(t) => summary.push(format!(
            "routing table {}: {}",
            settings.routes_file.display(),
            t.load().summary()
        )),
        Err(p) => problems.push(p.to_string()),
    }
    if let Some(t) = &settings.token {
        match Live::<ClientRegistry>::load_file(t.clients_file.clone(), ()) {
            Ok(c) => summary.push(format!(
                "clients {}: {}",
                t.clients_file.display(),
                c.load().summary()
            )),
            Err(p) => problems.push(p.to_string()),
        }
    }
    if problems.is_empty() {
        println!("{}: ok ({})", config.display(), summary.join("; "));
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{}", problems.join("\n"));
        Ok(ExitCode::FAILURE)
    }
}

fn clients_file(args: &ClientsArgs) -> anyhow::Result<PathBuf> {
    if let Some(f) = &args.file {
        return Ok(f.clone());
    }
    let settings =
        Settings::load(&args.config).map_err(|p| anyhow!("invalid configuration:\n{p}"))?;
    match settings.token {
        Some(t) => Ok(t.clients_file),
        None => bail!(
            "{} has no token_endpoint section (or pass --file)",
            args.config.display()
        ),
    }
}

fn manage_clients(args: ClientsArgs) -> anyhow::Result<ExitCode> {
    let path = clients_file(&args)?;
    let now = now_unix();
    let e = |e: String| anyhow!(e);
    match &args.action {
        ClientsAction::Add {
            name,
            tenants,
            all_tenants,
        } => {
            let allowed = if *all_tenants {
                vec!["*".to_string()]
            } else {
                tenants
                    .iter()
                    .map(|t| {
                        TenantId::parse(t)
                            .map(|t| t.to_string())
                            .ok_or_else(|| anyhow!("`{t}` is not a tenant GUID"))
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            let issued = clients::add_client(&path, name, allowed.clone(), now).map_err(e)?;
            print_issued(&issued, args.json, Some((name, &allowed)));
        }
        ClientsAction::List => list(&path, args.json)?,
        ClientsAction::Rotate {
            client_id,
            keep_old,
        } => {
            let keep = match keep_old {
                None => None,
                Some(d) => Some(
                    parse_duration(d)
                        .ok_or_else(|| anyhow!("`{d}` is not a duration such as 30m, 12h or 7d"))?,
                ),
            };
            let issued = clients::rotate(&path, client_id, keep, now).map_err(e)?;
            print_issued(&issued, args.json, None);
        }
        ClientsAction::RevokeSecret {
            client_id,
            secret_id,
        } => {
            clients::revoke_secret(&path, client_id, secret_id).map_err(e)?;
            done(
                args.json,
                &format!("revoked secret {secret_id} of {client_id}"),
            );
        }
        ClientsAction::Disable { client_id } => {
            clients::set_disabled(&path, client_id, true).map_err(e)?;
            done(args.json, &format!("disabled {client_id}"));
        }
        ClientsAction::Enable { client_id } => {
            clients::set_disabled(&path, client_id, false).map_err(e)?;
            done(args.json, &format!("enabled {client_id}"));
        }
        ClientsAction::Remove { client_id } => {
            clients::remove_client(&path, client_id).map_err(e)?;
            done(args.json, &format!("removed {client_id}"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn done(as_json: bool, what: &str) {
    if as_json {
        println!("{}", json!({"ok": true, "result": what}));
    } else {
        println!("{what}");
    }
}

fn print_issued(i: &Issued, as_json: bool, new_client: Option<(&String, &Vec<String>)>) {
    if as_json {
        let mut v =
            json!({"client_id": i.client_id, "client_secret": i.secret, "secret_id": i.secret_id});
        if let Some((name, tenants)) = new_client {
            v["name"] = json!(name);
            v["allowed_tenants"] = json!(tenants);
        }
        println!("{v}");
    } else {
        println!("client_id:     {}", i.client_id);
        println!("client_secret: {}", i.secret);
        println!("secret_id:     {}", i.secret_id);
        eprintln!("The secret is shown once: store it now. fhir-edge keeps only a hash of it.");
    }
}

fn list(path: &Path, as_json: bool) -> anyhow::Result<()> {
    let registry =
        Live::<ClientRegistry>::load_file(path.to_path_buf(), ()).map_err(|p| anyhow!("{p}"))?;
    let registry = registry.load();
    let now = now_unix();
    let out: Vec<serde_json::Value> = registry.sorted().iter().map(|c| c.describe(now)).collect();
    if as_json {
        println!("{}", serde_json::Value::Array(out));
        return Ok(());
    }
    for c in &out {
        println!(
            "{}  {}{}  tenants: {}",
            c["client_id"].as_str().unwrap_or_default(),
            c["name"].as_str().unwrap_or_default(),
            if c["disabled"] == true {
                "  (disabled)"
            } else {
                ""
            },
            c["allowed_tenants"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default()
        );
        for s in c["secrets"].as_array().into_iter().flatten() {
            println!(
                "    secret {}  created {}{}{}",
                s["id"].as_str().unwrap_or_default(),
                s["created"].as_str().unwrap_or_default(),
                s["expires"]
                    .as_str()
                    .map(|e| format!("  expires {e}"))
                    .unwrap_or_default(),
                if s["live"] == true { "" } else { "  (expired)" }
            );
        }
    }
    if out.is_empty() {
        println!("no clients in {}", path.display());
    }
    Ok(())
}
