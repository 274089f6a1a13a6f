//! Authentication of resource requests: bearer extraction → JWT verification → tenant from scope.
//!
//! The result is either the verified [`Grant`] (tenant plus the claims worth logging) or an
//! [`AuthFailure`] whose variant is the reason (for metrics and logs) and whose class decides the
//! response (RFC 6750 §3.1): no credentials → 401 without an error code; a malformed request → 400
//! `invalid_request`; a bad token → 401 `invalid_token`; a good token that grants no routable tenant →
//! 403 `insufficient_scope`.

pub(crate) mod bearer;
pub(crate) mod cache;
pub(crate) mod claims;
pub(crate) mod issuer;
pub(crate) mod jwt;
pub(crate) mod keys;
#[cfg(feature = "aws-lc")]
pub(crate) mod parsed_keys;
pub(crate) mod remote;
pub(crate) mod scope;

use std::sync::Arc;

use http::HeaderMap;

use crate::tenant::TenantId;
pub use cache::TokenCache;
pub(crate) use jwt::{Refused, Verifier};

/// Makes jsonwebtoken use fhir-edge's crypto provider, which keeps RSA and ECDSA keys parsed (see
/// `parsed_keys`). Process-wide, so the library never calls it itself: the binary's `main` does,
/// first ([`crate::install_crypto_provider`]); without it jsonwebtoken's own provider for the same
/// backend verifies the same tokens. Idempotent. Returns whether the provider is in use (never with
/// the `rust-crypto` backend).
pub fn install_crypto() -> bool {
    #[cfg(feature = "aws-lc")]
    {
        parsed_keys::install()
    }
    #[cfg(not(feature = "aws-lc"))]
    {
        false
    }
}

/// Why a request was not authenticated. Each variant is one bounded label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A malformed `Authorization` header, two of them, or a token in the query string.
    Malformed,
    /// The token is longer than the configured bound.
    TooLarge,
    /// Not a compact JWS, bad base64 or JSON, an unsupported `alg`, a claim of the wrong type.
    Malformed401,
    /// `typ` is neither `at+jwt` nor `JWT`.
    WrongType,
    /// No configured key for this `kid` (or, without a `kid`, no single key for this `alg`).
    UnknownKey,
    /// The signature does not verify, or the header's `alg` is not the key's.
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    /// `exp`, `iss` or `aud` is missing.
    MissingClaim,
    /// The scope names no tenant, several, or one in a non-canonical spelling.
    NoTenant,
    /// The tenant is not in the routing table.
    UnknownTenant,
    /// The token's issuer may not grant the tenant it names.
    IssuerTenant,
    /// A token of fhir-edge's own issuer whose client was removed or disabled, whose secret was
    /// revoked, or whose tenant the client may no longer use.
    Revoked,
}

/// The response class of a failure (RFC 6750 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// 401, challenge without an error code.
    NoCredentials,
    /// 400 `invalid_request`.
    InvalidRequest,
    /// 401 `invalid_token`.
    InvalidToken,
    /// 403 `insufficient_scope`.
    InsufficientScope,
}

impl AuthFailure {
    pub fn class(self) -> FailureClass {
        use AuthFailure::*;
        match self {
            Missing => FailureClass::NoCredentials,
            Malformed => FailureClass::InvalidRequest,
            TooLarge | Malformed401 | WrongType | UnknownKey | BadSignature | Expired
            | NotYetValid | WrongIssuer | WrongAudience | MissingClaim | Revoked => {
                FailureClass::InvalidToken
            }
            NoTenant | UnknownTenant | IssuerTenant => FailureClass::InsufficientScope,
        }
    }

    /// Stable snake_case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        use AuthFailure::*;
        match self {
            Missing => "missing",
            Malformed => "malformed",
            TooLarge => "too_large",
            Malformed401 => "malformed_token",
            WrongType => "wrong_typ",
            UnknownKey => "unknown_kid",
            BadSignature => "bad_signature",
            Expired => "expired",
            NotYetValid => "not_yet_valid",
            WrongIssuer => "wrong_issuer",
            WrongAudience => "wrong_audience",
            MissingClaim => "missing_claim",
            NoTenant => "no_tenant",
            UnknownTenant => "unknown_tenant",
            IssuerTenant => "issuer_not_for_tenant",
            Revoked => "revoked",
        }
    }
}

/// What a verified token grants: what the request needs from it, taken once from the claims (and
/// kept in the [`TokenCache`] for the token's next requests).
#[derive(Debug)]
pub struct Grant {
    pub tenant: TenantId,
    /// Issued by fhir-edge's own token endpoint (then also checked against the client registry).
    pub own: bool,
    /// The client the token was issued to: its `client_id` claim, else `azp`, else `appid` (see
    /// [`claims::Claims::client`]); never `sub`, which may name a person.
    pub client_id: Option<String>,
    /// Which client secret authenticated the token request (own tokens).
    pub secret_id: Option<String>,
    /// Short non-reversible hash of `jti`, for the audit log.
    pub jti_hash: Option<String>,
    /// `exp` and `nbf`, for re-checking a cached grant.
    pub expires: u64,
    pub not_before: Option<u64>,
}

/// How a grant was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Found in the token cache (signature not checked again).
    Hit,
    /// Verified now (and cached, if the cache is on).
    Miss,
    /// Verified now; the cache is off.
    Uncached,
}

/// Authenticates one request from its headers and raw query string, through `cache` when it is on.
pub fn authenticate(
    verifier: &Verifier,
    cache: &TokenCache,
    headers: &HeaderMap,
    query: Option<&[u8]>,
    max_token_bytes: usize,
) -> Result<Arc<Grant>, AuthFailure> {
    authenticate_with(verifier, cache, headers, query, max_token_bytes)
        .map(|(g, _)| g)
        .map_err(|r| r.failure())
}

/// [`authenticate`], also saying whether the cache answered.
pub(crate) fn authenticate_with(
    verifier: &Verifier,
    cache: &TokenCache,
    headers: &HeaderMap,
    query: Option<&[u8]>,
    max_token_bytes: usize,
) -> Result<(Arc<Grant>, Lookup), Refused> {
    // RFC 6750 §2.3 tokens in the URI are refused even beside a header: they leak into logs.
    if query.is_some_and(bearer::query_has_access_token) {
        return Err(AuthFailure::Malformed.into());
    }
    let token = bearer::extract(headers, max_token_bytes)?;
    let key = cache.key(token);
    if let Some(key) = &key {
        if let Some(hit) = cache.get(key, crate::time::now_unix()) {
            return hit.map(|g| (g, Lookup::Hit)).map_err(Refused::Failed);
        }
    }
    let (claims, issuer) = verifier.check(token)?;
    let own = issuer.spec.own;
    let tenant = issuer.tenant(&claims)?;
    let grant = Arc::new(Grant {
        tenant,
        own,
        client_id: claims.client(),
        secret_id: claims.secret_id,
        jti_hash: claims.jti.as_deref().map(crate::ops::audit::jti_hash),
        // `as` saturates: NaN and negatives become 0. `exp` rounds down, `nbf` up, so a cached
        // grant is never more permissive than the verifier.
        expires: claims.exp.map_or(0, |e| e.floor() as u64),
        not_before: claims.nbf.map(|n| n.ceil() as u64),
    });
    // `exp` is a required claim, so `None` cannot pass the verifier; never cache without it anyway.
    match (key, claims.exp) {
        (Some(key), Some(_)) => {
            cache.insert(key, grant.clone());
            Ok((grant, Lookup::Miss))
        }
        (Some(_), None) => Ok((grant, Lookup::Miss)),
        (None, _) => Ok((grant, Lookup::Uncached)),
    }
}
