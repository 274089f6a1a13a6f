//! PROXY protocol listeners: the client's address comes from a trusted balancer's header (version 1
//! or 2, before the TLS handshake on a TLS listener) and is what the audit log, `X-Forwarded-For`
//! and the per-source connection bound see; a connection without a valid header, or from a peer
//! that is not trusted, is closed unanswered.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use crate::support::{raw, tokens, Env, TENANT_A};

/// Tenant A's patient search, with a spoofed `X-Forwarded-For` that must be ignored.
fn request() -> String {
    format!(
        "GET /Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n",
        tokens::token(TENANT_A)
    )
}

fn v1(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 51000 {port}\r\n").into_bytes()
}

/// A version 2 header: `PROXY` (or `LOCAL`) over TCP/IPv4 from `client`.
fn v2(local: bool, client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[if local { 0x20 } else { 0x21 }, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1, 0xc3, 0x50]);
    h.extend_from_slice(&port.to_be_bytes());
    h
}

/// The proxy with the plain listener (and, with `tls`, the TLS one) expecting the header, believed
/// from `trusted`.
fn start(trusted: &str, tls: bool, limits: &str) -> Env {
    Env::start_with(|c| {
        c.tls = tls;
        let listener = if tls { "@TLS_PORT@" } else { "@PORT@" };
        c.top = format!(
            "trusted_proxies: [\"{trusted}\"]\nproxy_protocol_listeners: [\"127.0.0.1:{listener}\"]\n"
        );
        c.limits = limits.into();
    })
}

fn send(port: u16, header: &[u8], request: &str) -> raw::RawResponse {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // A connection the proxy closes at once may refuse the writes.
    let _ = s
        .write_all(header)
        .and_then(|()| s.write_all(request.as_bytes()));
    raw::read_response(&mut s, Vec::new())
}

#[test]
fn a_trusted_balancers_header_names_the_client_and_nothing_else_does() {
    let env = start("127.0.0.1", false, "");
    let port = env.proxy.port;
    let r = send(port, &v1("203.0.113.7", port), &request());
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(env.a.last().header("x-forwarded-for"), Some("203.0.113.7"));
    let r = send(port, &v2(false, [198, 51, 100, 9], port), &request());
    assert_eq!(r.status, 200);
    assert_eq!(env.a.last().header("x-forwarded-for"), Some("198.51.100.9"));
    // LOCAL (a balancer's own health check) keeps the TCP peer, a trusted proxy.
    let plain = request().replace("X-Forwarded-For: 6.6.6.6\r\n", "");
    let r = send(port, &v2(true, [198, 51, 100, 9], port), &plain);
    assert_eq!(r.status, 200);
    assert_eq!(env.a.last().header("x-forwarded-for"), Some("127.0.0.1"));
    let log = env.proxy.access_log_at_least(3);
    let ips: Vec<&str> = log.iter().filter_map(|l| l["client_ip"].as_str()).collect();
    assert_eq!(ips, ["203.0.113.7", "198.51.100.9", "127.0.0.1"]);

    // Without a header, or with a broken one, the connection closes unanswered.
    assert_eq!(send(port, b"", &request()).status, 0);
    assert_eq!(
        send(
            port,
            b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n",
            &request()
        )
        .status,
        0
    );
    assert_eq!(env.a.count(), 3, "nothing else reached the upstream");
}

#[test]
fn a_header_from_a_peer_that_is_not_trusted_is_never_read() {
    let env = start("10.0.0.0/8", false, "");
    let port = env.proxy.port;
    assert_eq!(send(port, &v1("203.0.113.7", port), &request()).status, 0);
    assert_eq!(env.a.count(), 0);
}

#[test]
fn the_per_source_connection_bound_counts_the_address_the_header_gives() {
    let env = start("127.0.0.1", false, "  max_connections_per_source: 1\n");
    let port = env.proxy.port;
    let open = |client: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&v1(client, port)).unwrap();
        // The request starts but its header block does not end: the connection stays busy.
        s.write_all(b"GET /Patient HTTP/1.1\r\n").unwrap();
        s
    };
    let finish = |s: &mut TcpStream| {
        s.write_all(
            format!(
                "Host: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                tokens::token(TENANT_A)
            )
            .as_bytes(),
        )
        .unwrap();
        raw::read_response(s, Vec::new()).status
    };
    // Two clients behind one balancer address: one connection each.
    let mut a = open("203.0.113.7");
    let mut b = open("198.51.100.9");
    env.proxy.wait_connections_open(2);
    // The same client again is over its bound: answered 503.
    let mut again = open("203.0.113.7");
    assert_eq!(finish(&mut again), 503);
    assert_eq!(finish(&mut a), 200);
    assert_eq!(finish(&mut b), 200);
}

#[test]
fn on_a_tls_listener_the_header_comes_before_the_handshake() {
    let env = start("127.0.0.1", true, "");
    let port = env.proxy.tls_port.unwrap();
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(&v1("203.0.113.7", port)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(crate::support::proxy::fixture("tls/ca.pem")).unwrap();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request().as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(env.a.last().header("x-forwarded-for"), Some("203.0.113.7"));
}

#[test]
fn a_proxy_protocol_listener_must_be_a_listener_and_needs_someone_to_trust() {
    let refused = |top: &str| {
        let meta = crate::support::StubUpstream::start("meta");
        let mut cfg = crate::support::proxy::ProxyConfig::new(meta.url(""), "tenants: {}\n".into());
        cfg.top = top.into();
        crate::support::Proxy::try_start(cfg)
            .err()
            .expect("the configuration is refused")
    };
    let err =
        refused("trusted_proxies: [\"10.0.0.1\"]\nproxy_protocol_listeners: [\"127.0.0.1:1\"]\n");
    assert!(
        err.contains("proxy_protocol_listeners[0]") && err.contains("listen"),
        "{err}"
    );
    let err = refused("proxy_protocol_listeners: [\"127.0.0.1:@PORT@\"]\n");
    assert!(err.contains("needs trusted_proxies"), "{err}");
}
