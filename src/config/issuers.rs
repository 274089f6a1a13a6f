//! The keys of the external issuers fhir-edge trusts (`auth.issuers`): PEM public keys, HMAC secret
//! files and JWK Set files, each key pinned to one algorithm.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey};

use crate::auth::VerifyKey;
use crate::config::problems::Source;
use crate::config::resolve;
use crate::config::settings::{AuthSettings, IssuerKeySettings};

pub(super) fn load_issuers(auth: &AuthSettings, dir: &Path, src: &mut Source) -> Vec<VerifyKey> {
    let mut out: Vec<VerifyKey> = Vec::new();
    for (i, iss) in auth.issuers.iter().enumerate() {
        let key = format!("auth.issuers[{i}]");
        if iss.issuer.is_empty() {
            src.at("issuer:", format!("{key}.issuer"), "must not be empty");
        }
        if iss.audience.is_empty() {
            src.at("audience:", format!("{key}.audience"), "must not be empty");
        }
        let before = out.len();
        for (j, k) in iss.keys.iter().enumerate() {
            let kkey = format!("{key}.keys[{j}]");
            match load_key(k, dir) {
                Ok((alg, dk)) => out.push(VerifyKey {
                    kid: k.kid.clone(),
                    alg,
                    key: dk,
                    issuer: iss.issuer.clone(),
                    audience: iss.audience.clone(),
                    own: false,
                }),
                Err(m) => {
                    let needle = k
                        .public_key_file
                        .as_deref()
                        .or(k.secret_file.as_deref())
                        .unwrap_or(&k.alg);
                    src.at(needle, kkey, m)
                }
            }
        }
        if let Some(jwks) = &iss.jwks_file {
            match load_jwks(&resolve(dir, jwks)) {
                Ok(keys) => out.extend(keys.into_iter().map(|(kid, alg, dk)| VerifyKey {
                    kid,
                    alg,
                    key: dk,
                    issuer: iss.issuer.clone(),
                    audience: iss.audience.clone(),
                    own: false,
                })),
                Err(m) => src.at(jwks, format!("{key}.jwks_file"), m),
            }
        }
        if out.len() == before && iss.keys.is_empty() && iss.jwks_file.is_none() {
            src.at(&iss.issuer, key, "an issuer needs `keys` or `jwks_file`");
        }
    }
    out
}

/// A kid must pick exactly one key, and a token without kid must find at most one kid-less key of its
/// alg.
pub(super) fn check_key_ids(keys: &[VerifyKey], src: &mut Source) {
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            match (&a.kid, &b.kid) {
                (Some(x), Some(y)) if x == y => {
                    src.at(x, "auth.issuers", format!("kid `{x}` is used by two keys"))
                }
                (None, None) if a.alg == b.alg => src.at(
                    "keys",
                    "auth.issuers",
                    format!(
                        "two {:?} keys without a kid: a token without kid could not choose",
                        a.alg
                    ),
                ),
                _ => {}
            }
        }
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

type JwksKey = (Option<String>, Algorithm, DecodingKey);

fn load_jwks(path: &Path) -> Result<Vec<JwksKey>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&text).map_err(|e| format!("not a JWK Set: {e}"))?;
    let mut out = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        // The key must fix its algorithm; a JWK without `alg` would let the token header choose.
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|ka| serde_json::to_value(ka).ok())
            .and_then(|v| v.as_str().and_then(|s| s.parse::<Algorithm>().ok()))
            .ok_or_else(|| format!("keys[{i}] has no signing `alg`"))?;
        let dk = DecodingKey::from_jwk(jwk).map_err(|e| format!("keys[{i}]: {e}"))?;
        if alg.family() == jsonwebtoken::AlgorithmFamily::Hmac
            && dk.try_get_as_bytes().map_or(true, |b| b.len() < 32)
        {
            return Err(format!("keys[{i}]: HMAC secret must be at least 32 bytes"));
        }
        out.push((jwk.common.key_id.clone(), alg, dk));
    }
    if out.is_empty() {
        return Err("contains no keys".into());
    }
    Ok(out)
}
