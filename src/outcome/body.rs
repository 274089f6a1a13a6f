//! The body of each [`Outcome`]: a FHIR `OperationOutcome` with a static diagnostics text, or the
//! RFC 6749 §5.2 error body of an [`OAuthError`](super::OAuthError).

use bytes::Bytes;

use super::Outcome;
use crate::auth::FailureClass;

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

impl Outcome {
    pub(super) fn body(self) -> Bytes {
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
            Outcome::TenantUnavailable => operation_outcome!(
                "transient",
                "The tenant's FHIR server cannot be reached now. Try again later."
            ),
            Outcome::UpstreamsDown { .. } => operation_outcome!(
                "transient",
                "Every FHIR server of this tenant is failing and out of rotation. Retry after the time in Retry-After."
            ),
            Outcome::Throttled(_) => operation_outcome!(
                "throttled",
                "Too many requests for this tenant or client. Retry after the time in Retry-After."
            ),
            Outcome::TooManyConnections => operation_outcome!(
                "transient",
                "Too many open connections. Retry after the time in Retry-After."
            ),
            Outcome::UpstreamTimeout => operation_outcome!(
                "timeout",
                "The upstream FHIR server did not answer in time."
            ),
            Outcome::Internal => operation_outcome!("exception", "Internal error."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthFailure;

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
            Outcome::TenantUnavailable,
            Outcome::UpstreamsDown { retry_after: 3 },
            Outcome::Throttled(crate::routing::limits::Throttled {
                limit: crate::routing::limits::Limit::Rate,
                retry_after: 1,
            }),
            Outcome::TooManyConnections,
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
}
