//! Start-up and shutdown.

use std::time::{Duration, Instant};

use crate::support::proxy::routes_yaml;
use crate::support::{
    client, status_with_token, tokens::token, Proxy, ProxyConfig, StubUpstream, TENANT_A,
};

#[test]
fn sigterm_lets_in_flight_requests_finish_and_exits_within_the_bound() {
    let slow = StubUpstream::start("slow");
    slow.set_delay(Duration::from_secs(2));
    let routes = routes_yaml(&[(TENANT_A, "slow", &slow.url(""), "")]);
    let mut proxy = Proxy::start(ProxyConfig::new(slow.url(""), routes));
    let url = proxy.url("/Patient/1");
    let auth = format!("Bearer {}", token(TENANT_A));
    let inflight: Vec<_> = (0..4)
        .map(|_| {
            let (url, auth) = (url.clone(), auth.clone());
            std::thread::spawn(move || {
                client()
                    .get(url)
                    .header("authorization", auth)
                    .send()
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    // Let the requests reach the upstream, then ask the proxy to stop.
    assert!(crate::support::eventually(Duration::from_secs(3), || slow
        .count()
        == 4));
    let asked = Instant::now();
    proxy.signal("TERM");
    for h in inflight {
        assert_eq!(
            h.join().unwrap().unwrap(),
            200,
            "an in-flight request was dropped"
        );
    }
    // grace 2 s + shutdown timeout 2 s in the test config, plus slack.
    let status = proxy.wait_exit(Duration::from_secs(8));
    assert!(
        status.is_some(),
        "still running {:?} after SIGTERM",
        asked.elapsed()
    );
}

#[test]
fn an_invalid_routing_table_prevents_start_up() {
    let a = StubUpstream::start("a");
    let err = Proxy::try_start(ProxyConfig::new(
        a.url(""),
        "tenants:\n  not-a-guid:\n    name: x\n    upstream: http://127.0.0.1:1\n".into(),
    ))
    .err()
    .expect("fhir-edge started with an invalid routing table");
    assert!(err.contains("not-a-guid"), "{err}");
    assert!(err.contains("routes.yaml:2"), "{err}");
}

#[test]
fn a_tls_listener_serves_the_same_proxy() {
    let a = StubUpstream::start("tenant-a");
    let routes = routes_yaml(&[(TENANT_A, "tenant-a", &a.url(""), "")]);
    let mut cfg = ProxyConfig::new(a.url(""), routes);
    cfg.tls = true;
    let proxy = Proxy::start(cfg);
    let port = proxy.tls_port.unwrap();
    let pem = std::fs::read(crate::support::proxy::fixture("tls/ca.pem")).unwrap();
    let https = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let r = https
        .get(format!("https://localhost:{port}/Patient/1"))
        .header("authorization", format!("Bearer {}", token(TENANT_A)))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-upstream"], "tenant-a");
    assert_eq!(
        https
            .get(format!("https://localhost:{port}/Patient/1"))
            .send()
            .unwrap()
            .status(),
        401
    );
}

#[test]
fn idle_keep_alive_connections_are_closed_after_the_configured_timeout() {
    use std::io::{Read, Write};
    let a = StubUpstream::start("tenant-a");
    a.set_response(
        &[("Content-Type", "application/fhir+json")],
        crate::support::capability_statement(&a.url("")),
    );
    let routes = routes_yaml(&[(TENANT_A, "tenant-a", &a.url(""), "")]);
    let mut cfg = ProxyConfig::new(a.url(""), routes);
    cfg.limits = "  keepalive_timeout_seconds: 1".into();
    let proxy = Proxy::start(cfg);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Idle: the proxy closes the connection (read returns 0) well before our 10 s read timeout.
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => rest.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "the idle connection was not closed within {:?}",
        started.elapsed()
    );
}

/// Pingora's zero-downtime upgrade: a new process started with `--upgrade` receives the listening
/// sockets when the old one gets SIGQUIT; the old one finishes what it has and exits. Requests keep
/// being answered throughout (no connection is refused).
#[test]
fn sigquit_hands_the_listeners_to_an_upgraded_process_without_failing_a_request() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let a = StubUpstream::start("tenant-a");
    let routes = routes_yaml(&[(TENANT_A, "tenant-a", &a.url(""), "")]);
    let mut old = Proxy::start(ProxyConfig::new(a.url(""), routes));
    let mut new = old.spawn_upgrade();
    let sock = old.dir.path().join("upgrade.sock");
    assert!(
        crate::support::eventually(Duration::from_secs(10), || sock.exists()),
        "the new process never waited for sockets"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = load_until(stop.clone(), old.url("/Patient/1"));
    std::thread::sleep(Duration::from_millis(300));
    old.signal("QUIT");
    handover_failed_nothing(&mut old, &stop, load);
    assert!(
        matches!(new.try_wait(), Ok(None)),
        "the upgraded process is not running"
    );
    let r = client()
        .get(old.url("/Patient/1"))
        .header("authorization", format!("Bearer {}", token(TENANT_A)))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "the upgraded process does not serve");
    let _ = new.kill();
    let _ = new.wait();
}

/// `THP_enabled` of `/proc/{pid}/status`: 0 once transparent huge pages are turned off for it.
fn thp_enabled(pid: u32) -> u8 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("THP_enabled:"));
    line.expect("the kernel reports THP_enabled")
        .trim()
        .parse()
        .unwrap()
}

/// mimalloc asks for 2 MiB pages, which cost ~8–10 MiB of resident memory for nothing; the proxy turns
/// them off for itself unless `MIMALLOC_ALLOW_THP` is set (mimalloc's own switch, which then decides).
#[test]
fn transparent_huge_pages_are_off_unless_mimalloc_allow_thp_is_set() {
    let up = StubUpstream::start("thp");
    let routes = routes_yaml(&[(TENANT_A, "a", &up.url(""), "")]);
    let default = Proxy::start(ProxyConfig::new(up.url(""), routes.clone()));
    assert_eq!(thp_enabled(default.pid()), 0);
    let (status, _) = status_with_token(&default, "/Patient/1", &token(TENANT_A));
    assert_eq!(status, 200, "the proxy serves as before");

    // With the switch set to 1 the proxy leaves the process as it was started: like this test.
    let mut cfg = ProxyConfig::new(up.url(""), routes);
    cfg.env.push(("MIMALLOC_ALLOW_THP".into(), "1".into()));
    let allowed = Proxy::start(cfg);
    assert_eq!(thp_enabled(allowed.pid()), thp_enabled(std::process::id()));
}

/// Sends SIGTERM (then SIGKILL) to a process the test did not start itself when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let pid = self.0.to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        std::thread::sleep(Duration::from_millis(500));
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status();
    }
}

/// The parent pid of `pid` (`/proc/{pid}/stat`, the field after the state).
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 1..];
    after_name
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// Requests on fresh connections every 20 ms until `stop` (so every request meets whichever
/// process accepts now); their statuses.
fn load_until(
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    url: String,
) -> std::thread::JoinHandle<Vec<u16>> {
    let auth = format!("Bearer {}", token(TENANT_A));
    std::thread::spawn(move || {
        let mut statuses = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let c = reqwest::blocking::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            statuses.push(
                c.get(&url)
                    .header("authorization", &auth)
                    .send()
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0),
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        statuses
    })
}

/// Waits for the old process to hand over and exit (it keeps its in-flight work for Pingora's 5 s
/// close timeout, then drains: grace 2 s, shutdown timeout 2 s in the test config), then stops the
/// load and checks that every request on a fresh connection throughout got 200.
fn handover_failed_nothing(
    old: &mut Proxy,
    stop: &std::sync::atomic::AtomicBool,
    load: std::thread::JoinHandle<Vec<u16>>,
) {
    assert!(
        old.wait_exit(Duration::from_secs(15)).is_some(),
        "the old process did not exit"
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = load.join().unwrap();
    assert!(
        statuses.len() > 50,
        "too few requests during the handover: {}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|&s| s == 200),
        "failed requests during the upgrade: {statuses:?}"
    );
}

#[test]
fn sigusr2_starts_the_successor_itself_which_becomes_the_services_main_process() {
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::AtomicBool;
    let a = StubUpstream::start("tenant-a");
    let routes = routes_yaml(&[(TENANT_A, "tenant-a", &a.url(""), "")]);
    // systemd's side of Type=notify: a datagram socket named by NOTIFY_SOCKET.
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let next_message = || {
        let mut b = [0u8; 512];
        let n = notify.recv(&mut b).expect("a notification");
        String::from_utf8_lossy(&b[..n]).to_string()
    };
    let main_pid = |m: &str| -> u32 {
        m.lines()
            .find_map(|l| l.strip_prefix("MAINPID="))
            .expect("MAINPID=")
            .parse()
            .unwrap()
    };
    let mut cfg = ProxyConfig::new(a.url(""), routes);
    cfg.env
        .push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
    let mut old = Proxy::start(cfg);
    let ready = next_message();
    assert!(ready.contains("READY=1"), "{ready}");
    assert_eq!(main_pid(&ready), old.pid());

    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let load = load_until(stop.clone(), old.url("/Patient/1"));
    std::thread::sleep(Duration::from_millis(300));
    old.signal("USR2");
    // The successor says it is ready and is the main process now; the old one started it, so it
    // runs inside the service (systemd accepts MAINPID= only from the service's own processes).
    let handed = next_message();
    assert!(handed.contains("READY=1"), "{handed}");
    let new_pid = main_pid(&handed);
    let _successor = KillOnDrop(new_pid);
    assert_ne!(new_pid, old.pid());
    assert_eq!(parent_of(new_pid), old.pid());
    handover_failed_nothing(&mut old, &stop, load);
    assert_eq!(
        status_with_token(&old, "/Patient/1", &token(TENANT_A)).0,
        200,
        "the successor does not serve"
    );
}

#[test]
fn a_successor_that_cannot_start_leaves_the_running_process_serving() {
    let a = StubUpstream::start("tenant-a");
    let routes = routes_yaml(&[(TENANT_A, "tenant-a", &a.url(""), "")]);
    let mut old = Proxy::start(ProxyConfig::new(a.url(""), routes));
    // The configuration on disk is broken by the time of the upgrade.
    let conf = old.dir.path().join("fhir-edge.yaml");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{text}\nno_such_key: 1\n")).unwrap();
    old.signal("USR2");
    assert!(
        crate::support::eventually(Duration::from_secs(20), || old
            .logs()
            .contains("upgrade abandoned")),
        "{}",
        old.logs()
    );
    assert!(old.is_running());
    assert_eq!(
        status_with_token(&old, "/Patient/1", &token(TENANT_A)).0,
        200
    );
}
