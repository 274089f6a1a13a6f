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
//! Separately, [`disable_huge_pages`] keeps the kernel from backing the process with 2 MiB pages.

use std::sync::atomic::{AtomicBool, Ordering};

/// Files at least this large are followed by a release.
pub const LARGE_TEXT: usize = 1 << 20;

/// Set by a reload of a large file, cleared by [`release_marked`].
static MARKED: AtomicBool = AtomicBool::new(false);

/// Notes that a large file's build has left garbage for [`release_marked`].
pub fn mark_garbage() {
    MARKED.store(true, Ordering::Relaxed);
}

/// Whether [`mark_garbage`] was called since the last [`release_marked`].
pub fn is_marked() -> bool {
    MARKED.load(Ordering::Relaxed)
}

/// [`release_freed`], if a large reload has marked garbage since the last call.
pub fn release_marked() {
    if MARKED.swap(false, Ordering::Relaxed) {
        release_freed();
    }
}

/// Returns the memory freed so far to the OS: this thread's free pages and every free page of the
/// process (0.3–3.5 ms after a 100k reload). A no-op without the `mimalloc` feature, where the system
/// allocator is in use.
pub fn release_freed() {
    #[cfg(feature = "mimalloc")]
    collect();
}

#[cfg(feature = "mimalloc")]
#[allow(unsafe_code)]
fn collect() {
    // SAFETY: `mi_collect` takes a plain bool and has no preconditions: it works on the calling
    // thread's own heap and on mimalloc's process-wide arenas, under mimalloc's own synchronisation,
    // and frees nothing that is still allocated. If mimalloc is not the global allocator (the
    // library's tests), it collects mimalloc's empty heap: harmless.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Turns transparent huge pages off for this process (Linux), unless the operator has set
/// `MIMALLOC_ALLOW_THP`, mimalloc's own switch for the same thing: `0` turns them off just like this,
/// `1` keeps them.
///
/// mimalloc asks the kernel for huge pages on its memory (`madvise(MADV_HUGEPAGE)`), so on a system whose
/// THP mode is `madvise` (a common distribution default) or `always`, a page fault zeroes and makes
/// resident 2 MiB at a time, used or not. A proxy's memory is many small allocations spread over
/// per-thread heaps: the huge pages were ~6–10 MiB of resident memory at every point (load harness,
/// 100,000 tenants: 30 vs 39 MiB after start, 68 vs 77 MiB at the peak of a reload; 10 tenants 13 vs
/// 23 MiB), with no throughput difference measurable. Call it first thing in `main`: the setting
/// covers every later page fault of the process (and is inherited by any child it starts).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn disable_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    let (on, unused): (libc::c_ulong, libc::c_ulong) = (1, 0);
    // SAFETY: `prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)` passes integers only, reads and writes no memory
    // of ours, and only sets a flag on this process's memory descriptor. A kernel without it (before
    // 3.15) answers EINVAL, and the process runs as before: nothing to handle.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, on, unused, unused, unused) };
}

/// Transparent huge pages are a Linux feature: nothing to turn off elsewhere.
#[cfg(not(target_os = "linux"))]
pub fn disable_huge_pages() {}
