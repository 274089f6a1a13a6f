//! The OAuth 2.0 client-credentials token endpoint (SPEC §3, RFC 6749 §4.4).

use std::time::Duration;

use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::Value;

use crate::support::proxy::{default_token_section, fixture};
use crate::support::{client, eventually, Env, ProxyConfig, TENANT_A, TENANT_B, TENANT_UNKNOWN};

fn env() -> Env {
    Env::start_with(|c: &mut ProxyConfig| c.token = Some(default_token_section()))
}

fn form(c: &crate::support::Client, scope: &str) -> String {
    format!(
        "grant_type=client_credentials&client_id={}&client_secret={}&scope={scope}",
        c.id, c.secret
    )
}

/// Status, `error` code, and whether the no-store headers were present.
fn oauth_error(r: reqwest::blocking::Response) -> (u16, String) {
    let status = r.status().as_u16();
    assert_eq!(r.headers()["cache-control"], "no-store", "{status}");
    assert_eq!(r.headers()["pragma"], "no-cache", "{status}");
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().unwrap();
    (status, v["error"].as_str().unwrap_or("").to_string())
}

#[test]
fn client_secret_post_gets_a_bearer_jwt_that_the_published_jwks_verifies() {
    let env = env();
    let c = env.add_client("teams", &[TENANT_A]);
    let r = env.token_request(
        &form(&c, &format!("system/*.read%20{}", TENANT_A.to_uppercase())),
        None,
    );
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["pragma"], "no-cache");
    let body: Value = r.json().unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 300);
    assert_eq!(
        body["scope"],
        format!("system/*.read {TENANT_A}"),
        "tenant canonicalised, order kept"
    );
    assert!(body.get("refresh_token").is_none());
    let token = body["access_token"].as_str().unwrap();

    // Verify with the keys the proxy publishes, the way a resource server would.
    let jwks: JwkSet = client()
        .get(env.proxy.url("/.well-known/jwks.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let header = decode_header(token).unwrap();
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    assert_eq!(header.alg, Algorithm::ES256);
    let kid = header.kid.unwrap();
    let jwk = jwks.find(&kid).expect("the token's kid is in the JWKS");
    let mut v = Validation::new(Algorithm::ES256);
    let base = env.proxy.url("");
    v.set_issuer(&[&base]);
    v.set_audience(&[&base]);
    let claims: Value = decode(token, &DecodingKey::from_jwk(jwk).unwrap(), &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], c.id.as_str());
    assert_eq!(claims["client_id"], c.id.as_str());
    assert_eq!(claims["secret_id"], c.secret_id.as_str());
    assert_eq!(claims["scope"], format!("system/*.read {TENANT_A}"));
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        300
    );
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));

    // jti is unique per token.
    let again: Value = env.token_request(&form(&c, TENANT_A), None).json().unwrap();
    let claims2: Value = decode(
        again["access_token"].as_str().unwrap(),
        &DecodingKey::from_jwk(jwk).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_ne!(claims["jti"], claims2["jti"]);
    // The secret never appears in the log.
    assert!(!env.proxy.logs().contains(&c.secret));
}

#[test]
fn a_token_from_the_endpoint_routes_to_its_tenant_only() {
    let env = env();
    let c = env.add_client("teams", &[]);
    let ta = env.token_for(&c, TENANT_A);
    let tb = env.token_for(&c, TENANT_B);
    let r = client()
        .get(env.proxy.url("/Patient/1"))
        .header("authorization", format!("Bearer {ta}"))
        .send()
        .unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["x-upstream"].to_str().unwrap()
        ),
        (200, "tenant-a")
    );
    let r = client()
        .get(env.proxy.url("/Patient/1"))
        .header("authorization", format!("Bearer {tb}"))
        .send()
        .unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["x-upstream"].to_str().unwrap()
        ),
        (200, "tenant-b")
    );
    // Two token requests and two FHIR requests.
    let audit = env.proxy.access_log_at_least(4);
    let fhir: Vec<_> = audit
        .iter()
        .filter(|l| l["route"] == "/Patient/{id}")
        .collect();
    assert_eq!(fhir.len(), 2);
    assert!(fhir.iter().all(|l| l["client_id"] == c.id.as_str()));
    assert!(audit
        .iter()
        .any(|l| l["route"] == "/token" && l["client_id"] == c.id.as_str()));
}

/// RFC 6749 §2.3.1 says Basic credentials are form-urlencoded first; Python libraries send them raw,
/// openid-client encodes even `-`. Both readings work, also for a secret with `:`, `%` and `+`.
#[test]
fn client_secret_basic_works_raw_and_form_urlencoded() {
    let env = env();
    let c = env.add_client("teams", &[TENANT_A]);
    let scope = format!("grant_type=client_credentials&scope={TENANT_A}");
    // Raw.
    let r = env.token_request(&scope, Some(&format!("{}:{}", c.id, c.secret)));
    assert_eq!(r.status(), 200);
    // Form-urlencoded, every byte escaped (as openid-client does with `-`).
    let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    let r = env.token_request(&scope, Some(&format!("{}:{}", enc(&c.id), enc(&c.secret))));
    assert_eq!(r.status(), 200);

    // A hand-registered secret with the awkward characters.
    let secret = "se:c%r+t /x";
    write_client_with_secret(&env, "odd-client", secret);
    let raw = env.token_request(&scope, Some(&format!("odd-client:{secret}")));
    assert_eq!(raw.status(), 200, "raw basic");
    let encoded = "se%3Ac%25r%2Bt+%2Fx";
    let r = env.token_request(&scope, Some(&format!("odd-client:{encoded}")));
    assert_eq!(r.status(), 200, "form-urlencoded basic");
    // And through the body, form-encoded as usual.
    let r = env.token_request(
        &format!("{scope}&client_id=odd-client&client_secret={encoded}"),
        None,
    );
    assert_eq!(r.status(), 200, "client_secret_post");
}

/// Registers `client_id` with `secret` by writing clients.yaml directly, computing the documented
/// hash format, and waits for the proxy to load it.
fn write_client_with_secret(env: &Env, client_id: &str, secret: &str) {
    use sha2::{Digest, Sha256};
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let salt = [7u8; 16];
    let mut h = Sha256::new();
    h.update(b"fhir-edge client secret v1\0");
    h.update(salt);
    h.update(secret.as_bytes());
    let mut text = std::fs::read_to_string(env.proxy.clients_path()).unwrap();
    if text.contains("clients: {}") {
        text = "clients:\n".into();
    }
    text.push_str(&format!(
        "  {client_id}:\n    name: hand-written\n    allowed_tenants: [\"*\"]\n    secrets:\n      - id: s-hand\n        hash: \"sha256:{}:{}\"\n        created: \"2026-01-01T00:00:00Z\"\n",
        b64.encode(salt),
        b64.encode(h.finalize())
    ));
    let before = env.clients_reloads();
    std::fs::write(env.proxy.clients_path(), text).unwrap();
    env.await_clients_reload(before);
}

#[test]
fn malformed_token_requests_get_rfc_6749_errors_with_no_store() {
    let env = env();
    let c = env.add_client("teams", &[TENANT_A]);
    let good = form(&c, TENANT_A);
    let basic = format!("{}:{}", c.id, c.secret);

    // Both authentication methods at once.
    assert_eq!(
        oauth_error(env.token_request(&good, Some(&basic))),
        (400, "invalid_request".into())
    );
    // GET: 405 with Allow.
    let r = client().get(env.proxy.url("/token")).send().unwrap();
    assert_eq!(r.headers()["allow"], "POST");
    assert_eq!(oauth_error(r), (405, "invalid_request".into()));
    // A JSON body.
    let r = client()
        .post(env.proxy.url("/token"))
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"grant_type":"client_credentials","client_id":"{}","client_secret":"{}"}}"#,
            c.id, c.secret
        ))
        .send()
        .unwrap();
    assert_eq!(oauth_error(r), (400, "invalid_request".into()));
    // Credentials in the query string.
    let r = client()
        .post(env.proxy.url(&format!(
            "/token?client_id={}&client_secret={}",
            c.id, c.secret
        )))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("grant_type=client_credentials&scope={TENANT_A}"))
        .send()
        .unwrap();
    assert_eq!(oauth_error(r), (400, "invalid_request".into()));
    // grant_type missing, another grant, a repeated parameter.
    let no_grant = format!(
        "client_id={}&client_secret={}&scope={TENANT_A}",
        c.id, c.secret
    );
    assert_eq!(
        oauth_error(env.token_request(&no_grant, None)),
        (400, "invalid_request".into())
    );
    assert_eq!(
        oauth_error(env.token_request(&good.replace("client_credentials", "password"), None)),
        (400, "unsupported_grant_type".into())
    );
    assert_eq!(
        oauth_error(env.token_request(&format!("{good}&scope={TENANT_A}"), None)),
        (400, "invalid_request".into())
    );
    // The `charset` parameter on the media type is fine (authlib sends it).
    let r = client()
        .post(env.proxy.url("/token"))
        .header(
            "content-type",
            "application/x-www-form-urlencoded;charset=UTF-8",
        )
        .body(good.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // No client authentication at all.
    assert_eq!(
        oauth_error(env.token_request(
            &format!("grant_type=client_credentials&scope={TENANT_A}"),
            None
        )),
        (401, "invalid_client".into())
    );
}

#[test]
fn the_hyphenated_grant_type_alias_is_accepted_unless_turned_off() {
    let env = env();
    let c = env.add_client("teams", &[TENANT_A]);
    let hyphen = form(&c, TENANT_A).replace("grant_type=", "grant-type=");
    assert_eq!(env.token_request(&hyphen, None).status(), 200);

    let strict = Env::start_with(|cfg| {
        cfg.token = Some(default_token_section() + "  grant_type_hyphen_alias: false\n")
    });
    let c = strict.add_client("teams", &[TENANT_A]);
    let hyphen = form(&c, TENANT_A).replace("grant_type=", "grant-type=");
    assert_eq!(
        oauth_error(strict.token_request(&hyphen, None)),
        (400, "invalid_request".into())
    );
}

#[test]
fn the_scope_must_name_one_tenant_the_client_may_use_and_the_table_serves() {
    let env = env();
    let c = env.add_client("teams", &[TENANT_A, TENANT_UNKNOWN]);
    for scope in [
        String::new(),
        "system%2F*.read".to_string(),
        format!("%7B{TENANT_A}%7D"),
        TENANT_A.replace('-', ""),
        format!("{TENANT_A}%20{TENANT_UNKNOWN}"),
        TENANT_B.to_string(),       // not allowed for this client
        TENANT_UNKNOWN.to_string(), // allowed, but not in the routing table
    ] {
        let body = if scope.is_empty() {
            format!(
                "grant_type=client_credentials&client_id={}&client_secret={}",
                c.id, c.secret
            )
        } else {
            form(&c, &scope)
        };
        assert_eq!(
            oauth_error(env.token_request(&body, None)),
            (400, "invalid_scope".into()),
            "{scope}"
        );
    }
}

#[test]
fn unknown_clients_and_wrong_secrets_get_the_same_401() {
    let env = env();
    let c = env.add_client("teams", &[TENANT_A]);
    let wrong = env.token_request(
        &form(
            &crate::support::Client {
                secret: "fes_wrong".into(),
                ..c.clone()
            },
            TENANT_A,
        ),
        None,
    );
    let unknown = env.token_request(
        &form(
            &crate::support::Client {
                id: "00000000-0000-4000-8000-000000000000".into(),
                ..c.clone()
            },
            TENANT_A,
        ),
        None,
    );
    assert_eq!(wrong.status(), 401);
    assert_eq!(unknown.status(), 401);
    assert!(
        wrong.headers().get("www-authenticate").is_none(),
        "no Basic challenge when Basic was not used"
    );
    assert_eq!(wrong.text().unwrap(), unknown.text().unwrap());
    // With Basic, the 401 carries a Basic challenge.
    let r = env.token_request(
        &format!("grant_type=client_credentials&scope={TENANT_A}"),
        Some(&format!("{}:nope", c.id)),
    );
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic realm="));
}

#[test]
fn failed_authentications_are_throttled_and_recover() {
    let env = env();
    let c = env.add_client("teams", &[TENANT_A]);
    let bad = form(
        &crate::support::Client {
            secret: "fes_wrong".into(),
            ..c.clone()
        },
        TENANT_A,
    );
    for _ in 0..5 {
        assert_eq!(env.token_request(&bad, None).status(), 401);
    }
    // Over the limit: even the right secret waits.
    let r = env.token_request(&form(&c, TENANT_A), None);
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&retry), "{retry}");
    assert_eq!(oauth_error(r).0, 429);
    // Another client is not affected.
    let other = env.add_client("other", &[TENANT_A]);
    assert_eq!(
        env.token_request(&form(&other, TENANT_A), None).status(),
        200
    );
    // After the window, the legitimate client gets its token again.
    assert!(eventually(Duration::from_secs(6), || env
        .token_request(&form(&c, TENANT_A), None)
        .status()
        == 200));
}

#[test]
fn an_rs256_signing_key_can_be_configured_and_previous_keys_keep_verifying() {
    // First run: sign with the "previous" ES256 key and keep a token.
    let section = |active: &str, previous: &str| {
        default_token_section().replace(
            &fixture("keys/signing-es256.pem").display().to_string(),
            &fixture(active).display().to_string(),
        ) + &format!(
            "  previous_signing_keys: [{previous}]\n  issuer: \"https://edge.test\"\n  audience: \"https://edge.test/fhir\"\n"
        )
    };
    let env = Env::start_with(|c| c.token = Some(section("keys/signing-es256-previous.pem", "")));
    let c = env.add_client("teams", &[TENANT_A]);
    let old_token = env.token_for(&c, TENANT_A);
    let clients_yaml = std::fs::read_to_string(env.proxy.clients_path()).unwrap();
    drop(env);

    // Rotated: RS256 signs now, the old ES256 key is only a previous key.
    let env = Env::start_with(|cfg| {
        cfg.token = Some(section(
            "keys/signing-rs256.pem",
            &fixture("keys/signing-es256-previous.pem")
                .display()
                .to_string(),
        ))
    });
    std::fs::write(env.proxy.clients_path(), clients_yaml).unwrap();
    env.await_clients_reload(0);
    let new_token = env.token_for(&c, TENANT_A);
    assert_eq!(decode_header(&new_token).unwrap().alg, Algorithm::RS256);
    assert_eq!(env.fhir_status("/Patient/1", &new_token), 200);
    assert_eq!(
        env.fhir_status("/Patient/1", &old_token),
        200,
        "a token of the previous key stopped working"
    );
    let jwks: JwkSet = client()
        .get(env.proxy.url("/.well-known/jwks.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(jwks.keys.len(), 2);
}
