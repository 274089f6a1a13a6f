//! The `fhir-edge` command line: `run` (the default) and `check`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use fhir_edge::config::Settings;
use fhir_edge::reload::Live;
use fhir_edge::routing::RoutingTable;
use fhir_edge::server::{self, RunOptions};

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
    },
}

fn main() -> ExitCode {
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
    let settings =
        Settings::load(&config).map_err(|p| anyhow::anyhow!("invalid configuration:\n{p}"))?;
    fhir_edge::logging::init(settings.log_level);
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
    let server = server::build(settings, opts).context("cannot start")?;
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
    fhir_edge::auth::jwt::self_test().map_err(|e| anyhow::anyhow!("JWT self-test: {e}"))?;
    match Live::<RoutingTable>::load_file(
        settings.routes_file.clone(),
        settings.route_defaults.clone(),
    ) {
        Ok(t) => {
            println!(
                "{}: ok ({} keys; routing table {}: {} tenants)",
                config.display(),
                settings.verifier.key_count(),
                settings.routes_file.display(),
                t.load().len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(p) => {
            println!("{p}");
            Ok(ExitCode::FAILURE)
        }
    }
}
