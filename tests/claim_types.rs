//! Registered claims are held to their JSON types (RFC 7519 §4.1, RFC 9068 §2.2) over a real socket:
//! an `iss` array that contains the trusted issuer, or any registered claim of the wrong type, is
//! 401 `invalid_token` and never reaches an upstream.

use jsonwebtoken::Algorithm;
use serde_json::json;

use crate::support::proxy::ISSUER;
use crate::support::tokens::{claims, sign_with};
use crate::support::{status_and_challenge, Env, INVALID_TOKEN_CHALLENGE as INVALID, TENANT_A};

fn rs(c: &serde_json::Value) -> String {
    sign_with(Some("rs1"), "rs1", Algorithm::RS256, Some("at+jwt"), c)
}

#[test]
fn an_iss_array_containing_the_trusted_issuer_is_401() {
    let env = Env::start();
    // The same claims with `iss` as a string pass: the array alone is what is refused.
    assert_eq!(status_and_challenge(&env, &rs(&claims(TENANT_A))).0, 200);
    let before = env.upstream_requests();
    for iss in [json!([ISSUER]), json!([ISSUER, "https://evil.test/"])] {
        let mut c = claims(TENANT_A);
        c["iss"] = iss.clone();
        assert_eq!(
            status_and_challenge(&env, &rs(&c)),
            (401, INVALID.to_string()),
            "{iss}"
        );
    }
    assert_eq!(env.upstream_requests(), before);
}

#[test]
fn registered_claims_of_the_wrong_json_type_are_401() {
    let env = Env::start();
    let cases = [
        ("iss", json!(null)),
        ("sub", json!(["test-client"])),
        ("aud", json!(7)),
        ("aud", json!([7])),
        ("exp", json!(null)),
        ("nbf", json!("0")),
        ("iat", json!({"at": 0})),
        ("jti", json!(["a"])),
        ("scope", json!([TENANT_A])),
        ("scope", json!(42)),
        ("client_id", json!(["test-client"])),
    ];
    for (claim, value) in cases {
        let mut c = claims(TENANT_A);
        c[claim] = value.clone();
        assert_eq!(
            status_and_challenge(&env, &rs(&c)),
            (401, INVALID.to_string()),
            "{claim}: {value}"
        );
    }
    assert_eq!(env.upstream_requests(), 0);
}
