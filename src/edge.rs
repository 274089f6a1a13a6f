//! [`Edge`]: fhir-edge as a Pingora plugin. Built from [`Settings`] (a file, or constructed in code), it
//! adds its proxy service, its hot-file reloader and its admin listener to a caller's Pingora `Server`
//! with one call ([`Edge::add_to`]).
//!
//! Building an edge does the blocking work once, before anything is served: it validates the
//! settings, reads the routing table and the client registry, resolves upstream host names and opens the
//! audit log. It installs nothing process-wide: no allocator, no logger, no crypto provider. The
//! `fhir-edge` binary does those in `main.rs` (see [`crate::install_crypto_provider`] and
//! [`crate::init_logging`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use pingora::apps::http_app::HttpServer;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig, Listeners};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::auth::remote::KeyRefresher;
use crate::config::problems::Problems;
use crate::config::{Config, MetadataSource, Settings};
use crate::db::DbError;
use crate::fhir::discovery::{self, Discovery, SecurityUris};
use crate::ops::admin::Admin;
use crate::ops::audit::AuditLog;
use crate::ops::metrics::Metrics;
use crate::portal::service::PortalService;
use crate::portal::Portal;
use crate::proxy::conns::ConnectionGate;
use crate::proxy::deadline::HeaderDeadline;
use crate::proxy::proxy_protocol::{BeforeTls, ProxyProtocol};
use crate::proxy::FhirEdge;
use crate::reload::{Live, Reload, Reloader};
use crate::routing::upstream::Upstream;
use crate::routing::{RoutingState, RoutingTable};
use crate::tls::{CertReloader, CertStore};
use crate::token::clients::sync::{PgRegistry, RegistrySync};
use crate::token::clients::{ClientRegistry, ClientStore, StoreConfig};
use crate::token::endpoint::TokenService;

/// Downstream write buffer. Pingora's default (1,460 bytes, one MSS) sends a response header on its
/// own and then each body chunk's size line, data and CRLF as separate `send`s. 16 KiB holds the header
/// and a typical FHIR response's first chunk, so they leave together.
const DOWNSTREAM_WRITE_BUFFER: usize = 16 * 1024;

/// Room on the wire beyond the URI and header limits for the request line's method and version,
/// the header lines' `: ` and CRLFs, and the blank line.
const HEADER_BLOCK_SLACK: usize = 1024;

/// Pingora answers 400 to a header block longer than this (`MAX_HEADER_SIZE`, 1 MiB - 1).
const PINGORA_MAX_HEADER_BLOCK: usize = 1_048_575;

/// Why an edge could not be built or mounted.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("invalid configuration:\n{0}")]
    Config(Problems),
    #[error("the routing table does not load:\n{0}")]
    Routes(Problems),
    #[error("the client registry does not load:\n{0}")]
    Clients(Problems),
    #[error("the client registry's database: {0}")]
    Database(String),
    #[error("metadata_upstream: {0}")]
    Metadata(String),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("cannot open the access log: {0}")]
    AccessLog(String),
    #[error("JWT self-test failed: {0}")]
    Crypto(String),
    #[error("the registration portal: {0}")]
    Portal(String),
    #[error("listener {addr}: {message}")]
    Listener { addr: String, message: String },
}

/// One fhir-edge, ready to be added to a Pingora server.
///
/// ```no_run
/// use pingora::server::Server;
///
/// let edge = fhir_edge::Edge::from_file("conf/fhir-edge.yaml".as_ref())?;
/// let mut server = Server::new_with_opt_and_conf(None, edge.server_conf());
/// server.bootstrap();
/// edge.add_to(&mut server)?;
/// // server.add_service(...): the host's own services go beside it.
/// server.run_forever();
/// # #[allow(unreachable_code)]
/// # Ok::<(), fhir_edge::EdgeError>(())
/// ```
pub struct Edge {
    config: Config,
    routes: Arc<Live<RoutingTable>>,
    token: Option<Arc<TokenService>>,
    discovery: Arc<Discovery>,
    metrics: Arc<Metrics>,
    audit: AuditLog,
    portal: Option<Arc<Portal>>,
    /// Limiter state and node health, kept across routing-table reloads.
    routing: Arc<RoutingState>,
}

impl Edge {
    /// Validates `settings` (every problem at once) and loads what they name.
    pub fn new(settings: Settings) -> Result<Edge, EdgeError> {
        Edge::build(Config::from_settings(settings).map_err(EdgeError::Config)?)
    }

    /// Reads, validates and loads a config file (problems carry line numbers).
    pub fn from_file(path: &Path) -> Result<Edge, EdgeError> {
        Edge::build(Config::load(path).map_err(EdgeError::Config)?)
    }

    fn build(mut config: Config) -> Result<Edge, EdgeError> {
        crate::auth::jwt::self_test().map_err(EdgeError::Crypto)?;
        let metrics = Arc::new(Metrics::new().map_err(|e| EdgeError::Metrics(e.to_string()))?);
        let routing = RoutingState::new(config.route_defaults.health, Some(metrics.clone()));
        let routes = Arc::new(
            Live::<RoutingTable>::load_file(
                config.routes_file.clone(),
                crate::routing::TableContext {
                    defaults: config.route_defaults.clone(),
                    resolve: crate::routing::Resolve::Dns,
                    refresh: config.server.dns_refresh,
                    state: routing.clone(),
                },
            )
            .map_err(EdgeError::Routes)?,
        );
        let token = match config.token.take() {
            None => None,
            Some(t) => {
                let clients = open_store(&t.clients)?;
                Some(Arc::new(TokenService::new(t, clients, routes.clone())))
            }
        };
        for issuer in config.verifier.issuers() {
            metrics.attach_issuer(issuer);
        }
        if let Some(ClientStore::Postgres(_)) = token.as_deref().map(|t| &t.clients) {
            metrics
                .attach_registry()
                .map_err(|e| EdgeError::Metrics(e.to_string()))?;
        }
        let audit = AuditLog::open(
            &config.access_log,
            config.access_queue,
            crate::ops::audit::AuditCounters {
                dropped: metrics.audit_lines_dropped.clone(),
                failed: metrics.audit_write_failures.clone(),
            },
        )
        .map_err(|e| EdgeError::AccessLog(e.to_string()))?;
        let discovery = Arc::new(Discovery::new(
            metadata_source(&config)?,
            config.metadata_ttl,
            config.public.url.clone(),
            token.as_deref().map(|t| security_uris(&config, t)),
            metrics.clone(),
        ));
        let portal = match (config.portal.clone(), &token) {
            (Some(p), Some(t)) => Some(Arc::new(
                Portal::new(p, &config.public.path, t.clone())
                    .map_err(|e| EdgeError::Portal(e.to_string()))?,
            )),
            _ => None,
        };
        Ok(Edge {
            config,
            routes,
            token,
            discovery,
            metrics,
            audit,
            portal,
            routing,
        })
    }

    /// A function that hands freed memory back to the OS (e.g. mimalloc's `mi_collect`), called after
    /// a large routing table loads (and at once, if one already has). The library makes no allocator
    /// calls of its own. Process-wide: the first function given is kept.
    pub fn release_memory_with(self, release: fn()) -> Edge {
        crate::memory::set_release(Some(release));
        self
    }

    /// The Pingora server settings these settings ask for (threads, shutdown timing, upstream pool,
    /// retries, pid and upgrade-socket paths). A host with its own `ServerConf` may use its own; the
    /// proxy reads the pool size and retry count from the server it is added to.
    pub fn server_conf(&self) -> ServerConf {
        let s = &self.config.server;
        ServerConf {
            threads: s.threads,
            // Pingora's default grace period is an unconditional 300 s sleep on SIGTERM.
            grace_period_seconds: Some(s.grace_period_seconds),
            graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout_seconds),
            upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
            // Pingora's `max_retries` counts attempts (0 would never send a request); ours counts
            // retries.
            max_retries: s.max_retries + 1,
            pid_file: s.pid_file.clone(),
            upgrade_sock: s.upgrade_sock.clone(),
            // Off by default: one single-threaded runtime per worker thread keeps a connection's
            // tasks on one core (no cross-thread wake-ups); measured at least as fast (docs/performance.md).
            work_stealing: s.work_stealing,
            ..ServerConf::default()
        }
    }

    /// The process log level the settings ask for.
    pub fn log_level(&self) -> log::LevelFilter {
        self.config.log_level
    }

    /// One line for the start-up log: listeners, public base, routing table, token endpoint.
    pub fn describe(&self) -> String {
        let c = &self.config;
        let listeners: Vec<String> = c
            .listen
            .iter()
            .map(|a| format!("http://{a}"))
            .chain(
                c.tls_listeners
                    .iter()
                    .map(|l| format!("https://{}", l.addr)),
            )
            .collect();
        let mut line = format!(
            "listening on {}, admin on {}, public base {}, routing table {}",
            listeners.join(", "),
            c.admin_listen,
            c.public.url,
            c.routes_file.display(),
        );
        if let Some(t) = &self.token {
            let s = &t.settings;
            line.push_str(&format!(
                "; token endpoint {} (issuer {}, signing key {} {:?}), clients {}",
                s.url,
                s.issuer,
                s.keys.active.kid,
                s.keys.active.alg,
                s.clients.describe()
            ));
        }
        if let Some(p) = &self.portal {
            line.push_str(&format!("; portal {}", p.cfg.public_url));
        }
        line
    }

    /// Adds the proxy service (with its listeners), the reloader of the hot files, the refresher of
    /// fetched issuer keys (when an issuer has `jwks_uri` or `discovery`) and the admin listener to
    /// `server`. The listeners open only after the reloader's watchers are in place, so no
    /// edit after start-up goes unnoticed.
    pub fn add_to(self, server: &mut Server) -> Result<(), EdgeError> {
        let config = Arc::new(self.config);
        let reopen_audit = self.audit.reopener();
        let proxy = FhirEdge::new(
            config.clone(),
            self.routes.clone(),
            self.token.clone(),
            self.discovery,
            self.metrics.clone(),
            self.audit,
        )
        .with_portal(self.portal.clone())
        .with_routing_state(self.routing.clone());
        let gate = Arc::new(ConnectionGate::new(
            config.limits.max_connections,
            config.limits.max_connections_per_source,
            config.trusted_proxies.clone(),
            Some(self.metrics.clone()),
        ));
        let (service, cert_stores) = proxy_service(server, &config, proxy, gate)?;
        let proxy_handle = server.add_service(service);
        if !cert_stores.is_empty() {
            server.add_service(background_service(
                "TLS certificates",
                CertReloader {
                    stores: cert_stores,
                    metrics: self.metrics.clone(),
                },
            ));
        }
        let mut files: Vec<Arc<dyn Reload>> = vec![self.routes.clone()];
        match self.token.as_deref().map(|t| &t.clients) {
            Some(ClientStore::File(live)) => files.push(live.clone()),
            Some(ClientStore::Postgres(pg)) => {
                server.add_service(background_service(
                    "client registry",
                    RegistrySync {
                        registry: pg.clone(),
                    },
                ));
            }
            None => {}
        }
        if let Some(portal) = self.portal {
            server.add_service(background_service("portal", PortalService { portal }));
        }
        server.add_service(background_service(
            "client buckets",
            crate::routing::limits::Sweeper {
                state: self.routing.clone(),
            },
        ));
        if let Some((interval, timeout)) = config.route_defaults.health.check {
            server.add_service(background_service(
                "upstream checks",
                crate::routing::probe::Prober {
                    state: self.routing.clone(),
                    interval,
                    timeout,
                },
            ));
        }
        let reload_handle = server.add_service(background_service(
            "file reload",
            Reloader {
                files,
                debounce: config.server.reload_debounce,
                poll: config.server.reload_poll,
                on_hangup: vec![Box::new(reopen_audit)],
            },
        ));
        proxy_handle.add_dependency(&reload_handle);
        let issuers: Vec<_> = config.verifier.issuers().cloned().collect();
        let remote: Vec<_> = issuers
            .iter()
            .filter(|i| i.remote.is_some())
            .cloned()
            .collect();
        if !remote.is_empty() {
            server.add_service(background_service(
                "issuer keys",
                KeyRefresher {
                    issuers: remote,
                    metrics: self.metrics.clone(),
                },
            ));
        }
        server.add_service(admin_service(
            config.admin_listen,
            Admin {
                metrics: self.metrics,
                routes: self.routes,
                token: self.token,
                issuers,
                routing: self.routing,
            },
        ));
        Ok(())
    }
}

/// The client registry the settings name. A PostgreSQL registry is read once before anything is
/// served; a database that cannot be reached then is logged and retried in the background (the
/// replica is not ready until it has read the registry), a schema this build cannot use is an error.
fn open_store(config: &StoreConfig) -> Result<ClientStore, EdgeError> {
    match config {
        StoreConfig::File(path) => Live::<ClientRegistry>::load_file(path.clone(), ())
            .map(|live| ClientStore::File(Arc::new(live)))
            .map_err(EdgeError::Clients),
        StoreConfig::Postgres { db, resync_every } => {
            let registry = Arc::new(PgRegistry::new((**db).clone(), *resync_every));
            match crate::db::block_on(registry.initial_load()) {
                Ok(()) => log::info!(
                    "client registry: {} clients from {}",
                    registry.load().len(),
                    db.describe()
                ),
                Err(e @ (DbError::Schema(_) | DbError::Config(_))) => {
                    return Err(EdgeError::Database(e.to_string()))
                }
                Err(e) => log::error!(
                    "client registry: {} cannot be read yet ({e}); not ready until it can",
                    db.describe()
                ),
            }
            Ok(ClientStore::Postgres(registry))
        }
    }
}

/// The proxy service, behind the header deadline.
type ProxyService = Service<HeaderDeadline<pingora_proxy::HttpProxy<FhirEdge>>>;

/// The proxy application behind the header deadline, on every configured listener, and the TLS
/// listeners' certificate stores (for their reloader).
fn proxy_service(
    server: &Server,
    config: &Config,
    proxy: FhirEdge,
    gate: Arc<ConnectionGate>,
) -> Result<(ProxyService, Vec<Arc<CertStore>>), EdgeError> {
    let limits = &config.limits;
    let mut server_options = HttpServerOptions::default();
    server_options.keepalive_request_limit = Some(limits.keepalive_requests);
    // HTTP/2 without TLS only when asked for; on TLS listeners it is negotiated by ALPN. Pingora's
    // defaults bound each h2 connection: 100 concurrent streams, 64 KiB of decoded headers.
    server_options.h2c = config.server.h2c;
    let mut app = pingora_proxy::http_proxy(&server.configuration, proxy);
    app.server_options = Some(server_options);
    // Every connection is admitted under the connection bounds (src/proxy/conns.rs) and gets a
    // total deadline for each request's header block (slowloris) and a cap on its size (answered
    // 431 before Pingora's own 1 MiB cap answers 400).
    let max_header_block = (limits.max_uri_bytes + limits.max_header_bytes + HEADER_BLOCK_SLACK)
        .min(PINGORA_MAX_HEADER_BLOCK);
    // Listeners that expect a PROXY protocol header: plain ones read it as the connection is
    // admitted, TLS ones before the handshake.
    let proxy_protocol = (!config.proxy_protocol_listeners.is_empty()).then(|| {
        Arc::new(ProxyProtocol::new(
            config.proxy_protocol_listeners.clone(),
            config.trusted_proxies.clone(),
            limits.header_timeout,
        ))
    });
    let mut listeners = Listeners::new();
    if let Some(pp) = &proxy_protocol {
        listeners.set_pre_tls_callback(Arc::new(BeforeTls(pp.clone())));
    }
    let buffers = L4BufferSettings::default().write(DOWNSTREAM_WRITE_BUFFER);
    let portal_listen = config.portal.iter().flat_map(|p| &p.listen);
    for addr in config.listen.iter().chain(portal_listen) {
        listeners.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(buffers));
    }
    let mut stores = Vec::new();
    for l in &config.tls_listeners {
        let failed = |message: String| EdgeError::Listener {
            addr: l.addr.to_string(),
            message,
        };
        let store = Arc::new(CertStore::open(l.addr.to_string(), l.pairs.clone()).map_err(failed)?);
        // The paths are not used: the store answers every handshake.
        let mut tls =
            TlsSettings::intermediate("", "").map_err(|e| failed(format!("{:?}", e.etype())))?;
        tls.set_cert_resolver(store.clone());
        if l.http2 {
            tls.enable_h2();
        }
        stores.push(store);
        listeners.add_listener(
            ListenerConfig::tcp(l.addr.to_string())
                .tls(tls)
                .l4_buffer(buffers),
        );
    }
    let service = Service::with_listeners(
        "fhir-edge".to_string(),
        listeners,
        HeaderDeadline::new(
            app,
            limits.header_timeout,
            max_header_block,
            gate,
            proxy_protocol,
        ),
    );
    Ok((service, stores))
}

fn admin_service(addr: SocketAddr, admin: Admin) -> Service<HttpServer<Admin>> {
    let mut service = Service::new("fhir-edge admin".to_string(), HttpServer::new_app(admin));
    service.add_tcp(&addr.to_string());
    // One thread is plenty for scrapes and probes.
    service.threads = Some(1);
    service
}

/// The statement source, with the metadata upstream's host resolved now (never on the request path).
fn metadata_source(config: &Config) -> Result<discovery::Source, EdgeError> {
    match &config.metadata {
        MetadataSource::File(v) => Ok(discovery::Source::File(v.clone())),
        MetadataSource::Upstream(url) => {
            let addr = url.resolve().map_err(EdgeError::Metadata)?;
            let health = crate::routing::nodes::NodeHealth::standalone(&url.node_label());
            Upstream::build(url, addr, &config.route_defaults.peer_settings(0), health)
                .map(|u| discovery::Source::Upstream(Box::new(u)))
                .map_err(EdgeError::Metadata)
        }
    }
}

/// The URLs the discovery documents advertise for fhir-edge's own token endpoint.
fn security_uris(config: &Config, token: &TokenService) -> SecurityUris {
    let s = &token.settings;
    let base = &config.public.url;
    SecurityUris {
        token: s.url.clone(),
        authorize: s.authorize_url.clone(),
        register: format!("{base}{}", s.management_path),
        jwks: format!("{base}{}", crate::fhir::classify::JWKS_PATH),
        issuer: s.issuer.clone(),
    }
}
