//! Every response fhir-edge makes itself, in one place, and the one place where Pingora errors
//! become responses ([`from_error`]).
//!
//! Each [`Outcome`] maps to one status and one body: a FHIR `OperationOutcome` with a static
//! diagnostics text, or at the OAuth endpoints an RFC 6749 §5.2 error with a fixed description. No
//! body can echo a request (no path, query, header or token ever appears in one). The matches are
//! exhaustive: a new outcome, or a new error type, does not compile until it has a response. Auth
//! failures carry the RFC 6750 §3 challenge.
//!
//! This file owns [`Outcome`], its status, label and headers, and the writing of a response. The rest:
//!
//! - [`body`]: the body of each outcome (an `OperationOutcome`, or the OAuth error's own).
//! - [`oauth`]: [`OAuthError`], the RFC 6749 §5.2 errors of the OAuth endpoints, and their bodies.
//! - [`pingora_error`]: Pingora errors as outcomes ([`from_error`]) and as upstream-failure kinds for
//!   metrics ([`upstream_error_kind`]).

mod body;
mod oauth;
mod pingora_error;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::auth::{AuthFailure, FailureClass};
pub(crate) use oauth::OAuthError;
pub(crate) use pingora_error::{from_error, upstream_error_kind};

/// A response made by the proxy rather than an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Auth(AuthFailure),
    /// The path is not below the public base.
    NotFound,
    /// The path is below the base but breaks the path grammar, or the request is malformed.
    BadRequest,
    /// A write on a read-only route, or a batch carrying writes.
    MethodNotAllowed,
    /// `POST {base}` whose body is not a JSON Bundle we can check.
    UnsupportedMediaType,
    /// `/metadata` asked for in a format other than JSON.
    NotAcceptable,
    UriTooLong,
    HeadersTooLarge,
    BodyTooLarge,
    /// The upstream refused, reset or broke the exchange before a response started.
    UpstreamUnavailable,
    /// The tenant's upstream host did not resolve when the routing table was built.
    TenantUnavailable,
    /// Every node of the tenant is out of rotation; the first is due back in `retry_after` s.
    UpstreamsDown {
        retry_after: u32,
    },
    /// Over one of the tenant's limits (429).
    Throttled(crate::routing::limits::Throttled),
    /// A new connection over a connection bound, with no idle connection to make room.
    TooManyConnections,
    UpstreamTimeout,
    Internal,
    /// An error of the token endpoint, the JWKS, smart-configuration or client self-service.
    OAuth(OAuthError),
}

/// Methods a read-only route accepts (the `Allow` header of a 405).
const ALLOW: &str = "GET, HEAD, POST";

impl Outcome {
    pub(crate) fn status(self) -> u16 {
        match self {
            Outcome::Auth(f) => match f.class() {
                FailureClass::NoCredentials | FailureClass::InvalidToken => 401,
                FailureClass::InvalidRequest => 400,
                FailureClass::InsufficientScope => 403,
            },
            Outcome::NotFound => 404,
            Outcome::BadRequest => 400,
            Outcome::MethodNotAllowed => 405,
            Outcome::UnsupportedMediaType => 415,
            Outcome::NotAcceptable => 406,
            Outcome::UriTooLong => 414,
            Outcome::HeadersTooLarge => 431,
            Outcome::BodyTooLarge => 413,
            Outcome::UpstreamUnavailable => 502,
            Outcome::TenantUnavailable => 503,
            Outcome::UpstreamsDown { .. } => 503,
            Outcome::Throttled(_) => 429,
            Outcome::TooManyConnections => 503,
            Outcome::UpstreamTimeout => 504,
            Outcome::Internal => 500,
            Outcome::OAuth(e) => e.status(),
        }
    }

    /// Stable snake_case name, for the audit log.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Auth(f) => f.as_str(),
            Outcome::NotFound => "not_found",
            Outcome::BadRequest => "bad_request",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::UnsupportedMediaType => "unsupported_media_type",
            Outcome::NotAcceptable => "not_acceptable",
            Outcome::UriTooLong => "uri_too_long",
            Outcome::HeadersTooLarge => "headers_too_large",
            Outcome::BodyTooLarge => "body_too_large",
            Outcome::UpstreamUnavailable => "upstream_unavailable",
            Outcome::TenantUnavailable => "tenant_unavailable",
            Outcome::UpstreamsDown { .. } => "upstreams_down",
            Outcome::Throttled(t) => match t.limit {
                crate::routing::limits::Limit::Rate => "throttled_rate",
                crate::routing::limits::Limit::InFlight => "throttled_in_flight",
                crate::routing::limits::Limit::ClientRate => "throttled_client_rate",
            },
            Outcome::TooManyConnections => "too_many_connections",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::Internal => "internal",
            Outcome::OAuth(e) => e.label(),
        }
    }

    /// The authentication failure behind this outcome, if it is one.
    pub(crate) fn auth_failure(self) -> Option<AuthFailure> {
        match self {
            Outcome::Auth(f) => Some(f),
            _ => None,
        }
    }

    /// The RFC 6750 §3 challenge, if this outcome carries one.
    fn challenge(self, realm: &str) -> Option<String> {
        let Outcome::Auth(f) = self else { return None };
        Some(match f.class() {
            // §3.1: no error code when the request had no credentials.
            FailureClass::NoCredentials => format!("Bearer realm=\"{realm}\""),
            FailureClass::InvalidRequest => {
                format!("Bearer realm=\"{realm}\", error=\"invalid_request\"")
            }
            FailureClass::InvalidToken => {
                format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
            }
            FailureClass::InsufficientScope => {
                format!("Bearer realm=\"{realm}\", error=\"insufficient_scope\"")
            }
        })
    }

    /// The response header for this outcome, whose body is `body_len` bytes.
    fn header(
        self,
        realm: &str,
        request_id: &str,
        body_len: usize,
    ) -> pingora::Result<ResponseHeader> {
        let mut h = ResponseHeader::build(self.status(), Some(7))?;
        let content_type = match self {
            Outcome::OAuth(_) => "application/json",
            _ => "application/fhir+json",
        };
        h.insert_header("content-type", content_type)?;
        // Required: without Content-Length a keep-alive client waits for a body end that never comes.
        h.insert_header("content-length", body_len.to_string())?;
        h.insert_header("cache-control", "no-store")?;
        if !request_id.is_empty() {
            h.insert_header("x-request-id", request_id)?;
        }
        if let Some(c) = self.challenge(realm) {
            h.insert_header("www-authenticate", c)?;
        }
        match self {
            Outcome::MethodNotAllowed => h.insert_header("allow", ALLOW)?,
            // RFC 9110 §10.2.3, RFC 6585 §4: when to come back.
            Outcome::Throttled(crate::routing::limits::Throttled { retry_after, .. })
            | Outcome::UpstreamsDown { retry_after } => {
                h.insert_header("retry-after", retry_after.to_string())?
            }
            Outcome::TooManyConnections => h.insert_header("retry-after", "1")?,
            // RFC 6749 §5.1: token endpoint responses, errors included, are not cached.
            Outcome::OAuth(e) => {
                h.insert_header("pragma", "no-cache")?;
                if let Some((name, value)) = e.extra_headers(realm) {
                    h.insert_header(name, value)?;
                }
            }
            _ => {}
        }
        Ok(h)
    }

    /// Writes this outcome as the whole response (no body for `HEAD`). With `close`, the connection
    /// is not kept alive afterwards (and the response says `Connection: close`).
    pub(crate) async fn respond(
        self,
        session: &mut Session,
        realm: &str,
        request_id: &str,
        close: bool,
    ) -> pingora::Result<()> {
        let body = self.body();
        let header = self.header(realm, request_id, body.len())?;
        if close {
            // Pingora writes the Connection header from the session's keep-alive state.
            session.set_keepalive(None);
        }
        let head = session.req_header().method == http::Method::HEAD;
        session
            .write_response_header(Box::new(header), head)
            .await?;
        if !head {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// This outcome as the bytes of a complete HTTP/1.1 response that closes the connection, for a
    /// connection refused before Pingora has parsed a request (so there is no session to answer on).
    pub(crate) fn closing_response(self) -> Vec<u8> {
        let body = self.body();
        let mut wire = Vec::with_capacity(256 + body.len());
        if let Ok(mut h) = self.header("", "", body.len()) {
            if h.insert_header("connection", "close").is_ok() {
                let reason = h.status.canonical_reason().unwrap_or("");
                wire.extend_from_slice(
                    format!("HTTP/1.1 {} {reason}\r\n", h.status.as_u16()).as_bytes(),
                );
                h.header_to_h1_wire(&mut wire);
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(&body);
            }
        }
        wire
    }
}

/// Writes a complete JSON response that must not be cached (token responses, JWKS, client
/// management, OAuth errors). No body for `HEAD`.
pub(crate) async fn respond_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    request_id: &str,
    extra: &[(&str, String)],
) -> pingora::Result<()> {
    let mut h = ResponseHeader::build(status, Some(6 + extra.len()))?;
    h.insert_header("content-type", "application/json")?;
    h.insert_header("content-length", body.len().to_string())?;
    h.insert_header("cache-control", "no-store")?;
    h.insert_header("pragma", "no-cache")?;
    if !request_id.is_empty() {
        h.insert_header("x-request-id", request_id)?;
    }
    for (name, value) in extra {
        h.insert_header(name.to_string(), value.as_str())?;
    }
    let head = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(h), head || body.is_empty())
        .await?;
    if !head && !body.is_empty() {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_unroutable_tenants_get_the_same_response() {
        let a = Outcome::Auth(AuthFailure::NoTenant);
        let b = Outcome::Auth(AuthFailure::UnknownTenant);
        assert_eq!(
            (a.status(), a.body(), a.challenge("r")),
            (b.status(), b.body(), b.challenge("r"))
        );
    }
}
