//! Hot-reloaded files (the routing table and the client registry): watch → read → parse → validate →
//! one swap.
//!
//! A [`Live<T>`] holds the current value of one file behind an `ArcSwap`; readers take a snapshot with
//! [`Live::load`] and keep it for as long as they need a consistent view. A reload
//! ([`Live::reload`]) first fingerprints the file as it streams by ([`read`]): most checks find it
//! unchanged, and then nothing else happens. Changed text is read whole (bounded:
//! [`read::MAX_FILE_BYTES`]), parsed in its syntax ([`parse`]), built and validated as a whole by
//! the file's [`Loadable`], and published with one `ArcSwap::store`. A file that is missing,
//! unreadable, too large, empty or invalid leaves the last good value in place and is logged (the
//! loaders' messages never quote secret values). What starts reloads (file events, an event
//! overflow, `SIGHUP`, a slow poll) is the [`watch::Reloader`]'s business.
//!
//! After a large file (a 100,000-tenant table) the memory it was built into is handed back to the
//! OS: at once at start, and once reloads have been quiet for [`watch::RELEASE_AFTER`]
//! ([`crate::memory`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, Guard};

use crate::config::problems::{whole_file, Problems};

pub(crate) mod parse;
pub(crate) mod read;
pub(crate) mod watch;

pub(crate) use watch::{Reload, Reloader};

/// A value built from one file's text.
pub trait Loadable: Send + Sync + Sized + 'static {
    /// What the loader needs beyond the text (defaults from the static config, say).
    type Context: Send + Sync + 'static;
    /// For log lines: "routing table", "client registry".
    const WHAT: &'static str;
    /// Parses, validates and builds; every problem is reported, with file, line and key path.
    fn from_text(path: &Path, text: &str, ctx: &Self::Context) -> Result<Self, Problems>;
    /// For log lines: "3 tenants".
    fn summary(&self) -> String;
    /// Whether this value should be rebuilt at the next poll even from unchanged text (a routing
    /// table whose hosts did not all resolve).
    fn retry(&self) -> bool {
        false
    }
}

/// The current value of a hot-reloaded file, plus reload bookkeeping.
pub struct Live<T: Loadable> {
    current: ArcSwap<T>,
    path: PathBuf,
    ctx: T::Context,
    /// The fingerprint of the text last read, whether it was accepted or rejected (unchanged text is
    /// neither rebuilt nor reported again), behind the lock that makes reloads one at a time. The
    /// fingerprint is recorded before the text is built, so without the lock a second reload (the
    /// self-service endpoint's own, racing the watcher's) could find the text "unchanged" and
    /// return while the first is still building it: its caller would then answer before the change
    /// serves (a new secret refused, a deleted one still accepted).
    seen: Mutex<read::Fingerprint>,
    /// Successful loads, starting at 1 for the load at start-up.
    pub generation: AtomicU64,
    pub failures: AtomicU64,
    /// Unix time of the last successful load.
    pub last_success: AtomicU64,
    /// Unix time the file was last read and judged (unchanged, applied or rejected): a reloader
    /// whose watcher and poll have stopped shows here as a growing age.
    pub last_check: AtomicU64,
}

/// What one reload attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Unchanged,
    Applied,
    Rejected,
    /// The file changed while it was being read (a write in progress): try again shortly.
    Unsettled,
}

/// How long a changed file must stay unchanged before it is used.
const SETTLE: Duration = Duration::from_millis(25);

impl<T: Loadable> Live<T> {
    /// Loads the file for the first time; failure means the proxy must not start.
    pub fn load_file(path: PathBuf, ctx: impl Into<T::Context>) -> Result<Live<T>, Problems> {
        let ctx = ctx.into();
        let (text, print) =
            read::read_file(&path).map_err(|e| whole_file(&path, format!("cannot read: {e}")))?;
        let value = T::from_text(&path, &text, &ctx)?;
        if text.len() >= crate::memory::LARGE_TEXT {
            drop(text);
            crate::memory::release_freed();
        }
        let now = unix_now();
        Ok(Live {
            current: ArcSwap::from_pointee(value),
            path,
            ctx,
            seen: Mutex::new(print),
            generation: AtomicU64::new(1),
            failures: AtomicU64::new(0),
            last_success: AtomicU64::new(now),
            last_check: AtomicU64::new(now),
        })
    }

    /// A snapshot of the current value.
    pub fn load(&self) -> Guard<Arc<T>> {
        self.current.load()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One reload attempt (blocking: file I/O, and DNS for the routing table). With `force`, unchanged
    /// text is rebuilt too (re-resolving upstream host names). With `settle`, changed text is used only
    /// if it reads the same again [`SETTLE`] later; only a reload caused by nothing but renames skips
    /// that. Returns only once what it read is the value being served (or was rejected), also when
    /// another reload of the same file was in progress.
    pub fn reload(&self, force: bool, settle: bool) -> ReloadOutcome {
        // A panic in a loader cannot leave a fingerprint inconsistent: at worst the text is read again.
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let started = std::time::Instant::now();
        let first = match read::fingerprint_file(&self.path) {
            Ok(print) => print,
            Err(e) => return self.unreadable(&e),
        };
        if *seen == first && !force {
            self.last_check.store(unix_now(), Ordering::Relaxed);
            log::debug!("{} {} unchanged", T::WHAT, self.path.display());
            return ReloadOutcome::Unchanged;
        }
        // A file rewritten in place can be caught half-written, and a prefix of a routing table can be
        // valid YAML naming fewer tenants or a truncated port. Use it only if it reads the same
        // twice. (A file renamed into place cannot be caught half-written: rename(2) is atomic.)
        if settle {
            std::thread::sleep(SETTLE);
        }
        let (text, print) = match read::read_file(&self.path) {
            Ok(read) => read,
            Err(e) => return self.unreadable(&e),
        };
        if settle && print != first {
            log::debug!("{} {} is still changing", T::WHAT, self.path.display());
            return ReloadOutcome::Unsettled;
        }
        // Recorded whether the text is accepted or rejected: a rejected file is not reported again
        // until it changes.
        *seen = print;
        self.last_check.store(unix_now(), Ordering::Relaxed);
        let outcome = self.apply(T::from_text(&self.path, &text, &self.ctx), started);
        // What a large file was built into (accepted or not) is garbage now; the reloader hands it
        // back to the OS once reloads have gone quiet.
        if text.len() >= crate::memory::LARGE_TEXT {
            crate::memory::mark_garbage();
        }
        outcome
    }

    /// Publishes a built value with one swap, or reports why there is none.
    fn apply(&self, built: Result<T, Problems>, started: std::time::Instant) -> ReloadOutcome {
        match built {
            Ok(value) => {
                let summary = value.summary();
                // One swap: every reader sees either the old value or the new one, whole.
                let old = self.current.swap(Arc::new(value));
                let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                self.last_success.store(unix_now(), Ordering::Relaxed);
                log::info!(
                    "{} reloaded: {summary} (generation {generation}, {} ms)",
                    T::WHAT,
                    started.elapsed().as_millis()
                );
                // Freeing a large old table takes a while; the new one is already serving.
                drop(old);
                ReloadOutcome::Applied
            }
            Err(problems) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "{} rejected, keeping the last good one:\n{problems}",
                    T::WHAT
                );
                ReloadOutcome::Rejected
            }
        }
    }

    fn unreadable(&self, e: &io::Error) -> ReloadOutcome {
        self.failures.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "{} {} unreadable ({e}); keeping the last good one",
            T::WHAT,
            self.path.display()
        );
        ReloadOutcome::Rejected
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
