//! `POST {base}/token`: the OAuth 2.0 client-credentials grant (RFC 6749 §4.4), as the Teams EHR
//! integration uses it: `grant_type=client_credentials&client_id=…&client_secret=…&scope=<tenant GUID>`
//! → `{"access_token": <JWT>, "token_type": "Bearer", "expires_in": …, "scope": …}`.
//!
//! Rules, each from a standard or a real client library:
//! - `POST` only; `application/x-www-form-urlencoded` (parameters such as `charset` allowed); every
//!   parameter at most once (RFC 6749 §3.1); credentials never in the URL (§2.3.1).
//! - Client authentication by `client_secret_post` or `client_secret_basic`, not both (§2.3). Basic
//!   credentials are form-urlencoded before base64 by some libraries (as §2.3.1 says) and raw by
//!   others; both readings are tried.
//! - `grant-type` is accepted for `grant_type` when the latter is absent (one Teams example spells
//!   it so), unless configured off.
//! - The scope names exactly one tenant GUID, which the client may use and the routing table serves.
//! - Failed authentications are throttled per client and per source ([`super::limiter`]).
//! - The access token is an RFC 9068 JWT (`typ: at+jwt`) signed with the active key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD as B64STD, URL_SAFE_NO_PAD as B64};
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method};
use jsonwebtoken::{encode, Header};
use serde_json::json;

use super::clients::{ClientRegistry, ClientStore};
use super::limiter::FailureLimiter;
use super::TokenSettings;
use crate::auth::scope::tenant_in;
use crate::outcome::OAuthError;
use crate::reload::Live;
use crate::routing::RoutingTable;
use crate::tenant::TenantId;

/// Everything the token and management endpoints need, shared by all requests.
pub(crate) struct TokenService {
    pub settings: TokenSettings,
    pub clients: ClientStore,
    pub routes: Arc<Live<RoutingTable>>,
    pub limiter: FailureLimiter,
    /// Secrets' last uses, for the portal.
    pub usage: super::usage::Usage,
    jti_prefix: u64,
    jti_counter: AtomicU64,
}

/// The parts of a request the endpoints look at.
pub(crate) struct RequestView<'a> {
    pub method: &'a Method,
    pub query: Option<&'a [u8]>,
    pub headers: &'a HeaderMap,
    pub source: Option<IpAddr>,
}

/// Largest token request body read (a real one is a few hundred bytes).
pub(crate) const MAX_FORM_BYTES: usize = 16 * 1024;

/// Query parameters that would mean credentials or grant data travel in the URL.
const FORBIDDEN_IN_QUERY: &[&[u8]] = &[
    b"client_id",
    b"client_secret",
    b"grant_type",
    b"grant-type",
    b"scope",
    b"assertion",
];

/// A client's claimed identity and secret, as presented.
pub(crate) struct Credentials {
    pub candidates: Vec<(String, String)>,
    pub basic: bool,
}

impl TokenService {
    pub(crate) fn new(
        settings: TokenSettings,
        clients: ClientStore,
        routes: Arc<Live<RoutingTable>>,
    ) -> TokenService {
        let limiter = FailureLimiter::new(settings.failed_auth);
        let mut prefix = [0u8; 8];
        // Uniqueness only needs the prefix to differ between processes; fall back to the pid.
        let jti_prefix = match getrandom::fill(&mut prefix) {
            Ok(()) => u64::from_le_bytes(prefix),
            Err(_) => u64::from(std::process::id()) << 32 ^ crate::time::now_unix(),
        };
        TokenService {
            settings,
            clients,
            routes,
            limiter,
            usage: super::usage::Usage::default(),
            jti_prefix,
            jti_counter: AtomicU64::new(0),
        }
    }

    /// Checks that need no body: method, credentials in the URL, media type.
    pub(crate) fn precheck(&self, req: &RequestView) -> Result<(), OAuthError> {
        if req.method != Method::POST {
            return Err(OAuthError::MethodNotAllowed { allow: "POST" });
        }
        if let Some(q) = req.query {
            let leaked = q.split(|&b| b == b'&').any(|pair| {
                let name = crate::fhir::pct::decode(
                    pair.split(|&b| b == b'=').next().unwrap_or_default(),
                    true,
                );
                FORBIDDEN_IN_QUERY
                    .iter()
                    .any(|f| name.eq_ignore_ascii_case(f))
            });
            if leaked {
                return Err(OAuthError::InvalidRequest(
                    "Client credentials and grant parameters must be sent in the request body, not the URL.",
                ));
            }
        }
        let ct = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let essence = ct
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if !essence.eq_ignore_ascii_case(b"application/x-www-form-urlencoded") {
            return Err(OAuthError::InvalidRequest(
                "The body must be application/x-www-form-urlencoded.",
            ));
        }
        Ok(())
    }

    /// Handles a token request whose body has been read.
    pub(crate) fn token(
        &self,
        req: &RequestView,
        body: &[u8],
        now: u64,
    ) -> Result<Issued, OAuthError> {
        let form = crate::fhir::pct::parse_form(body).ok_or(OAuthError::InvalidRequest(
            "Every parameter must appear at most once, in UTF-8.",
        ))?;
        let grant = form.get("grant_type").or_else(|| {
            self.settings
                .grant_type_hyphen_alias
                .then(|| form.get("grant-type"))
                .flatten()
        });
        match grant.map(String::as_str) {
            None => return Err(OAuthError::InvalidRequest("grant_type is missing.")),
            Some("client_credentials") => {}
            Some(_) => return Err(OAuthError::UnsupportedGrantType),
        }
        let creds = credentials(req.headers, &form)?;
        // A database replica before its first read knows no client: say so, not "bad credentials".
        if self.clients.not_ready().is_some() {
            return Err(OAuthError::Unavailable);
        }
        // One registry snapshot for authentication and the scope check.
        let registry = self.clients.load();
        let (client_id, secret_id) =
            self.authenticate_client(&registry, &creds, req.source, now)?;
        let scope = form.get("scope").map(String::as_str).unwrap_or_default();
        let tenant = tenant_in(scope).ok_or(OAuthError::InvalidScope)?;
        let allowed = registry
            .get(&client_id)
            .is_some_and(|c| c.allowed.permits(&tenant));
        if !allowed || self.routes.load().get(&tenant).is_none() {
            return Err(OAuthError::InvalidScope);
        }
        let granted = granted_scope(scope, &tenant);
        let token = self.mint(&client_id, &secret_id, &granted, now)?;
        let body = json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.settings.lifetime.as_secs(),
            "scope": granted,
        });
        Ok(Issued {
            body: Bytes::from(body.to_string()),
            client_id,
            tenant,
        })
    }

    /// Throttle, then check each candidate (id, secret) reading; counts a failure when none matches.
    /// Returns the client id and the id of the secret that matched.
    pub(crate) fn authenticate_client(
        &self,
        registry: &ClientRegistry,
        creds: &Credentials,
        source: Option<IpAddr>,
        now: u64,
    ) -> Result<(String, String), OAuthError> {
        let claimed = creds.candidates.first().map(|(id, _)| id.as_str());
        if let Some(retry_after) = self.limiter.retry_after(claimed, source) {
            return Err(OAuthError::TooManyRequests { retry_after });
        }
        let mut matched = None;
        for (id, secret) in &creds.candidates {
            if let Some((c, s)) = registry.authenticate(id, secret.as_bytes(), now) {
                if matched.is_none() {
                    self.usage.note(&c.id, &s.id, now);
                }
                matched.get_or_insert((c.id.clone(), s.id.clone()));
            }
        }
        matched.ok_or_else(|| {
            self.limiter.record_failure(claimed, source);
            OAuthError::InvalidClient { basic: creds.basic }
        })
    }

    fn mint(
        &self,
        client_id: &str,
        secret_id: &str,
        scope: &str,
        now: u64,
    ) -> Result<String, OAuthError> {
        let key = &self.settings.keys.active;
        let mut header = Header::new(key.alg);
        header.typ = Some("at+jwt".into());
        header.kid = Some(key.kid.clone());
        let n = self.jti_counter.fetch_add(1, Ordering::Relaxed);
        let mut jti = [0u8; 16];
        jti[..8].copy_from_slice(&self.jti_prefix.to_le_bytes());
        jti[8..].copy_from_slice(&n.to_le_bytes());
        let claims = json!({
            "iss": self.settings.issuer,
            "aud": self.settings.audience,
            "sub": client_id,
            "client_id": client_id,
            "iat": now,
            "exp": now + self.settings.lifetime.as_secs(),
            "jti": B64.encode(jti),
            "scope": scope,
            "secret_id": secret_id,
        });
        encode(&header, &claims, &key.encoding).map_err(|e| {
            log::error!("token signing failed: {e}");
            OAuthError::ServerError
        })
    }
}

/// A token response, and for the access log whom it was issued to.
pub(crate) struct Issued {
    pub body: Bytes,
    pub client_id: String,
    pub tenant: TenantId,
}

/// The scope granted: the requested elements in order, the tenant in canonical form.
fn granted_scope(requested: &str, tenant: &TenantId) -> String {
    requested
        .split(' ')
        .filter(|e| !e.is_empty())
        .map(|e| {
            if TenantId::parse(e).is_some() {
                tenant.to_string()
            } else {
                e.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The client authentication the request presents (RFC 6749 §2.3.1): HTTP Basic or body parameters,
/// never both.
pub(crate) fn credentials(
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<Credentials, OAuthError> {
    let basic = basic_candidates(headers)?;
    let body_id = form.get("client_id");
    let body_secret = form.get("client_secret");
    match (basic, body_secret) {
        (Some(_), Some(_)) => Err(OAuthError::InvalidRequest(
            "Use one client authentication method: HTTP Basic or client_secret in the body, not both.",
        )),
        (Some(candidates), None) => {
            // A client_id in the body beside Basic must name the same client.
            if let Some(id) = body_id {
                if !candidates.iter().any(|(c, _)| c == id) {
                    return Err(OAuthError::InvalidRequest(
                        "client_id in the body does not match the HTTP Basic credentials.",
                    ));
                }
            }
            Ok(Credentials { candidates, basic: true })
        }
        (None, Some(secret)) => match body_id {
            Some(id) => Ok(Credentials {
                candidates: vec![(id.clone(), secret.clone())],
                basic: false,
            }),
            None => Err(OAuthError::InvalidClient { basic: false }),
        },
        (None, None) => Err(OAuthError::InvalidClient { basic: false }),
    }
}

/// Candidate (client_id, secret) readings of an `Authorization: Basic` header: form-urldecoded (RFC
/// 6749 §2.3.1, what simple-oauth2 and openid-client send) and, when different, raw (what the Python
/// OAuth libraries send). `None` without an Authorization header.
pub(crate) fn basic_candidates(
    headers: &HeaderMap,
) -> Result<Option<Vec<(String, String)>>, OAuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return Ok(None),
        (Some(v), None) => v.as_bytes(),
        (Some(_), Some(_)) => {
            return Err(OAuthError::InvalidRequest("Send one Authorization header."));
        }
    };
    let malformed = OAuthError::InvalidClient { basic: true };
    let space = value.iter().position(|&b| b == b' ').ok_or(malformed)?;
    if !value[..space].eq_ignore_ascii_case(b"basic") {
        return Err(OAuthError::InvalidRequest(
            "Client authentication uses HTTP Basic or the request body.",
        ));
    }
    let decoded = B64STD
        .decode(value[space + 1..].trim_ascii())
        .map_err(|_| malformed)?;
    let colon = decoded.iter().position(|&b| b == b':').ok_or(malformed)?;
    let (id, secret) = (&decoded[..colon], &decoded[colon + 1..]);
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| malformed);
    let form_id = text(&crate::fhir::pct::decode(id, true))?;
    let form_secret = text(&crate::fhir::pct::decode(secret, true))?;
    let mut out = vec![(form_id, form_secret)];
    let raw = (text(id)?, text(secret)?);
    if raw != out[0] {
        out.push(raw);
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn basic(user_pass: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = format!("Basic {}", B64STD.encode(user_pass));
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&v).unwrap(),
        );
        h
    }

    #[test]
    fn basic_credentials_are_read_both_ways() {
        let c = basic_candidates(&basic("edge%2Dproxy:s%2F3%2Bc"))
            .unwrap()
            .unwrap();
        assert_eq!(c[0], ("edge-proxy".to_string(), "s/3+c".to_string()));
        assert_eq!(c[1], ("edge%2Dproxy".to_string(), "s%2F3%2Bc".to_string()));
        // Raw credentials whose secret contains '+' and ':' (only the first colon splits).
        let c = basic_candidates(&basic("id:a+b:c%")).unwrap().unwrap();
        assert!(c.contains(&("id".to_string(), "a+b:c%".to_string())));
        assert_eq!(basic_candidates(&HeaderMap::new()).unwrap(), None);
        assert!(basic_candidates(&basic("no-colon")).is_err());
    }

    #[test]
    fn granted_scope_keeps_order_and_canonicalises_the_tenant() {
        let t = TenantId::parse("145f4184-1b0b-41c7-ba24-b3c1291bfda1").unwrap();
        assert_eq!(
            granted_scope("system/*.read  145F4184-1B0B-41C7-BA24-B3C1291BFDA1", &t),
            "system/*.read 145f4184-1b0b-41c7-ba24-b3c1291bfda1"
        );
    }

    #[test]
    fn both_authentication_methods_at_once_are_refused() {
        let mut form = HashMap::new();
        form.insert("client_secret".to_string(), "x".to_string());
        assert!(matches!(
            credentials(&basic("a:b"), &form),
            Err(OAuthError::InvalidRequest(_))
        ));
        form.insert("client_id".to_string(), "a".to_string());
        assert!(credentials(&HeaderMap::new(), &form).is_ok());
        form.remove("client_secret");
        assert!(matches!(
            credentials(&HeaderMap::new(), &form),
            Err(OAuthError::InvalidClient { basic: false })
        ));
    }
}
