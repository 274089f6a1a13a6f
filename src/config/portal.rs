//! The `portal` section: where the registration portal is served, where its accounts and sessions
//! live (beside the client registry: a JSON file with the file store, the same database with
//! PostgreSQL) and its password, session and throttle rules.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::problems::Source;
use crate::config::settings::PortalSettings;
use crate::config::token::is_endpoint_path;
use crate::config::{resolve, PublicBase};
use crate::db::DbConfig;
use crate::token::clients::StoreConfig;
use crate::token::{limiter, TokenSettings};

/// Where the portal keeps accounts, invites, sessions and activity.
#[derive(Debug, Clone)]
pub(crate) enum PortalStoreConfig {
    File(PathBuf),
    Postgres(Box<DbConfig>),
}

/// The validated `portal` section.
#[derive(Debug, Clone)]
pub(crate) struct PortalConfig {
    /// Below the public base (`/portal`).
    pub path: String,
    /// The portal's own listeners; empty: served on the proxy's listeners.
    pub listen: Vec<SocketAddr>,
    /// The portal's URL as owners reach it (no trailing slash).
    pub public_url: String,
    pub store: PortalStoreConfig,
    pub require_totp: bool,
    pub min_password_length: usize,
    pub invite_seconds: u64,
    pub idle_seconds: u64,
    pub absolute_seconds: u64,
    pub throttle: limiter::Limits,
}

impl PortalConfig {
    /// Whether cookies must carry `Secure`: the portal's public URL is https (a TLS listener sets it
    /// per connection as well).
    pub(crate) fn https(&self) -> bool {
        self.public_url.starts_with("https://")
    }
}

/// Validates `portal` (`None` when it is absent, disabled or has a problem, which is recorded).
pub(super) fn validate_portal(
    p: &PortalSettings,
    token: Option<&TokenSettings>,
    public: &PublicBase,
    dir: &Path,
    src: &mut Source,
) -> Option<PortalConfig> {
    if !p.enabled {
        return None;
    }
    let before = src.problems.len();
    let Some(token) = token else {
        src.at(
            "portal",
            "portal",
            "needs token_endpoint: the portal manages its client registry",
        );
        return None;
    };
    // The portal is matched before anything else: it must not hide discovery, fhir-edge's own
    // endpoints or FHIR (whose resource types start with a capital letter).
    let overlaps = |other: &str| {
        p.path == other
            || p.path.starts_with(&format!("{other}/"))
            || other.starts_with(&format!("{}/", p.path))
    };
    let first = p.path.trim_start_matches('/').chars().next();
    if !is_endpoint_path(&p.path)
        || first.is_none_or(|c| c.is_ascii_uppercase() || c == '$' || c == '_')
        || [
            "/metadata",
            "/.well-known",
            &token.path,
            &token.management_path,
        ]
        .iter()
        .any(|o| overlaps(o))
    {
        src.at(
            &p.path,
            "portal.path",
            "must be a path such as /portal, clear of discovery, the token endpoints and FHIR resource types",
        );
    }
    let mut listen = Vec::new();
    for (i, a) in p.listen.iter().enumerate() {
        match a.parse::<SocketAddr>() {
            Ok(addr) => listen.push(addr),
            Err(_) => src.at(
                a,
                format!("portal.listen[{i}]"),
                "must be an IP:port address",
            ),
        }
    }
    // Pages, links and cookies live below the public base path and `path` on every listener, so a
    // `public_url` (a load balancer's or the portal listener's name) must end in that same path.
    let prefix = format!("{}{}", public.path.trim_end_matches('/'), p.path);
    let public_url = match &p.public_url {
        Some(u) => {
            let u = u.trim_end_matches('/');
            let path = u
                .strip_prefix("https://")
                .or_else(|| u.strip_prefix("http://"))
                .map(|rest| rest.find('/').map_or("", |i| &rest[i..]));
            if path != Some(prefix.as_str()) {
                src.at(
                    u,
                    "portal.public_url",
                    format!("must be an http(s) URL whose path is {prefix} (public base path + portal.path), e.g. https://portal.example.org{prefix}"),
                );
            }
            u.to_string()
        }
        None => format!("{}{}", public.url.trim_end_matches('/'), p.path),
    };
    let store = match &token.clients {
        StoreConfig::File(_) => {
            if p.state_file.is_empty() {
                src.at(
                    "state_file",
                    "portal.state_file",
                    "is required with the file store",
                );
            }
            PortalStoreConfig::File(resolve(dir, &p.state_file))
        }
        StoreConfig::Postgres { db, .. } => PortalStoreConfig::Postgres(db.clone()),
    };
    for (key, v, lo, hi) in [
        ("min_password_length", p.min_password_length as u64, 8, 128),
        ("invite_hours", p.invite_hours, 1, 24 * 14),
        ("session_idle_minutes", p.session_idle_minutes, 1, 24 * 60),
        ("session_hours", p.session_hours, 1, 24 * 30),
        (
            "login_throttle.window_seconds",
            p.login_throttle.window_seconds,
            1,
            86_400,
        ),
        (
            "login_throttle.per_account",
            p.login_throttle.per_account.into(),
            1,
            1000,
        ),
        (
            "login_throttle.per_source",
            p.login_throttle.per_source.into(),
            1,
            100_000,
        ),
    ] {
        if !(lo..=hi).contains(&v) {
            let leaf = key.rsplit('.').next().unwrap_or(key);
            src.at(
                leaf,
                format!("portal.{key}"),
                format!("must be between {lo} and {hi}"),
            );
        }
    }
    if src.problems.len() > before {
        return None;
    }
    Some(PortalConfig {
        path: p.path.clone(),
        listen,
        public_url,
        store,
        require_totp: p.require_totp,
        min_password_length: p.min_password_length,
        invite_seconds: p.invite_hours * 3600,
        idle_seconds: p.session_idle_minutes * 60,
        absolute_seconds: p.session_hours * 3600,
        throttle: limiter::Limits {
            per_client: p.login_throttle.per_account,
            per_source: p.login_throttle.per_source,
            window_seconds: p.login_throttle.window_seconds,
        },
    })
}
