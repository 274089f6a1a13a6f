//! The admin listener (default `127.0.0.1:9089`): `/metrics`, `/healthz`, `/readyz`.
//!
//! A separate Pingora service on its own address, never reachable through the public listener (the
//! proxy has no route to it). `/healthz` says the process serves HTTP; `/readyz` says it should get
//! traffic: the routing table and client registry are loaded and the signing key signs and verifies.
//! Once a graceful shutdown starts, Pingora stops this listener too, so readiness goes away first.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::ops::metrics::Metrics;
use crate::reload::Live;
use crate::routing::RoutingTable;
use crate::token::clients::ClientStore;
use crate::token::endpoint::TokenService;

pub(crate) struct Admin {
    pub metrics: Arc<Metrics>,
    pub routes: Arc<Live<RoutingTable>>,
    pub token: Option<Arc<TokenService>>,
    pub issuers: Vec<Arc<crate::auth::issuer::Issuer>>,
    /// Upstream node health, whose up/down gauges are brought up to date at each scrape.
    pub routing: Arc<crate::routing::RoutingState>,
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

impl Admin {
    /// Why the process should not get traffic, if anything.
    fn not_ready(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.routes.load().is_empty() {
            why.push("the routing table is empty".to_string());
        }
        if let Some(t) = &self.token {
            if let Err(e) = t.settings.keys.self_check() {
                why.push(format!("the signing key does not work: {e}"));
            }
            if let Some(e) = t.clients.not_ready() {
                why.push(e);
            }
        }
        for issuer in &self.issuers {
            if issuer.keys().is_empty() {
                why.push(format!(
                    "issuer {} has no keys yet (fetched or cached)",
                    issuer.spec.label
                ));
            }
        }
        why
    }

    fn metrics_text(&self) -> Vec<u8> {
        self.metrics.observe_file("routes", &self.routes);
        let table = self.routes.load();
        self.metrics
            .routing_tenants
            .set(i64::try_from(table.len()).unwrap_or(i64::MAX));
        self.metrics
            .routing_unavailable
            .set(i64::try_from(table.unavailable().len()).unwrap_or(i64::MAX));
        if let Some(t) = &self.token {
            match &t.clients {
                ClientStore::File(live) => self.metrics.observe_file("clients", live),
                ClientStore::Postgres(pg) => self.metrics.observe_registry(pg),
            }
            self.metrics
                .clients_registered
                .set(i64::try_from(t.clients.load().len()).unwrap_or(i64::MAX));
        }
        for issuer in &self.issuers {
            self.metrics.observe_issuer(issuer);
        }
        // A node whose ejection ran out is back in rotation even before a request proves it.
        for node in self.routing.nodes.live() {
            node.refresh_gauge();
        }
        self.metrics.render()
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        if req.method != Method::GET && req.method != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"GET only\n".to_vec(),
            );
        }
        match req.uri.path() {
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics_text(),
            ),
            "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                let why = self.not_ready();
                if why.is_empty() {
                    // Ready, with what serves less than it should named (never a reason to take
                    // the replica out: the other tenants are served).
                    let table = self.routes.load();
                    let mut body = b"ready\n".to_vec();
                    if !table.unavailable().is_empty() {
                        body.extend_from_slice(
                            format!(
                                "unavailable tenants (upstream host does not resolve): {}\n",
                                table.unavailable().join(", ")
                            )
                            .as_bytes(),
                        );
                    }
                    let (down, more) = table.all_nodes_out(20);
                    if !down.is_empty() {
                        let more = if more > 0 {
                            format!(" and {more} more")
                        } else {
                            String::new()
                        };
                        body.extend_from_slice(
                            format!(
                                "tenants with every upstream node out of rotation: {}{more}\n",
                                down.join(", ")
                            )
                            .as_bytes(),
                        );
                    }
                    reply(StatusCode::OK, "text/plain", body)
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        (why.join("\n") + "\n").into_bytes(),
                    )
                }
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"/metrics, /healthz, /readyz\n".to_vec(),
            ),
        }
    }
}
