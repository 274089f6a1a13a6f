//! The `fhir-edge` command line: `run` (the default), `check`, `keygen`, `clients …`, `db …`, `portal …` and `schema`.
//!
//! It lives in the library so that it reaches the registry and key code without making them public;
//! the binary's `main.rs` keeps what is process-wide (the allocator, `prctl`, the crypto provider) and
//! calls [`main`].

mod clients;
mod db;
mod portal;
mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::{Parser, Subcommand};
use pingora::server::configuration::Opt;
use pingora::server::RunArgs;
use pingora::server::Server;

use crate::config::{Config, MetadataSource, Settings};
use crate::reload::{Live, Loadable};
use crate::routing::{RoutingTable, TableContext};
use crate::token::clients::{ClientRegistry, StoreConfig};
use crate::token::keys::{keygen, KeyAlg};
use crate::Edge;

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
        /// Resolve no host names and fetch no issuer keys (check a config away from the network it
        /// will run on).
        #[arg(long)]
        offline: bool,
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
    /// Manage the client registry (clients.yaml or PostgreSQL); running proxies pick changes up at
    /// once.
    Clients(clients::ClientsArgs),
    /// The PostgreSQL database of a fleet: `migrate` its schema, or show its `status`.
    Db(db::DbArgs),
    /// The registration portal's accounts: invite an owner, list, reset, disable.
    Portal(portal::PortalArgs),
    /// Print the JSON Schema of a file (the copies in conf/schema/ are these).
    Schema {
        #[arg(value_enum)]
        file: crate::config::schema::SchemaFile,
    },
}

/// What the binary gives the command line: process-wide hooks the library does not install itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hooks {
    /// Hands freed memory back to the OS after a large routing table loads
    /// ([`Edge::release_memory_with`]).
    pub release_memory: Option<fn()>,
}

/// Parses the process arguments and runs the command.
pub fn main(hooks: Hooks) -> ExitCode {
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
        } => run(config, upgrade, daemon, hooks),
        Command::Check { config, offline } => check(config, offline),
        Command::Keygen { alg, out } => keygen(alg, &out)
            .map(|kid| {
                println!("wrote {} ({alg:?}), kid {kid}", out.display());
                ExitCode::SUCCESS
            })
            .map_err(|e| anyhow!(e)),
        Command::Clients(args) => clients::manage(args),
        Command::Db(args) => db::run(args),
        Command::Portal(args) => portal::run(args),
        Command::Schema { file } => {
            print!("{}", file.text());
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fhir-edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: PathBuf, upgrade: bool, daemon: bool, hooks: Hooks) -> anyhow::Result<ExitCode> {
    // The logger first, so that what loading the files logs is seen.
    let settings =
        Settings::from_file(&config).map_err(|p| anyhow!("invalid configuration:\n{p}"))?;
    let format = if settings.log.format == "json" {
        crate::LogFormat::Json
    } else {
        crate::LogFormat::Text
    };
    crate::init_logging_as(
        settings.log.level.parse().unwrap_or(log::LevelFilter::Info),
        format,
    );
    let mut edge = Edge::from_file(&config).context("cannot start")?;
    if let Some(release) = hooks.release_memory {
        edge = edge.release_memory_with(release);
    }
    log::info!(
        "fhir-edge {} starting: {}",
        env!("CARGO_PKG_VERSION"),
        edge.describe()
    );
    log::info!(
        "JWT crypto: {}",
        if crate::install_crypto_provider() {
            "aws-lc-rs, RSA and ECDSA keys parsed once per thread"
        } else {
            "jsonwebtoken's default provider"
        }
    );
    let mut conf = edge.server_conf();
    conf.daemon = daemon;
    let signals = upgrade::UpgradeSignals {
        // The path this binary was started from: what a package upgrade replaces.
        exe: std::env::current_exe()
            .map(|p| p.into_os_string())
            .or_else(|_| std::env::args_os().next().ok_or(()))
            .unwrap_or_else(|()| "fhir-edge".into()),
        config: config.clone(),
        upgrade_sock: conf.upgrade_sock.clone().into(),
    };
    let opt = Opt {
        upgrade,
        daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    edge.add_to(&mut server).context("cannot start")?;
    let probe = settings
        .listen
        .iter()
        .chain(settings.tls_listeners.iter().map(|l| &l.addr))
        .find_map(|a| a.parse().ok());
    if !daemon {
        upgrade::notify_when_serving(server.watch_execution_phase(), probe);
    }
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    Ok(ExitCode::SUCCESS)
}

fn check(config: PathBuf, offline: bool) -> anyhow::Result<ExitCode> {
    let settings = match Config::load(&config) {
        Ok(s) => s,
        Err(p) => {
            println!("{p}");
            return Ok(ExitCode::FAILURE);
        }
    };
    crate::auth::jwt::self_test().map_err(|e| anyhow!("JWT self-test: {e}"))?;
    let mut problems = Vec::new();
    let mut summary = vec![format!("{} keys", settings.verifier.key_count())];
    if let (MetadataSource::Upstream(url), false) = (&settings.metadata, offline) {
        if let Err(m) = url.resolve() {
            problems.push(format!("{}: metadata_upstream: {m}", config.display()));
        }
    }
    if !offline {
        let issuers: Vec<_> = settings.verifier.issuers().cloned().collect();
        for (label, fetched) in crate::auth::remote::check_fetch(&issuers) {
            match fetched {
                Ok(n) => summary.push(format!("issuer {label}: {n} keys fetched")),
                Err(m) => problems.push(format!(
                    "{}: issuer {label}: key fetch failed: {m}",
                    config.display()
                )),
            }
        }
    }
    let defaults = settings.route_defaults.clone();
    let context = if offline {
        TableContext::offline(defaults)
    } else {
        TableContext::from(defaults)
    };
    match Live::<RoutingTable>::load_file(settings.routes_file.clone(), context) {
        Ok(t) => {
            let table = t.load();
            // `run` serves the others and answers these tenants 503; a check says so plainly.
            for name in table.unavailable() {
                problems.push(format!(
                    "{}: tenant `{name}`: its upstream host does not resolve (the tenant would be unavailable)",
                    settings.routes_file.display()
                ));
            }
            summary.push(format!(
                "routing table {}: {}",
                settings.routes_file.display(),
                table.summary()
            ))
        }
        Err(p) => problems.push(p.to_string()),
    }
    match settings.token.as_ref().map(|t| &t.clients) {
        Some(StoreConfig::File(path)) => {
            match Live::<ClientRegistry>::load_file(path.clone(), ()) {
                Ok(c) => summary.push(format!(
                    "clients {}: {}",
                    path.display(),
                    c.load().summary()
                )),
                Err(p) => problems.push(p.to_string()),
            }
        }
        Some(StoreConfig::Postgres { db, .. }) if offline => {
            summary.push(format!(
                "clients in {} (not contacted: --offline)",
                db.describe()
            ));
        }
        Some(StoreConfig::Postgres { db, .. }) => match db::status(db) {
            Ok(s) => summary.push(format!("clients in {}: {s}", db.describe())),
            Err(e) => problems.push(format!("{}: {e}", db.describe())),
        },
        None => {}
    }
    if problems.is_empty() {
        println!("{}: ok ({})", config.display(), summary.join("; "));
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{}", problems.join("\n"));
        Ok(ExitCode::FAILURE)
    }
}
