//! fhir-edge as an OAuth 2.0 authorization server for the client-credentials grant (RFC 6749 §4.4).
//!
//! The Teams EHR integration makes the interop partner the authorization server: the cloud client
//! holds a `client_id`/`client_secret`, asks the token endpoint for a token with its customer's tenant
//! GUID in `scope`, and can regenerate its secret and invalidate the old one. This module owns that:
//! the signing keys ([`keys`]), the client registry ([`clients`]) and its secrets ([`secrets`]),
//! the token endpoint ([`endpoint`]), the self-service secret management ([`manage`]) and the
//! throttling of failed authentications ([`limiter`]). Tokens it issues are verified by [`crate::auth`] like any other issuer's, plus a
//! check against the live registry so revoked secrets and removed clients stop working at once.

pub(crate) mod clients;
pub(crate) mod endpoint;
pub(crate) mod keys;
pub(crate) mod limiter;
pub(crate) mod manage;
pub(crate) mod secrets;
pub(crate) mod usage;

use std::time::Duration;

/// The validated `token_endpoint` section of the config.
pub(crate) struct TokenSettings {
    /// Path of the token endpoint below the public base (`/token`).
    pub path: String,
    /// Absolute URL advertised to clients.
    pub url: String,
    /// The `authorize` URI advertised in discovery (client credentials never uses it; by default an
    /// endpoint of fhir-edge that answers `unsupported_response_type`).
    pub authorize_url: String,
    /// Path of the self-service registration management endpoint below the public base (`/register`).
    pub management_path: String,
    pub issuer: String,
    pub audience: String,
    pub lifetime: Duration,
    pub keys: keys::SigningKeys,
    /// Where the client registry lives.
    pub clients: clients::StoreConfig,
    /// Accept `grant-type` when `grant_type` is absent (the Teams document's spelling in one example).
    pub grant_type_hyphen_alias: bool,
    pub failed_auth: limiter::Limits,
}
