//! The framework floor for the load harness: the least a Pingora `ProxyHttp` can do, built with the same
//! Pingora, allocator and server settings as fhir-edge (one worker per proxy CPU, upstream keep-alive
//! pool, 16 KiB downstream write buffer, no per-connection request limit). Every request goes to one
//! fixed upstream, with no authentication, routing, header work, metrics or logging.
//!
//! It tells the `compare` table how much of fhir-edge's cost per request is Pingora's own and how much
//! is fhir-edge's. The harness starts it by running its own executable as
//! `load floor <listen addr> <upstream addr> <threads> <plain|chunked>`. `chunked` drops the upstream's
//! `Content-Length` so the response is re-framed chunked, as fhir-edge's link rewriting must do.

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::http::ResponseHeader;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;
use pingora::Result;

struct Floor {
    upstream: String,
    chunked: bool,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        if self.chunked {
            resp.remove_header(&http::header::CONTENT_LENGTH);
        }
        Ok(())
    }
}

/// Runs the floor proxy until the harness stops it (SIGTERM).
pub fn run(listen: &str, upstream: &str, threads: usize, chunked: bool) {
    let conf = ServerConf {
        threads,
        upstream_keepalive_pool_size: 4096,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut app = pingora::proxy::http_proxy(
        &server.configuration,
        Floor {
            upstream: upstream.to_string(),
            chunked,
        },
    );
    let mut options = HttpServerOptions::default();
    options.keepalive_request_limit = None;
    app.server_options = Some(options);
    let mut service = Service::new("pingora-floor".to_string(), app);
    service.add_listener(
        ListenerConfig::tcp(listen.to_string())
            .l4_buffer(L4BufferSettings::default().write(16 * 1024)),
    );
    server.add_service(service);
    server.run_forever();
}
