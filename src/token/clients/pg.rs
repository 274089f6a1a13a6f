//! The client registry in PostgreSQL (`src/db/migrations/0001_clients.sql`): reading it, whole or one
//! client, into the file's shape, and applying a [`Change`] in one transaction.
//!
//! Every value is a bound parameter. A change to one client first locks that client's row
//! (`SELECT … FOR UPDATE`), so two replicas rotating or revoking the same client at once are
//! serialised: the second sees the first's result (a secret revoked by one is never put back by the
//! other, and "never the last secret" holds across both). After the change the client is read back
//! and held to the same rules as `clients.yaml` ([`super::file`]); a result they reject is rolled
//! back.

use std::collections::HashSet;

use tokio_postgres::{Client, GenericClient, Row};

use super::change::{Change, StoreError};
use super::file::{client_from_entry, ClientEntry, ClientsFile, SecretEntry};
use crate::db::DbError;
use crate::time::{format_rfc3339, parse_rfc3339};

const SELECT: &str =
    "SELECT c.client_id, c.name, c.allowed_tenants, c.disabled, s.secret_id, s.hash, \
     extract(epoch FROM s.created_at)::bigint, extract(epoch FROM s.expires_at)::bigint, s.description \
     FROM fhir_edge_clients c LEFT JOIN fhir_edge_client_secrets s ON s.client_id = c.client_id";

/// Rows of [`SELECT`], ordered by client, into the file's entries.
fn entries(rows: &[Row]) -> Result<ClientsFile, DbError> {
    let mut file = ClientsFile::default();
    for row in rows {
        let id: String = row.try_get(0)?;
        if file.clients.0.last().is_none_or(|(last, _)| *last != id) {
            file.clients.0.push((
                id.clone(),
                ClientEntry {
                    name: row.try_get(1)?,
                    allowed_tenants: row.try_get(2)?,
                    disabled: row.try_get(3)?,
                    secrets: Vec::new(),
                },
            ));
        }
        let secret_id: Option<String> = row.try_get(4)?;
        if let (Some(secret_id), Some((_, entry))) = (secret_id, file.clients.0.last_mut()) {
            let created: Option<i64> = row.try_get(6)?;
            let expires: Option<i64> = row.try_get(7)?;
            let time = |t: i64| format_rfc3339(u64::try_from(t).unwrap_or(0));
            entry.secrets.push(SecretEntry {
                id: secret_id,
                hash: row.try_get(5)?,
                created: created.map(time).unwrap_or_default(),
                expires: expires.map(time),
                description: row.try_get(8)?,
            });
        }
    }
    Ok(file)
}

/// The whole registry, in client id order.
pub(crate) async fn read_all(client: &impl GenericClient) -> Result<ClientsFile, DbError> {
    let rows = client
        .query(
            &format!("{SELECT} ORDER BY c.client_id, s.created_at, s.secret_id"),
            &[],
        )
        .await?;
    entries(&rows)
}

/// One client, or `None` if there is no such client.
pub(crate) async fn read_one(
    client: &impl GenericClient,
    client_id: &str,
) -> Result<Option<ClientEntry>, DbError> {
    let rows = client
        .query(
            &format!("{SELECT} WHERE c.client_id = $1 ORDER BY s.created_at, s.secret_id"),
            &[&client_id],
        )
        .await?;
    Ok(entries(&rows)?.clients.0.pop().map(|(_, e)| e))
}

fn unix(text: &str) -> Result<i64, StoreError> {
    parse_rfc3339(text)
        .and_then(|t| i64::try_from(t).ok())
        .ok_or_else(|| StoreError::Invalid(format!("`{text}` is not an RFC 3339 time")))
}

async fn insert_client(
    tx: &impl GenericClient,
    client_id: &str,
    entry: &ClientEntry,
) -> Result<(), StoreError> {
    client_from_entry(client_id, entry).map_err(StoreError::Invalid)?;
    let inserted = tx
        .execute(
            "INSERT INTO fhir_edge_clients (client_id, name, allowed_tenants, disabled) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[
                &client_id,
                &entry.name,
                &entry.allowed_tenants,
                &entry.disabled,
            ],
        )
        .await?;
    if inserted == 0 {
        return Err(StoreError::Exists(client_id.to_string()));
    }
    for s in &entry.secrets {
        insert_secret(tx, client_id, s).await?;
    }
    Ok(())
}

async fn insert_secret(
    tx: &impl GenericClient,
    client_id: &str,
    s: &SecretEntry,
) -> Result<(), StoreError> {
    let expires = s.expires.as_deref().map(unix).transpose()?;
    tx.execute(
        "INSERT INTO fhir_edge_client_secrets \
         (client_id, secret_id, hash, created_at, expires_at, description) \
         VALUES ($1, $2, $3, to_timestamp($4::bigint), to_timestamp($5::bigint), $6)",
        &[
            &client_id,
            &s.id,
            &s.hash,
            &unix(&s.created)?,
            &expires,
            &s.description,
        ],
    )
    .await?;
    Ok(())
}

/// Locks client `client_id`'s row for the rest of the transaction.
async fn lock(tx: &impl GenericClient, client_id: &str) -> Result<(), StoreError> {
    let found = tx
        .query_opt(
            "SELECT 1 FROM fhir_edge_clients WHERE client_id = $1 FOR UPDATE",
            &[&client_id],
        )
        .await?;
    match found {
        Some(_) => Ok(()),
        None => Err(StoreError::NoClient(client_id.to_string())),
    }
}

/// Applies `change` in one transaction, holding the result to the registry's rules.
pub(crate) async fn apply(client: &mut Client, change: &Change) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    let mut touched: Vec<&str> = Vec::new();
    match change {
        Change::AddClient { client_id, entry } => {
            insert_client(&tx, client_id, entry).await?;
        }
        Change::AddSecret {
            client_id,
            secret,
            expire_others_at,
        } => {
            lock(&tx, client_id).await?;
            insert_secret(&tx, client_id, secret).await?;
            if let Some(at) = expire_others_at {
                let at = i64::try_from(*at).unwrap_or(i64::MAX);
                tx.execute(
                    "UPDATE fhir_edge_client_secrets SET expires_at = to_timestamp($3::bigint) \
                     WHERE client_id = $1 AND secret_id <> $2 \
                     AND (expires_at IS NULL OR expires_at > to_timestamp($3::bigint))",
                    &[client_id, &secret.id, &at],
                )
                .await?;
            }
            touched.push(client_id);
        }
        Change::RevokeSecret {
            client_id,
            secret_id,
            keep_one,
        } => {
            lock(&tx, client_id).await?;
            let row = tx
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE secret_id = $2) \
                     FROM fhir_edge_client_secrets WHERE client_id = $1",
                    &[client_id, secret_id],
                )
                .await?;
            let (all, this): (i64, i64) = (row.get(0), row.get(1));
            if this == 0 {
                return Err(StoreError::NoSecret(secret_id.clone()));
            }
            if *keep_one && all == 1 {
                return Err(StoreError::LastSecret);
            }
            tx.execute(
                "DELETE FROM fhir_edge_client_secrets WHERE client_id = $1 AND secret_id = $2",
                &[client_id, secret_id],
            )
            .await?;
            touched.push(client_id);
        }
        Change::SetDisabled {
            client_id,
            disabled,
        } => {
            lock(&tx, client_id).await?;
            tx.execute(
                "UPDATE fhir_edge_clients SET disabled = $2 WHERE client_id = $1",
                &[client_id, disabled],
            )
            .await?;
            touched.push(client_id);
        }
        Change::Remove { client_id } => {
            let n = tx
                .execute(
                    "DELETE FROM fhir_edge_clients WHERE client_id = $1",
                    &[client_id],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::NoClient(client_id.clone()));
            }
        }
        Change::Import { file, replace } => {
            let mut seen = HashSet::new();
            for (id, _) in &file.clients.0 {
                if !seen.insert(id.to_ascii_lowercase()) {
                    return Err(StoreError::Invalid(format!("client `{id}` appears twice")));
                }
            }
            if *replace {
                tx.execute("DELETE FROM fhir_edge_clients", &[]).await?;
            }
            for (id, entry) in &file.clients.0 {
                insert_client(&tx, id, entry).await?;
            }
        }
    }
    for id in touched {
        tx.execute(
            "UPDATE fhir_edge_clients SET version = version + 1, updated_at = now() WHERE client_id = $1",
            &[&id],
        )
        .await?;
        let Some(entry) = read_one(&tx, id).await? else {
            return Err(StoreError::NoClient(id.to_string()));
        };
        client_from_entry(id, &entry).map_err(StoreError::Invalid)?;
    }
    tx.commit().await?;
    Ok(())
}
