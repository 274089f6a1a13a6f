//! What reaches the upstream: the tenant's server only, the path and query byte-exact, bodies intact,
//! and only the headers the proxy decides on.

use crate::support::proxy::routes_yaml;
use crate::support::{
    client, raw, tokens::token, Env, Proxy, ProxyConfig, StubUpstream, TENANT_A, TENANT_B, TENANT_C,
};

fn bearer(t: &str) -> String {
    format!("Bearer {}", token(t))
}

#[test]
fn each_token_reaches_its_own_tenants_upstream_only() {
    let env = Env::start();
    let r = client()
        .get(env.proxy.url("/Patient/1"))
        .header("authorization", bearer(TENANT_A))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-upstream"], "tenant-a");
    let r = client()
        .get(env.proxy.url("/Patient/1"))
        .header("authorization", bearer(TENANT_B))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-upstream"], "tenant-b");
    assert_eq!((env.a.count(), env.b.count(), env.meta.count()), (1, 1, 0));
    // Tenant A's route has base path /r4; B's has none.
    assert_eq!(env.a.last().target, "/r4/Patient/1");
    assert_eq!(env.b.last().target, "/Patient/1");
}

#[test]
fn an_uppercase_tenant_guid_routes_like_the_lowercase_one() {
    let env = Env::start();
    let r = client()
        .get(env.proxy.url("/Patient/1"))
        .header("authorization", bearer(&TENANT_A.to_uppercase()))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "tenant-a");
}

#[test]
fn spoofed_tenant_and_forwarding_headers_are_ignored_and_rebuilt() {
    let env = Env::start();
    let r = raw::send(
        env.proxy.port,
        format!(
            "GET /Patient/1 HTTP/1.1\r\nHost: {b}\r\nAuthorization: {auth}\r\nX-Tenant-Id: {TENANT_B}\r\nX-MS-Tenant-ID: {TENANT_B}\r\n\
             Tenant: {TENANT_B}\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: gopher\r\n\
             Forwarded: for=6.6.6.6;host=evil.example\r\nX-Real-IP: 6.6.6.6\r\nCookie: sid=1\r\nProxy-Authorization: Basic eA==\r\n\
             Accept: application/fhir+json\r\nPrefer: handling=strict\r\nConnection: close\r\n\r\n",
            b = env.b.addr,
            auth = bearer(TENANT_A),
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        env.b.count(),
        0,
        "tenant B's upstream was reached through spoofed headers"
    );
    let got = env.a.last();
    assert_eq!(got.header("host"), Some(env.a.addr.to_string().as_str()));
    for h in [
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-tenant-id",
        "x-ms-tenant-id",
        "tenant",
        "forwarded",
        "x-real-ip",
    ] {
        assert_eq!(got.header(h), None, "{h} was forwarded");
    }
    assert_eq!(got.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(got.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        got.header("x-forwarded-host"),
        Some(env.proxy.authority().as_str())
    );
    assert_eq!(got.header_count("x-forwarded-for"), 1);
    // Ordinary request headers pass.
    assert_eq!(got.header("accept"), Some("application/fhir+json"));
    assert_eq!(got.header("prefer"), Some("handling=strict"));
    // A request id is generated, sent upstream and returned.
    let id = got
        .header("x-request-id")
        .expect("x-request-id upstream")
        .to_string();
    assert_eq!(r.header("x-request-id"), Some(id.as_str()));
}

#[test]
fn a_sane_client_request_id_is_kept_and_a_strange_one_replaced() {
    let env = Env::start();
    let r = client()
        .get(env.proxy.url("/Patient/1"))
        .header("authorization", bearer(TENANT_A))
        .header("x-request-id", "req-0123456789abcdef")
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "req-0123456789abcdef");
    assert_eq!(
        env.a.last().header("x-request-id"),
        Some("req-0123456789abcdef")
    );
    let r = client()
        .get(env.proxy.url("/Patient/1"))
        .header("authorization", bearer(TENANT_A))
        .header("x-request-id", "<script>")
        .send()
        .unwrap();
    assert_ne!(r.headers()["x-request-id"], "<script>");
}

#[test]
fn paths_and_query_strings_arrive_byte_exact() {
    let env = Env::start();
    let targets = [
        "/Patient?name=Sm%C3%B6rgrav&birthdate=ge1970-01-01&_count=10",
        "/Patient?family:contains=o%27Brien&given=J%20R&x=a+b",
        "/Observation?patient=Patient/123&category=vital-signs&_sort=-date",
        "/Encounter?patient=123&_sort:desc=date&_count=1",
        "/Patient?identifier=http://hl7.org/fhir/sid/us-ssn|999-99-9999",
        "/Patient?name=a&name=b&&=&x",
        "/Patient/123/_history/2",
        "/Patient/$everything?_since=2024-01-01T00:00:00Z",
        "/Patient/",
        "/",
        "/Patient?",
    ];
    for target in targets {
        let r = raw::get(env.proxy.port, target, Some(&bearer(TENANT_A)));
        assert_eq!(r.status, 200, "{target}: {}", r.body_text());
        assert_eq!(env.a.last().target, format!("/r4{target}"), "{target}");
    }
}

#[test]
fn search_by_post_forwards_the_form_body_and_content_type_intact() {
    let env = Env::start();
    let body = "family=Sm%C3%B6rgrav&family%3Acontains=sm&given=Jo+Anne&birthdate=1970-01-01&gender=female&identifier=urn%3Aoid%3A1%7C42&_count=5";
    let r = client()
        .post(env.proxy.url("/Patient/_search"))
        .header("authorization", bearer(TENANT_A))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = env.a.last();
    assert_eq!(got.method, "POST");
    assert_eq!(got.target, "/r4/Patient/_search");
    assert_eq!(got.body, body.as_bytes());
    assert_eq!(
        got.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
}

#[test]
fn a_batch_of_reads_is_forwarded_and_a_batch_with_writes_never_arrives_whole() {
    let env = Env::start();
    let reads = r#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET","url":"Patient?name=x"}},{"request":{"method":"GET","url":"Condition?patient=1"}}]}"#;
    let r = client()
        .post(env.proxy.url("/"))
        .header("authorization", bearer(TENANT_A))
        .header("content-type", "application/fhir+json")
        .body(reads)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = env.a.last();
    assert_eq!(
        (got.target.as_str(), got.body.as_slice()),
        ("/r4/", reads.as_bytes())
    );

    let before = env.a.requests().iter().filter(|r| r.complete).count();
    for body in [
        r#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"DELETE","url":"Patient/1"}}]}"#,
        r#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"GET","url":"Patient"}}]}"#,
        "not json",
    ] {
        let r = client()
            .post(env.proxy.url(""))
            .header("authorization", bearer(TENANT_A))
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 405, "{body}");
    }
    let r = client()
        .post(env.proxy.url("/"))
        .header("authorization", bearer(TENANT_A))
        .header("content-type", "application/fhir+xml")
        .body("<Bundle/>")
        .send()
        .unwrap();
    assert_eq!(r.status(), 415);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let after = env.a.requests().iter().filter(|r| r.complete).count();
    assert_eq!(
        before, after,
        "a refused batch reached the upstream complete"
    );
}

#[test]
fn writes_are_405_unless_the_route_allows_them() {
    let a = StubUpstream::start("tenant-a");
    let c = StubUpstream::start("tenant-c");
    let routes = routes_yaml(&[
        (TENANT_A, "tenant-a", &a.url(""), ""),
        (TENANT_C, "tenant-c", &c.url(""), "allow_writes: true"),
    ]);
    let proxy = Proxy::start(ProxyConfig::new(a.url(""), routes));
    for method in ["PUT", "PATCH", "DELETE", "POST"] {
        let r = client()
            .request(method.parse().unwrap(), proxy.url("/Patient/1"))
            .header("authorization", bearer(TENANT_A))
            .header("content-type", "application/fhir+json")
            .body("{}")
            .send()
            .unwrap();
        assert_eq!(r.status(), 405, "{method}");
        assert_eq!(r.headers()["allow"], "GET, HEAD, POST");
        let body: serde_json::Value = r.json().unwrap();
        assert_eq!(body["issue"][0]["code"], "not-supported");
    }
    assert_eq!(a.count(), 0);
    let r = client()
        .put(proxy.url("/Patient/1"))
        .header("authorization", bearer(TENANT_C))
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","id":"1"}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.last().method, "PUT");
    assert_eq!(c.last().body, br#"{"resourceType":"Patient","id":"1"}"#);
}

#[test]
fn route_upstream_headers_are_injected_with_environment_references_expanded() {
    let a = StubUpstream::start("tenant-a");
    let routes = routes_yaml(&[(
        TENANT_A,
        "tenant-a",
        &a.url(""),
        "upstream_headers:\n  Authorization: \"Bearer ${HOME}\"\n  X-Api-Key: fixed",
    )]);
    let proxy = Proxy::start(ProxyConfig::new(a.url(""), routes));
    let r = client()
        .get(proxy.url("/Patient/1"))
        .header("authorization", bearer(TENANT_A))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = a.last();
    let home = std::env::var("HOME").unwrap();
    assert_eq!(
        got.header("authorization"),
        Some(format!("Bearer {home}").as_str())
    );
    assert_eq!(got.header_count("authorization"), 1);
    assert_eq!(got.header("x-api-key"), Some("fixed"));
}

#[test]
fn path_tricks_are_400_and_paths_outside_the_base_404() {
    let env = Env::start_with(|c| c.base_path = "/fhir".into());
    let auth = bearer(TENANT_A);
    for path in [
        "/fhir/Patient/../Observation",
        "/fhir/Patient/%2e%2e/x",
        "/fhir/Patient%2F1",
        "/fhir/Patient/1;jsessionid=x",
        "/fhir/Patient/..;/x",
        "/fhir//Patient",
        "/fhir/Patient\\1",
    ] {
        let r = raw::get(env.proxy.port, path, Some(&auth));
        assert_eq!(r.status, 400, "{path}");
    }
    for path in ["/Patient/1", "/fhirx/Patient", "/other"] {
        let r = raw::get(env.proxy.port, path, Some(&auth));
        assert_eq!(r.status, 404, "{path}");
    }
    assert_eq!(env.upstream_requests(), 0);
    let r = client()
        .get(env.proxy.url("/Patient/1"))
        .header("authorization", auth)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(env.a.last().target, "/r4/Patient/1");
}

#[test]
fn keep_alive_requests_with_different_tokens_are_routed_each_by_its_own() {
    let env = Env::start();
    let c = client();
    for i in 0..10 {
        let t = if i % 2 == 0 { TENANT_A } else { TENANT_B };
        let r = c
            .get(env.proxy.url("/Patient/1"))
            .header("authorization", bearer(t))
            .send()
            .unwrap();
        let want = if i % 2 == 0 { "tenant-a" } else { "tenant-b" };
        assert_eq!(r.headers()["x-upstream"], want);
    }
    assert_eq!((env.a.count(), env.b.count()), (5, 5));
}

/// A request from the loopback peer with `X-Forwarded-For: xff`; the address the upstream was told.
fn forwarded_for(env: &Env, xff: &str) -> String {
    let r = client()
        .get(env.proxy.url("/Patient/1"))
        .header("authorization", bearer(TENANT_A))
        .header("x-forwarded-for", xff)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    env.a.last().header("x-forwarded-for").unwrap().to_string()
}

#[test]
fn behind_trusted_proxies_the_client_is_the_right_most_untrusted_forwarded_address() {
    let env = Env::start_with(|c| {
        c.top = "trusted_proxies: [\"127.0.0.1\", \"10.0.0.0/8\"]\n".into();
        c.token = Some(per_source_limit_of_three());
    });
    // The balancer (127.0.0.1, trusted) appended the client; a trusted inner hop is skipped; what
    // the client itself wrote further left is not believed.
    assert_eq!(forwarded_for(&env, "6.6.6.6, 203.0.113.7"), "203.0.113.7");
    assert_eq!(
        forwarded_for(&env, "6.6.6.6, 203.0.113.7, 10.1.2.3"),
        "203.0.113.7"
    );
    // Across several header lines, as RFC 9110 §5.3 allows.
    let r = raw::send(
        env.proxy.port,
        format!(
            "GET /Patient/1 HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nX-Forwarded-For: 6.6.6.6\r\n\
             X-Forwarded-For: 198.51.100.9, 10.0.0.1\r\nConnection: close\r\n\r\n",
            bearer(TENANT_A)
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(env.a.last().header("x-forwarded-for"), Some("198.51.100.9"));
    // Garbage ends the walk at the last trusted hop.
    assert_eq!(
        forwarded_for(&env, "203.0.113.7, not-an-ip, 10.1.2.3"),
        "10.1.2.3"
    );
    let lines = env.proxy.access_log_at_least(4);
    assert!(
        lines.iter().any(|l| l["client_ip"] == "198.51.100.9"),
        "{lines:?}"
    );

    // The token endpoint's throttle counts per resolved client: one client locked out by its
    // failures does not lock out another behind the same balancer.
    let statuses = |xffs: &[&str]| -> Vec<u16> {
        xffs.iter()
            .enumerate()
            .map(|(i, ip)| failed_token_request(&env, ip, i))
            .collect()
    };
    assert_eq!(statuses(&["203.0.113.7"; 4]), vec![401, 401, 401, 429]);
    assert_eq!(statuses(&["198.51.100.9"]), vec![401]);
}

/// A token request with a wrong secret (for a new client id each time, so only the per-source
/// limit can trip) from the loopback peer with `X-Forwarded-For: xff`.
fn failed_token_request(env: &Env, xff: &str, n: usize) -> u16 {
    client()
        .post(env.proxy.url("/token"))
        .header("x-forwarded-for", xff)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=client_credentials&client_id=nobody-{xff}-{n}&client_secret=x&scope={TENANT_A}"
        ))
        .send()
        .unwrap()
        .status()
        .as_u16()
}

fn per_source_limit_of_three() -> String {
    crate::support::proxy::default_token_section().replace(
        "failed_auth: { per_client: 5, per_source: 1000, window_seconds: 3 }",
        "failed_auth: { per_client: 1000, per_source: 3, window_seconds: 60 }",
    )
}

#[test]
fn without_trusted_proxies_a_forwarded_address_is_never_believed() {
    let env = Env::start_with(|c| c.token = Some(per_source_limit_of_three()));
    assert_eq!(forwarded_for(&env, "203.0.113.7"), "127.0.0.1");
    let lines = env.proxy.access_log_at_least(1);
    assert!(
        lines.iter().all(|l| l["client_ip"] == "127.0.0.1"),
        "{lines:?}"
    );
    // Rotating X-Forwarded-For buys no fresh throttle budget: the peer is the source.
    let statuses: Vec<u16> = ["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"]
        .iter()
        .enumerate()
        .map(|(i, ip)| failed_token_request(&env, ip, i))
        .collect();
    assert_eq!(statuses, vec![401, 401, 401, 429]);
}
