//! What starts a reload: file events, an event overflow, `SIGHUP` and a slow poll.
//!
//! The [`Reloader`] background service watches the **directory** of every hot file, not the file:
//! editors save by writing a new file and renaming it over the old one (a new inode), and Kubernetes
//! ConfigMap volumes swap a `..data` symlink, so a watch on the file itself goes deaf after the first
//! edit. A file (or `..data` link) *renamed into place* arrived whole, so it is reloaded at once. Any
//! other change (an in-place write, a create, a delete; also the directory and temporary link a
//! ConfigMap update creates before its rename) opens a short, fixed debounce window (a stream of
//! writes cannot postpone the reload forever), and the text must then read the same twice (see
//! [`super::Live::reload`]). When the kernel's event queue overflows, the watcher says events were
//! lost ("rescan"): that, and any watcher error, counts as a change, so an edit made during an
//! overflow is not left waiting for the poll (or, with the poll off, forever). A slow poll catches
//! whatever is missed anyway; every check is recorded ([`super::Live::last_check`]) so a reloader
//! that stops checking can be alerted on. The watcher is created inside the background service,
//! after Pingora may have forked.
//!
//! Every reload, and the memory release after a large one, runs on one dedicated thread
//! ([`Worker`]): a reload's allocations and the garbage it leaves then sit in one allocator heap,
//! which the next reload reuses and the release hands back, where reloads on tokio's pool of
//! blocking threads would each fault in pages of another thread's heap (a burst of 100,000-tenant
//! reloads then peaked some 25 MiB higher).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::services::ServiceReadyNotifier;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Live, Loadable, ReloadOutcome};

/// How long after the last reload of a large file its garbage is handed back to the OS (a burst of
/// reloads reuses it meanwhile). The release runs on the reload thread, whose heap holds the freed
/// pages.
pub(crate) const RELEASE_AFTER: Duration = Duration::from_secs(3);

/// A job for the [`Worker`].
type Job = Box<dyn FnOnce() + Send>;

/// The reload thread: runs jobs one at a time, in order, until the [`Reloader`] that started it
/// stops (dropping the sender ends the thread).
struct Worker {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Worker {
    fn start() -> std::io::Result<Worker> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("fhir-edge-reload".into())
            .spawn(move || {
                for job in queue {
                    job();
                }
            })?;
        Ok(Worker { jobs })
    }

    /// Runs `f` on the reload thread and waits for its result without blocking the runtime. `None`
    /// when `f` panicked (the thread lives on: the panic is caught and logged).
    async fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job =
            Box::new(
                move || match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                    Ok(r) => {
                        let _ = done.send(r);
                    }
                    Err(_) => {
                        log::error!("a reload job panicked; the last good state stays in use")
                    }
                },
            );
        self.jobs.send(job).ok()?;
        result.await.ok()
    }
}

/// A file the [`Reloader`] keeps current (implemented by every [`Live<T>`]).
pub(crate) trait Reload: Send + Sync {
    fn path(&self) -> &Path;
    fn reload(&self, force: bool, settle: bool) -> ReloadOutcome;
}

impl<T: Loadable> Reload for Live<T> {
    fn path(&self) -> &Path {
        Live::path(self)
    }
    fn reload(&self, force: bool, settle: bool) -> ReloadOutcome {
        Live::reload(self, force || self.load().retry(), settle)
    }
}

/// What a file-system event means for the watched files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Nothing: another file, or a read (our own reads raise access events, and reacting to them
    /// would reload forever).
    None,
    /// A watched name (or a `..`-prefixed entry: the `..data` symlink of a Kubernetes ConfigMap
    /// volume) was renamed into place: the new file is complete the moment it appears.
    Whole,
    /// Any other change to a watched name or `..` entry: it may be a write still in progress.
    Partial,
}

fn watched(p: &Path, names: &BTreeSet<OsString>) -> bool {
    p.file_name()
        .is_some_and(|n| names.contains(n) || n.as_encoded_bytes().starts_with(b".."))
}

/// Classifies one event. Anything else in the directory, such as a log file, is ignored. A rename
/// *away* from a watched name (an editor moving the original to a backup before writing the new
/// file in place) is a partial change; the paired "both" event of a rename is judged by its target.
fn classify(e: &notify::Event, names: &BTreeSet<OsString>) -> Change {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
    // Events were dropped (inotify's queue overflowed): any file may have changed, and the rename
    // that would have said "whole" may be among the lost ones.
    if e.need_rescan() {
        return Change::Partial;
    }
    match e.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return Change::None,
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
            return match e.paths.first() {
                Some(to) if watched(to, names) => Change::Whole,
                _ => Change::None,
            };
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            return match (e.paths.first(), e.paths.get(1)) {
                (_, Some(to)) if watched(to, names) => Change::Whole,
                (Some(from), _) if watched(from, names) => Change::Partial,
                _ => Change::None,
            };
        }
        _ => {}
    }
    if e.paths.iter().any(|p| watched(p, names)) {
        Change::Partial
    } else {
        Change::None
    }
}

/// What happened since the last reload, set by the watcher's thread and read by the reload loop.
#[derive(Default)]
struct Seen {
    whole: AtomicBool,
    partial: AtomicBool,
}

impl Seen {
    fn note(&self, change: Change) {
        match change {
            Change::Whole => self.whole.store(true, Ordering::SeqCst),
            Change::Partial => self.partial.store(true, Ordering::SeqCst),
            Change::None => {}
        }
    }

    /// Only renames so far: the reload need not wait.
    fn only_renames(&self) -> bool {
        self.whole.load(Ordering::SeqCst) && !self.partial.load(Ordering::SeqCst)
    }

    /// Clears both flags for the reload about to run; true when that reload must check that the text
    /// has settled (any partial change, or none seen at all: a poll).
    fn take_needs_settle(&self) -> bool {
        let partial = self.partial.swap(false, Ordering::SeqCst);
        let whole = self.whole.swap(false, Ordering::SeqCst);
        partial || !whole
    }
}

/// The background service that keeps every [`Live`] file current.
pub(crate) struct Reloader {
    pub files: Vec<Arc<dyn Reload>>,
    pub debounce: Duration,
    /// Zero disables the poll.
    pub poll: Duration,
    /// Called on every `SIGHUP` as well (the audit log's reopen).
    pub on_hangup: Vec<Box<dyn Fn() + Send + Sync>>,
}

impl Reloader {
    /// Reloads every file; true when one of them was still being written.
    async fn reload_all(&self, worker: &Worker, force: bool, settle: bool) -> bool {
        let mut unsettled = false;
        for file in &self.files {
            let file = file.clone();
            if let Some(ReloadOutcome::Unsettled) =
                worker.run(move || file.reload(force, settle)).await
            {
                unsettled = true;
            }
        }
        unsettled
    }

    /// File names that matter in the watched directories.
    fn file_names(&self) -> BTreeSet<OsString> {
        self.files
            .iter()
            .filter_map(|f| f.path().file_name().map(ToOwned::to_owned))
            .collect()
    }

    fn directories(&self) -> BTreeSet<PathBuf> {
        self.files
            .iter()
            .map(|f| match f.path().parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect()
    }

    /// Watches the directory of every file: a relevant event is noted in `seen` and wakes the loop
    /// through `tx`. `None` when the watcher cannot start (then SIGHUP and the poll remain).
    fn start_watcher(
        &self,
        tx: mpsc::Sender<()>,
        seen: &Arc<Seen>,
    ) -> Option<notify::RecommendedWatcher> {
        let names = self.file_names();
        let noted = seen.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // A watcher error may mean lost events too: check rather than trust.
            let change = res.map_or(Change::Partial, |e| classify(&e, &names));
            if change != Change::None {
                noted.note(change);
                // A full channel already holds a pending reload, so a failed try_send loses nothing.
                let _ = tx.try_send(());
            }
        });
        match watcher {
            Ok(mut w) => {
                for dir in self.directories() {
                    if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
                        log::error!(
                            "cannot watch {} ({e}); its files reload only on SIGHUP and every poll",
                            dir.display()
                        );
                    }
                }
                Some(w)
            }
            Err(e) => {
                log::error!(
                    "cannot start the file watcher ({e}); reloads only on SIGHUP and every poll"
                );
                None
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    /// Ready once the watcher is installed: the proxy service depends on this one, so no request
    /// is served before an edit of a watched file would be noticed.
    async fn start_with_ready_notifier(
        &self,
        mut shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let worker = match Worker::start() {
            Ok(w) => w,
            Err(e) => {
                // Without a thread nothing can reload: serve the loaded files, and say so.
                log::error!("cannot start the reload thread ({e}); hot files will not reload");
                ready.notify_ready();
                let _ = shutdown.changed().await;
                return;
            }
        };
        let (tx, mut events) = mpsc::channel::<()>(1);
        let seen = Arc::new(Seen::default());
        // Held for as long as the loop runs: dropping the watcher ends the watch.
        let _watcher = self.start_watcher(tx, &seen);
        let mut hangup = hangup_signal();
        // Far enough away to mean "never" when polling is off.
        let poll = if self.poll.is_zero() {
            Duration::from_secs(86_400 * 365)
        } else {
            self.poll
        };
        let mut next_poll = Instant::now() + poll;
        let mut pending: Option<Instant> = None;
        // When to hand a large reload's garbage back to the OS (moved on by every reload).
        let mut release: Option<Instant> = None;
        ready.notify_ready();
        loop {
            let wake = pending.unwrap_or(next_poll);
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = events.recv() => {
                    if seen.only_renames() {
                        // A complete file is in place: no reason to wait.
                        pending = Some(Instant::now());
                    } else {
                        // Fixed window from the first event: a stream of writes cannot starve the
                        // reload.
                        pending.get_or_insert(Instant::now() + self.debounce);
                    }
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    log::info!("SIGHUP: reloading, reopening the audit log");
                    for hook in &self.on_hangup {
                        hook();
                    }
                    if self.reload_all(&worker, true, true).await {
                        pending = Some(Instant::now() + self.debounce);
                    }
                    release = release_time(release);
                }
                _ = async {
                    match release {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    release = None;
                    worker.run(crate::memory::release_marked).await;
                }
                _ = tokio::time::sleep_until(wake) => {
                    if pending.take().is_none() {
                        next_poll = Instant::now() + poll;
                    }
                    let settle = seen.take_needs_settle();
                    if self.reload_all(&worker, false, settle).await {
                        pending = Some(Instant::now() + self.debounce);
                    }
                    release = release_time(release);
                }
            }
        }
    }
}

/// The `SIGHUP` stream; `None` (reloads then come from file events and the poll) when the handler
/// cannot be installed.
fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            log::error!("cannot install the SIGHUP handler: {e}");
            None
        }
    }
}

/// After a reload: a release [`RELEASE_AFTER`] from now if a large file left garbage, else `current`.
fn release_time(current: Option<Instant>) -> Option<Instant> {
    if crate::memory::is_marked() {
        Some(Instant::now() + RELEASE_AFTER)
    } else {
        current
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, Change, Seen};
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, EventKind, Flag, ModifyKind, RemoveKind,
        RenameMode,
    };
    use std::collections::BTreeSet;
    use std::ffi::OsString;

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        paths
            .iter()
            .fold(notify::Event::new(kind), |e, p| e.add_path(p.into()))
    }

    #[test]
    fn only_a_rename_into_a_watched_name_counts_as_a_whole_file() {
        let names: BTreeSet<OsString> = ["routes.yaml", "clients.yaml"]
            .iter()
            .map(OsString::from)
            .collect();
        let c = |kind, paths: &[&str]| classify(&event(kind, paths), &names);
        let rename = |mode| EventKind::Modify(ModifyKind::Name(mode));
        assert_eq!(
            c(rename(RenameMode::To), &["/c/routes.yaml"]),
            Change::Whole
        );
        assert_eq!(c(rename(RenameMode::To), &["/c/..data"]), Change::Whole);
        assert_eq!(
            c(rename(RenameMode::Both), &["/c/.tmp", "/c/clients.yaml"]),
            Change::Whole
        );
        // An editor moving the original aside before writing the new file in place.
        assert_eq!(
            c(
                rename(RenameMode::Both),
                &["/c/routes.yaml", "/c/routes.yaml~"]
            ),
            Change::Partial
        );
        assert_eq!(
            c(rename(RenameMode::From), &["/c/routes.yaml"]),
            Change::Partial
        );
        assert_eq!(
            c(rename(RenameMode::To), &["/c/routes.yaml~"]),
            Change::None
        );
        assert_eq!(
            c(rename(RenameMode::Both), &["/c/a", "/c/b.log"]),
            Change::None
        );
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert_eq!(c(kind, &["/c/routes.yaml"]), Change::Partial, "{kind:?}");
            assert_eq!(c(kind, &["/c/access.log"]), Change::None, "{kind:?}");
        }
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
        ] {
            assert_eq!(c(kind, &["/c/routes.yaml"]), Change::None, "{kind:?}");
        }
    }

    #[test]
    fn a_reload_skips_the_settle_check_only_after_nothing_but_renames() {
        let seen = Seen::default();
        assert!(seen.take_needs_settle(), "a poll settles");
        seen.note(Change::Whole);
        assert!(seen.only_renames());
        assert!(!seen.take_needs_settle());
        assert!(!seen.only_renames(), "flags are cleared by the reload");
        seen.note(Change::Whole);
        seen.note(Change::Partial);
        assert!(!seen.only_renames());
        assert!(seen.take_needs_settle());
        seen.note(Change::None);
        assert!(seen.take_needs_settle());
    }

    /// An overflow of the kernel's event queue arrives as a "rescan" event naming no file: the
    /// events it stands for may have touched a watched file, so it must start a (settled) check.
    #[test]
    fn an_event_overflow_triggers_a_reload_check() {
        let names: BTreeSet<OsString> = [OsString::from("routes.yaml")].into_iter().collect();
        let overflow = notify::Event::new(EventKind::Other).set_flag(Flag::Rescan);
        assert_eq!(classify(&overflow, &names), Change::Partial);
        let seen = Seen::default();
        seen.note(classify(&overflow, &names));
        assert!(
            !seen.only_renames(),
            "after lost events the file may be half-written"
        );
        assert!(seen.take_needs_settle());
    }
}
