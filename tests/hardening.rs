//! Hostile input and upstream faults: never a crossed tenant, a forged token accepted, a smuggled
//! request, a truncated body that looks complete, or an insecure fallback.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::json;

use crate::support::proxy::{fixture, routes_yaml};
use crate::support::tokens::{claims, sign_with, token};
use crate::support::upstream::Mode;
use crate::support::{client, Env, Proxy, ProxyConfig, StubUpstream, TENANT_A, TENANT_B};

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// HS256 over `header.payload` with an arbitrary byte string as the key.
fn hs256_with_key(header: &serde_json::Value, payload: &serde_json::Value, key: &[u8]) -> String {
    let enc = jsonwebtoken::EncodingKey::from_secret(key).unwrap();
    let signing_input = format!("{}.{}", b64(header), b64(payload));
    let sig = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &enc, Algorithm::HS256).unwrap();
    format!("{signing_input}.{sig}")
}

fn status(env: &Env, token: &str) -> u16 {
    env.fhir_status("/Patient/1", token)
}

// ---------------------------------------------------------------------------------------------
// Tokens (RFC 8725).

#[test]
fn forged_and_malformed_tokens_are_refused() {
    let env = Env::start();
    let keys = fixture("keys");
    let rs_pub = std::fs::read(keys.join("rs256.pub.pem")).unwrap();
    let es_pub = std::fs::read(keys.join("es256.pub.pem")).unwrap();
    let jwk_text = std::fs::read_to_string(keys.join("jwks.json")).unwrap();
    let es_jwk =
        serde_json::from_str::<serde_json::Value>(&jwk_text).unwrap()["keys"][0].to_string();
    let c = claims(TENANT_A);
    let mut cases: Vec<(&str, String)> = vec![];
    for (kid, key) in [
        ("rs1", rs_pub.as_slice()),
        ("es1", es_pub.as_slice()),
        ("jwks-es", es_jwk.as_bytes()),
    ] {
        // Alg confusion: the public key (PEM or JWK text) used as an HMAC secret, with and without kid.
        cases.push((
            "hs256 with a public key",
            hs256_with_key(&json!({"alg": "HS256", "typ": "JWT", "kid": kid}), &c, key),
        ));
        cases.push((
            "hs256 with a public key, no kid",
            hs256_with_key(&json!({"alg": "HS256", "typ": "JWT"}), &c, key),
        ));
    }
    let oversized_kid = "k".repeat(4000);
    cases.push((
        "oversized kid",
        sign_with(
            Some(&oversized_kid),
            "rs1",
            Algorithm::RS256,
            Some("JWT"),
            &c,
        ),
    ));
    cases.push((
        "kid traversal",
        sign_with(
            Some("../../../../dev/null"),
            "rs1",
            Algorithm::RS256,
            Some("JWT"),
            &c,
        ),
    ));
    let mut wrong = c.clone();
    wrong["nbf"] = json!("0");
    cases.push((
        "nbf as a string",
        sign_with(Some("rs1"), "rs1", Algorithm::RS256, Some("JWT"), &wrong),
    ));
    let mut wrong = c.clone();
    wrong["exp"] = json!(null);
    cases.push((
        "exp null",
        sign_with(Some("rs1"), "rs1", Algorithm::RS256, Some("JWT"), &wrong),
    ));
    let mut wrong = c.clone();
    wrong["exp"] = json!([4_000_000_000u64]);
    cases.push((
        "exp as an array",
        sign_with(Some("rs1"), "rs1", Algorithm::RS256, Some("JWT"), &wrong),
    ));
    let good = token(TENANT_A);
    cases.push(("4 segments", format!("{good}.x")));
    cases.push(("payload swapped", {
        let parts: Vec<&str> = good.split('.').collect();
        format!("{}.{}.{}", parts[0], b64(&claims(TENANT_B)), parts[2])
    }));
    cases.push(("empty signature", {
        let parts: Vec<&str> = good.split('.').collect();
        format!("{}.{}.", parts[0], parts[1])
    }));
    for (why, t) in &cases {
        assert_eq!(status(&env, t), 401, "{why}");
    }
    assert_eq!(
        env.a.count() + env.b.count(),
        0,
        "a forged token reached an upstream"
    );
}

/// `jku`, `x5u` and `jwk` headers are never followed or trusted: a token signed by an attacker's key
/// that names the key's location (or embeds it) is refused, and nothing is fetched.
#[test]
fn key_location_headers_are_never_followed() {
    let env = Env::start();
    let lure = TcpListener::bind("127.0.0.1:0").unwrap();
    lure.set_nonblocking(true).unwrap();
    let url = format!("http://{}/jwks.json", lure.local_addr().unwrap());
    let embedded = json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"});
    let mut tokens = vec![];
    for (name, value) in [("jku", json!(url)), ("x5u", json!(url)), ("jwk", embedded)] {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": "attacker", name: value});
        // Sign with the attacker key: re-encode with the header we want.
        let enc = jsonwebtoken::EncodingKey::from_rsa_pem(
            &std::fs::read(fixture("keys/other-rs256.pem")).unwrap(),
        )
        .unwrap();
        let input = format!("{}.{}", b64(&header), b64(&claims(TENANT_A)));
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &enc, Algorithm::RS256).unwrap();
        tokens.push((name, format!("{input}.{sig}")));
    }
    // The same headers on a token signed by a trusted key are simply ignored.
    let trusted_header = json!({"alg": "RS256", "typ": "JWT", "kid": "rs1", "jku": url});
    let enc =
        jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(fixture("keys/rs256.pem")).unwrap())
            .unwrap();
    let input = format!("{}.{}", b64(&trusted_header), b64(&claims(TENANT_A)));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &enc, Algorithm::RS256).unwrap();
    for (name, t) in &tokens {
        assert_eq!(status(&env, t), 401, "{name}");
    }
    assert_eq!(status(&env, &format!("{input}.{sig}")), 200);
    std::thread::sleep(Duration::from_millis(200));
    assert!(lure.accept().is_err(), "fhir-edge fetched a key location");
}

// ---------------------------------------------------------------------------------------------
// Framing and smuggling (raw sockets: client libraries would not send these bytes).

/// Sends raw bytes on one connection and reads until the proxy closes it or 5 s pass.
fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Every request any upstream received must be one the test sent on purpose: no target containing
/// `SMUGGLED` may ever arrive.
fn assert_nothing_smuggled(env: &Env) {
    for stub in [&env.meta, &env.a, &env.b] {
        for r in stub.requests() {
            assert!(
                !r.target.contains("SMUGGLED"),
                "a smuggled request reached an upstream: {r:?}"
            );
            assert!(
                !String::from_utf8_lossy(&r.body).contains("SMUGGLED /"),
                "smuggled bytes in a body: {r:?}"
            );
        }
    }
}

#[test]
fn ambiguous_framing_is_refused_and_nothing_is_smuggled() {
    let env = Env::start();
    let auth = format!("Authorization: Bearer {}\r\n", token(TENANT_A));
    let smuggled = format!("GET /SMUGGLED HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
    let cases = [
        // CL.TE and TE.CL
        format!("POST /Patient/_search HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        format!("POST /Patient/_search HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\nContent-Length: 60\r\n\r\n0\r\n\r\n{smuggled}"),
        // Duplicate, conflicting Content-Length
        format!("POST /Patient/_search HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nContent-Length: 60\r\n\r\n{smuggled}"),
        // Transfer-Encoding variants
        format!("POST /Patient/_search HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"),
        format!("POST /Patient/_search HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"),
        format!("POST /Patient/_search HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n{smuggled}"),
        format!("POST /Patient/_search HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        // HTTP/1.0 with chunked
        format!("POST /Patient/_search HTTP/1.0\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        // obs-fold
        format!("GET /Patient/1 HTTP/1.1\r\nHost: x\r\n{auth}X-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n{smuggled}"),
        // A bad chunk size
        format!("POST /Patient/_search HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\nzz\r\n{smuggled}\r\n0\r\n\r\n"),
    ];
    for (i, case) in cases.iter().enumerate() {
        let got = exchange(env.proxy.port, case.as_bytes());
        // Whatever the first answer, no second response may follow for the smuggled request.
        assert!(
            got.matches("HTTP/1.").count() <= 1,
            "case {i}: more than one response:\n{got}"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_nothing_smuggled(&env);
}

/// Pipelining is off (Pingora's default, kept on purpose): the bytes of a second request sent before
/// the first response make the proxy answer the first and close the connection, so the second is never
/// routed at all, let alone by the first one's token. Clients retry on a new connection (RFC 9112
/// §9.3.2). Sequential keep-alive requests with different tokens are each routed by their own token
/// (tests/forwarding.rs).
#[test]
fn pipelined_requests_are_never_routed_by_another_requests_token() {
    let env = Env::start();
    let (ta, tb) = (token(TENANT_A), token(TENANT_B));
    let req = format!(
        "GET /Patient/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ta}\r\n\r\n\
         GET /Patient/2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tb}\r\n\r\n\
         GET /Patient/3 HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    let got = exchange(env.proxy.port, req.as_bytes());
    assert_eq!(got.matches("HTTP/1.1 ").count(), 1, "{got}");
    assert!(got.contains("\"upstream\":\"tenant-a\""));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        env.a
            .requests()
            .iter()
            .map(|r| r.target.clone())
            .collect::<Vec<_>>(),
        ["/r4/Patient/1"]
    );
    assert_eq!(env.b.count(), 0, "a pipelined request was routed");
}

#[test]
fn an_upgrade_request_never_reaches_the_upstream_and_what_follows_is_a_separate_request() {
    let env = Env::start();
    let (ta, tb) = (token(TENANT_A), token(TENANT_B));
    let req = format!(
        "GET /Patient/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ta}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\
         GET /SMUGGLED HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tb}\r\nConnection: close\r\n\r\n"
    );
    let got = exchange(env.proxy.port, req.as_bytes());
    assert!(!got.contains(" 101 "), "an upgrade was granted:\n{got}");
    for r in env.a.requests() {
        assert_eq!(
            r.header("upgrade"),
            None,
            "the Upgrade header was forwarded"
        );
        assert!(!r.target.contains("SMUGGLED"));
    }
    // If the pipelined request was served at all, it went to its own token's tenant.
    for r in env.b.requests() {
        assert_eq!(r.target, "/SMUGGLED");
    }
}

/// An upstream that sends more bytes than its Content-Length (a second, forged response) must not
/// get its connection reused: the forged bytes would answer the next request.
#[test]
fn a_desynchronised_upstream_connection_is_never_reused() {
    let env = Env::start();
    let forged = "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 22\r\n\r\n{\"forged\":\"SMUGGLED\"}\n";
    env.a.set_mode(Mode::RawKeepOpen(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok{forged}"
        )
        .into_bytes(),
    ));
    let t = token(TENANT_A);
    let _ = client()
        .get(env.proxy.url("/Patient/1"))
        .header("authorization", format!("Bearer {t}"))
        .send();
    let connections = env.a.connections();
    env.a.set_mode(Mode::Bundle);
    for _ in 0..3 {
        let r = client()
            .get(env.proxy.url("/Patient/2"))
            .header("authorization", format!("Bearer {t}"))
            .send()
            .unwrap();
        let body = r.text().unwrap();
        assert!(
            !body.contains("SMUGGLED"),
            "a forged response was served: {body}"
        );
    }
    assert!(
        env.a.connections() > connections,
        "the desynchronised connection was reused"
    );
}

// ---------------------------------------------------------------------------------------------
// Limits and slow clients.

#[test]
fn a_client_trickling_its_header_is_cut_off_by_the_total_deadline() {
    let env = Env::start_with(|c| c.limits = "  header_timeout_seconds: 2".into());
    let mut s = TcpStream::connect(("127.0.0.1", env.proxy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let header = format!(
        "GET /Patient/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nX-Pad: {}\r\n\r\n",
        token(TENANT_A),
        "p".repeat(40)
    );
    let mut cut = false;
    for b in header.bytes() {
        if s.write_all(&[b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(30));
        if started.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        cut || !String::from_utf8_lossy(&rest).contains("200 OK"),
        "the trickled request was served"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the connection outlived the header deadline"
    );
    assert_eq!(env.a.count(), 0);
    // An ordinary request on a fresh connection is fine.
    assert_eq!(env.fhir_status("/Patient/1", &token(TENANT_A)), 200);
}

#[test]
fn a_client_that_never_reads_a_large_response_is_cut_off() {
    let env = Env::start_with(|c| c.limits = "  write_timeout_seconds: 1".into());
    env.a.set_response(
        &[("Content-Type", "application/octet-stream")],
        vec![b'x'; 32 * 1024 * 1024],
    );
    let mut s = TcpStream::connect(("127.0.0.1", env.proxy.port)).unwrap();
    s.write_all(
        format!(
            "GET /Binary/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            token(TENANT_A)
        )
        .as_bytes(),
    )
    .unwrap();
    // Do not read for a while: the proxy's writes stall, then time out.
    std::thread::sleep(Duration::from_secs(4));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(
        got < 32 * 1024 * 1024,
        "the whole response was delivered to a client that stalled"
    );
}

// ---------------------------------------------------------------------------------------------
// Upstream faults.

fn one_tenant(stub: &StubUpstream, extra: &str) -> Proxy {
    let meta = StubUpstream::start("meta");
    let routes = routes_yaml(&[(TENANT_A, "a", &stub.url(""), extra)]);
    let p = Proxy::start(ProxyConfig::new(meta.url(""), routes));
    std::mem::forget(meta);
    p
}

fn get_a(proxy: &Proxy) -> reqwest::Result<reqwest::blocking::Response> {
    client()
        .get(proxy.url("/Patient/1"))
        .header("authorization", format!("Bearer {}", token(TENANT_A)))
        .send()
}

#[test]
fn resets_hangs_and_broken_headers_are_502_or_504_operation_outcomes() {
    let stub = StubUpstream::start("a");
    let proxy = one_tenant(&stub, "read_timeout_ms: 500");
    let oo = |r: reqwest::blocking::Response| {
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().unwrap()["resourceType"].clone(),
        )
    };
    stub.set_mode(Mode::Raw {
        bytes: vec![],
        reset: true,
    });
    assert_eq!(
        oo(get_a(&proxy).unwrap()),
        (502, json!("OperationOutcome")),
        "reset before headers"
    );
    stub.set_mode(Mode::Hang);
    assert_eq!(
        oo(get_a(&proxy).unwrap()),
        (504, json!("OperationOutcome")),
        "black hole"
    );
    stub.set_mode(Mode::Raw {
        bytes: b"HTTP/1.1 200 OK\r\nBroken Header\r\n\r\n".to_vec(),
        reset: false,
    });
    assert_eq!(
        get_a(&proxy).unwrap().status(),
        502,
        "malformed response header"
    );
    let huge = format!(
        "HTTP/1.1 200 OK\r\nX-Huge: {}\r\nContent-Length: 0\r\n\r\n",
        "h".repeat(2 * 1024 * 1024)
    );
    stub.set_mode(Mode::Raw {
        bytes: huge.into_bytes(),
        reset: false,
    });
    assert_eq!(
        get_a(&proxy).unwrap().status(),
        502,
        "oversized response header"
    );
    stub.set_mode(Mode::Raw {
        bytes: b"garbage\r\n\r\n".to_vec(),
        reset: false,
    });
    assert_eq!(get_a(&proxy).unwrap().status(), 502, "not HTTP");
}

/// An upstream that dies after the header, mid-body, must make the proxy abort the client connection:
/// a truncated Bundle must never look complete (neither a short Content-Length body ending cleanly nor
/// a chunked body with its final chunk).
#[test]
fn a_body_cut_off_mid_way_aborts_the_client_connection() {
    let stub = StubUpstream::start("a");
    let proxy = one_tenant(&stub, "");
    for (ct, label) in [
        ("application/octet-stream", "passthrough"),
        ("application/fhir+json", "rewritten"),
    ] {
        let partial = "{\"resourceType\":\"Bundle\",\"entry\":[";
        stub.set_mode(Mode::Raw {
            bytes: format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {ct}\r\nContent-Length: 5000\r\n\r\n{partial}"
            )
            .into_bytes(),
            reset: true,
        });
        let raw_resp = exchange(
            proxy.port,
            format!(
                "GET /Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
                token(TENANT_A)
            )
            .as_bytes(),
        );
        assert!(raw_resp.starts_with("HTTP/1.1 200"), "{label}: {raw_resp}");
        let body = &raw_resp[raw_resp.find("\r\n\r\n").unwrap() + 4..];
        if raw_resp
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            assert!(
                !body.ends_with("0\r\n\r\n"),
                "{label}: the truncated chunked body was terminated cleanly"
            );
        } else {
            assert!(body.len() < 5000, "{label}");
        }
        // And a real HTTP client reports an error instead of a complete response.
        let r = get_a(&proxy).and_then(|r| r.bytes());
        assert!(r.is_err(), "{label}: a truncated body looked complete");
    }
}

/// Sends `n` sequential requests for tenant B, each of which must succeed; returns how long they took.
fn tenant_b_requests(proxy: &Proxy, path: &str, n: usize) -> Duration {
    let started = Instant::now();
    for _ in 0..n {
        let r = client()
            .get(proxy.url(path))
            .header("authorization", format!("Bearer {}", token(TENANT_B)))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    started.elapsed()
}

#[test]
fn a_trickling_body_is_delivered_whole_and_does_not_slow_another_tenant() {
    let slow = StubUpstream::start("slow");
    let fast = StubUpstream::start("fast");
    let body = br#"{"resourceType":"Bundle","type":"searchset","entry":[]}"#.repeat(40);
    slow.set_mode(Mode::Trickle {
        content_type: "application/fhir+json".into(),
        body: body.clone(),
        chunk: 64,
        every: Duration::from_millis(100),
    });
    let meta = StubUpstream::start("meta");
    let routes = routes_yaml(&[
        (TENANT_A, "slow", &slow.url(""), ""),
        (TENANT_B, "fast", &fast.url(""), ""),
    ]);
    let proxy = Proxy::start(ProxyConfig::new(meta.url(""), routes));
    let url = proxy.url("/Patient");
    let ta = token(TENANT_A);
    let slow_req = std::thread::spawn(move || {
        client()
            .get(&url)
            .header("authorization", format!("Bearer {ta}"))
            .send()
            .unwrap()
            .bytes()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(200));
    // All of B's requests are answered while A's body is still trickling in (about 3.5 s): B never
    // waits on A. An ordering, not a speed.
    let took = tenant_b_requests(&proxy, "/Patient", 10);
    assert!(
        !slow_req.is_finished(),
        "tenant B's requests ({took:?}) finished only after tenant A's trickle"
    );
    assert_eq!(
        slow_req.join().unwrap().as_ref(),
        body.as_slice(),
        "the trickled body arrived changed or cut"
    );
}

#[test]
fn one_tenants_black_holed_upstream_does_not_touch_another_tenant() {
    let hole = StubUpstream::start("hole");
    hole.set_mode(Mode::Hang);
    let ok = StubUpstream::start("ok");
    let meta = StubUpstream::start("meta");
    let routes = routes_yaml(&[
        (TENANT_A, "hole", &hole.url(""), "read_timeout_ms: 3000"),
        (TENANT_B, "ok", &ok.url(""), ""),
    ]);
    let proxy = Proxy::start(ProxyConfig::new(meta.url(""), routes));
    let stuck: Vec<_> = (0..16)
        .map(|_| {
            let (url, t) = (proxy.url("/Patient/1"), token(TENANT_A));
            std::thread::spawn(move || {
                client()
                    .get(url)
                    .header("authorization", format!("Bearer {t}"))
                    .send()
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Tenant B is served while every one of A's requests still waits on its black hole (they end
    // only at A's 3 s read timeout): B never queues behind A. An ordering, not a speed.
    let took = tenant_b_requests(&proxy, "/Patient/1", 20);
    assert!(
        stuck.iter().all(|s| !s.is_finished()),
        "tenant B's requests ({took:?}) finished only after tenant A's timed out"
    );
    for s in stuck {
        assert_eq!(s.join().unwrap().unwrap(), 504);
    }
}

/// A request is retried only when no byte reached the upstream and the method is idempotent; a POST
/// never is.
#[test]
fn a_post_is_never_retried() {
    let stub = StubUpstream::start("a");
    let proxy = one_tenant(&stub, "");
    stub.set_mode(Mode::Raw {
        bytes: vec![],
        reset: true,
    });
    let r = client()
        .post(proxy.url("/Patient/_search"))
        .header("authorization", format!("Bearer {}", token(TENANT_A)))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=x")
        .send()
        .unwrap();
    assert_eq!(r.status(), 502);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        stub.count(),
        1,
        "the POST reached the upstream more than once"
    );
    // A GET that reached the upstream on a fresh connection is not retried either.
    let _ = get_a(&proxy);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(stub.count(), 2);
}

#[test]
fn https_upstreams_are_verified_with_no_insecure_fallback() {
    let tls = StubUpstream::start_tls("tls");
    let ca = fixture("tls/ca.pem");
    let meta = StubUpstream::start("meta");
    let url = tls.url("");
    let cases = [
        (format!("ca_file: {}", ca.display()), 200, "trusted CA"),
        (String::new(), 502, "self-signed chain (CA not trusted)"),
        (
            format!("ca_file: {}\nsni: wrong-host.example", ca.display()),
            502,
            "certificate for another host",
        ),
        (
            "tls_verify: false".to_string(),
            200,
            "verification explicitly off",
        ),
    ];
    let tenants = [
        "00000000-0000-4000-8000-000000000001",
        "00000000-0000-4000-8000-000000000002",
        "00000000-0000-4000-8000-000000000003",
        "00000000-0000-4000-8000-000000000004",
    ];
    let entries: Vec<(&str, String, String, String)> = tenants
        .iter()
        .zip(&cases)
        .enumerate()
        .map(|(i, (t, (extra, _, _)))| (*t, format!("t{i}"), url.clone(), extra.clone()))
        .collect();
    let routes = routes_yaml(
        &entries
            .iter()
            .map(|(t, n, u, e)| (*t, n.as_str(), u.as_str(), e.as_str()))
            .collect::<Vec<_>>(),
    );
    let proxy = Proxy::start(ProxyConfig::new(meta.url(""), routes));
    for (t, (_, want, why)) in tenants.iter().zip(&cases) {
        let r = client()
            .get(proxy.url("/Patient/1"))
            .header("authorization", format!("Bearer {}", token(t)))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), *want, "{why}");
    }
}
