//! The portal's store in PostgreSQL (tables of migration 0002), shared by every replica.
//!
//! Queries run on a connection pool owned by the portal's background service, in that service's
//! runtime (as the client registry's writes do): a request hands its query over as a job and awaits
//! the answer, bounded by the database's query timeout.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use deadpool_postgres::{Object, Pool};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Row;

use super::store::{Account, AccountChange, Activity, Invite, PortalError, SessionRow};
use crate::db::{DbConfig, DbError};

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A query to run with a pooled connection.
pub(crate) type Job = Box<dyn FnOnce(Pool) -> BoxFuture + Send>;

pub(crate) struct PgStore {
    pub db: DbConfig,
    jobs: mpsc::UnboundedSender<Job>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Job>>>,
}

const ACCOUNT_COLUMNS: &str = "account_id, email, tenants, password_hash, totp_secret, \
     totp_last_step, recovery_codes, disabled, created";

fn account(row: &Row) -> Result<Account, PortalError> {
    let step: i64 = row.try_get(5)?;
    let created: i64 = row.try_get(8)?;
    Ok(Account {
        id: row.try_get(0)?,
        email: row.try_get(1)?,
        tenants: row.try_get(2)?,
        password_hash: row.try_get(3)?,
        totp_secret: row.try_get(4)?,
        totp_last_step: u64::try_from(step).unwrap_or(0),
        recovery_codes: row.try_get(6)?,
        disabled: row.try_get(7)?,
        created: u64::try_from(created).unwrap_or(0),
    })
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl PgStore {
    pub(crate) fn new(db: DbConfig) -> PgStore {
        let (jobs, receiver) = mpsc::unbounded_channel();
        PgStore {
            db,
            jobs,
            receiver: Mutex::new(Some(receiver)),
        }
    }

    /// The job queue, taken once by the background service that runs it.
    pub(crate) fn take_jobs(&self) -> Option<mpsc::UnboundedReceiver<Job>> {
        self.receiver.lock().ok().and_then(|mut r| r.take())
    }

    /// Runs `f` with a pooled connection in the background service's runtime.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, PortalError>
    where
        T: Send + 'static,
        F: FnOnce(Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, PortalError>> + Send,
    {
        let (tx, rx) = oneshot::channel();
        let limit = self.db.query_timeout * 2;
        let job: Job = Box::new(move |pool: Pool| {
            Box::pin(async move {
                let result = tokio::time::timeout(limit, async move {
                    let conn = pool.get().await.map_err(DbError::from)?;
                    f(conn).await
                })
                .await
                .unwrap_or_else(|_| {
                    Err(PortalError::Db(DbError::Unavailable(
                        "the database did not answer in time".into(),
                    )))
                });
                let _ = tx.send(result);
            })
        });
        let gone = || {
            PortalError::Db(DbError::Unavailable(
                "the portal's database service is not running".into(),
            ))
        };
        self.jobs.send(job).map_err(|_| gone())?;
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    pub(crate) async fn create_account(&self, a: Account, i: Invite) -> Result<(), PortalError> {
        self.run(move |mut c| async move {
            let tx = c.transaction().await?;
            let taken = tx
                .query_opt(
                    "SELECT 1 FROM fhir_edge_portal_accounts WHERE lower(email) = lower($1)",
                    &[&a.email],
                )
                .await?;
            if taken.is_some() {
                return Err(PortalError::Exists);
            }
            tx.execute(
                "INSERT INTO fhir_edge_portal_accounts (account_id, email, tenants, created) \
                 VALUES ($1, $2, $3, $4)",
                &[&a.id, &a.email, &a.tenants, &int(a.created)],
            )
            .await?;
            tx.execute(
                "INSERT INTO fhir_edge_portal_invites (token_hash, account_id, expires) \
                 VALUES ($1, $2, $3)",
                &[&i.token_hash, &i.account_id, &int(i.expires)],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Every account, or those whose `column` equals `value`.
    pub(crate) async fn accounts(
        &self,
        filter: Option<(&'static str, String)>,
    ) -> Result<Vec<Account>, PortalError> {
        self.run(move |c| async move {
            let rows = match filter {
                Some((column, value)) => {
                    let q = format!(
                        "SELECT {ACCOUNT_COLUMNS} FROM fhir_edge_portal_accounts WHERE {column} = $1"
                    );
                    c.query(&q, &[&value]).await?
                }
                None => {
                    let q = format!(
                        "SELECT {ACCOUNT_COLUMNS} FROM fhir_edge_portal_accounts ORDER BY email"
                    );
                    c.query(&q, &[]).await?
                }
            };
            rows.iter().map(account).collect()
        })
        .await
    }

    pub(crate) async fn change_account(
        &self,
        id: &str,
        change: AccountChange,
    ) -> Result<(), PortalError> {
        let id = id.to_string();
        self.run(move |mut c| async move {
            let tx = c.transaction().await?;
            let (n, end_sessions) = match change {
                AccountChange::Password(hash) => (
                    tx.execute(
                        "UPDATE fhir_edge_portal_accounts SET password_hash = $2 WHERE account_id = $1",
                        &[&id, &hash],
                    )
                    .await?,
                    true,
                ),
                AccountChange::Totp {
                    secret,
                    recovery_codes,
                } => (
                    tx.execute(
                        "UPDATE fhir_edge_portal_accounts SET totp_secret = $2, recovery_codes = $3 \
                         WHERE account_id = $1",
                        &[&id, &secret, &recovery_codes],
                    )
                    .await?,
                    false,
                ),
                AccountChange::EndSessions => (
                    tx.execute(
                        "SELECT 1 FROM fhir_edge_portal_accounts WHERE account_id = $1",
                        &[&id],
                    )
                    .await?,
                    true,
                ),
                AccountChange::Disabled(d) => (
                    tx.execute(
                        "UPDATE fhir_edge_portal_accounts SET disabled = $2 WHERE account_id = $1",
                        &[&id, &d],
                    )
                    .await?,
                    d,
                ),
                AccountChange::Reset { invite, totp } => {
                    let n = tx
                        .execute(
                            "UPDATE fhir_edge_portal_accounts SET password_hash = NULL, \
                             totp_secret = CASE WHEN $2 THEN NULL ELSE totp_secret END, \
                             recovery_codes = CASE WHEN $2 THEN '{}' ELSE recovery_codes END \
                             WHERE account_id = $1",
                            &[&id, &totp],
                        )
                        .await?;
                    tx.execute(
                        "DELETE FROM fhir_edge_portal_invites WHERE account_id = $1",
                        &[&id],
                    )
                    .await?;
                    if n > 0 {
                        tx.execute(
                            "INSERT INTO fhir_edge_portal_invites (token_hash, account_id, expires) \
                             VALUES ($1, $2, $3)",
                            &[&invite.token_hash, &id, &int(invite.expires)],
                        )
                        .await?;
                    }
                    (n, true)
                }
            };
            if n == 0 {
                return Err(PortalError::NoAccount);
            }
            if end_sessions {
                tx.execute(
                    "DELETE FROM fhir_edge_portal_sessions WHERE account_id = $1",
                    &[&id],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn peek_invite(
        &self,
        token_hash: &str,
        now: u64,
    ) -> Result<Option<Account>, PortalError> {
        let token_hash = token_hash.to_string();
        self.run(move |c| async move {
            let q = format!(
                "SELECT {ACCOUNT_COLUMNS} FROM fhir_edge_portal_accounts WHERE account_id = \
                 (SELECT account_id FROM fhir_edge_portal_invites WHERE token_hash = $1 AND expires > $2)"
            );
            c.query_opt(&q, &[&token_hash, &int(now)])
                .await?
                .as_ref()
                .map(account)
                .transpose()
        })
        .await
    }

    pub(crate) async fn accept_invite(
        &self,
        token_hash: &str,
        now: u64,
        password_hash: String,
    ) -> Result<Option<Account>, PortalError> {
        let token_hash = token_hash.to_string();
        self.run(move |mut c| async move {
            let tx = c.transaction().await?;
            // DELETE … RETURNING: of two concurrent uses of one link, exactly one gets the row.
            let Some(row) = tx
                .query_opt(
                    "DELETE FROM fhir_edge_portal_invites WHERE token_hash = $1 AND expires > $2 \
                     RETURNING account_id",
                    &[&token_hash, &int(now)],
                )
                .await?
            else {
                return Ok(None);
            };
            let id: String = row.try_get(0)?;
            let q = format!(
                "UPDATE fhir_edge_portal_accounts SET password_hash = $2 WHERE account_id = $1 \
                 RETURNING {ACCOUNT_COLUMNS}"
            );
            let updated = tx.query_opt(&q, &[&id, &password_hash]).await?;
            tx.execute(
                "DELETE FROM fhir_edge_portal_sessions WHERE account_id = $1",
                &[&id],
            )
            .await?;
            tx.commit().await?;
            updated.as_ref().map(account).transpose()
        })
        .await
    }

    pub(crate) async fn use_totp_step(&self, id: &str, step: u64) -> Result<bool, PortalError> {
        let id = id.to_string();
        self.run(move |c| async move {
            let n = c
                .execute(
                    "UPDATE fhir_edge_portal_accounts SET totp_last_step = $2 \
                     WHERE account_id = $1 AND totp_last_step < $2",
                    &[&id, &int(step)],
                )
                .await?;
            Ok(n == 1)
        })
        .await
    }

    pub(crate) async fn use_recovery_code(
        &self,
        id: &str,
        hash: &str,
    ) -> Result<bool, PortalError> {
        let (id, hash) = (id.to_string(), hash.to_string());
        self.run(move |c| async move {
            let n = c
                .execute(
                    "UPDATE fhir_edge_portal_accounts \
                     SET recovery_codes = array_remove(recovery_codes, $2) \
                     WHERE account_id = $1 AND $2 = ANY(recovery_codes)",
                    &[&id, &hash],
                )
                .await?;
            Ok(n == 1)
        })
        .await
    }

    pub(crate) async fn create_session(&self, s: SessionRow) -> Result<(), PortalError> {
        self.run(move |c| async move {
            c.execute(
                "INSERT INTO fhir_edge_portal_sessions (id_hash, account_id, csrf, created, last_seen) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[&s.id_hash, &s.account_id, &s.csrf, &int(s.created), &int(s.last_seen)],
            )
            .await?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn session(&self, id_hash: &str) -> Result<Option<SessionRow>, PortalError> {
        let id_hash = id_hash.to_string();
        self.run(move |c| async move {
            let Some(row) = c
                .query_opt(
                    "SELECT account_id, csrf, created, last_seen FROM fhir_edge_portal_sessions \
                     WHERE id_hash = $1",
                    &[&id_hash],
                )
                .await?
            else {
                return Ok(None);
            };
            let (created, last_seen): (i64, i64) = (row.try_get(2)?, row.try_get(3)?);
            Ok(Some(SessionRow {
                id_hash,
                account_id: row.try_get(0)?,
                csrf: row.try_get(1)?,
                created: u64::try_from(created).unwrap_or(0),
                last_seen: u64::try_from(last_seen).unwrap_or(0),
            }))
        })
        .await
    }

    pub(crate) async fn touch_session(&self, id_hash: &str, now: u64) -> Result<(), PortalError> {
        let id_hash = id_hash.to_string();
        self.run(move |c| async move {
            c.execute(
                "UPDATE fhir_edge_portal_sessions SET last_seen = greatest(last_seen, $2) \
                 WHERE id_hash = $1",
                &[&id_hash, &int(now)],
            )
            .await?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn end_session(&self, id_hash: &str) -> Result<(), PortalError> {
        let id_hash = id_hash.to_string();
        self.run(move |c| async move {
            c.execute(
                "DELETE FROM fhir_edge_portal_sessions WHERE id_hash = $1",
                &[&id_hash],
            )
            .await?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn purge(
        &self,
        now: u64,
        idle_before: u64,
        created_before: u64,
        failures_before: u64,
    ) -> Result<(), PortalError> {
        self.run(move |c| async move {
            c.execute(
                "DELETE FROM fhir_edge_portal_login_failures WHERE since < $1",
                &[&int(failures_before)],
            )
            .await?;
            c.execute(
                "DELETE FROM fhir_edge_portal_sessions WHERE last_seen < $1 OR created < $2",
                &[&int(idle_before), &int(created_before)],
            )
            .await?;
            c.execute(
                "DELETE FROM fhir_edge_portal_invites WHERE expires <= $1",
                &[&int(now)],
            )
            .await?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn login_failures(&self, key: &str) -> Result<(u32, u64), PortalError> {
        let key = key.to_string();
        self.run(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT failures, since FROM fhir_edge_portal_login_failures WHERE key_hash = $1",
                    &[&key],
                )
                .await?;
            Ok(match row {
                Some(r) => {
                    let (n, since): (i32, i64) = (r.try_get(0)?, r.try_get(1)?);
                    (
                        u32::try_from(n).unwrap_or(0),
                        u64::try_from(since).unwrap_or(0),
                    )
                }
                None => (0, 0),
            })
        })
        .await
    }

    pub(crate) async fn note_login_failure(
        &self,
        key: &str,
        now: u64,
        window: u64,
    ) -> Result<(), PortalError> {
        let key = key.to_string();
        self.run(move |c| async move {
            // One statement: concurrent failures on several replicas all count.
            c.execute(
                "INSERT INTO fhir_edge_portal_login_failures (key_hash, failures, since) \
                 VALUES ($1, 1, $2) ON CONFLICT (key_hash) DO UPDATE SET \
                 failures = CASE WHEN $2 >= fhir_edge_portal_login_failures.since + $3 THEN 1 \
                     ELSE fhir_edge_portal_login_failures.failures + 1 END, \
                 since = CASE WHEN $2 >= fhir_edge_portal_login_failures.since + $3 THEN $2 \
                     ELSE fhir_edge_portal_login_failures.since END",
                &[&key, &int(now), &int(window)],
            )
            .await?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn clear_login_failures(&self, key: &str) -> Result<(), PortalError> {
        let key = key.to_string();
        self.run(move |c| async move {
            c.execute(
                "DELETE FROM fhir_edge_portal_login_failures WHERE key_hash = $1",
                &[&key],
            )
            .await?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn record(&self, a: Activity) -> Result<(), PortalError> {
        self.run(move |c| async move {
            c.execute(
                "INSERT INTO fhir_edge_portal_activity \
                 (account_id, at, source, action, client_id, secret_id) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &a.account_id,
                    &int(a.at),
                    &a.source,
                    &a.action,
                    &a.client_id,
                    &a.secret_id,
                ],
            )
            .await?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn activity(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<Vec<Activity>, PortalError> {
        let id = id.to_string();
        let limit = i64::try_from(limit).unwrap_or(100);
        self.run(move |c| async move {
            let rows = c
                .query(
                    "SELECT at, source, action, client_id, secret_id FROM fhir_edge_portal_activity \
                     WHERE account_id = $1 ORDER BY id DESC LIMIT $2",
                    &[&id, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let at: i64 = r.try_get(0)?;
                    Ok(Activity {
                        at: u64::try_from(at).unwrap_or(0),
                        account_id: id.clone(),
                        source: r.try_get(1)?,
                        action: r.try_get(2)?,
                        client_id: r.try_get(3)?,
                        secret_id: r.try_get(4)?,
                    })
                })
                .collect()
        })
        .await
    }

    pub(crate) async fn last_used(
        &self,
        client_id: &str,
    ) -> Result<BTreeMap<String, u64>, PortalError> {
        let client_id = client_id.to_string();
        self.run(move |c| async move {
            let rows = c
                .query(
                    "SELECT secret_id, last_used FROM fhir_edge_secret_usage WHERE client_id = $1",
                    &[&client_id],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let at: i64 = r.try_get(1)?;
                    Ok((r.try_get(0)?, u64::try_from(at).unwrap_or(0)))
                })
                .collect()
        })
        .await
    }

    pub(crate) async fn mark_used(
        &self,
        uses: Vec<((String, String), u64)>,
    ) -> Result<(), PortalError> {
        self.run(move |c| async move {
            for ((client_id, secret_id), at) in uses {
                c.execute(
                    "INSERT INTO fhir_edge_secret_usage (client_id, secret_id, last_used) \
                     VALUES ($1, $2, $3) ON CONFLICT (client_id, secret_id) \
                     DO UPDATE SET last_used = greatest(fhir_edge_secret_usage.last_used, $3)",
                    &[&client_id, &secret_id, &int(at)],
                )
                .await?;
            }
            Ok(())
        })
        .await
    }
}
