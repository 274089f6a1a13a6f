//! Upstream URLs never escape: links, fullUrls and Location headers are rewritten to the public base
//! (SPEC §4), in plain and JSON-escaped form, also in compressed and large bodies.

use std::io::{Read, Write};
use std::time::Duration;

use crate::support::proxy::routes_yaml;
use crate::support::raw::read_response;
use crate::support::upstream::Mode;
use crate::support::{
    client, tokens::token, Env, Proxy, ProxyConfig, StubUpstream, TENANT_A, TENANT_B,
};

fn get(env: &Env, path: &str, tenant: &str) -> reqwest::blocking::Response {
    client()
        .get(env.proxy.url(path))
        .header("authorization", format!("Bearer {}", token(tenant)))
        .send()
        .unwrap()
}

fn search_bundle(base: &str) -> String {
    format!(
        r#"{{"resourceType":"Bundle","type":"searchset","total":3,"link":[{{"relation":"self","url":"{base}/Patient?name=smith&_count=2&_offset=0"}},{{"relation":"next","url":"{base}/Patient?name=smith&_count=2&_offset=2&_cursor=eyJhIjoiYiJ9%3D"}}],"entry":[{{"fullUrl":"{base}/Patient/1","resource":{{"resourceType":"Patient","id":"1"}}}},{{"fullUrl":"{escaped}\/Patient\/2","resource":{{"resourceType":"Patient","id":"2","text":{{"div":"see {base}/Patient/2"}}}}}}]}}"#,
        escaped = base.replace('/', "\\/"),
    )
}

#[test]
fn links_full_urls_and_location_headers_point_at_the_public_base() {
    let env = Env::start();
    let upstream_base = env.a.url("/r4");
    env.a.set_response(
        &[
            ("Content-Type", "application/fhir+json;charset=utf-8"),
            ("Location", &format!("{upstream_base}/Patient/1/_history/3")),
            (
                "Content-Location",
                &format!("{upstream_base}/Patient?name=smith"),
            ),
        ],
        search_bundle(&upstream_base),
    );
    let r = get(&env, "/Patient?name=smith&_count=2", TENANT_A);
    assert_eq!(r.status(), 200);
    let public = env.proxy.url("");
    assert_eq!(
        r.headers()["location"],
        format!("{public}/Patient/1/_history/3").as_str()
    );
    assert_eq!(
        r.headers()["content-location"],
        format!("{public}/Patient?name=smith").as_str()
    );
    assert!(
        r.headers().get("content-length").is_none(),
        "the length changed, so it is not declared"
    );
    assert_eq!(env.a.last().header("accept-encoding"), Some("identity"));
    let text = r.text().unwrap();
    assert_eq!(
        text,
        search_bundle(&public),
        "only the bases changed, byte for byte"
    );
    assert!(
        !text.contains(&env.a.addr.to_string()),
        "the upstream address leaked: {text}"
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["link"][1]["url"],
        format!("{public}/Patient?name=smith&_count=2&_offset=2&_cursor=eyJhIjoiYiJ9%3D")
    );
}

#[test]
fn non_json_bodies_pass_untouched() {
    let env = Env::start();
    let base = env.a.url("/r4");
    let xml = format!(
        r#"<Bundle xmlns="http://hl7.org/fhir"><link><url value="{base}/Patient"/></link></Bundle>"#
    );
    env.a
        .set_response(&[("Content-Type", "application/fhir+xml")], xml.clone());
    let r = get(&env, "/Patient", TENANT_A);
    assert_eq!(
        r.headers()["content-length"],
        xml.len().to_string().as_str()
    );
    assert_eq!(r.text().unwrap(), xml);
}

#[test]
fn a_compressed_json_body_is_decoded_and_rewritten_and_an_unknown_encoding_refused() {
    let env = Env::start();
    let base = env.a.url("/r4");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(search_bundle(&base).as_bytes()).unwrap();
    env.a.set_response(
        &[
            ("Content-Type", "application/fhir+json"),
            ("Content-Encoding", "gzip"),
        ],
        gz.finish().unwrap(),
    );
    // reqwest here has no gzip support, so it sees exactly what the proxy sent.
    let r = get(&env, "/Patient", TENANT_A);
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(r.text().unwrap(), search_bundle(&env.proxy.url("")));

    env.a.set_response(
        &[
            ("Content-Type", "application/fhir+json"),
            ("Content-Encoding", "br"),
        ],
        b"\x0b\x02\x80{}\x03".to_vec(),
    );
    let r = get(&env, "/Patient", TENANT_A);
    assert_eq!(
        r.status(),
        502,
        "a body that cannot be rewritten must not pass"
    );
}

#[test]
fn a_large_body_is_rewritten_as_it_streams() {
    let env = Env::start();
    let base = env.a.url("/r4");
    let entries: Vec<String> = (0..40_000)
        .map(|i| format!(r#"{{"fullUrl":"{base}/Observation/{i}","resource":{{"resourceType":"Observation","id":"{i}"}}}}"#))
        .collect();
    let body = format!(
        r#"{{"resourceType":"Bundle","type":"searchset","entry":[{}]}}"#,
        entries.join(",")
    );
    assert!(body.len() > 3_000_000);
    env.a
        .set_response(&[("Content-Type", "application/json")], body.clone());
    let r = get(&env, "/Observation", TENANT_A);
    assert_eq!(r.status(), 200);
    let public = env.proxy.url("");
    let text = r.text().unwrap();
    assert_eq!(text, body.replace(&base, &public));
    assert_eq!(
        text.matches(&format!("{public}/Observation/")).count(),
        40_000
    );
}

/// A rewritten response goes out chunked and leaves in one segment when it arrived whole (the flush
/// hold in src/proxy/); what arrives in pieces must still reach the client as it arrives, and the
/// connection must stay usable for the next request.
#[test]
fn a_rewritten_body_still_streams_while_the_upstream_sends_and_the_connection_stays_usable() {
    let env = Env::start();
    let base = env.a.url("/r4");
    let entries = |from: usize, to: usize| -> String {
        (from..to)
            .map(|i| format!(r#"{{"fullUrl":"{base}/Patient/{i}"}},"#))
            .collect()
    };
    let first = format!(r#"{{"resourceType":"Bundle","entry":[{}"#, entries(0, 100));
    let rest = format!(
        r#"{}{{"fullUrl":"{base}/Patient/last"}}]}}"#,
        entries(100, 200)
    );
    let gate = std::sync::Arc::new(std::sync::Barrier::new(2));
    env.a.set_mode(Mode::Gated {
        content_type: "application/fhir+json".into(),
        first: first.clone().into_bytes(),
        rest: rest.clone().into_bytes(),
        gate: gate.clone(),
    });
    let mut s = std::net::TcpStream::connect(("127.0.0.1", env.proxy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let request = format!(
        "GET /Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        token(TENANT_A)
    );
    s.write_all(request.as_bytes()).unwrap();
    // The upstream now waits at the gate: the header and most of the first part must get here
    // without it (the rewriter keeps back at most a link's length, in case one is cut).
    let mut seen = Vec::new();
    let mut buf = [0u8; 16384];
    let wanted = first.len() / 2;
    let arrived = |seen: &[u8]| {
        seen.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .is_some_and(|h| seen.len() >= h + 4 + wanted)
    };
    while !arrived(&seen) {
        let n = s
            .read(&mut buf)
            .expect("the first part must arrive while the upstream waits");
        assert!(n > 0, "the proxy closed the connection");
        seen.extend_from_slice(&buf[..n]);
    }
    gate.wait();
    let r = read_response(&mut s, seen);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    let public = env.proxy.url("");
    assert_eq!(
        r.body_text(),
        format!("{first}{rest}").replace(&base, &public)
    );
    // The same connection, a response that arrives whole.
    env.a.set_response(
        &[("Content-Type", "application/fhir+json")],
        search_bundle(&base),
    );
    s.write_all(request.as_bytes()).unwrap();
    let r = read_response(&mut s, Vec::new());
    assert_eq!(r.status, 200);
    assert_eq!(r.body_text(), search_bundle(&public));
}

/// The token decides the tenant, never the URL: a next link from tenant A's search, followed with
/// tenant B's token, goes to B's upstream with the same query.
#[test]
fn a_next_link_followed_with_another_tenants_token_goes_to_that_tenant() {
    let env = Env::start();
    env.a.set_response(
        &[("Content-Type", "application/fhir+json")],
        search_bundle(&env.a.url("/r4")),
    );
    let bundle: serde_json::Value = get(&env, "/Patient?name=smith", TENANT_A).json().unwrap();
    let next = bundle["link"][1]["url"].as_str().unwrap().to_string();
    assert!(next.starts_with(&env.proxy.url("")));
    let r = client()
        .get(&next)
        .header("authorization", format!("Bearer {}", token(TENANT_B)))
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-upstream"], "tenant-b");
    assert_eq!(
        env.b.last().target,
        "/Patient?name=smith&_count=2&_offset=2&_cursor=eyJhIjoiYiJ9%3D"
    );
}

#[test]
fn other_bases_an_upstream_advertises_are_rewritten_when_configured() {
    let a = StubUpstream::start("tenant-a");
    let routes = routes_yaml(&[(
        TENANT_A,
        "tenant-a",
        &a.url("/fhir"),
        "link_bases: [\"https://fhir.contoso.internal/r4\"]",
    )]);
    let proxy = Proxy::start(ProxyConfig::new(a.url(""), routes));
    a.set_response(
        &[("Content-Type", "application/fhir+json")],
        search_bundle("https://fhir.contoso.internal/r4"),
    );
    let r = client()
        .get(proxy.url("/Patient"))
        .header("authorization", format!("Bearer {}", token(TENANT_A)))
        .send()
        .unwrap();
    assert_eq!(r.text().unwrap(), search_bundle(&proxy.url("")));
}
