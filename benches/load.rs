//! Side-by-side load harness (`harness = false`): fhir-edge against direct, nginx and HAProxy-with-JWT
//! on one machine, over loopback, in one run.
//!
//! ```text
//! cargo bench --bench load                 # everything: compare, tenants, token
//! cargo bench --bench load -- compare      # the peer table only
//! cargo bench --bench load -- tenants      # 10 vs 100,000 tenants, reload under load, RSS
//! cargo bench --bench load -- token        # token endpoint rate
//! cargo bench --bench load -- noisy        # tenant B alone vs beside tenant A at 10x its limit
//! ```
//! Needs `wrk`, `hey`, `nginx`, `haproxy` and `taskset` (Debian: `apt-get install wrk hey nginx-light
//! haproxy util-linux`). Environment: `LOAD_SECONDS` (5, per run), `LOAD_ROUNDS` (3), `LOAD_CONNECTIONS`
//! (64), `NOISY_LIMIT` (tenant A's rate limit in `noisy`, 200 req/s), `NOISY_STEADY` (tenant B's
//! steady rate, 500 req/s), `PROXY_CPUS` ("1"), `CLIENT_CPUS` ("0"), `UNIQUE_TOKENS` (5000), `LOAD_RELOADS` (3 timed
//! reloads per load run in `tenants`), `LOAD_KEEP` (keep the work
//! directory), `FHIR_EDGE_BASELINE` (path to another fhir-edge binary, e.g. a copy of the previous
//! build: `compare` then runs it beside this build as peer "baseline" and prints the ratios,
//! `tenants` adds it with the 100,000-tenant YAML table as a fifth proxy, and `token` measures both
//! token endpoints in interleaved rounds).
//!
//! Machines like the 2-core build VMs drift by ±20 % from one run to the next, so every case runs
//! `LOAD_ROUNDS` times, interleaved with the others (all peers stay up side by side), and the table
//! shows medians.
//!
//! How it runs: the proxy under test (fhir-edge, nginx or HAProxy, one worker per proxy CPU) is pinned
//! to `PROXY_CPUS`; the load generator and the upstream (nginx serving a static ~2 KB FHIR Bundle) share
//! `CLIENT_CPUS`. "direct" is the load generator against the upstream alone: the most this client and
//! upstream can do, the limit for any proxy. "pingora bare" is this executable running a Pingora
//! proxy that only forwards (`benches/load/floor.rs`): the framework's own cost, the floor for
//! fhir-edge. Peer configs: `benches/load/`.
#![allow(unreachable_pub)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

#[path = "load/floor.rs"]
mod floor;
// The tests' port picker: below the ephemeral range and never the same port twice, so a peer cannot
// lose its port to another peer's (or wrk's) socket between the check and its own bind.
#[path = "../tests/support/ports.rs"]
mod ports;
use ports::free_port;
// The tests' throwaway PostgreSQL cluster, for the token endpoint with the postgres client store.
#[allow(dead_code)]
#[path = "../tests/support/pg.rs"]
mod pg;

// The same allocator as the fhir-edge binary, for the floor proxy this executable also runs.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ISSUER: &str = "https://issuer.bench/";
const AUDIENCE: &str = "fhir-edge-bench";
const TENANTS: usize = 1_000;
/// The tenant the one-token rows use.
const HOT_TENANT: usize = 500;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn keys_dir() -> PathBuf {
    manifest().join("tests/fixtures/keys")
}

fn tenant(i: usize) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", i + 1, i + 1)
}

fn fill(template: &str, vars: &[(&str, String)]) -> String {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("@{k}@"), v);
    }
    assert!(!out.contains("@DIR@"), "unfilled placeholder");
    out
}

fn template(name: &str) -> String {
    std::fs::read_to_string(manifest().join("benches/load").join(name)).unwrap()
}

#[derive(Clone)]
struct Settings {
    seconds: u64,
    connections: usize,
    rounds: usize,
    proxy_cpus: String,
    client_cpus: String,
    threads: usize,
    unique_tokens: usize,
    dir: PathBuf,
}

/// A child process killed (and reaped) when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Starts `cmd` pinned to `cpus`, with a high open-files limit, output to `{dir}/{name}.log`.
fn spawn(s: &Settings, name: &str, cpus: &str, cmd: &[String], envs: &[(&str, &str)]) -> Proc {
    let log = std::fs::File::create(s.dir.join(format!("{name}.log"))).unwrap();
    let quoted: Vec<String> = cmd.iter().map(|a| format!("'{a}'")).collect();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!(
            "ulimit -n 65536 2>/dev/null; exec taskset -c {cpus} {}",
            quoted.join(" ")
        ))
        .current_dir(&s.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in envs {
        c.env(k, v);
    }
    Proc {
        name: name.to_string(),
        child: c.spawn().unwrap(),
    }
}

/// One HTTP/1.1 request over a fresh connection: the status code.
fn status(port: u16, path: &str, auth: Option<&str>) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.split(' ').nth(1)?.parse().ok()
}

fn wait_ready(p: &mut Proc, port: u16, path: &str, auth: Option<&str>, s: &Settings) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(code)) = p.child.try_wait() {
            let log =
                std::fs::read_to_string(s.dir.join(format!("{}.log", p.name))).unwrap_or_default();
            panic!("{} exited ({code}):\n{log}", p.name);
        }
        if status(port, path, auth) == Some(200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never answered 200 on {path}", p.name);
}

#[derive(Default, Clone)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn parse_duration_ms(v: &str) -> f64 {
    let v = v.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    num.trim().parse::<f64>().unwrap_or(f64::NAN) * scale
}

/// wrk for `seconds` with the settings' connections, pinned to the client CPUs.
fn wrk(
    s: &Settings,
    url: &str,
    token: Option<&str>,
    script: Option<(&Path, &Path)>,
    secs: u64,
) -> Run {
    let mut args = vec![
        "-c".to_string(),
        s.connections.to_string(),
        "-t".into(),
        "1".into(),
        "-d".into(),
        format!("{secs}s"),
        "--latency".into(),
        "--timeout".into(),
        "5s".into(),
    ];
    let mut c = Command::new("taskset");
    c.arg("-c").arg(&s.client_cpus).arg("wrk");
    if let Some(t) = token {
        args.push("-H".into());
        args.push(format!("Authorization: Bearer {t}"));
    }
    if let Some((lua, tokens)) = script {
        args.push("-s".into());
        args.push(lua.display().to_string());
        c.env("TOKENS_FILE", tokens);
    }
    args.push(url.into());
    let out = c.args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> Run {
    let mut r = Run::default();
    let mut in_dist = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            if let Some(v) = t.strip_prefix("50%") {
                r.p50_ms = parse_duration_ms(v);
            } else if let Some(v) = t.strip_prefix("99%") {
                r.p99_ms = parse_duration_ms(v);
                in_dist = false;
            }
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        }
        if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
        if let Some(v) = t.strip_prefix("Socket errors:") {
            r.errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if r.rps == 0.0 {
        eprintln!("wrk printed nothing usable:\n{text}");
    }
    r
}

/// hey at a fixed total rate (coordinated-omission-free enough at well below saturation).
fn hey(s: &Settings, url: &str, token: Option<&str>, rate: f64, secs: u64) -> Run {
    let workers = 16usize;
    let per_worker = (rate / workers as f64).max(1.0).round();
    let mut c = Command::new("taskset");
    c.arg("-c")
        .arg(&s.client_cpus)
        .arg("hey")
        .args(["-z", &format!("{secs}s"), "-c", &workers.to_string()])
        .args(["-q", &format!("{per_worker}")]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = c.arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut r = Run::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        }
        for (pct, slot) in [("50% in ", &mut r.p50_ms), ("99% in ", &mut r.p99_ms)] {
            if let Some(v) = t.strip_prefix(pct) {
                *slot = v
                    .trim_end_matches("secs")
                    .trim()
                    .parse::<f64>()
                    .unwrap_or(f64::NAN)
                    * 1000.0;
            }
        }
        if t.starts_with('[') && t.contains("responses") && !t.starts_with("[200]") {
            r.errors += t
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    if text.contains("Error distribution:") {
        r.errors += 1;
    }
    r
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn read_key(name: &str) -> Vec<u8> {
    std::fs::read(keys_dir().join(name)).unwrap()
}

#[derive(Clone, Copy)]
struct Alg {
    name: &'static str,
    kid: &'static str,
    alg: Algorithm,
}

const ALGS: [Alg; 3] = [
    Alg {
        name: "RS256",
        kid: "rs1",
        alg: Algorithm::RS256,
    },
    Alg {
        name: "ES256",
        kid: "es1",
        alg: Algorithm::ES256,
    },
    Alg {
        name: "HS256",
        kid: "hs1",
        alg: Algorithm::HS256,
    },
];

fn encoding_key(a: Alg) -> EncodingKey {
    match a.alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&read_key("rs256.pem")).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&read_key("es256.pem")).unwrap(),
        _ => EncodingKey::from_secret(read_key("hs256.secret").trim_ascii_end()).unwrap(),
    }
}

/// An access token shaped like fhir-edge's own (scope = the tenant GUID, as in the Teams flow).
fn mint(key: &EncodingKey, a: Alg, tenant_index: usize, n: usize) -> String {
    let mut h = Header::new(a.alg);
    h.kid = Some(a.kid.into());
    h.typ = Some("at+jwt".into());
    let t = now();
    let claims = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "bench-client", "client_id": "bench-client",
        "iat": t, "exp": t + 7200, "jti": format!("bench-{n}"), "scope": tenant(tenant_index),
    });
    encode(&h, &claims, key).unwrap()
}

fn bundle(base: &str) -> String {
    let patient = |id: &str, family: &str| {
        json!({
            "fullUrl": format!("{base}/Patient/{id}"),
            "resource": {
                "resourceType": "Patient", "id": id,
                "meta": {"versionId": "1", "lastUpdated": "2026-11-01T10:00:00Z"},
                "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.1", "value": "999-00-1234"}],
                "name": [{"use": "official", "family": family, "given": ["Alex", "J"]}],
                "gender": "female", "birthDate": "1970-01-01",
                "address": [{"line": ["1 Synthetic Way"], "city": "Springfield", "state": "MA", "postalCode": "01101"}],
                "telecom": [{"system": "phone", "value": "555-0100", "use": "home"}]
            },
            "search": {"mode": "match"}
        })
    };
    let doc = json!({
        "resourceType": "Bundle", "id": "bench-search", "type": "searchset", "total": 4,
        "link": [
            {"relation": "self", "url": format!("{base}/Patient?family=Synthetic&_count=2")},
            {"relation": "next", "url": format!("{base}/Patient?family=Synthetic&_count=2&_page_token=Zm9vYmFy")}
        ],
        "entry": [patient("bench-1", "Synthetic"), patient("bench-2", "Example")]
    });
    serde_json::to_string_pretty(&doc).unwrap()
}

struct Upstream {
    _proc: Proc,
    port: u16,
}

fn start_upstream(s: &Settings) -> Upstream {
    let port = free_port();
    std::fs::create_dir_all(s.dir.join("www")).unwrap();
    std::fs::create_dir_all(s.dir.join("tmp")).unwrap();
    let body = bundle(&format!("http://127.0.0.1:{port}/fhir"));
    std::fs::write(s.dir.join("www/bundle.json"), &body).unwrap();
    let conf = s.dir.join("upstream-nginx.conf");
    std::fs::write(
        &conf,
        fill(
            &template("upstream-nginx.conf"),
            &[
                ("DIR", s.dir.display().to_string()),
                ("PORT", port.to_string()),
            ],
        ),
    )
    .unwrap();
    let mut p = spawn(
        s,
        "upstream-nginx",
        &s.client_cpus,
        &[
            "nginx".into(),
            "-c".into(),
            conf.display().to_string(),
            "-e".into(),
            s.dir.join("upstream-nginx.error.log").display().to_string(),
        ],
        &[],
    );
    wait_ready(&mut p, port, "/fhir/Patient", None, s);
    println!(
        "upstream: nginx, static {}-byte searchset Bundle on 127.0.0.1:{port}",
        body.len()
    );
    Upstream { _proc: p, port }
}

fn routes_yaml(n: usize, upstream_port: u16, name_prefix: &str) -> String {
    let mut out = String::with_capacity(n * 100);
    out.push_str("tenants:\n");
    for i in 0..n {
        let _ = writeln!(
            out,
            "  {}:\n    name: {name_prefix}{i}\n    upstream: \"http://127.0.0.1:{upstream_port}/fhir\"",
            tenant(i)
        );
    }
    out
}

/// [`routes_yaml`] with a leading document marker: the same table (one reader reads both; a build
/// that had a second YAML reader sent this form to the slower one).
fn routes_yaml_marked(n: usize, upstream_port: u16, name_prefix: &str) -> String {
    format!("---\n{}", routes_yaml(n, upstream_port, name_prefix))
}

struct Edge {
    proc: Proc,
    port: u16,
    admin: u16,
    dir: PathBuf,
}

/// The same table written as JSON (valid YAML; fhir-edge parses it with serde_json).
fn routes_json(n: usize, upstream_port: u16, name_prefix: &str) -> String {
    let mut tenants = serde_json::Map::new();
    for i in 0..n {
        tenants.insert(
            tenant(i),
            json!({"name": format!("{name_prefix}{i}"),
                   "upstream": format!("http://127.0.0.1:{upstream_port}/fhir")}),
        );
    }
    serde_json::to_string_pretty(&json!({ "tenants": tenants })).unwrap()
}

fn start_fhir_edge(s: &Settings, up: &Upstream, tenants: usize, cache: usize, tag: &str) -> Edge {
    start_fhir_edge_with(s, routes_yaml(tenants, up.port, "t"), cache, tag)
}

fn start_fhir_edge_with(s: &Settings, routes: String, cache: usize, tag: &str) -> Edge {
    start_fhir_edge_bin(s, env!("CARGO_BIN_EXE_fhir-edge"), routes, cache, tag)
}

/// `bin` is this build's binary, or the `FHIR_EDGE_BASELINE` build the compare mode runs beside it.
fn start_fhir_edge_bin(s: &Settings, bin: &str, routes: String, cache: usize, tag: &str) -> Edge {
    start_fhir_edge_store(s, bin, routes, cache, tag, None)
}

/// With `db_url`, the client registry is in that PostgreSQL database instead of `clients.yaml`.
fn start_fhir_edge_store(
    s: &Settings,
    bin: &str,
    routes: String,
    cache: usize,
    tag: &str,
    db_url: Option<&str>,
) -> Edge {
    let dir = s.dir.join(format!("fhir-edge-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let admin = free_port();
    std::fs::write(dir.join("routes.yaml"), routes).unwrap();
    std::fs::write(dir.join("clients.yaml"), "clients: {}\n").unwrap();
    std::fs::write(
        dir.join("metadata.json"),
        json!({"resourceType": "CapabilityStatement", "status": "active", "date": "2026-11-01",
               "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
               "rest": [{"mode": "server", "resource": [{"type": "Patient",
                   "interaction": [{"code": "read"}, {"code": "search-type"}]}]}]})
        .to_string(),
    )
    .unwrap();
    let conf = dir.join("fhir-edge.yaml");
    // A baseline build older than a config key this build's template uses reads its own template.
    let own_template = std::env::var("FHIR_EDGE_BASELINE_TEMPLATE")
        .ok()
        .filter(|_| bin != env!("CARGO_BIN_EXE_fhir-edge"));
    let mut text = match own_template {
        Some(path) => std::fs::read_to_string(path).unwrap(),
        None => template("fhir-edge.yaml"),
    };
    if db_url.is_some() {
        text = text.replace(
            "  clients_file: clients.yaml",
            "  clients: { store: postgres }",
        );
        text.push_str("database:\n  url_env: FHIR_EDGE_BENCH_DATABASE_URL\n");
    }
    std::fs::write(
        &conf,
        fill(
            &text,
            &[
                ("DIR", dir.display().to_string()),
                ("PORT", port.to_string()),
                ("ADMIN_PORT", admin.to_string()),
                ("THREADS", s.threads.to_string()),
                ("TOKEN_CACHE", cache.to_string()),
                ("ISSUER", ISSUER.into()),
                ("AUDIENCE", AUDIENCE.into()),
                ("KEYS", keys_dir().display().to_string()),
            ],
        ),
    )
    .unwrap();
    let mut p = spawn(
        s,
        &format!("fhir-edge-{tag}"),
        &s.proxy_cpus,
        &[
            bin.into(),
            "run".into(),
            "--config".into(),
            conf.display().to_string(),
        ],
        &db_url
            .map(|u| vec![("FHIR_EDGE_BENCH_DATABASE_URL", u)])
            .unwrap_or_default(),
    );
    wait_ready(&mut p, port, "/fhir/metadata", None, s);
    Edge {
        proc: p,
        port,
        admin,
        dir,
    }
}

fn start_nginx_proxy(s: &Settings, up: &Upstream) -> (Proc, u16) {
    let port = free_port();
    let conf = s.dir.join("nginx-proxy.conf");
    std::fs::write(
        &conf,
        fill(
            &template("nginx-proxy.conf"),
            &[
                ("DIR", s.dir.display().to_string()),
                ("PORT", port.to_string()),
                ("UPSTREAM_PORT", up.port.to_string()),
                ("THREADS", s.threads.to_string()),
            ],
        ),
    )
    .unwrap();
    let mut p = spawn(
        s,
        "nginx-proxy",
        &s.proxy_cpus,
        &[
            "nginx".into(),
            "-c".into(),
            conf.display().to_string(),
            "-e".into(),
            s.dir.join("nginx-proxy.error.log").display().to_string(),
        ],
        &[],
    );
    wait_ready(&mut p, port, "/fhir/Patient", None, s);
    (p, port)
}

/// The bare Pingora proxy (`floor.rs`), run by this executable: `chunked` re-frames responses.
fn start_floor(s: &Settings, up: &Upstream, chunked: bool) -> (Proc, u16) {
    let port = free_port();
    let framing = if chunked { "chunked" } else { "plain" };
    let exe = std::env::current_exe().unwrap();
    let mut p = spawn(
        s,
        &format!("pingora-floor-{framing}"),
        &s.proxy_cpus,
        &[
            exe.display().to_string(),
            "floor".into(),
            format!("127.0.0.1:{port}"),
            format!("127.0.0.1:{}", up.port),
            s.threads.to_string(),
            framing.into(),
        ],
        &[],
    );
    wait_ready(&mut p, port, "/fhir/Patient", None, s);
    (p, port)
}

fn start_haproxy(s: &Settings, up: &Upstream) -> (Proc, u16) {
    let port = free_port();
    let mut map = String::new();
    let mut backends = String::new();
    for i in 0..TENANTS {
        let _ = writeln!(map, "{} t{i}", tenant(i));
        let _ = writeln!(
            backends,
            "\nbackend t{i}\n    server up 127.0.0.1:{}",
            up.port
        );
    }
    std::fs::write(s.dir.join("tenants.map"), map).unwrap();
    let secret = String::from_utf8(read_key("hs256.secret"))
        .unwrap()
        .trim()
        .to_string();
    let conf = s.dir.join("haproxy.cfg");
    let text = fill(
        &template("haproxy.cfg"),
        &[
            ("DIR", s.dir.display().to_string()),
            ("PORT", port.to_string()),
            ("UPSTREAM_PORT", up.port.to_string()),
            ("THREADS", s.threads.to_string()),
            ("KEYS", keys_dir().display().to_string()),
            ("HS256_SECRET", secret),
            ("ISSUER", ISSUER.into()),
            ("AUDIENCE", AUDIENCE.into()),
        ],
    ) + &backends;
    std::fs::write(&conf, text).unwrap();
    let check = Command::new("haproxy")
        .args(["-c", "-q", "-f"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut p = spawn(
        s,
        "haproxy",
        &s.proxy_cpus,
        &[
            "haproxy".into(),
            "-db".into(),
            "-f".into(),
            conf.display().to_string(),
        ],
        &[],
    );
    wait_ready(&mut p, port, "/fhir/metadata", None, s);
    (p, port)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The most the process has ever had resident (`VmHWM`): what a memory limit must allow.
fn peak_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The fhir-edge process itself (`sh -c exec` keeps the pid, so the child's pid is fhir-edge's).
fn metric(admin: u16, series: &str) -> Option<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", admin)).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

struct Tokens {
    one: BTreeMap<&'static str, String>,
    files: BTreeMap<&'static str, PathBuf>,
}

fn mint_all(s: &Settings) -> Tokens {
    let started = Instant::now();
    let mut one = BTreeMap::new();
    let mut files = BTreeMap::new();
    for a in ALGS {
        let key = encoding_key(a);
        one.insert(a.name, mint(&key, a, HOT_TENANT, 0));
        let path = s.dir.join(format!("tokens-{}.txt", a.name));
        let mut text = String::new();
        for n in 0..s.unique_tokens {
            text.push_str(&mint(&key, a, n % TENANTS, n + 1));
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();
        files.insert(a.name, path);
    }
    println!(
        "minted 3 x {} unique tokens in {:.1} s",
        s.unique_tokens,
        started.elapsed().as_secs_f64()
    );
    Tokens { one, files }
}

struct Row {
    peer: String,
    tokens: String,
    run: Run,
}

fn print_table(title: &str, rows: &[Row], direct_rps: f64) {
    println!("\n{title}");
    println!(
        "| {:<22} | {:<14} | {:>9} | {:>8} | {:>8} | {:>8} | {:>6} |",
        "peer", "tokens", "req/s", "p50 ms", "p99 ms", "/direct", "errors"
    );
    println!(
        "|{:-<24}|{:-<16}|{:->11}|{:->10}|{:->10}|{:->10}|{:->8}|",
        "", "", "", "", "", "", ""
    );
    for r in rows {
        println!(
            "| {:<22} | {:<14} | {:>9.0} | {:>8.2} | {:>8.2} | {:>8.2} | {:>6} |",
            r.peer,
            r.tokens,
            r.run.rps,
            r.run.p50_ms,
            r.run.p99_ms,
            r.run.rps / direct_rps,
            r.run.errors
        );
    }
}

/// What a case sends.
#[derive(Clone)]
enum Auth {
    /// The same token on every request (or none, for peers that ignore it).
    One(Option<String>),
    /// The next token from this file on each request (wrk Lua script).
    PerRequest(PathBuf),
}

struct Case {
    peer: String,
    tokens: &'static str,
    port: u16,
    auth: Auth,
    /// The fhir-edge admin port, to count token-cache hits during this case's runs.
    admin: Option<u16>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median of each field over the rounds; errors are summed.
fn combine(runs: &[Run]) -> Run {
    Run {
        rps: median(runs.iter().map(|r| r.rps).collect()),
        p50_ms: median(runs.iter().map(|r| r.p50_ms).collect()),
        p99_ms: median(runs.iter().map(|r| r.p99_ms).collect()),
        errors: runs.iter().map(|r| r.errors).sum(),
    }
}

/// One row per case: its runs combined into medians.
fn table_rows<'a>(cases: impl IntoIterator<Item = &'a Case>, runs: &[Vec<Run>]) -> Vec<Row> {
    cases
        .into_iter()
        .zip(runs)
        .map(|(c, r)| Row {
            peer: c.peer.clone(),
            tokens: c.tokens.into(),
            run: combine(r),
        })
        .collect()
}

const HITS: &str = r#"fhir_edge_token_cache_lookups_total{result="hit"}"#;
/// Throwaway tokens sent once before the rounds (twice the per-request rows' cache), numbered apart
/// from the token files' `jti`s.
const CACHE_FILL: usize = 200;
const FILL_JTI: usize = 1_000_000;

fn compare(s: &Settings) {
    println!(
        "\n== compare: {} rounds x {} s per case (interleaved), {} connections, proxies on CPU {} ({} worker(s)), client+upstream on CPU {}",
        s.rounds, s.seconds, s.connections, s.proxy_cpus, s.threads, s.client_cpus
    );
    let tokens = mint_all(s);
    let lua = manifest().join("benches/load/tokens.lua");
    let up = start_upstream(s);
    let path = "/fhir/Patient?family=Synthetic&_count=2";
    // All peers run side by side (idle ones cost nothing), so rounds can interleave them.
    let (_nginx, nginx_port) = start_nginx_proxy(s, &up);
    let (_haproxy, haproxy_port) = start_haproxy(s, &up);
    // The framework floor: Pingora doing nothing but forward, as is and re-framed chunked.
    let (_floor, floor_port) = start_floor(s, &up, false);
    let (_floor_chunked, floor_chunked_port) = start_floor(s, &up, true);
    // A 100-entry token cache against thousands of tokens used in turn: the per-request rows miss
    // (the hits are counted and printed), the one-token rows hit.
    let edge = start_fhir_edge(s, &up, TENANTS, 100, "compare");
    // Another build (e.g. the previous commit's) side by side, to judge a change in one run.
    let baseline = std::env::var("FHIR_EDGE_BASELINE").ok().map(|bin| {
        start_fhir_edge_bin(s, &bin, routes_yaml(TENANTS, up.port, "t"), 100, "baseline")
    });
    // quick_cache's S3-FIFO admits the first entries of a fresh cache to its main queue, where one-off
    // tokens never displace them: fill it with throwaway tokens, so the per-request rows' own tokens
    // all miss (without this ~2 % of the first per-request row's requests hit).
    let fill_key = encoding_key(ALGS[0]);
    for n in 0..CACHE_FILL {
        let t = mint(&fill_key, ALGS[0], n % TENANTS, FILL_JTI + n);
        for port in std::iter::once(edge.port).chain(baseline.as_ref().map(|b| b.port)) {
            assert_eq!(
                status(port, path, Some(&t)),
                Some(200),
                "a fill token was refused"
            );
        }
    }
    for (name, port) in [("HAProxy", haproxy_port), ("fhir-edge", edge.port)] {
        assert_eq!(
            status(port, path, None),
            Some(401),
            "{name} let a request without a token through"
        );
        assert_eq!(
            status(port, path, Some("e30.e30.e30")),
            Some(401),
            "{name} accepted a garbage token"
        );
        for a in ALGS {
            assert_eq!(
                status(port, path, Some(&tokens.one[a.name])),
                Some(200),
                "{name} refused a good {} token",
                a.name
            );
        }
    }
    let mut cases = vec![
        Case {
            peer: "direct (no proxy)".into(),
            tokens: "-",
            port: up.port,
            auth: Auth::One(Some(tokens.one["RS256"].clone())),
            admin: None,
        },
        Case {
            peer: "direct (no proxy)".into(),
            tokens: "per-request",
            port: up.port,
            auth: Auth::PerRequest(tokens.files["RS256"].clone()),
            admin: None,
        },
        Case {
            peer: "nginx (no auth)".into(),
            tokens: "-",
            port: nginx_port,
            auth: Auth::One(None),
            admin: None,
        },
        Case {
            peer: "nginx (no auth)".into(),
            tokens: "per-request",
            port: nginx_port,
            auth: Auth::PerRequest(tokens.files["RS256"].clone()),
            admin: None,
        },
        Case {
            peer: "pingora bare".into(),
            tokens: "-",
            port: floor_port,
            auth: Auth::One(None),
            admin: None,
        },
        Case {
            peer: "pingora bare, chunked".into(),
            tokens: "-",
            port: floor_chunked_port,
            auth: Auth::One(None),
            admin: None,
        },
    ];
    let mut peers = vec![
        ("haproxy-jwt", haproxy_port, None),
        ("fhir-edge", edge.port, Some(edge.admin)),
    ];
    if let Some(b) = &baseline {
        peers.push(("baseline", b.port, Some(b.admin)));
    }
    for (peer, port, admin) in peers {
        for a in ALGS {
            cases.push(Case {
                peer: format!("{peer} {}", a.name),
                tokens: "one",
                port,
                auth: Auth::One(Some(tokens.one[a.name].clone())),
                admin,
            });
            cases.push(Case {
                peer: format!("{peer} {}", a.name),
                tokens: "per-request",
                port,
                auth: Auth::PerRequest(tokens.files[a.name].clone()),
                admin,
            });
        }
    }
    let run_case = |c: &Case, secs: u64| {
        let url = format!("http://127.0.0.1:{}{path}", c.port);
        match &c.auth {
            Auth::One(t) => wrk(s, &url, t.as_deref(), None, secs),
            Auth::PerRequest(f) => wrk(s, &url, None, Some((&lua, f)), secs),
        }
    };
    for c in &cases {
        run_case(c, 1); // warm-up: connections, pools, caches
    }
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); cases.len()];
    let mut hits = vec![0.0; cases.len()];
    for round in 0..s.rounds {
        for (i, c) in cases.iter().enumerate() {
            let before = c.admin.and_then(|a| metric(a, HITS)).unwrap_or(0.0);
            let r = run_case(c, s.seconds);
            hits[i] += c.admin.and_then(|a| metric(a, HITS)).unwrap_or(0.0) - before;
            runs[i].push(r);
        }
        println!("round {} of {} done", round + 1, s.rounds);
    }
    for (c, h) in cases.iter().zip(&hits) {
        if c.admin.is_some() && c.tokens == "per-request" {
            println!(
                "{} per-request: {h:.0} token-cache hits in all its rounds",
                c.peer
            );
        }
    }
    println!(
        "fhir-edge RSS after the runs: {} KiB",
        rss_kib(edge.proc.pid())
    );
    let rows = table_rows(&cases, &runs);
    let direct_rps = rows[0].run.rps;
    print_table(
        &format!(
            "Throughput (wrk -t1 -c{} -d{}s, median of {} interleaved rounds; ratio to direct with one token)",
            s.connections, s.seconds, s.rounds
        ),
        &rows,
        direct_rps,
    );
    let find = |peer: &str, tokens: &str| {
        rows.iter()
            .find(|r| r.peer == peer && r.tokens == tokens)
            .map_or(f64::NAN, |r| r.run.rps)
    };
    println!(
        "\nRatios (targets: fhir-edge >= 1.3x HAProxy-JWT for RS256 and ES256, >= 0.8x nginx):"
    );
    for a in ALGS {
        for t in ["one", "per-request"] {
            let e = find(&format!("fhir-edge {}", a.name), t);
            println!(
                "  {} {t:<11}: fhir-edge / haproxy-jwt = {:.2}, fhir-edge / nginx = {:.2}",
                a.name,
                e / find(&format!("haproxy-jwt {}", a.name), t),
                e / find(
                    "nginx (no auth)",
                    if t == "one" { "-" } else { "per-request" }
                )
            );
        }
    }

    println!(
        "\nAgainst bare Pingora (the framework floor, same run): chunked re-framing alone {:.2}x the floor;",
        find("pingora bare, chunked", "-") / find("pingora bare", "-")
    );
    for a in ALGS {
        let e = find(&format!("fhir-edge {}", a.name), "one");
        println!(
            "  {} one token: fhir-edge / bare = {:.2}, fhir-edge / bare chunked = {:.2}",
            a.name,
            e / find("pingora bare", "-"),
            e / find("pingora bare, chunked", "-")
        );
    }

    if baseline.is_some() {
        println!("\nThis build against FHIR_EDGE_BASELINE (same run, same config):");
        for a in ALGS {
            for t in ["one", "per-request"] {
                println!(
                    "  {} {t:<11}: fhir-edge / baseline = {:.2}",
                    a.name,
                    find(&format!("fhir-edge {}", a.name), t)
                        / find(&format!("baseline {}", a.name), t)
                );
            }
        }
    }

    // Latency at a fixed rate: half of fhir-edge's RS256 one-token maximum.
    let rate = (find("fhir-edge RS256", "one") / 2.0).floor();
    println!(
        "\n== latency at a fixed {rate:.0} req/s (hey, 16 workers, median of {} interleaved rounds of {} s)",
        s.rounds, s.seconds
    );
    let lat_cases: Vec<&Case> = cases.iter().filter(|c| c.tokens != "per-request").collect();
    let mut lat_runs: Vec<Vec<Run>> = vec![Vec::new(); lat_cases.len()];
    for _ in 0..s.rounds {
        for (i, c) in lat_cases.iter().enumerate() {
            let token = match &c.auth {
                Auth::One(t) => t.clone(),
                Auth::PerRequest(_) => None,
            };
            lat_runs[i].push(hey(
                s,
                &format!("http://127.0.0.1:{}{path}", c.port),
                token.as_deref(),
                rate,
                s.seconds,
            ));
        }
    }
    let lat = table_rows(lat_cases.iter().copied(), &lat_runs);
    let direct_p99 = lat[0].run.p99_ms;
    println!(
        "| {:<22} | {:>9} | {:>8} | {:>8} | {:>14} | {:>6} |",
        "peer", "req/s", "p50 ms", "p99 ms", "p99 - direct", "errors"
    );
    println!(
        "|{:-<24}|{:->11}|{:->10}|{:->10}|{:->16}|{:->8}|",
        "", "", "", "", "", ""
    );
    for r in &lat {
        println!(
            "| {:<22} | {:>9.0} | {:>8.2} | {:>8.2} | {:>11.2} ms | {:>6} |",
            r.peer,
            r.run.rps,
            r.run.p50_ms,
            r.run.p99_ms,
            r.run.p99_ms - direct_p99,
            r.run.errors
        );
    }
}

/// Tenant isolation: tenant B at a steady rate alone ("solo"), beside a control load, and beside
/// tenant A driven at ten times A's rate limit, in interleaved rounds against one fhir-edge. B's
/// throughput and p99 should stay within 10 % of its solo figures. Both load generators share
/// `CLIENT_CPUS` with the upstream, as in every mode; the control (the same second generator aimed
/// at the upstream directly, not at the proxy) shows how much of a change is that contention.
fn noisy(s: &Settings) {
    let limit: f64 = env_or("NOISY_LIMIT", "200").parse().unwrap();
    let steady: f64 = env_or("NOISY_STEADY", "500").parse().unwrap();
    println!(
        "\n== noisy neighbour: tenant B at {steady:.0} req/s, alone and beside tenant A at 10 x its {limit:.0} req/s limit (hey; {} interleaved rounds x {} s, medians)",
        s.rounds, s.seconds
    );
    let up = start_upstream(s);
    let routes = routes_yaml(2, up.port, "t").replacen(
        "    name: t0\n",
        &format!(
            "    name: t0\n    limits: {{ requests_per_second: {limit:.0}, burst: {limit:.0} }}\n"
        ),
        1,
    );
    let e = start_fhir_edge_with(s, routes, 10_000, "noisy");
    let key = encoding_key(ALGS[0]);
    let (token_a, token_b) = (mint(&key, ALGS[0], 0, 0), mint(&key, ALGS[0], 1, 1));
    let path = "/fhir/Patient?family=Synthetic&_count=2";
    let url = format!("http://127.0.0.1:{}{path}", e.port);
    assert_eq!(status(e.port, path, Some(&token_b)), Some(200));
    // The control: the same second load generator, aimed at the upstream itself instead of the
    // proxy. It costs the client CPU what tenant A's does, so B beside it shows what the harness
    // adds, and B beside A what the proxy adds on top.
    let direct = format!("http://127.0.0.1:{}{path}", up.port);
    let (mut solo, mut control, mut beside, mut noisy_runs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let throttled = r#"fhir_edge_throttled_requests_total{limit="rate",tenant="t0"}"#;
    let beside_load = |target: &str, token: Option<String>| {
        let (s2, target) = (s.clone(), target.to_string());
        // The other load starts first and ends last: B's whole run is beside it.
        let other = std::thread::spawn(move || {
            hey(&s2, &target, token.as_deref(), 10.0 * limit, s2.seconds + 2)
        });
        std::thread::sleep(Duration::from_secs(1));
        let b = hey(s, &url, Some(&token_b), steady, s.seconds);
        (b, other.join().unwrap())
    };
    for _ in 0..s.rounds {
        solo.push(hey(s, &url, Some(&token_b), steady, s.seconds));
        control.push(beside_load(&direct, None).0);
        let (b, a) = beside_load(&url, Some(token_a.clone()));
        beside.push(b);
        noisy_runs.push(a);
    }
    let (solo, control, beside, a) = (
        combine(&solo),
        combine(&control),
        combine(&beside),
        combine(&noisy_runs),
    );
    println!(
        "| {:<26} | {:>9} | {:>8} | {:>8} | {:>10} |",
        "case", "req/s", "p50 ms", "p99 ms", "non-200"
    );
    println!(
        "|{:-<28}|{:->11}|{:->10}|{:->10}|{:->12}|",
        "", "", "", "", ""
    );
    for (name, r) in [
        ("B alone", &solo),
        ("B beside the control load", &control),
        ("B beside A", &beside),
        ("A at 10 x its limit", &a),
    ] {
        println!(
            "| {name:<26} | {:>9.0} | {:>8.2} | {:>8.2} | {:>10} |",
            r.rps, r.p50_ms, r.p99_ms, r.errors
        );
    }
    let rps_ratio = beside.rps / solo.rps;
    let p99_ratio = beside.p99_ms / solo.p99_ms;
    let within = |r: f64, worse_above: bool| {
        if (worse_above && r <= 1.10) || (!worse_above && r >= 0.90) {
            "within 10 %"
        } else {
            "NOT within 10 %"
        }
    };
    println!(
        "B beside A / B alone: throughput {rps_ratio:.3} ({}), p99 {p99_ratio:.3} ({}); B's non-200 answers: {}",
        within(rps_ratio, false),
        within(p99_ratio, true),
        beside.errors
    );
    let (c_rps, c_p99) = (beside.rps / control.rps, beside.p99_ms / control.p99_ms);
    println!(
        "B beside A / B beside the control load: throughput {c_rps:.3} ({}), p99 {c_p99:.3} ({})",
        within(c_rps, false),
        within(c_p99, true),
    );
    println!(
        "tenant A: {:.0} requests refused with 429 in all (fhir_edge_throttled_requests_total)",
        metric(e.admin, throttled).unwrap_or(0.0)
    );
}

fn tenants(s: &Settings) {
    println!(
        "\n== tenants: 10 vs 100,000 tenants (RS256, one token; {} interleaved rounds x {} s, medians), reload of 100,000 under load, RSS",
        s.rounds, s.seconds
    );
    let up = start_upstream(s);
    let key = encoding_key(ALGS[0]);
    let token = mint(&key, ALGS[0], 7, 0);
    let path = "/fhir/Patient?family=Synthetic&_count=2";
    type Routes = fn(usize, u16, &str) -> String;
    let mut cases: Vec<(usize, &str, Routes, Option<String>)> = vec![
        (10, "YAML", routes_yaml, None),
        (100_000, "YAML", routes_yaml, None),
        (100_000, "JSON", routes_json, None),
        // The same YAML behind a `---` document marker: must cost what the plain YAML costs.
        (100_000, "YAML after ---", routes_yaml_marked, None),
    ];
    // Another build (e.g. the previous commit's) with the same YAML table, to judge a change.
    if let Ok(bin) = std::env::var("FHIR_EDGE_BASELINE") {
        cases.push((100_000, "YAML, baseline build", routes_yaml, Some(bin)));
    }
    // All side by side, so the rounds can be interleaved.
    let mut edges = Vec::new();
    for (n, form, routes, bin) in cases {
        let tag = format!("t{n}-{}", form.replace([' ', ','], ""));
        let started = Instant::now();
        let table = routes(n, up.port, "t");
        let e = match &bin {
            Some(bin) => start_fhir_edge_bin(s, bin, table, 10_000, &tag),
            None => start_fhir_edge_with(s, table, 10_000, &tag),
        };
        let boot = started.elapsed();
        assert_eq!(status(e.port, path, Some(&token)), Some(200));
        println!(
            "{n:>7} tenants ({form}): serving {:.2} s after start, RSS {:.1} MiB (peak {:.1} MiB)",
            boot.as_secs_f64(),
            rss_kib(e.proc.pid()) as f64 / 1024.0,
            peak_kib(e.proc.pid()) as f64 / 1024.0
        );
        edges.push((n, form, routes, tag, e));
    }
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); edges.len()];
    for round in 0..s.rounds {
        for (i, (_, _, _, _, e)) in edges.iter().enumerate() {
            let url = format!("http://127.0.0.1:{}{path}", e.port);
            if round == 0 {
                wrk(s, &url, Some(&token), None, 1);
            }
            runs[i].push(wrk(s, &url, Some(&token), None, s.seconds));
        }
    }
    let mut rates = Vec::new();
    for ((n, form, _, _, e), r) in edges.iter().zip(&runs) {
        let r = combine(r);
        println!(
            "{n:>7} tenants ({form}): {:.0} req/s, p99 {:.2} ms, errors {}, RSS {:.1} MiB",
            r.rps,
            r.p99_ms,
            r.errors,
            rss_kib(e.proc.pid()) as f64 / 1024.0
        );
        rates.push(r.rps);
    }
    if let [small, yaml, json, general, ..] = rates.as_slice() {
        println!(
            "100,000 / 10 tenants throughput ratio: {:.3} (YAML table), {:.3} (JSON table), {:.3} (YAML after ---)",
            yaml / small,
            json / small,
            general / small
        );
    }
    // Rewrite the whole table (every name changes) under load, time file rename -> new generation
    // visible on the admin listener (a rename is reloaded at once: no debounce window, no settle
    // check), and count failed requests. `LOAD_RELOADS` (3) reloads per load run, 1 s apart. Twice
    // per table form: with wrk saturating the proxy's one core (the reload thread then gets about half
    // of it) and with hey at half of the 100,000-tenant rate (the headroom a proxy is run with).
    let reloads: usize = env_or("LOAD_RELOADS", "3").parse().unwrap();
    let half = (rates.get(1).copied().unwrap_or(1000.0) / 2.0).floor();
    let mut reload_round = 0;
    for (n, form, routes, tag, e) in edges.iter().skip(1) {
        for saturating in [true, false] {
            let load_kind = if saturating {
                "saturating (wrk)"
            } else {
                "half rate (hey)"
            };
            // Long enough for the reloads (YAML ones take seconds under load), then some.
            let secs = s.seconds + 4 * reloads as u64;
            let load = {
                let url = format!("http://127.0.0.1:{}{path}", e.port);
                let token = token.clone();
                let s2 = s.clone();
                std::thread::spawn(move || {
                    if saturating {
                        wrk(&s2, &url, Some(&token), None, secs)
                    } else {
                        hey(&s2, &url, Some(&token), half, secs)
                    }
                })
            };
            std::thread::sleep(Duration::from_secs(s.seconds / 3));
            let gen_series = r#"fhir_edge_config_generation{file="routes"}"#;
            let tmp = e.dir.join("routes.yaml.new");
            let mut visible = Vec::new();
            for _ in 0..reloads {
                reload_round += 1;
                let before = metric(e.admin, gen_series).unwrap_or(0.0);
                // Alternate the names so that every reload changes every tenant.
                let prefix = if reload_round % 2 == 1 {
                    "renamed-"
                } else {
                    "t"
                };
                std::fs::write(&tmp, routes(*n, up.port, prefix)).unwrap();
                let t0 = Instant::now();
                std::fs::rename(&tmp, e.dir.join("routes.yaml")).unwrap();
                while t0.elapsed() < Duration::from_secs(10) {
                    if metric(e.admin, gen_series).unwrap_or(0.0) > before {
                        visible.push(t0.elapsed().as_secs_f64());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            let r = load.join().unwrap();
            let log = std::fs::read_to_string(s.dir.join(format!("fhir-edge-{tag}.log")))
                .unwrap_or_default();
            let mut logged: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("routing table reloaded"))
                .filter_map(|l| l.rsplit_once(", ").map(|(_, ms)| ms.trim_end_matches(')')))
                .collect();
            logged.drain(..logged.len().saturating_sub(reloads));
            let shown: Vec<String> = visible.iter().map(|v| format!("{v:.3}")).collect();
            println!(
                "reload of {n} tenants ({form}), load {load_kind}: visible {} s after the rename ({} of {reloads} seen; median {:.3} s); as logged by the proxy: {}",
                shown.join(" / "),
                visible.len(),
                median(visible.clone()),
                logged.join(", ")
            );
            println!(
                "  requests during that run: {:.0} req/s, {} errors, RSS after {:.1} MiB (peak so far {:.1} MiB)",
                r.rps,
                r.errors,
                rss_kib(e.proc.pid()) as f64 / 1024.0,
                peak_kib(e.proc.pid()) as f64 / 1024.0
            );
        }
    }
}

fn token_rate(s: &Settings) {
    println!("\n== token endpoint: client_credentials, client_secret_post, ES256 tokens");
    let up = start_upstream(s);
    // With `FHIR_EDGE_BASELINE`, that build runs beside this one, rounds interleaved.
    let this = env!("CARGO_BIN_EXE_fhir-edge").to_string();
    // The same build with its client registry in PostgreSQL (a throwaway cluster, schema migrated by
    // the CLI): issuance reads the replica's snapshot, so it should match the file store.
    let db = pg::Postgres::start();
    let db_url = db.url("edge");
    let db_conf = s.dir.join("database.yaml");
    std::fs::write(
        &db_conf,
        "database:\n  url_env: FHIR_EDGE_BENCH_DATABASE_URL\n",
    )
    .unwrap();
    let migrate = Command::new(&this)
        .args(["db", "migrate", "--config"])
        .arg(&db_conf)
        .env("FHIR_EDGE_BENCH_DATABASE_URL", &db_url)
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "db migrate: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let mut edges = vec![
        (
            "this build, clients.yaml",
            this.clone(),
            start_fhir_edge(s, &up, TENANTS, 10_000, "token"),
        ),
        (
            "this build, PostgreSQL",
            this.clone(),
            start_fhir_edge_store(
                s,
                &this,
                routes_yaml(TENANTS, up.port, "t"),
                10_000,
                "token-pg",
                Some(&db_url),
            ),
        ),
    ];
    if let Ok(bin) = std::env::var("FHIR_EDGE_BASELINE") {
        let routes = routes_yaml(TENANTS, up.port, "t");
        let e = start_fhir_edge_bin(s, &bin, routes, 10_000, "token-baseline");
        edges.push(("FHIR_EDGE_BASELINE", bin, e));
    }
    let lua = manifest().join("benches/load/token-request.lua");
    let mut peers = Vec::new();
    for (name, bin, e) in &edges {
        // Each build's own clients CLI registers its client.
        let out = Command::new(bin)
            .args(["clients", "--config"])
            .arg(e.dir.join("fhir-edge.yaml"))
            .args(["--json", "add", "--name", "bench", "--all-tenants"])
            .env("FHIR_EDGE_BENCH_DATABASE_URL", &db_url)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("clients add: {}", String::from_utf8_lossy(&out.stderr)));
        let id = v["client_id"].as_str().unwrap().to_string();
        let secret = v["client_secret"].as_str().unwrap().to_string();
        // Wait for the registry reload.
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric(e.admin, "fhir_edge_clients_registered").unwrap_or(0.0) < 1.0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        peers.push((*name, e, id, secret));
    }
    let run = |port: u16, id: &str, secret: &str, secs: u64| {
        let out = Command::new("taskset")
            .arg("-c")
            .arg(&s.client_cpus)
            .arg("wrk")
            .args([
                "-t1",
                &format!("-c{}", s.connections),
                &format!("-d{secs}s"),
                "--latency",
                "-s",
            ])
            .arg(&lua)
            .arg(format!("http://127.0.0.1:{port}/fhir/token"))
            .env("CLIENT_ID", id)
            .env("CLIENT_SECRET", secret)
            .env("SCOPE", tenant(3))
            .output()
            .unwrap();
        parse_wrk(&String::from_utf8_lossy(&out.stdout))
    };
    let mut results: Vec<Vec<Run>> = peers.iter().map(|_| Vec::new()).collect();
    for (_, e, id, secret) in &peers {
        run(e.port, id, secret, 2);
    }
    for _ in 0..s.rounds {
        for (i, (_, e, id, secret)) in peers.iter().enumerate() {
            results[i].push(run(e.port, id, secret, s.seconds));
        }
    }
    let mut rates = Vec::new();
    for ((name, e, id, _), rs) in peers.iter().zip(&results) {
        let rps = median(rs.iter().map(|r| r.rps).collect());
        let p99 = median(rs.iter().map(|r| r.p99_ms).collect());
        let errors: u64 = rs.iter().map(|r| r.errors).sum();
        let issued = metric(
            e.admin,
            &format!(r#"fhir_edge_tokens_issued_total{{client="{id}"}}"#),
        )
        .unwrap_or(0.0);
        println!(
            "{name}: token endpoint on {} proxy CPU(s): {rps:.0} tokens/s ({:.0} per core; median of {} rounds), p99 {p99:.2} ms, errors {errors}, tokens issued in all {issued:.0}",
            s.threads,
            rps / s.threads as f64,
            rs.len()
        );
        rates.push(rps);
    }
    println!(
        "PostgreSQL / clients.yaml store, tokens/s: {:.2}",
        rates[1] / rates[0]
    );
    if let [this, _, baseline] = rates[..] {
        println!("this build / FHIR_EDGE_BASELINE: {:.2}", this / baseline);
    }
    // The proxy's per-request cost with each store: the same FHIR read with a token each one issued
    // (so every request checks the registry snapshot), rounds interleaved.
    let mut fhir: Vec<Vec<Run>> = vec![Vec::new(), Vec::new()];
    let bearer: Vec<String> = peers[..2]
        .iter()
        .map(|(_, e, id, secret)| issue(e.port, id, secret))
        .collect();
    for _ in 0..s.rounds {
        for (i, (_, e, _, _)) in peers[..2].iter().enumerate() {
            let url = format!("http://127.0.0.1:{}/fhir/Patient", e.port);
            fhir[i].push(wrk(s, &url, Some(&bearer[i]), None, s.seconds));
        }
    }
    let rps: Vec<f64> = fhir
        .iter()
        .map(|rs| median(rs.iter().map(|r| r.rps).collect()))
        .collect();
    let errors: u64 = fhir.iter().flatten().map(|r| r.errors).sum();
    println!(
        "FHIR reads with an issued token: clients.yaml {:.0} req/s, PostgreSQL {:.0} req/s (ratio {:.2}), errors {errors}",
        rps[0],
        rps[1],
        rps[1] / rps[0]
    );
    drop(db);
}

/// An access token from the token endpoint on `port`.
fn issue(port: u16, id: &str, secret: &str) -> String {
    let body = format!(
        "grant_type=client_credentials&client_id={id}&client_secret={secret}&scope={}",
        tenant(3)
    );
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        conn,
        "POST /fhir/token HTTP/1.1\r\nHost: bench\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    let json = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|_| panic!("token response: {text}"));
    v["access_token"].as_str().unwrap().to_string()
}

fn main() {
    // `cargo bench` passes `--bench`; anything else not starting with `-` is a mode.
    let modes: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if let [mode, listen, upstream, threads, framing] = modes.as_slice() {
        if mode == "floor" {
            floor::run(
                listen,
                upstream,
                threads.parse().unwrap(),
                framing == "chunked",
            );
            return;
        }
    }
    for tool in ["wrk", "hey", "nginx", "haproxy", "taskset"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            eprintln!("the load harness needs {tool}: apt-get install wrk hey nginx-light haproxy util-linux");
            std::process::exit(2);
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("fhir-edge-load-")
        .tempdir()
        .unwrap();
    let proxy_cpus = env_or("PROXY_CPUS", "1");
    let threads = proxy_cpus
        .split(',')
        .map(|p| match p.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum();
    let s = Settings {
        seconds: env_or("LOAD_SECONDS", "5").parse().unwrap(),
        connections: env_or("LOAD_CONNECTIONS", "64").parse().unwrap(),
        rounds: env_or("LOAD_ROUNDS", "3").parse().unwrap(),
        proxy_cpus,
        client_cpus: env_or("CLIENT_CPUS", "0"),
        threads,
        unique_tokens: env_or("UNIQUE_TOKENS", "5000").parse().unwrap(),
        dir: dir.path().to_path_buf(),
    };
    println!("fhir-edge load harness; work directory {}", s.dir.display());
    let all = modes.is_empty();
    let want = |m: &str| all || modes.iter().any(|x| x == m);
    if want("compare") {
        compare(&s);
    }
    if want("tenants") {
        tenants(&s);
    }
    if want("token") {
        token_rate(&s);
    }
    if want("noisy") {
        noisy(&s);
    }
    if std::env::var_os("LOAD_KEEP").is_some() {
        println!("kept {}", dir.keep().display());
    }
}
