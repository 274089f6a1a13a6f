//! The portal's background service: runs the database store's queries on its own connection pool,
//! writes the secrets' last uses to the store every [`FLUSH_EVERY`], and drops expired sessions and
//! invites.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::pg::PgStore;
use super::store::PortalStore;
use super::Portal;
use crate::time::now_unix;

/// How often the secrets' last uses are written (the portal shows a use within this long on other
/// replicas; on this one at once).
const FLUSH_EVERY: Duration = Duration::from_secs(30);

pub(crate) struct PortalService {
    pub portal: Arc<Portal>,
}

#[async_trait]
impl BackgroundService for PortalService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let runner = match &self.portal.store {
            PortalStore::Postgres(pg) => match spawn_jobs(pg) {
                Ok(r) => r,
                Err(e) => {
                    log::error!("portal: {e}; the portal cannot reach its store");
                    return;
                }
            },
            PortalStore::File(_) => None,
        };
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => self.housekeeping().await,
            }
        }
        self.flush().await;
        if let Some(r) = runner {
            r.abort();
        }
    }
}

/// Runs the database store's queries on a pool, on the current runtime (`None`: already running).
pub(crate) fn spawn_jobs(
    pg: &PgStore,
) -> Result<Option<tokio::task::JoinHandle<()>>, crate::db::DbError> {
    let Some(mut jobs) = pg.take_jobs() else {
        return Ok(None);
    };
    let pool = pg.db.pool()?;
    Ok(Some(tokio::spawn(async move {
        while let Some(job) = jobs.recv().await {
            tokio::spawn(job(pool.clone()));
        }
    })))
}

impl PortalService {
    async fn housekeeping(&self) {
        self.flush().await;
        let p = &self.portal;
        let now = now_unix();
        let idle_before = now.saturating_sub(p.cfg.idle_seconds);
        let created_before = now.saturating_sub(p.cfg.absolute_seconds);
        let failures_before = now.saturating_sub(p.cfg.throttle.window_seconds);
        if let Err(e) = p
            .store
            .purge(now, idle_before, created_before, failures_before)
            .await
        {
            log::warn!("portal: cannot drop expired sessions: {e}");
        }
    }

    async fn flush(&self) {
        let uses = self.portal.token.usage.take();
        if uses.is_empty() {
            return;
        }
        if let Err(e) = self.portal.store.mark_used(uses).await {
            log::warn!("portal: cannot record when secrets were last used: {e}");
        }
    }
}
