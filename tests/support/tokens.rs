//! Mints test tokens with the fixture keys (tests/fixtures/keys, test-only keys).

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::proxy::{fixture, AUDIENCE, ISSUER};

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Standard claims for `scope`, valid for five minutes.
pub fn claims(scope: &str) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "test-client",
        "client_id": "test-client",
        "iat": now(),
        "exp": now() + 300,
        "jti": format!("jti-{}", now()),
        "scope": scope,
    })
}

fn key_bytes(file: &str) -> Vec<u8> {
    std::fs::read(fixture(&format!("keys/{file}"))).unwrap()
}

/// Signs `claims` with the fixture key for `kid` (rs1, es1, hs1, or "other-rs" for an untrusted key).
pub fn sign_with(
    kid: Option<&str>,
    key: &str,
    alg: Algorithm,
    typ: Option<&str>,
    claims: &Value,
) -> String {
    let enc = match key {
        "rs1" => EncodingKey::from_rsa_pem(&key_bytes("rs256.pem")).unwrap(),
        "other-rs" => EncodingKey::from_rsa_pem(&key_bytes("other-rs256.pem")).unwrap(),
        "es1" => EncodingKey::from_ec_pem(&key_bytes("es256.pem")).unwrap(),
        "hs1" => EncodingKey::from_secret(key_bytes("hs256.secret").trim_ascii_end()).unwrap(),
        // Alg confusion: the RSA *public* key PEM used as an HMAC secret.
        "rs1-public-as-hmac" => EncodingKey::from_secret(&key_bytes("rs256.pub.pem")).unwrap(),
        other => panic!("unknown test key {other}"),
    };
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    h.typ = typ.map(str::to_string);
    encode(&h, claims, &enc).unwrap()
}

/// A valid RS256 token for `scope`.
pub fn token(scope: &str) -> String {
    sign_with(
        Some("rs1"),
        "rs1",
        Algorithm::RS256,
        Some("at+jwt"),
        &claims(scope),
    )
}

/// An unsigned `alg: none` token (RFC 7519 §6), built by hand since libraries refuse to make one.
pub fn unsigned(alg_value: &str, claims: &Value) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.",
        b64(&json!({"alg": alg_value, "typ": "JWT", "kid": "rs1"})),
        b64(claims)
    )
}
