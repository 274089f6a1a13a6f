//! The schema's versioned migrations, embedded in the binary and applied by `fhir-edge db migrate`.
//!
//! `fhir_edge_schema` records each version applied. A replica checks at start that the database is at
//! exactly [`CURRENT`]: an older schema asks for `fhir-edge db migrate`, a newer one means this binary is
//! older than the fleet's database. Migrations run in one transaction under an advisory lock, so two
//! replicas (or two operators) migrating at once apply each step once.

use tokio_postgres::Client;

use super::DbError;

/// One migration: its version and its SQL (run in one transaction).
pub(crate) struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. Append only: a released migration never changes.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "client registry",
        sql: include_str!("migrations/0001_clients.sql"),
    },
    Migration {
        version: 2,
        name: "registration portal",
        sql: include_str!("migrations/0002_portal.sql"),
    },
];

/// The schema version this build reads and writes.
pub(crate) const CURRENT: i32 = 2;

/// A key for `pg_advisory_xact_lock` (`fhir-edg` in ASCII): serialises concurrent migrations.
const LOCK_KEY: i64 = 0x6668_6972_2d65_6467;

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS fhir_edge_schema (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// The schema version the database is at (0: no fhir-edge schema at all).
pub(crate) async fn version(client: &Client) -> Result<i32, DbError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('fhir_edge_schema') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM fhir_edge_schema", &[])
        .await?
        .get(0);
    Ok(v.unwrap_or(0))
}

/// Refuses a database whose schema this build cannot use.
pub(crate) async fn check(client: &Client) -> Result<(), DbError> {
    let v = version(client).await?;
    if v < CURRENT {
        return Err(DbError::Schema(format!(
            "the database schema is at version {v}, this build needs {CURRENT}: run `fhir-edge db migrate`"
        )));
    }
    if v > CURRENT {
        return Err(DbError::Schema(format!(
            "the database schema is at version {v}, newer than this build's {CURRENT}: run a fhir-edge as new as the database"
        )));
    }
    Ok(())
}

/// Applies every migration the database lacks; returns the versions applied (empty: up to date).
pub(crate) async fn migrate(client: &mut Client) -> Result<Vec<i32>, DbError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(VERSION_TABLE).await?;
    let at: Option<i32> = tx
        .query_one("SELECT max(version) FROM fhir_edge_schema", &[])
        .await?
        .get(0);
    let at = at.unwrap_or(0);
    if at > CURRENT {
        return Err(DbError::Schema(format!(
            "the database schema is at version {at}, newer than this build's {CURRENT}: nothing to do with this binary"
        )));
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > at) {
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO fhir_edge_schema (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        applied.push(m.version);
    }
    tx.commit().await?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_up_to_current() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i32::try_from(i).unwrap() + 1);
            assert!(!m.sql.trim().is_empty());
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(CURRENT));
    }
}
