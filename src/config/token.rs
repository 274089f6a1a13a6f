//! The `token_endpoint` section: fhir-edge's own OAuth 2.0 token endpoint, its signing keys and the
//! client registry file.

use std::path::Path;
use std::time::Duration;

use crate::config::problems::Source;
use crate::config::settings::{DatabaseSettings, TokenEndpointSettings};
use crate::config::{resolve, PublicBase};
use crate::db::DbConfig;
use crate::routing::upstream::UpstreamUrl;
use crate::token::clients::StoreConfig;
use crate::token::keys::{SigningKey, SigningKeys};
use crate::token::{limiter, TokenSettings};

pub(super) fn is_endpoint_path(p: &str) -> bool {
    p.len() > 1
        && p.starts_with('/')
        && p[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        })
}

/// The token endpoint's and the management endpoint's paths: well-formed, clear of discovery, and
/// not overlapping each other.
fn check_endpoint_paths(t: &TokenEndpointSettings, src: &mut Source) {
    for (key, p) in [("path", &t.path), ("management_path", &t.management_path)] {
        if !is_endpoint_path(p) {
            src.at(
                p,
                format!("token_endpoint.{key}"),
                "must be a path such as /token (segments of A-Z a-z 0-9 - . _ ~)",
            );
        } else if p == "/metadata" || p.starts_with("/.well-known") {
            src.at(p, format!("token_endpoint.{key}"), "is taken by discovery");
        }
    }
    let (tp, mp) = (&t.path, &t.management_path);
    if tp == mp || tp.starts_with(&format!("{mp}/")) || mp.starts_with(&format!("{tp}/")) {
        src.at(
            mp,
            "token_endpoint.management_path",
            "must not overlap token_endpoint.path",
        );
    }
}

/// `token_endpoint.clients` (or its short form `clients_file`) and, for PostgreSQL, `database`.
fn validate_clients(
    t: &TokenEndpointSettings,
    database: Option<&DatabaseSettings>,
    dir: &Path,
    src: &mut Source,
) -> Option<StoreConfig> {
    let c = match (&t.clients, t.clients_file.is_empty()) {
        (Some(_), false) => {
            src.at(
                &t.clients_file,
                "token_endpoint.clients_file",
                "give token_endpoint.clients or clients_file, not both",
            );
            return None;
        }
        (None, true) => {
            src.at(
                "token_endpoint",
                "token_endpoint.clients",
                "is required (e.g. `clients: {store: file, file: clients.yaml}`)",
            );
            return None;
        }
        (None, false) => return Some(StoreConfig::File(resolve(dir, &t.clients_file))),
        (Some(c), true) => c,
    };
    match (c.store.as_str(), &c.file) {
        ("file", Some(f)) if !f.is_empty() => Some(StoreConfig::File(resolve(dir, f))),
        ("file", _) => {
            src.at(
                "clients",
                "token_endpoint.clients.file",
                "is required with store: file",
            );
            None
        }
        ("postgres", Some(f)) => {
            src.at(f, "token_endpoint.clients.file", "is for store: file only");
            None
        }
        ("postgres", None) => {
            if c.resync_seconds == 0 || c.resync_seconds > 86_400 {
                src.at(
                    "resync_seconds",
                    "token_endpoint.clients.resync_seconds",
                    "must be between 1 and 86400",
                );
            }
            let Some(d) = database else {
                src.at(
                    "postgres",
                    "database",
                    "is required with token_endpoint.clients.store: postgres",
                );
                return None;
            };
            let db = validate_database(d, dir, src)?;
            Some(StoreConfig::Postgres {
                db: Box::new(db),
                resync_every: Duration::from_secs(c.resync_seconds.clamp(1, 86_400)),
            })
        }
        (other, _) => {
            src.at(
                other,
                "token_endpoint.clients.store",
                "must be `file` or `postgres`",
            );
            None
        }
    }
}

/// The `database` section: the URL read from its secret, the pool and timeouts.
pub(super) fn validate_database(
    d: &DatabaseSettings,
    dir: &Path,
    src: &mut Source,
) -> Option<DbConfig> {
    let before = src.problems.len();
    if d.pool_size == 0 || d.pool_size > 64 {
        src.at(
            "pool_size",
            "database.pool_size",
            "must be between 1 and 64",
        );
    }
    for (key, v) in [
        ("connect_timeout_seconds", d.connect_timeout_seconds),
        ("query_timeout_seconds", d.query_timeout_seconds),
    ] {
        if v == 0 || v > 300 {
            src.at(key, format!("database.{key}"), "must be between 1 and 300");
        }
    }
    let url_file = d.url_file.as_deref().map(|f| resolve(dir, f));
    let url = DbConfig::read_url(&d.url_env, url_file.as_deref())
        .map_err(|m| {
            let key = if d.url_file.is_some() {
                "url_file"
            } else {
                "url_env"
            };
            src.at(key, format!("database.{key}"), m)
        })
        .ok();
    let ca_file = d.ca_file.as_deref().map(|f| resolve(dir, f));
    if let Some(ca) = &ca_file {
        if !ca.is_file() {
            src.at(
                d.ca_file.as_deref().unwrap_or_default(),
                "database.ca_file",
                format!("{} is not a readable file", ca.display()),
            );
        }
    }
    if src.problems.len() != before {
        return None;
    }
    let (pg, source) = url?;
    Some(DbConfig {
        pg,
        source,
        ca_file,
        pool_size: d.pool_size,
        connect_timeout: Duration::from_secs(d.connect_timeout_seconds),
        query_timeout: Duration::from_secs(d.query_timeout_seconds),
    })
}

pub(super) fn validate_token(
    t: &TokenEndpointSettings,
    database: Option<&DatabaseSettings>,
    public: &PublicBase,
    dir: &Path,
    src: &mut Source,
) -> Option<TokenSettings> {
    let before = src.problems.len();
    check_endpoint_paths(t, src);
    let authorize_url = match &t.authorize_url {
        Some(u) => {
            if let Err(m) = UpstreamUrl::parse(u) {
                src.at(u, "token_endpoint.authorize_url", m);
            }
            u.clone()
        }
        None => format!("{}/authorize", public.url),
    };
    let url = match &t.url {
        Some(u) => match UpstreamUrl::parse(u) {
            Ok(_) => u.trim_end_matches('/').to_string(),
            Err(m) => {
                src.at(u, "token_endpoint.url", m);
                String::new()
            }
        },
        None => format!("{}{}", public.url, t.path),
    };
    if !(60..=604_800).contains(&t.lifetime_seconds) {
        src.at(
            "lifetime_seconds",
            "token_endpoint.lifetime_seconds",
            "must be between 60 and 604800",
        );
    }
    let fa = &t.failed_auth;
    if fa.per_client == 0 || fa.per_source == 0 || !(1..=86_400).contains(&fa.window_seconds) {
        src.at(
            "failed_auth",
            "token_endpoint.failed_auth",
            "per_client and per_source must be at least 1, window_seconds between 1 and 86400",
        );
    }
    let active = SigningKey::from_file(&resolve(dir, &t.signing_key))
        .map_err(|m| src.at(&t.signing_key, "token_endpoint.signing_key", m))
        .ok();
    let mut previous = Vec::new();
    for (i, p) in t.previous_signing_keys.iter().enumerate() {
        match SigningKey::from_file(&resolve(dir, p)) {
            Ok(k) => previous.push(k),
            Err(m) => src.at(p, format!("token_endpoint.previous_signing_keys[{i}]"), m),
        }
    }
    let clients = validate_clients(t, database, dir, src);
    let issuer = t.issuer.clone().unwrap_or_else(|| public.url.clone());
    let audience = t.audience.clone().unwrap_or_else(|| public.url.clone());
    if issuer.is_empty() || audience.is_empty() {
        src.at(
            "token_endpoint",
            "token_endpoint",
            "issuer and audience must not be empty",
        );
    }
    if src.problems.len() != before {
        return None;
    }
    Some(TokenSettings {
        path: t.path.clone(),
        url,
        authorize_url,
        management_path: t.management_path.clone(),
        issuer,
        audience,
        lifetime: Duration::from_secs(t.lifetime_seconds),
        keys: SigningKeys::new(active?, previous),
        clients: clients?,
        grant_type_hyphen_alias: t.grant_type_hyphen_alias,
        failed_auth: limiter::Limits {
            per_client: fa.per_client,
            per_source: fa.per_source,
            window_seconds: fa.window_seconds,
        },
    })
}
