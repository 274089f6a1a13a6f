//! The per-request context: what `request_filter` decided, kept for every later phase, and what the
//! phases learn on the way, for metrics and the audit line in `logging`.

use std::sync::Arc;
use std::time::Instant;

use crate::auth;
use crate::fhir::rewrite::{BodyRewriter, Decoder};
use crate::outcome::Outcome;
use crate::routing::limits::InFlight;
use crate::routing::nodes::Lease;
use crate::routing::Route;
use crate::tenant::TenantId;

/// Per-request state.
pub(crate) struct RequestCtx {
    pub(crate) start: Instant,
    pub(crate) request_id: String,
    /// The tenant's route, from the routing-table snapshot taken for this request.
    pub(crate) route: Option<Arc<Route>>,
    /// The request path below the public base, and the raw query: the upstream target is the
    /// chosen node's base path followed by these.
    pub(crate) below: Vec<u8>,
    pub(crate) query: Option<Vec<u8>>,
    /// Counted in the tenant's in-flight requests until the request ends.
    pub(crate) admitted: Option<InFlight>,
    /// The node of the current attempt (in flight on it until replaced or the request ends).
    pub(crate) node: Option<Lease>,
    /// Attempts made on upstream nodes.
    pub(crate) attempts: u8,
    /// The next attempt moves to another node (the last one failed there). Unset for a resend
    /// after a pooled connection the server had closed, which goes to the same node.
    pub(crate) elsewhere: bool,
    pub(crate) tenant: Option<TenantId>,
    /// The response fhir-edge made (or decided on, from a later phase) instead of the upstream's:
    /// the one record of what went wrong, for the audit line and the error response.
    pub(crate) outcome: Option<Outcome>,
    /// Buffer for `POST {base}` on a read-only route (see [`crate::fhir::batch`]).
    pub(crate) batch: Option<Vec<u8>>,
    pub(crate) body_bytes: usize,
    pub(crate) upstream_status: Option<u16>,
    /// The client a token was issued to at the token endpoint.
    pub(crate) client_id: Option<String>,
    /// Route template for fhir-edge's own endpoints (`/token`, …), which the FHIR template rules
    /// would not name.
    pub(crate) template: Option<&'static str>,
    /// Rewrites upstream links in a JSON response body (see [`crate::fhir::rewrite`]).
    pub(crate) rewriter: Option<BodyRewriter>,
    /// Decodes a compressed upstream body before rewriting.
    pub(crate) decoder: Option<Decoder>,
    /// Method class for metrics (read, search, batch, write, other).
    pub(crate) method_class: &'static str,
    /// When the upstream was chosen (start of the upstream latency).
    pub(crate) upstream_start: Option<Instant>,
    /// What the request's bearer token granted (client, `jti` hash for the audit log).
    pub(crate) grant: Option<Arc<auth::Grant>>,
    /// The registration portal's action, and the account that took it.
    pub(crate) portal_action: Option<&'static str>,
    /// The client's address: the TCP peer, or from a trusted proxy's `X-Forwarded-For`.
    pub(crate) client_ip: Option<std::net::IpAddr>,
    pub(crate) portal_account: Option<String>,
}

impl RequestCtx {
    pub(crate) fn new() -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            request_id: String::new(),
            route: None,
            below: Vec::new(),
            query: None,
            admitted: None,
            node: None,
            attempts: 0,
            elsewhere: false,
            tenant: None,
            outcome: None,
            batch: None,
            body_bytes: 0,
            upstream_status: None,
            client_id: None,
            template: None,
            rewriter: None,
            decoder: None,
            method_class: "other",
            upstream_start: None,
            grant: None,
            portal_action: None,
            client_ip: None,
            portal_account: None,
        }
    }

    /// The client behind this request: the one a token was just issued to, or the one its bearer
    /// token names. Never `sub`: an external issuer's `sub` may name a person.
    pub(crate) fn client(&self) -> Option<&str> {
        self.client_id
            .as_deref()
            .or_else(|| self.grant.as_ref().and_then(|g| g.client_id.as_deref()))
    }
}
