//! Bearer tokens: every way a token can be wrong gets the RFC 6750 answer, and no upstream sees it.

use jsonwebtoken::Algorithm;
use serde_json::json;

use crate::support::tokens::{claims, now, sign_with, token, unsigned};
use crate::support::{client, raw, Env, TENANT_A, TENANT_B, TENANT_UNKNOWN};

fn get(env: &Env, auth: Option<&str>) -> reqwest::blocking::Response {
    let mut req = client().get(env.proxy.url("/Patient/123"));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().unwrap()
}

fn assert_outcome(r: reqwest::blocking::Response, status: u16, challenge: Option<&str>, why: &str) {
    assert_eq!(r.status(), status, "{why}");
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(www.as_deref(), challenge, "{why}");
    assert_eq!(
        r.headers()["content-type"],
        "application/fhir+json",
        "{why}"
    );
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome", "{why}");
}

use crate::support::INVALID_TOKEN_CHALLENGE as INVALID;

#[test]
fn valid_rs256_es256_and_hs256_tokens_reach_their_tenant() {
    let env = Env::start();
    for (kid, alg) in [
        ("rs1", Algorithm::RS256),
        ("es1", Algorithm::ES256),
        ("hs1", Algorithm::HS256),
    ] {
        let t = sign_with(Some(kid), kid, alg, Some("at+jwt"), &claims(TENANT_A));
        let r = get(&env, Some(&format!("Bearer {t}")));
        assert_eq!(r.status(), 200, "{kid}");
        assert_eq!(r.headers()["x-upstream"], "tenant-a");
    }
    // typ "JWT" is accepted too, and so is a token without kid when one key has its alg.
    let t = sign_with(
        None,
        "es1",
        Algorithm::ES256,
        Some("JWT"),
        &claims(TENANT_A),
    );
    assert_eq!(get(&env, Some(&format!("bearer {t}"))).status(), 200);
    assert_eq!(env.a.count(), 4);
}

#[test]
fn no_token_gets_a_challenge_without_an_error_code() {
    let env = Env::start();
    assert_outcome(
        get(&env, None),
        401,
        Some(r#"Bearer realm="fhir-edge""#),
        "no header",
    );
    assert_outcome(
        get(&env, Some("Basic dXNlcjpwYXNz")),
        401,
        Some(r#"Bearer realm="fhir-edge""#),
        "another scheme",
    );
    assert_eq!(env.upstream_requests(), 0);
}

#[test]
fn every_invalid_token_is_401_invalid_token() {
    let env = Env::start();
    let t = now();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims(TENANT_A);
        f(&mut c);
        c
    };
    let rs =
        |c: &serde_json::Value| sign_with(Some("rs1"), "rs1", Algorithm::RS256, Some("at+jwt"), c);
    let cases: Vec<(&str, String)> = vec![
        ("expired", rs(&with(&|c| c["exp"] = json!(t - 120)))),
        ("not yet valid", rs(&with(&|c| c["nbf"] = json!(t + 600)))),
        (
            "wrong issuer",
            rs(&with(&|c| c["iss"] = json!("https://evil.test/"))),
        ),
        (
            "wrong audience",
            rs(&with(&|c| c["aud"] = json!("someone-else"))),
        ),
        (
            "missing exp",
            rs(&with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
        ),
        (
            "missing iss",
            rs(&with(&|c| {
                c.as_object_mut().unwrap().remove("iss");
            })),
        ),
        (
            "missing aud",
            rs(&with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            })),
        ),
        (
            "exp as string",
            rs(&with(&|c| c["exp"] = json!((t + 300).to_string()))),
        ),
        ("alg none", unsigned("none", &claims(TENANT_A))),
        ("alg None", unsigned("None", &claims(TENANT_A))),
        (
            "HS256 signed with the RS256 public key",
            sign_with(
                Some("rs1"),
                "rs1-public-as-hmac",
                Algorithm::HS256,
                Some("JWT"),
                &claims(TENANT_A),
            ),
        ),
        (
            "HS256 with the public key and no kid",
            sign_with(
                None,
                "rs1-public-as-hmac",
                Algorithm::HS256,
                Some("JWT"),
                &claims(TENANT_A),
            ),
        ),
        (
            "unknown kid",
            sign_with(
                Some("nope"),
                "rs1",
                Algorithm::RS256,
                Some("JWT"),
                &claims(TENANT_A),
            ),
        ),
        (
            "kid path traversal",
            sign_with(
                Some("../../etc/passwd"),
                "rs1",
                Algorithm::RS256,
                Some("JWT"),
                &claims(TENANT_A),
            ),
        ),
        (
            "signed by an untrusted key",
            sign_with(
                Some("rs1"),
                "other-rs",
                Algorithm::RS256,
                Some("JWT"),
                &claims(TENANT_A),
            ),
        ),
        (
            "ES256 key asked to verify RS256",
            sign_with(
                Some("es1"),
                "rs1",
                Algorithm::RS256,
                Some("JWT"),
                &claims(TENANT_A),
            ),
        ),
        (
            "wrong typ",
            sign_with(
                Some("rs1"),
                "rs1",
                Algorithm::RS256,
                Some("id_token+jwt"),
                &claims(TENANT_A),
            ),
        ),
        (
            "no typ",
            sign_with(
                Some("rs1"),
                "rs1",
                Algorithm::RS256,
                None,
                &claims(TENANT_A),
            ),
        ),
        ("garbage", "abc.def.ghi".to_string()),
        ("two segments", "abc.def".to_string()),
        ("five segments (JWE)", format!("{}.a.b", token(TENANT_A))),
        ("trailing garbage", format!("{}x", token(TENANT_A))),
        ("oversized", "a".repeat(9000)),
    ];
    for (why, t) in cases {
        assert_outcome(
            get(&env, Some(&format!("Bearer {t}"))),
            401,
            Some(INVALID),
            why,
        );
    }
    assert_eq!(
        env.upstream_requests(),
        0,
        "an invalid token reached an upstream"
    );
}

#[test]
fn malformed_credentials_are_400_invalid_request() {
    let env = Env::start();
    let t = token(TENANT_A);
    let bad = r#"Bearer realm="fhir-edge", error="invalid_request""#;
    assert_outcome(get(&env, Some("Bearer")), 400, Some(bad), "empty bearer");
    assert_outcome(
        get(&env, Some("Bearer a b")),
        400,
        Some(bad),
        "space in token",
    );
    // Two Authorization headers.
    let r = client()
        .get(env.proxy.url("/Patient/123"))
        .header("authorization", format!("Bearer {t}"))
        .header("authorization", format!("Bearer {t}"))
        .send()
        .unwrap();
    assert_outcome(r, 400, Some(bad), "two headers");
    // A token in the query string, with or without a header.
    for q in ["access_token=abc", "name=x&access%5Ftoken=abc"] {
        let r = client()
            .get(env.proxy.url(&format!("/Patient?{q}")))
            .header("authorization", format!("Bearer {t}"))
            .send()
            .unwrap();
        assert_outcome(r, 400, Some(bad), q);
    }
    assert_eq!(env.upstream_requests(), 0);
}

#[test]
fn tokens_without_a_routable_tenant_are_403_with_one_body() {
    let env = Env::start();
    let bodies: Vec<String> = [
        json!(TENANT_UNKNOWN),
        json!(format!("{TENANT_A} {TENANT_B}")),
        json!(format!("{{{TENANT_A}}}")),
        json!(format!("urn:uuid:{TENANT_A}")),
        json!(TENANT_A.replace('-', "")),
        json!("system/*.read"),
    ]
    .into_iter()
    .map(|scope| {
        let mut c = claims(TENANT_A);
        c["scope"] = scope.clone();
        let t = sign_with(Some("rs1"), "rs1", Algorithm::RS256, Some("at+jwt"), &c);
        let r = get(&env, Some(&format!("Bearer {t}")));
        assert_eq!(r.status(), 403, "{scope}");
        assert_eq!(
            r.headers()["www-authenticate"],
            r#"Bearer realm="fhir-edge", error="insufficient_scope""#
        );
        r.text().unwrap()
    })
    .collect();
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "403 bodies differ: {bodies:?}"
    );
    assert_eq!(env.upstream_requests(), 0);
}

#[test]
fn a_scope_without_a_claim_is_403_and_a_missing_scope_too() {
    let env = Env::start();
    let mut c = claims(TENANT_A);
    c.as_object_mut().unwrap().remove("scope");
    let t = sign_with(Some("rs1"), "rs1", Algorithm::RS256, Some("at+jwt"), &c);
    assert_eq!(get(&env, Some(&format!("Bearer {t}"))).status(), 403);
}

#[test]
fn error_bodies_never_echo_the_request() {
    let env = Env::start();
    let canary = "CANARY-7f3a9";
    let r = raw::send(
        env.proxy.port,
        format!(
            "GET /Patient/{canary}?name={canary} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {canary}.{canary}.{canary}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 401);
    assert!(!r.body_text().contains(canary));
    assert!(r.headers.iter().all(|(_, v)| !v.contains(canary)));
    assert!(
        !env.proxy.logs().contains(canary),
        "the canary reached the log"
    );
}

#[test]
fn an_issuer_can_be_configured_by_jwks_file_and_its_keys_pin_the_issuer() {
    let jwks = crate::support::proxy::fixture("keys/jwks.json");
    let env = Env::start_with(|c| {
        c.extra_issuers = format!(
            "    - issuer: \"https://jwks-issuer.test/\"\n      audience: \"{}\"\n      tenants: any\n      jwks_file: {}\n",
            crate::support::proxy::AUDIENCE,
            jwks.display()
        );
    });
    let mut c = claims(TENANT_A);
    c["iss"] = json!("https://jwks-issuer.test/");
    let t = sign_with(Some("jwks-es"), "es1", Algorithm::ES256, Some("at+jwt"), &c);
    let r = get(&env, Some(&format!("Bearer {t}")));
    assert_eq!(r.status(), 200);
    // The same key material under the JWKS kid does not vouch for the other issuer.
    let t = sign_with(
        Some("jwks-es"),
        "es1",
        Algorithm::ES256,
        Some("at+jwt"),
        &claims(TENANT_A),
    );
    assert_outcome(
        get(&env, Some(&format!("Bearer {t}"))),
        401,
        Some(INVALID),
        "issuer pinned by key",
    );
}

/// The verified-token cache (on by default) changes nothing a client can see: a cached token expires
/// at the same second an uncached one would, a tenant removed from the table stops a cached token at
/// once, and a second request with the same token is a cache hit.
#[test]
fn a_cached_token_still_expires_on_time_and_still_needs_its_tenant() {
    let env = Env::start();
    let hits = |env: &Env| {
        let (_, m) = env.proxy.admin("/metrics");
        m.lines()
            .find_map(|l| l.strip_prefix(r#"fhir_edge_token_cache_lookups_total{result="hit"} "#))
            .map_or(0.0, |v| v.trim().parse::<f64>().unwrap())
    };
    // Expired 3 s ago: still inside the configured 5 s leeway, for two more seconds.
    let mut c = claims(TENANT_A);
    c["exp"] = json!(now() - 3);
    let short = sign_with(Some("es1"), "es1", Algorithm::ES256, Some("at+jwt"), &c);
    let bearer = format!("Bearer {short}");
    assert_eq!(get(&env, Some(&bearer)).status(), 200);
    let before = hits(&env);
    assert_eq!(get(&env, Some(&bearer)).status(), 200);
    assert_eq!(
        hits(&env),
        before + 1.0,
        "the second use was not a cache hit"
    );
    // Past exp + leeway: the cached entry must not outlive the token.
    let deadline = c["exp"].as_i64().unwrap() + 6;
    while now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_outcome(
        get(&env, Some(&bearer)),
        401,
        Some(INVALID),
        "a cached token past exp + leeway",
    );
    assert!(env
        .proxy
        .admin("/metrics")
        .1
        .contains(r#"fhir_edge_auth_failures_total{reason="expired"} 1"#));

    // A cached token of tenant B stops the moment B leaves the routing table.
    let tb = token(TENANT_B);
    assert_eq!(get(&env, Some(&format!("Bearer {tb}"))).status(), 200);
    let only_a =
        crate::support::proxy::routes_yaml(&[(TENANT_A, "tenant-a", &env.a.url("/r4"), "")]);
    std::fs::write(env.proxy.routes_path(), only_a).unwrap();
    assert!(crate::support::eventually(
        std::time::Duration::from_secs(3),
        || { get(&env, Some(&format!("Bearer {tb}"))).status() == 403 }
    ));
    let upstream_before = env.upstream_requests();
    assert_eq!(get(&env, Some(&format!("Bearer {tb}"))).status(), 403);
    assert_eq!(env.upstream_requests(), upstream_before);
}
