//! The token endpoint's signing keys: loading, `kid` thumbprints, the published JWKS, and `keygen`.
//!
//! Keys are PKCS#8 PEM private keys (PKCS#1 is accepted for RSA): P-256 signs ES256 (the default), RSA
//! of at least 2048 bits signs RS256. A key's `kid` is its RFC 7638 JWK thumbprint, so it names the key
//! material itself and cannot collide by accident. The active key signs; previous keys only verify and
//! stay in the JWKS, so a rotation does not break tokens already issued (keep a previous key configured
//! for at least one token lifetime after it stops signing).

use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// One signing key, with what every phase needs precomputed.
pub struct SigningKey {
    pub alg: Algorithm,
    /// RFC 7638 thumbprint of the public key.
    pub kid: String,
    /// The public key as a JWK (with `kid`, `alg`, `use`), for the JWKS.
    pub jwk: Value,
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        write!(f, "SigningKey({:?}, kid {})", self.alg, self.kid)
    }
}

/// Which kind of key `keygen` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyAlg {
    ES256,
    RS256,
}

impl std::str::FromStr for KeyAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ES256" | "es256" => Ok(KeyAlg::ES256),
            "RS256" | "rs256" => Ok(KeyAlg::RS256),
            _ => Err(format!(
                "unsupported signing algorithm `{s}` (ES256 or RS256)"
            )),
        }
    }
}

const MIN_RSA_BITS: usize = 2048;

impl SigningKey {
    /// Loads a private key file.
    pub fn from_file(path: &Path) -> Result<SigningKey, String> {
        let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
        Self::from_pem(&pem)
    }

    /// Parses a PEM private key: P-256 (PKCS#8) → ES256, RSA (PKCS#8 or PKCS#1) → RS256.
    pub fn from_pem(pem: &str) -> Result<SigningKey, String> {
        use p256::pkcs8::DecodePrivateKey as _;
        if let Ok(sk) = p256::SecretKey::from_pkcs8_pem(pem) {
            use p256::elliptic_curve::sec1::ToSec1Point as _;
            let point = sk.public_key().to_sec1_point(false);
            let (Some(x), Some(y)) = (point.x(), point.y()) else {
                return Err("the P-256 public point is not affine".into());
            };
            let (x, y) = (B64.encode(x), B64.encode(y));
            // RFC 7638 §3.2: the required members, lexicographically ordered, no whitespace.
            let kid = thumbprint(&format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#
            ));
            let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"});
            let encoding =
                EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| format!("EC key: {e}"))?;
            let decoding =
                DecodingKey::from_ec_components(&x, &y).map_err(|e| format!("EC key: {e}"))?;
            return Ok(SigningKey {
                alg: Algorithm::ES256,
                kid,
                jwk,
                encoding,
                decoding,
            });
        }
        let rsa_key = rsa::PrivateKey::from_pkcs8_pem(pem)
            .or_else(|_| rsa::pkcs1::DecodeRsaPrivateKey::from_pkcs1_pem(pem))
            .map_err(|_| "not a P-256 or RSA private key in PKCS#8 (or PKCS#1) PEM".to_string())?;
        use rsa::traits::PublicKeyParts as _;
        let public = rsa_key.to_public_key();
        if public.size() * 8 < MIN_RSA_BITS {
            return Err(format!("RSA keys must have at least {MIN_RSA_BITS} bits"));
        }
        let n = B64.encode(public.n_bytes());
        let e = B64.encode(public.e().to_be_bytes_trimmed_vartime());
        let kid = thumbprint(&format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#));
        let jwk = json!({"kty": "RSA", "n": n, "e": e, "kid": kid, "alg": "RS256", "use": "sig"});
        let encoding =
            EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| format!("RSA key: {e}"))?;
        let decoding =
            DecodingKey::from_rsa_components(&n, &e).map_err(|e| format!("RSA key: {e}"))?;
        Ok(SigningKey {
            alg: Algorithm::RS256,
            kid,
            jwk,
            encoding,
            decoding,
        })
    }
}

fn thumbprint(canonical_jwk: &str) -> String {
    B64.encode(Sha256::digest(canonical_jwk.as_bytes()))
}

/// The active key and the previous ones, plus the JWKS document that publishes them.
pub(crate) struct SigningKeys {
    pub active: SigningKey,
    pub previous: Vec<SigningKey>,
    /// `{"keys": [...]}`, active key first; serialised once.
    pub jwks: bytes::Bytes,
}

impl SigningKeys {
    pub(crate) fn new(active: SigningKey, previous: Vec<SigningKey>) -> SigningKeys {
        let keys: Vec<&Value> = std::iter::once(&active.jwk)
            .chain(previous.iter().map(|k| &k.jwk))
            .collect();
        let jwks = bytes::Bytes::from(json!({ "keys": keys }).to_string());
        SigningKeys {
            active,
            previous,
            jwks,
        }
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &SigningKey> {
        std::iter::once(&self.active).chain(self.previous.iter())
    }

    /// Signs a throwaway token with the active key and verifies it (for readiness).
    pub(crate) fn self_check(&self) -> Result<(), String> {
        use jsonwebtoken::{decode, encode, Header, Validation};
        let k = &self.active;
        let claims = json!({"exp": u64::MAX / 2, "iss": "self-check", "aud": "self-check"});
        let token = encode(&Header::new(k.alg), &claims, &k.encoding).map_err(|e| e.to_string())?;
        let mut v = Validation::new(k.alg);
        v.set_issuer(&["self-check"]);
        v.set_audience(&["self-check"]);
        decode::<Value>(&token, &k.decoding, &v)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Generates a new private key and writes it as PKCS#8 PEM to `out` (mode 0600; never overwrites).
/// Returns the new key's `kid`.
pub(crate) fn keygen(alg: KeyAlg, out: &Path) -> Result<String, String> {
    let pem = generate_pem(alg)?;
    let key = SigningKey::from_pem(&pem)?;
    write_new_private_file(out, pem.as_bytes())?;
    Ok(key.kid)
}

fn generate_pem(alg: KeyAlg) -> Result<String, String> {
    use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
    match alg {
        KeyAlg::ES256 => {
            // A uniformly random 32-byte string is a valid P-256 scalar with overwhelming
            // probability; retry on the rare miss (zero or ≥ the group order).
            for _ in 0..16 {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
                if let Ok(sk) = p256::SecretKey::from_slice(&bytes) {
                    return sk
                        .to_pkcs8_pem(LineEnding::LF)
                        .map(|p| p.to_string())
                        .map_err(|e| format!("cannot encode the key: {e}"));
                }
            }
            Err("could not draw a valid P-256 key".into())
        }
        KeyAlg::RS256 => {
            let key = rsa::PrivateKey::new(&mut getrandom::SysRng, MIN_RSA_BITS)
                .map_err(|e| format!("RSA key generation failed: {e}"))?;
            rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(&key, rsa::pkcs8::LineEnding::LF)
                .map(|p| p.to_string())
                .map_err(|e| format!("cannot encode the key: {e}"))
        }
    }
}

/// Creates `path` with mode 0600 and writes `data`, refusing to replace an existing file.
pub(crate) fn write_new_private_file(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_es256_keys_load_with_a_thumbprint_kid() {
        let pem = generate_pem(KeyAlg::ES256).unwrap();
        let k = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(k.alg, Algorithm::ES256);
        assert_eq!(k.kid.len(), 43, "base64url of 32 bytes");
        assert_eq!(k.jwk["kid"], k.kid.as_str());
        // The kid is a function of the key: loading again gives the same one.
        assert_eq!(SigningKey::from_pem(&pem).unwrap().kid, k.kid);
    }

    /// RFC 7638 §3.1's worked example: this RSA key has the thumbprint below.
    #[test]
    fn rsa_thumbprint_matches_rfc_7638() {
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let e = "AQAB";
        assert_eq!(
            thumbprint(&format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#)),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn fixture_keys_load_and_non_keys_do_not() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys");
        assert_eq!(
            SigningKey::from_file(&dir.join("es256.pem")).unwrap().alg,
            Algorithm::ES256
        );
        assert_eq!(
            SigningKey::from_file(&dir.join("rs256.pem")).unwrap().alg,
            Algorithm::RS256
        );
        assert!(SigningKey::from_file(&dir.join("es256.pub.pem")).is_err());
        assert!(SigningKey::from_pem("not a key").is_err());
    }
}
