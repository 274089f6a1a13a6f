//! Starts the real `fhir-edge` binary on a free loopback port with a config written into a temporary
//! directory, and stops it when dropped. Its stderr goes to a file the test can read.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use tempfile::TempDir;

/// The test issuer every test token claims.
pub const ISSUER: &str = "https://issuer.test/";
pub const AUDIENCE: &str = "fhir-edge-tests";

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// What to start the proxy with. Fields hold YAML text where that is simplest.
pub struct ProxyConfig {
    /// Public base path, e.g. "" or "/fhir".
    pub base_path: String,
    pub metadata_upstream: String,
    /// Full text of routes.yaml.
    pub routes: String,
    /// Extra lines for the `limits:` section (indented by the caller with two spaces).
    pub limits: String,
    /// Extra lines for the `server:` section.
    pub server: String,
    pub log_level: String,
    /// `log.access` (default `access.log` in the proxy's directory) and extra `log:` lines.
    pub access: String,
    pub log_extra: String,
    /// Also listen with TLS (the fixture certificate for localhost/127.0.0.1) on another port.
    pub tls: bool,
    /// Extra entries for `auth.issuers` (YAML list items indented by four spaces).
    pub extra_issuers: String,
    /// Extra top-level config lines (`metadata_ttl_seconds: 1`, …); `@PORT@` and `@TLS_PORT@` become
    /// the plain and TLS listeners' ports.
    pub top: String,
    /// Extra lines for the `admin:` section (`  tenant_label: guid`).
    pub admin: String,
    /// The `token_endpoint` section's body (keys indented by two spaces); `None`: no token endpoint.
    /// The clients file is `clients.yaml` in the proxy's directory, initially empty.
    pub token: Option<String>,
    /// `server.reload_debounce_ms` (100 unless a test needs to tell a debounced reload from an
    /// immediate one).
    pub reload_debounce_ms: u64,
    /// `server.upstream_read_timeout_ms` (5000 unless a test holds an upstream answer longer).
    pub upstream_read_timeout_ms: u64,
    /// Extra environment variables for the proxy process.
    pub env: Vec<(String, String)>,
    /// Another program to start instead of `fhir-edge run` (given `--config PATH` and `args`).
    pub program: Option<PathBuf>,
    pub args: Vec<String>,
}

/// A token endpoint with the fixture ES256 signing key, 5-minute tokens, and a failed-auth limit of 5
/// per client in 3-second windows (so tests can see it trip and recover).
pub fn default_token_section() -> String {
    format!(
        "  signing_key: {}\n  clients_file: clients.yaml\n  lifetime_seconds: 300\n  failed_auth: {{ per_client: 5, per_source: 1000, window_seconds: 3 }}\n",
        fixture("keys/signing-es256.pem").display()
    )
}

impl ProxyConfig {
    pub fn new(metadata_upstream: String, routes: String) -> ProxyConfig {
        ProxyConfig {
            base_path: String::new(),
            metadata_upstream,
            routes,
            limits: String::new(),
            server: String::new(),
            log_level: "info".into(),
            access: "access.log".into(),
            log_extra: String::new(),
            tls: false,
            extra_issuers: String::new(),
            token: None,
            top: String::new(),
            admin: String::new(),
            reload_debounce_ms: 100,
            upstream_read_timeout_ms: 5000,
            env: Vec::new(),
            program: None,
            args: Vec::new(),
        }
    }
}

/// Builds a routes.yaml from (tenant, name, upstream URL, extra YAML lines for the tenant).
pub fn routes_yaml(entries: &[(&str, &str, &str, &str)]) -> String {
    let mut s = String::from("tenants:\n");
    for (tenant, name, upstream, extra) in entries {
        s.push_str(&format!(
            "  {tenant}:\n    name: {name}\n    upstream: \"{upstream}\"\n"
        ));
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            s.push_str(&format!("    {line}\n"));
        }
    }
    s
}

pub struct Proxy {
    pub port: u16,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_port: u16,
    pub dir: TempDir,
    pub base_path: String,
    /// The TLS listener's port, when `tls` was asked for.
    pub tls_port: Option<u16>,
    child: Child,
}

pub use super::ports::free_port;

impl Proxy {
    pub fn start(cfg: ProxyConfig) -> Proxy {
        Self::try_start(cfg).unwrap_or_else(|logs| panic!("fhir-edge did not start:\n{logs}"))
    }

    /// Starts the proxy; `Err` carries its stderr when it exits or never listens.
    pub fn try_start(cfg: ProxyConfig) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let admin_port = free_port();
        let keys = fixture("keys");
        let tls_port = cfg.tls.then(free_port);
        let tls = match tls_port {
            Some(p) => format!(
                "tls_listeners:\n  - {{ addr: \"127.0.0.1:{p}\", cert_file: {c}, key_file: {k} }}\n",
                c = fixture("tls/cert.pem").display(),
                k = fixture("tls/key.pem").display()
            ),
            None => String::new(),
        };
        let yaml = format!(
            r#"listen: ["127.0.0.1:{port}"]
{tls}public_base_url: "http://127.0.0.1:{port}{base}"
routes_file: routes.yaml
{meta}{top}
auth:
  leeway_seconds: 5
  issuers:
    - issuer: "{ISSUER}"
      audience: "{AUDIENCE}"
      tenants: any
      keys:
        - {{ kid: rs1, alg: RS256, public_key_file: {keys}/rs256.pub.pem }}
        - {{ kid: es1, alg: ES256, public_key_file: {keys}/es256.pub.pem }}
        - {{ kid: hs1, alg: HS256, secret_file: {keys}/hs256.secret }}
{extra_issuers}
limits:
{limits}
server:
  threads: 2
  grace_period_seconds: 2
  graceful_shutdown_timeout_seconds: 2
  upstream_connect_timeout_ms: 1000
  upstream_read_timeout_ms: {read_timeout}
  reload_debounce_ms: {debounce}
  pid_file: {dir}/fhir-edge.pid
  upgrade_sock: {dir}/upgrade.sock
{server}
log:
  level: {level}
  access: {access}
{log_extra}
admin:
  listen: "127.0.0.1:{admin_port}"
{admin}
{token}"#,
            base = cfg.base_path,
            meta = if cfg.metadata_upstream.is_empty() {
                String::new()
            } else {
                format!("metadata_upstream: \"{}\"\n", cfg.metadata_upstream)
            },
            // `@PORT@` and `@TLS_PORT@` in the top-level lines name the listeners' ports.
            top = cfg
                .top
                .replace("@PORT@", &port.to_string())
                .replace("@TLS_PORT@", &tls_port.unwrap_or(0).to_string()),
            admin = cfg.admin,
            debounce = cfg.reload_debounce_ms,
            read_timeout = cfg.upstream_read_timeout_ms,
            keys = keys.display(),
            limits = if cfg.limits.is_empty() {
                "  max_body_bytes: 1048576\n  keepalive_requests: 1000000".to_string()
            } else {
                cfg.limits.clone()
            },
            server = cfg.server,
            extra_issuers = cfg.extra_issuers,
            token = cfg
                .token
                .as_ref()
                .map(|t| format!("token_endpoint:\n{t}"))
                .unwrap_or_default(),
            level = cfg.log_level,
            access = cfg.access,
            log_extra = cfg.log_extra,
            dir = dir.path().display(),
        );
        fs::write(dir.path().join("fhir-edge.yaml"), yaml).unwrap();
        fs::write(dir.path().join("routes.yaml"), &cfg.routes).unwrap();
        if cfg.token.is_some() {
            fs::write(dir.path().join("clients.yaml"), "clients: {}\n").unwrap();
        }
        let log = fs::File::create(dir.path().join("stderr.log")).unwrap();
        let out = fs::File::create(dir.path().join("stdout.log")).unwrap();
        let mut command = match &cfg.program {
            Some(p) => Command::new(p),
            None => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_fhir-edge"));
                c.arg("run");
                c
            }
        };
        let mut child = command
            .arg("--config")
            .arg(dir.path().join("fhir-edge.yaml"))
            .args(&cfg.args)
            .envs(cfg.env.iter().map(|(k, v)| (k, v)))
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawn fhir-edge");
        let mut proxy_ok = false;
        for _ in 0..400 {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                proxy_ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let logs = fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
        if !proxy_ok {
            let _ = child.kill();
            let _ = child.wait();
            return Err(logs);
        }
        Ok(Proxy {
            port,
            admin_port,
            tls_port,
            dir,
            base_path: cfg.base_path,
            child,
        })
    }

    pub fn authority(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Absolute URL of `path` below the public base.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}{path}", self.port, self.base_path)
    }

    pub fn routes_path(&self) -> PathBuf {
        self.dir.path().join("routes.yaml")
    }

    pub fn logs(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Everything the process wrote anywhere: stdout, stderr and every file in its directory that
    /// it may have written (the audit log and anything else).
    pub fn every_sink(&self) -> String {
        let mut all = String::new();
        for entry in fs::read_dir(self.dir.path()).unwrap().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                all.push_str(&String::from_utf8_lossy(&fs::read(&p).unwrap_or_default()));
            }
        }
        all
    }

    /// The audit log once it has at least `n` lines (a line is written after its response, so a
    /// client can be faster than the log); panics after 5 s.
    pub fn access_log_at_least(&self, n: usize) -> Vec<serde_json::Value> {
        let mut lines = Vec::new();
        let ok = super::eventually(Duration::from_secs(5), || {
            lines = self.access_log();
            lines.len() >= n
        });
        assert!(
            ok,
            "the audit log has {} lines, expected at least {n}",
            lines.len()
        );
        lines
    }

    /// The audit log, one JSON value per line: the complete lines (the writer, off the request path,
    /// may be in the middle of the last one).
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line is not JSON"))
            .collect()
    }

    /// GET `path` on the admin listener: (status, body).
    pub fn admin(&self, path: &str) -> (u16, String) {
        let r = super::raw::get(self.admin_port, path, None);
        (r.status, r.body_text())
    }

    /// Polls `/metrics` (for up to 3 s) until `ready` holds, and returns the last text read.
    /// Request counters are updated in Pingora's logging phase, which can run just after the
    /// client has read its response, so a test that counts requests waits for them here.
    pub fn metrics_when(&self, ready: impl Fn(&str) -> bool) -> String {
        let mut text = String::new();
        super::eventually(Duration::from_secs(3), || {
            text = self.admin("/metrics").1;
            ready(&text)
        });
        text
    }

    /// Waits until the proxy has admitted exactly `n` client connections (they are admitted by
    /// the task each one gets, so two connections opened in turn may be admitted in either order).
    pub fn wait_connections_open(&self, n: usize) {
        let line = format!("fhir_edge_client_connections {n}\n");
        let text = self.metrics_when(|m| m.contains(&line));
        assert!(text.contains(&line), "never {n} open connections:\n{text}");
    }

    pub fn clients_path(&self) -> PathBuf {
        self.dir.path().join("clients.yaml")
    }

    /// Runs `fhir-edge clients --file <clients.yaml> --json ARGS…` and returns its parsed JSON output
    /// (panics when the command fails).
    pub fn clients_cli(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
            .arg("clients")
            .arg("--file")
            .arg(self.clients_path())
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fhir-edge clients {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Starts a second fhir-edge with the same config and `--upgrade`: it waits on the upgrade socket
    /// for this one's listening sockets (sent on SIGQUIT). Its output goes to `*-upgraded.log`.
    pub fn spawn_upgrade(&self) -> Child {
        let d = self.dir.path();
        Command::new(env!("CARGO_BIN_EXE_fhir-edge"))
            .args(["run", "--upgrade", "--config"])
            .arg(d.join("fhir-edge.yaml"))
            .stdout(fs::File::create(d.join("stdout-upgraded.log")).unwrap())
            .stderr(fs::File::create(d.join("stderr-upgraded.log")).unwrap())
            .spawn()
            .expect("spawn the upgraded fhir-edge")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits up to `limit` for the process to exit; returns its exit status if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
