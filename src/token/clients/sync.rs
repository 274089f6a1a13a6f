//! A replica's in-memory snapshot of the PostgreSQL client registry, and the background service that
//! keeps it current and makes this replica's changes.
//!
//! Token issuance and token verification read only the snapshot: no request waits on the database.
//! One task owns the snapshot and changes it one step at a time:
//!
//! 1. connect, `LISTEN fhir_edge_clients`, check the schema version, read the whole registry (a
//!    *resync*), publish it;
//! 2. on each notification (every change to a client or its secrets, from any replica, the CLI or
//!    a hand-written SQL statement, names the client), read that client again and publish a
//!    registry with it replaced or removed;
//! 3. every few seconds a trivial query proves the connection alive (a half-open TCP connection
//!    would otherwise go unnoticed while no notification comes); a failure, or the connection ending,
//!    goes back to 1 after a short back-off. Because `LISTEN` comes before the read in 1, no change
//!    falls between the two; every reconnect resyncs, and so does a timer, as a safety net.
//!
//! Because one task applies every read in order, a later read never loses to an earlier one.
//!
//! Writes (the self-service endpoint) run on a small pool in the same service; once committed, the
//! writer asks the task to read the clients it changed and waits (briefly) until this replica's
//! snapshot shows the change, so the answer to a rotation is usable at once on this replica. While the
//! database is out of reach the snapshot stays as it was last seen and writes fail with
//! [`DbError::Unavailable`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{mpsc, oneshot};

use super::change::{Change, StoreError};
use super::file::registry_from_entries;
use super::pg;
use super::registry::ClientRegistry;
use crate::db::{DbConfig, DbError};
use crate::time::now_unix;

/// How often a connected replica proves its connection alive.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Back-off between connection attempts: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));
/// How long a writer waits for its change to show in this replica's snapshot.
const SHOW_WAIT: Duration = Duration::from_secs(2);
/// More clients than this changed at once (an import): one whole read instead of one read each.
const RESYNC_OVER: usize = 64;

/// What the admin listener reports about the snapshot.
#[derive(Debug, Default)]
pub(crate) struct SyncStatus {
    pub connected: AtomicBool,
    /// A registry has been read from the database since start.
    pub loaded: AtomicBool,
    /// When the snapshot was last known to be current (unix seconds).
    pub confirmed_at: AtomicU64,
    pub changes_applied: AtomicU64,
    pub resyncs: AtomicU64,
    pub write_failures: AtomicU64,
    /// Rows the registry's rules refused at the last read (left out of the snapshot).
    pub rejected_rows: AtomicU64,
}

enum Request {
    Write(Change, oneshot::Sender<Result<(), StoreError>>),
}

/// What the sync task is asked to read again.
enum Refresh {
    Client(String, oneshot::Sender<()>),
    All(oneshot::Sender<()>),
}

/// The snapshot of a PostgreSQL registry, shared by the proxy and the service that keeps it.
pub(crate) struct PgRegistry {
    pub db: DbConfig,
    pub resync_every: Duration,
    snapshot: ArcSwap<ClientRegistry>,
    pub status: SyncStatus,
    requests: mpsc::UnboundedSender<Request>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Request>>>,
}

impl PgRegistry {
    pub(crate) fn new(db: DbConfig, resync_every: Duration) -> PgRegistry {
        let (requests, receiver) = mpsc::unbounded_channel();
        PgRegistry {
            db,
            resync_every,
            snapshot: ArcSwap::from_pointee(ClientRegistry::default()),
            status: SyncStatus::default(),
            requests,
            receiver: Mutex::new(Some(receiver)),
        }
    }

    pub(crate) fn load(&self) -> Guard<Arc<ClientRegistry>> {
        self.snapshot.load()
    }

    /// Whether a registry has been read from the database since start.
    pub(crate) fn is_loaded(&self) -> bool {
        self.status.loaded.load(Ordering::Relaxed)
    }

    /// Seconds since the snapshot was last known to be current (`None`: never loaded).
    pub(crate) fn age(&self) -> Option<u64> {
        if !self.is_loaded() {
            return None;
        }
        Some(now_unix().saturating_sub(self.status.confirmed_at.load(Ordering::Relaxed)))
    }

    /// The first read, before the proxy serves (`fhir-edge run` waits for it): a schema this build
    /// cannot use is an error; an unreachable database is not (the service keeps trying and
    /// `/readyz` says why the replica is not ready).
    pub(crate) async fn initial_load(&self) -> Result<(), DbError> {
        let client = self.db.connect_checked(None).await?;
        self.resync(&client).await
    }

    /// Makes one change in the database and waits until this replica's snapshot shows it.
    pub(crate) async fn write(&self, change: Change) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        let unavailable = || {
            StoreError::Db(DbError::Unavailable(
                "the registry service is not running".into(),
            ))
        };
        self.requests
            .send(Request::Write(change, tx))
            .map_err(|_| unavailable())?;
        rx.await.unwrap_or_else(|_| Err(unavailable()))
    }

    fn publish(&self, registry: ClientRegistry) {
        self.snapshot.store(Arc::new(registry));
        self.status
            .confirmed_at
            .store(now_unix(), Ordering::Relaxed);
    }

    async fn resync(&self, client: &tokio_postgres::Client) -> Result<(), DbError> {
        let file = pg::read_all(client).await?;
        let (registry, problems) = registry_from_entries(&file);
        problems.iter().for_each(|p| log_rejected(p));
        self.status
            .rejected_rows
            .store(problems.len() as u64, Ordering::Relaxed);
        self.publish(registry);
        self.status.loaded.store(true, Ordering::Relaxed);
        self.status.resyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn refresh(
        &self,
        client: &tokio_postgres::Client,
        ids: &HashSet<String>,
    ) -> Result<(), DbError> {
        for id in ids {
            let entry = pg::read_one(client, id).await?;
            let current = self.snapshot.load();
            let checked = entry.and_then(|e| {
                super::file::client_from_entry(id, &e)
                    .inspect_err(|p| log_rejected(p))
                    .ok()
            });
            self.publish(current.with_client(id, checked));
            self.status.changes_applied.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Re-reads the clients `ids` names, or the whole registry when they are many.
    async fn apply_notices(
        &self,
        client: &tokio_postgres::Client,
        ids: &HashSet<String>,
    ) -> Result<(), DbError> {
        if ids.len() > RESYNC_OVER {
            self.resync(client).await
        } else {
            self.refresh(client, ids).await
        }
    }

    /// One connection's life: listen, resync, then apply notifications and refresh requests until
    /// the connection fails (`Err`) or the process stops (`Ok`).
    async fn follow(
        &self,
        refreshes: &mut mpsc::UnboundedReceiver<Refresh>,
        shutdown: &mut ShutdownWatch,
    ) -> Result<(), DbError> {
        let (ntx, mut notices) = mpsc::unbounded_channel();
        let client = self.db.connect_checked(Some(ntx)).await?;
        // Before the whole read, so that no change falls between the two.
        client.batch_execute("LISTEN fhir_edge_clients").await?;
        self.resync(&client).await?;
        self.status.connected.store(true, Ordering::Relaxed);
        log::info!(
            "client registry: following {} ({} clients)",
            self.db.describe(),
            self.snapshot.load().len()
        );
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut resync = tokio::time::interval(self.resync_every);
        resync.reset();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                notice = notices.recv() => {
                    let Some(id) = notice else {
                        return Err(DbError::Unavailable("the connection ended".into()));
                    };
                    let mut ids = HashSet::from([id]);
                    while let Ok(more) = notices.try_recv() {
                        ids.insert(more);
                    }
                    self.apply_notices(&client, &ids).await?;
                }
                Some(r) = refreshes.recv() => match r {
                    Refresh::Client(id, done) => {
                        self.refresh(&client, &HashSet::from([id])).await?;
                        let _ = done.send(());
                    }
                    Refresh::All(done) => {
                        self.resync(&client).await?;
                        let _ = done.send(());
                    }
                },
                _ = heartbeat.tick() => {
                    tokio::time::timeout(self.db.query_timeout, client.simple_query("SELECT 1"))
                        .await
                        .map_err(|_| DbError::Unavailable("the database did not answer in time".into()))??;
                    self.status.confirmed_at.store(now_unix(), Ordering::Relaxed);
                }
                _ = resync.tick() => self.resync(&client).await?,
            }
        }
    }
}

/// A client the database holds but the registry's rules refuse: left out of the snapshot, said loudly.
fn log_rejected(problem: &str) {
    log::error!(
        "client registry: a database row breaks the registry's rules and is ignored: {problem}"
    );
}

/// The background service of a PostgreSQL registry: follows the database and makes this replica's
/// writes.
pub(crate) struct RegistrySync {
    pub registry: Arc<PgRegistry>,
}

#[async_trait]
impl BackgroundService for RegistrySync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let reg = self.registry.clone();
        let Some(mut requests) = reg.receiver.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let (refresh_tx, mut refreshes) = mpsc::unbounded_channel();
        let pool = match reg.db.pool() {
            Ok(p) => Some(p),
            Err(e) => {
                log::error!("client registry: {e}; writes will fail");
                None
            }
        };
        let writer_reg = reg.clone();
        let writer = tokio::spawn(async move {
            while let Some(Request::Write(change, reply)) = requests.recv().await {
                let (reg, pool, refresh_tx) =
                    (writer_reg.clone(), pool.clone(), refresh_tx.clone());
                tokio::spawn(async move {
                    let result = write(&reg, pool.as_ref(), &refresh_tx, change).await;
                    if let Err(e) = &result {
                        if e.is_unavailable() {
                            reg.status.write_failures.fetch_add(1, Ordering::Relaxed);
                            log::warn!("client registry: a change was not made: {e}");
                        }
                    }
                    let _ = reply.send(result);
                });
            }
        });
        let mut backoff = BACKOFF.0;
        loop {
            match reg.follow(&mut refreshes, &mut shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    if reg.status.connected.swap(false, Ordering::Relaxed) {
                        log::error!(
                            "client registry: lost the database ({e}); serving the last snapshot"
                        );
                        backoff = BACKOFF.0;
                    } else {
                        log::warn!("client registry: {e}; retrying in {backoff:?}");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF.1);
        }
        reg.status.connected.store(false, Ordering::Relaxed);
        writer.abort();
    }
}

async fn write(
    reg: &PgRegistry,
    pool: Option<&deadpool_postgres::Pool>,
    refreshes: &mpsc::UnboundedSender<Refresh>,
    change: Change,
) -> Result<(), StoreError> {
    let pool =
        pool.ok_or_else(|| StoreError::Db(DbError::Unavailable("no connection pool".into())))?;
    let mut conn = pool.get().await.map_err(DbError::from)?;
    let result = tokio::time::timeout(reg.db.query_timeout * 2, pg::apply(&mut conn, &change))
        .await
        .map_err(|_| {
            StoreError::Db(DbError::Unavailable(
                "the database did not answer in time".into(),
            ))
        })?;
    result?;
    let (done, shown) = oneshot::channel();
    let ask = match change.client_id() {
        Some(id) => Refresh::Client(id.to_string(), done),
        None => Refresh::All(done),
    };
    if refreshes.send(ask).is_ok() && tokio::time::timeout(SHOW_WAIT, shown).await.is_err() {
        log::warn!(
            "client registry: a change was committed but is not in this replica's snapshot yet"
        );
    }
    Ok(())
}
