//! JWT access-token verification (RFC 7519, RFC 9068, RFC 8725).
//!
//! Keys are loaded once, at start-up, each with the one algorithm it may verify: the key is chosen
//! by the header's `kid` (or, without a `kid`, as the only configured key of the header's `alg`), and
//! the key then fixes the algorithm, issuer and audience. That shuts out `alg: none` and the
//! "HS256 signed with the RSA public key" confusion (RFC 8725 §2.1, §3.1). `jku`, `x5u`, `x5c` and `jwk`
//! headers are never followed or used. `exp`, `iss` and `aud` are required; `nbf` is checked when present;
//! `typ` must say this is an access token or a JWT (RFC 9068 §2.1, RFC 8725 §3.11).

use std::collections::HashMap;

use jsonwebtoken::{decode, decode_header, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::AuthFailure;

/// One verification key, with everything it pins.
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

/// The claims fhir-edge reads, each registered claim held to its JSON type here rather than left to
/// `jsonwebtoken`, whose validation takes an `iss` *array* that contains the trusted issuer (and
/// reads claims of the wrong type as absent). RFC 7519 §4.1 and RFC 9068 §2.2 fix the types: `iss`,
/// `sub`, `jti`, `client_id` and `scope` are strings, `aud` a string or an array of strings,
/// `exp`/`nbf`/`iat` numbers. A present claim of another type (`null` included) fails
/// deserialisation, which [`Verifier::verify`] answers with 401 `invalid_token`; whether the
/// required ones are present, and their values, is still `jsonwebtoken`'s check. Unknown claims are
/// ignored.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// Validated against the key's issuer by `jsonwebtoken`; typed here so an array cannot pass.
    #[serde(default, deserialize_with = "present")]
    pub iss: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub aud: Option<Audience>,
    #[serde(default, deserialize_with = "present")]
    pub scope: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub sub: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub client_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub jti: Option<String>,
    /// Which client secret authenticated the token request (tokens of fhir-edge's own issuer).
    #[serde(default, deserialize_with = "present")]
    pub secret_id: Option<String>,
    /// Validated by `jsonwebtoken`; read again for the token cache.
    #[serde(default, deserialize_with = "present")]
    pub exp: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    pub nbf: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    pub iat: Option<f64>,
}

/// `aud` (RFC 7519 §4.1.3): one string or an array of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// A claim that is present must have its type: `null` is not an absent claim (absent ones take the
/// field's default and never reach this function).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

struct Entry {
    own: bool,
    has_kid: bool,
    alg: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

/// Verifies bearer tokens against the configured keys. Immutable after construction.
pub struct Verifier {
    entries: Vec<Entry>,
    by_kid: HashMap<String, usize>,
}

impl Verifier {
    /// Builds the verifier. `kid`s must be unique (the config loader checks this and reports it).
    pub fn new(keys: Vec<VerifyKey>, leeway_seconds: u64) -> Verifier {
        let mut entries = Vec::with_capacity(keys.len());
        let mut by_kid = HashMap::new();
        for k in keys {
            let mut v = Validation::new(k.alg);
            v.leeway = leeway_seconds;
            v.validate_exp = true;
            v.validate_nbf = true;
            v.validate_aud = true;
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
            v.set_issuer(&[k.issuer.as_str()]);
            v.set_audience(&[k.audience.as_str()]);
            if let Some(kid) = &k.kid {
                by_kid.insert(kid.clone(), entries.len());
            }
            entries.push(Entry {
                own: k.own,
                has_kid: k.kid.is_some(),
                alg: k.alg,
                key: k.key,
                validation: v,
            });
        }
        Verifier { entries, by_kid }
    }

    /// Number of configured keys.
    pub fn key_count(&self) -> usize {
        self.entries.len()
    }

    /// Verifies `token` (already bounded in size by the bearer extractor) and returns its claims and
    /// whether fhir-edge's own token endpoint issued it.
    pub fn verify(&self, token: &str) -> Result<(Claims, bool), AuthFailure> {
        // Compact JWS only: exactly three segments. Five are a JWE, four or six are garbage.
        if token.bytes().filter(|&b| b == b'.').count() != 2 {
            return Err(AuthFailure::Malformed401);
        }
        let header = decode_header(token).map_err(|_| AuthFailure::Malformed401)?;
        match header.typ.as_deref() {
            Some(t)
                if t.eq_ignore_ascii_case("at+jwt")
                    || t.eq_ignore_ascii_case("application/at+jwt")
                    || t.eq_ignore_ascii_case("JWT") => {}
            _ => return Err(AuthFailure::WrongType),
        }
        let entry = self.select(header.kid.as_deref(), header.alg)?;
        let data =
            decode::<Claims>(token, &entry.key, &entry.validation).map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => AuthFailure::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
                    AuthFailure::BadSignature
                }
                ErrorKind::ExpiredSignature => AuthFailure::Expired,
                ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
                ErrorKind::InvalidIssuer => AuthFailure::WrongIssuer,
                ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
                ErrorKind::MissingRequiredClaim(_) => AuthFailure::MissingClaim,
                _ => AuthFailure::Malformed401,
            })?;
        Ok((data.claims, entry.own))
    }

    fn select(&self, kid: Option<&str>, alg: Algorithm) -> Result<&Entry, AuthFailure> {
        let entry = match kid {
            Some(kid) => self
                .by_kid
                .get(kid)
                .and_then(|&i| self.entries.get(i))
                .ok_or(AuthFailure::UnknownKey)?,
            None => {
                // Without a kid, only an unambiguous key may be used (trying several would turn one
                // request into several signature checks): the one kid-less key of this alg, or, when
                // every key of this alg has a kid, the only key of this alg.
                let kidless_exist = self.entries.iter().any(|e| e.alg == alg && !e.has_kid);
                let mut pool = self
                    .entries
                    .iter()
                    .filter(|e| e.alg == alg && !(kidless_exist && e.has_kid));
                match (pool.next(), pool.next()) {
                    (Some(e), None) => e,
                    _ => return Err(AuthFailure::UnknownKey),
                }
            }
        };
        // The key fixes the algorithm (RFC 8725 §3.1).
        if entry.alg != alg {
            return Err(AuthFailure::BadSignature);
        }
        Ok(entry)
    }
}

/// Signs and verifies a throwaway token: `jsonwebtoken` compiles without a crypto backend and only
/// panics at the first use, so find out at start-up rather than on the first request.
pub(crate) fn self_test() -> Result<(), String> {
    let outcome = std::panic::catch_unwind(|| {
        use jsonwebtoken::{encode, EncodingKey, Header};
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
