//! Active upstream health checks (`upstream_health.check_interval_seconds`, off by default):
//! `GET {base}/metadata` on every node some table names, at the interval, with the node's own TLS
//! settings, through pingora-load-balancing's [`HttpHealthCheck`]. A 200 puts an ejected node back
//! in rotation at once; anything else counts as a failure, as a failed request would
//! ([`crate::routing::nodes`]). Each server is checked once per round however many tenants name it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora_load_balancing::health_check::{HealthCheck, HttpHealthCheck};
use pingora_load_balancing::Backend;

use crate::routing::upstream::Upstream;
use crate::routing::RoutingState;

/// The background service that runs the checks.
pub(crate) struct Prober {
    pub(crate) state: Arc<RoutingState>,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// The check of one node: its peer (TLS, SNI, CA) with the check's timeouts, and the request.
fn check_for(node: &Upstream, timeout: Duration) -> Option<HttpHealthCheck> {
    let mut check = HttpHealthCheck::new(node.host.to_str().ok()?, node.peer.is_tls());
    let mut peer = node.peer.clone();
    peer.options.connection_timeout = Some(timeout);
    peer.options.total_connection_timeout = Some(timeout);
    peer.options.read_timeout = Some(timeout);
    peer.options.write_timeout = Some(timeout);
    check.peer_template = peer;
    let path = format!("{}/metadata", node.base_path);
    let mut req = pingora::http::RequestHeader::build("GET", path.as_bytes(), None).ok()?;
    req.insert_header(http::header::HOST, node.host.clone())
        .ok()?;
    req.insert_header(http::header::ACCEPT, "application/fhir+json")
        .ok()?;
    req.insert_header(http::header::USER_AGENT, "fhir-edge health check")
        .ok()?;
    check.req = req;
    Some(check)
}

impl Prober {
    /// One round: every live node once, concurrently.
    async fn round(&self) {
        let targets: Vec<Arc<Upstream>> = self
            .state
            .nodes
            .live()
            .iter()
            .filter_map(|h| h.target())
            .filter(|u| u.unresolved.is_none())
            .collect();
        let mut checks = tokio::task::JoinSet::new();
        let timeout = self.timeout;
        for node in targets {
            checks.spawn(async move { check_node(&node, timeout).await });
        }
        while checks.join_next().await.is_some() {}
    }
}

/// Checks one node and tells its health the result.
async fn check_node(node: &Upstream, timeout: Duration) {
    let Some(check) = check_for(node, timeout) else {
        return;
    };
    let backend = Backend {
        addr: node.peer._address.clone(),
        weight: 1,
        ext: Default::default(),
    };
    // The check's own deadline too: a server that accepts and then stalls between reads must not
    // hold the round.
    match tokio::time::timeout(timeout.saturating_mul(2), check.check(&backend)).await {
        Ok(Ok(())) => node.health.check_passed(),
        Ok(Err(e)) => {
            log::debug!(
                "upstream {} failed its check: {:?}",
                node.health.label,
                e.etype()
            );
            node.health.failure();
        }
        Err(_) => {
            log::debug!("upstream {} check timed out", node.health.label);
            node.health.failure();
        }
    }
}

#[async_trait]
impl BackgroundService for Prober {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.round().await,
            }
        }
    }
}
