//! Malformed ECDSA signatures over a real socket: an ES256 JWS whose signature is not a valid
//! fixed-width `R || S` (RFC 7518 §3.4) — zero scalars, wrong lengths, ASN.1 DER — is 401
//! `invalid_token` and never reaches an upstream.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::Algorithm;

use crate::support::tokens::{claims, sign_with};
use crate::support::{status_and_challenge, Env, INVALID_TOKEN_CHALLENGE as INVALID, TENANT_A};

/// `SEQUENCE { INTEGER r, INTEGER s }`.
fn der(r: &[u8], s: &[u8]) -> Vec<u8> {
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

#[test]
fn es256_signatures_with_zero_scalars_wrong_lengths_or_der_are_401() {
    let env = Env::start();
    let token = sign_with(
        Some("es1"),
        "es1",
        Algorithm::ES256,
        Some("at+jwt"),
        &claims(TENANT_A),
    );
    assert_eq!(status_and_challenge(&env, &token).0, 200);
    let before = env.upstream_requests();
    let (message, sig) = token.rsplit_once('.').unwrap();
    let sig = B64.decode(sig).unwrap();
    let (r, s) = sig.split_at(32);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("r = s = 0", vec![0; 64]),
        ("r = 0", [&[0; 32][..], s].concat()),
        ("s = 0", [r, &[0; 32][..]].concat()),
        ("short", sig[..63].to_vec()),
        ("half", sig[..32].to_vec()),
        ("long", [&sig[..], &[0]].concat()),
        ("empty", Vec::new()),
        ("DER", der(r, s)),
    ];
    for (why, forged) in cases {
        let t = format!("{message}.{}", B64.encode(&forged));
        assert_eq!(
            status_and_challenge(&env, &t),
            (401, INVALID.to_string()),
            "{why}"
        );
    }
    assert_eq!(env.upstream_requests(), before);
}
