//! The `ProxyHttp` implementation: the only module that knows Pingora's phases.
//!
//! `request_filter` decides everything once (limits → public metadata? → bearer token → tenant →
//! route → path and method policy) and stores the decision in the request context: the route
//! (`Arc<Route>`, one routing-table snapshot for the whole request) and the upstream request
//! target. Later phases only execute that decision: `upstream_peer` clones the prebuilt peer,
//! `upstream_request_filter` rewrites the target and rebuilds the forwarding headers, and every
//! failure, whatever the phase, becomes a response in [`crate::outcome`].

pub mod coalesce;
pub mod deadline;
pub mod request_id;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, OrErr, Result};

use crate::auth::{self, AuthFailure};
use crate::config::Config as Settings;
use crate::fhir::batch;
use crate::fhir::classify::{self, MethodPolicy, OwnEndpoint, PathError};
use crate::fhir::discovery::{self, Discovery};
use crate::fhir::rewrite::{BodyRewriter, Decoder};
use crate::ops::audit::{self, AuditLog};
use crate::ops::metrics::{Metrics, NO_TENANT};
use crate::outcome::Outcome;
use crate::proxy::deadline::HeaderDeadlineStream;
use crate::proxy::request_id::RequestIds;
use crate::reload::Live;
use crate::routing::{Route, RoutingTable};
use crate::tenant::TenantId;
use crate::token::endpoint::{Issued, RequestView, TokenService, MAX_FORM_BYTES};
use crate::token::manage;

/// The fhir-edge proxy: mount it with `pingora::proxy::http_proxy_service` (see [`crate::edge`]).
pub struct FhirEdge {
    settings: Arc<Settings>,
    routes: Arc<Live<RoutingTable>>,
    /// The token endpoint and client registry, when configured.
    token: Option<Arc<TokenService>>,
    discovery: Arc<Discovery>,
    metrics: Arc<Metrics>,
    audit: AuditLog,
    ids: RequestIds,
}

impl FhirEdge {
    pub fn new(
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
        }
    }
}

/// Per-request state.
pub struct RequestCtx {
    start: Instant,
    request_id: String,
    /// The tenant's route, from the routing-table snapshot taken for this request.
    route: Option<Arc<Route>>,
    /// The request target sent upstream: base path + path below the public base + raw query.
    upstream_target: Vec<u8>,
    tenant: Option<TenantId>,
    auth_failure: Option<AuthFailure>,
    /// Set when fhir-edge answers itself (or decides to, from a later phase).
    outcome: Option<Outcome>,
    /// Buffer for `POST {base}` on a read-only route (see [`crate::fhir::batch`]).
    batch: Option<Vec<u8>>,
    body_bytes: usize,
    upstream_status: Option<u16>,
    /// The client a token was issued to, or whose token this request carries.
    client_id: Option<String>,
    /// Route template for fhir-edge's own endpoints (`/token`, …), which the FHIR template rules
    /// would not name.
    template: Option<&'static str>,
    /// Rewrites upstream links in a JSON response body (see [`crate::fhir::rewrite`]).
    rewriter: Option<BodyRewriter>,
    /// Decodes a compressed upstream body before rewriting.
    decoder: Option<Decoder>,
    /// Method class for metrics (read, search, batch, write, other).
    method_class: &'static str,
    /// When the upstream was chosen (start of the upstream latency).
    upstream_start: Option<Instant>,
    /// What the request's bearer token granted (client, `jti` hash for the audit log).
    grant: Option<Arc<auth::Grant>>,
    /// What went wrong at the OAuth endpoints, for the audit log.
    oauth_error: Option<&'static str>,
}

impl FhirEdge {
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

    /// Size limits checked before any parsing of the request's contents.
    fn check_limits(&self, req: &RequestHeader) -> Option<Outcome> {
        let l = &self.settings.limits;
        if req.raw_path().len() > l.max_uri_bytes {
            return Some(Outcome::UriTooLong);
        }
        if req.headers.len() > l.max_headers {
            return Some(Outcome::HeadersTooLarge);
        }
        let header_bytes: usize = req
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        if header_bytes > l.max_header_bytes {
            return Some(Outcome::HeadersTooLarge);
        }
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > l.max_body_bytes as u64) {
            return Some(Outcome::BodyTooLarge);
        }
        None
    }

    /// Records an authentication failure (reason in the context and the metrics) and its response.
    fn auth_failed(&self, ctx: &mut RequestCtx, f: AuthFailure) -> Outcome {
        ctx.auth_failure = Some(f);
        self.metrics
            .auth_failures
            .with_label_values(&[f.as_str()])
            .inc();
        Outcome::Auth(f)
    }

    /// Authenticates and routes a protected request; `Err` is the response to send.
    fn route(
        &self,
        req: &RequestHeader,
        path: &[u8],
        query: Option<&[u8]>,
        ctx: &mut RequestCtx,
    ) -> std::result::Result<(), Outcome> {
        let (grant, lookup) = auth::authenticate_with(
            &self.settings.verifier,
            &self.settings.token_cache,
            &req.headers,
            query,
            self.settings.max_token_bytes,
        )
        .map_err(|f| self.auth_failed(ctx, f))?;
        match lookup {
            auth::Lookup::Hit => self.metrics.token_cache_hit.inc(),
            auth::Lookup::Miss => self.metrics.token_cache_miss.inc(),
            auth::Lookup::Uncached => {}
        }
        ctx.tenant = Some(grant.tenant);
        ctx.grant = Some(grant.clone());
        if grant.own && !self.own_token_stands(&grant) {
            return Err(self.auth_failed(ctx, AuthFailure::Revoked));
        }
        // One snapshot of the table decides this request; later reloads do not affect it.
        let route = self
            .routes
            .load()
            .get(&grant.tenant)
            .cloned()
            // The same response as a token naming no tenant: nothing tells a caller which tenants exist.
            .ok_or_else(|| self.auth_failed(ctx, AuthFailure::UnknownTenant))?;
        let remainder =
            classify::fhir_remainder(path, &self.settings.public.path).map_err(|e| match e {
                PathError::NotUnderBase => Outcome::NotFound,
                PathError::Rejected => Outcome::BadRequest,
            })?;
        match classify::method_policy(&req.method, remainder, route.allow_writes) {
            MethodPolicy::Allowed => {}
            MethodPolicy::NotAllowed => return Err(Outcome::MethodNotAllowed),
            MethodPolicy::BatchOfReads => {
                let ct = req
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(HeaderValue::as_bytes)
                    .unwrap_or_default();
                if !batch::is_json_media_type(ct) {
                    return Err(Outcome::UnsupportedMediaType);
                }
                ctx.batch = Some(Vec::new());
            }
        }
        ctx.upstream_target = join_target(&route.upstream.base_path, remainder, query);
        ctx.route = Some(route);
        Ok(())
    }
}

/// One of fhir-edge's own endpoints, resolved.
enum Own {
    Token,
    Jwks,
    SmartConfiguration,
    Authorize,
    /// `None`: below the management path but not a management resource.
    Manage(Option<manage::Resource>),
}

impl FhirEdge {
    /// `GET|HEAD {base}/metadata`: the CapabilityStatement from [`Discovery`], without a token.
    async fn serve_metadata(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.template = Some("/metadata");
        let req = session.req_header();
        let (_, query) = classify::split_target(req.raw_path());
        let format = query.and_then(|q| {
            q.split(|&b| b == b'&').find_map(|pair| {
                let mut it = pair.splitn(2, |&b| b == b'=');
                let name = crate::fhir::pct::decode(it.next().unwrap_or_default(), true);
                (name == b"_format").then(|| {
                    String::from_utf8_lossy(&crate::fhir::pct::decode(
                        it.next().unwrap_or_default(),
                        true,
                    ))
                    .into_owned()
                })
            })
        });
        let accept = req
            .headers
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        let Some(content_type) = discovery::negotiate(format.as_deref(), accept) else {
            return self.reject(session, ctx, Outcome::NotAcceptable).await;
        };
        let Ok(body) = self.discovery.metadata().await else {
            return self
                .reject(session, ctx, Outcome::UpstreamUnavailable)
                .await;
        };
        let mut h = ResponseHeader::build(200, Some(4))?;
        h.insert_header("content-type", content_type)?;
        h.insert_header("content-length", body.len().to_string())?;
        h.insert_header("x-request-id", ctx.request_id.as_str())?;
        let head = session.req_header().method == http::Method::HEAD;
        session.write_response_header(Box::new(h), head).await?;
        if !head {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(true)
    }

    /// Tokens of fhir-edge's own issuer are checked against the live client registry (no I/O): a
    /// revoked secret, a removed or disabled client, or a tenant taken from the client ends them.
    fn own_token_stands(&self, grant: &auth::Grant) -> bool {
        let (Some(svc), Some(client), Some(secret)) =
            (&self.token, &grant.client_id, &grant.secret_id)
        else {
            return false;
        };
        svc.clients
            .load()
            .token_stands(client, secret, &grant.tenant)
    }

    /// Serves the token endpoint, the JWKS and client self-service; always answers itself.
    async fn serve_own(
        &self,
        svc: Arc<TokenService>,
        which: Own,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        let now = crate::time::now_unix();
        let source = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let rid = ctx.request_id.clone();
        let realm = self.settings.realm.as_str();
        let get_or_head = |m: &http::Method| m == http::Method::GET || m == http::Method::HEAD;
        let result = match which {
            Own::SmartConfiguration => {
                ctx.template = Some("/.well-known/smart-configuration");
                match self.discovery.smart_configuration() {
                    Some(doc) if get_or_head(&session.req_header().method) => Ok((200, doc)),
                    Some(_) => {
                        Err(crate::outcome::OAuthError::MethodNotAllowed { allow: "GET, HEAD" })
                    }
                    None => Err(crate::outcome::OAuthError::NotFound),
                }
            }
            Own::Authorize => {
                // Client credentials never uses the authorization endpoint; answer directly, never by
                // redirecting to an unvalidated redirect_uri.
                ctx.template = Some("/authorize");
                Err(crate::outcome::OAuthError::UnsupportedResponseType)
            }
            Own::Jwks => {
                ctx.template = Some("/.well-known/jwks.json");
                let m = &session.req_header().method;
                if m == http::Method::GET || m == http::Method::HEAD {
                    Ok((200, svc.settings.keys.jwks.clone()))
                } else {
                    Err(crate::outcome::OAuthError::MethodNotAllowed { allow: "GET, HEAD" })
                }
            }
            Own::Token => {
                ctx.template = Some("/token");
                self.token_request(&svc, session, source, now)
                    .await?
                    .map(|issued| {
                        ctx.client_id = Some(issued.client_id);
                        ctx.tenant = Some(issued.tenant);
                        (200, issued.body)
                    })
            }
            Own::Manage(None) => {
                ctx.template = Some("/register/{other}");
                Err(crate::outcome::OAuthError::NotFound)
            }
            Own::Manage(Some(resource)) => {
                ctx.template = Some(match resource {
                    manage::Resource::Client(_) => "/register/{client_id}",
                    manage::Resource::Secrets(_) => "/register/{client_id}/secrets",
                    manage::Resource::Secret(..) => "/register/{client_id}/secrets/{secret_id}",
                });
                let req = session.req_header();
                let (method, headers) = (req.method.clone(), req.headers.clone());
                let svc2 = svc.clone();
                // May rewrite clients.yaml: file I/O off the async workers.
                let joined = tokio::task::spawn_blocking(move || {
                    svc2.manage(&method, &resource, &headers, source, now)
                })
                .await;
                match joined {
                    Ok(r) => r.map(|reply| (reply.status, reply.body)),
                    Err(_) => Err(crate::outcome::OAuthError::ServerError),
                }
            }
        };
        match result {
            Ok((status, body)) => {
                if ctx.template == Some("/token") {
                    if let Some(c) = &ctx.client_id {
                        // Only clients in the registry get tokens, so the label set is bounded.
                        self.metrics.tokens_issued.with_label_values(&[c]).inc();
                    }
                }
                crate::outcome::respond_json(session, status, body, &rid, &[]).await?
            }
            Err(e) => {
                ctx.oauth_error = Some(e.label());
                self.metrics
                    .token_failures
                    .with_label_values(&[e.label()])
                    .inc();
                e.respond(session, realm, &rid).await?
            }
        }
        Ok(true)
    }

    /// Reads and handles a token request.
    async fn token_request(
        &self,
        svc: &TokenService,
        session: &mut Session,
        source: Option<std::net::IpAddr>,
        now: u64,
    ) -> Result<std::result::Result<Issued, crate::outcome::OAuthError>> {
        fn view(req: &RequestHeader, source: Option<std::net::IpAddr>) -> RequestView<'_> {
            RequestView {
                method: &req.method,
                query: classify::split_target(req.raw_path()).1,
                headers: &req.headers,
                source,
            }
        }
        if let Err(e) = svc.precheck(&view(session.req_header(), source)) {
            return Ok(Err(e));
        }
        let Some(body) = read_body(session, MAX_FORM_BYTES).await? else {
            return Ok(Err(crate::outcome::OAuthError::BodyTooLarge));
        };
        Ok(svc.token(&view(session.req_header(), source), &body, now))
    }
}

/// Reads the whole request body, or `None` when it is longer than `limit`.
async fn read_body(session: &mut Session, limit: usize) -> Result<Option<Vec<u8>>> {
    let mut body = Vec::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// `base_path` + `remainder` (or `/`), then `?query` byte-exact.
fn join_target(base_path: &str, remainder: &[u8], query: Option<&[u8]>) -> Vec<u8> {
    let mut t = Vec::with_capacity(
        base_path.len() + remainder.len() + query.map_or(0, |q| q.len() + 1) + 1,
    );
    t.extend_from_slice(base_path.as_bytes());
    t.extend_from_slice(remainder);
    if t.is_empty() {
        t.push(b'/');
    }
    if let Some(q) = query {
        t.push(b'?');
        t.extend_from_slice(q);
    }
    t
}

/// A response that carries no body whatever its headers say: to a HEAD, a 204 or 304, or a 1xx.
fn has_no_body(session: &Session, resp: &ResponseHeader) -> bool {
    session.req_header().method == http::Method::HEAD
        || matches!(resp.status.as_u16(), 204 | 304)
        || resp.status.is_informational()
}

/// The downstream HTTP/1 connection's wrapper (every accepted connection has one; HTTP/2 has none).
fn downstream_connection(session: &Session) -> Option<&HeaderDeadlineStream> {
    session
        .stream()?
        .as_any()
        .downcast_ref::<HeaderDeadlineStream>()
}

/// Request headers never forwarded: the client's credentials and anything that claims to say where
/// the request came from or which tenant it is for (the proxy decides those).
fn must_strip(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "authorization"
            | "proxy-authorization"
            | "cookie"
            | "forwarded"
            | "x-real-ip"
            | "x-request-id"
            | "via"
    ) || n.starts_with("x-forwarded-")
        || n.contains("tenant")
}

fn status_outcome(code: u16) -> Outcome {
    match code {
        400 => Outcome::BadRequest,
        404 => Outcome::NotFound,
        405 => Outcome::MethodNotAllowed,
        413 => Outcome::BodyTooLarge,
        414 => Outcome::UriTooLong,
        415 => Outcome::UnsupportedMediaType,
        431 => Outcome::HeadersTooLarge,
        502 => Outcome::UpstreamUnavailable,
        504 => Outcome::UpstreamTimeout,
        _ => Outcome::Internal,
    }
}

/// The kind of an upstream failure, for metrics.
fn upstream_error_kind(e: &Error) -> &'static str {
    use ErrorType::*;
    match e.etype() {
        ConnectTimedout | ReadTimedout | WriteTimedout => "timeout",
        ConnectRefused | ConnectNoRoute | ConnectError | BindError | SocketError
        | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError => "connect",
        ConnectionClosed | ReadError | WriteError => "reset",
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 | H2Downgrade => "protocol",
        _ => "other",
    }
}

/// The response for an error from any phase; `None` when the client connection is already dead.
fn error_outcome(e: &Error) -> Option<Outcome> {
    use ErrorType::*;
    if let HTTPStatus(code) = e.etype() {
        return Some(status_outcome(*code));
    }
    match e.esource() {
        ErrorSource::Upstream => Some(match e.etype() {
            ConnectTimedout | ReadTimedout | WriteTimedout => Outcome::UpstreamTimeout,
            _ => Outcome::UpstreamUnavailable,
        }),
        ErrorSource::Downstream => match e.etype() {
            ReadError | WriteError | ConnectionClosed | ReadTimedout | WriteTimedout => None,
            _ => Some(Outcome::BadRequest),
        },
        ErrorSource::Internal | ErrorSource::Unset => Some(Outcome::Internal),
    }
}

#[async_trait]
impl ProxyHttp for FhirEdge {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            request_id: String::new(),
            route: None,
            upstream_target: Vec::new(),
            tenant: None,
            auth_failure: None,
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
            oauth_error: None,
        }
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
        if let Some(o) = self.check_limits(session.req_header()) {
            return self.reject(session, ctx, o).await;
        }
        let req = session.req_header();
        let (path, query) = classify::split_target(req.raw_path());
        ctx.method_class = {
            let base = self.settings.public.path.as_bytes();
            let below = path.strip_prefix(base).unwrap_or(path);
            let search = below.ends_with(b"/_search") || below.ends_with(b"/_search/");
            let batch = below.is_empty() || below == b"/";
            crate::ops::metrics::method_class(&req.method, search, batch)
        };
        if classify::is_public_metadata(&req.method, path, &self.settings.public.path) {
            return self.serve_metadata(session, ctx).await;
        }
        if let Some(svc) = &self.token {
            let s = &svc.settings;
            if let Some(e) = classify::own_endpoint(
                path,
                &self.settings.public.path,
                &s.path,
                &s.management_path,
            ) {
                let which = match e {
                    OwnEndpoint::Token => Own::Token,
                    OwnEndpoint::Jwks => Own::Jwks,
                    OwnEndpoint::SmartConfiguration => Own::SmartConfiguration,
                    OwnEndpoint::Authorize => Own::Authorize,
                    OwnEndpoint::Manage(rest) => Own::Manage(manage::parse(rest)),
                };
                return self.serve_own(svc.clone(), which, session, ctx).await;
            }
        }
        match self.route(req, path, query, ctx) {
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
        match &ctx.route {
            Some(r) => {
                let mut peer = r.upstream.peer.clone();
                peer.group_key = r.group_key();
                Ok(Box::new(peer))
            }
            None => Error::e_explain(ErrorType::InternalError, "no upstream decided"),
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(route) = &ctx.route else {
            return Error::e_explain(ErrorType::InternalError, "no upstream decided");
        };
        let upstream = &route.upstream;
        req.set_raw_path(&ctx.upstream_target)?;
        let strip: Vec<HeaderName> = req
            .headers
            .keys()
            .filter(|n| must_strip(n))
            .cloned()
            .collect();
        for name in &strip {
            req.remove_header(name);
        }
        req.insert_header(http::header::HOST, upstream.host.clone())?;
        if let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            req.insert_header("x-forwarded-for", ip.to_string())?;
        }
        let public = &self.settings.public;
        req.insert_header("x-forwarded-proto", public.scheme.as_str())?;
        req.insert_header("x-forwarded-host", public.authority.as_str())?;
        req.insert_header("x-request-id", ctx.request_id.as_str())?;
        // Bodies must be readable to rewrite upstream links in them.
        req.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
        for (name, value) in &route.upstream_headers {
            req.insert_header(name.clone(), value.clone())?;
        }
        Ok(())
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

    /// Runs before Pingora frames the downstream response, so dropping Content-Length here makes it
    /// send the rewritten body chunked.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(route) = &ctx.route else {
            return Ok(());
        };
        if let Some(t) = ctx.upstream_start {
            self.metrics
                .upstream_duration
                .with_label_values(&[&*route.label()])
                .observe(t.elapsed().as_secs_f64());
        }
        let rw = &route.upstream.rewrites;
        if rw.is_empty() {
            return Ok(());
        }
        for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
            let new = resp
                .headers
                .get(&name)
                .and_then(|v| rw.header(v.as_bytes()));
            if let Some(new) = new {
                let value = HeaderValue::from_bytes(&new)
                    .or_err(ErrorType::InvalidHTTPHeader, "rewritten header")?;
                resp.insert_header(name, value)?;
            }
        }
        let no_body = has_no_body(session, resp);
        let json = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| batch::is_json_media_type(v.as_bytes()));
        if no_body || !json {
            return Ok(());
        }
        let encoding = resp
            .headers
            .get(http::header::CONTENT_ENCODING)
            .map(|v| v.as_bytes().to_vec())
            .unwrap_or_default();
        match Decoder::for_encoding(&encoding) {
            Ok(None) => {}
            Ok(Some(d)) => {
                ctx.decoder = Some(d);
                resp.remove_header(&http::header::CONTENT_ENCODING);
            }
            // A compressed body fhir-edge cannot read would pass its upstream links unrewritten.
            Err(_) => {
                return Error::e_explain(
                    ErrorType::HTTPStatus(502),
                    "undecodable upstream encoding",
                )
            }
        }
        resp.remove_header(&http::header::CONTENT_LENGTH);
        ctx.rewriter = Some(rw.body());
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if ctx.rewriter.is_none() {
            return Ok(None);
        }
        let chunk = body.take().unwrap_or_default();
        let decoded = match ctx.decoder.as_mut() {
            Some(d) => std::borrow::Cow::Owned(d.feed(&chunk, end_of_stream).or_err(
                ErrorType::InvalidHTTPHeader,
                "upstream body does not decode",
            )?),
            None => std::borrow::Cow::Borrowed(&chunk[..]),
        };
        if let Some(r) = ctx.rewriter.as_mut() {
            let out = r.feed(&decoded, end_of_stream);
            *body = (!out.is_empty()).then(|| Bytes::from(out));
        }
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
        // Pingora writes this header next. A chunked one (every rewritten body) would leave in a
        // segment of its own, each chunk in another and the last chunk in a third: hold the flushes
        // until the last chunk (src/coalesce.rs).
        if !has_no_body(session, resp) && resp.headers.contains_key(http::header::TRANSFER_ENCODING)
        {
            if let Some(conn) = downstream_connection(session) {
                conn.hold_response();
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
        if let Some(conn) = downstream_connection(session) {
            conn.release_response();
        }
        // Counted before the error response goes out, so the count is there when the client
        // sees the error.
        if *e.esource() == ErrorSource::Upstream {
            let label = ctx.route.as_ref().map(|r| r.label());
            self.metrics
                .upstream_errors
                .with_label_values(&[
                    label.as_deref().unwrap_or(NO_TENANT),
                    upstream_error_kind(e),
                ])
                .inc();
        }
        let outcome = ctx.outcome.or_else(|| error_outcome(e));
        let mut code = 0;
        if let Some(o) = outcome {
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

    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        // Never the query string or path ids (they are PHI): method and route template only.
        let req = session.req_header();
        let (path, _) = classify::split_target(req.raw_path());
        format!(
            "{} {}",
            audit::method_label(&req.method),
            classify::route_template(path, &self.settings.public.path)
        )
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |h| h.status.as_u16());
        let label = ctx.route.as_ref().map(|r| r.label());
        let label = label.as_deref().unwrap_or(NO_TENANT);
        let elapsed = ctx.start.elapsed();
        let bytes_out = session.as_downstream().body_bytes_sent();
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
            .observe(elapsed.as_secs_f64());
        m.response_bytes
            .with_label_values(&[label])
            .inc_by(bytes_out as u64);
        if !self.audit.enabled() {
            return;
        }
        let req = session.req_header();
        let template = match ctx.template {
            Some(t) => t.to_string(),
            None => {
                let (path, _) = classify::split_target(req.raw_path());
                classify::route_template(path, &self.settings.public.path)
            }
        };
        let tenant = ctx.tenant.map(TenantId::text);
        let error = ctx
            .outcome
            .map(Outcome::label)
            .or(ctx.oauth_error)
            .or_else(|| e.map(|_| "aborted"));
        let record = audit::Record {
            time: &crate::time::rfc3339_now_millis(),
            request_id: &ctx.request_id,
            method: &req.method,
            route: &template,
            status,
            upstream_status: ctx.upstream_status,
            tenant: tenant.as_deref(),
            tenant_name: ctx.route.as_ref().map(|r| &*r.name),
            // The client, never `sub`: an external issuer's `sub` may name a person.
            client_id: ctx
                .client_id
                .as_deref()
                .or_else(|| ctx.grant.as_ref().and_then(|g| g.client_id.as_deref())),
            jti_hash: ctx.grant.as_ref().and_then(|g| g.jti_hash.as_deref()),
            upstream: ctx
                .route
                .as_ref()
                .and_then(|r| r.upstream.host.to_str().ok()),
            auth_failure: ctx.auth_failure.map(AuthFailure::as_str),
            error,
            latency_ms: (elapsed.as_secs_f64() * 1_000_000.0).round() / 1000.0,
            bytes_out,
        };
        if let Err(err) = self.audit.write(&record) {
            m.audit_write_failures.inc();
            log::error!("cannot write the audit log: {err}");
        }
    }
}
