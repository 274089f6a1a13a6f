//! [`OAuthError`]: the RFC 6749 §5.2 errors of the token endpoint and the client self-service
//! endpoint, with their status, label, `error` code, body and extra headers.

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
    /// 503 with `Retry-After`: the client registry's database cannot be reached or written (RFC 6749
    /// §4.1.2.1's `temporarily_unavailable`).
    Unavailable,
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
            OAuthError::Unavailable => 503,
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
            OAuthError::Unavailable => "registry_unavailable",
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
            OAuthError::Unavailable => "temporarily_unavailable",
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
            OAuthError::Unavailable => {
                "The client registry cannot be changed or read right now; retry later."
            }
        }
    }

    /// The JSON body (RFC 6749 §5.2).
    pub(super) fn body(self) -> String {
        format!(
            r#"{{"error":"{}","error_description":"{}"}}"#,
            self.code(),
            self.description()
        )
    }

    /// The headers this error adds to the usual ones.
    pub(super) fn extra_headers(self, realm: &str) -> Option<(&'static str, String)> {
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
            OAuthError::Unavailable => Some(("retry-after", "5".to_string())),
            _ => None,
        }
    }
}
