//! Hot reload of the routing table: file events (and `SIGHUP`) → debounce → load → validate → one swap.
//!
//! The watcher watches the file's **directory**, not the file: editors save by writing a new file and
//! renaming it over the old one (a new inode), and Kubernetes ConfigMap volumes swap a `..data`
//! symlink, so a watch on the file itself goes deaf after the first edit. Any event in the directory
//! starts a short, fixed debounce window (a stream of writes cannot postpone the reload forever);
//! then the file is read, and if its text changed it is loaded and validated as a whole and published
//! with one `ArcSwap::store`. A file that is missing, unreadable, empty or invalid leaves the last good
//! table serving and is logged (never with header values). A slow poll catches events the kernel
//! dropped. The watcher is created inside the background service, after Pingora may have forked.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::RoutingTable;
use crate::config::RouteDefaults;

/// The live routing table plus reload bookkeeping, shared by the proxy and the reloader.
pub struct LiveRoutes {
    pub table: ArcSwap<RoutingTable>,
    pub path: PathBuf,
    pub defaults: RouteDefaults,
    /// Successful loads, starting at 1 for the table loaded at start-up.
    pub generation: AtomicU64,
    pub failures: AtomicU64,
    /// Unix time of the last successful load.
    pub last_success: AtomicU64,
}

/// What one reload attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Unchanged,
    Applied { tenants: usize },
    Rejected,
}

impl LiveRoutes {
    /// Loads the table for the first time; failure means the proxy must not start.
    pub fn load(
        path: PathBuf,
        defaults: RouteDefaults,
    ) -> Result<LiveRoutes, crate::problems::Problems> {
        let table = RoutingTable::load(&path, &defaults)?;
        Ok(LiveRoutes {
            table: ArcSwap::from_pointee(table),
            path,
            defaults,
            generation: AtomicU64::new(1),
            failures: AtomicU64::new(0),
            last_success: AtomicU64::new(unix_now()),
        })
    }

    /// One reload attempt (blocking: file I/O and DNS). With `force`, an unchanged file is reloaded
    /// too, which re-resolves upstream host names.
    pub fn reload(&self, force: bool) -> ReloadOutcome {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "routing table {} unreadable ({e}); keeping the last good table",
                    self.path.display()
                );
                return ReloadOutcome::Rejected;
            }
        };
        if !force && super::hash_text(&text) == self.table.load().source_hash {
            return ReloadOutcome::Unchanged;
        }
        match RoutingTable::from_text(&self.path, &text, &self.defaults) {
            Ok(table) => {
                let tenants = table.len();
                // One store: every request sees either the old table or the new one, whole.
                self.table.store(Arc::new(table));
                let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                self.last_success.store(unix_now(), Ordering::Relaxed);
                log::info!("routing table reloaded: {tenants} tenants (generation {generation})");
                ReloadOutcome::Applied { tenants }
            }
            Err(problems) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                log::warn!("routing table rejected, keeping the last good table:\n{problems}");
                ReloadOutcome::Rejected
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The background service that keeps [`LiveRoutes`] current.
pub struct Reloader {
    pub routes: Arc<LiveRoutes>,
    pub debounce: Duration,
    /// Zero disables the poll.
    pub poll: Duration,
}

impl Reloader {
    async fn reload(&self, force: bool) {
        let routes = self.routes.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || routes.reload(force)).await {
            log::error!("routing reload task failed: {e}");
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut events) = mpsc::channel::<()>(1);
        let dir = match self.routes.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // A full channel already holds a pending reload, so a failed try_send loses nothing.
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                log::error!(
                    "cannot watch {} ({e}); routing reloads only on SIGHUP and every poll",
                    dir.display()
                );
                None
            }
        };
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                log::error!("cannot install the SIGHUP handler: {e}");
                None
            }
        };
        // Far enough away to mean "never" when polling is off.
        let poll = if self.poll.is_zero() {
            Duration::from_secs(86_400 * 365)
        } else {
            self.poll
        };
        let mut next_poll = Instant::now() + poll;
        let mut pending: Option<Instant> = None;
        loop {
            let wake = pending.unwrap_or(next_poll);
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = events.recv() => {
                    // Fixed window from the first event: a stream of writes cannot starve the reload.
                    pending.get_or_insert(Instant::now() + self.debounce);
                }
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    log::info!("SIGHUP: reloading the routing table");
                    self.reload(true).await;
                }
                _ = tokio::time::sleep_until(wake) => {
                    if pending.take().is_none() {
                        next_poll = Instant::now() + poll;
                    }
                    self.reload(false).await;
                }
            }
        }
    }
}
