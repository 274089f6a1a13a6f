//! Deciding and shaping the forwarded exchange: size limits, authentication and the route
//! (`request_filter`), the upstream request's target and headers (`upstream_request_filter`), and
//! the upstream response's headers (`upstream_response_filter`).

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::{Error, ErrorType, OrErr, Result};

use super::{FhirEdge, RequestCtx};
use crate::auth::{self, AuthFailure};
use crate::fhir::batch;
use crate::fhir::classify::{self, MethodPolicy, PathError};
use crate::fhir::rewrite::Decoder;
use crate::outcome::Outcome;

impl FhirEdge {
    /// Size limits and framing checked before any parsing of the request's contents.
    pub(super) fn check_limits(&self, req: &RequestHeader) -> Option<Outcome> {
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
        let declared = match single_content_length(&req.headers) {
            Ok(v) => v.and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok()),
            // RFC 9112 §6.3: differing lengths are unrecoverable framing.
            Err(()) => return Some(Outcome::BadRequest),
        };
        if declared.is_some_and(|n| n > l.max_body_bytes as u64) {
            return Some(Outcome::BodyTooLarge);
        }
        None
    }

    /// Records an authentication failure in the metrics and returns its response.
    fn auth_failed(&self, f: AuthFailure) -> Outcome {
        self.metrics
            .auth_failures
            .with_label_values(&[f.as_str()])
            .inc();
        Outcome::Auth(f)
    }

    /// Authenticates a protected request. A token whose kid an issuer with fetched keys does not
    /// hold may wait (bounded) for the one refetch such tokens can cause, and is then judged again;
    /// no other request waits on anything here.
    pub(super) async fn authenticate(
        &self,
        req: &RequestHeader,
        query: Option<&[u8]>,
    ) -> std::result::Result<(Arc<auth::Grant>, auth::Lookup), Outcome> {
        let s = &self.settings;
        let attempt = || {
            auth::authenticate_with(
                &s.verifier,
                &s.token_cache,
                &req.headers,
                query,
                s.max_token_bytes,
            )
        };
        let refused = match attempt() {
            Ok(ok) => return Ok(ok),
            Err(auth::Refused::UnknownKid(issuer)) => {
                let wait = issuer
                    .remote
                    .as_ref()
                    .and_then(|r| r.unknown_kid(issuer.counters.get()));
                match wait {
                    Some(wait) => {
                        wait.await;
                        attempt()
                    }
                    None => Err(auth::Refused::UnknownKid(issuer)),
                }
            }
            Err(r) => Err(r),
        };
        refused.map_err(|r| {
            if let auth::Refused::UnknownKid(issuer) = &r {
                issuer.count_refusal();
            }
            self.auth_failed(r.failure())
        })
    }

    /// Routes an authenticated request whose path below the public base is `remainder`; `Err` is
    /// the response to send.
    pub(super) fn route(
        &self,
        req: &RequestHeader,
        (grant, lookup): (Arc<auth::Grant>, auth::Lookup),
        remainder: std::result::Result<&[u8], PathError>,
        query: Option<&[u8]>,
        ctx: &mut RequestCtx,
    ) -> std::result::Result<(), Outcome> {
        match lookup {
            auth::Lookup::Hit => self.metrics.token_cache_hit.inc(),
            auth::Lookup::Miss => self.metrics.token_cache_miss.inc(),
            auth::Lookup::Uncached => {}
        }
        ctx.tenant = Some(grant.tenant);
        ctx.grant = Some(grant.clone());
        if grant.own && !self.own_token_stands(&grant) {
            return Err(self.auth_failed(AuthFailure::Revoked));
        }
        // One snapshot of the table decides this request; later reloads do not affect it.
        let route = self
            .routes
            .load()
            .get(&grant.tenant)
            .cloned()
            // The same response as a token naming no tenant: nothing tells a caller which tenants exist.
            .ok_or_else(|| self.auth_failed(AuthFailure::UnknownTenant))?;
        if route.upstream.unresolved() {
            // At once, without a connect attempt to an address there is none of.
            ctx.route = Some(route);
            return Err(Outcome::TenantUnavailable);
        }
        if let Some(wait) = route.upstream.all_out() {
            // At once too: no request waits on a connect timeout to a server known to be failing.
            self.metrics
                .upstreams_down
                .with_label_values(&[&*route.label()])
                .inc();
            ctx.route = Some(route);
            return Err(Outcome::UpstreamsDown {
                retry_after: crate::routing::limits::retry_after_seconds(wait),
            });
        }
        let admitted = self.routing.limiters.admit(
            route.tenant,
            &route.upstream.limits,
            grant.client_id.as_deref(),
        );
        match admitted {
            Ok(admitted) => ctx.admitted = admitted,
            Err(t) => {
                self.metrics
                    .throttled
                    .with_label_values(&[&*route.label(), t.limit.as_str()])
                    .inc();
                ctx.route = Some(route);
                return Err(Outcome::Throttled(t));
            }
        }
        let remainder = remainder.map_err(|e| match e {
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
        ctx.below = remainder.to_vec();
        ctx.query = query.map(<[u8]>::to_vec);
        ctx.route = Some(route);
        Ok(())
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

    /// The upstream request: the decided target, the route's `Host`, rebuilt forwarding headers and
    /// the route's upstream headers; nothing the client says about where it came from or which
    /// tenant it is for.
    pub(super) fn upstream_request(&self, req: &mut RequestHeader, ctx: &RequestCtx) -> Result<()> {
        let (Some(route), Some(lease)) = (&ctx.route, &ctx.node) else {
            return Error::e_explain(ErrorType::InternalError, "no upstream decided");
        };
        let upstream = &lease.node;
        req.set_raw_path(&join_target(
            &upstream.base_path,
            &ctx.below,
            ctx.query.as_deref(),
        ))?;
        let strip: Vec<HeaderName> = req
            .headers
            .keys()
            .filter(|n| must_strip(n))
            .cloned()
            .collect();
        for name in &strip {
            req.remove_header(name);
        }
        // Checked equal in `check_limits`; one goes on (RFC 9110 §8.6).
        if let Ok(Some(length)) = single_content_length(&req.headers) {
            let length = length.clone();
            req.insert_header(CONTENT_LENGTH, length)?;
        }
        req.insert_header(http::header::HOST, upstream.host.clone())?;
        // One address, resolved once (`client_ip`): what the client sent is never passed on.
        if let Some(ip) = ctx.client_ip {
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

    /// Rewrites upstream links in `Location` headers and sets up the body rewriter. Runs before
    /// Pingora frames the downstream response, so dropping `Content-Length` here makes it send the
    /// rewritten body chunked.
    pub(super) fn upstream_response(
        &self,
        session: &Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        match single_content_length(&resp.headers) {
            Ok(Some(length)) => {
                let length = length.clone();
                resp.insert_header(CONTENT_LENGTH, length)?;
            }
            Ok(None) => {}
            Err(()) => {
                return Error::e_explain(ErrorType::HTTPStatus(502), "differing content lengths")
            }
        }
        let Some(node) = ctx.node.as_ref().map(|l| l.node.clone()) else {
            return Ok(());
        };
        let rw = &node.rewrites;
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
        let json = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| batch::is_json_media_type(v.as_bytes()));
        if has_no_body(session, resp) || !json {
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
        resp.remove_header(&CONTENT_LENGTH);
        ctx.rewriter = Some(rw.body());
        Ok(())
    }
}

/// The one `Content-Length` value of a message: `Ok(None)` without one, `Err` when several differ.
fn single_content_length(
    headers: &http::HeaderMap,
) -> std::result::Result<Option<&HeaderValue>, ()> {
    let mut values = headers.get_all(CONTENT_LENGTH).iter();
    let first = values.next();
    match first {
        Some(f) if values.all(|v| v.as_bytes().trim_ascii() == f.as_bytes().trim_ascii()) => {
            Ok(Some(f))
        }
        Some(_) => Err(()),
        None => Ok(None),
    }
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
pub(super) fn has_no_body(session: &Session, resp: &ResponseHeader) -> bool {
    session.req_header().method == http::Method::HEAD
        || matches!(resp.status.as_u16(), 204 | 304)
        || resp.status.is_informational()
}

/// Request headers never forwarded: the client's credentials, anything that claims to say where the
/// request came from or which tenant it is for (the proxy decides those), and any name with an
/// underscore, which some upstreams fold into `-` (`X_Forwarded_For` would become a forwarding
/// claim; nginx drops them by default, Envoy's `headers_with_underscores_action` can).
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
        || n.contains('_')
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` address that is not a trusted proxy (what each trusted hop appended;
/// anything to its left the client could have written). An entry that is not an address ends the
/// walk at the last trusted hop. With no trusted proxies, headers are never read: a client that
/// rotates `X-Forwarded-For` gains nothing.
pub(crate) fn client_ip(
    peer: Option<IpAddr>,
    headers: &http::HeaderMap,
    trusted: &[ipnet::IpNet],
) -> Option<IpAddr> {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut client = peer?;
    if !is_trusted(&client) {
        return Some(client);
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    for entry in entries.iter().rev() {
        let Ok(ip) = entry.trim().parse::<IpAddr>() else {
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_client_address_is_believed_only_from_trusted_hops() {
        let trusted: Vec<ipnet::IpNet> = vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.1/32".parse().unwrap(),
        ];
        let xff = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("x-forwarded-for", v.parse().unwrap());
            h
        };
        let lb: Option<std::net::IpAddr> = Some("192.0.2.1".parse().unwrap());
        let outsider: Option<std::net::IpAddr> = Some("203.0.113.9".parse().unwrap());
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(client_ip(outsider, &xff("1.1.1.1"), &trusted), outsider);
        assert_eq!(
            client_ip(lb, &xff("1.1.1.1, 2.2.2.2"), &trusted),
            ip("2.2.2.2")
        );
        assert_eq!(
            client_ip(lb, &xff("1.1.1.1, 10.9.9.9"), &trusted),
            ip("1.1.1.1")
        );
        assert_eq!(client_ip(lb, &xff("10.1.1.1"), &trusted), ip("10.1.1.1"));
        assert_eq!(
            client_ip(lb, &xff("junk, 10.1.1.1"), &trusted),
            ip("10.1.1.1")
        );
        assert_eq!(client_ip(lb, &http::HeaderMap::new(), &trusted), lb);
        assert_eq!(
            client_ip(lb, &xff(" 2001:db8::1 "), &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(client_ip(lb, &xff("1.1.1.1"), &[]), lb);
    }

    use super::*;

    #[test]
    fn equal_content_lengths_are_one_and_differing_ones_an_error() {
        let mut h = http::HeaderMap::new();
        assert_eq!(single_content_length(&h), Ok(None));
        h.append(CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(CONTENT_LENGTH, HeaderValue::from_static(" 5"));
        assert_eq!(
            single_content_length(&h),
            Ok(Some(&HeaderValue::from_static("5")))
        );
        h.append(CONTENT_LENGTH, HeaderValue::from_static("6"));
        assert_eq!(single_content_length(&h), Err(()));
    }

    #[test]
    fn underscored_and_forwarding_names_are_stripped() {
        for n in [
            "x_forwarded_for",
            "some_header",
            "x-tenant-id",
            "x-forwarded-host",
            "cookie",
        ] {
            assert!(must_strip(&HeaderName::from_static(n)), "{n}");
        }
        assert!(!must_strip(&HeaderName::from_static("content-type")));
    }
}
