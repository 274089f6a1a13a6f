//! Errors the proxy makes itself: OperationOutcome bodies with the right status.

use std::time::Duration;

use crate::support::proxy::{free_port, routes_yaml};
use crate::support::{
    client, raw, tokens::token, Env, Proxy, ProxyConfig, StubUpstream, TENANT_A, TENANT_B,
};

fn outcome(r: reqwest::blocking::Response) -> (u16, String) {
    let status = r.status().as_u16();
    assert_eq!(r.headers()["content-type"], "application/fhir+json");
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");
    (
        status,
        body["issue"][0]["code"].as_str().unwrap().to_string(),
    )
}

#[test]
fn a_refused_upstream_is_502_transient_and_a_slow_one_504_timeout() {
    let a = StubUpstream::start("tenant-a");
    let slow = StubUpstream::start("slow");
    slow.set_delay(Duration::from_secs(3));
    let dead = format!("http://127.0.0.1:{}", free_port());
    let routes = routes_yaml(&[
        (TENANT_A, "dead", &dead, ""),
        (TENANT_B, "slow", &slow.url(""), "read_timeout_ms: 300"),
    ]);
    let proxy = Proxy::start(ProxyConfig::new(a.url(""), routes));
    let r = client()
        .get(proxy.url("/Patient/1"))
        .header("authorization", format!("Bearer {}", token(TENANT_A)))
        .send()
        .unwrap();
    // After a failed exchange the connection is not reused, and the response says so.
    assert_eq!(r.headers()["connection"], "close");
    assert_eq!(outcome(r), (502, "transient".into()));
    let r = client()
        .get(proxy.url("/Patient/1"))
        .header("authorization", format!("Bearer {}", token(TENANT_B)))
        .send()
        .unwrap();
    assert_eq!(outcome(r), (504, "timeout".into()));
    // Metadata upstream down: 502 as well.
    let proxy2 = Proxy::start(ProxyConfig::new(
        dead.clone(),
        routes_yaml(&[(TENANT_A, "a", &a.url(""), "")]),
    ));
    let r = client().get(proxy2.url("/metadata")).send().unwrap();
    assert_eq!(outcome(r), (502, "transient".into()));
}

#[test]
fn oversized_uri_headers_and_bodies_are_refused_before_the_upstream() {
    let env = Env::start_with(|c| {
        c.limits = "  max_uri_bytes: 1024\n  max_header_bytes: 4096\n  max_headers: 20\n  max_body_bytes: 2048".into();
    });
    let auth = format!("Bearer {}", token(TENANT_A));
    let long_uri = format!("/Patient?name={}", "a".repeat(1100));
    let r = client()
        .get(env.proxy.url(&long_uri))
        .header("authorization", &auth)
        .send()
        .unwrap();
    assert_eq!(outcome(r), (414, "too-long".into()));

    let r = client()
        .get(env.proxy.url("/Patient"))
        .header("authorization", &auth)
        .header("x-padding", "p".repeat(5000))
        .send()
        .unwrap();
    assert_eq!(outcome(r), (431, "too-long".into()));

    let mut req = client()
        .get(env.proxy.url("/Patient"))
        .header("authorization", &auth);
    for i in 0..25 {
        req = req.header(format!("x-h{i}"), "v");
    }
    assert_eq!(outcome(req.send().unwrap()), (431, "too-long".into()));

    let r = client()
        .post(env.proxy.url("/Patient/_search"))
        .header("authorization", &auth)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=".to_string() + &"a".repeat(3000))
        .send()
        .unwrap();
    assert_eq!(outcome(r), (413, "too-long".into()));
    assert_eq!(env.upstream_requests(), 0);

    // A chunked body has no Content-Length to check up front: it is cut off as it streams.
    let chunk = "a".repeat(1500);
    let raw_req = format!(
        "POST /Patient/_search HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{len:x}\r\n{chunk}\r\n{len:x}\r\n{chunk}\r\n0\r\n\r\n",
        len = chunk.len()
    );
    let r = raw::send(env.proxy.port, raw_req.as_bytes());
    assert!(r.status == 413 || r.status == 0, "got {}", r.status);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        env.a.requests().iter().all(|r| !r.complete),
        "an oversized body reached the upstream complete"
    );
}
