//! Every response fhir-edge makes itself, in one place, and the one place where Pingora errors
//! become responses ([`from_error`]).
//!
//! Each [`Outcome`] maps to one status and one body: a FHIR `OperationOutcome` with a static
//! diagnostics text, or at the OAuth endpoints an RFC 6749 §5.2 error with a fixed description. No
//! body can echo a request (no path, query, header or token ever appears in one). The matches are
//! exhaustive: a new outcome, or a new error type, does not compile until it has a response. Auth
//! failures carry the RFC 6750 §3 challenge.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType};

use crate::auth::{AuthFailure, FailureClass};

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
    UpstreamTimeout,
    Internal,
    /// An error of the token endpoint, the JWKS, smart-configuration or client self-service.
    OAuth(OAuthError),
}

macro_rules! operation_outcome {
    ($code:literal, $text:literal) => {
        concat!(
            r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":""#,
            $code,
            r#"","diagnostics":""#,
            $text,
            r#""}]}"#
        )
    };
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

    fn body(self) -> Bytes {
        Bytes::from_static(match self {
            Outcome::OAuth(e) => return Bytes::from(e.body()),
            fhir => fhir.fhir_body().as_bytes(),
        })
    }

    fn fhir_body(self) -> &'static str {
        match self {
            // Has its own body (`body`).
            Outcome::OAuth(_) => "",
            Outcome::Auth(f) => match f.class() {
                FailureClass::NoCredentials => {
                    operation_outcome!("login", "A bearer access token is required.")
                }
                FailureClass::InvalidRequest => operation_outcome!(
                    "invalid",
                    "The request carries credentials in a form that is not accepted."
                ),
                FailureClass::InvalidToken => operation_outcome!(
                    "login",
                    "The access token is invalid, expired or not issued for this server."
                ),
                FailureClass::InsufficientScope => operation_outcome!(
                    "forbidden",
                    "The access token does not grant access to a tenant served here."
                ),
            },
            Outcome::NotFound => operation_outcome!("not-found", "No such endpoint."),
            Outcome::BadRequest => operation_outcome!("invalid", "The request is malformed."),
            Outcome::MethodNotAllowed => operation_outcome!(
                "not-supported",
                "This operation is not allowed for this tenant; only reads, searches and batches of reads are."
            ),
            Outcome::UnsupportedMediaType => operation_outcome!(
                "not-supported",
                "A batch must be a FHIR JSON Bundle."
            ),
            Outcome::NotAcceptable => operation_outcome!(
                "not-supported",
                "The CapabilityStatement is available as JSON (application/fhir+json) only."
            ),
            Outcome::UriTooLong => operation_outcome!("too-long", "The request URI is too long."),
            Outcome::HeadersTooLarge => {
                operation_outcome!("too-long", "The request headers are too large.")
            }
            Outcome::BodyTooLarge => {
                operation_outcome!("too-long", "The request body is too large.")
            }
            Outcome::UpstreamUnavailable => operation_outcome!(
                "transient",
                "The upstream FHIR server could not be reached."
            ),
            Outcome::UpstreamTimeout => operation_outcome!(
                "timeout",
                "The upstream FHIR server did not answer in time."
            ),
            Outcome::Internal => operation_outcome!("exception", "Internal error."),
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

/// The response for an error from any phase; `None` when the client connection is already dead.
pub(crate) fn from_error(e: &Error) -> Option<Outcome> {
    use ErrorType::*;
    if let HTTPStatus(code) = e.etype() {
        return Some(from_status(*code));
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

/// The outcome for an `HTTPStatus` error raised by a phase.
fn from_status(code: u16) -> Outcome {
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
pub(crate) fn upstream_error_kind(e: &Error) -> &'static str {
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

/// RFC 6749 §5.2 errors of the token endpoint and the client self-service endpoint. Descriptions are
/// fixed texts: they explain the rule that was broken and never quote the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OAuthError {
    /// 400, with what was wrong.
    InvalidRequest(&'static str),
    /// 401; `basic` when the client tried HTTP Basic (RFC 6749 §5.2: answer with a Basic challenge).
    InvalidClient {
        basic: bool,
    },
    UnsupportedGrantType,
    /// The authorization endpoint: client credentials never uses it.
    UnsupportedResponseType,
    InvalidScope,
    /// 429 with `Retry-After`.
    TooManyRequests {
        retry_after: u64,
    },
    /// 405 with `Allow`.
    MethodNotAllowed {
        allow: &'static str,
    },
    BodyTooLarge,
    NotFound,
    /// 409: the change would leave the client unable to authenticate.
    Conflict(&'static str),
    ServerError,
}

impl OAuthError {
    pub(crate) fn status(self) -> u16 {
        match self {
            OAuthError::InvalidRequest(_)
            | OAuthError::UnsupportedGrantType
            | OAuthError::UnsupportedResponseType
            | OAuthError::InvalidScope => 400,
            OAuthError::InvalidClient { .. } => 401,
            OAuthError::NotFound => 404,
            OAuthError::MethodNotAllowed { .. } => 405,
            OAuthError::Conflict(_) => 409,
            OAuthError::BodyTooLarge => 413,
            OAuthError::TooManyRequests { .. } => 429,
            OAuthError::ServerError => 500,
        }
    }

    /// Stable snake_case name, for metrics and the audit log (finer than the `error` code).
    pub(crate) fn label(self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(_) => "invalid_request",
            OAuthError::InvalidClient { .. } => "invalid_client",
            OAuthError::UnsupportedGrantType => "unsupported_grant_type",
            OAuthError::UnsupportedResponseType => "unsupported_response_type",
            OAuthError::InvalidScope => "invalid_scope",
            OAuthError::TooManyRequests { .. } => "throttled",
            OAuthError::MethodNotAllowed { .. } => "method_not_allowed",
            OAuthError::BodyTooLarge => "body_too_large",
            OAuthError::NotFound => "not_found",
            OAuthError::Conflict(_) => "conflict",
            OAuthError::ServerError => "server_error",
        }
    }

    /// The `error` code (RFC 6749 §5.2; `slow_down`-style codes are not standard, so 429 says
    /// `invalid_request` with a description and a `Retry-After`).
    pub(crate) fn code(self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(_)
            | OAuthError::MethodNotAllowed { .. }
            | OAuthError::BodyTooLarge
            | OAuthError::Conflict(_)
            | OAuthError::TooManyRequests { .. } => "invalid_request",
            OAuthError::InvalidClient { .. } => "invalid_client",
            OAuthError::UnsupportedGrantType => "unsupported_grant_type",
            OAuthError::UnsupportedResponseType => "unsupported_response_type",
            OAuthError::InvalidScope => "invalid_scope",
            OAuthError::NotFound => "not_found",
            OAuthError::ServerError => "server_error",
        }
    }

    fn description(self) -> &'static str {
        match self {
            OAuthError::InvalidRequest(d) | OAuthError::Conflict(d) => d,
            OAuthError::InvalidClient { .. } => "Client authentication failed.",
            OAuthError::UnsupportedGrantType => "Only the client_credentials grant is supported.",
            OAuthError::UnsupportedResponseType => {
                "This server issues tokens only by the client_credentials grant at its token endpoint."
            }
            OAuthError::InvalidScope => {
                "The scope must name exactly one tenant GUID that this client may use and that is served here."
            }
            OAuthError::TooManyRequests { .. } => "Too many failed authentications; retry later.",
            OAuthError::MethodNotAllowed { .. } => "Method not allowed.",
            OAuthError::BodyTooLarge => "The request body is too large.",
            OAuthError::NotFound => "No such endpoint.",
            OAuthError::ServerError => "Internal error.",
        }
    }

    /// The JSON body (RFC 6749 §5.2).
    fn body(self) -> String {
        format!(
            r#"{{"error":"{}","error_description":"{}"}}"#,
            self.code(),
            self.description()
        )
    }

    /// The headers this error adds to the usual ones.
    fn extra_headers(self, realm: &str) -> Option<(&'static str, String)> {
        match self {
            // RFC 6749 §5.2: a client that tried HTTP Basic gets a Basic challenge.
            OAuthError::InvalidClient { basic: true } => Some((
                "www-authenticate",
                format!("Basic realm=\"{realm}\", charset=\"UTF-8\""),
            )),
            OAuthError::TooManyRequests { retry_after } => {
                Some(("retry-after", retry_after.to_string()))
            }
            OAuthError::MethodNotAllowed { allow } => Some(("allow", allow.to_string())),
            _ => None,
        }
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
    fn bodies_are_valid_operation_outcomes() {
        let all = [
            Outcome::Auth(AuthFailure::Missing),
            Outcome::Auth(AuthFailure::Malformed),
            Outcome::Auth(AuthFailure::Expired),
            Outcome::Auth(AuthFailure::UnknownTenant),
            Outcome::NotFound,
            Outcome::BadRequest,
            Outcome::MethodNotAllowed,
            Outcome::UnsupportedMediaType,
            Outcome::NotAcceptable,
            Outcome::UriTooLong,
            Outcome::HeadersTooLarge,
            Outcome::BodyTooLarge,
            Outcome::UpstreamUnavailable,
            Outcome::UpstreamTimeout,
            Outcome::Internal,
        ];
        for o in all {
            let v: serde_json::Value = serde_json::from_slice(&o.body()).unwrap();
            assert_eq!(v["resourceType"], "OperationOutcome");
            assert_eq!(v["issue"][0]["severity"], "error");
            assert!(v["issue"][0]["code"].is_string());
        }
    }

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
