//! The checks of each section of [`Settings`], and the assembly of [`Config`] from them.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use std::sync::Arc;

use crate::auth::issuer::{Issuer, IssuerSpec};
use crate::auth::keys::Key;
use crate::auth::{TokenCache, Verifier};
use crate::config::issuers::load_issuers;
use crate::config::problems::Source;
use crate::config::settings::ScopeClaim;
use crate::config::settings::{LimitSettings, ServerSettings, Settings};
use crate::config::token::validate_token;
use crate::config::{
    resolve, Config, Limits, MetadataSource, PublicBase, RouteDefaults, ServerConfig, TlsListener,
};
use crate::fhir::discovery;
use crate::ops::audit;
use crate::ops::metrics::TenantLabel;
use crate::routing::upstream::{read_ca_file, UpstreamUrl};

/// Validates every section; returns `None` when a value needed to build [`Config`] is missing (its
/// problem is already recorded).
pub(super) fn validate(f: Settings, src: &mut Source) -> Option<Config> {
    let dir = f.base_dir.clone();
    let dir = dir.as_path();
    let (listen, tls_listeners) = listeners(&f, dir, src);
    let public = required(&f.public_base_url, "public_base_url", src).and_then(|u| {
        parse_public_base(u)
            .map_err(|m| src.at(u, "public_base_url", m))
            .ok()
    });
    let routes_file = required(&f.routes_file, "routes_file", src).map(|p| resolve(dir, p));
    let mut trusted_proxies = Vec::new();
    for (i, t) in f.trusted_proxies.iter().enumerate() {
        match t
            .parse::<ipnet::IpNet>()
            .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(net) => trusted_proxies.push(net.trunc()),
            Err(_) => src.at(
                t,
                format!("trusted_proxies[{i}]"),
                "must be an address or a CIDR such as 10.0.0.0/8",
            ),
        }
    }
    let proxy_protocol_listeners = proxy_protocol(&f, &listen, &tls_listeners, src);
    let limits = validate_limits(&f.limits, src);
    let (server, mut route_defaults) = validate_server(&f.server, dir, src);
    if let (Some(d), Some(p)) = (&mut route_defaults, &public) {
        d.public_base = p.url.clone();
    }
    if let (Some(d), Some(l)) = (&mut route_defaults, tenant_label(&f, src)) {
        d.tenant_label = l;
    }
    let (tenant_limits, health) = validate_isolation(&f, src);
    if let Some(d) = &mut route_defaults {
        d.limits = tenant_limits;
        d.health = health;
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
    if !matches!(f.log.format.as_str(), "text" | "json") {
        src.at(&f.log.format, "log.format", "must be `text` or `json`");
    }
    if !(16..=1_048_576).contains(&f.log.access_queue_lines) {
        src.at(
            "access_queue_lines",
            "log.access_queue_lines",
            "must be between 16 and 1048576",
        );
    }
    let metadata = metadata(&f, dir, src);
    let token = match (&f.token_endpoint, &public) {
        (Some(t), Some(public)) => validate_token(t, f.database.as_ref(), public, dir, src),
        _ => None,
    };
    let portal = match (&f.portal, &public) {
        // A token endpoint with problems of its own: the portal's checks would only echo them.
        (Some(_), Some(_)) if f.token_endpoint.is_some() && token.is_none() => None,
        (Some(p), Some(public)) => {
            crate::config::portal::validate_portal(p, token.as_ref(), public, dir, src)
        }
        _ => None,
    };
    let issuers = trusted_issuers(&f, dir, token.as_ref(), src);
    let log_level = f
        .log
        .level
        .parse::<log::LevelFilter>()
        .map_err(|_| {
            src.at(
                &f.log.level,
                "log.level",
                "must be one of off, error, warn, info, debug, trace",
            )
        })
        .ok();
    Some(Config {
        listen,
        tls_listeners,
        public: public?,
        trusted_proxies,
        proxy_protocol_listeners,
        routes_file: routes_file?,
        metadata: metadata?,
        metadata_ttl: Duration::from_secs(f.metadata_ttl_seconds),
        verifier: Verifier::from_issuers(issuers, f.auth.leeway_seconds),
        token_cache: TokenCache::new(f.auth.token_cache_entries, f.auth.leeway_seconds),
        realm: f.auth.realm,
        max_token_bytes: f.auth.max_token_bytes,
        limits: limits?,
        server: server?,
        route_defaults: route_defaults?,
        log_level: log_level?,
        token,
        portal,
        admin_listen: admin_listen?,
        access_log,
        access_queue: f.log.access_queue_lines,
    })
}

/// `proxy_protocol_listeners`: each one of the listeners, and someone to believe the header from.
fn proxy_protocol(
    f: &Settings,
    listen: &[SocketAddr],
    tls: &[TlsListener],
    src: &mut Source,
) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for (i, a) in f.proxy_protocol_listeners.iter().enumerate() {
        let key = format!("proxy_protocol_listeners[{i}]");
        match a.parse::<SocketAddr>() {
            Ok(addr) if listen.contains(&addr) || tls.iter().any(|l| l.addr == addr) => {
                out.push(addr)
            }
            Ok(_) => src.at(
                a,
                key,
                "must be one of the addresses in listen or tls_listeners",
            ),
            Err(_) => src.at(a, key, "must be IP:port"),
        }
    }
    if !f.proxy_protocol_listeners.is_empty() && f.trusted_proxies.is_empty() {
        src.at(
            "proxy_protocol_listeners",
            "proxy_protocol_listeners",
            "needs trusted_proxies: the header is believed only from them",
        );
    }
    out
}

/// A value the file must give.
fn required<'v>(value: &'v str, key: &str, src: &mut Source) -> Option<&'v str> {
    if value.is_empty() {
        src.at(key, key, "is required");
        None
    } else {
        Some(value)
    }
}

fn listeners(f: &Settings, dir: &Path, src: &mut Source) -> (Vec<SocketAddr>, Vec<TlsListener>) {
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
        let mut pairs = vec![(resolve(dir, &l.cert_file), resolve(dir, &l.key_file))];
        pairs.extend(
            l.certificates
                .iter()
                .map(|c| (resolve(dir, &c.cert_file), resolve(dir, &c.key_file))),
        );
        let named = std::iter::once((key.clone(), &l.cert_file, &l.key_file)).chain(
            l.certificates.iter().enumerate().map(|(j, c)| {
                (
                    format!("{key}.certificates[{j}]"),
                    &c.cert_file,
                    &c.key_file,
                )
            }),
        );
        let mut readable = true;
        for ((at, raw_cert, raw_key), (cert, pkey)) in named.zip(&pairs) {
            for (name, p, raw) in [("cert_file", cert, raw_cert), ("key_file", pkey, raw_key)] {
                if let Err(e) = std::fs::metadata(p) {
                    readable = false;
                    src.at(
                        raw,
                        format!("{at}.{name}"),
                        format!("cannot read {}: {e}", p.display()),
                    );
                }
            }
        }
        // The pairs as the listener will load them: PEM, a key that matches its certificate.
        if readable {
            if let Err(m) = crate::tls::Certificates::load(&pairs) {
                src.at(&l.cert_file, key.clone(), m);
            }
        }
        if let Ok(addr) = addr {
            tls_listeners.push(TlsListener {
                addr,
                pairs,
                http2: l.http2,
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
    (listen, tls_listeners)
}

fn tenant_label(f: &Settings, src: &mut Source) -> Option<TenantLabel> {
    match f.admin.tenant_label.as_str() {
        "name" => Some(TenantLabel::Name),
        "guid" => Some(TenantLabel::Guid),
        "off" => Some(TenantLabel::Off),
        other => {
            src.at(other, "admin.tenant_label", "must be name, guid or off");
            None
        }
    }
}

/// `metadata_upstream` (parsed, not resolved) or `metadata_file` (read and checked now, rather than
/// when the proxy first serves it).
fn metadata(f: &Settings, dir: &Path, src: &mut Source) -> Option<MetadataSource> {
    if !(1..=86_400).contains(&f.metadata_ttl_seconds) {
        src.at(
            "metadata_ttl_seconds",
            "metadata_ttl_seconds",
            "must be between 1 and 86400",
        );
    }
    match (&f.metadata_upstream, &f.metadata_file) {
        (Some(u), None) => UpstreamUrl::parse(u)
            .map(MetadataSource::Upstream)
            .map_err(|m| src.at(u, "metadata_upstream", m))
            .ok(),
        (None, Some(file)) => std::fs::read_to_string(resolve(dir, file))
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|t| {
                serde_json::from_str::<serde_json::Value>(&t).map_err(|e| format!("not JSON: {e}"))
            })
            .and_then(|v| {
                discovery::transform(v.clone(), "", None)
                    .map(|_| MetadataSource::File(v))
                    .map_err(|p| format!("not a usable CapabilityStatement: {}", p.join("; ")))
            })
            .map_err(|m| src.at(file, "metadata_file", m))
            .ok(),
        _ => {
            src.at(
                "metadata",
                "metadata_upstream",
                "give exactly one of metadata_upstream and metadata_file",
            );
            None
        }
    }
}

/// Every issuer fhir-edge trusts: the external ones and its own token endpoint.
fn trusted_issuers(
    f: &Settings,
    dir: &Path,
    token: Option<&crate::token::TokenSettings>,
    src: &mut Source,
) -> Vec<Arc<Issuer>> {
    let mut issuers = load_issuers(&f.auth, dir, src);
    if let Some(t) = token {
        if f.auth.issuers.iter().any(|i| i.issuer == t.issuer) {
            src.at(
                &t.issuer,
                "auth.issuers",
                "is the token endpoint's own issuer: its tokens are trusted already",
            );
        }
        // fhir-edge trusts its own issuer, with the same rules as any other; which tenants a token
        // may name is the client registry's to say.
        let keys = t
            .keys
            .all()
            .map(|k| Key::new(Some(k.kid.clone()), vec![k.alg], k.decoding.clone()))
            .collect();
        let spec = IssuerSpec {
            iss: t.issuer.clone(),
            label: "token_endpoint".into(),
            audience: t.audience.clone(),
            own: true,
            tenants: None,
            scope_claim: ScopeClaim::Scope,
            tenant_claim: None,
        };
        match Issuer::new(spec, keys, None) {
            Ok(i) => issuers.push(Arc::new(i)),
            Err(m) => src.at("token_endpoint", "token_endpoint", m),
        }
    }
    // A token_endpoint that is there but invalid has its own problems reported: "nothing to trust"
    // would send the operator looking in the wrong place.
    if f.auth.issuers.is_empty() && f.token_endpoint.is_none() {
        src.at(
            "auth",
            "auth.issuers",
            "nothing to trust: configure an issuer under auth.issuers, or a token_endpoint",
        );
    }
    let a = &f.auth;
    if a.max_token_bytes < 256 || a.max_token_bytes > 64 * 1024 {
        src.at(
            "max_token_bytes",
            "auth.max_token_bytes",
            "must be between 256 and 65536",
        );
    }
    if a.token_cache_entries > 10_000_000 {
        src.at(
            "token_cache_entries",
            "auth.token_cache_entries",
            "must be at most 10000000 (0 turns the cache off)",
        );
    }
    if a.leeway_seconds > 300 {
        src.at(
            "leeway_seconds",
            "auth.leeway_seconds",
            "must be at most 300",
        );
    }
    let printable = a
        .realm
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if a.realm.is_empty() || !printable {
        src.at(
            "realm",
            "auth.realm",
            "must be non-empty printable ASCII without quotes or backslashes",
        );
    }
    issuers
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

fn validate_limits(l: &LimitSettings, src: &mut Source) -> Option<Limits> {
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
    for (key, v) in [
        ("max_connections", l.max_connections),
        ("max_connections_per_source", l.max_connections_per_source),
    ] {
        check(v <= 1_000_000, key, "must be at most 1000000 (0: no bound)");
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
        max_connections: l.max_connections,
        max_connections_per_source: l.max_connections_per_source,
    })
}

/// The numeric limits of the `server` section: thread count, grace periods, upstream timeouts and
/// pool, retries, reload timing.
fn check_server_limits(s: &ServerSettings, src: &mut Source) {
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
    check(
        s.dns_refresh_seconds <= 86_400,
        "dns_refresh_seconds",
        "must be at most 86400 (0 disables)",
    );
}

/// `tenant_limits` and `upstream_health`: problems are reported, and the defaults stand in for
/// the rest of the check.
fn validate_isolation(
    f: &Settings,
    src: &mut Source,
) -> (
    crate::config::limits::LimitSpec,
    crate::config::limits::HealthPolicy,
) {
    use crate::config::limits::{HealthPolicy, TenantLimits};
    if let Err((key, m)) = TenantLimits::resolve(&f.tenant_limits, None) {
        let leaf = key.rsplit('.').next().unwrap_or(key);
        src.at(leaf, format!("tenant_limits.{key}"), m);
    }
    let health = match HealthPolicy::from_settings(&f.upstream_health) {
        Ok(h) => h,
        Err((key, m)) => {
            src.at(key, format!("upstream_health.{key}"), m);
            HealthPolicy::default()
        }
    };
    (f.tenant_limits, health)
}

fn validate_server(
    s: &ServerSettings,
    dir: &Path,
    src: &mut Source,
) -> (Option<ServerConfig>, Option<RouteDefaults>) {
    let before = src.problems.len();
    check_server_limits(s, src);
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
        Some(ServerConfig {
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
            h2c: s.h2c,
            dns_refresh: (s.dns_refresh_seconds > 0)
                .then(|| Duration::from_secs(s.dns_refresh_seconds.min(86_400))),
        }),
        Some(RouteDefaults {
            connect_timeout: Duration::from_millis(s.upstream_connect_timeout_ms),
            read_timeout: Duration::from_millis(s.upstream_read_timeout_ms),
            write_timeout: Duration::from_millis(s.upstream_write_timeout_ms),
            idle_timeout: Duration::from_millis(s.upstream_idle_timeout_ms),
            ca_der,
            public_base: String::new(),
            tenant_label: TenantLabel::Name,
            limits: Default::default(),
            health: Default::default(),
        }),
    )
}
