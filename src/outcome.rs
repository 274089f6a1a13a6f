//! Every response fhir-edge makes itself, in one place.
//!
//! Each [`Outcome`] maps to one status, one FHIR `OperationOutcome` issue code and one static
//! diagnostics text; the bodies are compile-time constants, so an error response can never echo a
//! request (no path, query, header or token ever appears in one). The match is exhaustive: a new
//! outcome does not compile until it has a response. Auth failures carry the RFC 6750 §3 challenge.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::auth::{AuthFailure, FailureClass};

/// A response made by the proxy rather than an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Auth(AuthFailure),
    /// The path is not below the public base.
    NotFound,
    /// The path is below the base but breaks the path grammar, or the request is malformed.
    BadRequest,
    /// A write on a read-only route, or a batch carrying writes.
    MethodNotAllowed,
    /// `POST {base}` whose body is not a JSON Bundle we can check.
    UnsupportedMediaType,
    UriTooLong,
    HeadersTooLarge,
    BodyTooLarge,
    /// The upstream refused, reset or broke the exchange before a response started.
    UpstreamUnavailable,
    UpstreamTimeout,
    Internal,
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
    pub fn status(self) -> u16 {
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
            Outcome::UriTooLong => 414,
            Outcome::HeadersTooLarge => 431,
            Outcome::BodyTooLarge => 413,
            Outcome::UpstreamUnavailable => 502,
            Outcome::UpstreamTimeout => 504,
            Outcome::Internal => 500,
        }
    }

    fn body(self) -> &'static str {
        match self {
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

    /// The response header for this outcome.
    pub fn header(self, realm: &str, request_id: &str) -> pingora::Result<ResponseHeader> {
        let body = self.body();
        let mut h = ResponseHeader::build(self.status(), Some(6))?;
        h.insert_header("content-type", "application/fhir+json")?;
        // Required: without Content-Length a keep-alive client waits for a body end that never comes.
        h.insert_header("content-length", body.len().to_string())?;
        h.insert_header("cache-control", "no-store")?;
        if !request_id.is_empty() {
            h.insert_header("x-request-id", request_id)?;
        }
        if let Some(c) = self.challenge(realm) {
            h.insert_header("www-authenticate", c)?;
        }
        if self == Outcome::MethodNotAllowed {
            h.insert_header("allow", ALLOW)?;
        }
        Ok(h)
    }

    /// Writes this outcome as the whole response (no body for `HEAD`). With `close`, the connection
    /// is not kept alive afterwards (and the response says `Connection: close`).
    pub async fn respond(
        self,
        session: &mut Session,
        realm: &str,
        request_id: &str,
        close: bool,
    ) -> pingora::Result<()> {
        let header = self.header(realm, request_id)?;
        if close {
            // Pingora writes the Connection header from the session's keep-alive state.
            session.set_keepalive(None);
        }
        let head = session.req_header().method == http::Method::HEAD;
        session
            .write_response_header(Box::new(header), head)
            .await?;
        if !head {
            session
                .write_response_body(Some(Bytes::from_static(self.body().as_bytes())), true)
                .await?;
        }
        Ok(())
    }
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
            Outcome::UriTooLong,
            Outcome::HeadersTooLarge,
            Outcome::BodyTooLarge,
            Outcome::UpstreamUnavailable,
            Outcome::UpstreamTimeout,
            Outcome::Internal,
        ];
        for o in all {
            let v: serde_json::Value = serde_json::from_str(o.body()).unwrap();
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
