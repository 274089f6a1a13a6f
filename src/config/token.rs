//! The `token_endpoint` section: fhir-edge's own OAuth 2.0 token endpoint, its signing keys and the
//! client registry file.

use std::path::Path;
use std::time::Duration;

use crate::config::problems::Source;
use crate::config::settings::TokenEndpointSettings;
use crate::config::{resolve, PublicBase};
use crate::routing::upstream::UpstreamUrl;
use crate::token::keys::{SigningKey, SigningKeys};
use crate::token::{limiter, TokenSettings};

fn is_endpoint_path(p: &str) -> bool {
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

pub(super) fn validate_token(
    t: &TokenEndpointSettings,
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
        clients_file: resolve(dir, &t.clients_file),
        grant_type_hyphen_alias: t.grant_type_hyphen_alias,
        failed_auth: limiter::Limits {
            per_client: fa.per_client,
            per_source: fa.per_source,
            window_seconds: fa.window_seconds,
        },
    })
}
