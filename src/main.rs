//! The `fhir-edge` binary: what is process-wide, then the command line ([`fhir_edge::cli`]).
//!
//! The library installs nothing process-wide, so an embedder stays in control; this binary does:
//! mimalloc as the global allocator, transparent huge pages off, mimalloc's collection after a large
//! routing-table load, and the aws-lc-rs JWT crypto provider.

use std::process::ExitCode;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before the runtime's threads and the routing table allocate.
    disable_huge_pages();
    // Before anything can touch jsonwebtoken (which would settle on its own provider for good).
    fhir_edge::install_crypto_provider();
    fhir_edge::cli::main(fhir_edge::cli::Hooks {
        release_memory: release_memory(),
    })
}

/// mimalloc keeps freed pages for reuse and returns them to the OS only from inside later allocator
/// calls or when a thread exits, and an idle proxy makes neither happen: after a 100,000-tenant table
/// loads it would sit on tens of MB of garbage. `mi_collect` hands every free page back.
#[cfg(feature = "mimalloc")]
fn release_memory() -> Option<fn()> {
    #[allow(unsafe_code)]
    fn collect() {
        // SAFETY: `mi_collect` takes a plain bool and has no preconditions: it works on the calling
        // thread's own heap and on mimalloc's process-wide arenas, under mimalloc's own
        // synchronisation, and frees nothing that is still allocated.
        unsafe { libmimalloc_sys::mi_collect(true) }
    }
    Some(collect)
}

#[cfg(not(feature = "mimalloc"))]
fn release_memory() -> Option<fn()> {
    None
}

/// Turns transparent huge pages off for this process (Linux), unless the operator has set
/// `MIMALLOC_ALLOW_THP`, mimalloc's own switch for the same thing.
///
/// mimalloc asks the kernel for huge pages on its memory (`madvise(MADV_HUGEPAGE)`), so on a system whose
/// THP mode is `madvise` (a common distribution default) or `always`, a page fault zeroes and makes
/// resident 2 MiB at a time, used or not. A proxy's memory is many small allocations spread over
/// per-thread heaps: the huge pages were ~6–10 MiB of resident memory at every point, with no
/// throughput difference measurable (docs/performance.md). The setting covers every later page fault of
/// the process (and is inherited by any child it starts).
#[cfg(target_os = "linux")]
fn disable_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    let (on, unused): (libc::c_ulong, libc::c_ulong) = (1, 0);
    // SAFETY: `prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)` passes integers only, reads and writes no memory
    // of ours, and only sets a flag on this process's memory descriptor. A kernel without it (before
    // 3.15) answers EINVAL, and the process runs as before: nothing to handle.
    #[allow(unsafe_code)]
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, on, unused, unused, unused) };
}

#[cfg(not(target_os = "linux"))]
fn disable_huge_pages() {}
