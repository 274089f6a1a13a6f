//! Upstream FHIR servers: base-URL parsing and the ready-to-use Pingora peer.
//!
//! An upstream base URL (`https://fhir.contoso.example/r4`) is parsed and checked once, when the file
//! that names it loads; its host is resolved there too, off the request path, because
//! `HttpPeer::new` resolves names synchronously and panics when a name does not resolve. What the
//! request path sees is an [`Upstream`]: a prebuilt `HttpPeer`, the `Host` header value and the base
//! path, cloned per request without parsing anything.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use pingora::upstreams::peer::{HttpPeer, HttpUpstreamRequestPolicy};

use crate::fhir::rewrite::Rewrites;
use crate::routing::nodes::NodeHealth;

/// A parsed and checked upstream base URL (not yet resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    /// Host as written, without brackets for IPv6 literals.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written in the URL (the `Host` header we send).
    pub authority: String,
    /// Base path without a trailing slash; empty for the root.
    pub base_path: String,
}

impl UpstreamUrl {
    /// Parses an absolute `http`/`https` base URL with a host, no userinfo, no query, no fragment.
    pub fn parse(s: &str) -> Result<UpstreamUrl, String> {
        if s.contains('#') {
            return Err("must not contain a fragment".into());
        }
        let uri: http::Uri = s
            .parse()
            .map_err(|_| "is not a valid absolute URL".to_string())?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(_) => return Err("scheme must be http or https".into()),
            None => return Err("must be an absolute URL with a scheme and a host".into()),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| "must have a host".to_string())?;
        if authority.as_str().contains('@') {
            return Err("must not contain userinfo (user:password@); use upstream_headers".into());
        }
        let host = authority.host();
        if host.is_empty() {
            return Err("must have a host".into());
        }
        if uri.query().is_some() {
            return Err("must not contain a query string".into());
        }
        let port = match authority.port() {
            Some(p) => p.as_u16(),
            None if authority.as_str().ends_with(':') => return Err("has an empty port".into()),
            None if tls => 443,
            None => 80,
        };
        if port == 0 {
            return Err("port must not be 0".into());
        }
        let path = uri.path().trim_end_matches('/');
        if path.contains("/./")
            || path.contains("/../")
            || path.ends_with("/.")
            || path.ends_with("/..")
        {
            return Err("path must not contain dot segments".into());
        }
        Ok(UpstreamUrl {
            tls,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            authority: authority.as_str().to_string(),
            base_path: path.to_string(),
        })
    }

    /// The URL again, normalised (no trailing slash).
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.base_path)
    }

    /// `scheme://host:port`: the node's name in metrics and logs, and its health's key.
    pub fn node_label(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let port = self.port;
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{port}", self.host)
        } else {
            format!("{scheme}://{}:{port}", self.host)
        }
    }

    /// Resolves the host (blocking DNS). Called when a file loads, never on the request path.
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        let mut addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("host does not resolve: {e}"))?;
        addrs
            .next()
            .ok_or_else(|| "host resolves to no address".to_string())
    }
}

/// How to connect to an upstream: the knobs shared by the routing table and the metadata upstream.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub tls_verify: bool,
    pub sni: Option<String>,
    /// DER certificates trusted for this upstream instead of the system roots.
    pub ca_der: Option<Vec<Vec<u8>>>,
    /// Connections are pooled per group: one group per tenant keeps tenants that share an upstream
    /// address from ever sharing a connection.
    pub group_key: u64,
    /// What upstream links are rewritten to.
    pub public_base: String,
    /// Base URLs the upstream uses in its links besides its own URL (a server that advertises an
    /// external name, say).
    pub link_bases: Vec<String>,
}

/// A resolved upstream, ready for the request path.
#[derive(Debug)]
pub struct Upstream {
    pub peer: HttpPeer,
    /// Value of the `Host` header sent upstream.
    pub host: HeaderValue,
    /// Base path without a trailing slash.
    pub base_path: String,
    /// Normalised base URL, for logs.
    pub base_url: String,
    /// Upstream base URLs → the public base, for response headers and JSON bodies.
    pub rewrites: Rewrites,
    /// Why the host has no address (it did not resolve when the table was built): the tenant is
    /// unavailable (503) until a rebuild resolves it.
    pub unresolved: Option<Box<str>>,
    /// The host is a DNS name (not an address literal): its address can change.
    pub named: bool,
    /// The server's health, shared by every tenant and table that names it.
    pub health: Arc<NodeHealth>,
}

impl Upstream {
    pub fn build(
        url: &UpstreamUrl,
        addr: SocketAddr,
        s: &PeerSettings,
        health: Arc<NodeHealth>,
    ) -> Result<Upstream, String> {
        let sni = match (&s.sni, url.tls) {
            (Some(sni), _) => sni.clone(),
            (None, true) => url.host.clone(),
            (None, false) => String::new(),
        };
        let mut peer = HttpPeer::new(addr, url.tls, sni);
        peer.group_key = s.group_key;
        let o = &mut peer.options;
        o.connection_timeout = Some(s.connect_timeout);
        o.total_connection_timeout = Some(s.connect_timeout.saturating_mul(2));
        o.read_timeout = Some(s.read_timeout);
        o.write_timeout = Some(s.write_timeout);
        o.idle_timeout = Some(s.idle_timeout);
        o.verify_cert = s.tls_verify;
        o.verify_hostname = s.tls_verify;
        // FHIR has no use for protocol upgrades; never forward an Upgrade handshake.
        o.http_upstream_request_policy = HttpUpstreamRequestPolicy::deny_upgrades();
        if let Some(ders) = &s.ca_der {
            let mut list = Vec::with_capacity(ders.len());
            for der in ders {
                // WrappedX509::new panics on DER it cannot parse, so parse first.
                if x509_parser::parse_x509_certificate(der).is_err() {
                    return Err("ca_file holds a certificate that does not parse".into());
                }
                list.push(pingora::utils::tls::WrappedX509::new(
                    der.clone(),
                    pingora::utils::tls::parse_x509,
                ));
            }
            let ca: Arc<pingora::protocols::tls::CaType> = Arc::from(list.into_boxed_slice());
            o.ca = Some(ca);
        }
        let host = HeaderValue::from_str(&url.authority)
            .map_err(|_| "host is not a valid Host header value".to_string())?;
        let mut bases = vec![url.base_url()];
        bases.extend(s.link_bases.iter().cloned());
        Ok(Upstream {
            peer,
            host,
            base_path: url.base_path.clone(),
            base_url: url.base_url(),
            rewrites: Rewrites::new(&bases, &s.public_base),
            unresolved: None,
            named: url
                .host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_err(),
            health,
        })
    }
}

/// Reads a PEM file of CA certificates into DER blobs.
pub(crate) fn read_ca_file(path: &std::path::Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut out = Vec::new();
    for cert in iter {
        let cert = cert.map_err(|e| format!("not a PEM certificate file: {e}"))?;
        out.push(cert.as_ref().to_vec());
    }
    if out.is_empty() {
        return Err("contains no PEM certificate".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_base_urls() {
        let u = UpstreamUrl::parse("https://fhir.contoso.example/r4/").unwrap();
        assert!(u.tls);
        assert_eq!(u.port, 443);
        assert_eq!(u.base_path, "/r4");
        assert_eq!(u.authority, "fhir.contoso.example");
        assert_eq!(u.base_url(), "https://fhir.contoso.example/r4");
        let u = UpstreamUrl::parse("http://127.0.0.1:8090").unwrap();
        assert_eq!((u.port, u.base_path.as_str()), (8090, ""));
        let u = UpstreamUrl::parse("http://[::1]:8090/fhir").unwrap();
        assert_eq!(u.host, "::1");
    }

    #[test]
    fn rejects_bad_base_urls() {
        for bad in [
            "fhir.example/r4",
            "ftp://fhir.example/",
            "https://user:pw@fhir.example/r4",
            "https://fhir.example/r4?x=1",
            "https://fhir.example/r4#top",
            "https:///r4",
            "http://fhir.example:0/",
            "http://fhir.example/a/../b",
            "",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
