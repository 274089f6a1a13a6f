//! `fhir-edge db …`: the schema of the PostgreSQL database a fleet shares.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Args, Subcommand};

use super::DEFAULT_CONFIG;
use crate::config::Config;
use crate::db::{block_on, migrate, DbConfig, DbError};

#[derive(Args)]
pub(super) struct DbArgs {
    /// The config whose `database` section names the database.
    #[arg(long, short, default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,
    #[command(subcommand)]
    action: DbAction,
}

#[derive(Subcommand)]
enum DbAction {
    /// Apply the migrations the database lacks (safe to run from several places at once).
    Migrate,
    /// Show the schema version and the number of clients; exit 1 if this build cannot use it.
    Status,
}

/// The schema version and the number of clients, if this build can use the database.
pub(super) fn status(db: &DbConfig) -> Result<String, DbError> {
    block_on(async {
        let client = db.connect_checked(None).await?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM fhir_edge_clients", &[])
            .await?
            .get(0);
        Ok(format!("schema version {}, {n} clients", migrate::CURRENT))
    })
}

pub(super) fn run(args: DbArgs) -> anyhow::Result<ExitCode> {
    let db = Config::load_database(&args.config)
        .map_err(|p| anyhow!("invalid database settings:\n{p}"))?;
    match args.action {
        DbAction::Migrate => {
            let applied = block_on(async {
                let mut client = db.connect(None).await?;
                migrate::migrate(&mut client).await
            })
            .map_err(|e| anyhow!("{}: {e}", db.describe()))?;
            if applied.is_empty() {
                println!(
                    "{}: schema up to date (version {})",
                    db.describe(),
                    migrate::CURRENT
                );
            } else {
                let names: Vec<String> = applied.iter().map(i32::to_string).collect();
                println!(
                    "{}: applied migration {} (schema version {})",
                    db.describe(),
                    names.join(", "),
                    migrate::CURRENT
                );
            }
        }
        DbAction::Status => {
            let s = status(&db).map_err(|e| anyhow!("{}: {e}", db.describe()))?;
            println!("{}: {s}", db.describe());
        }
    }
    Ok(ExitCode::SUCCESS)
}
