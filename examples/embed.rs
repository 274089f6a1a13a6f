//! A host Pingora server that mounts fhir-edge beside a service of its own.
//!
//! ```text
//! cargo run --example embed -- --config conf/fhir-edge.yaml --host-listen 127.0.0.1:8081
//! curl http://127.0.0.1:8081/             # the host's own service
//! curl http://127.0.0.1:8080/metadata     # fhir-edge, on the listeners its config names
//! ```
//! The host owns the server and the process: it picks the logger, the allocator and the crypto
//! provider; fhir-edge adds its proxy, its file reloader and its admin listener with one call.

use std::error::Error;
use std::path::PathBuf;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::server::Server;
use pingora::services::listening::Service;

/// The host's own service: answers every request with a greeting.
struct Hello;

#[async_trait]
impl ServeHttp for Hello {
    async fn response(&self, _session: &mut ServerSession) -> Response<Vec<u8>> {
        let body = b"hello from the host service\n".to_vec();
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::OK;
        r.headers_mut()
            .insert("content-type", http::HeaderValue::from_static("text/plain"));
        r
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let (config, host_listen) = args()?;
    fhir_edge::install_crypto_provider();
    fhir_edge::init_logging(log::LevelFilter::Info);

    let edge = fhir_edge::Edge::from_file(&config)?;
    let mut server = Server::new_with_opt_and_conf(None, edge.server_conf());
    server.bootstrap();
    edge.add_to(&mut server)?;

    let mut host = Service::new("host service".to_string(), HttpServer::new_app(Hello));
    host.add_tcp(&host_listen);
    host.threads = Some(1);
    server.add_service(host);
    server.run_forever()
}

/// `--config PATH --host-listen ADDR` (defaults: the shipped config, 127.0.0.1:8081).
fn args() -> Result<(PathBuf, String), Box<dyn Error>> {
    let mut config = PathBuf::from("conf/fhir-edge.yaml");
    let mut host_listen = "127.0.0.1:8081".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => config = args.next().ok_or("--config needs a path")?.into(),
            "--host-listen" => host_listen = args.next().ok_or("--host-listen needs an address")?,
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    Ok((config, host_listen))
}
