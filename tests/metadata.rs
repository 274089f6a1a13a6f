//! `GET|HEAD {base}/metadata` passes through without a token; nothing else does.

use crate::support::{client, raw, tokens, Env, TENANT_A};

#[test]
fn metadata_is_served_without_a_token_from_the_metadata_upstream() {
    let env = Env::start();
    let r = client()
        .get(env.proxy.url("/metadata?_format=json&_summary=true"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/fhir+json");
    let st: serde_json::Value = r.json().unwrap();
    assert_eq!(st["resourceType"], "CapabilityStatement");
    assert_eq!(st["implementation"]["url"], env.proxy.url("").as_str());
    // The statement is fetched canonically; the client's query is not forwarded.
    let got = env.meta.last();
    assert_eq!(
        (got.method.as_str(), got.target.as_str()),
        ("GET", "/fhir/metadata")
    );
    assert_eq!(env.a.count() + env.b.count(), 0);
}

#[test]
fn metadata_never_forwards_credentials_and_ignores_an_invalid_token() {
    let env = Env::start();
    let r = client()
        .get(env.proxy.url("/metadata"))
        .header("authorization", "Bearer not-a-valid-token")
        .header("cookie", "session=abc")
        .header("x-tenant-id", TENANT_A)
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a present but invalid token must not turn /metadata into a 401"
    );
    let got = env.meta.last();
    assert_eq!(got.header("authorization"), None);
    assert_eq!(got.header("cookie"), None);
    assert_eq!(got.header("x-tenant-id"), None);
    assert_eq!(got.header("host"), Some(env.meta.addr.to_string().as_str()));
}

/// A fragment is not part of the request target (RFC 9112 §3.2): the parser drops it, the request is
/// exactly `/metadata`, and the fragment never travels upstream.
#[test]
fn a_fragment_is_dropped_and_never_forwarded() {
    let env = Env::start();
    let r = raw::send(
        env.proxy.port,
        b"GET /metadata#../Patient HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(env.meta.last().target, "/fhir/metadata");
    assert!(env.meta.requests().iter().all(|r| !r.target.contains('#')));
}

#[test]
fn head_metadata_passes_too() {
    let env = Env::start();
    let r = client().head(env.proxy.url("/metadata")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/fhir+json");
    assert!(
        r.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 100
    );
}

#[test]
fn metadata_under_a_base_path_is_public_only_at_the_exact_path() {
    let env = Env::start_with(|c| c.base_path = "/fhir".into());
    let ok = raw::get(env.proxy.port, "/fhir/metadata", None);
    assert_eq!(ok.status, 200);
    for path in [
        "/metadata",
        "/fhir//metadata",
        "/fhirmetadata",
        "/fhir/fhir/metadata",
    ] {
        let r = raw::get(env.proxy.port, path, None);
        assert_eq!(r.status, 401, "{path}");
    }
    assert_eq!(env.meta.count(), 1);
}

/// Envoy CVE-2019-9901 / CVE-2021-29492: a normalised or prefix match on the public path is an auth
/// bypass. Every variant needs a token, and no upstream hears of it.
#[test]
fn metadata_bypass_attempts_need_a_token_and_reach_no_upstream() {
    let env = Env::start();
    let attempts = [
        "/metadata/",
        "/metadata/../Patient",
        "/metadata/..%2FPatient",
        "/metadata%2F..%2FPatient",
        "/metadata%2f..%2fPatient",
        "/metadata%252F..%252FPatient",
        "//metadata",
        "/./metadata",
        "/Patient/../metadata",
        "/%2e%2e/metadata",
        "/metadata;x",
        "/metadata;/../Patient",
        "/METADATA",
        "/Metadata",
        "/%6Detadata",
        "/metadat%61",
        "/metadata%00",
        "/metadata%20",
        "/metadata.json",
        "/metadata\\..\\Patient",
        "\\metadata",
        "http://127.0.0.1/metadata",
        "*",
    ];
    for path in attempts {
        let r = raw::get(env.proxy.port, path, None);
        assert!(
            r.status == 401 || r.status == 400,
            "{path}: got {} {}",
            r.status,
            r.body_text()
        );
    }
    // POST to the exact path is not the public read either.
    let r = raw::send(
        env.proxy.port,
        b"POST /metadata HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        env.upstream_requests(),
        0,
        "an upstream saw a bypass attempt"
    );
}

#[test]
fn bypass_variants_with_a_valid_token_are_path_errors_not_metadata() {
    let env = Env::start();
    let token = tokens::token(TENANT_A);
    for path in [
        "/metadata/../Patient",
        "/metadata;x",
        "//metadata",
        "/%6Detadata",
    ] {
        let r = raw::get(env.proxy.port, path, Some(&format!("Bearer {token}")));
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(r.json()["resourceType"], "OperationOutcome");
    }
    assert_eq!(env.upstream_requests(), 0);
}
