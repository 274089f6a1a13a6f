//! Static configuration (`conf/fhir-edge.yaml`, read once at start-up; restart to change).
//!
//! Parse, then validate, then use: the file is read into `serde` structs that reject unknown keys,
//! then every value is checked and converted into [`Settings`], which is all the rest of the crate
//! sees. Validation collects every problem (with file, line and key path) before failing, so
//! `fhir-edge check` reports a broken file in one pass. Relative paths resolve against the directory of
//! the file that names them.

pub mod problems;
pub mod routes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use crate::auth::{TokenCache, Verifier, VerifyKey};
use crate::config::problems::{whole_file, Problems, Source};
use crate::fhir::discovery;
use crate::ops::audit;
use crate::ops::metrics::TenantLabel;
use crate::routing::upstream::{read_ca_file, PeerSettings, Upstream, UpstreamUrl};
use crate::token::keys::{SigningKey, SigningKeys};
use crate::token::{limiter, TokenSettings};

// ---------------------------------------------------------------------------------------------
// The file format. Defaults live in the `Default` impls, one place each.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    listen: Vec<String>,
    #[serde(default)]
    tls_listeners: Vec<FileTlsListener>,
    public_base_url: String,
    routes_file: String,
    #[serde(default)]
    metadata_upstream: Option<String>,
    #[serde(default)]
    metadata_file: Option<String>,
    #[serde(default = "default_metadata_ttl")]
    metadata_ttl_seconds: u64,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    token_endpoint: Option<FileToken>,
    #[serde(default)]
    admin: FileAdmin,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileAdmin {
    listen: String,
    tenant_label: String,
}

impl Default for FileAdmin {
    fn default() -> Self {
        FileAdmin {
            listen: "127.0.0.1:9100".into(),
            tenant_label: "name".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToken {
    #[serde(default = "default_token_path")]
    path: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    authorize_url: Option<String>,
    #[serde(default = "default_management_path")]
    management_path: String,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default = "default_lifetime")]
    lifetime_seconds: u64,
    signing_key: String,
    #[serde(default)]
    previous_signing_keys: Vec<String>,
    clients_file: String,
    #[serde(default = "default_true")]
    grant_type_hyphen_alias: bool,
    #[serde(default)]
    failed_auth: FileFailedAuth,
}

fn default_token_path() -> String {
    "/token".into()
}
fn default_management_path() -> String {
    "/register".into()
}
fn default_lifetime() -> u64 {
    3600
}
fn default_true() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileFailedAuth {
    per_client: u32,
    per_source: u32,
    window_seconds: u64,
}

impl Default for FileFailedAuth {
    fn default() -> Self {
        FileFailedAuth {
            per_client: 10,
            per_source: 50,
            window_seconds: 60,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTlsListener {
    addr: String,
    cert_file: String,
    key_file: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    #[serde(default = "default_leeway")]
    leeway_seconds: u64,
    #[serde(default = "default_max_token_bytes")]
    max_token_bytes: usize,
    #[serde(default = "default_realm")]
    realm: String,
    #[serde(default = "default_token_cache_entries")]
    token_cache_entries: usize,
    #[serde(default)]
    issuers: Vec<FileIssuer>,
}

fn default_metadata_ttl() -> u64 {
    300
}
impl Default for FileAuth {
    fn default() -> Self {
        FileAuth {
            leeway_seconds: default_leeway(),
            max_token_bytes: default_max_token_bytes(),
            realm: default_realm(),
            token_cache_entries: default_token_cache_entries(),
            issuers: Vec::new(),
        }
    }
}

fn default_leeway() -> u64 {
    30
}
fn default_max_token_bytes() -> usize {
    8192
}
fn default_token_cache_entries() -> usize {
    10_000
}
fn default_realm() -> String {
    "fhir-edge".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIssuer {
    issuer: String,
    audience: String,
    #[serde(default)]
    keys: Vec<FileKey>,
    #[serde(default)]
    jwks_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    #[serde(default)]
    kid: Option<String>,
    alg: String,
    #[serde(default)]
    public_key_file: Option<String>,
    #[serde(default)]
    secret_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileLimits {
    max_uri_bytes: usize,
    max_header_bytes: usize,
    max_headers: usize,
    max_body_bytes: usize,
    keepalive_timeout_seconds: u64,
    keepalive_requests: u32,
    header_timeout_seconds: u64,
    body_read_timeout_seconds: u64,
    write_timeout_seconds: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: 10 * 1024 * 1024,
            keepalive_timeout_seconds: 60,
            keepalive_requests: 1000,
            header_timeout_seconds: 10,
            body_read_timeout_seconds: 30,
            write_timeout_seconds: 30,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileServer {
    threads: usize,
    work_stealing: bool,
    grace_period_seconds: u64,
    graceful_shutdown_timeout_seconds: u64,
    upstream_connect_timeout_ms: u64,
    upstream_read_timeout_ms: u64,
    upstream_write_timeout_ms: u64,
    upstream_idle_timeout_ms: u64,
    upstream_keepalive_pool_size: usize,
    upstream_ca_file: Option<String>,
    max_retries: usize,
    pid_file: String,
    upgrade_sock: String,
    reload_debounce_ms: u64,
    reload_poll_seconds: u64,
}

impl Default for FileServer {
    fn default() -> Self {
        FileServer {
            threads: 2,
            work_stealing: false,
            grace_period_seconds: 5,
            graceful_shutdown_timeout_seconds: 5,
            upstream_connect_timeout_ms: 2_000,
            upstream_read_timeout_ms: 30_000,
            upstream_write_timeout_ms: 30_000,
            upstream_idle_timeout_ms: 55_000,
            upstream_keepalive_pool_size: 1024,
            upstream_ca_file: None,
            max_retries: 2,
            pid_file: "/tmp/fhir-edge.pid".into(),
            upgrade_sock: "/tmp/fhir-edge-upgrade.sock".into(),
            reload_debounce_ms: 150,
            reload_poll_seconds: 30,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileLog {
    level: String,
    access: String,
}

impl Default for FileLog {
    fn default() -> Self {
        FileLog {
            level: "info".into(),
            access: "stdout".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The validated settings.

/// The public face of the proxy: what clients see.
#[derive(Debug, Clone)]
pub struct PublicBase {
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
pub struct TlsListener {
    pub addr: SocketAddr,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Request size and connection limits (Pingora's own defaults are loose for an internet edge).
#[derive(Debug, Clone)]
pub struct Limits {
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
}

/// Process and upstream-connection settings.
#[derive(Debug, Clone)]
pub struct ServerSettings {
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

/// Everything `fhir-edge.yaml` says, validated.
pub struct Settings {
    pub config_path: PathBuf,
    pub listen: Vec<SocketAddr>,
    pub tls_listeners: Vec<TlsListener>,
    pub public: PublicBase,
    pub routes_file: PathBuf,
    /// Where `/metadata` comes from (taken by the server when it starts).
    pub metadata: Option<discovery::Source>,
    pub metadata_ttl: Duration,
    pub verifier: Verifier,
    /// Verified tokens, so a re-used token is not verified again (see [`crate::auth::cache`]).
    pub token_cache: TokenCache,
    pub realm: String,
    pub max_token_bytes: usize,
    pub limits: Limits,
    pub server: ServerSettings,
    pub route_defaults: RouteDefaults,
    pub log_level: log::LevelFilter,
    /// The OAuth token endpoint, when configured.
    pub token: Option<TokenSettings>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// Where audit lines go.
    pub access_log: audit::Target,
}

impl Settings {
    /// Reads and validates the config file and the key files it names. The routing table is
    /// loaded separately (it is hot-reloaded), see [`crate::routing`].
    pub fn load(path: &Path) -> Result<Settings, Problems> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| whole_file(path, format!("cannot read: {e}")))?;
        let mut src = Source::new(path, &text);
        let file: FileConfig = match serde_yaml_ng::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                src.yaml_error(&e);
                return Err(Problems(src.problems));
            }
        };
        match validate(file, path, &mut src) {
            Some(s) if src.problems.is_empty() => Ok(s),
            _ => Err(Problems(src.problems)),
        }
    }
}

fn resolve(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

/// Validates every section; returns `None` when a value needed to build `Settings` is missing
/// (its problem is already recorded).
fn validate(f: FileConfig, path: &Path, src: &mut Source) -> Option<Settings> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut listen = Vec::new();
    for (i, a) in f.listen.iter().enumerate() {
        match a.parse::<SocketAddr>() {
            Ok(addr) => listen.push(addr),
            Err(_) => src.at(
                a,
                format!("listen[{i}]"),
                "must be an IP:port address such as 127.0.0.1:8080",
            ),
        }
    }
    let mut tls_listeners = Vec::new();
    for (i, l) in f.tls_listeners.iter().enumerate() {
        let key = format!("tls_listeners[{i}]");
        let addr = l
            .addr
            .parse::<SocketAddr>()
            .map_err(|_| src.at(&l.addr, format!("{key}.addr"), "must be an IP:port address"));
        let cert_file = resolve(dir, &l.cert_file);
        let key_file = resolve(dir, &l.key_file);
        for (name, p, raw) in [
            ("cert_file", &cert_file, &l.cert_file),
            ("key_file", &key_file, &l.key_file),
        ] {
            if let Err(e) = std::fs::metadata(p) {
                src.at(
                    raw,
                    format!("{key}.{name}"),
                    format!("cannot read {}: {e}", p.display()),
                );
            }
        }
        if let Ok(addr) = addr {
            tls_listeners.push(TlsListener {
                addr,
                cert_file,
                key_file,
            });
        }
    }
    if f.listen.is_empty() && f.tls_listeners.is_empty() {
        src.at(
            "listen",
            "listen",
            "at least one listener (listen or tls_listeners) is needed",
        );
    }

    let public = parse_public_base(&f.public_base_url)
        .map_err(|m| src.at(&f.public_base_url, "public_base_url", m))
        .ok();

    let routes_file = resolve(dir, &f.routes_file);

    let limits = validate_limits(&f.limits, src);
    let (server, mut route_defaults) = validate_server(&f.server, dir, src);
    if let (Some(d), Some(p)) = (&mut route_defaults, &public) {
        d.public_base = p.url.clone();
    }
    let tenant_label = match f.admin.tenant_label.as_str() {
        "name" => Some(TenantLabel::Name),
        "guid" => Some(TenantLabel::Guid),
        "off" => Some(TenantLabel::Off),
        other => {
            src.at(other, "admin.tenant_label", "must be name, guid or off");
            None
        }
    };
    if let (Some(d), Some(l)) = (&mut route_defaults, tenant_label) {
        d.tenant_label = l;
    }
    let admin_listen = f
        .admin
        .listen
        .parse::<SocketAddr>()
        .map_err(|_| {
            src.at(
                &f.admin.listen,
                "admin.listen",
                "must be an IP:port address",
            )
        })
        .ok();
    let access_log = match f.log.access.as_str() {
        "stdout" => audit::Target::Stdout,
        "stderr" => audit::Target::Stderr,
        "off" => audit::Target::Off,
        path => audit::Target::File(resolve(dir, path)),
    };

    let metadata = match (&f.metadata_upstream, &f.metadata_file) {
        (Some(u), None) => UpstreamUrl::parse(u)
            .and_then(|url| {
                let addr = url.resolve()?;
                match &route_defaults {
                    Some(d) => Upstream::build(&url, addr, &d.peer_settings(0))
                        .map(|u| Some(discovery::Source::Upstream(Box::new(u)))),
                    None => Ok(None),
                }
            })
            .unwrap_or_else(|m| {
                src.at(u, "metadata_upstream", m);
                None
            }),
        (None, Some(file)) => std::fs::read_to_string(resolve(dir, file))
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|t| {
                serde_json::from_str::<serde_json::Value>(&t).map_err(|e| format!("not JSON: {e}"))
            })
            .and_then(|v| {
                // Check now what the proxy would otherwise only find out when serving it.
                discovery::transform(v.clone(), "", None)
                    .map(|_| Some(discovery::Source::File(v)))
                    .map_err(|p| format!("not a usable CapabilityStatement: {}", p.join("; ")))
            })
            .unwrap_or_else(|m| {
                src.at(file, "metadata_file", m);
                None
            }),
        _ => {
            src.at(
                "metadata",
                "metadata_upstream",
                "give exactly one of metadata_upstream and metadata_file",
            );
            None
        }
    };
    if !(1..=86_400).contains(&f.metadata_ttl_seconds) {
        src.at(
            "metadata_ttl_seconds",
            "metadata_ttl_seconds",
            "must be between 1 and 86400",
        );
    }

    let mut keys = load_issuers(&f.auth, dir, src);
    let token = match (&f.token_endpoint, &public) {
        (Some(t), Some(public)) => validate_token(t, public, dir, src),
        _ => None,
    };
    if let Some(t) = &token {
        // fhir-edge trusts its own issuer, with the same rules as any other.
        keys.extend(t.keys.all().map(|k| VerifyKey {
            kid: Some(k.kid.clone()),
            alg: k.alg,
            key: k.decoding.clone(),
            issuer: t.issuer.clone(),
            audience: t.audience.clone(),
            own: true,
        }));
    }
    if keys.is_empty() {
        src.at(
            "auth",
            "auth.issuers",
            "nothing to trust: configure an issuer under auth.issuers, or a token_endpoint",
        );
    }
    check_key_ids(&keys, src);
    if f.auth.max_token_bytes < 256 || f.auth.max_token_bytes > 64 * 1024 {
        src.at(
            "max_token_bytes",
            "auth.max_token_bytes",
            "must be between 256 and 65536",
        );
    }
    if f.auth.token_cache_entries > 10_000_000 {
        src.at(
            "token_cache_entries",
            "auth.token_cache_entries",
            "must be at most 10000000 (0 turns the cache off)",
        );
    }
    if f.auth.leeway_seconds > 300 {
        src.at(
            "leeway_seconds",
            "auth.leeway_seconds",
            "must be at most 300",
        );
    }
    if f.auth.realm.is_empty()
        || !f
            .auth
            .realm
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        src.at(
            "realm",
            "auth.realm",
            "must be non-empty printable ASCII without quotes or backslashes",
        );
    }

    let log_level = match f.log.level.parse::<log::LevelFilter>() {
        Ok(l) => Some(l),
        Err(_) => {
            src.at(
                &f.log.level,
                "log.level",
                "must be one of off, error, warn, info, debug, trace",
            );
            None
        }
    };

    Some(Settings {
        config_path: path.to_path_buf(),
        listen,
        tls_listeners,
        public: public?,
        routes_file,
        metadata: Some(metadata?),
        metadata_ttl: Duration::from_secs(f.metadata_ttl_seconds),
        verifier: Verifier::new(keys, f.auth.leeway_seconds),
        token_cache: TokenCache::new(f.auth.token_cache_entries, f.auth.leeway_seconds),
        realm: f.auth.realm,
        max_token_bytes: f.auth.max_token_bytes,
        limits: limits?,
        server: server?,
        route_defaults: route_defaults?,
        log_level: log_level?,
        token,
        admin_listen: admin_listen?,
        access_log,
    })
}

fn parse_public_base(s: &str) -> Result<PublicBase, String> {
    let url = UpstreamUrl::parse(s)?;
    Ok(PublicBase {
        url: url.base_url(),
        scheme: if url.tls { "https" } else { "http" }.into(),
        authority: url.authority,
        path: url.base_path,
    })
}

fn validate_limits(l: &FileLimits, src: &mut Source) -> Option<Limits> {
    let before = src.problems.len();
    let mut check = |ok: bool, key: &str, msg: &str| {
        if !ok {
            src.at(key, format!("limits.{key}"), msg);
        }
    };
    check(
        (256..=64 * 1024).contains(&l.max_uri_bytes),
        "max_uri_bytes",
        "must be between 256 and 65536",
    );
    check(
        (1024..=1024 * 1024).contains(&l.max_header_bytes),
        "max_header_bytes",
        "must be between 1024 and 1048576",
    );
    check(
        (8..=256).contains(&l.max_headers),
        "max_headers",
        "must be between 8 and 256",
    );
    check(
        l.max_body_bytes >= 1024,
        "max_body_bytes",
        "must be at least 1024",
    );
    check(
        (1..=3600).contains(&l.keepalive_timeout_seconds),
        "keepalive_timeout_seconds",
        "must be between 1 and 3600",
    );
    check(
        l.keepalive_requests >= 1,
        "keepalive_requests",
        "must be at least 1",
    );
    for (key, v) in [
        ("header_timeout_seconds", l.header_timeout_seconds),
        ("body_read_timeout_seconds", l.body_read_timeout_seconds),
        ("write_timeout_seconds", l.write_timeout_seconds),
    ] {
        check((1..=3600).contains(&v), key, "must be between 1 and 3600");
    }
    (src.problems.len() == before).then_some(Limits {
        max_uri_bytes: l.max_uri_bytes,
        max_header_bytes: l.max_header_bytes,
        max_headers: l.max_headers,
        max_body_bytes: l.max_body_bytes,
        keepalive_timeout_seconds: l.keepalive_timeout_seconds,
        keepalive_requests: l.keepalive_requests,
        header_timeout: Duration::from_secs(l.header_timeout_seconds),
        body_read_timeout: Duration::from_secs(l.body_read_timeout_seconds),
        write_timeout: Duration::from_secs(l.write_timeout_seconds),
    })
}

fn validate_server(
    s: &FileServer,
    dir: &Path,
    src: &mut Source,
) -> (Option<ServerSettings>, Option<RouteDefaults>) {
    let before = src.problems.len();
    let mut check = |ok: bool, key: &str, msg: &str| {
        if !ok {
            src.at(key, format!("server.{key}"), msg);
        }
    };
    check(
        (1..=256).contains(&s.threads),
        "threads",
        "must be between 1 and 256",
    );
    check(
        s.grace_period_seconds <= 600,
        "grace_period_seconds",
        "must be at most 600",
    );
    check(
        s.graceful_shutdown_timeout_seconds <= 600,
        "graceful_shutdown_timeout_seconds",
        "must be at most 600",
    );
    for (key, v) in [
        ("upstream_connect_timeout_ms", s.upstream_connect_timeout_ms),
        ("upstream_read_timeout_ms", s.upstream_read_timeout_ms),
        ("upstream_write_timeout_ms", s.upstream_write_timeout_ms),
        ("upstream_idle_timeout_ms", s.upstream_idle_timeout_ms),
    ] {
        check(
            (1..=3_600_000).contains(&v),
            key,
            "must be between 1 and 3600000",
        );
    }
    check(
        s.upstream_keepalive_pool_size >= 1,
        "upstream_keepalive_pool_size",
        "must be at least 1",
    );
    check(s.max_retries <= 16, "max_retries", "must be at most 16");
    check(
        (10..=10_000).contains(&s.reload_debounce_ms),
        "reload_debounce_ms",
        "must be between 10 and 10000",
    );
    check(
        s.reload_poll_seconds <= 86_400,
        "reload_poll_seconds",
        "must be at most 86400 (0 disables)",
    );
    let ca_der = match &s.upstream_ca_file {
        None => None,
        Some(p) => match read_ca_file(&resolve(dir, p)) {
            Ok(ders) => Some(ders),
            Err(m) => {
                src.at(p, "server.upstream_ca_file", m);
                None
            }
        },
    };
    if src.problems.len() != before {
        return (None, None);
    }
    (
        Some(ServerSettings {
            threads: s.threads,
            work_stealing: s.work_stealing,
            grace_period_seconds: s.grace_period_seconds,
            graceful_shutdown_timeout_seconds: s.graceful_shutdown_timeout_seconds,
            upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
            max_retries: s.max_retries,
            pid_file: s.pid_file.clone(),
            upgrade_sock: s.upgrade_sock.clone(),
            reload_debounce: Duration::from_millis(s.reload_debounce_ms),
            reload_poll: Duration::from_secs(s.reload_poll_seconds),
        }),
        Some(RouteDefaults {
            connect_timeout: Duration::from_millis(s.upstream_connect_timeout_ms),
            read_timeout: Duration::from_millis(s.upstream_read_timeout_ms),
            write_timeout: Duration::from_millis(s.upstream_write_timeout_ms),
            idle_timeout: Duration::from_millis(s.upstream_idle_timeout_ms),
            ca_der,
            public_base: String::new(),
            tenant_label: TenantLabel::Name,
        }),
    )
}

/// Loads every issuer's keys; records a problem for each bad one.
fn load_issuers(auth: &FileAuth, dir: &Path, src: &mut Source) -> Vec<VerifyKey> {
    let mut out: Vec<VerifyKey> = Vec::new();
    for (i, iss) in auth.issuers.iter().enumerate() {
        let key = format!("auth.issuers[{i}]");
        if iss.issuer.is_empty() {
            src.at("issuer:", format!("{key}.issuer"), "must not be empty");
        }
        if iss.audience.is_empty() {
            src.at("audience:", format!("{key}.audience"), "must not be empty");
        }
        let before = out.len();
        for (j, k) in iss.keys.iter().enumerate() {
            let kkey = format!("{key}.keys[{j}]");
            match load_key(k, dir) {
                Ok((alg, dk)) => out.push(VerifyKey {
                    kid: k.kid.clone(),
                    alg,
                    key: dk,
                    issuer: iss.issuer.clone(),
                    audience: iss.audience.clone(),
                    own: false,
                }),
                Err(m) => {
                    let needle = k
                        .public_key_file
                        .as_deref()
                        .or(k.secret_file.as_deref())
                        .unwrap_or(&k.alg);
                    src.at(needle, kkey, m)
                }
            }
        }
        if let Some(jwks) = &iss.jwks_file {
            match load_jwks(&resolve(dir, jwks)) {
                Ok(keys) => out.extend(keys.into_iter().map(|(kid, alg, dk)| VerifyKey {
                    kid,
                    alg,
                    key: dk,
                    issuer: iss.issuer.clone(),
                    audience: iss.audience.clone(),
                    own: false,
                })),
                Err(m) => src.at(jwks, format!("{key}.jwks_file"), m),
            }
        }
        if out.len() == before && iss.keys.is_empty() && iss.jwks_file.is_none() {
            src.at(&iss.issuer, key, "an issuer needs `keys` or `jwks_file`");
        }
    }
    out
}

/// A kid must pick exactly one key, and a token without kid must find at most one kid-less key of its
/// alg.
fn check_key_ids(keys: &[VerifyKey], src: &mut Source) {
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            match (&a.kid, &b.kid) {
                (Some(x), Some(y)) if x == y => {
                    src.at(x, "auth.issuers", format!("kid `{x}` is used by two keys"))
                }
                (None, None) if a.alg == b.alg => src.at(
                    "keys",
                    "auth.issuers",
                    format!(
                        "two {:?} keys without a kid: a token without kid could not choose",
                        a.alg
                    ),
                ),
                _ => {}
            }
        }
    }
}

/// A path below the public base: `/` then segments of unreserved characters.
fn is_endpoint_path(p: &str) -> bool {
    p.len() > 1
        && p.starts_with('/')
        && p[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        })
}

fn validate_token(
    t: &FileToken,
    public: &PublicBase,
    dir: &Path,
    src: &mut Source,
) -> Option<TokenSettings> {
    let before = src.problems.len();
    for (key, p) in [("path", &t.path), ("management_path", &t.management_path)] {
        if !is_endpoint_path(p) {
            src.at(
                p,
                format!("token_endpoint.{key}"),
                "must be a path such as /token (segments of A-Z a-z 0-9 - . _ ~)",
            );
        } else if p == "/metadata" || p.starts_with("/.well-known") {
            src.at(p, format!("token_endpoint.{key}"), "is taken by discovery");
        }
    }
    let (tp, mp) = (&t.path, &t.management_path);
    if tp == mp || tp.starts_with(&format!("{mp}/")) || mp.starts_with(&format!("{tp}/")) {
        src.at(
            mp,
            "token_endpoint.management_path",
            "must not overlap token_endpoint.path",
        );
    }
    let authorize_url = match &t.authorize_url {
        Some(u) => {
            if let Err(m) = UpstreamUrl::parse(u) {
                src.at(u, "token_endpoint.authorize_url", m);
            }
            u.clone()
        }
        None => format!("{}/authorize", public.url),
    };
    let url = match &t.url {
        Some(u) => match UpstreamUrl::parse(u) {
            Ok(_) => u.trim_end_matches('/').to_string(),
            Err(m) => {
                src.at(u, "token_endpoint.url", m);
                String::new()
            }
        },
        None => format!("{}{}", public.url, t.path),
    };
    if !(60..=604_800).contains(&t.lifetime_seconds) {
        src.at(
            "lifetime_seconds",
            "token_endpoint.lifetime_seconds",
            "must be between 60 and 604800",
        );
    }
    let fa = &t.failed_auth;
    if fa.per_client == 0 || fa.per_source == 0 || !(1..=86_400).contains(&fa.window_seconds) {
        src.at(
            "failed_auth",
            "token_endpoint.failed_auth",
            "per_client and per_source must be at least 1, window_seconds between 1 and 86400",
        );
    }
    let active = SigningKey::from_file(&resolve(dir, &t.signing_key))
        .map_err(|m| src.at(&t.signing_key, "token_endpoint.signing_key", m))
        .ok();
    let mut previous = Vec::new();
    for (i, p) in t.previous_signing_keys.iter().enumerate() {
        match SigningKey::from_file(&resolve(dir, p)) {
            Ok(k) => previous.push(k),
            Err(m) => src.at(p, format!("token_endpoint.previous_signing_keys[{i}]"), m),
        }
    }
    let issuer = t.issuer.clone().unwrap_or_else(|| public.url.clone());
    let audience = t.audience.clone().unwrap_or_else(|| public.url.clone());
    if issuer.is_empty() || audience.is_empty() {
        src.at(
            "token_endpoint",
            "token_endpoint",
            "issuer and audience must not be empty",
        );
    }
    if src.problems.len() != before {
        return None;
    }
    Some(TokenSettings {
        path: t.path.clone(),
        url,
        authorize_url,
        management_path: t.management_path.clone(),
        issuer,
        audience,
        lifetime: Duration::from_secs(t.lifetime_seconds),
        keys: SigningKeys::new(active?, previous),
        clients_file: resolve(dir, &t.clients_file),
        grant_type_hyphen_alias: t.grant_type_hyphen_alias,
        failed_auth: limiter::Limits {
            per_client: fa.per_client,
            per_source: fa.per_source,
            window_seconds: fa.window_seconds,
        },
    })
}

fn load_key(k: &FileKey, dir: &Path) -> Result<(Algorithm, DecodingKey), String> {
    let alg: Algorithm = k
        .alg
        .parse()
        .map_err(|_| format!("unsupported alg `{}`", k.alg))?;
    use jsonwebtoken::AlgorithmFamily as F;
    match (alg.family(), &k.public_key_file, &k.secret_file) {
        (F::Hmac, None, Some(secret)) => {
            let bytes = std::fs::read(resolve(dir, secret))
                .map_err(|e| format!("cannot read secret_file: {e}"))?;
            // A trailing newline from `echo … > file` is not part of the secret.
            let trimmed = bytes.trim_ascii_end();
            if trimmed.len() < 32 {
                return Err("HMAC secret must be at least 32 bytes (RFC 7518 §3.2)".into());
            }
            DecodingKey::from_secret(trimmed)
                .map(|dk| (alg, dk))
                .map_err(|e| format!("bad secret: {e}"))
        }
        (F::Hmac, _, _) => Err("HMAC keys need `secret_file` (and no public_key_file)".into()),
        (family, Some(pem), None) => {
            let bytes = std::fs::read(resolve(dir, pem))
                .map_err(|e| format!("cannot read public_key_file: {e}"))?;
            let dk = match family {
                F::Rsa => DecodingKey::from_rsa_pem(&bytes),
                F::Ec => DecodingKey::from_ec_pem(&bytes),
                F::Ed => DecodingKey::from_ed_pem(&bytes),
                _ => return Err("unsupported key family".into()),
            }
            .map_err(|e| format!("public_key_file is not a {family:?} public key in PEM: {e}"))?;
            Ok((alg, dk))
        }
        (_, _, _) => Err("asymmetric keys need `public_key_file` (and no secret_file)".into()),
    }
}

type JwksKey = (Option<String>, Algorithm, DecodingKey);

fn load_jwks(path: &Path) -> Result<Vec<JwksKey>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&text).map_err(|e| format!("not a JWK Set: {e}"))?;
    let mut out = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        // The key must fix its algorithm; a JWK without `alg` would let the token header choose.
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|ka| serde_json::to_value(ka).ok())
            .and_then(|v| v.as_str().and_then(|s| s.parse::<Algorithm>().ok()))
            .ok_or_else(|| format!("keys[{i}] has no signing `alg`"))?;
        let dk = DecodingKey::from_jwk(jwk).map_err(|e| format!("keys[{i}]: {e}"))?;
        if alg.family() == jsonwebtoken::AlgorithmFamily::Hmac
            && dk.try_get_as_bytes().map_or(true, |b| b.len() < 32)
        {
            return Err(format!("keys[{i}]: HMAC secret must be at least 32 bytes"));
        }
        out.push((jwk.common.key_id.clone(), alg, dk));
    }
    if out.is_empty() {
        return Err("contains no keys".into());
    }
    Ok(out)
}
