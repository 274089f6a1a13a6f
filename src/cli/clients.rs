//! `fhir-edge clients …`: the operator's management of the client registry, in `clients.yaml` or in
//! PostgreSQL (`--store`), and moving a registry between the two (`export`, `import`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::DEFAULT_CONFIG;
use crate::atomic_file::write_atomically;
use crate::config::Config;
use crate::db::{block_on, DbConfig};
use crate::reload::Loadable;
use crate::tenant::TenantId;
use crate::time::{now_unix, parse_duration};
use crate::token::clients::change::{new_client, new_client_secret};
use crate::token::clients::file::HEADER as FILE_HEADER;
use crate::token::clients::{
    apply_to_file, pg, read_file, registry_from_entries, Change, ClientRegistry, ClientsFile,
    Issued, StoreConfig, StoreError,
};

#[derive(Args)]
pub(super) struct ClientsArgs {
    /// The config whose client registry to manage.
    #[arg(long, short, default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,
    /// The store to manage: the one the config names (default), or `postgres` (the config's
    /// `database` section) or `file`.
    #[arg(long, value_enum, global = true)]
    store: Option<StoreKind>,
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
    /// Write the registry as a clients.yaml (secrets stay salted digests), to --out or stdout.
    Export {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Add the clients of a clients.yaml to the store (an id present already is an error), or
    /// with --replace make the store exactly that file. One transaction: all or nothing.
    Import {
        #[arg(value_name = "FILE")]
        source: PathBuf,
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    File,
    Postgres,
}

/// Where a `clients` command reads and writes.
enum Target {
    File(PathBuf),
    Postgres(Box<DbConfig>),
}

impl Target {
    fn from_args(args: &ClientsArgs) -> anyhow::Result<Target> {
        if let Some(f) = &args.file {
            if args.store == Some(StoreKind::Postgres) {
                bail!("--file names a clients file; it cannot go with --store postgres");
            }
            return Ok(Target::File(f.clone()));
        }
        if args.store == Some(StoreKind::Postgres) {
            let db = Config::load_database(&args.config)
                .map_err(|p| anyhow!("invalid database settings:\n{p}"))?;
            return Ok(Target::Postgres(Box::new(db)));
        }
        let config =
            Config::load(&args.config).map_err(|p| anyhow!("invalid configuration:\n{p}"))?;
        match config.token.map(|t| t.clients) {
            Some(StoreConfig::File(path)) => Ok(Target::File(path)),
            Some(StoreConfig::Postgres { .. }) if args.store == Some(StoreKind::File) => bail!(
                "{} keeps clients in PostgreSQL; pass --file to manage a clients file",
                args.config.display()
            ),
            Some(StoreConfig::Postgres { db, .. }) => Ok(Target::Postgres(db)),
            None => bail!(
                "{} has no token_endpoint section (or pass --file)",
                args.config.display()
            ),
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::File(p) => p.display().to_string(),
            Target::Postgres(db) => db.describe(),
        }
    }

    /// Runs `f` on a fresh connection to a database at the schema this build uses.
    fn with_db<R>(
        db: &DbConfig,
        f: impl AsyncFnOnce(&mut tokio_postgres::Client) -> Result<R, StoreError>,
    ) -> anyhow::Result<R> {
        block_on(async {
            let mut client = db.connect_checked(None).await?;
            f(&mut client).await
        })
        .map_err(|e: StoreError| anyhow!("{}: {e}", db.describe()))
    }

    fn apply(&self, change: Change) -> anyhow::Result<()> {
        match self {
            Target::File(path) => apply_to_file(path, change).map_err(|e| anyhow!(e)),
            Target::Postgres(db) => Target::with_db(db, async |c| pg::apply(c, &change).await),
        }
    }

    fn read(&self) -> anyhow::Result<ClientsFile> {
        match self {
            Target::File(path) => read_file(path).map_err(|e| anyhow!(e)),
            Target::Postgres(db) => Target::with_db(db, async |c| {
                pg::read_all(&*c).await.map_err(StoreError::Db)
            }),
        }
    }
}

pub(super) fn manage(args: ClientsArgs) -> anyhow::Result<ExitCode> {
    let target = Target::from_args(&args)?;
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
            let (change, issued) = new_client(name, allowed.clone(), now).map_err(e)?;
            target.apply(change)?;
            print_issued(&issued, args.json, Some((name, &allowed)));
        }
        ClientsAction::List => list(&target, args.json)?,
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
            let (change, issued) = new_client_secret(client_id, keep, now).map_err(e)?;
            target.apply(change)?;
            print_issued(&issued, args.json, None);
        }
        ClientsAction::RevokeSecret {
            client_id,
            secret_id,
        } => {
            target.apply(Change::RevokeSecret {
                client_id: client_id.clone(),
                secret_id: secret_id.clone(),
                keep_one: false,
            })?;
            done(
                args.json,
                &format!("revoked secret {secret_id} of {client_id}"),
            );
        }
        ClientsAction::Disable { client_id } | ClientsAction::Enable { client_id } => {
            let disabled = matches!(args.action, ClientsAction::Disable { .. });
            target.apply(Change::SetDisabled {
                client_id: client_id.clone(),
                disabled,
            })?;
            let verb = if disabled { "disabled" } else { "enabled" };
            done(args.json, &format!("{verb} {client_id}"));
        }
        ClientsAction::Remove { client_id } => {
            target.apply(Change::Remove {
                client_id: client_id.clone(),
            })?;
            done(args.json, &format!("removed {client_id}"));
        }
        ClientsAction::Export { out } => export(&target, out.as_deref())?,
        ClientsAction::Import {
            source: file,
            replace,
        } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow!("cannot read {}: {e}", file.display()))?;
            // The whole file is held to the registry's rules before anything is written.
            let registry = ClientRegistry::from_text(file, &text, &())
                .map_err(|p| anyhow!("{} is not a valid client registry:\n{p}", file.display()))?;
            let parsed: ClientsFile = serde_yaml_ng::from_str(&text)
                .map_err(|err| anyhow!("cannot read {}: {err}", file.display()))?;
            target.apply(Change::Import {
                file: parsed,
                replace: *replace,
            })?;
            done(
                args.json,
                &format!(
                    "imported {} clients into {}{}",
                    registry.len(),
                    target.describe(),
                    if *replace { " (replacing it)" } else { "" }
                ),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes the registry as a `clients.yaml` (secrets stay salted digests).
fn export(target: &Target, out: Option<&Path>) -> anyhow::Result<()> {
    let file = target.read()?;
    let text = format!("{}{}", FILE_HEADER, serde_yaml_ng::to_string(&file)?);
    match out {
        Some(path) => {
            write_atomically(path, text.as_bytes()).map_err(|e| anyhow!(e))?;
            eprintln!(
                "exported {} clients from {} to {}",
                file.clients.0.len(),
                target.describe(),
                path.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(())
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

fn list(target: &Target, as_json: bool) -> anyhow::Result<()> {
    let (registry, problems) = registry_from_entries(&target.read()?);
    for p in problems {
        eprintln!("warning: left out: {p}");
    }
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
        println!("no clients in {}", target.describe());
    }
    Ok(())
}
