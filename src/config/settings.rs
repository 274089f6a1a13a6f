//! [`Settings`]: what `conf/fhir-edge.yaml` says, as plain data.
//!
//! This is the file format and the public way to configure an embedded fhir-edge: read it from a file
//! ([`Settings::from_file`]) or build it in code (`Settings { .., ..Settings::default() }`). Nothing
//! here is checked or resolved: [`crate::Edge::new`] validates the whole of it at once and reports every
//! problem. Every struct rejects unknown keys (a misspelt key is an error, not a silent default), and
//! every default lives in one `Default` impl. Relative paths are taken against [`Settings::base_dir`].

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;

use crate::config::problems::{whole_file, Problems, Source};

/// The static configuration of one fhir-edge (restart to change; the routing table and the client
/// registry it names are hot-reloaded).
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Plain-HTTP listeners, `IP:port`.
    pub listen: Vec<String>,
    pub tls_listeners: Vec<TlsListenerSettings>,
    /// What clients call this proxy: `https://edge.example.org/fhir` (required).
    pub public_base_url: String,
    /// Load balancers and proxies (CIDRs or addresses) whose `X-Forwarded-For` is believed: the
    /// client is the right-most address in it that is not one of them.
    pub trusted_proxies: Vec<String>,
    /// Listeners (addresses from `listen` or `tls_listeners`) whose connections start with a PROXY
    /// protocol header (v1 or v2) from a peer in `trusted_proxies`: it gives the client's address.
    pub proxy_protocol_listeners: Vec<String>,
    /// The hot-reloaded routing table, YAML or JSON (required).
    pub routes_file: String,
    /// Where `GET {base}/metadata` comes from: an upstream FHIR base URL, or a file.
    pub metadata_upstream: Option<String>,
    pub metadata_file: Option<String>,
    pub metadata_ttl_seconds: u64,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
    /// Every tenant's request limits unless its route says otherwise (docs/isolation.md).
    pub tenant_limits: crate::config::limits::LimitSpec,
    /// When an upstream node is taken out of rotation, and how it comes back.
    pub upstream_health: crate::config::limits::UpstreamHealthSettings,
    pub server: ServerSettings,
    pub log: LogSettings,
    pub token_endpoint: Option<TokenEndpointSettings>,
    /// The PostgreSQL database a fleet shares (`token_endpoint.clients.store: postgres`).
    pub database: Option<DatabaseSettings>,
    /// The registration portal, where client owners manage their clients (needs `token_endpoint`).
    pub portal: Option<PortalSettings>,
    pub admin: AdminSettings,
    /// The directory relative paths are taken against: the config file's own directory when read from a
    /// file, the working directory otherwise. Not a key of the file.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: Vec::new(),
            tls_listeners: Vec::new(),
            public_base_url: String::new(),
            trusted_proxies: Vec::new(),
            proxy_protocol_listeners: Vec::new(),
            routes_file: String::new(),
            metadata_upstream: None,
            metadata_file: None,
            metadata_ttl_seconds: 300,
            auth: AuthSettings::default(),
            limits: LimitSettings::default(),
            tenant_limits: Default::default(),
            upstream_health: Default::default(),
            server: ServerSettings::default(),
            log: LogSettings::default(),
            token_endpoint: None,
            database: None,
            portal: None,
            admin: AdminSettings::default(),
            base_dir: PathBuf::from("."),
        }
    }
}

impl Settings {
    /// Reads a config file. Only the YAML is checked here (with file, line and column); the values are
    /// checked by [`crate::Edge::new`].
    pub fn from_file(path: &Path) -> Result<Settings, Problems> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| whole_file(path, format!("cannot read: {e}")))?;
        Settings::from_yaml(path, &text)
    }

    /// Parses config text; `path` names it in problems, and its directory becomes
    /// [`Settings::base_dir`].
    pub fn from_yaml(path: &Path, text: &str) -> Result<Settings, Problems> {
        let mut src = Source::new(path, text);
        match serde_yaml_ng::from_str::<Settings>(text) {
            Ok(mut s) => {
                s.base_dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                Ok(s)
            }
            Err(e) => {
                src.yaml_error(&e);
                Err(Problems(src.problems))
            }
        }
    }
}

/// A TLS listener (TLS 1.2 and 1.3, rustls' cipher suites): address, certificates (chosen by SNI,
/// hot-reloaded when their files change) and HTTP/2.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TlsListenerSettings {
    pub addr: String,
    /// The default certificate chain and key (PEM), for clients that send no SNI or a name no other
    /// certificate covers.
    pub cert_file: String,
    pub key_file: String,
    /// More certificates, each chosen when the client's SNI matches one of its DNS names.
    pub certificates: Vec<CertificateSettings>,
    /// Offer HTTP/2 by ALPN (`h2`, then `http/1.1`).
    pub http2: bool,
}

impl Default for TlsListenerSettings {
    fn default() -> Self {
        TlsListenerSettings {
            addr: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            certificates: Vec::new(),
            http2: true,
        }
    }
}

/// One certificate chain and its key (PEM files), hot-reloaded when either changes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CertificateSettings {
    pub cert_file: String,
    pub key_file: String,
}

/// Bearer-token verification: limits and the external issuers fhir-edge trusts.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Clock skew allowed on `exp`/`nbf`.
    pub leeway_seconds: u64,
    pub max_token_bytes: usize,
    /// The `realm` of `WWW-Authenticate: Bearer` challenges.
    pub realm: String,
    /// Verified tokens remembered (0 turns the cache off).
    pub token_cache_entries: usize,
    pub issuers: Vec<IssuerSettings>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            leeway_seconds: 30,
            max_token_bytes: 8192,
            realm: "fhir-edge".into(),
            token_cache_entries: 10_000,
            issuers: Vec::new(),
        }
    }
}

/// An external token issuer: who it is, where its keys come from, and what its tokens may grant.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct IssuerSettings {
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// A short name for metrics and logs (default: the issuer URL).
    pub name: Option<String>,
    /// The `aud` its tokens must carry.
    pub audience: String,
    /// The signature algorithms its tokens may use. Required with `jwks_uri` or `discovery`; with
    /// only `keys` and `jwks_file`, the algorithms those keys name.
    pub algorithms: Vec<String>,
    /// Key sources, any of them: PEM or secret files, a JWK Set file, a JWK Set URL, or an OpenID
    /// Provider metadata URL (`…/.well-known/openid-configuration`) naming the JWK Set URL.
    pub keys: Vec<IssuerKeySettings>,
    pub jwks_file: Option<String>,
    pub jwks_uri: Option<String>,
    pub discovery: Option<String>,
    /// The tenants this issuer may grant (required): a list of tenant GUIDs, or `any`.
    pub tenants: Option<IssuerTenants>,
    /// The claim holding scopes: `scope` (a space-separated string) or `scp` (a list, or a string).
    pub scope_claim: ScopeClaim,
    /// Take the tenant GUID from this claim (e.g. Entra ID's `tid`) instead of the scope.
    pub tenant_claim: Option<String>,
    /// Where the last good fetched key set is kept, so a restart during an outage of the issuer
    /// comes up with it.
    pub cache_file: Option<String>,
    /// How remote keys are fetched and refreshed.
    pub fetch: FetchSettings,
}

/// The tenants an issuer may grant.
#[derive(Debug, Clone, PartialEq)]
pub enum IssuerTenants {
    /// Every tenant: one compromised issuer could then reach every hospital.
    Any,
    /// These tenant GUIDs only.
    List(Vec<String>),
}

impl JsonSchema for IssuerTenants {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IssuerTenants".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "`any`, or the tenant GUIDs this issuer may grant",
            "oneOf": [
                {"const": "any"},
                {"type": "array", "items": {"type": "string"}}
            ]
        })
    }
}

impl<'de> Deserialize<'de> for IssuerTenants {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            List(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "any" => Ok(IssuerTenants::Any),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "`tenants` is a list of tenant GUIDs or `any`, not `{w}`"
            ))),
            Raw::List(l) => Ok(IssuerTenants::List(l)),
        }
    }
}

/// The claim an issuer's tokens carry their scopes in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScopeClaim {
    /// `scope`: a space-separated string (RFC 8693 §4.2, RFC 9068).
    #[default]
    Scope,
    /// `scp`: a list of strings (Okta) or a space-separated string (Entra ID).
    Scp,
}

/// Fetching and refreshing an issuer's remote keys.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FetchSettings {
    /// Plain `http://` URLs. For tests only: keys fetched in the clear can be replaced in transit.
    pub allow_http: bool,
    /// Trust only the CAs in this PEM file (default: the system's roots).
    pub ca_file: Option<String>,
    pub connect_timeout_ms: u64,
    /// For a whole fetch: connect, send, read.
    pub timeout_ms: u64,
    /// The largest response read.
    pub max_bytes: usize,
    /// The most keys a JWK Set may hold.
    pub max_keys: usize,
    /// Bounds on the refresh interval a `Cache-Control: max-age` asks for.
    pub min_refresh_seconds: u64,
    pub max_refresh_seconds: u64,
    /// After a failed fetch, the next try.
    pub retry_seconds: u64,
    /// At most one refetch per this interval for tokens with a `kid` not in the key set.
    pub unknown_kid_interval_seconds: u64,
    /// How long such a token's request waits for that refetch before 401.
    pub unknown_kid_wait_ms: u64,
    /// A fetched key set that drops every key used in the last hour is held back until the issuer
    /// has served such sets for this long (an IdP serving a wrong set must not lock everyone out).
    pub hold_back_seconds: u64,
}

impl Default for FetchSettings {
    fn default() -> Self {
        FetchSettings {
            allow_http: false,
            ca_file: None,
            connect_timeout_ms: 3_000,
            timeout_ms: 10_000,
            max_bytes: 1 << 20,
            max_keys: 100,
            min_refresh_seconds: 300,
            max_refresh_seconds: 86_400,
            retry_seconds: 30,
            unknown_kid_interval_seconds: 30,
            unknown_kid_wait_ms: 2_000,
            hold_back_seconds: 3_600,
        }
    }
}

/// One verification key of an issuer: a public key (RS*, ES*, EdDSA) or an HMAC secret file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct IssuerKeySettings {
    pub kid: Option<String>,
    pub alg: String,
    pub public_key_file: Option<String>,
    pub secret_file: Option<String>,
}

/// Request size and connection limits.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    pub max_uri_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: usize,
    pub keepalive_timeout_seconds: u64,
    pub keepalive_requests: u32,
    pub header_timeout_seconds: u64,
    pub body_read_timeout_seconds: u64,
    pub write_timeout_seconds: u64,
    /// Client connections open at once on the proxy's listeners (0: no bound).
    pub max_connections: usize,
    /// Client connections open at once from one source address (0: no bound). A trusted proxy's
    /// connections count towards `max_connections` only.
    pub max_connections_per_source: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: 10 * 1024 * 1024,
            keepalive_timeout_seconds: 60,
            keepalive_requests: 1000,
            header_timeout_seconds: 10,
            body_read_timeout_seconds: 30,
            write_timeout_seconds: 30,
            max_connections: 16_384,
            max_connections_per_source: 1_024,
        }
    }
}

/// Process, upstream-connection and reload settings.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub threads: usize,
    pub work_stealing: bool,
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    pub upstream_connect_timeout_ms: u64,
    pub upstream_read_timeout_ms: u64,
    pub upstream_write_timeout_ms: u64,
    pub upstream_idle_timeout_ms: u64,
    pub upstream_keepalive_pool_size: usize,
    pub upstream_ca_file: Option<String>,
    pub max_retries: usize,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub reload_debounce_ms: u64,
    pub reload_poll_seconds: u64,
    /// Accept HTTP/2 without TLS (prior knowledge) on the plain listeners.
    pub h2c: bool,
    /// Resolve the routing table's upstream host names again this often (0: only on edits and
    /// SIGHUP).
    pub dns_refresh_seconds: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
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
            h2c: false,
            dns_refresh_seconds: 300,
        }
    }
}

/// The process log level and where audit lines go (`stdout`, `stderr`, `off` or a file path).
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub level: String,
    /// The process log's line format: `text` or `json`.
    pub format: String,
    pub access: String,
    /// Audit lines the writer thread may have queued before new ones are dropped.
    pub access_queue_lines: usize,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: "text".into(),
            access: "stdout".into(),
            access_queue_lines: 8192,
        }
    }
}

/// fhir-edge's own OAuth 2.0 token endpoint (client credentials).
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TokenEndpointSettings {
    pub path: String,
    /// The token URL as clients see it (default: public base + `path`).
    pub url: Option<String>,
    pub authorize_url: Option<String>,
    pub management_path: String,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub lifetime_seconds: u64,
    /// The active signing key, PKCS#8 PEM (required).
    pub signing_key: String,
    pub previous_signing_keys: Vec<String>,
    /// The hot-reloaded client registry file: short for `clients: {store: file, file: …}`.
    pub clients_file: String,
    /// Where the client registry lives (required, or `clients_file`).
    pub clients: Option<ClientsSettings>,
    pub grant_type_hyphen_alias: bool,
    pub failed_auth: FailedAuthSettings,
}

impl Default for TokenEndpointSettings {
    fn default() -> Self {
        TokenEndpointSettings {
            path: "/token".into(),
            url: None,
            authorize_url: None,
            management_path: "/register".into(),
            issuer: None,
            audience: None,
            lifetime_seconds: 3600,
            signing_key: String::new(),
            previous_signing_keys: Vec::new(),
            clients_file: String::new(),
            clients: None,
            grant_type_hyphen_alias: true,
            failed_auth: FailedAuthSettings::default(),
        }
    }
}

/// Where the client registry lives.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ClientsSettings {
    /// `file` or `postgres`.
    pub store: String,
    /// With `store: file`: the hot-reloaded `clients.yaml`.
    pub file: Option<String>,
    /// With `store: postgres`: how often the whole registry is read again, besides every reconnect.
    pub resync_seconds: u64,
}

impl Default for ClientsSettings {
    fn default() -> Self {
        ClientsSettings {
            store: "file".into(),
            file: None,
            resync_seconds: 300,
        }
    }
}

/// The PostgreSQL database a fleet of replicas shares. The URL (`postgresql://user:password@host/db`,
/// with `sslmode`) is a secret: it is read from an environment variable or a file, never written here.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// The environment variable that holds the URL.
    pub url_env: String,
    /// A file that holds the URL (a mounted secret); takes the place of `url_env`.
    pub url_file: Option<String>,
    /// PEM CA certificates for TLS to the database (default: the system's roots).
    pub ca_file: Option<String>,
    /// Connections for writes (the snapshot's own `LISTEN` connection is one more).
    pub pool_size: usize,
    pub connect_timeout_seconds: u64,
    /// The longest a statement may run (sent as `statement_timeout`).
    pub query_timeout_seconds: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url_env: "FHIR_EDGE_DATABASE_URL".into(),
            url_file: None,
            ca_file: None,
            pool_size: 4,
            connect_timeout_seconds: 5,
            query_timeout_seconds: 5,
        }
    }
}

/// The registration portal: accounts of client owners, their sessions and pages.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PortalSettings {
    pub enabled: bool,
    /// Below the public base (`/portal`).
    pub path: String,
    /// Listeners of the portal's own (plain HTTP) when set: the portal is served only there.
    pub listen: Vec<String>,
    /// The portal as owners reach it, for invite links (default: public base + `path`).
    pub public_url: Option<String>,
    /// With the file store: accounts, sessions and activity (JSON, written atomically).
    pub state_file: String,
    /// Every account must enable TOTP before it can do anything else.
    pub require_totp: bool,
    pub min_password_length: usize,
    pub invite_hours: u64,
    pub session_idle_minutes: u64,
    pub session_hours: u64,
    pub login_throttle: LoginThrottleSettings,
}

impl Default for PortalSettings {
    fn default() -> Self {
        PortalSettings {
            enabled: true,
            path: "/portal".into(),
            listen: Vec::new(),
            public_url: None,
            state_file: "portal-state.json".into(),
            require_totp: false,
            min_password_length: 12,
            invite_hours: 24,
            session_idle_minutes: 30,
            session_hours: 12,
            login_throttle: LoginThrottleSettings::default(),
        }
    }
}

/// Failed portal logins allowed per account (the e-mail given, whether or not it exists) and per
/// source address within the window.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LoginThrottleSettings {
    pub per_account: u32,
    pub per_source: u32,
    pub window_seconds: u64,
}

impl Default for LoginThrottleSettings {
    fn default() -> Self {
        LoginThrottleSettings {
            per_account: 5,
            per_source: 20,
            window_seconds: 900,
        }
    }
}

/// Throttling of failed client authentications at the token endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FailedAuthSettings {
    pub per_client: u32,
    pub per_source: u32,
    pub window_seconds: u64,
}

impl Default for FailedAuthSettings {
    fn default() -> Self {
        FailedAuthSettings {
            per_client: 10,
            per_source: 50,
            window_seconds: 60,
        }
    }
}

/// The admin listener (`/metrics`, `/healthz`, `/readyz`) and how tenants are named in metrics.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    pub listen: String,
    /// `name`, `guid` or `off`.
    pub tenant_label: String,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: "127.0.0.1:9089".into(),
            tenant_label: "name".into(),
        }
    }
}
