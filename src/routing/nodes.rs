//! A tenant's upstream nodes: which one a request goes to, and which are out of rotation.
//!
//! A route names one upstream (`upstream`) or several (`upstreams`); each is a node, an
//! [`Upstream`] with a [`NodeHealth`]. Health belongs to the server, not to a table: it is kept in the
//! [`NodeRegistry`] by the node's scheme and authority, shared by every tenant and every table that
//! names the server, so a reload neither forgets an ejection nor resets a backoff.
//!
//! **Passive health.** Every exchange reports back: a connection refused or reset, a timeout, or a
//! 502/503/504 is a failure, any other response a success. `failures` consecutive failures eject the
//! node for `ejection_seconds`; when it is due back it is tried again, and one more failure ejects
//! it for twice as long (up to `max_ejection_seconds`), while a success puts it back for good.
//! **Active health** (optional, [`crate::routing::probe`]): `GET {base}/metadata` at an interval;
//! a failed check counts like a failed request, a good one returns the node at once.
//!
//! **Choice.** Round robin (default) or least connections, over the nodes in rotation. When none
//! is, the request is refused at once with the time until the first node is due back, rather than
//! waiting on a connect timeout per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};

use crate::config::limits::{HealthPolicy, TenantLimits};
use crate::ops::metrics::Metrics;
use crate::routing::upstream::Upstream;

/// How a tenant's requests are spread over its nodes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each node in turn.
    #[default]
    RoundRobin,
    /// The node with the fewest requests in flight (ties in turn).
    LeastConnections,
}

/// Milliseconds on the process-wide monotonic clock, never 0 (0 marks "not ejected").
fn now_ms() -> u64 {
    crate::time::monotonic_ms().saturating_add(1)
}

/// One upstream server's health, shared by every tenant and table that names it.
pub struct NodeHealth {
    /// `scheme://host:port`: the node's metric label and its key in the registry.
    pub label: Box<str>,
    policy: HealthPolicy,
    /// Consecutive failures.
    failures: AtomicU32,
    /// Ejections in a row without a success between (the backoff's exponent).
    ejections: AtomicU32,
    /// Until when the node is out of rotation, in [`now_ms`] (0: in rotation).
    ejected_until: AtomicU64,
    /// Requests in flight on this node (least connections).
    active: AtomicU32,
    gauges: Option<NodeMetrics>,
    /// A node of the latest table that names this server: what an active check requests.
    target: Mutex<Weak<Upstream>>,
}

impl std::fmt::Debug for NodeHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHealth")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

struct NodeMetrics {
    up: IntGauge,
    ejections: IntCounter,
    metrics: Arc<Metrics>,
}

impl NodeHealth {
    fn new(label: Box<str>, policy: HealthPolicy, metrics: Option<&Arc<Metrics>>) -> NodeHealth {
        let gauges = metrics.map(|m| {
            let up = m.upstream_node_up.with_label_values(&[&*label]);
            up.set(1);
            NodeMetrics {
                up,
                ejections: m.upstream_ejections.with_label_values(&[&*label]),
                metrics: m.clone(),
            }
        });
        NodeHealth {
            label,
            policy,
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            active: AtomicU32::new(0),
            gauges,
            target: Mutex::new(Weak::new()),
        }
    }

    /// Health for an upstream outside any table (the metadata upstream): no metrics.
    pub fn standalone(label: &str) -> Arc<NodeHealth> {
        Arc::new(NodeHealth::new(label.into(), HealthPolicy::default(), None))
    }

    /// Makes `node` the one active checks request.
    pub fn set_target(&self, node: &Arc<Upstream>) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(node);
    }

    /// The node active checks request, while a table has it.
    pub fn target(&self) -> Option<Arc<Upstream>> {
        self.target
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .upgrade()
    }

    /// How long until the node is back in rotation (`None`: it is in rotation now).
    pub fn out_for(&self) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let now = now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    pub fn in_flight(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// An exchange failed (connection refused or reset, timeout, 502/503/504, a failed check).
    pub fn failure(&self) {
        let n = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n < self.policy.failures.get() {
            return;
        }
        let now = now_ms();
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until > now {
            return; // Already out: the requests that were in flight report late.
        }
        let exponent = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = self
            .policy
            .ejection
            .saturating_mul(1 << exponent)
            .min(self.policy.max_ejection);
        let next = now.saturating_add(u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX));
        if self
            .ejected_until
            .compare_exchange(until, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return; // Another failure ejected it first.
        }
        // When it is due back, one more failure is enough to eject it again.
        self.failures
            .store(self.policy.failures.get() - 1, Ordering::Relaxed);
        if let Some(g) = &self.gauges {
            g.up.set(0);
            g.ejections.inc();
        }
        log::warn!(
            "upstream {} ejected for {} s after {n} consecutive failures",
            self.label,
            backoff.as_secs()
        );
    }

    /// An exchange succeeded: the failure count and the backoff start over. A node that is out
    /// stays out until it is due back (this may be a request that started before it failed).
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejected_until.load(Ordering::Relaxed) <= now_ms()
            && self.ejections.swap(0, Ordering::Relaxed) != 0
        {
            if let Some(g) = &self.gauges {
                g.up.set(1);
            }
            log::info!("upstream {} is back in rotation", self.label);
        }
    }

    /// Sets the node's up/down gauge from its state now (an ejection that ran out is up).
    pub fn refresh_gauge(&self) {
        if let Some(g) = &self.gauges {
            g.up.set(i64::from(self.out_for().is_none()));
        }
    }

    /// An active check passed: the node is back in rotation at once.
    pub fn check_passed(&self) {
        self.failures.store(0, Ordering::Relaxed);
        let was_out = self.ejected_until.swap(0, Ordering::Relaxed) != 0;
        if self.ejections.swap(0, Ordering::Relaxed) != 0 || was_out {
            if let Some(g) = &self.gauges {
                g.up.set(1);
            }
            log::info!("upstream {} passed its check: back in rotation", self.label);
        }
    }
}

impl Drop for NodeHealth {
    fn drop(&mut self) {
        // No table names the node any more: its series go too.
        if let Some(g) = &self.gauges {
            let _ = g
                .metrics
                .upstream_node_up
                .remove_label_values(&[&*self.label]);
            let _ = g
                .metrics
                .upstream_ejections
                .remove_label_values(&[&*self.label]);
        }
    }
}

/// Every node some table names, by label (weakly: a node no table names is dropped with its
/// last table).
pub struct NodeRegistry {
    nodes: Mutex<HashMap<Box<str>, Weak<NodeHealth>>>,
    metrics: Option<Arc<Metrics>>,
    policy: HealthPolicy,
}

impl std::fmt::Debug for NodeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRegistry")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl NodeRegistry {
    pub(crate) fn new(policy: HealthPolicy, metrics: Option<Arc<Metrics>>) -> NodeRegistry {
        NodeRegistry {
            nodes: Mutex::new(HashMap::new()),
            metrics,
            policy,
        }
    }

    /// The health of the node `label` names: the one already known, or a new one.
    pub fn node(&self, label: &str) -> Arc<NodeHealth> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = nodes.get(label).and_then(Weak::upgrade) {
            return h;
        }
        let h = Arc::new(NodeHealth::new(
            label.into(),
            self.policy,
            self.metrics.as_ref(),
        ));
        nodes.insert(label.into(), Arc::downgrade(&h));
        h
    }

    /// Forgets nodes no table names any more.
    pub fn prune(&self) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.retain(|_, w| w.strong_count() > 0);
    }

    /// The nodes some table names now.
    pub fn live(&self) -> Vec<Arc<NodeHealth>> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.values().filter_map(Weak::upgrade).collect()
    }
}

/// Whether a node can take a request now: its host resolved and it is not ejected.
fn in_rotation(node: &Upstream) -> bool {
    node.unresolved.is_none() && node.health.out_for().is_none()
}

/// A tenant's nodes and how requests are spread over them.
#[derive(Debug)]
pub struct Upstreams {
    pub nodes: Box<[Arc<Upstream>]>,
    pub balance: Balance,
    /// The tenant's request limits, resolved. Kept here rather than in the route: tenants that
    /// share their upstream settings nearly always share their limits, and a route stays 64 bytes.
    pub limits: TenantLimits,
    turn: AtomicUsize,
}

/// A node chosen for one attempt: counted as in flight on it until dropped.
#[derive(Debug)]
pub struct Lease {
    pub node: Arc<Upstream>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.node.health.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Upstreams {
    pub fn new(nodes: Vec<Arc<Upstream>>, balance: Balance, limits: TenantLimits) -> Upstreams {
        Upstreams {
            nodes: nodes.into_boxed_slice(),
            balance,
            limits,
            turn: AtomicUsize::new(0),
        }
    }

    /// The first node (the one a single `upstream` names): what logs name when no node was chosen.
    pub fn first(&self) -> &Upstream {
        &self.nodes[0]
    }

    /// Whether no node has an address (none of their hosts resolved).
    pub fn unresolved(&self) -> bool {
        self.nodes.iter().all(|n| n.unresolved.is_some())
    }

    /// Whether some node's host did not resolve.
    pub fn partly_unresolved(&self) -> bool {
        self.nodes.iter().any(|n| n.unresolved.is_some())
    }

    /// When every node with an address is out of rotation: how long until the first is due back.
    pub fn all_out(&self) -> Option<Duration> {
        let mut soonest: Option<Duration> = None;
        for n in self.nodes.iter().filter(|n| n.unresolved.is_none()) {
            let out = n.health.out_for()?;
            soonest = Some(soonest.map_or(out, |s| s.min(out)));
        }
        soonest
    }

    /// Whether a node other than `than` is in rotation (a failed attempt may move there).
    pub fn another_in_rotation(&self, than: &Arc<Upstream>) -> bool {
        self.nodes
            .iter()
            .any(|n| !Arc::ptr_eq(n, than) && in_rotation(n))
    }

    /// Chooses a node in rotation, other than `avoid` (the one a retry moves away from). `None`
    /// when there is none.
    pub fn pick(&self, avoid: Option<&Arc<Upstream>>) -> Option<Lease> {
        let n = self.nodes.len();
        let start = if n == 1 {
            0
        } else {
            self.turn.fetch_add(1, Ordering::Relaxed) % n
        };
        let usable =
            |node: &Arc<Upstream>| avoid.is_none_or(|a| !Arc::ptr_eq(a, node)) && in_rotation(node);
        let mut chosen: Option<&Arc<Upstream>> = None;
        for i in 0..n {
            let node = &self.nodes[(start + i) % n];
            if !usable(node) {
                continue;
            }
            match self.balance {
                Balance::RoundRobin => {
                    chosen = Some(node);
                    break;
                }
                Balance::LeastConnections => {
                    if chosen.is_none_or(|c| node.health.in_flight() < c.health.in_flight()) {
                        chosen = Some(node);
                    }
                }
            }
        }
        let node = chosen?.clone();
        node.health.active.fetch_add(1, Ordering::Relaxed);
        Some(Lease { node })
    }
}
