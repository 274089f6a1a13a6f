//! Discovery: `GET {base}/metadata` and `GET {base}/.well-known/smart-configuration`.
//!
//! The Teams client reads the token URL from the CapabilityStatement's SMART `oauth-uris` security
//! extension (Teams EHR integration document; SMART App Launch). fhir-edge takes the statement from the
//! metadata upstream (or a file), and **adds or replaces** `rest[*].security` — the `oauth-uris`
//! extension with absolute `token`, `authorize` and `register` URIs, and `service` with the coding the
//! Teams document shows plus the canonical one — points `implementation.url` at the public base,
//! rewrites upstream base URLs, and keeps everything else. A statement that strict clients would
//! reject must not leave the proxy silently: the known R4 slip of `profile` given as a Reference is
//! repaired, and whatever still breaks the required R4 shape makes the fetch fail (logged), so the last
//! good copy keeps being served.
//!
//! The built statement is cached for `metadata_ttl_seconds`. When it expires, one request refreshes
//! it while the others keep getting the cached copy; when the upstream fails, the last good copy is
//! served (stale-if-error); only when there has never been one does `/metadata` answer 502.
//!
//! `.well-known/smart-configuration` says the same as the statement's `oauth-uris` (some clients race
//! it against `/metadata` and take whichever answers first, so the two must agree).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use serde_json::{json, Value};

use crate::ops::metrics::Metrics;
use crate::routing::upstream::Upstream;

pub(crate) use super::capability::transform;

/// Largest upstream CapabilityStatement accepted (real ones are a few hundred KB).
const MAX_STATEMENT_BYTES: usize = 16 * 1024 * 1024;

/// The absolute URLs advertised to clients.
#[derive(Debug, Clone)]
pub(crate) struct SecurityUris {
    pub token: String,
    pub authorize: String,
    pub register: String,
    pub jwks: String,
    pub issuer: String,
}

/// Where the CapabilityStatement comes from.
pub(crate) enum Source {
    Upstream(Box<Upstream>),
    /// A statement read from a file at start-up (already parsed).
    File(Value),
}

struct Cached {
    body: Bytes,
    fetched: Instant,
}

/// Builds, caches and serves the discovery documents.
pub(crate) struct Discovery {
    source: Source,
    ttl: Duration,
    public_base: String,
    security: Option<SecurityUris>,
    cache: ArcSwapOption<Cached>,
    refresh: tokio::sync::Mutex<()>,
    connector: Connector,
    smart_configuration: Option<Bytes>,
    metrics: Arc<Metrics>,
}

/// Why no statement can be served.
#[derive(Debug)]
pub(crate) struct Unavailable;

impl Discovery {
    pub(crate) fn new(
        source: Source,
        ttl: Duration,
        public_base: String,
        security: Option<SecurityUris>,
        metrics: Arc<Metrics>,
    ) -> Discovery {
        let smart_configuration = security.as_ref().map(smart_configuration);
        Discovery {
            source,
            ttl,
            public_base,
            security,
            cache: ArcSwapOption::empty(),
            refresh: tokio::sync::Mutex::new(()),
            connector: Connector::new(None),
            smart_configuration,
            metrics,
        }
    }

    /// The `.well-known/smart-configuration` document, when fhir-edge runs the token endpoint.
    pub(crate) fn smart_configuration(&self) -> Option<Bytes> {
        self.smart_configuration.clone()
    }

    /// The CapabilityStatement to serve, from the cache when fresh. `Err` only when no statement
    /// has ever been built.
    pub(crate) async fn metadata(&self) -> Result<Bytes, Unavailable> {
        let cached = self.cache.load_full();
        if let Some(c) = &cached {
            if c.fetched.elapsed() < self.ttl {
                return Ok(c.body.clone());
            }
        }
        // One refresh at a time; while it runs, the others keep serving the cached copy.
        let _guard = match (self.refresh.try_lock(), &cached) {
            (Ok(g), _) => g,
            (Err(_), Some(c)) => return Ok(c.body.clone()),
            (Err(_), None) => self.refresh.lock().await,
        };
        if let Some(c) = self.cache.load_full() {
            if c.fetched.elapsed() < self.ttl {
                return Ok(c.body.clone());
            }
        }
        match self.build().await {
            Ok(body) => {
                self.cache.store(Some(Arc::new(Cached {
                    body: body.clone(),
                    fetched: Instant::now(),
                })));
                Ok(body)
            }
            Err(reason) => {
                self.metrics.metadata_refresh_failures.inc();
                log::warn!("cannot refresh the CapabilityStatement: {reason}");
                cached.map(|c| c.body.clone()).ok_or(Unavailable)
            }
        }
    }

    async fn build(&self) -> Result<Bytes, String> {
        let (statement, upstream) = match &self.source {
            Source::File(v) => (v.clone(), None),
            Source::Upstream(u) => (self.fetch(u).await?, Some(u)),
        };
        let statement = transform(statement, &self.public_base, self.security.as_ref())
            .map_err(|problems| format!("the statement is not valid: {}", problems.join("; ")))?;
        let bytes = serde_json::to_vec(&statement).map_err(|e| e.to_string())?;
        // Absolute upstream URLs elsewhere in the statement must not escape either.
        Ok(Bytes::from(match upstream {
            Some(u) => u.rewrites.all(&bytes),
            None => bytes,
        }))
    }

    async fn fetch(&self, u: &Upstream) -> Result<Value, String> {
        let err = |what: &str, e: Box<pingora::Error>| format!("{what}: {:?}", e.etype());
        let (mut session, _) = self
            .connector
            .get_http_session(&u.peer)
            .await
            .map_err(|e| err("connect", e))?;
        let mut req =
            RequestHeader::build("GET", format!("{}/metadata", u.base_path).as_bytes(), None)
                .map_err(|e| err("request", e))?;
        for (name, value) in [
            ("host", u.host.to_str().unwrap_or_default()),
            ("accept", "application/fhir+json, application/json;q=0.9"),
            ("accept-encoding", "identity"),
            (
                "user-agent",
                concat!("fhir-edge/", env!("CARGO_PKG_VERSION")),
            ),
        ] {
            req.insert_header(name, value)
                .map_err(|e| err("request", e))?;
        }
        session
            .write_request_header(Box::new(req))
            .await
            .map_err(|e| err("send", e))?;
        session
            .finish_request_body()
            .await
            .map_err(|e| err("send", e))?;
        session
            .read_response_header()
            .await
            .map_err(|e| err("response", e))?;
        let (status, json) = match session.response_header() {
            Some(h) => (
                h.status.as_u16(),
                h.headers
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| crate::fhir::batch::is_json_media_type(v.as_bytes())),
            ),
            None => return Err("no response header".into()),
        };
        if status != 200 {
            return Err(format!("the upstream answered {status}"));
        }
        if !json {
            return Err("the upstream did not answer with JSON".into());
        }
        let mut body = Vec::new();
        while let Some(chunk) = session
            .read_response_body()
            .await
            .map_err(|e| err("body", e))?
        {
            if body.len() + chunk.len() > MAX_STATEMENT_BYTES {
                return Err("the statement is too large".into());
            }
            body.extend_from_slice(&chunk);
        }
        session.shutdown().await;
        serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
    }
}

fn smart_configuration(s: &SecurityUris) -> Bytes {
    Bytes::from(
        json!({
            "issuer": s.issuer,
            "jwks_uri": s.jwks,
            "token_endpoint": s.token,
            "authorization_endpoint": s.authorize,
            "registration_endpoint": s.register,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            // The scope that matters is the customer's tenant GUID; SMART system scopes are accepted
            // beside it.
            "scopes_supported": ["system/*.read"],
            "response_types_supported": [],
            "capabilities": ["client-confidential-symmetric"],
            "code_challenge_methods_supported": [],
        })
        .to_string(),
    )
}

/// The response media type for `_format` / `Accept`, or `None` when the client only accepts
/// something other than JSON (fhir-edge serves the statement as JSON only).
pub(crate) fn negotiate(format: Option<&str>, accept: Option<&str>) -> Option<&'static str> {
    const FHIR_JSON: &str = "application/fhir+json";
    if let Some(f) = format {
        return match f.trim() {
            "json" | "application/fhir+json" | "application/json+fhir" => Some(FHIR_JSON),
            "application/json" => Some("application/json"),
            _ => None,
        };
    }
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Some(FHIR_JSON);
    };
    let types: Vec<String> = accept
        .split(',')
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .collect();
    if types.iter().any(|t| {
        matches!(
            t.as_str(),
            "application/fhir+json" | "application/json+fhir" | "*/*" | "application/*"
        )
    }) {
        Some(FHIR_JSON)
    } else if types.iter().any(|t| t == "application/json") {
        Some("application/json")
    } else {
        None
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_negotiation() {
        assert_eq!(negotiate(None, None), Some("application/fhir+json"));
        assert_eq!(
            negotiate(Some("json"), Some("application/fhir+xml")),
            Some("application/fhir+json")
        );
        assert_eq!(
            negotiate(Some("application/json"), None),
            Some("application/json")
        );
        assert_eq!(negotiate(Some("xml"), None), None);
        assert_eq!(negotiate(None, Some("application/fhir+xml")), None);
        assert_eq!(
            negotiate(None, Some("application/json")),
            Some("application/json")
        );
        assert_eq!(
            negotiate(None, Some("text/html, */*;q=0.1")),
            Some("application/fhir+json")
        );
    }
}
