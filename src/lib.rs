//! # fhir-edge
//!
//! A multi-tenant edge proxy for FHIR, built on Cloudflare's [Pingora]. An interop partner exposes many
//! hospitals' FHIR servers to one cloud client (the Microsoft Teams Patients app) through one public
//! endpoint; fhir-edge is that endpoint.
//!
//! ## One request
//! 1. `proxy::FhirEdge::request_filter` checks size limits, then
//!    classifies the raw path once (`fhir::classify`): `GET|HEAD {base}/metadata` (byte-exact) is answered by
//!    `fhir::discovery` (the upstream CapabilityStatement with SMART `oauth-uris` for fhir-edge's token
//!    endpoint); the token endpoint, JWKS, smart-configuration and client self-service are answered by
//!    `token`; everything else needs a bearer token.
//! 2. The token is extracted and verified (`auth`): the key chosen by `kid` fixes the algorithm,
//!    issuer and audience. The tenant GUID comes from the verified `scope` claim and from nothing else.
//! 3. The tenant's `routing::Route` is taken from one snapshot of the hot-reloaded routing table and
//!    kept in the request context for every later phase. Unknown tenant: 403, no default route.
//! 4. Path grammar and method policy (`fhir::classify`); `POST {base}` on a read-only route must be a batch
//!    of reads (`fhir::batch`).
//! 5. `upstream_peer` clones the peer built when the table loaded; `upstream_request_filter` sets the
//!    upstream target (route base path + path + raw query, byte-exact), `Host`, forwarding headers and
//!    the route's upstream headers, and drops the client's credentials and forwarding claims.
//! 6. Responses: upstream base URLs in `Location` headers and JSON bodies are rewritten to the public
//!    base as they stream (`fhir::rewrite`).
//! 7. Every error from any phase becomes a FHIR `OperationOutcome` (or, at the OAuth endpoints, an RFC
//!    6749 error) in `outcome`.
//!
//! ## Mounting it in another Pingora server
//! [`Edge`] is the public API: build it from [`Settings`] (a file, or constructed in code) and add it to
//! your own `pingora::server::Server` with one call; `examples/embed.rs` mounts it beside a service of
//! its own. The library installs nothing process-wide: call [`install_crypto_provider`] (optional, the
//! faster JWT verification) and [`init_logging`] (or your own logger) yourself.
//! ```no_run
//! let mut settings = fhir_edge::Settings::from_file("conf/fhir-edge.yaml".as_ref())?;
//! settings.listen = vec!["127.0.0.1:8080".into()];
//! let edge = fhir_edge::Edge::new(settings)?;
//! let mut server = pingora::server::Server::new_with_opt_and_conf(None, edge.server_conf());
//! server.bootstrap();
//! edge.add_to(&mut server)?;
//! server.run_forever();
//! # #[allow(unreachable_code)]
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [Pingora]: https://github.com/cloudflare/pingora

#[cfg(all(feature = "aws-lc", feature = "rust-crypto"))]
compile_error!("enable exactly one JWT crypto backend: `aws-lc` (default) or `rust-crypto`");
#[cfg(not(any(feature = "aws-lc", feature = "rust-crypto")))]
compile_error!("enable a JWT crypto backend: `aws-lc` (default) or `rust-crypto`");

pub(crate) mod atomic_file;
pub(crate) mod auth;
pub mod cli;
pub(crate) mod config;
pub(crate) mod db;
pub(crate) mod edge;
pub(crate) mod fhir;
pub(crate) mod memory;
pub(crate) mod ops;
pub(crate) mod outcome;
pub(crate) mod portal;
pub(crate) mod proxy;
pub(crate) mod reload;
pub(crate) mod routing;
pub(crate) mod tenant;
pub(crate) mod time;
pub(crate) mod tls;
pub(crate) mod token;

pub use config::problems::{Problem, Problems};
pub use config::settings::{
    AdminSettings, AuthSettings, CertificateSettings, ClientsSettings, DatabaseSettings,
    FailedAuthSettings, FetchSettings, IssuerKeySettings, IssuerSettings, IssuerTenants,
    LimitSettings, LogSettings, LoginThrottleSettings, PortalSettings, ScopeClaim, ServerSettings,
    Settings, TlsListenerSettings, TokenEndpointSettings,
};
pub use edge::{Edge, EdgeError};
pub use ops::logging::LogFormat;

/// Installs fhir-edge's JWT crypto provider process-wide (aws-lc-rs with RSA and ECDSA keys parsed once
/// instead of per token); true when it is the one in use. Optional: without it jsonwebtoken's own
/// provider for the same backend verifies the same tokens, more slowly. Call it before anything uses
/// jsonwebtoken.
pub fn install_crypto_provider() -> bool {
    auth::install_crypto()
}

/// Installs fhir-edge's process logger (one line per record on stderr, Pingora's records that could
/// carry request bytes fenced off). An embedder may use its own logger instead.
pub fn init_logging(level: log::LevelFilter) {
    ops::logging::init(level, LogFormat::Text)
}

/// As [`init_logging`], in the given line format (`log.format` in the config file).
pub fn init_logging_as(level: log::LevelFilter, format: LogFormat) {
    ops::logging::init(level, format)
}

/// Not API: the internals that the fuzz targets (`fuzz/`), the benchmarks (`benches/`) and a few tests
/// drive directly. No stability promise; an embedder uses [`Edge`] and [`Settings`].
#[doc(hidden)]
pub mod internals {
    pub mod auth {
        pub use crate::auth::jwt::{Verifier, VerifyKey};
        pub use crate::auth::{authenticate, install_crypto, TokenCache};
        pub mod bearer {
            pub use crate::auth::bearer::extract;
        }
        pub mod scope {
            pub use crate::auth::scope::{tenant_from_scope, tenant_in};
        }
    }
    pub mod config {
        pub use crate::config::RouteDefaults;
        pub mod limits {
            pub use crate::config::limits::{ClientLimitSpec, LimitSpec, TenantLimits};
        }
    }
    pub mod fhir {
        pub mod classify {
            pub use crate::fhir::classify::{
                fhir_remainder, is_public_metadata, own_endpoint, route_template, split_target,
                OwnEndpoint,
            };
        }
        pub mod rewrite {
            pub use crate::fhir::rewrite::Rewrites;
        }
        pub mod vocabulary {
            pub use crate::fhir::vocabulary::{keyword_or_operation, resource_type};
        }
    }
    pub mod ops {
        pub mod metrics {
            pub use crate::ops::metrics::TenantLabel;
        }
    }
    pub mod proxy {
        pub mod deadline {
            pub use crate::proxy::deadline::BlankLine;
        }
    }
    pub mod reload {
        pub use crate::reload::{Live, Loadable, ReloadOutcome};
        pub mod parse {
            pub use crate::reload::parse::{parse, Syntax};
        }
        pub mod read {
            pub use crate::reload::read::fingerprint;
        }
    }
    pub mod routing {
        pub use crate::routing::{RoutingTable, TableContext};
        pub mod limits {
            pub use crate::routing::limits::LimiterRegistry;
        }
    }
    pub mod tenant {
        pub use crate::tenant::TenantId;
    }
    pub mod token {
        pub mod clients {
            pub use crate::token::clients::ClientRegistry;
        }
        pub mod keys {
            pub use crate::token::keys::SigningKey;
        }
    }
}
