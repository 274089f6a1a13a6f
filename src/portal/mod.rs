//! The registration portal: where a client's owner, invited by the operator for one or more
//! tenants, manages that tenant's clients and their secrets in a browser, without the operator
//! (the Teams document: the app "can generate and own client_id and client_secret, managed via an
//! Auth registration portal", and "re-generate the secret and invalidate or delete the old secret").
//!
//! Served below `{base}{portal.path}` by the proxy (or on listeners of its own): server-rendered
//! HTML ([`pages`]), no script, every form a plain POST. This module turns a [`Request`] into a
//! [`Reply`] and knows nothing of Pingora; [`crate::proxy`] reads the request and writes the reply.
//!
//! Security, in one place:
//! - sessions are server-side ([`store`]), found by the SHA-256 of an opaque random cookie that is
//!   `HttpOnly`, `SameSite=Strict` and `Secure` on TLS; a new id at every sign-in; idle and
//!   absolute timeouts; signing out and changing the password end every session of the account;
//! - every POST carries a CSRF token: the session's synchronizer token once signed in, a
//!   double-submitted cookie before; a cross-site `Sec-Fetch-Site` is refused as well;
//! - an owner acts only on clients whose every allowed tenant is one of the account's (never a
//!   client allowed every tenant); anything else is answered as if it did not exist (404);
//! - failed sign-ins are throttled per e-mail given (existing or not) and per source, for a bounded
//!   time, with the same answer whether or not the account exists;
//! - pages carry a strict Content-Security-Policy and are never cached; templates escape every value.

pub(crate) mod account;
mod handlers;
mod pages;
pub(crate) mod pg;
pub(crate) mod service;
pub(crate) mod store;

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use cookie::{Cookie, SameSite};
use http::{HeaderMap, Method};
use maud::Markup;

use crate::config::portal::{PortalConfig, PortalStoreConfig};
use crate::tenant::TenantId;
use crate::token::endpoint::TokenService;
use crate::token::limiter::FailureLimiter;
use store::{Account, FileStore, PortalError, PortalStore, SessionRow};

pub(crate) use account::sha256_hex;

/// The largest form accepted.
pub(crate) const MAX_FORM_BYTES: usize = 16 * 1024;

/// How often a session's last-seen time is written (a write per page would be a write per click).
const TOUCH_EVERY: u64 = 60;

/// The portal, shared by every request.
pub(crate) struct Portal {
    pub(crate) cfg: PortalConfig,
    /// The public base path and the portal's path: every link and cookie path starts with it.
    prefix: String,
    pub(crate) store: PortalStore,
    pub(crate) token: Arc<TokenService>,
    limiter: FailureLimiter,
}

/// What the portal needs of a request.
pub(crate) struct Request {
    pub method: Method,
    /// The path below the portal's prefix (`""`, `/login`, `/clients/…`).
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub source: Option<IpAddr>,
    /// The connection is TLS.
    pub tls: bool,
}

/// The portal's answer, and what the audit line records of it.
pub(crate) struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
    /// The route template for the audit log and metrics (no ids, no tokens).
    pub template: &'static str,
    /// The portal action taken (`client_created`, `signed_in`, …).
    pub action: Option<&'static str>,
    pub account: Option<String>,
    pub client_id: Option<String>,
}

/// Why a page could not be shown.
#[derive(Debug)]
pub(crate) enum PageError {
    NotFound,
    /// A form without a valid CSRF token, or sent cross-site.
    Forbidden,
    MethodNotAllowed(&'static str),
    BadRequest(&'static str),
    TooLarge,
    /// The store cannot be reached.
    Unavailable,
}

impl From<PortalError> for PageError {
    fn from(e: PortalError) -> PageError {
        log::warn!("portal: {e}");
        PageError::Unavailable
    }
}

/// A signed-in request: the session and its account.
pub(crate) struct Signed {
    pub account: Account,
    pub session: SessionRow,
    pub tenants: Vec<TenantId>,
}

impl Portal {
    /// Opens the portal's store (a database store starts serving when its service runs).
    pub(crate) fn new(
        cfg: PortalConfig,
        public_path: &str,
        token: Arc<TokenService>,
    ) -> Result<Portal, PortalError> {
        let store = match &cfg.store {
            PortalStoreConfig::File(p) => PortalStore::File(Arc::new(FileStore::open(p.clone())?)),
            PortalStoreConfig::Postgres(db) => {
                PortalStore::Postgres(Arc::new(pg::PgStore::new((**db).clone())))
            }
        };
        token.usage.enable();
        let limiter = FailureLimiter::new(cfg.throttle);
        Ok(Portal {
            prefix: format!("{}{}", public_path.trim_end_matches('/'), cfg.path),
            cfg,
            store,
            token,
            limiter,
        })
    }

    /// The path below the portal's prefix, when `path` is the portal's.
    pub(crate) fn below<'p>(&self, path: &'p [u8]) -> Option<&'p [u8]> {
        let rest = path.strip_prefix(self.prefix.as_bytes())?;
        (rest.is_empty() || rest.starts_with(b"/")).then_some(rest)
    }

    /// Answers one request.
    pub(crate) async fn handle(&self, req: Request) -> Reply {
        match self.dispatch(&req).await {
            Ok(reply) => reply,
            Err(e) => self.error_reply(e),
        }
    }

    /// The reply to a path outside the portal on a portal-only listener.
    pub(crate) fn not_found(&self) -> Reply {
        self.error_reply(PageError::NotFound)
    }

    /// The reply to a form over [`MAX_FORM_BYTES`].
    pub(crate) fn too_large(&self) -> Reply {
        self.error_reply(PageError::TooLarge)
    }

    fn error_reply(&self, e: PageError) -> Reply {
        let (status, title, text) = match e {
            PageError::NotFound => (404, "Not found", "There is nothing here, or it is not yours."),
            PageError::Forbidden => (
                403,
                "Form expired",
                "This form expired or did not come from this portal. Go back, reload the page and try again.",
            ),
            PageError::MethodNotAllowed(_) => (405, "Not allowed", "This page does not take that method."),
            PageError::BadRequest(m) => (400, "Bad request", m),
            PageError::TooLarge => (413, "Too large", "That form is larger than any this portal sends."),
            PageError::Unavailable => (
                503,
                "Temporarily unavailable",
                "The portal cannot reach its store. Try again in a minute.",
            ),
        };
        let mut reply = self.html(
            status,
            "{portal}/{other}",
            pages::message(self, None, title, text),
        );
        if let PageError::MethodNotAllowed(allow) = e {
            reply.headers.push(("allow", allow.into()));
        }
        if matches!(e, PageError::Unavailable) {
            reply.headers.push(("retry-after", "30".into()));
        }
        reply
    }

    /// A page.
    pub(crate) fn html(&self, status: u16, template: &'static str, body: Markup) -> Reply {
        Reply {
            status,
            headers: security_headers("text/html; charset=utf-8"),
            body: Bytes::from(body.into_string()),
            template,
            action: None,
            account: None,
            client_id: None,
        }
    }

    /// A 303 to `to` (below the prefix).
    pub(crate) fn redirect(&self, template: &'static str, to: &str) -> Reply {
        let mut r = self.html(303, template, maud::html! {});
        r.headers.push(("location", self.link(to)));
        r
    }

    /// An absolute path to `to` (below the prefix).
    pub(crate) fn link(&self, to: &str) -> String {
        format!("{}{to}", self.prefix)
    }

    /// Whether cookies get `Secure` (and the `__Secure-` prefix).
    fn secure(&self, req: &Request) -> bool {
        req.tls || self.cfg.https()
    }

    fn cookie_name(&self, req: &Request, name: &'static str) -> &'static str {
        match (self.secure(req), name) {
            (true, "session") => "__Secure-fhir-edge-session",
            (false, "session") => "fhir-edge-session",
            (true, _) => "__Secure-fhir-edge-csrf",
            (false, _) => "fhir-edge-csrf",
        }
    }

    /// The value of our cookie `name` (`session` or `csrf`) in the request.
    pub(crate) fn cookie(&self, req: &Request, name: &'static str) -> Option<String> {
        let wanted = self.cookie_name(req, name);
        req.headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(Cookie::split_parse)
            .filter_map(Result::ok)
            .find(|c| c.name() == wanted && !c.value().is_empty() && c.value().len() <= 128)
            .map(|c| c.value().to_string())
    }

    /// A `Set-Cookie` for our cookie `name`; `None` clears it.
    pub(crate) fn set_cookie(
        &self,
        req: &Request,
        name: &'static str,
        value: Option<&str>,
    ) -> (&'static str, String) {
        let mut c = Cookie::build((self.cookie_name(req, name), value.unwrap_or("").to_string()))
            .path(self.prefix.clone())
            .http_only(true)
            .same_site(SameSite::Strict)
            .secure(self.secure(req));
        c = match (value, name) {
            (None, _) => c.max_age(cookie::time::Duration::ZERO),
            (Some(_), "session") => c.max_age(cookie::time::Duration::seconds(
                i64::try_from(self.cfg.absolute_seconds).unwrap_or(i64::MAX),
            )),
            (Some(_), _) => c,
        };
        ("set-cookie", c.build().to_string())
    }

    /// The signed-in session of `req`, if it has a live one.
    pub(crate) async fn signed_in(
        &self,
        req: &Request,
        now: u64,
    ) -> Result<Option<Signed>, PageError> {
        let Some(id) = self.cookie(req, "session") else {
            return Ok(None);
        };
        let hash = sha256_hex(&id);
        let Some(session) = self.store.session(&hash).await? else {
            return Ok(None);
        };
        let idle = session.last_seen.saturating_add(self.cfg.idle_seconds);
        let absolute = session.created.saturating_add(self.cfg.absolute_seconds);
        if now >= idle || now >= absolute {
            self.store.end_session(&hash).await?;
            return Ok(None);
        }
        let Some(account) = self.store.account(&session.account_id).await? else {
            return Ok(None);
        };
        if account.disabled || account.password_hash.is_none() {
            return Ok(None);
        }
        if now.saturating_sub(session.last_seen) >= TOUCH_EVERY {
            self.store.touch_session(&hash, now).await?;
        }
        let tenants = account
            .tenants
            .iter()
            .filter_map(|t| TenantId::parse(t))
            .collect();
        Ok(Some(Signed {
            account,
            session,
            tenants,
        }))
    }

    /// Refuses a POST sent from another site (browsers send `Sec-Fetch-Site`; a missing header is
    /// left to the CSRF token).
    fn same_origin(req: &Request) -> Result<(), PageError> {
        match req
            .headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
        {
            Some("same-origin") | Some("none") | None => Ok(()),
            Some(_) => Err(PageError::Forbidden),
        }
    }

    /// Checks a signed-in form's CSRF token against the session's.
    pub(crate) fn check_csrf(req: &Request, form: &Form, s: &Signed) -> Result<(), PageError> {
        Portal::same_origin(req)?;
        match form.get("csrf") {
            Some(t) if eq(t, &s.session.csrf) => Ok(()),
            _ => Err(PageError::Forbidden),
        }
    }

    /// Checks a form sent before signing in against the double-submitted CSRF cookie.
    pub(crate) fn check_anonymous_csrf(&self, req: &Request, form: &Form) -> Result<(), PageError> {
        Portal::same_origin(req)?;
        match (form.get("csrf"), self.cookie(req, "csrf")) {
            (Some(t), Some(c)) if eq(t, &c) => Ok(()),
            _ => Err(PageError::Forbidden),
        }
    }
}

/// Constant-time equality of two tokens.
fn eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The headers every portal response carries.
fn security_headers(content_type: &str) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", content_type.into()),
        (
            "content-security-policy",
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'"
                .into(),
        ),
        ("x-frame-options", "DENY".into()),
        ("referrer-policy", "no-referrer".into()),
        ("x-content-type-options", "nosniff".into()),
        ("cross-origin-opener-policy", "same-origin".into()),
        // Pages hold CSRF tokens, account details and, once, secrets: never stored anywhere.
        ("cache-control", "no-store".into()),
    ]
}

/// An `application/x-www-form-urlencoded` body: names may repeat (the tenant checkboxes).
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    pub(crate) fn parse(req: &Request) -> Result<Form, PageError> {
        let is_form = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if !is_form {
            return Err(PageError::BadRequest("Send the form as the page does."));
        }
        let text = |raw: &[u8]| String::from_utf8(crate::fhir::pct::decode(raw, true)).ok();
        let mut pairs = Vec::new();
        for pair in req.body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            match (text(name), text(value)) {
                (Some(n), Some(v)) => pairs.push((n, v)),
                _ => return Err(PageError::BadRequest("The form is not UTF-8.")),
            }
        }
        Ok(Form(pairs))
    }

    /// The first value of `name`, when not empty.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}
