//! TLS listeners with the real binary and real tools: certificates renewed in place and chosen by
//! SNI (seen through `openssl s_client`), a bad pair refused while the old one serves, HTTP/2 by
//! ALPN (`curl --http2`, `h2load`), an HTTP/2 rapid-reset flood (the `h2` crate) while another
//! client goes on being served, and `testssl.sh` finding nothing high or critical.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::proxy::fixture;
use crate::support::{client, eventually, Env, ProxyConfig, TENANT_A};

/// Runs a command, which must succeed; returns its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A key and a certificate for `names` (DNS names), signed by the test CA, in `dir` as
/// `<stem>.pem` and `<stem>.key`.
fn issue(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let (key, csr, cert) = (
        dir.join(format!("{stem}.key")),
        dir.join(format!("{stem}.csr")),
        dir.join(format!("{stem}.pem")),
    );
    let ext = dir.join(format!("{stem}.ext"));
    let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    // A CRL location, as a real CA's certificates carry (testssl rates its absence high).
    std::fs::write(
        &ext,
        format!(
            "subjectAltName={}\ncrlDistributionPoints=URI:http://crl.example.test/ca.crl\n",
            san.join(",")
        ),
    )
    .unwrap();
    run(Command::new("openssl")
        .args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ])
        .arg(&key));
    run(Command::new("openssl")
        .args(["req", "-new", "-key"])
        .arg(&key)
        .args(["-subj", &format!("/CN={}", names[0]), "-out"])
        .arg(&csr));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "400", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(fixture("tls/ca.pem"))
        .arg("-CAkey")
        .arg(fixture("tls/ca-key.pem"))
        .arg("-CAserial")
        .arg(dir.join("ca.srl"))
        .args(["-CAcreateserial", "-extfile"])
        .arg(&ext)
        .arg("-out")
        .arg(&cert));
    (cert, key)
}

/// The serial number of the certificate the listener presents for `sni`.
fn served_serial(port: u16, sni: &str) -> String {
    let mut s_client = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            sni,
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap()
        .stdout;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    x509.stdin.take().unwrap().write_all(&s_client).unwrap();
    s_client.clear();
    let out = x509.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn serial_of(cert: &Path) -> String {
    run(Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert))
    .trim()
    .to_string()
}

/// Moves `from` over `to` in one rename, as certbot and cert-manager do.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// A proxy with one TLS listener serving `default` and `more` (`http2` on), its metadata stub.
fn tls_env(
    dir: &Path,
    default: (PathBuf, PathBuf),
    more: &[(PathBuf, PathBuf)],
    h2c: bool,
) -> (Env, u16) {
    let port = crate::support::proxy::free_port();
    let extra: Vec<String> = more
        .iter()
        .map(|(c, k)| format!("{{cert_file: {}, key_file: {}}}", c.display(), k.display()))
        .collect();
    let top = format!(
        "tls_listeners:\n  - {{addr: \"127.0.0.1:{port}\", cert_file: {}, key_file: {}, certificates: [{}]}}\n",
        default.0.display(),
        default.1.display(),
        extra.join(", ")
    );
    let _ = dir;
    let env = Env::start_with(move |c: &mut ProxyConfig| {
        c.top = top;
        if h2c {
            c.server = "  h2c: true".into();
        }
    });
    (env, port)
}

fn metric(env: &Env, series: &str) -> f64 {
    let (_, m) = env.proxy.admin("/metrics");
    m.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_renewed_certificate_serves_new_handshakes_and_a_bad_pair_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let live = (dir.path().join("live.pem"), dir.path().join("live.key"));
    let first = issue(dir.path(), "first", &["localhost"]);
    std::fs::copy(&first.0, &live.0).unwrap();
    std::fs::copy(&first.1, &live.1).unwrap();
    let (env, port) = tls_env(dir.path(), live.clone(), &[], false);
    assert_eq!(served_serial(port, "localhost"), serial_of(&first.0));
    // A connection opened before the renewal.
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(fixture("tls/ca.pem")).unwrap()).unwrap();
    let https = reqwest::blocking::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/metadata");
    assert_eq!(https.get(&url).send().unwrap().status(), 200);

    // Renewed: the key first, then the certificate (a moment with a mismatched pair is refused and
    // the next look picks up the complete one).
    let second = issue(dir.path(), "second", &["localhost"]);
    replace(&second.1, &live.1);
    replace(&second.0, &live.0);
    assert!(
        eventually(Duration::from_secs(10), || served_serial(port, "localhost")
            == serial_of(&second.0)),
        "the renewed certificate is not served"
    );
    assert_eq!(https.get(&url).send().unwrap().status(), 200);
    let label = format!("listener=\"127.0.0.1:{port}\"");
    assert!(
        metric(
            &env,
            &format!("fhir_edge_tls_certificate_reloads_total{{{label},result=\"applied\"}}")
        ) >= 1.0
    );

    // A key that does not match the certificate: refused, logged, counted; the old pair serves on.
    let stranger = issue(dir.path(), "stranger", &["localhost"]);
    replace(&stranger.1, &live.1);
    let rejected =
        format!("fhir_edge_tls_certificate_reloads_total{{{label},result=\"rejected\"}}");
    assert!(eventually(Duration::from_secs(10), || metric(
        &env, &rejected
    ) >= 1.0));
    assert_eq!(served_serial(port, "localhost"), serial_of(&second.0));
    assert!(env
        .proxy
        .logs()
        .contains("new certificates refused, the old ones keep serving"));
    assert_eq!(https.get(&url).send().unwrap().status(), 200);
    let expiry = metric(
        &env,
        &format!("fhir_edge_tls_certificate_expiry_timestamp_seconds{{{label}}}"),
    );
    assert!(expiry > 1.7e9, "{expiry}");
}

#[test]
fn the_certificate_is_chosen_by_sni() {
    let dir = tempfile::tempdir().unwrap();
    let default = issue(dir.path(), "default", &["localhost"]);
    let a = issue(dir.path(), "a", &["fhir.hospital-a.test"]);
    let b = issue(dir.path(), "b", &["*.hospital-b.test"]);
    let (_env, port) = tls_env(dir.path(), default.clone(), &[a.clone(), b.clone()], false);
    assert_eq!(served_serial(port, "fhir.hospital-a.test"), serial_of(&a.0));
    assert_eq!(served_serial(port, "FHIR.Hospital-A.test"), serial_of(&a.0));
    assert_eq!(served_serial(port, "edge.hospital-b.test"), serial_of(&b.0));
    // One label deep only, and anything else gets the default.
    assert_eq!(
        served_serial(port, "x.edge.hospital-b.test"),
        serial_of(&default.0)
    );
    assert_eq!(served_serial(port, "unknown.test"), serial_of(&default.0));
}

#[test]
fn http2_is_offered_by_alpn_and_carries_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let pair = issue(dir.path(), "h2", &["localhost"]);
    let (env, port) = tls_env(dir.path(), pair, &[], false);
    let ca = fixture("tls/ca.pem");
    let curl = |args: &[&str], path: &str| {
        run(Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                "--cacert",
            ])
            .arg(&ca)
            .args(args)
            .arg(format!("https://localhost:{port}{path}")))
    };
    assert_eq!(curl(&["--http2"], "/metadata"), "2 200");
    assert_eq!(curl(&["--http2"], "/Patient"), "2 401");
    assert_eq!(curl(&["--http1.1"], "/metadata"), "1.1 200");
    // A token and a FHIR read over HTTP/2, through to the upstream.
    let t = crate::support::tokens::token(TENANT_A);
    let out = run(Command::new("curl")
        .args([
            "-s",
            "--http2",
            "-H",
            &format!("authorization: Bearer {t}"),
            "--cacert",
        ])
        .arg(&ca)
        .arg(format!("https://localhost:{port}/Patient/1")));
    assert!(out.contains("tenant-a"), "{out}");
    // h2c stays off unless asked for.
    let plain = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            "--http2-prior-knowledge",
        ])
        .arg(env.proxy.url("/metadata"))
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout), "2");
    // h2load: many streams on a few connections, all answered.
    let report = run(Command::new("h2load")
        .args(["-n", "2000", "-c", "4", "-m", "16"])
        .arg(format!("https://127.0.0.1:{port}/metadata")));
    assert!(
        report.contains("2000 succeeded, 0 failed, 0 errored"),
        "{report}"
    );
    assert!(report.contains("status codes: 2000 2xx"), "{report}");
}

#[test]
fn an_http2_rapid_reset_flood_does_not_hurt_another_client() {
    let dir = tempfile::tempdir().unwrap();
    let pair = issue(dir.path(), "rr", &["localhost"]);
    let (env, _port) = tls_env(dir.path(), pair, &[], true);
    let authority = env.proxy.authority();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The attacker: h2c, streams opened and reset at once, as fast as it can (CVE-2023-44487).
    let attack = rt.spawn(async move {
        let tcp = tokio::net::TcpStream::connect(&authority).await.unwrap();
        let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(conn);
        let mut sent = 0u32;
        let mut h2 = Some(h2);
        for _ in 0..20_000 {
            let Some(ready) = h2.take() else { break };
            let Ok(mut ready) = ready.ready().await else {
                break;
            };
            let req = http::Request::get(format!("http://{authority}/metadata"))
                .body(())
                .unwrap();
            match ready.send_request(req, true) {
                Ok((_, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    sent += 1;
                    h2 = Some(ready);
                }
                Err(_) => break,
            }
        }
        drop(h2);
        let _ = tokio::time::timeout(Duration::from_secs(10), driver).await;
        sent
    });
    // Meanwhile another client is served, request after request, each answered in full.
    let mut served = 0;
    while !attack.is_finished() {
        let r = client().get(env.proxy.url("/metadata")).send().unwrap();
        assert_eq!(r.status(), 200);
        served += 1;
    }
    let sent = rt.block_on(attack).unwrap();
    assert!(sent > 1000, "the flood never got going ({sent} resets)");
    assert!(
        served > 0,
        "no request of the other client overlapped the flood"
    );
    // And afterwards, as before.
    assert_eq!(
        client()
            .get(env.proxy.url("/metadata"))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert!(env.proxy.logs().lines().all(|l| !l.contains("panicked")));
}

#[test]
fn testssl_finds_nothing_high_or_critical() {
    let dir = tempfile::tempdir().unwrap();
    let pair = issue(dir.path(), "testssl", &["localhost"]);
    let (_env, port) = tls_env(dir.path(), pair, &[], false);
    let json = dir.path().join("testssl.json");
    // As a client that trusts the test CA and asks for the certificate's name.
    let out = Command::new("testssl")
        .args([
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "batch",
            "-p",
            "-S",
            "-U",
            "--add-ca",
        ])
        .arg(fixture("tls/ca.pem"))
        .args(["--ip", "127.0.0.1", "--jsonfile"])
        .arg(&json)
        .arg(format!("localhost:{port}"))
        .output()
        .expect("testssl (Debian package testssl.sh, installed by scripts/setup)");
    let findings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap_or_default()).unwrap_or_else(|e| {
            panic!(
                "no testssl JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
    let bad: Vec<String> = findings
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("HIGH" | "CRITICAL")))
        .map(|f| format!("{}: {}", f["id"], f["finding"]))
        .collect();
    assert!(bad.is_empty(), "testssl: {bad:#?}");
    // It did look: protocols were tested and TLS 1.3 is offered, SSLv3 and TLS 1.0 are not.
    let finding = |id: &str| {
        findings
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id)
            .map(|f| f["finding"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert!(
        finding("TLS1_3").starts_with("offered"),
        "{}",
        finding("TLS1_3")
    );
    assert_eq!(finding("TLS1"), "not offered");
    assert_eq!(finding("SSLv3"), "not offered");
}

#[test]
fn a_listener_whose_key_does_not_match_its_certificate_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let a = issue(dir.path(), "a", &["localhost"]);
    let b = issue(dir.path(), "b", &["localhost"]);
    let port = crate::support::proxy::free_port();
    let meta = crate::support::StubUpstream::start("meta");
    let mut cfg = ProxyConfig::new(meta.url(""), "tenants: {}\n".into());
    cfg.top = format!(
        "tls_listeners: [{{addr: \"127.0.0.1:{port}\", cert_file: {}, key_file: {}}}]\n",
        a.0.display(),
        b.1.display()
    );
    let err = crate::support::Proxy::try_start(cfg)
        .err()
        .expect("started with a mismatched pair");
    assert!(
        err.contains("tls_listeners[0]") && err.contains("not a usable pair"),
        "{err}"
    );
}
