//! Handing memory back to the operating system after a large load.
//!
//! Building a 100,000-tenant routing table leaves tens of MB of garbage a moment later (the table
//! being replaced; for a JSON table or one the general YAML parser reads, the file's text and the
//! parsed file too). mimalloc keeps freed pages for reuse and returns
//! them to the OS only from inside later allocator calls (once they have been free for a second) or
//! when a thread exits, and an idle proxy makes neither happen. It then sat at 68 MiB after starting
//! with such a table, and at ~90 MiB after reloading it, instead of the ~45 MiB it needs.
//!
//! So after a file of at least [`LARGE_TEXT`] bytes:
//! - at start, [`release_freed`] runs at once (before anything is served);
//! - after a reload, the reload only [`mark_garbage`]s, and the reloader calls [`release_marked`] once
//!   reloads have been quiet for a few seconds. A reload that follows closely on another (a burst of
//!   edits) then reuses the pages the previous one freed instead of faulting in fresh ones: releasing
//!   at once after every reload made 100k reloads under load ~11 % slower (median) in the harness.
//!
//! For the small files most deployments have there is nothing worth the call.
//!
//! The release itself is the embedder's (the `fhir-edge` binary passes mimalloc's `mi_collect`): the
//! library makes no allocator calls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Files at least this large are followed by a release.
pub(crate) const LARGE_TEXT: usize = 1 << 20;

/// Set by a reload of a large file, cleared by [`release_marked`].
static MARKED: AtomicBool = AtomicBool::new(false);

/// Notes that a large file's build has left garbage for [`release_marked`].
pub(crate) fn mark_garbage() {
    MARKED.store(true, Ordering::Relaxed);
}

/// Whether [`mark_garbage`] was called since the last [`release_marked`].
pub(crate) fn is_marked() -> bool {
    MARKED.load(Ordering::Relaxed)
}

/// [`release_freed`], if a large load has marked garbage since the last call and a release function
/// is installed.
pub(crate) fn release_marked() {
    if let Some(release) = RELEASE.get() {
        if MARKED.swap(false, Ordering::Relaxed) {
            release();
        }
    }
}

/// The embedder's release function ([`crate::Edge::release_memory_with`]); none by default.
static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Installs the release function (the first one given wins) and runs it for a large start-up load
/// that came before it.
pub(crate) fn set_release(release: Option<fn()>) {
    if let Some(f) = release {
        let _ = RELEASE.set(f);
        release_marked();
    }
}

/// Returns the memory freed so far to the OS through the embedder's release function (0.3–3.5 ms with
/// mimalloc's `mi_collect` after a 100k reload). Without one yet, the garbage is marked for
/// [`set_release`].
pub(crate) fn release_freed() {
    match RELEASE.get() {
        Some(release) => release(),
        None => mark_garbage(),
    }
}
