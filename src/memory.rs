//! Handing memory back to the operating system after a large load.
//!
//! Building a 100,000-tenant routing table allocates ~40 MB that is garbage a moment later (the file's
//! text, the parsed file, the table being replaced). mimalloc keeps freed pages for reuse and returns
//! them to the OS only from inside later allocator calls (once they have been free for a second) or
//! when a thread exits, and an idle proxy makes neither happen. It then sat at 68 MiB after starting
//! with such a table, and at ~90 MiB after reloading it, instead of the ~45 MiB it needs.
//! [`release_freed`] asks mimalloc to collect this thread's free pages and return every free page of
//! the process now. It is called after a load whose text was at least [`LARGE_TEXT`] bytes: for the
//! small files most deployments have there is nothing worth the call.

/// Files at least this large are followed by [`release_freed`].
pub const LARGE_TEXT: usize = 1 << 20;

/// Returns the memory freed so far to the OS (a no-op without the `mimalloc` feature, where the
/// system allocator is in use).
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
