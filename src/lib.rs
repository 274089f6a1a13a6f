//! # fhir-edge
//!
//! A multi-tenant edge proxy for FHIR, built on Cloudflare's [Pingora]. An interop partner exposes many
//! hospitals' FHIR servers to one cloud client (the Microsoft Teams Patients app) through one public
//! endpoint; fhir-edge is that endpoint.
//!
//! ## One request
//! 1. [`proxy::FhirEdge::request_filter`](pingora::proxy::ProxyHttp::request_filter) checks size limits, then
//!    classifies the raw path once ([`fhir::classify`]): `GET|HEAD {base}/metadata` (byte-exact) is answered by
//!    [`fhir::discovery`] (the upstream CapabilityStatement with SMART `oauth-uris` for fhir-edge's token
//!    endpoint); the token endpoint, JWKS, smart-configuration and client self-service are answered by
//!    [`token`]; everything else needs a bearer token.
//! 2. The token is extracted and verified ([`auth`]): the key chosen by `kid` fixes the algorithm,
//!    issuer and audience. The tenant GUID comes from the verified `scope` claim and from nothing else.
//! 3. The tenant's [`routing::Route`] is taken from one snapshot of the hot-reloaded routing table and
//!    kept in the request context for every later phase. Unknown tenant: 403, no default route.
//! 4. Path grammar and method policy ([`fhir::classify`]); `POST {base}` on a read-only route must be a batch
//!    of reads ([`fhir::batch`]).
//! 5. `upstream_peer` clones the peer built when the table loaded; `upstream_request_filter` sets the
//!    upstream target (route base path + path + raw query, byte-exact), `Host`, forwarding headers and
//!    the route's upstream headers, and drops the client's credentials and forwarding claims.
//! 6. Responses: upstream base URLs in `Location` headers and JSON bodies are rewritten to the public
//!    base as they stream ([`fhir::rewrite`]).
//! 7. Every error from any phase becomes a FHIR `OperationOutcome` (or, at the OAuth endpoints, an RFC
//!    6749 error) in [`outcome`].
//!
//! ## Mounting it in another Pingora server
//! ```no_run
//! use std::path::Path;
//! let settings = fhir_edge::config::Settings::load(Path::new("conf/fhir-edge.yaml")).unwrap();
//! fhir_edge::ops::logging::init(settings.log_level);
//! let server = fhir_edge::edge::build(settings, Default::default()).unwrap();
//! server.run_forever();
//! ```
//! [`edge::build`] shows how the pieces fit: [`proxy::FhirEdge`] is a plain `ProxyHttp` and
//! [`reload::Reloader`] a plain `BackgroundService`, so another server can add both to its own.
//!
//! [Pingora]: https://github.com/cloudflare/pingora

#[cfg(all(feature = "aws-lc", feature = "rust-crypto"))]
compile_error!("enable exactly one JWT crypto backend: `aws-lc` (default) or `rust-crypto`");
#[cfg(not(any(feature = "aws-lc", feature = "rust-crypto")))]
compile_error!("enable a JWT crypto backend: `aws-lc` (default) or `rust-crypto`");

pub mod auth;
pub mod config;
pub mod edge;
pub mod fhir;
pub mod memory;
pub mod ops;
pub mod outcome;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod tenant;
pub mod time;
pub mod token;
