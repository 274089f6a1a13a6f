//! Pingora errors as responses: [`from_error`], the one place an error from any phase becomes an
//! [`Outcome`], and [`upstream_error_kind`], the kind of an upstream failure for metrics.

use pingora::{Error, ErrorSource, ErrorType};

use super::Outcome;

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
