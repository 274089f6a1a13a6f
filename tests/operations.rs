//! Operations: the admin listener, metrics with bounded labels, the PHI-free audit log, and canaries
//! proving no token, secret, query value, path id or body reaches any sink.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::json;

use crate::support::proxy::default_token_section;
use crate::support::tokens::{claims, sign_with, token};
use crate::support::{client, raw, Env, TENANT_A, TENANT_B, TENANT_UNKNOWN};

fn series(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("fhir_edge_"))
        .map(|l| l.rsplit_once(' ').map_or(l, |(k, _)| k).to_string())
        .collect()
}

fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn the_admin_listener_serves_metrics_health_and_readiness_and_the_public_one_does_not() {
    let env = Env::start_with(|c| c.token = Some(default_token_section()));
    assert_eq!(env.fhir_status("/Patient/1", &token(TENANT_A)), 200);
    let (status, _) = env.proxy.admin("/metrics");
    assert_eq!(status, 200);
    // A counter vector prints its TYPE line once it has a series: after the logging phase.
    let text = env
        .proxy
        .metrics_when(|m| m.contains("# TYPE fhir_edge_requests_total counter"));
    assert!(
        text.contains("# TYPE fhir_edge_requests_total counter"),
        "{text}"
    );
    assert!(text.contains("# TYPE fhir_edge_request_duration_seconds histogram"));
    assert!(text.contains("fhir_edge_build_info{version=\"0.1.0\"} 1"));
    // The process's own figures, under Prometheus' standard names.
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "process_threads",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && !l.ends_with(" 0")),
            "{name} missing or zero"
        );
    }
    assert!(text.contains("process_cpu_seconds_total "));
    assert_eq!(metric(&text, "fhir_edge_routing_tenants"), 2.0);
    assert_eq!(metric(&text, "fhir_edge_clients_registered"), 0.0);
    assert_eq!(env.proxy.admin("/healthz"), (200, "ok\n".to_string()));
    assert_eq!(env.proxy.admin("/readyz"), (200, "ready\n".to_string()));
    assert_eq!(env.proxy.admin("/other").0, 404);
    // The public listener has no route to the admin endpoints.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = client().get(env.proxy.url(path)).send().unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert!(!r.text().unwrap().contains("fhir_edge_"));
    }
}

#[test]
fn metrics_count_requests_failures_upstream_errors_tokens_and_reloads() {
    let env = Env::start_with(|c| c.token = Some(default_token_section()));
    let c = env.add_client("teams", &[TENANT_A]);
    let t = env.token_for(&c, TENANT_A);
    for _ in 0..3 {
        assert_eq!(env.fhir_status("/Patient/1", &t), 200);
    }
    assert_eq!(env.fhir_status("/Patient/1", "garbage.token.here"), 401);
    let expired = {
        let mut cl = claims(TENANT_A);
        cl["exp"] = json!(1);
        sign_with(Some("rs1"), "rs1", Algorithm::RS256, Some("at+jwt"), &cl)
    };
    assert_eq!(env.fhir_status("/Patient/1", &expired), 401);
    assert_eq!(env.fhir_status("/Patient/1", &token(TENANT_UNKNOWN)), 403);
    let r = env.token_request(
        "grant_type=client_credentials&client_id=x&client_secret=y&scope=z",
        None,
    );
    assert_eq!(r.status(), 401);
    // A rejected routing-table edit.
    std::fs::write(env.proxy.routes_path(), "tenants: nope\n").unwrap();
    assert!(crate::support::eventually(Duration::from_secs(3), || env
        .proxy
        .logs()
        .contains("routing table rejected")));

    let m = env.proxy.metrics_when(|m| {
        metric(
            m,
            "fhir_edge_requests_total{method=\"read\",status=\"2xx\",tenant=\"tenant-a\"}",
        ) >= 3.0
            && metric(
                m,
                "fhir_edge_requests_total{method=\"read\",status=\"4xx\",tenant=\"none\"}",
            ) >= 3.0
            && metric(
                m,
                "fhir_edge_request_duration_seconds_count{tenant=\"tenant-a\"}",
            ) >= 3.0
    });
    assert_eq!(
        metric(
            &m,
            "fhir_edge_requests_total{method=\"read\",status=\"2xx\",tenant=\"tenant-a\"}"
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "fhir_edge_auth_failures_total{reason=\"malformed_token\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "fhir_edge_auth_failures_total{reason=\"expired\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "fhir_edge_auth_failures_total{reason=\"unknown_tenant\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "fhir_edge_requests_total{method=\"read\",status=\"4xx\",tenant=\"none\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            &format!("fhir_edge_tokens_issued_total{{client=\"{}\"}}", c.id)
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "fhir_edge_token_endpoint_failures_total{error=\"invalid_client\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "fhir_edge_reloads_total{file=\"routes\",result=\"rejected\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "fhir_edge_reloads_total{file=\"clients\",result=\"applied\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "fhir_edge_config_generation{file=\"clients\"}"),
        2.0
    );
    assert!(
        metric(
            &m,
            "fhir_edge_config_last_success_timestamp_seconds{file=\"routes\"}"
        ) > 1.7e9
    );
    assert_eq!(
        metric(
            &m,
            "fhir_edge_request_duration_seconds_count{tenant=\"tenant-a\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "fhir_edge_upstream_duration_seconds_count{tenant=\"tenant-a\"}"
        ),
        3.0
    );
}

#[test]
fn upstream_errors_are_counted_by_kind() {
    let env = Env::start();
    let dead = format!("http://127.0.0.1:{}", crate::support::proxy::free_port());
    let routes = crate::support::proxy::routes_yaml(&[
        (TENANT_A, "dead", &dead, ""),
        (TENANT_B, "slow", &env.b.url(""), "read_timeout_ms: 200"),
    ]);
    let before = env.proxy.logs().matches("routing table reloaded").count();
    std::fs::write(env.proxy.routes_path(), routes).unwrap();
    assert!(crate::support::eventually(Duration::from_secs(3), || {
        env.proxy.logs().matches("routing table reloaded").count() > before
    }));
    env.b.set_delay(Duration::from_secs(1));
    assert_eq!(env.fhir_status("/Patient/1", &token(TENANT_A)), 502);
    assert_eq!(env.fhir_status("/Patient/1", &token(TENANT_B)), 504);
    let (_, m) = env.proxy.admin("/metrics");
    assert_eq!(
        metric(
            &m,
            "fhir_edge_upstream_errors_total{kind=\"connect\",tenant=\"dead\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "fhir_edge_upstream_errors_total{kind=\"timeout\",tenant=\"slow\"}"
        ),
        1.0,
        "{m}"
    );
}

/// Label values come only from bounded sets: 100,000 requests with random unknown tenants (and the
/// same number of garbage tokens) must not add a single series.
#[test]
fn a_hundred_thousand_unknown_tenants_add_no_series() {
    let env = Env::start();
    // Warm every series these requests can touch, then count.
    assert_eq!(
        env.fhir_status("/Patient/1", &hs_token(TENANT_UNKNOWN)),
        403
    );
    assert_eq!(env.fhir_status("/Patient/1", "x.y.z"), 401);
    let warmed = env.proxy.metrics_when(|m| {
        metric(
            m,
            "fhir_edge_requests_total{method=\"read\",status=\"4xx\",tenant=\"none\"}",
        ) == 2.0
    });
    let before = series(&warmed);

    let port = env.proxy.port;
    let workers: Vec<_> = (0..4)
        .map(|w| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut buf = vec![0u8; 8192];
                let mut statuses = [0u32; 2];
                for i in 0..25_000u32 {
                    let tenant = format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", w, i % 0xffff, i % 0xfff, w, i);
                    let auth = if i % 2 == 0 { hs_token(&tenant) } else { format!("{tenant}.{i}.x") };
                    let req = format!(
                        "GET /Patient/{tenant}?name={tenant} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auth}\r\nX-Tenant-Id: {tenant}\r\n\r\n"
                    );
                    s.write_all(req.as_bytes()).unwrap();
                    let n = read_response(&mut s, &mut buf);
                    let status = &buf[9..12];
                    statuses[usize::from(status == b"401")] += 1;
                    assert!(status == b"403" || status == b"401", "{}", String::from_utf8_lossy(&buf[..n]));
                }
                statuses
            })
        })
        .collect();
    let mut total = [0u32; 2];
    for w in workers {
        let s = w.join().unwrap();
        total[0] += s[0];
        total[1] += s[1];
    }
    assert_eq!(total, [50_000, 50_000]);
    let (_, after_text) = env.proxy.admin("/metrics");
    assert_eq!(
        series(&after_text),
        before,
        "a request created a metric series"
    );
    assert!(
        metric(
            &after_text,
            "fhir_edge_auth_failures_total{reason=\"unknown_tenant\"}"
        ) >= 50_000.0
    );
}

fn hs_token(scope: &str) -> String {
    sign_with(
        Some("hs1"),
        "hs1",
        Algorithm::HS256,
        Some("at+jwt"),
        &claims(scope),
    )
}

/// Reads one response with a Content-Length body from a keep-alive connection.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut n = 0;
    loop {
        if n == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let got = s.read(&mut buf[n..]).unwrap();
        assert!(got > 0, "connection closed");
        n += got;
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if n >= end + 4 + len {
                return n;
            }
        }
    }
}

#[test]
fn tenant_labels_follow_the_configured_mode() {
    for (mode, want) in [("guid", TENANT_A), ("off", "none"), ("name", "tenant-a")] {
        let env = Env::start_with(|c| c.admin = format!("  tenant_label: {mode}"));
        assert_eq!(env.fhir_status("/Patient/1", &token(TENANT_A)), 200);
        let s =
            format!("fhir_edge_requests_total{{method=\"read\",status=\"2xx\",tenant=\"{want}\"}}");
        let m = env.proxy.metrics_when(|m| metric(m, &s) == 1.0);
        assert_eq!(metric(&m, &s), 1.0, "{mode}: {m}");
    }
}

#[test]
fn promtool_finds_nothing_to_complain_about() {
    let env = Env::start_with(|c| c.token = Some(default_token_section()));
    let c = env.add_client("teams", &[TENANT_A]);
    env.fhir_status("/Patient/1", &env.token_for(&c, TENANT_A));
    env.fhir_status("/Patient/1", "bad");
    let (_, text) = env.proxy.admin("/metrics");
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is needed (Debian package `prometheus`; scripts/setup installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

#[test]
fn the_audit_log_has_one_json_line_per_request_without_ids_or_queries() {
    let env = Env::start_with(|c| c.token = Some(default_token_section()));
    let c = env.add_client("teams", &[TENANT_A]);
    let t = env.token_for(&c, TENANT_A);
    let r = client()
        .get(
            env.proxy
                .url("/Patient/pat-123?name=Smith&birthdate=1970-01-01"),
        )
        .header("authorization", format!("Bearer {t}"))
        .header("x-request-id", "req-audit-0001")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    client().get(env.proxy.url("/metadata")).send().unwrap();
    client()
        .get(env.proxy.url("/Observation?patient=pat-123"))
        .send()
        .unwrap();
    // The token request, the read, /metadata and the unauthenticated search.
    let lines = env.proxy.access_log_at_least(4);
    let read = lines
        .iter()
        .find(|l| l["request_id"] == "req-audit-0001")
        .expect("the read's line");
    assert_eq!(read["method"], "GET");
    assert_eq!(read["route"], "/Patient/{id}");
    assert_eq!(read["status"], 200);
    assert_eq!(read["upstream_status"], 200);
    assert_eq!(read["tenant"], TENANT_A);
    assert_eq!(read["tenant_name"], "tenant-a");
    assert_eq!(read["client_id"], c.id.as_str());
    assert_eq!(read["upstream"], env.a.addr.to_string().as_str());
    assert_eq!(read["jti_hash"].as_str().unwrap().len(), 16);
    assert!(read["bytes_out"].as_u64().unwrap() > 0);
    assert!(read["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(read["time"].as_str().unwrap().ends_with('Z'));
    assert!(lines
        .iter()
        .any(|l| l["route"] == "/metadata" && l["status"] == 200));
    assert!(lines
        .iter()
        .any(|l| l["route"] == "/token" && l["status"] == 200));
    let unauth = lines.iter().find(|l| l["route"] == "/Observation").unwrap();
    assert_eq!(
        (unauth["status"].as_u64(), unauth["auth_failure"].as_str()),
        (Some(401), Some("missing"))
    );
    let all = serde_json::to_string(&lines).unwrap();
    for secret in ["pat-123", "Smith", "1970-01-01", &t, &c.secret] {
        assert!(!all.contains(secret), "{secret} in the audit log");
    }
}

/// Unique canary strings in every place a request can carry data — query, path ids, bodies, headers,
/// token claims and signatures, client secrets, malformed requests — at the most verbose log level;
/// then every sink (stdout, stderr, the audit file, metrics, error bodies) is scanned for them.
#[test]
fn canaries_never_reach_any_sink_at_trace_level() {
    let env = Env::start_with(|c| {
        c.token = Some(default_token_section());
        c.log_level = "trace".into();
    });
    let client_reg = env.add_client("teams", &[TENANT_A]);
    let canary = |n: u32| format!("CANARY{n:04}zq");
    let mut bodies = String::new();
    let mut send = |req: String| {
        let r = raw::send(env.proxy.port, req.as_bytes());
        bodies.push_str(&r.body_text());
        for (_, v) in &r.headers {
            bodies.push_str(v);
        }
    };
    let good = env.token_for(&client_reg, TENANT_A);
    let mut canary_claims = claims(TENANT_A);
    canary_claims["sub"] = json!(canary(1));
    canary_claims["name"] = json!(canary(2));
    canary_claims["jti"] = json!(canary(3));
    let canary_token = sign_with(
        Some("rs1"),
        "rs1",
        Algorithm::RS256,
        Some("at+jwt"),
        &canary_claims,
    );
    let bad_token = format!("{}.{}.{}", canary(4), canary(5), canary(6));
    let c = |n| canary(n);
    for req in [
        // Query values and path ids, with good, bad and no tokens.
        format!("GET /Patient/{}?name={}&birthdate={} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\nConnection: close\r\n\r\n", c(10), c(11), c(12)),
        format!("GET /Patient/{}?name={} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {canary_token}\r\nConnection: close\r\n\r\n", c(13), c(14)),
        format!("GET /Patient/{}?name={} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bad_token}\r\nConnection: close\r\n\r\n", c(15), c(16)),
        format!("GET /Patient?name={}&access_token={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", c(17), c(18)),
        // Headers of every sort.
        format!("GET /Patient HTTP/1.1\r\nHost: {}\r\nAuthorization: Basic {}\r\nCookie: s={}\r\nX-Tenant-Id: {}\r\nUser-Agent: {}\r\nReferer: http://{}/\r\nConnection: close\r\n\r\n", c(20), c(21), c(22), c(23), c(24), c(25)),
        // Bodies: a form search, a batch, a write, and a token request with a wrong secret.
        { let b = format!("name={}&given={}", c(30), c(31)); format!("POST /Patient/_search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len()) },
        { let b = format!(r#"{{"resourceType":"Bundle","type":"batch","entry":[{{"request":{{"method":"DELETE","url":"Patient/{}"}}}}]}}"#, c(32)); format!("POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len()) },
        { let b = format!(r#"{{"resourceType":"Patient","name":[{{"family":"{}"}}]}}"#, c(33)); format!("PUT /Patient/{} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", c(34), b.len()) },
        { let b = format!("grant_type=client_credentials&client_id={}&client_secret={}&scope={}", client_reg.id, c(35), TENANT_A); format!("POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len()) },
        { let b = format!("grant_type=client_credentials&scope={}", TENANT_A); format!("POST /token?client_secret={} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", c(36), b.len()) },
        // Malformed requests: bad header bytes, a bad chunk, duplicate lengths, garbage.
        format!("GET /Patient?x={} HTTP/1.1\r\nHost: x\r\nBad Header: {}\r\nConnection: close\r\n\r\n", c(40), c(41)),
        format!("GET /Patient?x={} HTTP/1.1\r\nHost: x\r\nX-Ctl: a\x01{}\r\nConnection: close\r\n\r\n", c(42), c(43)),
        format!("POST /Patient/_search HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {good}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", c(44)),
        format!("POST /Patient/_search?q={} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\nConnection: close\r\n\r\n{}", c(45), c(46)),
        format!("{} {} HTTP/9.9\r\n\r\n", c(47), c(48)),
        format!("GET /{} HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\nConnection: close\r\n\r\n", c(49), c(50).repeat(2000)),
    ] {
        send(req);
    }
    // The upstream saw the good requests' data (that is its job); nothing of it may surface here.
    std::thread::sleep(Duration::from_millis(300));
    let (_, metrics) = env.proxy.admin("/metrics");
    let sinks = format!("{}\n{metrics}\n{bodies}", env.proxy.every_sink());
    for n in [
        1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 25, 30, 31, 32,
        33, 34, 35, 36, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50,
    ] {
        assert!(
            !sinks.contains(&canary(n)),
            "{} leaked:\n{}",
            canary(n),
            sinks
                .lines()
                .filter(|l| l.contains(&canary(n)))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(!sinks.contains(&good) && !sinks.contains(&client_reg.secret));
    // The run did log at trace level, and the requests were audited.
    assert!(env.proxy.every_sink().contains("\"route\""));
}

/// Lines in the audit file at `path` (0 when it does not exist).
fn audit_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn the_audit_log_is_reopened_on_sighup_after_logrotate_renames_it() {
    let env = Env::start();
    let log = env.proxy.dir.path().join("access.log");
    let rotated = env.proxy.dir.path().join("access.log.1");
    client().get(env.proxy.url("/metadata")).send().unwrap();
    assert!(crate::support::eventually(
        Duration::from_secs(5),
        || audit_lines(&log) == 1
    ));
    std::fs::rename(&log, &rotated).unwrap();
    env.proxy.signal("HUP");
    // The reopen happens before the writer's next write: the first line after SIGHUP goes to the
    // new file (a line already queued before it may still go to the renamed one).
    assert!(crate::support::eventually(Duration::from_secs(5), || {
        client().get(env.proxy.url("/metadata")).send().unwrap();
        audit_lines(&log) >= 1
    }));
    assert!(
        audit_lines(&rotated) >= 1,
        "the lines before the rename were lost"
    );
}

#[test]
fn a_stuck_audit_sink_drops_lines_and_never_holds_a_request() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // A reader that never reads: once the pipe's buffer is full, every write blocks.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let path = fifo.display().to_string();
    let env = Env::start_with(move |c| {
        c.access = path;
        c.log_extra = "  access_queue_lines: 16".into();
    });
    // Far more requests than the pipe and the queue hold; each is answered at once.
    for _ in 0..600 {
        let r = client().get(env.proxy.url("/metadata")).send().unwrap();
        assert_eq!(r.status(), 200);
    }
    let (_, metrics) = env.proxy.admin("/metrics");
    let dropped = metric(&metrics, "fhir_edge_audit_lines_dropped_total");
    assert!(dropped > 0.0, "nothing dropped:\n{metrics}");
}

#[test]
fn the_process_log_can_be_json_lines() {
    let env = Env::start_with(|c| c.log_extra = "  format: json".into());
    // A malformed request makes Pingora log; its raw bytes stay withheld in JSON too.
    let mut s = TcpStream::connect(env.proxy.authority()).unwrap();
    s.write_all(
        b"GET /Patient?canary=json-log-canary HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n",
    )
    .unwrap();
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    client().get(env.proxy.url("/metadata")).send().unwrap();
    let logs = env.proxy.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{logs}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["time", "level", "target", "message"] {
            assert!(v[key].is_string(), "{key} missing: {line}");
        }
    }
    assert!(
        logs.contains("\"message\":\"fhir-edge "),
        "the start line: {logs}"
    );
    assert!(!env.proxy.every_sink().contains("json-log-canary"));
}
