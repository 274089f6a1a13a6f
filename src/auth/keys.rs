//! One issuer's verification keys at one moment ([`KeySet`]), and how a JWK Set becomes one.
//!
//! Every key carries the algorithms it may verify: the one its configuration or its JWK `alg` names,
//! or, for a JWK without `alg` (Entra ID publishes those), the issuer's allowed algorithms that fit
//! its `kty`/`crv`. A token's `alg` must be one of them, which shuts out `alg: none` and the "HS256
//! signed with the RSA public key" confusion (RFC 8725 §2.1, §3.1). A JWK whose `alg`, `use` or
//! `key_ops` contradict verifying with it is left out with a warning; a symmetric key is never taken
//! from a URL.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

use super::claims::strict_object;
use super::AuthFailure;

/// One verification key.
#[derive(Clone)]
pub(crate) struct Key {
    pub kid: Option<String>,
    /// The algorithms it may verify (never empty, all of the key's family).
    pub algs: Vec<Algorithm>,
    pub key: DecodingKey,
    /// When it last verified a token (Unix seconds), shared by the key sets that hold this key.
    pub last_used: Arc<AtomicU64>,
}

impl Key {
    pub(crate) fn new(kid: Option<String>, algs: Vec<Algorithm>, key: DecodingKey) -> Key {
        Key {
            kid,
            algs,
            key,
            last_used: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Notes a verification (at most one write per key per second).
    pub(crate) fn mark_used(&self, now: u64) {
        if self.last_used.load(Ordering::Relaxed) != now {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }
}

/// One issuer's keys. A `kid` picks exactly one key; a token without `kid` may use the one kid-less
/// key of its `alg` or, when every key of that `alg` has a kid, the only such key.
#[derive(Default)]
pub(crate) struct KeySet {
    keys: Vec<Key>,
    by_kid: HashMap<String, usize>,
}

impl KeySet {
    /// Refuses two keys with one kid, and two kid-less keys sharing an algorithm.
    pub(crate) fn new(keys: Vec<Key>) -> Result<KeySet, String> {
        let mut by_kid = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            match &k.kid {
                Some(kid) => {
                    if by_kid.insert(kid.clone(), i).is_some() {
                        return Err(format!("kid `{kid}` is used by two keys"));
                    }
                }
                None => {
                    let clash = keys[..i]
                        .iter()
                        .filter(|o| o.kid.is_none())
                        .find_map(|o| o.algs.iter().find(|a| k.algs.contains(a)));
                    if let Some(a) = clash {
                        return Err(format!(
                            "two {a:?} keys without a kid: a token without kid could not choose"
                        ));
                    }
                }
            }
        }
        Ok(KeySet { keys, by_kid })
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(crate) fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The key for a token's `kid` and `alg`: [`AuthFailure::UnknownKey`] when none is held,
    /// [`AuthFailure::BadSignature`] when the key may not verify `alg`.
    pub(crate) fn select(&self, kid: Option<&str>, alg: Algorithm) -> Result<&Key, AuthFailure> {
        let key = match kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .and_then(|&i| self.keys.get(i))
                .ok_or(AuthFailure::UnknownKey)?,
            None => {
                // Trying several keys would turn one request into several signature checks.
                let fits = |k: &&Key| k.algs.contains(&alg);
                let kidless_exist = self.keys.iter().filter(fits).any(|k| k.kid.is_none());
                let mut pool = self
                    .keys
                    .iter()
                    .filter(fits)
                    .filter(|k| !(kidless_exist && k.kid.is_some()));
                match (pool.next(), pool.next()) {
                    (Some(k), None) => k,
                    _ => return Err(AuthFailure::UnknownKey),
                }
            }
        };
        if !key.algs.contains(&alg) {
            return Err(AuthFailure::BadSignature);
        }
        Ok(key)
    }
}

/// Where a JWK Set came from: a file may hold HMAC secrets, a URL may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JwksOrigin {
    File,
    Remote,
}

/// A JWK Set read: its usable keys, and a warning for each key left out.
pub(crate) struct ReadJwks {
    pub keys: Vec<Key>,
    pub warnings: Vec<String>,
}

/// Reads a JWK Set: a JSON object of bounded depth, no member twice, at most `max_keys` keys.
/// `allowed` empty means each key must name its `alg` (and any signing algorithm is allowed).
pub(crate) fn read_jwks(
    bytes: &[u8],
    allowed: &[Algorithm],
    origin: JwksOrigin,
    max_keys: usize,
) -> Result<ReadJwks, String> {
    let mut set = strict_object(bytes, 6).map_err(|e| format!("not a JWK Set: {e}"))?;
    let Some(serde_json::Value::Array(items)) = set.remove("keys") else {
        return Err("not a JWK Set: no `keys` array".into());
    };
    if items.len() > max_keys {
        return Err(format!(
            "holds {} keys, more than the {max_keys} allowed",
            items.len()
        ));
    }
    let mut out = ReadJwks {
        keys: Vec::new(),
        warnings: Vec::new(),
    };
    for (i, item) in items.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(item) {
            Ok(j) => j,
            Err(e) => {
                out.warnings
                    .push(format!("keys[{i}] is not a usable JWK ({e}); left out"));
                continue;
            }
        };
        match usable(&jwk, allowed, origin) {
            Ok(Some(algs)) => match DecodingKey::from_jwk(&jwk) {
                Ok(dk) => {
                    if algs.iter().any(|a| a.family() == AlgorithmFamily::Hmac)
                        && dk.try_get_as_bytes().map_or(true, |b| b.len() < 32)
                    {
                        return Err(format!("keys[{i}]: HMAC secret must be at least 32 bytes"));
                    }
                    out.keys.push(Key::new(jwk.common.key_id.clone(), algs, dk));
                }
                Err(e) => out.warnings.push(format!("keys[{i}]: {e}; left out")),
            },
            Ok(None) => {}
            Err(why) => out.warnings.push(format!(
                "keys[{i}]{}: {why}; left out",
                jwk.common
                    .key_id
                    .as_deref()
                    .map(|k| format!(" (kid `{k}`)"))
                    .unwrap_or_default()
            )),
        }
    }
    Ok(out)
}

/// The algorithms a JWK may verify here; `Ok(None)` for a key of no allowed algorithm (not an
/// error: a set may hold keys for other uses), `Err` for a key that contradicts itself.
fn usable(
    jwk: &Jwk,
    allowed: &[Algorithm],
    origin: JwksOrigin,
) -> Result<Option<Vec<Algorithm>>, String> {
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(_) => return Err("its `use` is not `sig`".into()),
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.iter().any(|o| matches!(o, KeyOperations::Verify)) {
            return Err("its `key_ops` do not include `verify`".into());
        }
    }
    let fits = fitting(&jwk.algorithm);
    if fits.is_empty() {
        return Ok(None);
    }
    if fits[0].family() == AlgorithmFamily::Hmac && origin == JwksOrigin::Remote {
        return Err("a symmetric key is never taken from a URL".into());
    }
    match jwk.common.key_algorithm {
        Some(ka) => {
            let Some(alg) = signing_alg(ka) else {
                return Ok(None);
            };
            if !fits.contains(&alg) {
                return Err(format!("its alg {alg:?} does not fit its key type"));
            }
            if !allowed.is_empty() && !allowed.contains(&alg) {
                return Ok(None);
            }
            Ok(Some(vec![alg]))
        }
        None if allowed.is_empty() => {
            Err("it has no `alg`, and the issuer lists no `algorithms`".into())
        }
        None => {
            let algs: Vec<Algorithm> = fits.into_iter().filter(|a| allowed.contains(a)).collect();
            Ok((!algs.is_empty()).then_some(algs))
        }
    }
}

/// The signature algorithms a key of this type and curve can verify.
fn fitting(params: &AlgorithmParameters) -> Vec<Algorithm> {
    use Algorithm::*;
    match params {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => vec![EdDSA],
        AlgorithmParameters::OctetKey(_) => vec![HS256, HS384, HS512],
        _ => vec![],
    }
}

/// A JWK `alg` as a signature algorithm (`None` for encryption algorithms).
fn signing_alg(ka: KeyAlgorithm) -> Option<Algorithm> {
    serde_json::to_value(ka)
        .ok()
        .and_then(|v| v.as_str().and_then(|s| s.parse::<Algorithm>().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Algorithm::*;

    const N: &str = "u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw";

    fn rsa(extra: &str) -> String {
        format!(r#"{{"keys":[{{"kty":"RSA","kid":"r","n":"{N}","e":"AQAB"{extra}}}]}}"#)
    }

    #[test]
    fn a_jwk_without_alg_takes_the_allowed_algorithms_it_fits() {
        let r = read_jwks(rsa("").as_bytes(), &[RS256, ES256], JwksOrigin::Remote, 10).unwrap();
        assert_eq!(r.keys.len(), 1);
        assert_eq!(r.keys[0].algs, vec![RS256]);
        let none = read_jwks(rsa("").as_bytes(), &[ES256], JwksOrigin::Remote, 10).unwrap();
        assert!(
            none.keys.is_empty(),
            "an RSA key is no use to an ES256-only issuer"
        );
        assert!(read_jwks(rsa("").as_bytes(), &[], JwksOrigin::File, 10)
            .unwrap()
            .keys
            .is_empty());
    }

    #[test]
    fn contradicting_keys_are_left_out_with_a_warning() {
        for extra in [
            r#","use":"enc""#,
            r#","key_ops":["encrypt"]"#,
            r#","alg":"ES256""#,
        ] {
            let r = read_jwks(
                rsa(extra).as_bytes(),
                &[RS256, ES256],
                JwksOrigin::Remote,
                10,
            )
            .unwrap();
            assert!(r.keys.is_empty(), "{extra}");
            assert_eq!(r.warnings.len(), 1, "{extra}");
        }
        let ok = read_jwks(
            rsa(r#","use":"sig","alg":"RS256","x5t":"abc""#).as_bytes(),
            &[RS256],
            JwksOrigin::Remote,
            10,
        )
        .unwrap();
        assert_eq!(ok.keys.len(), 1);
    }

    #[test]
    fn symmetric_keys_never_come_from_a_url() {
        let set = br#"{"keys":[{"kty":"oct","kid":"h","alg":"HS256","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldC0xMjM0"}]}"#;
        assert!(read_jwks(set, &[HS256], JwksOrigin::Remote, 10)
            .unwrap()
            .keys
            .is_empty());
        assert_eq!(
            read_jwks(set, &[HS256], JwksOrigin::File, 10)
                .unwrap()
                .keys
                .len(),
            1
        );
    }

    #[test]
    fn sets_are_bounded() {
        let two = format!(
            r#"{{"keys":[{{"kty":"RSA","kid":"a","n":"{N}","e":"AQAB"}},{{"kty":"RSA","kid":"b","n":"{N}","e":"AQAB"}}]}}"#
        );
        assert!(read_jwks(two.as_bytes(), &[RS256], JwksOrigin::Remote, 1).is_err());
        let deep = format!(r#"{{"keys":[],"x":{}{}}}"#, "[".repeat(50), "]".repeat(50));
        assert!(read_jwks(deep.as_bytes(), &[RS256], JwksOrigin::Remote, 10).is_err());
        assert!(read_jwks(b"[]", &[RS256], JwksOrigin::Remote, 10).is_err());
    }

    #[test]
    fn a_kid_picks_one_key_and_the_key_fixes_the_algorithm() {
        let r = read_jwks(rsa("").as_bytes(), &[RS256, PS256], JwksOrigin::Remote, 10).unwrap();
        let set = KeySet::new(r.keys).unwrap();
        assert!(set.select(Some("r"), RS256).is_ok());
        assert!(set.select(Some("r"), PS256).is_ok());
        assert_eq!(
            set.select(Some("r"), HS256).err(),
            Some(AuthFailure::BadSignature)
        );
        assert_eq!(
            set.select(Some("x"), RS256).err(),
            Some(AuthFailure::UnknownKey)
        );
        assert!(set.select(None, RS256).is_ok(), "the only RS256 key");
        let dup = KeySet::new(vec![set.keys()[0].clone(), set.keys()[0].clone()]);
        assert!(dup.is_err());
    }
}
