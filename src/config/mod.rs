//! Static configuration: [`Settings`] (the file format, plain data) is validated into [`Config`] (what
//! the rest of the crate reads).
//!
//! Parse, then validate, then use. Validation collects every problem (with file, line and key path)
//! before failing, so `fhir-edge check` reports a broken file in one pass. It reads the files the
//! config names (keys, a metadata file, a CA bundle) but resolves no host names and builds no
//! upstream peers: that happens when the edge is built ([`crate::edge`]), so a config can be checked
//! off its network. Relative paths resolve against the directory of the file that names them.

mod issuers;
pub(crate) mod limits;
pub(crate) mod portal;
pub(crate) mod problems;
pub(crate) mod routes;
pub(crate) mod schema;
pub(crate) mod settings;
mod token;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::auth::{TokenCache, Verifier};
use crate::config::problems::{whole_file, Problems, Source};
use crate::ops::audit;
use crate::ops::metrics::TenantLabel;
use crate::routing::upstream::{PeerSettings, UpstreamUrl};
use crate::token::TokenSettings;

pub(crate) use settings::Settings;

/// Where the CapabilityStatement served at `{base}/metadata` comes from.
#[derive(Debug, Clone)]
pub(crate) enum MetadataSource {
    /// An upstream FHIR server's own `/metadata` (resolved when the edge is built).
    Upstream(UpstreamUrl),
    /// A checked CapabilityStatement read from a file.
    File(serde_json::Value),
}

/// The public face of the proxy: what clients see.
#[derive(Debug, Clone)]
pub(crate) struct PublicBase {
    /// `https://edge.example.org/fhir` (no trailing slash).
    pub url: String,
    pub scheme: String,
    /// `host[:port]`.
    pub authority: String,
    /// Path part without a trailing slash; empty for the root.
    pub path: String,
}

/// A TLS listener.
#[derive(Debug, Clone)]
pub(crate) struct TlsListener {
    pub addr: SocketAddr,
    /// The default pair first, then the others (chosen by SNI).
    pub pairs: Vec<(PathBuf, PathBuf)>,
    pub http2: bool,
}

/// Request size and connection limits (Pingora's own defaults are loose for an internet edge).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub max_uri_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: usize,
    pub keepalive_timeout_seconds: u64,
    pub keepalive_requests: u32,
    /// Total time allowed to receive one request's header block.
    pub header_timeout: Duration,
    /// Longest wait for each read of a request body.
    pub body_read_timeout: Duration,
    /// Longest wait for each write to the client (a client that stops reading is cut off).
    pub write_timeout: Duration,
    /// Client connections open at once (0: no bound).
    pub max_connections: usize,
    /// Client connections open at once from one source address (0: no bound).
    pub max_connections_per_source: usize,
}

/// Process and upstream-connection settings.
#[derive(Debug, Clone)]
pub(crate) struct ServerConfig {
    pub threads: usize,
    /// One work-stealing runtime for all worker threads (Pingora's default) instead of one runtime
    /// per thread.
    pub work_stealing: bool,
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    pub upstream_keepalive_pool_size: usize,
    pub max_retries: usize,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub reload_debounce: Duration,
    pub reload_poll: Duration,
    pub h2c: bool,
    /// How often upstream host names are resolved again (`None`: never on a timer).
    pub dns_refresh: Option<Duration>,
}

/// Defaults every route starts from (each route may override timeouts, TLS and SNI).
#[derive(Debug, Clone)]
pub struct RouteDefaults {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub ca_der: Option<Vec<Vec<u8>>>,
    /// The public base URL upstream links are rewritten to.
    pub public_base: String,
    /// How routes are named in metric labels.
    pub tenant_label: TenantLabel,
    /// `tenant_limits`: each tenant's limits unless its route says otherwise.
    pub limits: limits::LimitSpec,
    /// When upstream nodes are ejected and return.
    pub health: limits::HealthPolicy,
}

impl RouteDefaults {
    pub fn peer_settings(&self, group_key: u64) -> PeerSettings {
        PeerSettings {
            connect_timeout: self.connect_timeout,
            read_timeout: self.read_timeout,
            write_timeout: self.write_timeout,
            idle_timeout: self.idle_timeout,
            tls_verify: true,
            sni: None,
            ca_der: self.ca_der.clone(),
            group_key,
            public_base: self.public_base.clone(),
            link_bases: Vec::new(),
        }
    }
}

/// Everything `fhir-edge.yaml` says, validated: what the rest of the crate reads.
pub(crate) struct Config {
    pub listen: Vec<SocketAddr>,
    pub tls_listeners: Vec<TlsListener>,
    pub public: PublicBase,
    /// Peers whose `X-Forwarded-For` (and PROXY protocol header) is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Listeners whose connections start with a PROXY protocol header.
    pub proxy_protocol_listeners: Vec<SocketAddr>,
    pub routes_file: PathBuf,
    /// Where `/metadata` comes from (resolved when the edge is built).
    pub metadata: MetadataSource,
    pub metadata_ttl: Duration,
    pub verifier: Verifier,
    /// Verified tokens, so a re-used token is not verified again (see [`crate::auth::cache`]).
    pub token_cache: TokenCache,
    pub realm: String,
    pub max_token_bytes: usize,
    pub limits: Limits,
    pub server: ServerConfig,
    pub route_defaults: RouteDefaults,
    pub log_level: log::LevelFilter,
    /// The OAuth token endpoint, when configured.
    pub token: Option<TokenSettings>,
    /// The registration portal, when configured and enabled.
    pub portal: Option<portal::PortalConfig>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// Where audit lines go.
    pub access_log: audit::Target,
    /// Lines queued for the audit writer before new ones are dropped.
    pub access_queue: usize,
}

impl Config {
    /// Reads the config file and validates it, with problems located in the file's text.
    pub(crate) fn load(path: &Path) -> Result<Config, Problems> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| whole_file(path, format!("cannot read: {e}")))?;
        let settings = Settings::from_yaml(path, &text)?;
        let mut src = Source::new(path, &text);
        Config::validate(settings, &mut src)
    }

    /// Reads only the `database` section of the config file (for `fhir-edge db` and
    /// `fhir-edge clients --store postgres`, whatever store the config itself uses).
    pub(crate) fn load_database(path: &Path) -> Result<crate::db::DbConfig, Problems> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| whole_file(path, format!("cannot read: {e}")))?;
        let settings = Settings::from_yaml(path, &text)?;
        let mut src = Source::new(path, &text);
        let Some(d) = &settings.database else {
            return Err(whole_file(path, "has no `database` section"));
        };
        match token::validate_database(d, &settings.base_dir, &mut src) {
            Some(db) => Ok(db),
            None => Err(Problems(src.problems)),
        }
    }

    /// Validates settings built in code (problems name key paths, with no line numbers).
    pub(crate) fn from_settings(settings: Settings) -> Result<Config, Problems> {
        let origin = settings.base_dir.join("<settings>");
        let mut src = Source::new(&origin, "");
        Config::validate(settings, &mut src)
    }

    fn validate(settings: Settings, src: &mut Source) -> Result<Config, Problems> {
        match validate::validate(settings, src) {
            Some(c) if src.problems.is_empty() => Ok(c),
            _ => Err(Problems(std::mem::take(&mut src.problems))),
        }
    }
}

/// A path named in a file, taken against that file's directory unless absolute.
pub(crate) fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_built_in_code_are_validated_like_a_file_and_name_every_missing_key() {
        let problems = match Config::from_settings(Settings::default()) {
            Ok(_) => panic!("empty settings validated"),
            Err(p) => p.to_string(),
        };
        for key in [
            "public_base_url",
            "routes_file",
            "listen",
            "metadata_upstream",
        ] {
            assert!(problems.contains(key), "{key} not named in:\n{problems}");
        }
    }

    #[test]
    fn the_default_admin_port_is_none_an_exporter_or_prometheus_uses() {
        let addr: SocketAddr = Settings::default().admin.listen.parse().unwrap();
        // Prometheus allocates 9100-9999 to exporters (node_exporter: 9100); 9090-9093 are its own.
        assert!(!(9100..=9999).contains(&addr.port()) && !(9090..=9093).contains(&addr.port()));
        assert!(addr.ip().is_loopback());
    }

    #[test]
    fn a_metadata_host_is_not_resolved_while_validating() {
        let settings = Settings {
            listen: vec!["127.0.0.1:8080".into()],
            public_base_url: "https://edge.example/fhir".into(),
            routes_file: "routes.yaml".into(),
            // `.invalid` never resolves (RFC 6761): validation must not try.
            metadata_upstream: Some("https://fhir.example.invalid/r4".into()),
            ..Settings::default()
        };
        let problems = match Config::from_settings(settings) {
            Ok(_) => String::new(),
            Err(p) => p.to_string(),
        };
        assert!(!problems.contains("metadata_upstream"), "{problems}");
    }
}
