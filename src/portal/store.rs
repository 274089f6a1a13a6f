//! Where the portal keeps what is its own: owners' accounts, one-time invites, server-side sessions,
//! each account's activity, and when each client secret was last used. Beside the client registry:
//! a JSON file with the file store ([`FileStore`]), the same PostgreSQL database with the database
//! store ([`super::pg::PgStore`]), so sessions work across every replica of a fleet.
//!
//! Only hashes of invite tokens, session ids and recovery codes are stored: reading the store gives
//! nobody a live credential.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::pg::PgStore;
use crate::db::DbError;

/// An owner's account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Account {
    pub id: String,
    /// Lower case.
    pub email: String,
    /// Tenant GUIDs (canonical lower case) whose clients the owner manages.
    pub tenants: Vec<String>,
    /// argon2id PHC string; `None` until an invite is accepted.
    #[serde(default)]
    pub password_hash: Option<String>,
    /// RFC 6238 shared secret, base32, once TOTP is enabled.
    #[serde(default)]
    pub totp_secret: Option<String>,
    #[serde(default)]
    pub totp_last_step: u64,
    /// SHA-256 (hex) of each unused recovery code.
    #[serde(default)]
    pub recovery_codes: Vec<String>,
    #[serde(default)]
    pub disabled: bool,
    pub created: u64,
}

/// A one-time link's record (the link carries the token; only its hash is kept).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Invite {
    pub token_hash: String,
    pub account_id: String,
    pub expires: u64,
}

/// A server-side session (the cookie carries the id; only its hash is kept).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SessionRow {
    pub id_hash: String,
    pub account_id: String,
    /// The synchronizer token every form of this session carries.
    pub csrf: String,
    pub created: u64,
    pub last_seen: u64,
}

/// One portal action of an account: never a secret, a password or a code.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Activity {
    pub at: u64,
    pub account_id: String,
    #[serde(default)]
    pub source: Option<String>,
    pub action: String,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub secret_id: Option<String>,
}

/// Why a portal store operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PortalError {
    #[error("an account with this e-mail address exists already")]
    Exists,
    #[error("no such account")]
    NoAccount,
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("portal state file: {0}")]
    File(String),
}

impl From<tokio_postgres::Error> for PortalError {
    fn from(e: tokio_postgres::Error) -> Self {
        PortalError::Db(DbError::from(e))
    }
}

/// Activity entries kept per account in the state file (the oldest go first).
const ACTIVITY_KEPT: usize = 500;

/// The portal's store.
#[derive(Clone)]
pub(crate) enum PortalStore {
    File(Arc<FileStore>),
    Postgres(Arc<PgStore>),
}

/// What a store is asked to change about an account.
#[derive(Debug, Clone)]
pub(crate) enum AccountChange {
    /// A new password; every session of the account ends.
    Password(String),
    /// TOTP enabled with these recovery code hashes.
    Totp {
        secret: String,
        recovery_codes: Vec<String>,
    },
    /// Every session of the account ends (signing out).
    EndSessions,
    /// Enabled or disabled; disabling ends every session.
    Disabled(bool),
    /// A reset: no password (and, with `totp`, no TOTP) until `invite` is accepted; every session ends.
    Reset { invite: Invite, totp: bool },
}

impl PortalStore {
    pub(crate) async fn create_account(
        &self,
        account: Account,
        invite: Invite,
    ) -> Result<(), PortalError> {
        match self {
            PortalStore::File(f) => f.mutate(|s| {
                if s.accounts.iter().any(|a| a.email == account.email) {
                    return Err(PortalError::Exists);
                }
                s.accounts.push(account);
                s.invites.push(invite);
                Ok(())
            }),
            PortalStore::Postgres(p) => p.create_account(account, invite).await,
        }
    }

    pub(crate) async fn accounts(&self) -> Result<Vec<Account>, PortalError> {
        match self {
            PortalStore::File(f) => f.read(|s| s.accounts.clone()),
            PortalStore::Postgres(p) => p.accounts(None).await,
        }
    }

    pub(crate) async fn account_by_email(
        &self,
        email: &str,
    ) -> Result<Option<Account>, PortalError> {
        match self {
            PortalStore::File(f) => {
                f.read(|s| s.accounts.iter().find(|a| a.email == email).cloned())
            }
            PortalStore::Postgres(p) => Ok(p
                .accounts(Some(("lower(email)", email.to_string())))
                .await?
                .pop()),
        }
    }

    pub(crate) async fn account(&self, id: &str) -> Result<Option<Account>, PortalError> {
        match self {
            PortalStore::File(f) => f.read(|s| s.accounts.iter().find(|a| a.id == id).cloned()),
            PortalStore::Postgres(p) => Ok(p
                .accounts(Some(("account_id", id.to_string())))
                .await?
                .pop()),
        }
    }

    /// Changes account `id`.
    pub(crate) async fn change_account(
        &self,
        id: &str,
        change: AccountChange,
    ) -> Result<(), PortalError> {
        match self {
            PortalStore::File(f) => f.mutate(|s| {
                let a = s
                    .accounts
                    .iter_mut()
                    .find(|a| a.id == id)
                    .ok_or(PortalError::NoAccount)?;
                let end_sessions = match change {
                    AccountChange::Password(hash) => {
                        a.password_hash = Some(hash);
                        true
                    }
                    AccountChange::Totp {
                        secret,
                        recovery_codes,
                    } => {
                        a.totp_secret = Some(secret);
                        a.recovery_codes = recovery_codes;
                        false
                    }
                    AccountChange::EndSessions => true,
                    AccountChange::Disabled(d) => {
                        a.disabled = d;
                        d
                    }
                    AccountChange::Reset { invite, totp } => {
                        a.password_hash = None;
                        if totp {
                            a.totp_secret = None;
                            a.recovery_codes.clear();
                        }
                        s.invites.retain(|i| i.account_id != id);
                        s.invites.push(invite);
                        true
                    }
                };
                if end_sessions {
                    s.sessions.retain(|x| x.account_id != id);
                }
                Ok(())
            }),
            PortalStore::Postgres(p) => p.change_account(id, change).await,
        }
    }

    /// The account an unexpired invite belongs to, without using the invite.
    pub(crate) async fn peek_invite(
        &self,
        token_hash: &str,
        now: u64,
    ) -> Result<Option<Account>, PortalError> {
        match self {
            PortalStore::File(f) => f.read(|s| {
                let i = s
                    .invites
                    .iter()
                    .find(|i| i.token_hash == token_hash && i.expires > now)?;
                s.accounts.iter().find(|a| a.id == i.account_id).cloned()
            }),
            PortalStore::Postgres(p) => p.peek_invite(token_hash, now).await,
        }
    }

    /// Uses an unexpired invite (once): sets the account's password and ends its sessions. `None`:
    /// no such invite (used, expired or never issued).
    pub(crate) async fn accept_invite(
        &self,
        token_hash: &str,
        now: u64,
        password_hash: String,
    ) -> Result<Option<Account>, PortalError> {
        match self {
            PortalStore::File(f) => f.mutate(|s| {
                let Some(pos) = s
                    .invites
                    .iter()
                    .position(|i| i.token_hash == token_hash && i.expires > now)
                else {
                    return Ok(None);
                };
                let invite = s.invites.remove(pos);
                s.sessions.retain(|x| x.account_id != invite.account_id);
                let Some(a) = s.accounts.iter_mut().find(|a| a.id == invite.account_id) else {
                    return Ok(None);
                };
                a.password_hash = Some(password_hash);
                Ok(Some(a.clone()))
            }),
            PortalStore::Postgres(p) => p.accept_invite(token_hash, now, password_hash).await,
        }
    }

    /// Accepts TOTP time step `step` for account `id` once: `false` when it (or a later one) was
    /// accepted before.
    pub(crate) async fn use_totp_step(&self, id: &str, step: u64) -> Result<bool, PortalError> {
        match self {
            PortalStore::File(f) => f.mutate(|s| {
                Ok(match s.accounts.iter_mut().find(|a| a.id == id) {
                    Some(a) if a.totp_last_step < step => {
                        a.totp_last_step = step;
                        true
                    }
                    _ => false,
                })
            }),
            PortalStore::Postgres(p) => p.use_totp_step(id, step).await,
        }
    }

    /// Uses recovery code `hash` of account `id` once.
    pub(crate) async fn use_recovery_code(
        &self,
        id: &str,
        hash: &str,
    ) -> Result<bool, PortalError> {
        match self {
            PortalStore::File(f) => f.mutate(|s| {
                let Some(a) = s.accounts.iter_mut().find(|a| a.id == id) else {
                    return Ok(false);
                };
                let before = a.recovery_codes.len();
                a.recovery_codes.retain(|c| c != hash);
                Ok(a.recovery_codes.len() < before)
            }),
            PortalStore::Postgres(p) => p.use_recovery_code(id, hash).await,
        }
    }

    pub(crate) async fn create_session(&self, row: SessionRow) -> Result<(), PortalError> {
        match self {
            PortalStore::File(f) => f.mutate(|s| {
                s.sessions.push(row);
                Ok(())
            }),
            PortalStore::Postgres(p) => p.create_session(row).await,
        }
    }

    pub(crate) async fn session(&self, id_hash: &str) -> Result<Option<SessionRow>, PortalError> {
        match self {
            PortalStore::File(f) => {
                f.read(|s| s.sessions.iter().find(|x| x.id_hash == id_hash).cloned())
            }
            PortalStore::Postgres(p) => p.session(id_hash).await,
        }
    }

    pub(crate) async fn touch_session(&self, id_hash: &str, now: u64) -> Result<(), PortalError> {
        match self {
            PortalStore::File(f) => f.mutate(|s| {
                if let Some(x) = s.sessions.iter_mut().find(|x| x.id_hash == id_hash) {
                    x.last_seen = now;
                }
                Ok(())
            }),
            PortalStore::Postgres(p) => p.touch_session(id_hash, now).await,
        }
    }

    pub(crate) async fn end_session(&self, id_hash: &str) -> Result<(), PortalError> {
        match self {
            PortalStore::File(f) => f.mutate(|s| {
                s.sessions.retain(|x| x.id_hash != id_hash);
                Ok(())
            }),
            PortalStore::Postgres(p) => p.end_session(id_hash).await,
        }
    }

    /// Drops sessions idle since `idle_before` or created before `created_before`, expired
    /// invites, and sign-in failures whose window started before `failures_before`.
    pub(crate) async fn purge(
        &self,
        now: u64,
        idle_before: u64,
        created_before: u64,
        failures_before: u64,
    ) -> Result<(), PortalError> {
        match self {
            PortalStore::File(f) => {
                let stale = f.read(|s| {
                    s.sessions
                        .iter()
                        .any(|x| x.last_seen < idle_before || x.created < created_before)
                        || s.invites.iter().any(|i| i.expires <= now)
                        || s.login_failures.values().any(|(_, t)| *t < failures_before)
                })?;
                if !stale {
                    return Ok(());
                }
                f.mutate(|s| {
                    s.sessions
                        .retain(|x| x.last_seen >= idle_before && x.created >= created_before);
                    s.invites.retain(|i| i.expires > now);
                    s.login_failures.retain(|_, (_, t)| *t >= failures_before);
                    Ok(())
                })
            }
            PortalStore::Postgres(p) => {
                p.purge(now, idle_before, created_before, failures_before)
                    .await
            }
        }
    }

    /// The failures counted against `key` in the window that started at its first failure (`(0,
    /// 0)`: none, or the window is over).
    pub(crate) async fn login_failures(
        &self,
        key: &str,
        now: u64,
        window: u64,
    ) -> Result<(u32, u64), PortalError> {
        let live = |(n, since): (u32, u64)| {
            if now < since.saturating_add(window) {
                (n, since)
            } else {
                (0, 0)
            }
        };
        match self {
            PortalStore::File(f) => {
                f.read(|s| live(s.login_failures.get(key).copied().unwrap_or((0, 0))))
            }
            PortalStore::Postgres(p) => Ok(live(p.login_failures(key).await?)),
        }
    }

    /// Counts one failed sign-in against `key` (a new window when the last one is over).
    pub(crate) async fn note_login_failure(
        &self,
        key: &str,
        now: u64,
        window: u64,
    ) -> Result<(), PortalError> {
        match self {
            PortalStore::File(f) => f.mutate(|s| {
                let e = s.login_failures.entry(key.to_string()).or_insert((0, now));
                *e = if now >= e.1.saturating_add(window) {
                    (1, now)
                } else {
                    (e.0.saturating_add(1), e.1)
                };
                while s.login_failures.len() > LOGIN_FAILURES_KEPT {
                    let oldest = s
                        .login_failures
                        .iter()
                        .min_by_key(|(_, (_, since))| *since)
                        .map(|(k, _)| k.clone());
                    match oldest {
                        Some(k) => s.login_failures.remove(&k),
                        None => break,
                    };
                }
                Ok(())
            }),
            PortalStore::Postgres(p) => p.note_login_failure(key, now, window).await,
        }
    }

    /// Forgets `key`'s failures (a successful sign-in).
    pub(crate) async fn clear_login_failures(&self, key: &str) -> Result<(), PortalError> {
        match self {
            PortalStore::File(f) => {
                if f.read(|s| s.login_failures.contains_key(key))? {
                    f.mutate(|s| {
                        s.login_failures.remove(key);
                        Ok(())
                    })?;
                }
                Ok(())
            }
            PortalStore::Postgres(p) => p.clear_login_failures(key).await,
        }
    }

    pub(crate) async fn record(&self, a: Activity) -> Result<(), PortalError> {
        match self {
            PortalStore::File(f) => f.mutate(|s| {
                let count = s
                    .activity
                    .iter()
                    .filter(|x| x.account_id == a.account_id)
                    .count();
                if count >= ACTIVITY_KEPT {
                    if let Some(pos) = s.activity.iter().position(|x| x.account_id == a.account_id)
                    {
                        s.activity.remove(pos);
                    }
                }
                s.activity.push(a);
                Ok(())
            }),
            PortalStore::Postgres(p) => p.record(a).await,
        }
    }

    /// Account `id`'s latest `limit` actions, newest first.
    pub(crate) async fn activity(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<Vec<Activity>, PortalError> {
        match self {
            PortalStore::File(f) => f.read(|s| {
                s.activity
                    .iter()
                    .rev()
                    .filter(|x| x.account_id == id)
                    .take(limit)
                    .cloned()
                    .collect()
            }),
            PortalStore::Postgres(p) => p.activity(id, limit).await,
        }
    }

    /// When each secret of `client_id` was last used to get a token, as far as recorded.
    pub(crate) async fn last_used(
        &self,
        client_id: &str,
    ) -> Result<BTreeMap<String, u64>, PortalError> {
        match self {
            PortalStore::File(f) => f.read(|s| {
                let prefix = format!("{client_id}/");
                s.last_used
                    .iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), *v)))
                    .collect()
            }),
            PortalStore::Postgres(p) => p.last_used(client_id).await,
        }
    }

    /// Records uses of secrets: `(client_id, secret_id) → time`.
    pub(crate) async fn mark_used(
        &self,
        uses: Vec<((String, String), u64)>,
    ) -> Result<(), PortalError> {
        match self {
            PortalStore::File(f) => f.mutate(|s| {
                for ((c, sid), at) in uses {
                    let e = s.last_used.entry(format!("{c}/{sid}")).or_insert(0);
                    *e = (*e).max(at);
                }
                Ok(())
            }),
            PortalStore::Postgres(p) => p.mark_used(uses).await,
        }
    }
}

/// The state file's contents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct State {
    #[serde(default)]
    pub accounts: Vec<Account>,
    #[serde(default)]
    pub invites: Vec<Invite>,
    #[serde(default)]
    pub sessions: Vec<SessionRow>,
    #[serde(default)]
    pub activity: Vec<Activity>,
    /// `client_id/secret_id` → Unix time.
    #[serde(default)]
    pub last_used: BTreeMap<String, u64>,
    /// SHA-256 of an e-mail address given at sign-in → failures and when the window started.
    #[serde(default)]
    pub login_failures: BTreeMap<String, (u32, u64)>,
}

/// Failure entries the state file keeps (the oldest windows go first): a flood of made-up
/// addresses cannot grow the file without bound.
const LOGIN_FAILURES_KEPT: usize = 10_000;

/// The portal's state in one JSON file, read on every use and changed under an exclusive lock on
/// `<file>.lock` (read, change, write a temporary file, fsync, rename), so the running proxy and
/// `fhir-edge portal …` can both change it. For one replica and a modest number of accounts: a fleet
/// uses PostgreSQL.
pub(crate) struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// Checks that the state file can be read (a missing file is an empty portal).
    pub(crate) fn open(path: PathBuf) -> Result<FileStore, PortalError> {
        let store = FileStore { path };
        store.load()?;
        Ok(store)
    }

    fn load(&self) -> Result<State, PortalError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| PortalError::File(format!("{}: {e}", self.path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(PortalError::File(format!("{}: {e}", self.path.display()))),
        }
    }

    fn read<R>(&self, f: impl FnOnce(&State) -> R) -> Result<R, PortalError> {
        Ok(f(&self.load()?))
    }

    /// Applies `f` to the state under the lock and writes the result; a change that fails (or cannot
    /// be written) is not made.
    fn mutate<R>(
        &self,
        f: impl FnOnce(&mut State) -> Result<R, PortalError>,
    ) -> Result<R, PortalError> {
        let io = |e: std::io::Error| PortalError::File(format!("{}: {e}", self.path.display()));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(crate::atomic_file::sibling(&self.path, ".lock"))
            .map_err(io)?;
        lock.lock().map_err(io)?;
        let mut state = self.load()?;
        let r = f(&mut state)?;
        let mut bytes = serde_json::to_vec_pretty(&state)
            .map_err(|e| PortalError::File(format!("cannot serialise: {e}")))?;
        bytes.push(b'\n');
        crate::atomic_file::write_atomically(&self.path, &bytes).map_err(PortalError::File)?;
        drop(lock);
        Ok(r)
    }
}
