//! The issuers fhir-edge trusts (`auth.issuers`): who each is, the keys it verifies with (PEM public
//! keys, HMAC secret files, a JWK Set file, a JWK Set URL or OpenID Provider metadata), the algorithms
//! it may use and the tenants it may grant. Files are read here; URLs are only checked (the
//! fetching is [`crate::auth::remote`]'s, once the proxy runs).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

use crate::auth::issuer::{Issuer, IssuerSpec};
use crate::auth::keys::{read_jwks, JwksOrigin, Key};
use crate::auth::remote::{Remote, Source as RemoteSource};
use crate::config::problems::Source;
use crate::config::resolve;
use crate::config::settings::{
    AuthSettings, FetchSettings, IssuerKeySettings, IssuerSettings, IssuerTenants,
};
use crate::tenant::TenantId;

/// Every external issuer, checked; `None` entries had problems (recorded in `src`).
pub(super) fn load_issuers(auth: &AuthSettings, dir: &Path, src: &mut Source) -> Vec<Arc<Issuer>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, iss) in auth.issuers.iter().enumerate() {
        let key = format!("auth.issuers[{i}]");
        if !iss.issuer.is_empty() && !seen.insert(iss.issuer.as_str()) {
            src.at(&iss.issuer, format!("{key}.issuer"), "is configured twice");
        }
        if let Some(issuer) = load_issuer(iss, &key, dir, src) {
            out.push(Arc::new(issuer));
        }
    }
    out
}

fn load_issuer(iss: &IssuerSettings, key: &str, dir: &Path, src: &mut Source) -> Option<Issuer> {
    let before = src.len();
    if iss.issuer.is_empty() {
        src.at("issuer:", format!("{key}.issuer"), "must not be empty");
    }
    if iss.audience.is_empty() {
        src.at("audience:", format!("{key}.audience"), "must not be empty");
    }
    let algorithms = algorithms(iss, key, src);
    let tenants = tenants(iss, key, src);
    if iss.tenant_claim.as_deref().is_some_and(str::is_empty) {
        src.at(
            "tenant_claim",
            format!("{key}.tenant_claim"),
            "must not be empty",
        );
    }
    let mut fixed = Vec::new();
    for (j, k) in iss.keys.iter().enumerate() {
        match load_key(k, dir) {
            Ok((alg, dk)) if algorithms.is_empty() || algorithms.contains(&alg) => {
                fixed.push(Key::new(k.kid.clone(), vec![alg], dk))
            }
            Ok((alg, _)) => src.at(
                &k.alg,
                format!("{key}.keys[{j}]"),
                format!("alg {alg:?} is not in the issuer's `algorithms`"),
            ),
            Err(m) => {
                let needle = k
                    .public_key_file
                    .as_deref()
                    .or(k.secret_file.as_deref())
                    .unwrap_or(&k.alg);
                src.at(needle, format!("{key}.keys[{j}]"), m)
            }
        }
    }
    if let Some(jwks) = &iss.jwks_file {
        let read = std::fs::read(resolve(dir, jwks))
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| read_jwks(&text, &algorithms, JwksOrigin::File, 10_000));
        match read {
            Ok(r) if r.keys.is_empty() => {
                let why = r.warnings.first().cloned().unwrap_or_default();
                src.at(
                    jwks,
                    format!("{key}.jwks_file"),
                    format!("holds no usable key {why}"),
                )
            }
            Ok(r) => {
                for w in r.warnings {
                    log::warn!("{key}.jwks_file: {w}");
                }
                fixed.extend(r.keys)
            }
            Err(m) => src.at(jwks, format!("{key}.jwks_file"), m),
        }
    }
    let remote = remote(iss, &algorithms, key, dir, src);
    if iss.keys.is_empty() && iss.jwks_file.is_none() && remote.is_none() && src.len() == before {
        src.at(
            &iss.issuer,
            key,
            "an issuer needs `keys`, `jwks_file`, `jwks_uri` or `discovery`",
        );
    }
    if src.len() != before {
        return None;
    }
    let spec = IssuerSpec {
        iss: iss.issuer.clone(),
        label: iss.name.clone().unwrap_or_else(|| iss.issuer.clone()),
        audience: iss.audience.clone(),
        own: false,
        tenants: tenants?,
        scope_claim: iss.scope_claim,
        tenant_claim: iss.tenant_claim.clone(),
    };
    Issuer::new(spec, fixed, remote)
        .map_err(|m| src.at(&iss.issuer, key, m))
        .ok()
}

fn algorithms(iss: &IssuerSettings, key: &str, src: &mut Source) -> Vec<Algorithm> {
    let mut out = Vec::new();
    for a in &iss.algorithms {
        match a.parse::<Algorithm>() {
            Ok(alg) => out.push(alg),
            Err(_) => src.at(
                a,
                format!("{key}.algorithms"),
                format!("unsupported algorithm `{a}`"),
            ),
        }
    }
    let remote = iss.jwks_uri.is_some() || iss.discovery.is_some();
    if remote && iss.algorithms.is_empty() {
        src.at(
            &iss.issuer,
            format!("{key}.algorithms"),
            "is required with jwks_uri or discovery (e.g. [RS256])",
        );
    }
    if remote && out.iter().any(|a| a.family() == AlgorithmFamily::Hmac) {
        src.at(
            "HS",
            format!("{key}.algorithms"),
            "HMAC keys are never fetched from a URL: give them as `keys` files",
        );
    }
    out
}

/// `Some(None)`: any tenant; `Some(Some(set))`: these; `None`: a problem was recorded.
fn tenants(iss: &IssuerSettings, key: &str, src: &mut Source) -> Option<Option<HashSet<TenantId>>> {
    match &iss.tenants {
        None => {
            src.at(
                &iss.issuer,
                format!("{key}.tenants"),
                "is required: the tenant GUIDs this issuer may grant, or `any`",
            );
            None
        }
        Some(IssuerTenants::Any) => Some(None),
        Some(IssuerTenants::List(l)) if l.is_empty() => {
            src.at(
                "tenants",
                format!("{key}.tenants"),
                "is empty: list the tenant GUIDs this issuer may grant",
            );
            None
        }
        Some(IssuerTenants::List(l)) => {
            let mut set = HashSet::new();
            for t in l {
                match TenantId::parse(t) {
                    Some(id) => {
                        set.insert(id);
                    }
                    None => {
                        src.at(
                            t,
                            format!("{key}.tenants"),
                            format!("`{t}` is not a tenant GUID"),
                        );
                        return None;
                    }
                }
            }
            Some(Some(set))
        }
    }
}

/// The remote key source, checked (no fetch).
fn remote(
    iss: &IssuerSettings,
    algorithms: &[Algorithm],
    key: &str,
    dir: &Path,
    src: &mut Source,
) -> Option<Remote> {
    let f = &iss.fetch;
    let source = match (&iss.jwks_uri, &iss.discovery) {
        (Some(_), Some(_)) => {
            src.at(&iss.issuer, key, "give `jwks_uri` or `discovery`, not both");
            return None;
        }
        (Some(u), None) => {
            RemoteSource::JwksUri(checked_url(u, f, &format!("{key}.jwks_uri"), src)?)
        }
        (None, Some(u)) => {
            RemoteSource::Discovery(checked_url(u, f, &format!("{key}.discovery"), src)?)
        }
        (None, None) => {
            if iss.cache_file.is_some() {
                src.at(
                    "cache_file",
                    format!("{key}.cache_file"),
                    "only keys fetched from jwks_uri or discovery are cached",
                );
            }
            return None;
        }
    };
    check_fetch_settings(f, key, src);
    let ca_pem = match &f.ca_file {
        None => None,
        Some(p) => match std::fs::read(resolve(dir, p)) {
            Ok(pem) if reqwest::Certificate::from_pem_bundle(&pem).is_ok_and(|c| !c.is_empty()) => {
                Some(pem)
            }
            Ok(_) => {
                src.at(
                    p,
                    format!("{key}.fetch.ca_file"),
                    "holds no PEM certificate",
                );
                return None;
            }
            Err(e) => {
                src.at(
                    p,
                    format!("{key}.fetch.ca_file"),
                    format!("cannot read: {e}"),
                );
                return None;
            }
        },
    };
    Some(Remote::new(
        source,
        f.clone(),
        ca_pem,
        iss.cache_file.as_deref().map(|p| resolve(dir, p)),
        algorithms.to_vec(),
    ))
}

/// An absolute `https` URL with a host (`http` only with `fetch.allow_http`).
fn checked_url(u: &str, f: &FetchSettings, key: &str, src: &mut Source) -> Option<String> {
    let problem = match reqwest::Url::parse(u) {
        Err(e) => Some(format!("is not a URL: {e}")),
        Ok(url) if url.host_str().is_none_or(str::is_empty) => Some("has no host".to_string()),
        Ok(url) if url.scheme() == "https" => None,
        Ok(url) if url.scheme() == "http" && f.allow_http => None,
        Ok(url) if url.scheme() == "http" => Some(
            "must be https (plain http only with fetch.allow_http, for tests: keys fetched in the clear can be replaced)"
                .to_string(),
        ),
        Ok(url) => Some(format!("has scheme `{}`, not https", url.scheme())),
    };
    match problem {
        Some(m) => {
            src.at(u, key, m);
            None
        }
        None => Some(u.to_string()),
    }
}

fn check_fetch_settings(f: &FetchSettings, key: &str, src: &mut Source) {
    let mut bad = |field: &str, m: &str| src.at(field, format!("{key}.fetch.{field}"), m);
    if !(100..=60_000).contains(&f.connect_timeout_ms) {
        bad("connect_timeout_ms", "must be between 100 and 60000");
    }
    if !(100..=120_000).contains(&f.timeout_ms) {
        bad("timeout_ms", "must be between 100 and 120000");
    }
    if !(1024..=64 << 20).contains(&f.max_bytes) {
        bad("max_bytes", "must be between 1024 and 67108864");
    }
    if !(1..=10_000).contains(&f.max_keys) {
        bad("max_keys", "must be between 1 and 10000");
    }
    if f.min_refresh_seconds == 0 || f.min_refresh_seconds > f.max_refresh_seconds {
        bad(
            "min_refresh_seconds",
            "must be at least 1 and at most max_refresh_seconds",
        );
    }
    if f.retry_seconds == 0 {
        bad("retry_seconds", "must be at least 1");
    }
    if f.unknown_kid_interval_seconds == 0 {
        bad("unknown_kid_interval_seconds", "must be at least 1");
    }
    if f.unknown_kid_wait_ms > 10_000 {
        bad("unknown_kid_wait_ms", "must be at most 10000");
    }
}

fn load_key(k: &IssuerKeySettings, dir: &Path) -> Result<(Algorithm, DecodingKey), String> {
    let alg: Algorithm = k
        .alg
        .parse()
        .map_err(|_| format!("unsupported alg `{}`", k.alg))?;
    use jsonwebtoken::AlgorithmFamily as F;
    match (alg.family(), &k.public_key_file, &k.secret_file) {
        (F::Hmac, None, Some(secret)) => {
            let bytes = std::fs::read(resolve(dir, secret))
                .map_err(|e| format!("cannot read secret_file: {e}"))?;
            // A trailing newline from `echo … > file` is not part of the secret.
            let trimmed = bytes.trim_ascii_end();
            if trimmed.len() < 32 {
                return Err("HMAC secret must be at least 32 bytes (RFC 7518 §3.2)".into());
            }
            DecodingKey::from_secret(trimmed)
                .map(|dk| (alg, dk))
                .map_err(|e| format!("bad secret: {e}"))
        }
        (F::Hmac, _, _) => Err("HMAC keys need `secret_file` (and no public_key_file)".into()),
        (family, Some(pem), None) => {
            let bytes = std::fs::read(resolve(dir, pem))
                .map_err(|e| format!("cannot read public_key_file: {e}"))?;
            let dk = match family {
                F::Rsa => DecodingKey::from_rsa_pem(&bytes),
                F::Ec => DecodingKey::from_ec_pem(&bytes),
                F::Ed => DecodingKey::from_ed_pem(&bytes),
                _ => return Err("unsupported key family".into()),
            }
            .map_err(|e| format!("public_key_file is not a {family:?} public key in PEM: {e}"))?;
            Ok((alg, dk))
        }
        (_, _, _) => Err("asymmetric keys need `public_key_file` (and no secret_file)".into()),
    }
}
