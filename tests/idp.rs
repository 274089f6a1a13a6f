//! External identity providers: issuers whose keys come from a JWK Set URL or an OpenID Provider
//! discovery document. Against a real OpenID provider (npm `oidc-provider`, tests/oidc) for the
//! ordinary life of an issuer — tokens, rotation, outages, restarts from the cached key set — and
//! against a stub IdP for shapes and attacks a real provider does not produce (Entra ID's key sets,
//! floods of made-up kids, a hanging or hostile key endpoint, tokens that name their own keys).

mod oidc;
mod stub;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};

use crate::support::proxy::{fixture, AUDIENCE};
use crate::support::tokens::now;
use crate::support::{
    eventually, raw, status_and_challenge, status_with_token, Env, Proxy, TENANT_A, TENANT_B,
};
use oidc::OidcProvider;
use stub::{IdpStub, Reply};

const K1: &str = "oidc-k1";
const K2: &str = "oidc-k2";
const K3: &str = "oidc-k3";
/// The stub IdP's key set path.
const KEYS: &str = "/keys";
const DISCOVERY: &str = "/.well-known/openid-configuration";
const INSUFFICIENT_SCOPE: &str = r#"error="insufficient_scope""#;

// ---------------------------------------------------------------------------------------------
// Configuration

/// One `auth.issuers` entry, as YAML list item under the test config's `issuers:`.
struct Issuer {
    issuer: String,
    /// The metric label; "" leaves `name` out (the label is then the issuer URL).
    name: String,
    /// The key source line: `discovery: "…"`, `jwks_uri: "…"`.
    source: String,
    tenants: String,
    /// More lines of the entry (`scope_claim: scp`, `cache_file: …`).
    lines: Vec<String>,
    /// Lines of its `fetch:` section besides `allow_http`.
    fetch: Vec<String>,
    /// `fetch.allow_http: true` (the stubs and the provider speak plain http).
    allow_http: bool,
}

impl Issuer {
    fn discovery(issuer: &str, name: &str, url: &str) -> Issuer {
        Issuer::new(issuer, name, format!("discovery: \"{url}\""))
    }

    fn jwks_uri(issuer: &str, name: &str, url: &str) -> Issuer {
        Issuer::new(issuer, name, format!("jwks_uri: \"{url}\""))
    }

    fn new(issuer: &str, name: &str, source: String) -> Issuer {
        Issuer {
            issuer: issuer.into(),
            name: name.into(),
            source,
            tenants: format!("[\"{TENANT_A}\"]"),
            lines: Vec::new(),
            fetch: Vec::new(),
            allow_http: true,
        }
    }

    fn line(mut self, l: &str) -> Issuer {
        self.lines.push(l.into());
        self
    }

    fn fetch(mut self, l: &str) -> Issuer {
        self.fetch.push(l.into());
        self
    }

    fn yaml(&self) -> String {
        let mut s = format!("    - issuer: \"{}\"\n", self.issuer);
        if !self.name.is_empty() {
            s.push_str(&format!("      name: {}\n", self.name));
        }
        s.push_str(&format!(
            "      audience: \"{AUDIENCE}\"\n      algorithms: [RS256]\n      {}\n      tenants: {}\n",
            self.source, self.tenants
        ));
        for l in &self.lines {
            s.push_str(&format!("      {l}\n"));
        }
        if self.allow_http || !self.fetch.is_empty() {
            s.push_str("      fetch:\n");
        }
        if self.allow_http {
            s.push_str("        allow_http: true\n");
        }
        for l in &self.fetch {
            s.push_str(&format!("        {l}\n"));
        }
        s
    }

    /// The usual fixture (tenants A and B routed) with this issuer added.
    fn env(&self) -> Env {
        let yaml = self.yaml();
        Env::start_with(|c| c.extra_issuers = yaml)
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy observations

/// GET on the admin listener; (0, "") while it does not accept connections yet (`Proxy::start`
/// waits for the proxy listener only, and the admin listener can come up a moment later).
fn admin(proxy: &Proxy, path: &str) -> (u16, String) {
    match std::net::TcpStream::connect(("127.0.0.1", proxy.admin_port)) {
        Ok(_) => proxy.admin(path),
        Err(_) => (0, String::new()),
    }
}

fn readyz(proxy: &Proxy) -> u16 {
    admin(proxy, "/readyz").0
}

fn await_ready(proxy: &Proxy) {
    assert!(
        eventually(Duration::from_secs(20), || readyz(proxy) == 200),
        "/readyz never said 200: {:?}\n{}",
        admin(proxy, "/readyz"),
        proxy.logs()
    );
}

/// The sum of the samples of `name` whose labels include every pair of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (label_block, value) = if let Some(r) = rest.strip_prefix('{') {
                let end = r.find('}')?;
                (&r[..end], &r[end + 1..])
            } else if rest.starts_with(' ') {
                ("", rest)
            } else {
                return None;
            };
            labels
                .iter()
                .all(|(k, v)| label_block.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.split_whitespace().next()?.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

fn metrics(proxy: &Proxy) -> String {
    admin(proxy, "/metrics").1
}

fn keys_loaded(proxy: &Proxy, issuer: &str) -> f64 {
    metric(
        &metrics(proxy),
        "fhir_edge_jwks_keys",
        &[("issuer", issuer)],
    )
}

fn fetches_ok(proxy: &Proxy, issuer: &str) -> f64 {
    metric(
        &metrics(proxy),
        "fhir_edge_jwks_fetches_total",
        &[("issuer", issuer), ("result", "ok")],
    )
}

/// Fetches of `issuer`'s keys that did not succeed, whatever their `result` label.
fn fetch_failures(proxy: &Proxy, issuer: &str) -> f64 {
    let m = metrics(proxy);
    metric(&m, "fhir_edge_jwks_fetches_total", &[("issuer", issuer)])
        - metric(
            &m,
            "fhir_edge_jwks_fetches_total",
            &[("issuer", issuer), ("result", "ok")],
        )
}

fn unknown_kid_refetches(proxy: &Proxy, issuer: &str) -> f64 {
    metric(
        &metrics(proxy),
        "fhir_edge_jwks_unknown_kid_refetches_total",
        &[("issuer", issuer)],
    )
}

/// `fhir-edge check --config <the proxy's config> EXTRA…`: (success, stdout + stderr).
fn check(proxy: &Proxy, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
        .args(["check", "--config"])
        .arg(proxy.dir.path().join("fhir-edge.yaml"))
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn status(env: &Env, token: &str) -> u16 {
    status_with_token(&env.proxy, "/Patient/123", token).0
}

// ---------------------------------------------------------------------------------------------
// Tokens the tests sign themselves (fixture keys; the stub IdP publishes their public halves)

/// Entra ID's key set shape (tests/fixtures/keys/entra-jwks.json): RSA keys without `alg`, with
/// `x5c`, `x5t` (= kid), `use: sig` and Entra's extra members. Key 0 is signing-rs256.pem, key 1
/// other-rs256.pem.
fn entra_jwks() -> Value {
    serde_json::from_slice(&std::fs::read(fixture("keys/entra-jwks.json")).unwrap()).unwrap()
}

/// The private key of `entra_jwks()`'s key `index`.
fn fixture_key(index: usize) -> EncodingKey {
    let file = ["keys/signing-rs256.pem", "keys/other-rs256.pem"][index];
    EncodingKey::from_rsa_pem(&std::fs::read(fixture(file)).unwrap()).unwrap()
}

/// A plain RS256 JWK for fixture key `index` under `kid`.
fn rsa_jwk(kid: &str, index: usize) -> Value {
    let k = &entra_jwks()["keys"][index];
    json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": k["n"], "e": k["e"]})
}

fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs exactly these header and payload texts (so a test can send duplicate members or odd
/// headers that a JWT library would not produce).
fn sign_raw(header: &str, payload: &str, key: &EncodingKey, alg: Algorithm) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

fn sign_json(header: &Value, payload: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    sign_raw(&header.to_string(), &payload.to_string(), key, alg)
}

/// Claims from `issuer` for `scope`, five minutes, with a `jti` no other token of this run has (so
/// the proxy's verified-token cache never answers for it).
fn claims_from(issuer: &str, scope: &str) -> Value {
    static N: AtomicUsize = AtomicUsize::new(0);
    json!({
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": "stub-client",
        "client_id": "stub-client",
        "iat": now(),
        "exp": now() + 300,
        "jti": format!("idp-{}-{}", now(), N.fetch_add(1, Ordering::SeqCst)),
        "scope": scope,
    })
}

/// An RS256 `at+jwt` from `issuer` for `scope`, with header `kid`, signed with fixture key `index`.
fn token_signed(issuer: &str, kid: &str, index: usize, scope: &str) -> String {
    sign_json(
        &json!({"alg": "RS256", "typ": "at+jwt", "kid": kid}),
        &claims_from(issuer, scope),
        &fixture_key(index),
        Algorithm::RS256,
    )
}

/// The `kid` in a token's header.
fn kid_of(token: &str) -> String {
    let h = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    serde_json::from_slice::<Value>(&h).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A stub IdP serving one RS256 key, `stub-rs` (fixture key 0), at `/keys`.
fn stub_with_key() -> IdpStub {
    let s = IdpStub::start();
    s.serve_json(KEYS, jwks(&[rsa_jwk("stub-rs", 0)]));
    s
}

// ---------------------------------------------------------------------------------------------
// The real OpenID provider

#[test]
fn tokens_of_a_real_openid_provider_are_accepted_within_the_issuers_tenants() {
    let op = OidcProvider::start(&[K1, K2], K1);
    let env = Issuer::discovery(&op.issuer(), "oidc", &op.discovery_url()).env();
    await_ready(&env.proxy);

    let t = op.token(&format!("system/*.read {TENANT_A}"));
    assert_eq!(kid_of(&t), K1);
    let (code, body) = status_with_token(&env.proxy, "/Patient/123", &t);
    assert_eq!(code, 200, "{body}\n{}", env.proxy.logs());
    assert_eq!(env.a.count(), 1);

    // Tenant B is routed, but this issuer may not grant it.
    let (code, www) = status_and_challenge(&env, &op.token(TENANT_B));
    assert_eq!(code, 403);
    assert!(www.contains(INSUFFICIENT_SCOPE), "{www}");
    assert_eq!(env.b.count(), 0);

    // Both published keys are there, from one successful fetch.
    let m = metrics(&env.proxy);
    assert_eq!(
        metric(&m, "fhir_edge_jwks_keys", &[("issuer", "oidc")]),
        2.0,
        "{m}"
    );
    assert!(fetches_ok(&env.proxy, "oidc") >= 1.0, "{m}");
    let last = metric(
        &m,
        "fhir_edge_jwks_last_success_timestamp_seconds",
        &[("issuer", "oidc")],
    );
    assert!((last - now() as f64).abs() < 120.0, "{last}\n{m}");

    // `check` fetches the discovery document and the keys and is content.
    let (ok, out) = check(&env.proxy, &[]);
    assert!(ok, "{out}");
}

#[test]
fn a_new_signing_key_works_on_its_first_token_after_one_refetch_without_a_restart() {
    let mut op = OidcProvider::start(&[K1, K2], K1);
    let env = Issuer::discovery(&op.issuer(), "oidc", &op.discovery_url()).env();
    await_ready(&env.proxy);
    let old = op.token(TENANT_A);
    assert_eq!(status(&env, &op.token(TENANT_A)), 200);

    // The second published key: known from the first fetch, no refetch.
    op.set_signing_kid(K2);
    let t2 = op.token(TENANT_A);
    assert_eq!(kid_of(&t2), K2);
    assert_eq!(status(&env, &t2), 200, "{}", env.proxy.logs());
    assert_eq!(unknown_kid_refetches(&env.proxy, "oidc"), 0.0);

    // A key the proxy has never seen: the provider restarts with it (same issuer, same port).
    op.restart(&[K1, K2, K3], K3);
    let t3 = op.token(TENANT_A);
    assert_eq!(kid_of(&t3), K3);
    let (code, body) = status_with_token(&env.proxy, "/Patient/123", &t3);
    assert_eq!(
        code,
        200,
        "{body}\n{}\nprovider: {}",
        env.proxy.logs(),
        op.logs()
    );
    assert_eq!(unknown_kid_refetches(&env.proxy, "oidc"), 1.0);
    assert_eq!(
        op.requests()["jwks"],
        1,
        "one key set fetch from the restarted provider"
    );
    assert!(
        eventually(Duration::from_secs(3), || keys_loaded(&env.proxy, "oidc")
            == 3.0),
        "{}",
        metrics(&env.proxy)
    );

    // A token signed before the rotation with a key that is still published still verifies.
    assert_eq!(kid_of(&old), K1);
    assert_eq!(status(&env, &old), 200);
    assert_eq!(env.a.count(), 4);
}

#[test]
fn tokens_signed_with_known_keys_verify_while_the_provider_is_down() {
    let mut op = OidcProvider::start(&[K1, K2], K1);
    let env = Issuer::discovery(&op.issuer(), "oidc", &op.discovery_url()).env();
    await_ready(&env.proxy);
    // Tokens issued before the outage, not yet presented (so no cache has seen them).
    let t1 = op.token(TENANT_A);
    op.set_signing_kid(K2);
    let t2 = op.token(TENANT_A);

    op.stop();
    // A token with a kid nobody published makes the proxy try the provider, and fail.
    let before = fetch_failures(&env.proxy, "oidc");
    let stranger = token_signed(&op.issuer(), "never-published", 0, TENANT_A);
    assert_eq!(status(&env, &stranger), 401);
    assert!(
        eventually(Duration::from_secs(10), || fetch_failures(
            &env.proxy, "oidc"
        ) > before),
        "no failed fetch counted:\n{}",
        metrics(&env.proxy)
    );

    assert_eq!(status(&env, &t1), 200, "{}", env.proxy.logs());
    assert_eq!(status(&env, &t2), 200);
    assert_eq!(readyz(&env.proxy), 200, "keys it has are keys it has");
    assert_eq!(keys_loaded(&env.proxy, "oidc"), 2.0);

    // `check` fetches, and cannot; `check --offline` does not try.
    let (ok, out) = check(&env.proxy, &[]);
    assert!(!ok, "check passed with the provider down: {out}");
    let (ok, out) = check(&env.proxy, &["--offline"]);
    assert!(ok, "{out}");
}

#[test]
fn a_restart_during_an_outage_comes_up_ready_from_the_cache_file_and_not_without_it() {
    let mut op = OidcProvider::start(&[K1, K2], K1);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = cache_dir.path().join("oidc-jwks.json");
    let cached = Issuer::discovery(&op.issuer(), "oidc", &op.discovery_url())
        .line(&format!("cache_file: \"{}\"", cache.display()));
    let token = {
        let env = cached.env();
        await_ready(&env.proxy);
        assert!(
            eventually(Duration::from_secs(5), || std::fs::read_to_string(&cache)
                .is_ok_and(|t| t.contains(K1) && t.contains(K2))),
            "no key set in {}:\n{}",
            cache.display(),
            env.proxy.logs()
        );
        op.token(TENANT_A)
    };
    op.stop();

    // With the cached key set: ready, and verifying.
    let env = cached.env();
    await_ready(&env.proxy);
    let (code, body) = status_with_token(&env.proxy, "/Patient/123", &token);
    assert_eq!(code, 200, "{body}\n{}", env.proxy.logs());
    assert_eq!(keys_loaded(&env.proxy, "oidc"), 2.0);
    drop(env);

    // Without: no keys, so not ready, and the token is refused.
    let env = Issuer::discovery(&op.issuer(), "oidc", &op.discovery_url()).env();
    assert!(
        eventually(Duration::from_secs(10), || fetch_failures(
            &env.proxy, "oidc"
        ) >= 1.0),
        "{}",
        metrics(&env.proxy)
    );
    assert_eq!(readyz(&env.proxy), 503);
    assert_eq!(
        status_and_challenge(&env, &token),
        (401, crate::support::INVALID_TOKEN_CHALLENGE.to_string())
    );
    assert_eq!(readyz(&env.proxy), 503);
    assert_eq!(env.a.count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Stub IdPs

#[test]
fn entra_shaped_key_sets_and_tenant_claims_are_understood() {
    let idp = IdpStub::start();
    let set = entra_jwks();
    idp.serve_json("/common/discovery/v2.0/keys", set.to_string());
    let issuer = format!("https://login.microsoftonline.com/{TENANT_A}/v2.0");
    let env = Issuer::jwks_uri(&issuer, "entra", &idp.url("/common/discovery/v2.0/keys"))
        .line("scope_claim: scp")
        .line("tenant_claim: tid")
        .env();
    await_ready(&env.proxy);
    assert_eq!(keys_loaded(&env.proxy, "entra"), 2.0);

    let kid = |i: usize| set["keys"][i]["kid"].as_str().unwrap().to_string();
    // An Entra ID v2 access token: typ JWT, x5t in the header, the tenant in `tid`, scopes in `scp`.
    let entra = |i: usize, kid: &str, tid: Option<&str>, scp: &str| {
        let mut c = json!({
            "aud": AUDIENCE, "iss": issuer, "iat": now(), "nbf": now(), "exp": now() + 300,
            "aio": "k2BgYDj", "azp": "6e74172b-be56-4843-9ff4-e66a39bb12e3", "azpacr": "1",
            "oid": "0f8c5a1e-3b0c-4a8e-9d2f-1c1d8e6b2a47", "rh": "0.AAAA.", "scp": scp,
            "sub": "hKxX3Oc0hQ9", "uti": format!("uti-{}", now()), "ver": "2.0",
        });
        if let Some(t) = tid {
            c["tid"] = json!(t);
        }
        sign_json(
            &json!({"typ": "JWT", "alg": "RS256", "x5t": kid, "kid": kid}),
            &c,
            &fixture_key(i),
            Algorithm::RS256,
        )
    };

    for i in 0..2 {
        let t = entra(i, &kid(i), Some(TENANT_A), "user_impersonation");
        let (code, body) = status_with_token(&env.proxy, "/Patient/123", &t);
        assert_eq!(code, 200, "key {i}: {body}\n{}", env.proxy.logs());
    }
    assert_eq!(env.a.count(), 2);

    // The tenant comes from `tid`, not from a GUID in the scopes.
    let (code, www) = status_and_challenge(&env, &entra(0, &kid(0), Some(TENANT_B), TENANT_A));
    assert_eq!(code, 403);
    assert!(www.contains(INSUFFICIENT_SCOPE), "{www}");
    // Signed by key 0 but naming key 1.
    assert_eq!(
        status(
            &env,
            &entra(0, &kid(1), Some(TENANT_A), "user_impersonation")
        ),
        401
    );
    assert_eq!(env.a.count() + env.b.count(), 2);
}

#[test]
fn a_flood_of_unknown_kids_costs_at_most_one_fetch_and_valid_tokens_keep_working() {
    let idp = stub_with_key();
    let issuer = idp.url("");
    let env = Issuer::jwks_uri(&issuer, "stub", &idp.url(KEYS)).env();
    await_ready(&env.proxy);
    let fetches_before = idp.hits(KEYS);

    // Made up in advance, so the flood itself is only requests.
    let flood: Vec<String> = (0..1000)
        .map(|i| token_signed(&issuer, &format!("made-up-{i}"), 0, TENANT_A))
        .collect();
    // Valid tokens, each presented once (so each is verified, not found in the token cache), then
    // the last one again until the flood is over.
    let valid: Vec<String> = (0..200)
        .map(|_| token_signed(&issuer, "stub-rs", 0, TENANT_A))
        .collect();

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let port = env.proxy.port;
    let steady = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            while !done.load(Ordering::SeqCst) || statuses.is_empty() {
                let t = &valid[statuses.len().min(valid.len() - 1)];
                statuses.push(raw::get(port, "/Patient/123", Some(&format!("Bearer {t}"))).status);
            }
            statuses
        })
    };
    let start = Instant::now();
    let flood = Arc::new(flood);
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let flood = flood.clone();
            std::thread::spawn(move || {
                (w..flood.len())
                    .step_by(8)
                    .map(|i| {
                        raw::get(port, "/Patient/123", Some(&format!("Bearer {}", flood[i]))).status
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let flood_statuses: Vec<u16> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let took = start.elapsed();
    done.store(true, Ordering::SeqCst);
    let steady = steady.join().unwrap();

    assert_eq!(flood_statuses.len(), 1000);
    assert!(
        flood_statuses.iter().all(|&s| s == 401),
        "{:?}",
        flood_statuses
            .iter()
            .filter(|&&s| s != 401)
            .collect::<Vec<_>>()
    );
    assert!(
        steady.iter().all(|&s| s == 200),
        "valid-token requests during the flood: {steady:?}"
    );
    let extra = idp.hits(KEYS) - fetches_before;
    assert!(
        extra <= 1,
        "{extra} key set fetches for 1000 unknown kids in {took:?}"
    );
    let m = metrics(&env.proxy);
    assert!(
        metric(
            &m,
            "fhir_edge_jwks_unknown_kid_refetches_total",
            &[("issuer", "stub")]
        ) <= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "fhir_edge_jwks_unknown_kid_refusals_total",
            &[("issuer", "stub")]
        ) >= 1.0,
        "{m}"
    );
}

#[test]
fn a_hanging_key_endpoint_delays_only_unknown_kid_requests_and_only_for_the_wait() {
    let idp = stub_with_key();
    let issuer = idp.url("");
    let env = Issuer::jwks_uri(&issuer, "stub", &idp.url(KEYS))
        .fetch("unknown_kid_wait_ms: 2000")
        .fetch("timeout_ms: 5000")
        .env();
    await_ready(&env.proxy);
    let before = idp.hits(KEYS);
    idp.set(
        KEYS,
        Reply::json(jwks(&[rsa_jwk("stub-rs", 0)])).delayed(Duration::from_secs(30)),
    );

    let port = env.proxy.port;
    let unknown = |kid: &str| {
        let t = token_signed(&issuer, kid, 0, TENANT_A);
        std::thread::spawn(move || {
            let start = Instant::now();
            let s = raw::get(port, "/Patient/123", Some(&format!("Bearer {t}"))).status;
            (s, start.elapsed())
        })
    };
    let first = unknown("rotated-1");
    assert!(
        eventually(Duration::from_secs(5), || idp.hits(KEYS) > before),
        "the unknown kid did not make the proxy fetch the key set"
    );
    let second = unknown("rotated-2");

    // Meanwhile valid tokens do not wait for the hanging fetch.
    for _ in 0..20 {
        let t = token_signed(&issuer, "stub-rs", 0, TENANT_A);
        let start = Instant::now();
        let code = status(&env, &t);
        let took = start.elapsed();
        assert_eq!(code, 200);
        assert!(
            took < Duration::from_millis(1500),
            "a valid token took {took:?}"
        );
    }

    for (name, h) in [("first", first), ("second", second)] {
        let (code, took) = h.join().unwrap();
        assert_eq!(code, 401, "{name}");
        assert!(
            took < Duration::from_millis(4500),
            "the {name} unknown-kid request took {took:?} (wait 2 s)"
        );
    }
    assert_eq!(
        status(&env, &token_signed(&issuer, "stub-rs", 0, TENANT_A)),
        200
    );
}

#[test]
fn broken_or_hostile_key_sets_are_refused_and_the_last_good_one_kept() {
    let idp = stub_with_key();
    let issuer = idp.url("");
    let env = Issuer::jwks_uri(&issuer, "stub", &idp.url(KEYS))
        .fetch("unknown_kid_interval_seconds: 1")
        .env();
    await_ready(&env.proxy);
    assert_eq!(
        status(&env, &token_signed(&issuer, "stub-rs", 0, TENANT_A)),
        200
    );

    // Each bad answer holds only another key: had the proxy taken it, `stub-rs` would stop working.
    let other = rsa_jwk("other", 1);
    let mut other_key = other.to_string();
    other_key.pop(); // drop the closing brace to add members by hand
    let cases: Vec<(&str, Reply)> = vec![
        (
            "over 1 MiB",
            Reply::json(format!(
                r#"{{"keys":[{other}],"padding":"{}"}}"#,
                "x".repeat(1_100_000)
            )),
        ),
        (
            "nested 100,000 deep",
            Reply::json(format!(
                r#"{{"keys":[{other_key},"x-nested":{}{}}}]}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            )),
        ),
        (
            "over max_keys",
            Reply::json(jwks(
                &(0..101)
                    .map(|i| rsa_jwk(&format!("other-{i}"), 1))
                    .collect::<Vec<_>>(),
            )),
        ),
        (
            "HTTP 500",
            Reply::json(jwks(std::slice::from_ref(&other))).status(500),
        ),
        ("not JSON", Reply::json(r#"{"keys":[{"kty":"RSA","#)),
        ("no keys", Reply::json(r#"{"keys":[]}"#)),
        ("not a key set", Reply::json(r#"{"kty":"RSA"}"#)),
    ];
    for (i, (what, reply)) in cases.into_iter().enumerate() {
        idp.set(KEYS, reply);
        let failures = fetch_failures(&env.proxy, "stub");
        let fetched = eventually(Duration::from_secs(15), || {
            // Unknown kids ask for a refetch (at most one a second here).
            let t = token_signed(&issuer, &format!("probe-{i}-{}", now()), 0, TENANT_A);
            assert_eq!(status(&env, &t), 401);
            fetch_failures(&env.proxy, "stub") > failures
        });
        assert!(
            fetched,
            "{what}: no failed fetch counted\n{}",
            metrics(&env.proxy)
        );
        let fresh = token_signed(&issuer, "stub-rs", 0, TENANT_A);
        assert_eq!(
            status(&env, &fresh),
            200,
            "{what}: the last good key set was not kept\n{}",
            env.proxy.logs()
        );
        assert_eq!(keys_loaded(&env.proxy, "stub"), 1.0, "{what}");
        assert_eq!(readyz(&env.proxy), 200, "{what}");
    }

    // A good key set is taken again.
    idp.serve_json(
        KEYS,
        jwks(&[rsa_jwk("stub-rs", 0), rsa_jwk("stub-rs-2", 1)]),
    );
    assert!(
        eventually(Duration::from_secs(15), || status(
            &env,
            &token_signed(&issuer, "stub-rs-2", 1, TENANT_A)
        ) == 200),
        "{}",
        env.proxy.logs()
    );
    assert_eq!(keys_loaded(&env.proxy, "stub"), 2.0);
}

#[test]
fn keys_and_key_urls_named_by_a_token_are_never_used() {
    let idp = stub_with_key();
    let issuer = idp.url("");
    let env = Issuer::jwks_uri(&issuer, "stub", &idp.url(KEYS)).env();
    await_ready(&env.proxy);

    // The attacker's own key, published where the token says to look.
    let attacker = IdpStub::start();
    let attacker_jwk = rsa_jwk("attacker", 1);
    attacker.serve_json("/jwks", jwks(std::slice::from_ref(&attacker_jwk)));
    let cert = entra_jwks()["keys"][1]["x5c"][0].clone();
    let claims = claims_from(&issuer, TENANT_A);
    let forged = |header: Value| sign_json(&header, &claims, &fixture_key(1), Algorithm::RS256);
    let cases = [
        (
            "jku, unknown kid",
            json!({"alg": "RS256", "typ": "at+jwt", "kid": "attacker", "jku": attacker.url("/jwks")}),
        ),
        (
            "jku, known kid",
            json!({"alg": "RS256", "typ": "at+jwt", "kid": "stub-rs", "jku": attacker.url("/jwks")}),
        ),
        (
            "x5u",
            json!({"alg": "RS256", "typ": "at+jwt", "kid": "attacker", "x5u": attacker.url("/cert.pem")}),
        ),
        (
            "embedded jwk",
            json!({"alg": "RS256", "typ": "at+jwt", "kid": "attacker", "jwk": attacker_jwk}),
        ),
        (
            "embedded jwk, no kid",
            json!({"alg": "RS256", "typ": "at+jwt", "jwk": attacker_jwk}),
        ),
        (
            "embedded x5c",
            json!({"alg": "RS256", "typ": "at+jwt", "kid": "attacker", "x5c": [cert]}),
        ),
    ];
    for (what, header) in cases {
        let (code, www) = status_and_challenge(&env, &forged(header));
        assert_eq!(
            (code, www.as_str()),
            (401, crate::support::INVALID_TOKEN_CHALLENGE),
            "{what}"
        );
    }
    assert!(
        !eventually(Duration::from_secs(1), || attacker.connections() > 0),
        "the proxy contacted a URL named in a token"
    );
    assert_eq!(env.upstream_requests(), 0);
}

#[test]
fn malformed_headers_and_payloads_from_an_external_issuer_are_401() {
    let idp = stub_with_key();
    let issuer = idp.url("");
    let env = Issuer::jwks_uri(&issuer, "stub", &idp.url(KEYS)).env();
    await_ready(&env.proxy);
    let key = fixture_key(0);
    let header = r#"{"alg":"RS256","typ":"at+jwt","kid":"stub-rs"}"#;
    let payload = |scope_members: &str| {
        format!(
            r#"{{"iss":"{issuer}","aud":"{AUDIENCE}","sub":"s","client_id":"s","iat":{},"exp":{},"jti":"raw-{}-{}",{scope_members}}}"#,
            now(),
            now() + 300,
            now(),
            scope_members.len()
        )
    };

    // The same hand-made shape, well formed, passes: what follows fails for its one defect.
    let good = sign_raw(
        header,
        &payload(&format!(r#""scope":"{TENANT_A}""#)),
        &key,
        Algorithm::RS256,
    );
    assert_eq!(status(&env, &good), 200, "{}", env.proxy.logs());

    let cases = [
        (
            "duplicate scope",
            sign_raw(
                header,
                &payload(&format!(r#""scope":"{TENANT_B}","scope":"{TENANT_A}""#)),
                &key,
                Algorithm::RS256,
            ),
        ),
        (
            "scope and scp",
            sign_raw(
                header,
                &payload(&format!(r#""scope":"{TENANT_A}","scp":["{TENANT_A}"]"#)),
                &key,
                Algorithm::RS256,
            ),
        ),
        (
            "crit header",
            sign_raw(
                r#"{"alg":"RS256","typ":"at+jwt","kid":"stub-rs","crit":["x-must"],"x-must":true}"#,
                &payload(&format!(r#""scope":"{TENANT_A}""#)),
                &key,
                Algorithm::RS256,
            ),
        ),
        (
            "HS256 keyed with the RSA JWK's text, kid naming it",
            sign_raw(
                r#"{"alg":"HS256","typ":"at+jwt","kid":"stub-rs"}"#,
                &payload(&format!(r#""scope":"{TENANT_A}""#)),
                &EncodingKey::from_secret(rsa_jwk("stub-rs", 0).to_string().as_bytes()).unwrap(),
                Algorithm::HS256,
            ),
        ),
        (
            "HS256 keyed with the modulus, kid naming the RSA key",
            sign_raw(
                r#"{"alg":"HS256","typ":"at+jwt","kid":"stub-rs"}"#,
                &payload(&format!(r#""scope":"{TENANT_A}""#)),
                &EncodingKey::from_secret(rsa_jwk("stub-rs", 0)["n"].as_str().unwrap().as_bytes())
                    .unwrap(),
                Algorithm::HS256,
            ),
        ),
    ];
    for (what, t) in cases {
        let (code, www) = status_and_challenge(&env, &t);
        assert_eq!(
            (code, www.as_str()),
            (401, crate::support::INVALID_TOKEN_CHALLENGE),
            "{what}"
        );
    }
    assert_eq!(env.a.count(), 1);
    assert_eq!(env.b.count(), 0);
}

#[test]
fn a_discovery_document_for_another_issuer_gives_the_issuer_no_keys() {
    let idp = stub_with_key();
    let issuer = idp.url("");
    // Its `issuer` differs by a trailing slash: not the same issuer (OpenID Discovery §4.3).
    idp.serve_json(
        DISCOVERY,
        json!({"issuer": format!("{issuer}/"), "jwks_uri": idp.url(KEYS)}).to_string(),
    );
    let env = Issuer::discovery(&issuer, "local", &idp.url(DISCOVERY)).env();
    assert!(
        eventually(Duration::from_secs(10), || idp.hits(DISCOVERY) >= 1),
        "discovery never fetched"
    );
    assert!(
        !eventually(Duration::from_secs(2), || readyz(&env.proxy) == 200),
        "ready with a discovery document for another issuer"
    );
    assert_eq!(readyz(&env.proxy), 503);
    assert_eq!(keys_loaded(&env.proxy, "local"), 0.0);
    assert_eq!(
        status(&env, &token_signed(&issuer, "stub-rs", 0, TENANT_A)),
        401
    );

    let (ok, out) = check(&env.proxy, &[]);
    assert!(!ok, "check passed: {out}");
    assert!(out.contains("issuer"), "{out}");
    assert!(out.contains(&issuer), "{out}");
}

#[test]
fn check_fetches_and_validates_the_keys_and_offline_does_not_fetch() {
    let idp = stub_with_key();
    let issuer = idp.url("");
    idp.serve_json(
        DISCOVERY,
        json!({"issuer": issuer, "jwks_uri": idp.url(KEYS)}).to_string(),
    );
    let env = Issuer::discovery(&issuer, "stub", &idp.url(DISCOVERY)).env();
    await_ready(&env.proxy);
    let seen = || idp.hits(DISCOVERY) + idp.hits(KEYS);

    let before = seen();
    let (ok, out) = check(&env.proxy, &[]);
    assert!(ok, "{out}");
    assert!(idp.hits(KEYS) > 0 && seen() > before, "check did not fetch");

    let before = seen();
    let (ok, out) = check(&env.proxy, &["--offline"]);
    assert!(ok, "{out}");
    assert_eq!(seen(), before, "check --offline fetched");

    // An unusable key set fails the check, and says which issuer.
    idp.serve_json(KEYS, r#"{"keys":[]}"#);
    let (ok, out) = check(&env.proxy, &[]);
    assert!(!ok, "check passed with an empty key set: {out}");
    assert!(out.contains(&issuer) || out.contains("stub"), "{out}");
    let (ok, out) = check(&env.proxy, &["--offline"]);
    assert!(ok, "{out}");
}

#[test]
fn scp_as_a_list_or_a_string_and_tenants_any() {
    let idp = stub_with_key();
    let issuer = idp.url("");
    // No `name`: the metric label is the issuer URL.
    let mut cfg = Issuer::jwks_uri(&issuer, "", &idp.url(KEYS)).line("scope_claim: scp");
    cfg.tenants = "any".into();
    let env = cfg.env();
    await_ready(&env.proxy);
    let with_scp = |scp: Value| {
        let mut c = claims_from(&issuer, "");
        c.as_object_mut().unwrap().remove("scope");
        c["scp"] = scp;
        sign_json(
            &json!({"alg": "RS256", "typ": "at+jwt", "kid": "stub-rs"}),
            &c,
            &fixture_key(0),
            Algorithm::RS256,
        )
    };
    // Okta: a list; Entra ID: a space-separated string. `tenants: any` lets both tenants through.
    assert_eq!(
        status(&env, &with_scp(json!(["system/*.read", TENANT_A]))),
        200,
        "{}",
        env.proxy.logs()
    );
    assert_eq!(
        status(&env, &with_scp(json!(format!("system/*.read {TENANT_B}")))),
        200
    );
    assert_eq!((env.a.count(), env.b.count()), (1, 1));
    assert_eq!(
        keys_loaded(&env.proxy, &issuer),
        1.0,
        "{}",
        metrics(&env.proxy)
    );
}

#[test]
fn background_refresh_follows_cache_control_within_the_configured_bounds() {
    let idp = IdpStub::start();
    let issuer = idp.url("");
    // A day, by Cache-Control; max_refresh_seconds caps it at 2 s.
    let cached_for_a_day = |keys: &[Value]| {
        let mut r = Reply::json(jwks(keys));
        r.extra_headers
            .push(("Cache-Control".into(), "public, max-age=86400".into()));
        r
    };
    idp.set(KEYS, cached_for_a_day(&[rsa_jwk("stub-rs", 0)]));
    let env = Issuer::jwks_uri(&issuer, "stub", &idp.url(KEYS))
        .fetch("min_refresh_seconds: 1")
        .fetch("max_refresh_seconds: 2")
        .env();
    await_ready(&env.proxy);
    assert_eq!(keys_loaded(&env.proxy, "stub"), 1.0);

    // A key published later is picked up with no token asking for it.
    idp.set(
        KEYS,
        cached_for_a_day(&[rsa_jwk("stub-rs", 0), rsa_jwk("stub-rs-2", 1)]),
    );
    assert!(
        eventually(Duration::from_secs(10), || keys_loaded(&env.proxy, "stub")
            == 2.0),
        "no background refresh within 10 s:\n{}",
        metrics(&env.proxy)
    );
    assert_eq!(unknown_kid_refetches(&env.proxy, "stub"), 0.0);
    assert_eq!(
        status(&env, &token_signed(&issuer, "stub-rs-2", 1, TENANT_A)),
        200
    );
}

#[test]
fn key_endpoints_are_https_with_a_ca_file_and_http_only_when_allowed() {
    // The fixture TLS server (certificate for 127.0.0.1 from the fixture CA) answers every path
    // with the key set.
    let tls = crate::support::StubUpstream::start_tls("idp");
    tls.set_response(
        &[("Content-Type", "application/json")],
        jwks(&[rsa_jwk("stub-rs", 0)]),
    );
    let ca = fixture("tls/ca.pem");
    let mut trusted = Issuer::jwks_uri(&tls.url(""), "tls", &tls.url(KEYS))
        .fetch(&format!("ca_file: \"{}\"", ca.display()));
    trusted.allow_http = false;
    let env = trusted.env();
    await_ready(&env.proxy);
    assert_eq!(
        status(&env, &token_signed(&tls.url(""), "stub-rs", 0, TENANT_A)),
        200
    );
    drop(env);

    // The system's roots do not know the fixture CA: no keys.
    let mut untrusted = Issuer::jwks_uri(&tls.url(""), "tls", &tls.url(KEYS));
    untrusted.allow_http = false;
    let env = untrusted.env();
    assert!(
        eventually(Duration::from_secs(10), || fetch_failures(
            &env.proxy, "tls"
        ) >= 1.0),
        "{}",
        metrics(&env.proxy)
    );
    assert_eq!(readyz(&env.proxy), 503);
    drop(env);

    // Plain http without allow_http is a configuration error.
    let idp = stub_with_key();
    let mut plain = Issuer::jwks_uri(&idp.url(""), "plain", &idp.url(KEYS));
    plain.allow_http = false;
    let yaml = plain.yaml();
    let meta = crate::support::StubUpstream::start("meta");
    let cfg = {
        let mut c = crate::support::ProxyConfig::new(
            meta.url("/fhir"),
            crate::support::proxy::routes_yaml(&[(TENANT_A, "a", &meta.url(""), "")]),
        );
        c.extra_issuers = yaml;
        c
    };
    let err = match Proxy::try_start(cfg) {
        Ok(_) => panic!("started with a plain-http key URL and no allow_http"),
        Err(logs) => logs,
    };
    assert!(err.contains("https"), "{err}");
    assert_eq!(idp.connections(), 0);
}
