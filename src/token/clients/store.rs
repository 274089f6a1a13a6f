//! Where the client registry lives (`token_endpoint.clients.store`): `clients.yaml` (hot-reloaded, one
//! machine or GitOps) or PostgreSQL (a fleet). Either way the proxy reads an in-memory registry and
//! changes go through [`ClientStore::apply`], whole or not at all.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::Guard;

use super::change::{Change, StoreError};
use super::registry::ClientRegistry;
use super::sync::PgRegistry;
use super::write::apply_to_file;
use crate::db::DbConfig;
use crate::reload::Live;

/// The validated choice of store.
#[derive(Debug, Clone)]
pub(crate) enum StoreConfig {
    File(PathBuf),
    Postgres {
        db: Box<DbConfig>,
        resync_every: Duration,
    },
}

impl StoreConfig {
    pub(crate) fn describe(&self) -> String {
        match self {
            StoreConfig::File(p) => p.display().to_string(),
            StoreConfig::Postgres { db, .. } => db.describe(),
        }
    }
}

/// The running registry.
pub(crate) enum ClientStore {
    File(Arc<Live<ClientRegistry>>),
    Postgres(Arc<PgRegistry>),
}

impl ClientStore {
    /// The registry as it is now: a snapshot, never a database round trip.
    pub(crate) fn load(&self) -> Guard<Arc<ClientRegistry>> {
        match self {
            ClientStore::File(live) => live.load(),
            ClientStore::Postgres(pg) => pg.load(),
        }
    }

    /// Why the registry cannot answer yet (a database replica before its first read).
    pub(crate) fn not_ready(&self) -> Option<String> {
        match self {
            ClientStore::File(_) => None,
            ClientStore::Postgres(pg) => (!pg.is_loaded())
                .then(|| "the client registry has not been read from the database yet".into()),
        }
    }

    /// Makes one change; once this returns `Ok`, this replica's registry shows it.
    pub(crate) async fn apply(&self, change: Change) -> Result<(), StoreError> {
        match self {
            ClientStore::File(live) => {
                let (live, path) = (live.clone(), live.path().to_path_buf());
                tokio::task::spawn_blocking(move || {
                    apply_to_file(&path, change)?;
                    // Written whole and renamed into place under the lock: no settle check needed.
                    live.reload(false, false);
                    Ok(())
                })
                .await
                .map_err(|e| StoreError::File(format!("the registry writer failed: {e}")))?
            }
            ClientStore::Postgres(pg) => pg.write(change).await,
        }
    }
}
