//! `fhir-edge portal …`: the operator's side of the registration portal. Invite an owner for some
//! tenants (a one-time link), list accounts, reset a password (a new link), disable or enable an
//! account.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use super::DEFAULT_CONFIG;
use crate::config::portal::{PortalConfig, PortalStoreConfig};
use crate::config::Config;
use crate::db::block_on;
use crate::portal::account::{random_bytes, random_token, sha256_hex};
use crate::portal::store::{
    Account, AccountChange, Activity, FileStore, Invite, PortalError, PortalStore,
};
use crate::tenant::TenantId;
use crate::time::{format_rfc3339, now_unix};

#[derive(Args)]
pub(super) struct PortalArgs {
    /// The config whose portal to manage.
    #[arg(long, short, default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,
    /// Print JSON (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: PortalAction,
}

#[derive(Subcommand)]
enum PortalAction {
    /// Create an account for an owner and print a one-time link to set its password.
    Invite {
        #[arg(long)]
        email: String,
        /// A tenant GUID whose clients the owner manages (repeatable).
        #[arg(long = "tenant", required = true)]
        tenants: Vec<String>,
    },
    /// List accounts (never a password or a code).
    Accounts,
    /// Clear an account's password, sign it out everywhere and print a new one-time link.
    Reset {
        #[arg(long)]
        email: String,
        /// Turn off its two-step sign-in as well (a lost device).
        #[arg(long)]
        totp: bool,
    },
    /// Disable an account (signed out everywhere; it cannot sign in); `enable` undoes it.
    Disable {
        #[arg(long)]
        email: String,
    },
    Enable {
        #[arg(long)]
        email: String,
    },
}

pub(super) fn run(args: PortalArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config).map_err(|p| anyhow!("invalid configuration:\n{p}"))?;
    let Some(portal) = config.portal else {
        bail!(
            "{}: the portal is not configured (a `portal` section and a token_endpoint)",
            args.config.display()
        );
    };
    let store = match &portal.store {
        PortalStoreConfig::File(p) => PortalStore::File(std::sync::Arc::new(
            FileStore::open(p.clone()).map_err(|e| anyhow!("{e}"))?,
        )),
        PortalStoreConfig::Postgres(db) => PortalStore::Postgres(std::sync::Arc::new(
            crate::portal::pg::PgStore::new((**db).clone()),
        )),
    };
    block_on(async {
        if let PortalStore::Postgres(pg) = &store {
            crate::portal::service::spawn_jobs(pg).map_err(|e| anyhow!("{e}"))?;
        }
        act(&portal, &store, args.action, args.json).await
    })
}

fn email_of(raw: &str) -> anyhow::Result<String> {
    let e = raw.trim().to_lowercase();
    let ok = e.len() <= 254
        && e.split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.starts_with('.'))
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        bail!("`{raw}` is not an e-mail address");
    }
    Ok(e)
}

fn new_invite(
    portal: &PortalConfig,
    account_id: &str,
    now: u64,
) -> anyhow::Result<(Invite, String)> {
    let token = random_token().map_err(|e| anyhow!(e))?;
    let expires = now + portal.invite_seconds;
    let link = format!("{}/invite/{token}", portal.public_url);
    Ok((
        Invite {
            token_hash: sha256_hex(&token),
            account_id: account_id.to_string(),
            expires,
        },
        link,
    ))
}

async fn find(store: &PortalStore, email: &str) -> anyhow::Result<Account> {
    let e = email_of(email)?;
    store
        .account_by_email(&e)
        .await
        .map_err(|e| anyhow!("{e}"))?
        .ok_or_else(|| anyhow!("no account for {e}"))
}

async fn record(
    store: &PortalStore,
    account_id: &str,
    action: &str,
    now: u64,
) -> anyhow::Result<()> {
    store
        .record(Activity {
            at: now,
            account_id: account_id.to_string(),
            source: Some("operator".into()),
            action: action.into(),
            client_id: None,
            secret_id: None,
        })
        .await
        .map_err(|e| anyhow!("{e}"))
}

async fn act(
    portal: &PortalConfig,
    store: &PortalStore,
    action: PortalAction,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let now = now_unix();
    let print_link = |what: &str, email: &str, link: &str, expires: u64| {
        if json {
            println!(
                "{}",
                json!({"email": email, "link": link, "expires": format_rfc3339(expires)})
            );
        } else {
            println!(
                "{what} {email}. Send them this link (single use, until {}):",
                format_rfc3339(expires)
            );
            println!("{link}");
        }
    };
    match action {
        PortalAction::Invite { email, tenants } => {
            let email = email_of(&email)?;
            let mut guids = Vec::new();
            for t in &tenants {
                let id = TenantId::parse(t).ok_or_else(|| anyhow!("`{t}` is not a tenant GUID"))?;
                if !guids.contains(&id.to_string()) {
                    guids.push(id.to_string());
                }
            }
            let id: String = random_bytes::<12>()
                .map_err(|e| anyhow!(e))?
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let (invite, link) = new_invite(portal, &id, now)?;
            let expires = invite.expires;
            let account = Account {
                id: format!("acct-{id}"),
                email: email.clone(),
                tenants: guids,
                password_hash: None,
                totp_secret: None,
                totp_last_step: 0,
                recovery_codes: Vec::new(),
                disabled: false,
                created: now,
            };
            let account_id = account.id.clone();
            let invite = Invite {
                account_id: account_id.clone(),
                ..invite
            };
            match store.create_account(account, invite).await {
                Ok(()) => {}
                Err(PortalError::Exists) => bail!(
                    "{email} has an account already; `fhir-edge portal reset --email {email}` sends a new link"
                ),
                Err(e) => return Err(anyhow!("{e}")),
            }
            record(store, &account_id, "invited", now).await?;
            print_link("Invited", &email, &link, expires);
        }
        PortalAction::Accounts => {
            let accounts = store.accounts().await.map_err(|e| anyhow!("{e}"))?;
            if json {
                let list: Vec<_> = accounts
                    .iter()
                    .map(|a| {
                        json!({
                            "id": a.id, "email": a.email, "tenants": a.tenants,
                            "password_set": a.password_hash.is_some(),
                            "totp": a.totp_secret.is_some(),
                            "disabled": a.disabled,
                            "created": format_rfc3339(a.created),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else if accounts.is_empty() {
                println!("no accounts");
            } else {
                for a in &accounts {
                    let state = match (a.disabled, a.password_hash.is_some()) {
                        (true, _) => "disabled",
                        (false, false) => "invited",
                        (false, true) => "active",
                    };
                    let totp = if a.totp_secret.is_some() {
                        "totp"
                    } else {
                        "no totp"
                    };
                    println!(
                        "{}  {}  {state}, {totp}  tenants {}",
                        a.id,
                        a.email,
                        a.tenants.join(",")
                    );
                }
            }
        }
        PortalAction::Reset { email, totp } => {
            let a = find(store, &email).await?;
            let (invite, link) = new_invite(portal, &a.id, now)?;
            let expires = invite.expires;
            store
                .change_account(&a.id, AccountChange::Reset { invite, totp })
                .await
                .map_err(|e| anyhow!("{e}"))?;
            record(store, &a.id, "reset", now).await?;
            print_link("Reset", &a.email, &link, expires);
        }
        PortalAction::Disable { email } => set_disabled(store, &email, true, now).await?,
        PortalAction::Enable { email } => set_disabled(store, &email, false, now).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn set_disabled(
    store: &PortalStore,
    email: &str,
    disabled: bool,
    now: u64,
) -> anyhow::Result<()> {
    let a = find(store, email).await?;
    store
        .change_account(&a.id, AccountChange::Disabled(disabled))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let what = if disabled { "disabled" } else { "enabled" };
    record(store, &a.id, what, now).await?;
    println!("{} {what}", a.email);
    Ok(())
}
