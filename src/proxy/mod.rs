//! The `ProxyHttp` implementation: the only module that knows Pingora's phases.
//!
//! `request_filter` decides everything once (limits → public metadata or an own endpoint? → bearer
//! token → tenant → route → path and method policy) and stores the decision in the request context
//! ([`ctx::RequestCtx`]): the route (`Arc<Route>`, one routing-table snapshot for the whole request)
//! and the upstream request target. Later phases only execute that decision: `upstream_peer` clones
//! the prebuilt peer, `upstream_request_filter` rewrites the target and rebuilds the forwarding
//! headers ([`forward`]), and every failure, whatever the phase, becomes a response in
//! [`crate::outcome`]. fhir-edge's own endpoints are in [`own`]; the downstream connection's header
//! deadline and flush hold in [`deadline`].

pub(crate) mod conns;
pub(crate) mod ctx;
pub(crate) mod deadline;
mod forward;
mod own;
mod portal;
pub(crate) mod proxy_protocol;
pub(crate) mod request_id;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, OrErr, Result};

pub(crate) use self::ctx::RequestCtx;
use crate::config::Config as Settings;
use crate::fhir::batch;
use crate::fhir::classify;
use crate::fhir::discovery::Discovery;
use crate::ops::audit::{self, AuditLog};
use crate::ops::metrics::{Metrics, NO_TENANT};
use crate::outcome::{self, Outcome};
use crate::proxy::deadline::downstream;
use crate::proxy::request_id::RequestIds;
use crate::reload::Live;
use crate::routing::RoutingTable;
use crate::tenant::TenantId;
use crate::token::endpoint::TokenService;

/// The fhir-edge proxy: mount it with `pingora::proxy::http_proxy_service` (see [`crate::edge`]).
pub(crate) struct FhirEdge {
    settings: Arc<Settings>,
    routes: Arc<Live<RoutingTable>>,
    /// The token endpoint and client registry, when configured.
    token: Option<Arc<TokenService>>,
    discovery: Arc<Discovery>,
    metrics: Arc<Metrics>,
    audit: AuditLog,
    ids: RequestIds,
    /// The registration portal, when configured.
    portal: Option<Arc<crate::portal::Portal>>,
    /// Limiter state and node health, which outlive routing tables.
    routing: Arc<crate::routing::RoutingState>,
}

impl FhirEdge {
    pub(crate) fn new(
        settings: Arc<Settings>,
        routes: Arc<Live<RoutingTable>>,
        token: Option<Arc<TokenService>>,
        discovery: Arc<Discovery>,
        metrics: Arc<Metrics>,
        audit: AuditLog,
    ) -> FhirEdge {
        FhirEdge {
            settings,
            routes,
            token,
            discovery,
            metrics,
            audit,
            ids: RequestIds::new(),
            portal: None,
            routing: crate::routing::RoutingState::detached(Default::default()),
        }
    }

    /// Keeps tenants' limiter state in `state` (the one the routing table is built with).
    pub(crate) fn with_routing_state(
        mut self,
        state: Arc<crate::routing::RoutingState>,
    ) -> FhirEdge {
        self.routing = state;
        self
    }

    /// Serves the registration portal as well.
    pub(crate) fn with_portal(mut self, portal: Option<Arc<crate::portal::Portal>>) -> FhirEdge {
        self.portal = portal;
        self
    }

    /// Answers the request with `o` (and records it).
    async fn reject(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        o: Outcome,
    ) -> Result<bool> {
        ctx.outcome = Some(o);
        o.respond(session, &self.settings.realm, &ctx.request_id, false)
            .await?;
        Ok(true)
    }

    /// Reports the current attempt's node as failed.
    fn node_failed(&self, ctx: &RequestCtx) {
        if let Some(lease) = &ctx.node {
            lease.node.health.failure();
        }
    }

    /// Whether the request may be sent once more, to another node in rotation.
    fn another_node(&self, ctx: &RequestCtx) -> bool {
        let (Some(route), Some(lease)) = (&ctx.route, &ctx.node) else {
            return false;
        };
        ctx.attempts < 2 && route.upstream.another_in_rotation(&lease.node)
    }

    /// Counts an upstream failure by route and kind.
    fn count_upstream_error(&self, ctx: &RequestCtx, e: &Error) {
        let label = ctx.route.as_ref().map(|r| r.label());
        self.metrics
            .upstream_errors
            .with_label_values(&[
                label.as_deref().unwrap_or(NO_TENANT),
                outcome::upstream_error_kind(e),
            ])
            .inc();
    }

    /// Writes the audit line.
    fn audit(&self, session: &Session, e: Option<&Error>, ctx: &RequestCtx, status: u16) {
        let req = session.req_header();
        let template = match ctx.template {
            Some(t) => t.to_string(),
            None => {
                let (path, _) = classify::split_target(req.raw_path());
                classify::route_template(path, &self.settings.public.path)
            }
        };
        let tenant = ctx.tenant.map(TenantId::text);
        let client_ip = ctx.client_ip.map(|ip| ip.to_string());
        let elapsed = ctx.start.elapsed();
        let record = audit::Record {
            time: &crate::time::rfc3339_now_millis(),
            request_id: &ctx.request_id,
            method: &req.method,
            route: &template,
            status,
            upstream_status: ctx.upstream_status,
            tenant: tenant.as_deref(),
            tenant_name: ctx.route.as_ref().map(|r| &*r.name),
            client_id: ctx.client(),
            jti_hash: ctx.grant.as_ref().and_then(|g| g.jti_hash.as_deref()),
            portal_action: ctx.portal_action,
            client_ip: client_ip.as_deref(),
            account: ctx.portal_account.as_deref(),
            upstream: match (&ctx.node, &ctx.route) {
                (Some(lease), _) => lease.node.host.to_str().ok(),
                (None, Some(r)) => r.upstream.first().host.to_str().ok(),
                (None, None) => None,
            },
            auth_failure: ctx
                .outcome
                .and_then(Outcome::auth_failure)
                .map(|f| f.as_str()),
            error: ctx
                .outcome
                .map(Outcome::label)
                .or_else(|| e.map(|_| "aborted")),
            latency_ms: (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0,
            bytes_out: session.as_downstream().body_bytes_sent(),
        };
        self.audit.write(&record);
    }
}

#[async_trait]
impl ProxyHttp for FhirEdge {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        let l = &self.settings.limits;
        // Pingora keeps HTTP/1.1 connections idle forever after the first request unless told otherwise.
        session.set_keepalive(Some(l.keepalive_timeout_seconds));
        // Per read of a body, and per write: a client that stops reading a response is cut off.
        session.set_read_timeout(Some(l.body_read_timeout));
        session.set_write_timeout(Some(l.write_timeout));
        // Without this, bytes of a next request that arrive while this one waits for its upstream
        // fail this one with a 400, even after the upstream has served it (perhaps a write). With it,
        // Pingora keeps those bytes for the next request, and `logging` closes the connection
        // instead of serving it.
        session.as_downstream_mut().set_pipelining_enabled(true);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = self.ids.accept_or_generate(
            session
                .req_header()
                .headers
                .get("x-request-id")
                .map(HeaderValue::as_bytes),
        );
        ctx.client_ip = forward::client_ip(
            session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
            &session.req_header().headers,
            &self.settings.trusted_proxies,
        );
        if let Some(o) = self.check_limits(session.req_header()) {
            return self.reject(session, ctx, o).await;
        }
        if let Some(p) = &self.portal {
            let (path, _) = classify::split_target(session.req_header().raw_path());
            let below = match self.portal_target(p, session, path) {
                portal::PortalTarget::No => None,
                portal::PortalTarget::Serve(rest) => Some(Some(rest)),
                portal::PortalTarget::Outside => Some(None),
            };
            if let Some(below) = below {
                return self.serve_portal(p.clone(), below, session, ctx).await;
            }
        }
        let req = session.req_header();
        let base = &self.settings.public.path;
        let (path, query) = classify::split_target(req.raw_path());
        let remainder = classify::fhir_remainder(path, base);
        ctx.method_class = {
            let below = remainder.unwrap_or_default();
            let search = below.ends_with(b"/_search") || below.ends_with(b"/_search/");
            let batch = below.is_empty() || below == b"/";
            crate::ops::metrics::method_class(&req.method, search, batch)
        };
        if classify::is_public_metadata(&req.method, path, base) {
            return self.serve_metadata(session, ctx).await;
        }
        if let Some(svc) = &self.token {
            let s = &svc.settings;
            if let Some(e) = classify::own_endpoint(path, base, &s.path, &s.management_path) {
                let which = own::detach(e);
                return self.serve_own(svc.clone(), which, session, ctx).await;
            }
        }
        let granted = match self.authenticate(req, query).await {
            Ok(g) => g,
            Err(o) => return self.reject(session, ctx, o).await,
        };
        match self.route(req, granted, remainder, query, ctx) {
            Ok(()) => Ok(false),
            Err(o) => self.reject(session, ctx, o).await,
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.upstream_start = Some(Instant::now());
        let Some(route) = ctx.route.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no upstream decided");
        };
        // A retry after a failure moves away from the node it failed on (and is no longer in
        // flight there); a resend after a stale pooled connection stays on the same node.
        let last = ctx.node.take().map(|lease| lease.node.clone());
        let avoid = last.filter(|_| std::mem::take(&mut ctx.elsewhere));
        if avoid.is_some() {
            self.metrics
                .upstream_retries
                .with_label_values(&[&*route.label()])
                .inc();
        }
        ctx.attempts = ctx.attempts.saturating_add(1);
        match route.upstream.pick(avoid.as_ref()) {
            Some(lease) => {
                let mut peer = lease.node.peer.clone();
                peer.group_key = route.group_key();
                ctx.node = Some(lease);
                Ok(Box::new(peer))
            }
            None => {
                // Every node went out of rotation since `request_filter` looked.
                let wait = route.upstream.all_out().unwrap_or_default();
                ctx.outcome = Some(Outcome::UpstreamsDown {
                    retry_after: crate::routing::limits::retry_after_seconds(wait),
                });
                Error::e_explain(ErrorType::HTTPStatus(503), "no upstream node in rotation")
            }
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.node_failed(ctx);
        // No byte of the request was sent: another node may take it, whatever its method.
        ctx.elsewhere = self.another_node(ctx);
        e.set_retry(ctx.elsewhere);
        e
    }

    fn error_while_proxy(
        &self,
        _peer: &HttpPeer,
        session: &mut Session,
        mut e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let upstream_fault = *e.esource() == ErrorSource::Upstream;
        // Sent again only if the method is idempotent, the whole body is still at hand, and no
        // byte of a response has come back (so the client has seen nothing of this attempt).
        let resendable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none()
            && ctx.upstream_status.is_none();
        if !resendable {
            if upstream_fault {
                self.node_failed(ctx);
            }
            e.set_retry(false);
            return e;
        }
        // A pooled connection the server had already closed: not the node's fault, and the
        // request may go again (Pingora's own rule for reused connections).
        e.retry.decide_reuse(client_reused);
        if e.retry() {
            return e;
        }
        if upstream_fault {
            self.node_failed(ctx);
            ctx.elsewhere = self.another_node(ctx);
            e.set_retry(ctx.elsewhere);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.upstream_request(req, ctx)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(b) = body {
            ctx.body_bytes += b.len();
            if ctx.body_bytes > self.settings.limits.max_body_bytes {
                ctx.outcome = Some(Outcome::BodyTooLarge);
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body over the limit");
            }
        }
        if let Some(buf) = ctx.batch.as_mut() {
            // Hold the body back until the whole batch has been checked.
            if let Some(b) = body.take() {
                buf.extend_from_slice(&b);
            }
            if end_of_stream {
                if !batch::is_batch_of_reads(buf) {
                    ctx.outcome = Some(Outcome::MethodNotAllowed);
                    return Error::e_explain(ErrorType::HTTPStatus(405), "batch is not reads only");
                }
                *body = Some(Bytes::from(std::mem::take(buf)));
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(lease) = &ctx.node {
            // Passive health: a gateway error is the node's failure, any other answer a success.
            if matches!(resp.status.as_u16(), 502..=504) {
                lease.node.health.failure();
            } else {
                lease.node.health.success();
            }
        }
        if let (Some(route), Some(t)) = (&ctx.route, ctx.upstream_start) {
            self.metrics
                .upstream_duration
                .with_label_values(&[&*route.label()])
                .observe(t.elapsed().as_secs_f64());
        }
        self.upstream_response(session, resp, ctx)
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        let Some(rewriter) = ctx.rewriter.as_mut() else {
            return Ok(None);
        };
        let chunk = body.take().unwrap_or_default();
        let decoded = match ctx.decoder.as_mut() {
            Some(d) => std::borrow::Cow::Owned(d.feed(&chunk, end_of_stream).or_err(
                ErrorType::InvalidHTTPHeader,
                "upstream body does not decode",
            )?),
            None => std::borrow::Cow::Borrowed(&chunk[..]),
        };
        let out = rewriter.feed(&decoded, end_of_stream);
        *body = (!out.is_empty()).then(|| Bytes::from(out));
        Ok(None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_status = Some(resp.status.as_u16());
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        // A rewritten body's length is unknown when this header goes out, so Pingora flushes the
        // header, each chunk and the last chunk separately: hold the flushes until the response ends
        // (`logging`), so a small response leaves in one send.
        if ctx.rewriter.is_some() && !forward::has_no_body(session, resp) {
            if let Some(conn) = downstream(session) {
                conn.hold_flushes();
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        // An error response replaces (or cuts short) the one a hold was armed for.
        if let Some(conn) = downstream(session) {
            conn.release_flushes();
        }
        // Counted before the error response goes out, so the count is there when the client
        // sees the error.
        if *e.esource() == ErrorSource::Upstream {
            self.count_upstream_error(ctx, e);
        }
        let mut code = 0;
        if let Some(o) = ctx.outcome.or_else(|| outcome::from_error(e)) {
            ctx.outcome = Some(o);
            code = o.status();
            // Once a response has started, a second one cannot be sent: the connection is closed
            // instead, so a truncated body can never look complete.
            if session.response_written().is_none() {
                if let Err(err) = o
                    .respond(session, &self.settings.realm, &ctx.request_id, true)
                    .await
                {
                    log::debug!("could not send the error response: {:?}", err.etype());
                }
            }
        }
        let (tenant, name) = match &ctx.route {
            Some(r) => (r.tenant.to_string(), &*r.name),
            None => ("-".to_string(), "-"),
        };
        // Only the error's type and source: its context strings can quote raw message bytes.
        // A client that went away (code 0) is routine; an error response is worth a warning.
        let level = if code == 0 {
            log::Level::Debug
        } else {
            log::Level::Warn
        };
        log::log!(
            level,
            "request {} (tenant {tenant}, route {name}) failed with {code}: {:?} from {:?}",
            ctx.request_id,
            e.etype(),
            e.esource()
        );
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        // Pingora's own error line includes error context strings that can quote raw bytes of a
        // malformed message; fail_to_proxy logs a PHI-free line instead.
        true
    }

    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        // Never the query string or path ids (they are PHI): method and route template only.
        let req = session.req_header();
        let template = match ctx.template {
            Some(t) => t.to_string(),
            None => {
                let (path, _) = classify::split_target(req.raw_path());
                classify::route_template(path, &self.settings.public.path)
            }
        };
        format!("{} {template}", audit::method_label(&req.method))
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let mut held = false;
        if let Some(conn) = downstream(session) {
            // RFC 9112 §9.3.2: more bytes than this request's body came before its response ended:
            // a pipelined request. It is not served; the connection closes and the client retries it.
            // (A chunked body's framing counts here too; such a connection merely is not kept.)
            let body = session.as_downstream().body_bytes_read();
            if conn.bytes_after_header() > body {
                session.set_keepalive(None);
            }
        }
        // The response has ended: the next bytes on this connection start a new request.
        if let Some(conn) = downstream(session) {
            held = conn.response_ended();
        }
        if held && e.is_none() {
            // The hold skipped the flush at the body's end. Finishing a finished body writes
            // nothing and flushes what is buffered (Pingora's `finish_body`).
            if let Err(err) = session.as_downstream_mut().finish_body().await {
                log::debug!("could not flush a held response: {:?}", err.etype());
            }
        }
        let status = session.response_written().map_or(0, |h| h.status.as_u16());
        let label = ctx.route.as_ref().map(|r| r.label());
        let label = label.as_deref().unwrap_or(NO_TENANT);
        let m = &self.metrics;
        m.requests
            .with_label_values(&[
                label,
                ctx.method_class,
                crate::ops::metrics::status_class(status),
            ])
            .inc();
        m.request_duration
            .with_label_values(&[label])
            .observe(ctx.start.elapsed().as_secs_f64());
        m.response_bytes
            .with_label_values(&[label])
            .inc_by(session.as_downstream().body_bytes_sent() as u64);
        if self.audit.enabled() {
            self.audit(session, e, ctx, status);
        }
    }
}
