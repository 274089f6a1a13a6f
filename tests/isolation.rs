//! Tenant isolation: per-tenant and per-client limits (429 with Retry-After and an
//! OperationOutcome, nothing sent upstream, state kept across reloads), several upstream nodes per
//! tenant (round robin, least connections, failover, passive and active health, all-down 503) and
//! the bound on a token's scope.

use std::time::{Duration, Instant};

use crate::support::proxy::{free_port, ProxyConfig};
use crate::support::upstream::Mode;
use crate::support::{
    eventually, raw, routes_generation, tokens, Env, Proxy, StubUpstream, TENANT_A, TENANT_B,
};

/// Fast ejection for tests: two failures, one second out (two at most).
const HEALTH: &str =
    "upstream_health: { failures: 2, ejection_seconds: 1, max_ejection_seconds: 2 }\n";

fn get(proxy: &Proxy, token: &str) -> raw::RawResponse {
    raw::get(proxy.port, "/Patient", Some(&format!("Bearer {token}")))
}

/// A token for `tenant` naming `client` as its client.
fn token_of(tenant: &str, client: &str) -> String {
    let mut claims = tokens::claims(tenant);
    claims["client_id"] = client.into();
    claims["sub"] = client.into();
    tokens::sign_with(
        Some("rs1"),
        "rs1",
        jsonwebtoken::Algorithm::RS256,
        Some("at+jwt"),
        &claims,
    )
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The routing table with tenant A on `nodes` (with `extra` lines) and tenant B on `b`.
fn nodes_yaml(nodes: &[String], extra: &str, b: &str) -> String {
    let list: Vec<String> = nodes.iter().map(|n| format!("\"{n}\"")).collect();
    let mut s = format!(
        "tenants:\n  {TENANT_A}:\n    name: tenant-a\n    upstreams: [{}]\n",
        list.join(", ")
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str(&format!("    {line}\n"));
    }
    s.push_str(&format!(
        "  {TENANT_B}:\n    name: tenant-b\n    upstream: \"{b}\"\n"
    ));
    s
}

fn start_on(routes: String) -> (StubUpstream, Proxy) {
    start_configured(routes, |_| {})
}

/// [`start_on`], with `configure` changing the proxy's configuration first.
fn start_configured(
    routes: String,
    configure: impl FnOnce(&mut ProxyConfig),
) -> (StubUpstream, Proxy) {
    let meta = StubUpstream::start("meta");
    meta.set_response(
        &[("Content-Type", "application/fhir+json")],
        crate::support::capability_statement(&meta.url("")),
    );
    let mut cfg = ProxyConfig::new(meta.url(""), routes);
    cfg.top = HEALTH.into();
    configure(&mut cfg);
    (meta, Proxy::start(cfg))
}

/// The usual two tenants, tenant A with `limits` (a YAML flow mapping).
fn with_limits_of_a(limits: &str) -> Env {
    Env::start_with(|c| {
        c.routes = c.routes.replace(
            "name: tenant-a\n",
            &format!("name: tenant-a\n    limits: {limits}\n"),
        );
    })
}

/// Replaces `from` with `to` in the routing table and waits for the proxy to load the new table.
fn edit_routes(env: &Env, from: &str, to: &str) {
    let generation = routes_generation(&env.proxy.admin("/metrics").1);
    let text = std::fs::read_to_string(env.proxy.routes_path()).unwrap();
    assert!(text.contains(from), "{from:?} is not in the table");
    std::fs::write(env.proxy.routes_path(), text.replace(from, to)).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        routes_generation(&env.proxy.admin("/metrics").1) > generation
    }));
}

/// Renames tenant B in the routing table (tenant A's entry stays as it is) and waits for the reload.
fn reload_changing_only_b(env: &Env) {
    edit_routes(env, "name: tenant-b", "name: tenant-b2");
}

#[test]
fn over_the_rate_a_tenant_gets_429_with_retry_after_and_nothing_reaches_its_upstream() {
    let env = with_limits_of_a("{ requests_per_second: 1, burst: 3 }");
    let a = tokens::token(TENANT_A);
    let start = Instant::now();
    let statuses: Vec<raw::RawResponse> = (0..10).map(|_| get(&env.proxy, &a)).collect();
    let passed = statuses.iter().filter(|r| r.status == 200).count();
    // The burst, and at most one more per second that went by.
    let bound = 3 + start.elapsed().as_secs() as usize + 1;
    assert!(passed >= 3 && passed <= bound, "{passed} passed");
    let refused = statuses.iter().find(|r| r.status == 429).expect("a 429");
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        refused.header("content-type"),
        Some("application/fhir+json")
    );
    let body = refused.json();
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(body["issue"][0]["code"], "throttled");
    assert_eq!(
        env.a.count(),
        passed,
        "a throttled request never reaches the upstream"
    );
    // The other tenant is not affected.
    let b = tokens::token(TENANT_B);
    assert_eq!(get(&env.proxy, &b).status, 200);
    let text = env.proxy.metrics_when(|m| {
        m.contains("fhir_edge_throttled_requests_total{limit=\"rate\",tenant=\"tenant-a\"}")
    });
    let throttled = metric(
        &text,
        "fhir_edge_throttled_requests_total{limit=\"rate\",tenant=\"tenant-a\"} ",
    );
    assert_eq!(throttled as usize, 10 - passed);
    let audit = env.proxy.access_log_at_least(11);
    assert!(audit.iter().any(|l| l["error"] == "throttled_rate"));
}

#[test]
fn each_client_of_a_tenant_has_its_own_bucket() {
    let env = with_limits_of_a("{ per_client: { requests_per_second: 1, burst: 2 } }");
    let x = token_of(TENANT_A, "client-x");
    let y = token_of(TENANT_A, "client-y");
    let x_statuses: Vec<u16> = (0..6).map(|_| get(&env.proxy, &x).status).collect();
    assert!(x_statuses.contains(&429), "{x_statuses:?}");
    assert_eq!(&x_statuses[..2], &[200, 200]);
    // Client y's bucket is full although x's is empty.
    assert_eq!(get(&env.proxy, &y).status, 200);
    assert_eq!(get(&env.proxy, &y).status, 200);
    env.proxy
        .metrics_when(|m| m.contains("limit=\"client_rate\",tenant=\"tenant-a\""));
    // An identity provider's token that names its client in `azp` (Entra ID v2, Keycloak) has a
    // bucket of its own too, and the audit log names that client.
    let mut claims = tokens::claims(TENANT_A);
    claims.as_object_mut().unwrap().remove("client_id");
    claims["azp"] = "entra-app".into();
    let z = tokens::sign_with(
        Some("rs1"),
        "rs1",
        jsonwebtoken::Algorithm::RS256,
        Some("at+jwt"),
        &claims,
    );
    let z_statuses: Vec<u16> = (0..4).map(|_| get(&env.proxy, &z).status).collect();
    assert_eq!(&z_statuses[..2], &[200, 200]);
    assert!(z_statuses.contains(&429), "{z_statuses:?}");
    let audit = env.proxy.access_log_at_least(12);
    assert!(
        audit.iter().any(|l| l["client_id"] == "entra-app"),
        "{audit:?}"
    );
}

#[test]
fn requests_in_flight_are_bounded_per_tenant_and_kept_across_a_reload() {
    // Tenant A's server holds its answers until released; the proxy waits far longer than the test
    // takes, however slow the machine.
    let env = Env::start_with(|c| {
        c.routes = c.routes.replace(
            "name: tenant-a\n",
            "name: tenant-a\n    limits: { max_in_flight: 2 }\n",
        );
        c.upstream_read_timeout_ms = 120_000;
    });
    env.a.hold();
    let a = tokens::token(TENANT_A);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let port = env.proxy.port;
            let a = a.clone();
            std::thread::spawn(move || raw::get(port, "/Patient", Some(&format!("Bearer {a}"))))
        })
        .collect();
    assert!(eventually(Duration::from_secs(3), || env.a.count() == 2));
    let third = get(&env.proxy, &a);
    assert_eq!(third.status, 429);
    assert_eq!(third.header("retry-after"), Some("1"));
    // Tenant B's requests are its own.
    assert_eq!(get(&env.proxy, &tokens::token(TENANT_B)).status, 200);
    // A reload that leaves tenant A's limits as they were keeps its count.
    reload_changing_only_b(&env);
    assert_eq!(get(&env.proxy, &a).status, 429);
    env.a.release();
    for t in slow {
        assert_eq!(t.join().unwrap().status, 200);
    }
    assert!(eventually(Duration::from_secs(3), || get(&env.proxy, &a)
        .status
        == 200));
    assert_eq!(env.a.count(), 3, "no refused request reached the upstream");
}

#[test]
fn a_reload_keeps_the_buckets_of_tenants_whose_limits_did_not_change() {
    let env = with_limits_of_a("{ requests_per_second: 1, burst: 60 }");
    let a = tokens::token(TENANT_A);
    let drained = Instant::now();
    while get(&env.proxy, &a).status == 200 {
        assert!(
            drained.elapsed() < Duration::from_secs(30),
            "never throttled"
        );
    }
    reload_changing_only_b(&env);
    // A fresh bucket would let all 20 through; the kept one about one per second since it ran dry.
    let since = Instant::now();
    let passed = (0..20)
        .filter(|_| get(&env.proxy, &a).status == 200)
        .count();
    let bound =
        since.elapsed().as_secs() as usize + drained.elapsed().as_secs().min(1) as usize + 2;
    assert!(passed <= bound, "{passed} of 20 passed after the reload");
    // Changed limits start a new bucket.
    edit_routes(&env, "burst: 60", "burst: 61");
    assert_eq!(get(&env.proxy, &a).status, 200);
}

#[test]
fn round_robin_spreads_requests_over_every_node() {
    let n1 = StubUpstream::start("n1");
    let n2 = StubUpstream::start("n2");
    let b = StubUpstream::start("b");
    let (_meta, proxy) = start_on(nodes_yaml(
        &[n1.url("/r4"), n2.url("/fhir")],
        "",
        &b.url(""),
    ));
    let a = tokens::token(TENANT_A);
    for _ in 0..10 {
        assert_eq!(get(&proxy, &a).status, 200);
    }
    assert_eq!((n1.count(), n2.count()), (5, 5));
    // Each node gets its own base path.
    assert_eq!(n1.last().target, "/r4/Patient");
    assert_eq!(n2.last().target, "/fhir/Patient");
}

#[test]
fn least_connections_avoids_the_node_that_is_busy() {
    let n1 = StubUpstream::start("n1");
    let n2 = StubUpstream::start("n2");
    let b = StubUpstream::start("b");
    // n1 stays busy until released, and the proxy waits for it far longer than the test takes,
    // however slow the machine.
    n1.hold();
    let (_meta, proxy) = start_configured(
        nodes_yaml(
            &[n1.url(""), n2.url("")],
            "balance: least_connections",
            &b.url(""),
        ),
        |cfg| cfg.upstream_read_timeout_ms = 120_000,
    );
    let a = tokens::token(TENANT_A);
    // Requests in the background until one is held by the busy node.
    let port = proxy.port;
    let bearer = format!("Bearer {a}");
    let held = std::thread::spawn(move || {
        for _ in 0..4 {
            raw::get(port, "/Patient", Some(&bearer));
        }
    });
    assert!(eventually(Duration::from_secs(5), || n1.count() == 1));
    let before = n2.count();
    for _ in 0..6 {
        assert_eq!(get(&proxy, &a).status, 200);
    }
    assert_eq!(
        n2.count(),
        before + 6,
        "every request went to the idle node"
    );
    assert_eq!(n1.count(), 1);
    n1.release();
    held.join().unwrap();
}

#[test]
fn a_node_that_refuses_connections_is_failed_over_then_ejected_and_counted() {
    let dead = free_port();
    let live = StubUpstream::start("live");
    let b = StubUpstream::start("b");
    let dead_url = format!("http://127.0.0.1:{dead}");
    let (_meta, proxy) = start_on(nodes_yaml(&[dead_url, live.url("")], "", &b.url("")));
    let a = tokens::token(TENANT_A);
    for _ in 0..6 {
        assert_eq!(get(&proxy, &a).status, 200, "every request is served");
    }
    assert_eq!(live.count(), 6);
    let node = format!("node=\"http://127.0.0.1:{dead}\"");
    let text =
        proxy.metrics_when(|m| m.contains(&format!("fhir_edge_upstream_node_up{{{node}}} 0")));
    assert_eq!(
        metric(
            &text,
            &format!("fhir_edge_upstream_ejections_total{{{node}}} ")
        ),
        1.0
    );
    assert!(
        metric(
            &text,
            "fhir_edge_upstream_retries_total{tenant=\"tenant-a\"} "
        ) >= 2.0
    );
    assert!(text.contains(&format!(
        "fhir_edge_upstream_node_up{{node=\"{}\"}} 1",
        live.url("").trim_end_matches('/')
    )));
}

#[test]
fn a_write_that_failed_after_it_was_sent_is_never_sent_again_but_a_read_is() {
    let broken = StubUpstream::start("broken");
    let good = StubUpstream::start("good");
    let b = StubUpstream::start("b");
    // Reads the request, then closes without a byte of response.
    broken.set_mode(Mode::Raw {
        bytes: Vec::new(),
        reset: false,
    });
    let routes = nodes_yaml(
        &[broken.url(""), good.url("")],
        "allow_writes: true",
        &b.url(""),
    );
    let meta = StubUpstream::start("meta");
    meta.set_response(
        &[("Content-Type", "application/fhir+json")],
        crate::support::capability_statement(&meta.url("")),
    );
    let mut cfg = ProxyConfig::new(meta.url(""), routes);
    // Failures never eject here: this test is about retries alone.
    cfg.top = "upstream_health: { failures: 1000 }\n".into();
    let proxy = Proxy::start(cfg);
    let a = tokens::token(TENANT_A);
    let mut posts = 0;
    let mut gets = 0;
    // Round robin alternates: whichever node the first attempt lands on, each kind meets the
    // broken node within two requests.
    for _ in 0..2 {
        let post = raw::send(
            proxy.port,
            format!(
                "POST /Observation HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {a}\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            )
            .as_bytes(),
        );
        posts += 1;
        if post.status == 502 {
            break;
        }
        assert_eq!(post.status, 200);
    }
    let sent_posts = broken
        .requests()
        .iter()
        .chain(good.requests().iter())
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(sent_posts, posts, "each POST was sent once");
    assert!(
        broken.requests().iter().any(|r| r.method == "POST"),
        "a POST met the broken node"
    );
    for _ in 0..4 {
        assert_eq!(get(&proxy, &a).status, 200, "a GET goes to the other node");
        gets += 1;
    }
    let broken_gets = broken
        .requests()
        .iter()
        .filter(|r| r.method == "GET")
        .count();
    let good_gets = good.requests().iter().filter(|r| r.method == "GET").count();
    assert!(broken_gets >= 1, "a GET met the broken node");
    assert_eq!(good_gets, gets, "every GET was answered by the good node");
}

#[test]
fn when_every_node_is_out_requests_get_503_at_once_until_one_is_back() {
    let only = StubUpstream::start("only");
    let b = StubUpstream::start("b");
    only.set_mode(Mode::Raw {
        bytes: Vec::new(),
        reset: false,
    });
    let (_meta, proxy) = start_on(nodes_yaml(&[only.url("")], "", &b.url("")));
    let a = tokens::token(TENANT_A);
    assert_eq!(get(&proxy, &a).status, 502);
    assert_eq!(get(&proxy, &a).status, 502);
    let connections = only.connections();
    let down = get(&proxy, &a);
    assert_eq!(down.status, 503);
    let wait: u64 = down.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    assert_eq!(down.json()["issue"][0]["code"], "transient");
    assert_eq!(only.connections(), connections, "no connection was tried");
    let (status, ready) = proxy.admin("/readyz");
    assert_eq!(status, 200);
    assert!(
        ready.contains("every upstream node out of rotation: tenant-a"),
        "{ready}"
    );
    // Tenant B is served throughout.
    assert_eq!(get(&proxy, &tokens::token(TENANT_B)).status, 200);
    // The server recovers; once the backoff ends, the next request finds it.
    only.set_mode(Mode::Bundle);
    assert!(eventually(Duration::from_secs(6), || get(&proxy, &a)
        .status
        == 200));
    let node = format!(
        "fhir_edge_upstream_node_up{{node=\"{}\"}} 1",
        only.url("").trim_end_matches('/')
    );
    proxy.metrics_when(|m| m.contains(&node));
    assert!(!proxy.admin("/readyz").1.contains("out of rotation"));
}

#[test]
fn active_checks_eject_and_return_a_node_without_any_client_request() {
    let n1 = StubUpstream::start("n1");
    let n2 = StubUpstream::start("n2");
    let b = StubUpstream::start("b");
    let meta = StubUpstream::start("meta");
    meta.set_response(
        &[("Content-Type", "application/fhir+json")],
        crate::support::capability_statement(&meta.url("")),
    );
    let mut cfg = ProxyConfig::new(
        meta.url(""),
        nodes_yaml(&[n1.url("/r4"), n2.url("")], "", &b.url("")),
    );
    cfg.top = "upstream_health: { failures: 2, ejection_seconds: 60, max_ejection_seconds: 60, check_interval_seconds: 1, check_timeout_ms: 500 }\n".into();
    let proxy = Proxy::start(cfg);
    let label = |u: &StubUpstream| format!("node=\"{}\"", u.url("").trim_end_matches('/'));
    // Checks are GET {base}/metadata.
    assert!(eventually(Duration::from_secs(5), || n1
        .requests()
        .iter()
        .any(|r| r.target == "/r4/metadata")));
    n1.set_mode(Mode::Raw {
        bytes: b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_vec(),
        reset: false,
    });
    let down = format!("fhir_edge_upstream_node_up{{{}}} 0", label(&n1));
    assert!(eventually(Duration::from_secs(8), || proxy
        .admin("/metrics")
        .1
        .contains(&down)));
    // Out for 60 s, so only a check can bring it back.
    n1.set_mode(Mode::Bundle);
    let up = format!("fhir_edge_upstream_node_up{{{}}} 1", label(&n1));
    assert!(eventually(Duration::from_secs(8), || proxy
        .admin("/metrics")
        .1
        .contains(&up)));
    let a = tokens::token(TENANT_A);
    let before = n1
        .requests()
        .iter()
        .filter(|r| r.target == "/r4/Patient")
        .count();
    for _ in 0..4 {
        assert_eq!(get(&proxy, &a).status, 200);
    }
    let after = n1
        .requests()
        .iter()
        .filter(|r| r.target == "/r4/Patient")
        .count();
    assert_eq!(after - before, 2, "back in the rotation");
}

#[test]
fn route_limits_and_node_lists_are_checked_when_the_table_loads() {
    let env = Env::start();
    let generation = routes_generation(&env.proxy.admin("/metrics").1);
    let good = std::fs::read_to_string(env.proxy.routes_path()).unwrap();
    for bad in [
        "    limits: { burst: 5 }\n",
        "    limits: { requests_per_second: 2000000 }\n",
        "    limits: { rate: 5 }\n",
        "    upstreams: [\"http://127.0.0.1:9\"]\n",
        "    balance: random\n",
    ] {
        std::fs::write(
            env.proxy.routes_path(),
            good.replace("name: tenant-a\n", &format!("name: tenant-a\n{bad}")),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
            .args(["check", "--offline", "--config"])
            .arg(env.proxy.dir.path().join("fhir-edge.yaml"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} passed the check");
    }
    std::fs::write(env.proxy.routes_path(), &good).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The good table still serves: none of the bad ones was applied.
    assert_eq!(
        get(&env.proxy, &tokens::token(TENANT_A)).status,
        200,
        "generation {generation}"
    );
}

#[test]
fn a_token_with_thousands_of_scope_entries_is_refused() {
    let env = Env::start();
    // Over the bound of 256 entries (the token's tenant comes first), yet small enough for the
    // token size limit: it is the scope bound that refuses it. The scope names no tenant then.
    let scope = format!("{TENANT_A} {}", "a ".repeat(300));
    let token = tokens::token(scope.trim_end());
    assert!(token.len() < 4096, "{} bytes", token.len());
    let r = get(&env.proxy, &token);
    assert_eq!(r.status, 403);
    assert!(r
        .header("www-authenticate")
        .is_some_and(|c| c.contains("insufficient_scope")));
    assert_eq!(env.a.count(), 0);
    // Within the bound the same shape is served.
    let scope = format!("{TENANT_A} {}", "a ".repeat(200));
    assert_eq!(
        get(&env.proxy, &tokens::token(scope.trim_end())).status,
        200
    );
}

/// A connection to the proxy from `source` (any 127.0.0.0/8 address: Linux routes them all to
/// loopback).
fn connect_from(source: &str, port: u16) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        socket
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap()
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// A request on `s` that keeps the connection, and its response: the connection is then idle.
fn idle_after_one_request(s: &mut std::net::TcpStream, token: &str) {
    use std::io::Write;
    write!(
        s,
        "GET /Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    assert_eq!(raw::read_response(s, Vec::new()).status, 200);
}

/// Starts a request on `s` without ending its header block: the connection is busy.
fn busy(s: &mut std::net::TcpStream, token: &str) {
    use std::io::Write;
    write!(
        s,
        "GET /Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
    )
    .unwrap();
}

/// Ends the header block started by [`busy`] and reads the response.
fn finish(s: &mut std::net::TcpStream) -> raw::RawResponse {
    use std::io::Write;
    s.write_all(b"Connection: close\r\n\r\n").unwrap();
    raw::read_response(s, Vec::new())
}

/// Whether the proxy closed `s` (a read sees the end of the stream).
fn closed_by_proxy(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0))
}

/// A refused connection's answer: 503, Retry-After, an OperationOutcome, then the close.
fn assert_refused(mut s: std::net::TcpStream, token: &str) {
    busy(&mut s, token);
    let r = finish(&mut s);
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("connection"), Some("close"));
    let body = r.json();
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(body["issue"][0]["code"], "transient");
}

#[test]
fn over_the_connection_bound_the_idle_connection_is_closed_first_then_new_ones_are_refused() {
    let env = Env::start_with(|c| c.limits = "  max_connections: 2\n".into());
    let a_token = tokens::token(TENANT_A);
    let port = env.proxy.port;
    let mut idle = connect_from("127.0.0.1", port);
    idle_after_one_request(&mut idle, &a_token);
    let mut working = connect_from("127.0.0.1", port);
    busy(&mut working, &a_token);
    // A third connection: the idle one makes room, the busy one is untouched.
    let mut third = connect_from("127.0.0.1", port);
    assert!(closed_by_proxy(&mut idle), "the idle connection was closed");
    busy(&mut third, &a_token);
    // Both are busy now: a fourth is answered 503 and closed.
    assert_refused(connect_from("127.0.0.1", port), &a_token);
    assert_eq!(finish(&mut working).status, 200);
    assert_eq!(finish(&mut third).status, 200);
    let text = env.proxy.metrics_when(|m| {
        m.contains("fhir_edge_client_connections_refused_total{bound=\"total\"} 1")
    });
    assert_eq!(
        metric(&text, "fhir_edge_idle_connections_closed_total "),
        1.0
    );
    // Closed connections give their places back.
    assert!(eventually(Duration::from_secs(5), || {
        let mut s = connect_from("127.0.0.1", port);
        busy(&mut s, &a_token);
        finish(&mut s).status == 200
    }));
}

#[test]
fn each_source_address_has_its_own_connection_bound_and_a_trusted_proxy_has_none() {
    let env = Env::start_with(|c| c.limits = "  max_connections_per_source: 1\n".into());
    let token = tokens::token(TENANT_A);
    let port = env.proxy.port;
    let mut first = connect_from("127.0.0.1", port);
    busy(&mut first, &token);
    env.proxy.wait_connections_open(1);
    // Another connection from the same address is refused; another address is served.
    assert_refused(connect_from("127.0.0.1", port), &token);
    let mut other = connect_from("127.0.0.2", port);
    busy(&mut other, &token);
    assert_eq!(finish(&mut other).status, 200);
    assert_eq!(finish(&mut first).status, 200);
    env.proxy.metrics_when(|m| {
        m.contains("fhir_edge_client_connections_refused_total{bound=\"per_source\"} 1")
    });

    // Behind a trusted balancer every client arrives from its address: no per-source bound there,
    // and what X-Forwarded-For says does not change that.
    let env = Env::start_with(|c| {
        c.limits = "  max_connections_per_source: 1\n".into();
        c.top = "trusted_proxies: [\"127.0.0.1\"]\n".into();
    });
    let port = env.proxy.port;
    let mut held: Vec<_> = (0..3).map(|_| connect_from("127.0.0.1", port)).collect();
    for s in &mut held {
        busy(s, &token);
    }
    for s in &mut held {
        assert_eq!(finish(s).status, 200);
    }
    // An untrusted peer gains nothing by naming other clients.
    let mut untrusted = connect_from("127.0.0.3", port);
    busy(&mut untrusted, &token);
    env.proxy.wait_connections_open(1);
    let mut again = connect_from("127.0.0.3", port);
    busy(&mut again, &token);
    use std::io::Write;
    again
        .write_all(b"X-Forwarded-For: 198.51.100.7\r\n")
        .unwrap();
    assert_eq!(finish(&mut again).status, 503);
    assert_eq!(finish(&mut untrusted).status, 200);
}

#[test]
fn a_pooled_connection_the_server_closed_is_resent_to_the_same_single_node() {
    // The server answers one request per connection and closes the connection when the next one
    // comes: every reused pooled connection fails before any response byte. The request must go
    // again on a new connection to the only node there is, never be refused as if every node were
    // out, and the node stays in rotation (this is not its failure).
    let env = Env::start();
    env.a.set_mode(Mode::OncePerConnection);
    let a = tokens::token(TENANT_A);
    for i in 0..12 {
        let r = get(&env.proxy, &a);
        assert_eq!(r.status, 200, "request {i}: {}", r.body_text());
    }
    let text = env.proxy.admin("/metrics").1;
    let counted = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(counted("fhir_edge_upstreams_down_total{"), 0.0);
    assert_eq!(counted("fhir_edge_upstream_ejections_total{"), 0.0);
    assert!(
        counted("fhir_edge_upstream_node_up{") >= 1.0,
        "the node is in rotation"
    );
}
