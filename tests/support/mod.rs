//! Test support: a real fhir-edge process, stub FHIR upstreams on 127.0.0.1:0, tokens, raw HTTP.

pub mod pg;
pub mod ports;
pub mod proxy;
pub mod raw;
pub mod tokens;
pub mod upstream;

pub use proxy::{Proxy, ProxyConfig};
pub use upstream::StubUpstream;

use std::time::{Duration, Instant};

/// Tenant GUIDs used across the tests.
pub const TENANT_A: &str = "145f4184-1b0b-41c7-ba24-b3c1291bfda1";
pub const TENANT_B: &str = "3c2f9d6e-8a41-4b7e-9f0d-2a6c5e1b7d34";
pub const TENANT_C: &str = "0b1c2d3e-4f50-4a6b-8c7d-9e0f1a2b3c4d";
/// A well-formed tenant that no routing table in the tests contains.
pub const TENANT_UNKNOWN: &str = "99999999-9999-4999-8999-999999999999";

/// Polls `f` every 25 ms until it returns true or `limit` passes; returns whether it did.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A `KiB` field of `/proc/{pid}/status` (`"VmRSS:"`, `"VmHWM:"`), 0 when it cannot be read.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A GET through the proxy with a bearer token on a fresh connection, for polling loops.
pub fn status_with_token(proxy: &Proxy, path: &str, token: &str) -> (u16, String) {
    let r = raw::get(proxy.port, path, Some(&format!("Bearer {token}")));
    (r.status, r.body_text())
}

/// The usual fixture: a metadata upstream, tenants A and B on their own stub upstreams (A under the
/// base path `/r4`), and a proxy in front.
pub struct Env {
    pub meta: StubUpstream,
    pub a: StubUpstream,
    pub b: StubUpstream,
    pub proxy: Proxy,
}

impl Env {
    pub fn start() -> Env {
        Env::start_with(|_| {})
    }

    /// Starts with the default config after `adjust` has changed it.
    pub fn start_with(adjust: impl FnOnce(&mut ProxyConfig)) -> Env {
        let meta = StubUpstream::start("meta");
        meta.set_response(
            &[("Content-Type", "application/fhir+json")],
            capability_statement(&meta.url("/fhir")),
        );
        let a = StubUpstream::start("tenant-a");
        let b = StubUpstream::start("tenant-b");
        let routes = proxy::routes_yaml(&[
            (TENANT_A, "tenant-a", &a.url("/r4"), ""),
            (TENANT_B, "tenant-b", &b.url(""), ""),
        ]);
        let mut cfg = ProxyConfig::new(meta.url("/fhir"), routes);
        adjust(&mut cfg);
        let proxy = Proxy::start(cfg);
        Env { meta, a, b, proxy }
    }

    /// Upstreams that received anything.
    pub fn upstream_requests(&self) -> usize {
        self.meta.count() + self.a.count() + self.b.count()
    }
}

/// A blocking HTTP client that never follows redirects or pools across tests.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A minimal valid R4 CapabilityStatement, as an upstream at `base` would serve it (with its own,
/// soon replaced, security section).
pub fn capability_statement(base: &str) -> String {
    serde_json::json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-01-01",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "software": {"name": "stub"},
        "implementation": {"description": "stub upstream", "url": base},
        "rest": [{
            "mode": "server",
            "security": {"cors": true, "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": format!("{base}/auth/token")}]
            }]},
            "resource": [
                {"type": "Patient", "profile": {"reference": "http://hl7.org/fhir/StructureDefinition/Patient"},
                 "interaction": [{"code": "read"}, {"code": "search-type"}]},
                {"type": "Observation", "interaction": [{"code": "search-type"}]}
            ]
        }]
    })
    .to_string()
}

/// A registered client: what `fhir-edge clients add` printed.
#[derive(Clone, Debug)]
pub struct Client {
    pub id: String,
    pub secret: String,
    pub secret_id: String,
}

impl Client {
    pub fn from_cli(v: &serde_json::Value) -> Client {
        Client {
            id: v["client_id"].as_str().unwrap().to_string(),
            secret: v["client_secret"].as_str().unwrap().to_string(),
            secret_id: v["secret_id"].as_str().unwrap().to_string(),
        }
    }
}

impl Env {
    /// Registers a client through the CLI (`tenants` empty means `--all-tenants`) and waits until the
    /// running proxy has loaded it.
    pub fn add_client(&self, name: &str, tenants: &[&str]) -> Client {
        let before = self.clients_reloads();
        let mut args = vec!["add", "--name", name];
        if tenants.is_empty() {
            args.push("--all-tenants");
        }
        for t in tenants {
            args.extend(["--tenant", t]);
        }
        let c = Client::from_cli(&self.proxy.clients_cli(&args));
        self.await_clients_reload(before);
        c
    }

    /// POSTs a token request with `form` (already-encoded `name=value` pairs joined by `&`) and
    /// optional HTTP Basic credentials given as the raw `user:pass` string.
    pub fn token_request(&self, form: &str, basic: Option<&str>) -> reqwest::blocking::Response {
        use base64::Engine;
        let mut req = client()
            .post(self.proxy.url("/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string());
        if let Some(b) = basic {
            req = req.header(
                "authorization",
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(b)
                ),
            );
        }
        req.send().unwrap()
    }

    /// A token for `tenant` through client_secret_post; panics unless the endpoint says 200.
    pub fn token_for(&self, c: &Client, tenant: &str) -> String {
        let r = self.token_request(
            &format!(
                "grant_type=client_credentials&client_id={}&client_secret={}&scope={tenant}",
                c.id, c.secret
            ),
            None,
        );
        assert_eq!(
            r.status(),
            200,
            "token request failed: {}",
            r.text().unwrap_or_default()
        );
        let v: serde_json::Value = r.json().unwrap();
        v["access_token"].as_str().unwrap().to_string()
    }

    /// Waits until the running proxy has loaded a client-registry change made on disk.
    pub fn await_clients_reload(&self, generation_before: usize) {
        assert!(
            eventually(Duration::from_secs(3), || {
                self.proxy
                    .logs()
                    .matches("client registry reloaded")
                    .count()
                    > generation_before
            }),
            "the proxy did not reload clients.yaml:\n{}",
            self.proxy.logs()
        );
    }

    pub fn clients_reloads(&self) -> usize {
        self.proxy
            .logs()
            .matches("client registry reloaded")
            .count()
    }

    /// GET `path` with a bearer token; returns the status.
    pub fn fhir_status(&self, path: &str, token: &str) -> u16 {
        client()
            .get(self.proxy.url(path))
            .header("authorization", format!("Bearer {token}"))
            .send()
            .unwrap()
            .status()
            .as_u16()
    }
}

/// The challenge of a 401 for a bad token (RFC 6750 §3.1) with the test config's realm.
pub const INVALID_TOKEN_CHALLENGE: &str = r#"Bearer realm="fhir-edge", error="invalid_token""#;

/// `GET /Patient/123` with `token`: the status and the `WWW-Authenticate` header ("" when absent).
pub fn status_and_challenge(env: &Env, token: &str) -> (u16, String) {
    let r = client()
        .get(env.proxy.url("/Patient/123"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .unwrap();
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.status().as_u16(), www)
}

/// The routing table's generation in a metrics text (0 when absent).
pub fn routes_generation(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("fhir_edge_config_generation{file=\"routes\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}
