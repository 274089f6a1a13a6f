//! Discovery (SPEC §2): the CapabilityStatement carries the SMART oauth-uris that point at fhir-edge's
//! token endpoint, is cached with stale-if-error, and agrees with .well-known/smart-configuration.

use std::time::Duration;

use serde_json::Value;

use crate::support::proxy::{default_token_section, free_port, routes_yaml};
use crate::support::{
    capability_statement, client, eventually, Env, Proxy, ProxyConfig, StubUpstream, TENANT_A,
};

const OAUTH_URIS: &str = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";

fn env_with_token(top: &str) -> Env {
    let top = top.to_string();
    Env::start_with(move |c| {
        c.token = Some(default_token_section());
        c.top = top;
    })
}

fn metadata(env: &Env) -> Value {
    let r = client().get(env.proxy.url("/metadata")).send().unwrap();
    assert_eq!(r.status(), 200);
    r.json().unwrap()
}

fn oauth_uri(st: &Value, name: &str) -> String {
    let ext = st["rest"][0]["security"]["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == OAUTH_URIS)
        .expect("oauth-uris extension");
    ext["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == name)
        .and_then(|e| e["valueUri"].as_str())
        .unwrap_or_else(|| panic!("no {name} in oauth-uris"))
        .to_string()
}

#[test]
fn the_statement_advertises_our_token_endpoint_and_the_teams_security_coding() {
    let env = env_with_token("");
    let st = metadata(&env);
    let base = env.proxy.url("");
    assert_eq!(oauth_uri(&st, "token"), format!("{base}/token"));
    assert_eq!(oauth_uri(&st, "authorize"), format!("{base}/authorize"));
    assert_eq!(oauth_uri(&st, "register"), format!("{base}/register"));
    let service = &st["rest"][0]["security"]["service"][0]["coding"];
    assert_eq!(
        service[0],
        serde_json::json!({"system": "http://hl7.org/fhir/ValueSet/restful-security-service", "code": "OAuth"})
    );
    assert_eq!(
        service[1]["system"],
        "http://terminology.hl7.org/CodeSystem/restful-security-service"
    );
    assert_eq!(
        st["rest"][0]["security"]["cors"], true,
        "the rest of the upstream's security is kept"
    );
    assert_eq!(st["implementation"]["url"], base.as_str());
    assert_eq!(st["software"]["name"], "stub", "everything else is kept");
    // The R4 canonical repair, and no upstream address anywhere.
    assert_eq!(
        st["rest"][0]["resource"][0]["profile"],
        "http://hl7.org/fhir/StructureDefinition/Patient"
    );
    assert!(!st.to_string().contains(&env.meta.addr.to_string()), "{st}");

    // The advertised token URL really answers.
    let r = client()
        .post(oauth_uri(&st, "token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials&client_id=x&client_secret=y&scope=s")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    // And the authorize URI answers an OAuth error rather than redirecting anywhere.
    let r = client()
        .get(oauth_uri(&st, "authorize") + "?response_type=code&redirect_uri=https://evil.example/")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("location").is_none());
    assert_eq!(
        r.json::<Value>().unwrap()["error"],
        "unsupported_response_type"
    );
}

#[test]
fn smart_configuration_agrees_with_the_statement() {
    let env = env_with_token("");
    let st = metadata(&env);
    let r = client()
        .get(env.proxy.url("/.well-known/smart-configuration"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let sc: Value = r.json().unwrap();
    assert_eq!(sc["token_endpoint"], oauth_uri(&st, "token").as_str());
    assert_eq!(
        sc["authorization_endpoint"],
        oauth_uri(&st, "authorize").as_str()
    );
    assert_eq!(
        sc["registration_endpoint"],
        oauth_uri(&st, "register").as_str()
    );
    assert_eq!(
        sc["grant_types_supported"],
        serde_json::json!(["client_credentials"])
    );
    assert_eq!(
        sc["token_endpoint_auth_methods_supported"],
        serde_json::json!(["client_secret_basic", "client_secret_post"])
    );
    assert!(sc["scopes_supported"].is_array() && sc["capabilities"].is_array());
    let jwks: Value = client()
        .get(sc["jwks_uri"].as_str().unwrap())
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
}

#[test]
fn the_statement_is_cached_refreshed_after_its_ttl_and_served_stale_when_the_upstream_fails() {
    let env = env_with_token("metadata_ttl_seconds: 1");
    metadata(&env);
    metadata(&env);
    assert_eq!(
        env.meta.count(),
        1,
        "the second request was not served from the cache"
    );
    // After the TTL, the next request refreshes.
    std::thread::sleep(Duration::from_millis(1100));
    metadata(&env);
    assert_eq!(env.meta.count(), 2);
    // The upstream turns bad: the last good copy keeps being served.
    env.meta
        .set_response(&[("Content-Type", "text/html")], "<h1>maintenance</h1>");
    std::thread::sleep(Duration::from_millis(1100));
    let st = metadata(&env);
    assert_eq!(st["resourceType"], "CapabilityStatement");
    assert!(env.meta.count() >= 3, "no refresh was attempted");
    assert!(eventually(Duration::from_secs(2), || env
        .proxy
        .logs()
        .contains("cannot refresh the CapabilityStatement")));
}

#[test]
fn without_any_good_copy_metadata_is_a_502_operation_outcome() {
    let a = StubUpstream::start("a");
    let dead = format!("http://127.0.0.1:{}/fhir", free_port());
    let proxy = Proxy::start(ProxyConfig::new(
        dead,
        routes_yaml(&[(TENANT_A, "a", &a.url(""), "")]),
    ));
    let r = client().get(proxy.url("/metadata")).send().unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        r.json::<Value>().unwrap()["resourceType"],
        "OperationOutcome"
    );

    // An upstream statement strict R4 clients would reject is refused too, and the reason logged.
    let bad = StubUpstream::start("bad");
    let mut st: Value = serde_json::from_str(&capability_statement(&bad.url("/fhir"))).unwrap();
    st.as_object_mut().unwrap().remove("kind");
    bad.set_response(&[("Content-Type", "application/fhir+json")], st.to_string());
    let proxy = Proxy::start(ProxyConfig::new(
        bad.url("/fhir"),
        routes_yaml(&[(TENANT_A, "a", &a.url(""), "")]),
    ));
    assert_eq!(
        client()
            .get(proxy.url("/metadata"))
            .send()
            .unwrap()
            .status(),
        502
    );
    assert!(eventually(Duration::from_secs(2), || proxy
        .logs()
        .contains("kind is missing")));
}

#[test]
fn only_json_is_served_and_format_requests_are_honoured() {
    let env = Env::start();
    let get = |q: &str, accept: Option<&str>| {
        let mut r = client().get(env.proxy.url(&format!("/metadata{q}")));
        if let Some(a) = accept {
            r = r.header("accept", a);
        }
        r.send().unwrap()
    };
    assert_eq!(
        get("?_format=json", None).headers()["content-type"],
        "application/fhir+json"
    );
    assert_eq!(
        get("?_format=application/json", None).headers()["content-type"],
        "application/json"
    );
    assert_eq!(
        get("", Some("application/json")).headers()["content-type"],
        "application/json"
    );
    assert_eq!(
        get("", Some("application/fhir+json; fhirVersion=4.0")).status(),
        200
    );
    let r = get("?_format=xml", None);
    assert_eq!(r.status(), 406);
    assert_eq!(
        r.json::<Value>().unwrap()["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(get("", Some("application/fhir+xml")).status(), 406);
}

#[test]
fn the_statement_can_come_from_a_file() {
    let a = StubUpstream::start("a");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("capability.json");
    std::fs::write(&file, capability_statement("https://hospital.example/fhir")).unwrap();
    let mut cfg = ProxyConfig::new(
        String::new(),
        routes_yaml(&[(TENANT_A, "a", &a.url(""), "")]),
    );
    cfg.top = format!("metadata_file: {}", file.display());
    cfg.token = Some(default_token_section());
    let proxy = Proxy::start(cfg);
    let st: Value = client()
        .get(proxy.url("/metadata"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(st["implementation"]["url"], proxy.url("").as_str());
    assert_eq!(oauth_uri(&st, "token"), proxy.url("/token"));
    assert_eq!(a.count(), 0);
}

#[test]
fn without_a_token_endpoint_there_is_no_smart_configuration() {
    let env = Env::start();
    let r = client()
        .get(env.proxy.url("/.well-known/smart-configuration"))
        .send()
        .unwrap();
    assert_ne!(
        r.status(),
        200,
        "a 200 without endpoints would mislead racing clients"
    );
}
