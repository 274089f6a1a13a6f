//! Every Prometheus metric fhir-edge exports: name, help, labels, buckets — in one place.
//!
//! One registry (not the process-global default), served on the admin listener only. Names are
//! prefixed `fhir_edge_` and carry their unit (`_seconds`, `_bytes`, `_total`). **Label values come
//! only from bounded sets**: enums in this crate, tenants present in the current routing table (as the
//! route name, the GUID, or nothing, per `metrics.tenant_label`), and clients present in the registry.
//! Nothing taken from a request string ever becomes a label, so no request can create a series.

use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::reload::{Live, Loadable};

/// How requests are attributed to tenants in labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantLabel {
    /// The route's `name` from the routing table.
    Name,
    /// The tenant GUID.
    Guid,
    /// No per-tenant series at all (every request is `none`).
    Off,
}

/// The label value for requests that have no tenant route (auth failures, discovery, the token
/// endpoint).
pub(crate) const NO_TENANT: &str = "none";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub(crate) struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    /// Requests refused by a tenant's limits, by tenant and limit (`rate`, `in_flight`,
    /// `client_rate`).
    pub throttled: IntCounterVec,
    /// Requests sent again to another node after the first failed, by tenant.
    pub upstream_retries: IntCounterVec,
    /// Requests refused at once because every node of the tenant was out of rotation.
    pub upstreams_down: IntCounterVec,
    /// Whether each upstream node is in rotation (1) or ejected (0), by `scheme://host:port`.
    pub upstream_node_up: IntGaugeVec,
    pub upstream_ejections: IntCounterVec,
    /// Client connections open now.
    pub client_connections: IntGauge,
    /// Client connections refused over a bound, by bound (`total`, `per_source`).
    pub connections_refused: IntCounterVec,
    /// Idle keep-alive client connections closed to make room for a new one.
    pub idle_connections_closed: IntCounter,
    pub response_bytes: IntCounterVec,
    pub auth_failures: IntCounterVec,
    /// `fhir_edge_token_cache_lookups_total{result="hit"|"miss"}`, resolved once (hot path).
    pub token_cache_hit: IntCounter,
    pub token_cache_miss: IntCounter,
    pub tokens_issued: IntCounterVec,
    pub token_failures: IntCounterVec,
    /// Registration portal actions (`signed_in`, `sign_in_failed`, `sign_in_throttled`,
    /// `client_created`, …): a fixed vocabulary, never an account or a client.
    pub portal_actions: IntCounterVec,
    pub reloads: IntCounterVec,
    pub config_generation: IntGaugeVec,
    pub config_last_success: IntGaugeVec,
    pub config_last_check: IntGaugeVec,
    pub routing_tenants: IntGauge,
    /// Tenants whose upstream host did not resolve when the current table was built.
    pub routing_unavailable: IntGauge,
    pub clients_registered: IntGauge,
    pub metadata_refresh_failures: IntCounter,
    pub audit_write_failures: IntCounter,
    pub audit_lines_dropped: IntCounter,
    /// TLS certificate reloads by listener and result (`applied`, `rejected`).
    pub tls_reloads: IntCounterVec,
    /// The earliest `notAfter` of each TLS listener's certificates.
    pub tls_expiry: IntGaugeVec,
    pub build_info: IntGaugeVec,
    pub jwks_fetches: IntCounterVec,
    pub jwks_keys: IntGaugeVec,
    pub jwks_last_success: IntGaugeVec,
    pub jwks_age: IntGaugeVec,
    pub jwks_unknown_kid_refetches: IntCounterVec,
    pub jwks_unknown_kid_refusals: IntCounterVec,
    /// The PostgreSQL client registry's series, registered only when that store is used.
    store: std::sync::OnceLock<StoreMetrics>,
}

/// `fhir_edge_registry_*`: a replica's snapshot of the PostgreSQL client registry.
struct StoreMetrics {
    connected: IntGauge,
    snapshot_age: IntGauge,
    changes_applied: IntCounter,
    resyncs: IntCounter,
    write_failures: IntCounter,
    rejected_rows: IntGauge,
}

impl StoreMetrics {
    fn new(r: &Registry) -> prometheus::Result<StoreMetrics> {
        let gauge = |name, help| int_gauge(r, name, help);
        let count = |name, help| int_counter(r, name, help);
        Ok(StoreMetrics {
            connected: gauge(
                "fhir_edge_registry_connected",
                "1 while this replica follows the client registry's database, 0 while it serves its last snapshot.",
            )?,
            snapshot_age: gauge(
                "fhir_edge_registry_snapshot_age_seconds",
                "Seconds since the client registry snapshot was last known current (-1: never read).",
            )?,
            changes_applied: count(
                "fhir_edge_registry_changes_applied_total",
                "Client changes read from the database into the snapshot.",
            )?,
            resyncs: count(
                "fhir_edge_registry_resyncs_total",
                "Whole reads of the client registry (at start, on every reconnect, and periodically).",
            )?,
            write_failures: count(
                "fhir_edge_registry_write_failures_total",
                "Client registry changes this replica could not make because the database was unavailable or read-only.",
            )?,
            rejected_rows: gauge(
                "fhir_edge_registry_rejected_clients",
                "Clients in the database that break the registry's rules and are left out of the snapshot.",
            )?,
        })
    }
}

/// Method classes (bounded).
pub(crate) fn method_class(method: &http::Method, search: bool, batch: bool) -> &'static str {
    match *method {
        http::Method::GET | http::Method::HEAD => "read",
        http::Method::POST if search => "search",
        http::Method::POST if batch => "batch",
        http::Method::POST | http::Method::PUT | http::Method::PATCH | http::Method::DELETE => {
            "write"
        }
        _ => "other",
    }
}

/// Status classes (bounded); 0 means no response was sent (the client went away).
pub(crate) fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn int_counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub(crate) fn new() -> prometheus::Result<Metrics> {
        let r = Registry::new();
        // The process's CPU seconds, resident and virtual memory, open and maximum file descriptors,
        // threads and start time, read from /proc at each scrape (`process_*`, Prometheus' standard
        // names): the figures memory targets and alerts are stated in.
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let lookups = counter(
            &r,
            "fhir_edge_token_cache_lookups_total",
            "Valid bearer tokens looked up in the verified-token cache, by result (hit, miss).",
            &["result"],
        )?;
        let m = Metrics {
            requests: counter(
                &r,
                "fhir_edge_requests_total",
                "Requests answered, by tenant, method class (read, search, batch, write, other) and status class.",
                &["tenant", "method", "status"],
            )?,
            request_duration: histogram(
                &r,
                "fhir_edge_request_duration_seconds",
                "Whole-request latency as fhir-edge saw it, by tenant.",
                &["tenant"],
            )?,
            upstream_duration: histogram(
                &r,
                "fhir_edge_upstream_duration_seconds",
                "Time from choosing the upstream to its response header, by tenant.",
                &["tenant"],
            )?,
            upstream_errors: counter(
                &r,
                "fhir_edge_upstream_errors_total",
                "Failed upstream exchanges, by tenant and kind (connect, timeout, reset, protocol, other).",
                &["tenant", "kind"],
            )?,
            throttled: counter(
                &r,
                "fhir_edge_throttled_requests_total",
                "Requests refused with 429 by a tenant's limits, by tenant and limit (rate, in_flight, client_rate).",
                &["tenant", "limit"],
            )?,
            upstream_retries: counter(
                &r,
                "fhir_edge_upstream_retries_total",
                "Requests sent to another node of the tenant after the first failed before any response byte, by tenant.",
                &["tenant"],
            )?,
            upstreams_down: counter(
                &r,
                "fhir_edge_upstreams_down_total",
                "Requests refused with 503 at once because every node of the tenant was out of rotation, by tenant.",
                &["tenant"],
            )?,
            upstream_node_up: gauge_vec(
                &r,
                "fhir_edge_upstream_node_up",
                "Whether an upstream node is in rotation (1) or ejected (0), by node (scheme://host:port).",
                &["node"],
            )?,
            upstream_ejections: counter(
                &r,
                "fhir_edge_upstream_ejections_total",
                "Times an upstream node was taken out of rotation, by node (scheme://host:port).",
                &["node"],
            )?,
            client_connections: int_gauge(
                &r,
                "fhir_edge_client_connections",
                "Client connections open now, on every proxy listener.",
            )?,
            connections_refused: counter(
                &r,
                "fhir_edge_client_connections_refused_total",
                "Client connections refused because a connection bound was reached and none was idle, by bound (total, per_source).",
                &["bound"],
            )?,
            idle_connections_closed: int_counter(
                &r,
                "fhir_edge_idle_connections_closed_total",
                "Idle keep-alive client connections closed to make room for a new connection.",
            )?,
            response_bytes: counter(
                &r,
                "fhir_edge_response_body_bytes_total",
                "Response body bytes sent to clients, by tenant.",
                &["tenant"],
            )?,
            auth_failures: counter(
                &r,
                "fhir_edge_auth_failures_total",
                "Requests refused by authentication or tenant selection, by reason.",
                &["reason"],
            )?,
            token_cache_hit: lookups.with_label_values(&["hit"]),
            token_cache_miss: lookups.with_label_values(&["miss"]),
            tokens_issued: counter(
                &r,
                "fhir_edge_tokens_issued_total",
                "Access tokens issued by the token endpoint, by client id.",
                &["client"],
            )?,
            token_failures: counter(
                &r,
                "fhir_edge_token_endpoint_failures_total",
                "Token and client-management requests refused, by error.",
                &["error"],
            )?,
            portal_actions: counter(
                &r,
                "fhir_edge_portal_actions_total",
                "Registration portal actions, by action (sign-ins, failed and throttled sign-ins, client and secret changes).",
                &["action"],
            )?,
            reloads: counter(
                &r,
                "fhir_edge_reloads_total",
                "Reloads of hot-reloaded files after start-up, by file (routes, clients) and result (applied, rejected).",
                &["file", "result"],
            )?,
            config_generation: gauge_vec(
                &r,
                "fhir_edge_config_generation",
                "Generation of the file's current contents (1 = as loaded at start-up), by file.",
                &["file"],
            )?,
            config_last_success: gauge_vec(
                &r,
                "fhir_edge_config_last_success_timestamp_seconds",
                "Unix time of the last successful load, by file.",
                &["file"],
            )?,
            config_last_check: gauge_vec(
                &r,
                "fhir_edge_config_last_check_timestamp_seconds",
                "Unix time the file was last read and checked for changes (each event and poll), by file.",
                &["file"],
            )?,
            routing_unavailable: int_gauge(
                &r,
                "fhir_edge_routing_unavailable_tenants",
                "Tenants of the current routing table whose upstream host did not resolve (answered 503 until it does).",
            )?,
            routing_tenants: int_gauge(
                &r,
                "fhir_edge_routing_tenants",
                "Tenants in the current routing table.",
            )?,
            clients_registered: int_gauge(
                &r,
                "fhir_edge_clients_registered",
                "Clients in the current client registry.",
            )?,
            metadata_refresh_failures: int_counter(
                &r,
                "fhir_edge_metadata_refresh_failures_total",
                "Failed fetches or validations of the upstream CapabilityStatement.",
            )?,
            audit_write_failures: int_counter(
                &r,
                "fhir_edge_audit_write_failures_total",
                "Audit log lines that could not be written.",
            )?,
            audit_lines_dropped: int_counter(
                &r,
                "fhir_edge_audit_lines_dropped_total",
                "Audit log lines dropped because the writer's queue was full (the sink is slower than the traffic).",
            )?,
            tls_reloads: counter(
                &r,
                "fhir_edge_tls_certificate_reloads_total",
                "TLS certificate reloads after start-up, by listener and result (applied, rejected: the old certificates keep serving).",
                &["listener", "result"],
            )?,
            tls_expiry: gauge_vec(
                &r,
                "fhir_edge_tls_certificate_expiry_timestamp_seconds",
                "The earliest notAfter of the certificates a TLS listener serves, Unix time.",
                &["listener"],
            )?,
            build_info: gauge_vec(
                &r,
                "fhir_edge_build_info",
                "Always 1; the labels say which build is running.",
                &["version"],
            )?,
            jwks_fetches: counter(
                &r,
                "fhir_edge_jwks_fetches_total",
                "Fetches of an issuer's keys, by issuer and result (ok, timeout, connect, http_status, too_large, invalid, issuer_mismatch, empty, held_back, error).",
                &["issuer", "result"],
            )?,
            jwks_keys: gauge_vec(
                &r,
                "fhir_edge_jwks_keys",
                "Verification keys held, by issuer.",
                &["issuer"],
            )?,
            jwks_last_success: gauge_vec(
                &r,
                "fhir_edge_jwks_last_success_timestamp_seconds",
                "Unix time of the last fetch that brought a usable key set, by issuer (0: never).",
                &["issuer"],
            )?,
            jwks_age: gauge_vec(
                &r,
                "fhir_edge_jwks_seconds_since_last_success",
                "Seconds since the last fetch that brought a usable key set, by issuer (-1: never).",
                &["issuer"],
            )?,
            jwks_unknown_kid_refetches: counter(
                &r,
                "fhir_edge_jwks_unknown_kid_refetches_total",
                "Key fetches caused by a token with a kid the issuer's keys did not hold, by issuer.",
                &["issuer"],
            )?,
            jwks_unknown_kid_refusals: counter(
                &r,
                "fhir_edge_jwks_unknown_kid_refusals_total",
                "Tokens refused because the issuer's keys hold no key with their kid, by issuer.",
                &["issuer"],
            )?,
            registry: r,
            store: std::sync::OnceLock::new(),
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(m)
    }

    /// Brings the file gauges and reload counters up to date from a hot-reloaded file's bookkeeping
    /// (called at scrape time, so the reload path stays free of metrics code).
    pub(crate) fn observe_file<T: Loadable>(&self, file: &str, live: &Live<T>) {
        let generation = live.generation.load(Ordering::Relaxed);
        self.config_generation
            .with_label_values(&[file])
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.config_last_success
            .with_label_values(&[file])
            .set(i64::try_from(live.last_success.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        self.config_last_check
            .with_label_values(&[file])
            .set(i64::try_from(live.last_check.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        for (result, total) in [
            ("applied", generation.saturating_sub(1)),
            ("rejected", live.failures.load(Ordering::Relaxed)),
        ] {
            let c = self.reloads.with_label_values(&[file, result]);
            // The bookkeeping only grows, so the counter only grows.
            c.inc_by(total.saturating_sub(c.get()));
        }
    }

    /// Registers the PostgreSQL registry's series (once; a file registry has none).
    pub(crate) fn attach_registry(&self) -> prometheus::Result<()> {
        if self.store.get().is_none() {
            let _ = self.store.set(StoreMetrics::new(&self.registry)?);
        }
        Ok(())
    }

    /// Brings the PostgreSQL registry's series up to date (at scrape time).
    pub(crate) fn observe_registry(&self, pg: &crate::token::clients::sync::PgRegistry) {
        let Some(m) = self.store.get() else { return };
        let st = &pg.status;
        m.connected
            .set(i64::from(st.connected.load(Ordering::Relaxed)));
        m.snapshot_age.set(
            pg.age()
                .map_or(-1, |a| i64::try_from(a).unwrap_or(i64::MAX)),
        );
        for (c, total) in [
            (&m.changes_applied, &st.changes_applied),
            (&m.resyncs, &st.resyncs),
            (&m.write_failures, &st.write_failures),
        ] {
            c.inc_by(total.load(Ordering::Relaxed).saturating_sub(c.get()));
        }
        m.rejected_rows
            .set(i64::try_from(st.rejected_rows.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    }

    /// Counts one fetch of an issuer's keys.
    pub(crate) fn jwks_fetch(&self, issuer: &str, result: &str) {
        self.jwks_fetches.with_label_values(&[issuer, result]).inc();
    }

    /// Gives an issuer its request-path counters (once, at start).
    pub(crate) fn attach_issuer(&self, issuer: &crate::auth::issuer::Issuer) {
        let label = issuer.spec.label.as_str();
        let _ = issuer.counters.set(crate::auth::issuer::IssuerCounters {
            refetches: self.jwks_unknown_kid_refetches.with_label_values(&[label]),
            refusals: self.jwks_unknown_kid_refusals.with_label_values(&[label]),
        });
    }

    /// Brings an issuer's key gauges up to date (at scrape time).
    pub(crate) fn observe_issuer(&self, issuer: &crate::auth::issuer::Issuer) {
        let label = issuer.spec.label.as_str();
        self.jwks_keys
            .with_label_values(&[label])
            .set(i64::try_from(issuer.keys().len()).unwrap_or(i64::MAX));
        if let Some(remote) = &issuer.remote {
            let last = remote.last_success.load(Ordering::Relaxed);
            self.jwks_last_success
                .with_label_values(&[label])
                .set(i64::try_from(last).unwrap_or(i64::MAX));
            let age = match last {
                0 => -1,
                t => i64::try_from(crate::time::now_unix().saturating_sub(t)).unwrap_or(i64::MAX),
            };
            self.jwks_age.with_label_values(&[label]).set(age);
        }
    }

    /// The Prometheus text exposition of everything.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("cannot encode metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_renders() {
        let m = Metrics::new().unwrap();
        m.requests.with_label_values(&["a", "read", "2xx"]).inc();
        m.request_duration.with_label_values(&["a"]).observe(0.01);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text
            .contains("fhir_edge_requests_total{method=\"read\",status=\"2xx\",tenant=\"a\"} 1"));
        assert!(text.contains("fhir_edge_build_info{version="));
        assert!(text.contains("# HELP fhir_edge_request_duration_seconds"));
    }

    #[test]
    fn classes_are_bounded() {
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(0), "none");
        assert_eq!(status_class(999), "none");
        assert_eq!(method_class(&http::Method::POST, true, false), "search");
        assert_eq!(method_class(&http::Method::POST, false, true), "batch");
        assert_eq!(method_class(&http::Method::POST, false, false), "write");
        assert_eq!(
            method_class(&"BREW".parse().unwrap(), false, false),
            "other"
        );
    }
}
