//! The real OpenID provider of tests/oidc (npm `oidc-provider`, installed by scripts/setup) as a
//! child process on a free loopback port, stopped when dropped.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::support::client;
use crate::support::ports::free_port;

pub const CLIENT_ID: &str = "fhir-edge-tests-client";
pub const CLIENT_SECRET: &str = "fhir-edge-tests-secret";

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

pub struct OidcProvider {
    pub port: u16,
    child: Option<Child>,
    log_dir: tempfile::TempDir,
    starts: usize,
}

impl OidcProvider {
    /// Starts the provider publishing `keys` (file names in tests/oidc/keys) and signing with
    /// `signing_kid`.
    pub fn start(keys: &[&str], signing_kid: &str) -> OidcProvider {
        let mut p = OidcProvider {
            port: free_port(),
            child: None,
            log_dir: tempfile::tempdir().unwrap(),
            starts: 0,
        };
        p.spawn(keys, signing_kid);
        p
    }

    fn spawn(&mut self, keys: &[&str], signing_kid: &str) {
        assert!(
            oidc_dir().join("node_modules/oidc-provider").is_dir(),
            "tests/oidc/node_modules is missing: run scripts/setup (it runs `npm ci` in tests/oidc)"
        );
        // The port was free a moment ago, or was this provider's until it was stopped: a bind can
        // fail while the old socket is still being closed, so try a few times.
        let mut last_err = String::new();
        for _ in 0..40 {
            self.starts += 1;
            let log = self
                .log_dir
                .path()
                .join(format!("provider-{}.log", self.starts));
            let mut child = Command::new("node")
                .arg(oidc_dir().join("provider.js"))
                .args(["--port", &self.port.to_string()])
                .args(["--keys", &keys.join(",")])
                .args(["--signing-kid", signing_kid])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(fs::File::create(&log).unwrap())
                .spawn()
                .expect("spawn node (scripts/setup installs Node.js)");
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(p) = line.strip_prefix("PORT ") {
                        let _ = tx.send(p.trim().parse::<u16>().ok());
                    }
                }
                let _ = tx.send(None);
            });
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Some(port)) => {
                    assert_eq!(port, self.port);
                    self.child = Some(child);
                    return;
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = fs::read_to_string(&log).unwrap_or_default();
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        panic!("the OpenID provider did not start:\n{last_err}");
    }

    /// Its issuer identifier (no trailing slash), as in its discovery document and tokens.
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer())
    }

    /// An access token (client credentials, client_secret_basic) for `scope`.
    pub fn token(&self, scope: &str) -> String {
        let r = client()
            .post(format!("{}/token", self.issuer()))
            .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
            .form(&[("grant_type", "client_credentials"), ("scope", scope)])
            .send()
            .unwrap();
        let status = r.status();
        let body: serde_json::Value = r.json().unwrap_or_default();
        assert_eq!(status, 200, "token request failed: {body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    /// Signs the next tokens with `kid` (one of the keys it was started with).
    pub fn set_signing_kid(&self, kid: &str) {
        let r = client()
            .post(format!("{}/test/signing-kid?kid={kid}", self.issuer()))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().unwrap_or_default());
    }

    /// Its own request counters since it was (re)started: `{"discovery":n,"jwks":n,"token":n}`.
    pub fn requests(&self) -> serde_json::Value {
        let v: serde_json::Value = client()
            .get(format!("{}/test/state", self.issuer()))
            .send()
            .unwrap()
            .json()
            .unwrap();
        v["requests"].clone()
    }

    /// Stops it: its port then refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it and starts it again on the same port (same issuer) with another key set.
    pub fn restart(&mut self, keys: &[&str], signing_kid: &str) {
        self.stop();
        self.spawn(keys, signing_kid);
    }

    /// What the provider wrote to stderr since its last start.
    pub fn logs(&self) -> String {
        fs::read_to_string(
            self.log_dir
                .path()
                .join(format!("provider-{}.log", self.starts)),
        )
        .unwrap_or_default()
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
    }
}
