//! Ports for processes under test that bind their own listeners. Shared by the integration tests and
//! the load harness (`benches/load.rs` includes this file by path), so it uses only `std`.

use std::fs;
use std::net::TcpListener;

/// A port that was free a moment ago (Pingora binds its own listeners, so it cannot take port 0).
///
/// Between this check and the proxy's own bind the port is free for anyone, and a port the kernel
/// hands out for `bind(0)` can be handed out again: CI once saw a proxy fail to bind a port that
/// another test's proxy (or a stub upstream on port 0) had just taken, while the test, finding the
/// port listening, sent its requests there. So ports come from below the kernel's ephemeral range,
/// which `bind(0)` and outgoing connections never use, and none is handed out twice in this process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    // Start at a place that depends on the process, so that two test processes rarely overlap.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_start < FIRST + 1_000 {
        // No room below the ephemeral range on this machine: ask the kernel.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
    }
    let span = ephemeral_start - FIRST;
    let _ = NEXT.compare_exchange(
        0,
        1 + std::process::id() % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = u16::try_from(port).expect("below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below {ephemeral_start}")
}
