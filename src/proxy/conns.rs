//! Bounds on open client connections: in total, and per source address.
//!
//! Every accepted connection asks the [`ConnectionGate`] for an [`Admission`], which it holds until
//! it closes. Over a bound, the gate first looks for a connection that is *idle* (kept alive between
//! requests, its last response ended) and closes the one idle longest (for the per-source bound: of
//! the same source); only when none is idle is the new connection refused, with a `503` and
//! `Retry-After` on HTTP/1 (an HTTP/2 connection is closed).
//!
//! The source is the TCP peer's address. A peer in `trusted_proxies` is a balancer that carries
//! many clients on its connections, and the real client is only known per request (from
//! `X-Forwarded-For`): its connections count towards the total bound only. No header is read here,
//! so a client that rotates `X-Forwarded-For` gains nothing.
//!
//! An idle connection is closed by waking its read (registered in [`Slot::park`]) with the slot
//! marked closing: the read answers end of stream, and Pingora closes the connection as it would
//! for a client that went away. A request whose first bytes arrive in that instant is not served
//! (the usual keep-alive race: clients resend on a fresh connection).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;

use crate::ops::metrics::Metrics;

/// Serving a request, or waiting for the first one.
const BUSY: u8 = 0;
/// Kept alive between requests: may be closed to make room.
const IDLE: u8 = 1;
/// Chosen to be closed: its next read ends the stream.
const CLOSING: u8 = 2;

/// Which bound refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Total,
    PerSource,
}

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerSource => "per_source",
        }
    }
}

/// One open connection as the gate sees it.
#[derive(Debug)]
pub(crate) struct Slot {
    id: u64,
    /// The source it counts against (none: a trusted proxy, or not an IP peer).
    source: Option<IpAddr>,
    state: AtomicU8,
    idle_since: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl Slot {
    /// The connection's response ended; it waits for the next request.
    pub(crate) fn mark_idle(&self) {
        self.idle_since
            .store(crate::time::monotonic_ms(), Ordering::Relaxed);
        let _ = self
            .state
            .compare_exchange(BUSY, IDLE, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// A new request's first bytes arrived. False when the connection was chosen to be closed.
    pub(crate) fn mark_busy(&self) -> bool {
        match self
            .state
            .compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state != CLOSING,
        }
    }

    /// Whether the connection was chosen to be closed.
    pub(crate) fn closing(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLOSING
    }

    /// Remembers the waker of a read waiting for the next request, so closing can wake it.
    pub(crate) fn park(&self, waker: &Waker) {
        if let Ok(mut w) = self.waker.lock() {
            match w.as_ref() {
                Some(old) if old.will_wake(waker) => {}
                _ => *w = Some(waker.clone()),
            }
        }
    }

    /// Marks an idle connection to be closed and wakes its read. False if it was not idle.
    fn close_if_idle(&self) -> bool {
        if self
            .state
            .compare_exchange(IDLE, CLOSING, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        if let Some(w) = self.waker.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
        true
    }
}

/// The connection bounds and the open connections they count.
pub(crate) struct ConnectionGate {
    /// 0: no bound.
    max_total: usize,
    /// 0: no bound.
    max_per_source: usize,
    trusted: Vec<ipnet::IpNet>,
    total: AtomicUsize,
    sources: Mutex<HashMap<IpAddr, usize>>,
    /// Every open connection, to find an idle one (searched only when a bound is reached).
    live: Mutex<HashMap<u64, Weak<Slot>>>,
    next_id: AtomicU64,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for ConnectionGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionGate")
            .field("max_total", &self.max_total)
            .field("max_per_source", &self.max_per_source)
            .field("open", &self.total.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A connection's place under the bounds, given back when it drops.
#[derive(Debug)]
pub(crate) struct Admission {
    gate: Arc<ConnectionGate>,
    slot: Arc<Slot>,
}

impl Admission {
    pub(crate) fn slot(&self) -> &Slot {
        &self.slot
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let g = &self.gate;
        g.give_back(self.slot.source);
        if let Ok(mut live) = g.live.lock() {
            live.remove(&self.slot.id);
        }
        if let Some(m) = &g.metrics {
            m.client_connections.dec();
        }
    }
}

impl ConnectionGate {
    pub(crate) fn new(
        max_total: usize,
        max_per_source: usize,
        trusted: Vec<ipnet::IpNet>,
        metrics: Option<Arc<Metrics>>,
    ) -> ConnectionGate {
        ConnectionGate {
            max_total,
            max_per_source,
            trusted,
            total: AtomicUsize::new(0),
            sources: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            metrics,
        }
    }

    /// Connections open now.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Admits a connection from `peer`, closing an idle one if a bound is reached, or refuses it.
    pub(crate) fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Admission, Refusal> {
        let source = peer.filter(|ip| !self.trusted.iter().any(|n| n.contains(ip)));
        let result = self.take(source);
        if let Some(m) = &self.metrics {
            match result {
                Ok(_) => m.client_connections.inc(),
                Err(r) => m.connections_refused.with_label_values(&[r.as_str()]).inc(),
            }
        }
        result.map(|()| {
            let slot = Arc::new(Slot {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                source,
                state: AtomicU8::new(BUSY),
                idle_since: AtomicU64::new(0),
                waker: Mutex::new(None),
            });
            if let Ok(mut live) = self.live.lock() {
                live.insert(slot.id, Arc::downgrade(&slot));
            }
            Admission {
                gate: self.clone(),
                slot,
            }
        })
    }

    /// Counts a connection from `source` in, making room by closing an idle one where a bound is
    /// reached.
    fn take(&self, source: Option<IpAddr>) -> Result<(), Refusal> {
        let before = self.total.fetch_add(1, Ordering::AcqRel);
        if self.max_total > 0 && before >= self.max_total && !self.close_idle(None) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Total);
        }
        let Some(ip) = source else { return Ok(()) };
        let over = {
            let Ok(mut s) = self.sources.lock() else {
                return Ok(());
            };
            let n = s.entry(ip).or_insert(0);
            *n += 1;
            self.max_per_source > 0 && *n > self.max_per_source
        };
        if over && !self.close_idle(Some(ip)) {
            self.give_back(Some(ip));
            return Err(Refusal::PerSource);
        }
        Ok(())
    }

    /// Uncounts a connection from `source` (in total, and for its source).
    fn give_back(&self, source: Option<IpAddr>) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        let Some(ip) = source else { return };
        if let Ok(mut s) = self.sources.lock() {
            if let Some(n) = s.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.remove(&ip);
                }
            }
        }
    }

    /// Closes the connection idle longest (of `source`, if given). False if none is idle.
    fn close_idle(&self, source: Option<IpAddr>) -> bool {
        // A connection may turn busy between the search and the close: search again.
        for _ in 0..3 {
            let victim = {
                let Ok(live) = self.live.lock() else {
                    return false;
                };
                live.values()
                    .filter_map(Weak::upgrade)
                    .filter(|s| s.state.load(Ordering::Acquire) == IDLE)
                    .filter(|s| source.is_none() || s.source == source)
                    .min_by_key(|s| s.idle_since.load(Ordering::Relaxed))
            };
            let Some(victim) = victim else { return false };
            if victim.close_if_idle() {
                if let Some(m) = &self.metrics {
                    m.idle_connections_closed.inc();
                }
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)))
    }

    fn gate(total: usize, per_source: usize, trusted: &[&str]) -> Arc<ConnectionGate> {
        let trusted = trusted.iter().map(|t| t.parse().unwrap()).collect();
        Arc::new(ConnectionGate::new(total, per_source, trusted, None))
    }

    #[test]
    fn over_the_total_an_idle_connection_makes_room_and_a_busy_one_does_not() {
        let g = gate(2, 0, &[]);
        let a = g.admit(ip(1)).unwrap();
        let b = g.admit(ip(2)).unwrap();
        assert_eq!(g.admit(ip(3)).unwrap_err(), Refusal::Total);
        b.slot().mark_idle();
        std::thread::sleep(std::time::Duration::from_millis(2));
        a.slot().mark_idle();
        // The one idle longest (b) is chosen; the newcomer is in.
        let c = g.admit(ip(3)).unwrap();
        assert!(b.slot().closing() && !a.slot().closing());
        assert!(
            !b.slot().mark_busy(),
            "a closing connection takes no request"
        );
        assert!(a.slot().mark_busy());
        drop(b);
        assert_eq!(g.open(), 2);
        assert_eq!(g.admit(ip(4)).unwrap_err(), Refusal::Total);
        drop((a, c));
        assert_eq!(g.open(), 0);
    }

    #[test]
    fn per_source_counts_each_address_and_closes_only_its_own_idle_connections() {
        let g = gate(0, 2, &["10.0.0.0/8"]);
        let a1 = g.admit(ip(1)).unwrap();
        let _a2 = g.admit(ip(1)).unwrap();
        let _b = g.admit(ip(2)).unwrap();
        _b.slot().mark_idle();
        assert_eq!(g.admit(ip(1)).unwrap_err(), Refusal::PerSource);
        a1.slot().mark_idle();
        let _a3 = g.admit(ip(1)).unwrap();
        assert!(a1.slot().closing() && !_b.slot().closing());
        // A trusted proxy's connections count towards the total only.
        let lb = "10.1.2.3".parse().ok();
        let held: Vec<_> = (0..5).map(|_| g.admit(lb).unwrap()).collect();
        assert_eq!(held.len(), 5);
        drop(a1);
        assert_eq!(g.sources.lock().unwrap().get(&ip(1).unwrap()), Some(&2));
    }
}
