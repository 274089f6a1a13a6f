//! JWT access-token verification (RFC 7519, RFC 9068, RFC 8725).
//!
//! The token is read once ([`super::claims::read`]): header and claims, strictly. Its `iss` picks the
//! trusted [`Issuer`] (exactly equal, or 401); the header's `kid` (or, without one, its `alg`) picks
//! one of that issuer's current keys, and the key fixes the algorithms it may verify (RFC 8725 §2.1,
//! §3.1). Only then is the signature checked, and then the claims: `exp`, `iss` and `aud` are
//! required, `nbf` is checked when present, each with the configured leeway. `jku`, `x5u`, `x5c` and
//! `jwk` headers are never followed or used.

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey};

use super::claims::{self, Claims};
use super::issuer::{Issuer, IssuerSpec};
use super::keys::Key;
use super::AuthFailure;
use crate::config::settings::ScopeClaim;

/// One verification key of an issuer that trusts any tenant and reads the tenant from `scope`: the
/// shape of a key for benchmarks, fuzz targets and tests ([`Verifier::new`]).
pub struct VerifyKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: DecodingKey,
    pub issuer: String,
    pub audience: String,
    /// One of fhir-edge's own token-endpoint keys: its tokens are also checked against the client
    /// registry (revoked secrets, removed or disabled clients).
    pub own: bool,
}

/// Why a token was not verified.
pub(crate) enum Refused {
    Failed(AuthFailure),
    /// Its kid is not among the keys of an issuer whose keys are fetched: a refetch may find it.
    UnknownKid(Arc<Issuer>),
}

impl From<AuthFailure> for Refused {
    fn from(f: AuthFailure) -> Refused {
        Refused::Failed(f)
    }
}

impl Refused {
    /// The failure to answer with (an unknown kid is [`AuthFailure::UnknownKey`]).
    pub(crate) fn failure(&self) -> AuthFailure {
        match self {
            Refused::Failed(f) => *f,
            Refused::UnknownKid(_) => AuthFailure::UnknownKey,
        }
    }
}

/// Verifies bearer tokens against the trusted issuers' current keys.
pub struct Verifier {
    issuers: HashMap<String, Arc<Issuer>>,
    leeway: u64,
}

impl Verifier {
    /// A verifier over `issuers` (their `iss` values are distinct: the config loader checks it).
    pub(crate) fn from_issuers(issuers: Vec<Arc<Issuer>>, leeway_seconds: u64) -> Verifier {
        Verifier {
            issuers: issuers
                .into_iter()
                .map(|i| (i.spec.iss.clone(), i))
                .collect(),
            leeway: leeway_seconds,
        }
    }

    /// A verifier over fixed keys, one issuer per `issuer` value, each trusting any tenant. Keys of
    /// one issuer must have distinct kids.
    pub fn new(keys: Vec<VerifyKey>, leeway_seconds: u64) -> Verifier {
        let mut grouped: Vec<(IssuerSpec, Vec<Key>)> = Vec::new();
        for k in keys {
            let key = Key::new(k.kid, vec![k.alg], k.key);
            match grouped.iter_mut().find(|(s, _)| s.iss == k.issuer) {
                Some((_, keys)) => keys.push(key),
                None => grouped.push((
                    IssuerSpec {
                        label: k.issuer.clone(),
                        iss: k.issuer,
                        audience: k.audience,
                        own: k.own,
                        tenants: None,
                        scope_claim: ScopeClaim::Scope,
                        tenant_claim: None,
                    },
                    vec![key],
                )),
            }
        }
        let issuers = grouped
            .into_iter()
            .filter_map(|(spec, keys)| Issuer::new(spec, keys, None).ok().map(Arc::new))
            .collect();
        Verifier::from_issuers(issuers, leeway_seconds)
    }

    /// A verifier with one issuer whose keys came from a fetched JWK Set (`jwks`, read as a fetch
    /// reads it), trusting any tenant: the shape of a remote issuer for benchmarks and tests.
    pub fn with_fetched_jwks(
        issuer: &str,
        audience: &str,
        algorithms: &[Algorithm],
        jwks: &[u8],
        leeway_seconds: u64,
    ) -> Result<Verifier, String> {
        use super::keys::{read_jwks, JwksOrigin};
        use super::remote::{Remote, Source};
        let read = read_jwks(jwks, algorithms, JwksOrigin::Remote, 100)?;
        let remote = Remote::new(
            Source::JwksUri(format!("{issuer}/jwks")),
            crate::config::settings::FetchSettings::default(),
            None,
            None,
            algorithms.to_vec(),
        );
        let spec = IssuerSpec {
            iss: issuer.into(),
            label: issuer.into(),
            audience: audience.into(),
            own: false,
            tenants: None,
            scope_claim: ScopeClaim::Scope,
            tenant_claim: None,
        };
        let i = Issuer::new(spec, Vec::new(), Some(remote))?;
        i.set_fetched(read.keys)?;
        Ok(Verifier::from_issuers(vec![Arc::new(i)], leeway_seconds))
    }

    /// Number of keys held now.
    pub fn key_count(&self) -> usize {
        self.issuers.values().map(|i| i.keys().len()).sum()
    }

    /// The trusted issuers.
    pub(crate) fn issuers(&self) -> impl Iterator<Item = &Arc<Issuer>> {
        self.issuers.values()
    }

    /// Verifies `token` (already bounded in size by the bearer extractor): its claims and whether
    /// fhir-edge's own token endpoint issued it.
    pub fn verify(&self, token: &str) -> Result<(Claims, bool), AuthFailure> {
        self.check(token)
            .map(|(c, i)| (c, i.spec.own))
            .map_err(|r| r.failure())
    }

    /// Verifies `token`: its claims and the issuer that vouches for them.
    pub(crate) fn check(&self, token: &str) -> Result<(Claims, &Arc<Issuer>), Refused> {
        let parts = claims::read(token)?;
        let c = parts.claims;
        let iss = c.iss.as_deref().ok_or(AuthFailure::MissingClaim)?;
        let issuer = self.issuers.get(iss).ok_or(AuthFailure::WrongIssuer)?;
        let keys = issuer.keys();
        let key = match keys.select(parts.header.kid.as_deref(), parts.header.alg) {
            Ok(k) => k,
            Err(AuthFailure::UnknownKey) if issuer.remote.is_some() => {
                return Err(Refused::UnknownKid(issuer.clone()))
            }
            Err(f) => return Err(f.into()),
        };
        let alg = parts.header.alg;
        // `select` gave a key whose algorithms include `alg`, all of the key's family.
        match jsonwebtoken::crypto::verify(parts.signature, parts.signed.as_bytes(), &key.key, alg)
        {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err(AuthFailure::BadSignature.into()),
        }
        let now = crate::time::now_unix();
        key.mark_used(now);
        self.validate(&c, issuer, now)?;
        Ok((c, issuer))
    }

    /// The time and audience claims (RFC 7519 §4.1.3–5), with the leeway on both sides.
    fn validate(&self, c: &Claims, issuer: &Issuer, now: u64) -> Result<(), AuthFailure> {
        let (Some(exp), Some(aud)) = (c.exp, &c.aud) else {
            return Err(AuthFailure::MissingClaim);
        };
        let (now, leeway) = (now as f64, self.leeway as f64);
        if exp + leeway < now {
            return Err(AuthFailure::Expired);
        }
        if c.nbf.is_some_and(|nbf| nbf > now + leeway) {
            return Err(AuthFailure::NotYetValid);
        }
        if !aud.contains(&issuer.spec.audience) {
            return Err(AuthFailure::WrongAudience);
        }
        Ok(())
    }
}

/// Signs and verifies a throwaway token: `jsonwebtoken` compiles without a crypto backend and only
/// panics at the first use, so find out at start-up rather than on the first request.
pub(crate) fn self_test() -> Result<(), String> {
    let outcome = std::panic::catch_unwind(|| {
        use jsonwebtoken::{decode, encode, EncodingKey, Header, Validation};
        let secret = b"fhir-edge start-up self test, not a real key";
        let enc = EncodingKey::from_secret(secret).map_err(|e| e.to_string())?;
        let dec = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
        let claims =
            serde_json::json!({"exp": u64::MAX / 2, "iss": "self-test", "aud": "self-test"});
        let token =
            encode(&Header::new(Algorithm::HS256), &claims, &enc).map_err(|e| e.to_string())?;
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&["self-test"]);
        v.set_audience(&["self-test"]);
        decode::<serde_json::Value>(&token, &dec, &v)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    match outcome {
        Ok(r) => r,
        Err(_) => Err("the JWT crypto backend is missing (jsonwebtoken panicked)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"fhir-edge unit-test secret, not a real key";

    fn verifier() -> Verifier {
        Verifier::new(
            vec![VerifyKey {
                kid: Some("k".into()),
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(SECRET).unwrap(),
                issuer: "https://issuer.test/".into(),
                audience: "edge".into(),
                own: false,
            }],
            5,
        )
    }

    fn sign(claims: &serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k".into());
        h.typ = Some("at+jwt".into());
        encode(&h, claims, &EncodingKey::from_secret(SECRET).unwrap()).unwrap()
    }

    fn good() -> serde_json::Value {
        json!({
            "iss": "https://issuer.test/", "aud": "edge", "sub": "c", "client_id": "c",
            "exp": 4_000_000_000u64, "nbf": 1, "iat": 1, "jti": "j",
            "scope": "145f4184-1b0b-41c7-ba24-b3c1291bfda1",
        })
    }

    #[test]
    fn registered_claims_of_the_right_types_verify() {
        let v = verifier();
        assert!(v.verify(&sign(&good())).is_ok());
        let mut c = good();
        c["aud"] = json!(["other", "edge"]);
        c["exp"] = json!(4_000_000_000.5);
        assert!(v.verify(&sign(&c)).is_ok());
    }

    #[test]
    fn an_iss_array_holding_the_trusted_issuer_is_refused() {
        let mut c = good();
        c["iss"] = json!(["https://issuer.test/"]);
        let failure = verifier().verify(&sign(&c)).err();
        assert_eq!(failure, Some(AuthFailure::Malformed401));
    }

    #[test]
    fn every_registered_claim_of_the_wrong_json_type_is_refused() {
        let v = verifier();
        let wrong = [
            ("iss", json!({"iss": "https://issuer.test/"})),
            ("iss", json!(null)),
            ("sub", json!(["c"])),
            ("sub", json!(7)),
            ("aud", json!(7)),
            ("aud", json!(["edge", 7])),
            ("aud", json!({"edge": true})),
            ("exp", json!("4000000000")),
            ("exp", json!(null)),
            ("nbf", json!("1")),
            ("iat", json!([1])),
            ("jti", json!(1)),
            ("scope", json!(["145f4184-1b0b-41c7-ba24-b3c1291bfda1"])),
            ("scope", json!(42)),
            ("client_id", json!({"id": "c"})),
            ("client_id", json!(null)),
        ];
        for (claim, value) in wrong {
            let mut c = good();
            c[claim] = value.clone();
            let failure = v.verify(&sign(&c)).err().map(AuthFailure::class);
            assert_eq!(
                failure,
                Some(super::super::FailureClass::InvalidToken),
                "{claim}: {value}"
            );
        }
    }

    /// ES256 signatures that are not a valid fixed-width `R || S` (RFC 7518 §3.4): zero scalars,
    /// the group order, wrong lengths, ASN.1 DER. Each must be refused by whichever crypto backend
    /// is built.
    #[test]
    fn malformed_es256_signatures_are_refused() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        use base64::Engine;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys");
        let public = std::fs::read(dir.join("es256.pub.pem")).unwrap();
        let private = std::fs::read(dir.join("es256.pem")).unwrap();
        let v = Verifier::new(
            vec![VerifyKey {
                kid: Some("es".into()),
                alg: Algorithm::ES256,
                key: DecodingKey::from_ec_pem(&public).unwrap(),
                issuer: "https://issuer.test/".into(),
                audience: "edge".into(),
                own: false,
            }],
            5,
        );
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("es".into());
        h.typ = Some("at+jwt".into());
        let token = encode(&h, &good(), &EncodingKey::from_ec_pem(&private).unwrap()).unwrap();
        assert!(v.verify(&token).is_ok());
        let (message, sig) = token.rsplit_once('.').unwrap();
        let sig = B64.decode(sig).unwrap();
        assert_eq!(sig.len(), 64);
        let (r, s) = sig.split_at(32);
        // The P-256 group order n: r or s equal to n is as invalid as zero.
        let n = [
            0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2,
            0xfc, 0x63, 0x25, 0x51,
        ];
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("r = s = 0", vec![0; 64]),
            ("r = 0", [&[0; 32][..], s].concat()),
            ("s = 0", [r, &[0; 32][..]].concat()),
            ("r = s = n", [n, n].concat()),
            ("s = n", [r, &n[..]].concat()),
            ("short", sig[..63].to_vec()),
            ("long", [&sig[..], &[0]].concat()),
            ("doubled", [&sig[..], &sig[..]].concat()),
            ("empty", Vec::new()),
            ("DER", der_signature(r, s)),
        ];
        for (why, sig) in bad {
            let forged = format!("{message}.{}", B64.encode(&sig));
            let failure = v.verify(&forged).err();
            assert!(
                matches!(
                    failure,
                    Some(AuthFailure::BadSignature | AuthFailure::Malformed401)
                ),
                "{why}: {failure:?}"
            );
        }
    }

    /// `SEQUENCE { INTEGER r, INTEGER s }` (the X9.62 form JWS does not use).
    fn der_signature(r: &[u8], s: &[u8]) -> Vec<u8> {
        let int = |x: &[u8]| {
            let x = &x[x.iter().position(|&b| b != 0).unwrap_or(x.len() - 1)..];
            let pad = x[0] & 0x80 != 0;
            let mut out = vec![0x02, (x.len() + usize::from(pad)) as u8];
            if pad {
                out.push(0);
            }
            out.extend_from_slice(x);
            out
        };
        let body = [int(r), int(s)].concat();
        [vec![0x30, body.len() as u8], body].concat()
    }
}
