//! Wire-level behaviour of the downstream connection: header size and framing limits, pipelined
//! bytes, header names, retries as configured, one keep-alive connection carrying several tokens,
//! and a log that stays quiet on healthy traffic.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::support::proxy::routes_yaml;
use crate::support::{
    raw, tokens::token, Env, Proxy, ProxyConfig, StubUpstream, TENANT_A, TENANT_B, TENANT_C,
};

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn a_header_section_of_a_mebibyte_or_more_is_431_not_400() {
    let env = Env::start();
    let auth = format!("Authorization: Bearer {}\r\n", token(TENANT_A));
    for size in [1024 * 1024, 3 * 1024 * 1024 / 2] {
        let mut s = connect(env.proxy.port);
        let head = format!("GET /Patient/1 HTTP/1.1\r\nHost: x\r\n{auth}X-Padding: ");
        // The proxy reads (and drops) the rest of an oversized header, so this write completes.
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&vec![b'p'; size]).unwrap();
        s.write_all(b"\r\n\r\n").unwrap();
        let r = raw::read_response(&mut s, Vec::new());
        assert_eq!(r.status, 431, "{size} bytes: {}", r.body_text());
        assert_eq!(r.json()["issue"][0]["code"], "too-long");
        assert_eq!(r.header("connection"), Some("close"));
    }
    assert_eq!(env.upstream_requests(), 0);
}

#[test]
fn two_equal_content_lengths_reach_the_upstream_as_one_and_differing_ones_are_400() {
    let env = Env::start();
    let auth = format!("Authorization: Bearer {}\r\n", token(TENANT_A));
    let req = format!(
        "POST /Patient/_search HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: 8\r\nContent-Length: 8\r\nConnection: close\r\n\r\nfamily=x"
    );
    let r = raw::send(env.proxy.port, req.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body_text());
    let got = env.a.last();
    assert_eq!(got.header_count("content-length"), 1);
    assert_eq!(got.body, b"family=x");
    let req = req.replacen(
        "Content-Length: 8\r\nContent-Length: 8",
        "Content-Length: 8\r\nContent-Length: 9",
        1,
    );
    let r = raw::send(env.proxy.port, req.as_bytes());
    assert!(r.status == 400 || r.status == 0, "got {}", r.status);
    assert_eq!(
        env.a.count(),
        1,
        "the conflicting request reached the upstream"
    );
}

#[test]
fn header_names_with_underscores_are_never_forwarded() {
    let env = Env::start();
    let auth = format!("Authorization: Bearer {}\r\n", token(TENANT_A));
    let req = format!(
        "GET /Patient/1 HTTP/1.1\r\nHost: x\r\n{auth}X_Forwarded_Host: evil.example\r\nX_Tenant: {TENANT_B}\r\n\
         Some_Header: v\r\nX-Kept: yes\r\nConnection: close\r\n\r\n"
    );
    let r = raw::send(env.proxy.port, req.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body_text());
    let got = env.a.last();
    for (name, _) in &got.headers {
        assert!(!name.contains('_'), "{name} was forwarded");
    }
    assert_eq!(got.header("x-kept"), Some("yes"));
    assert_ne!(got.header("x-forwarded-host"), Some("evil.example"));
}

#[test]
fn one_keep_alive_connection_carrying_token_a_then_none_then_b_is_judged_request_by_request() {
    let env = Env::start();
    let mut s = connect(env.proxy.port);
    let mut ask = |auth: Option<String>| {
        let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let req = format!("GET /Patient/1 HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
        s.write_all(req.as_bytes()).unwrap();
        raw::read_response(&mut s, Vec::new())
    };
    let first = ask(Some(token(TENANT_A)));
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-upstream"), Some("tenant-a"));
    let second = ask(None);
    assert_eq!(
        second.status, 401,
        "no token: not the previous request's tenant"
    );
    let third = ask(Some(token(TENANT_B)));
    assert_eq!(third.status, 200);
    assert_eq!(third.header("x-upstream"), Some("tenant-b"));
    assert_eq!((env.a.count(), env.b.count()), (1, 1));
}

/// A writable route's upstream performs the first write of a pipelined burst; the client must get
/// the upstream's answer to it (never a 400 that would make it write again), and the connection then
/// closes with the rest unserved (RFC 9112 §9.3.2: the client retries those).
#[test]
fn a_pipelined_burst_gets_the_upstreams_answer_to_its_first_request_then_a_close() {
    let c = StubUpstream::start("tenant-c");
    c.set_delay(Duration::from_millis(200));
    let routes = routes_yaml(&[(TENANT_C, "tenant-c", &c.url(""), "allow_writes: true")]);
    let proxy = Proxy::start(ProxyConfig::new(c.url(""), routes));
    let auth = format!("Authorization: Bearer {}\r\n", token(TENANT_C));
    let one = |i: usize| {
        format!(
            "PUT /Patient/{i} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{{}}"
        )
    };
    let mut s = connect(proxy.port);
    s.write_all(one(0).as_bytes()).unwrap();
    // The rest arrives while the first waits for its upstream.
    std::thread::sleep(Duration::from_millis(50));
    let rest: String = (1..10).map(one).collect();
    s.write_all(rest.as_bytes()).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    assert_eq!(got.matches("HTTP/1.1 ").count(), 1, "{got}");
    assert_eq!(c.count(), 1);
}

#[test]
fn max_retries_zero_still_sends_each_request_once() {
    let env = Env::start_with(|c| c.server = "  max_retries: 0\n".into());
    let r = raw::get(
        env.proxy.port,
        "/Patient/1",
        Some(&format!("Bearer {}", token(TENANT_A))),
    );
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(env.a.count(), 1);
}

#[test]
fn healthy_keep_alive_traffic_logs_no_errors() {
    let env = Env::start();
    let auth = format!("Authorization: Bearer {}\r\n", token(TENANT_A));
    let mut threads = Vec::new();
    for _ in 0..4 {
        let (port, auth) = (env.proxy.port, auth.clone());
        threads.push(std::thread::spawn(move || {
            let mut s = connect(port);
            for _ in 0..150 {
                let req = format!("GET /Patient/1 HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
                s.write_all(req.as_bytes()).unwrap();
                assert_eq!(raw::read_response(&mut s, Vec::new()).status, 200);
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let logs = env.proxy.logs();
    assert!(!logs.contains(" ERROR "), "{logs}");
}

/// A rewritten response's flushes are held until it ends; on a connection that closes after it, the
/// held bytes must still all arrive.
#[test]
fn a_rewritten_response_on_a_closing_connection_arrives_whole() {
    let env = Env::start();
    for _ in 0..20 {
        let r = raw::get(
            env.proxy.port,
            "/Patient?name=x",
            Some(&format!("Bearer {}", token(TENANT_A))),
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.json()["resourceType"], "Bundle", "{}", r.body_text());
    }
}
