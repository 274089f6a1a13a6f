//! `fhir-edge clients …`: the operator's management of the client registry (`clients.yaml`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::DEFAULT_CONFIG;
use crate::config::Config;
use crate::reload::Live;
use crate::tenant::TenantId;
use crate::time::{now_unix, parse_duration};
use crate::token::clients::{self, ClientRegistry, Issued};

#[derive(Args)]
pub(super) struct ClientsArgs {
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

fn clients_file(args: &ClientsArgs) -> anyhow::Result<PathBuf> {
    if let Some(f) = &args.file {
        return Ok(f.clone());
    }
    let settings =
        Config::load(&args.config).map_err(|p| anyhow!("invalid configuration:\n{p}"))?;
    match settings.token {
        Some(t) => Ok(t.clients_file),
        None => bail!(
            "{} has no token_endpoint section (or pass --file)",
            args.config.display()
        ),
    }
}

pub(super) fn manage(args: ClientsArgs) -> anyhow::Result<ExitCode> {
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
