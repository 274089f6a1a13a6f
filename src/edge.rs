//! Assembles the Pingora server from validated [`Settings`]: the proxy service with its listeners and
//! the routing-table reloader. Pingora's own command line and YAML are not used (its `Opt` would
//! swallow our arguments); its `ServerConf` is built here from our config.

use std::sync::Arc;

use pingora::apps::HttpServerOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;

use crate::config::problems::Problems;
use crate::config::Settings;
use crate::fhir::discovery::{Discovery, SecurityUris};
use crate::ops::admin::Admin;
use crate::ops::audit::AuditLog;
use crate::ops::metrics::Metrics;
use crate::proxy::deadline::HeaderDeadline;
use crate::proxy::FhirEdge;
use crate::reload::{Live, Reload, Reloader};
use crate::routing::RoutingTable;
use crate::token::clients::ClientRegistry;
use crate::token::endpoint::TokenService;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::services::listening::Service;

/// Downstream write buffer. Pingora's default (1,460 bytes, one MSS) sends a response header on its
/// own and then each body chunk's size line, data and CRLF as separate `send`s: five syscalls and
/// loopback round trips for a small rewritten Bundle. 16 KiB holds the header and a typical FHIR
/// response's first chunk, so they leave in one `send` (Pingora still flushes after every chunk and
/// at the end of every body, so nothing waits in the buffer).
const DOWNSTREAM_WRITE_BUFFER: usize = 16 * 1024;

/// Room on the wire beyond the URI and header limits for the request line's method and version,
/// the header lines' `: ` and CRLFs, and the blank line.
const HEADER_BLOCK_SLACK: usize = 1024;

/// Pingora answers 400 to a header block longer than this (`MAX_HEADER_SIZE`, 1 MiB - 1).
const PINGORA_MAX_HEADER_BLOCK: usize = 1_048_575;

/// How the process was asked to start.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunOptions {
    /// Take over the listening sockets of a running fhir-edge (Pingora graceful upgrade).
    pub upgrade: bool,
    /// Detach and run in the background.
    pub daemon: bool,
}

/// Why the server could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the routing table does not load:\n{0}")]
    Routes(Problems),
    #[error("the client registry does not load:\n{0}")]
    Clients(Problems),
    #[error("no metadata source (metadata_upstream or metadata_file) was configured")]
    NoMetadata,
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("cannot open the access log: {0}")]
    AccessLog(String),
    #[error("JWT self-test failed: {0}")]
    Crypto(String),
    #[error("listener {addr}: {message}")]
    Listener { addr: String, message: String },
}

/// Builds the server; `run_forever()` on the result starts it.
pub fn build(mut settings: Settings, opts: RunOptions) -> Result<Server, StartError> {
    crate::auth::jwt::self_test().map_err(StartError::Crypto)?;
    let routes = Arc::new(
        Live::<RoutingTable>::load_file(
            settings.routes_file.clone(),
            settings.route_defaults.clone(),
        )
        .map_err(StartError::Routes)?,
    );
    let token = match settings.token.take() {
        None => None,
        Some(t) => {
            let clients = Live::<ClientRegistry>::load_file(t.clients_file.clone(), ())
                .map_err(StartError::Clients)?;
            Some(Arc::new(TokenService::new(
                t,
                Arc::new(clients),
                routes.clone(),
            )))
        }
    };
    let security = token.as_ref().map(|t| {
        let s = &t.settings;
        let base = &settings.public.url;
        SecurityUris {
            token: s.url.clone(),
            authorize: s.authorize_url.clone(),
            register: format!("{base}{}", s.management_path),
            jwks: format!("{base}{}", crate::fhir::classify::JWKS_PATH),
            issuer: s.issuer.clone(),
        }
    });
    let metrics = Arc::new(Metrics::new().map_err(|e| StartError::Metrics(e.to_string()))?);
    let audit =
        AuditLog::open(&settings.access_log).map_err(|e| StartError::AccessLog(e.to_string()))?;
    let source = settings.metadata.take().ok_or(StartError::NoMetadata)?;
    let discovery = Arc::new(Discovery::new(
        source,
        settings.metadata_ttl,
        settings.public.url.clone(),
        security,
        metrics.clone(),
    ));
    let settings = Arc::new(settings);

    let s = &settings.server;
    let mut conf = ServerConf {
        threads: s.threads,
        // Pingora's default grace period is an unconditional 300 s sleep on SIGTERM.
        grace_period_seconds: Some(s.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout_seconds),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        // Pingora's `max_retries` counts attempts (0 would never send a request); ours counts retries.
        max_retries: s.max_retries + 1,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        // Off by default: one single-threaded runtime per worker thread keeps a connection's tasks
        // on one core (no cross-thread wake-ups); measured at least as fast here (README).
        work_stealing: s.work_stealing,
        ..ServerConf::default()
    };
    conf.daemon = opts.daemon;
    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let limits = &settings.limits;
    let mut server_options = HttpServerOptions::default();
    server_options.keepalive_request_limit = Some(limits.keepalive_requests);
    let proxy = FhirEdge::new(
        settings.clone(),
        routes.clone(),
        token.clone(),
        discovery,
        metrics.clone(),
        audit,
    );
    let mut app = pingora_proxy::http_proxy(&server.configuration, proxy);
    app.server_options = Some(server_options);
    // Every connection gets a total deadline for each request's header block (slowloris) and a
    // cap on its size (answered 431 before Pingora's own 1 MiB cap answers 400).
    let max_header_block = (limits.max_uri_bytes + limits.max_header_bytes + HEADER_BLOCK_SLACK)
        .min(PINGORA_MAX_HEADER_BLOCK);
    let mut service = Service::new(
        "fhir-edge".to_string(),
        HeaderDeadline::new(app, limits.header_timeout, max_header_block),
    );
    let buffers = L4BufferSettings::default().write(DOWNSTREAM_WRITE_BUFFER);
    for addr in &settings.listen {
        service.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(buffers));
    }
    for l in &settings.tls_listeners {
        let (cert, key) = (l.cert_file.to_string_lossy(), l.key_file.to_string_lossy());
        let tls = TlsSettings::intermediate(&cert, &key).map_err(|e| StartError::Listener {
            addr: l.addr.to_string(),
            message: format!("{:?}", e.etype()),
        })?;
        service.add_listener(
            ListenerConfig::tcp(l.addr.to_string())
                .tls(tls)
                .l4_buffer(buffers),
        );
    }
    let proxy_handle = server.add_service(service);
    let (routes_for_admin, token_for_admin) = (routes.clone(), token.clone());
    let mut files: Vec<Arc<dyn Reload>> = vec![routes];
    if let Some(t) = &token {
        files.push(t.clients.clone());
    }
    let reload_handle = server.add_service(background_service(
        "file reload",
        Reloader {
            files,
            debounce: s.reload_debounce,
            poll: s.reload_poll,
        },
    ));
    // Listeners open only after the watcher is in place, so no edit after start-up goes unnoticed.
    proxy_handle.add_dependency(&reload_handle);

    let mut admin = Service::new(
        "fhir-edge admin".to_string(),
        HttpServer::new_app(Admin {
            metrics,
            routes: routes_for_admin,
            token: token_for_admin,
        }),
    );
    admin.add_tcp(&settings.admin_listen.to_string());
    // One thread is plenty for scrapes and probes.
    admin.threads = Some(1);
    server.add_service(admin);
    Ok(server)
}
