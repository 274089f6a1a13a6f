//! The PROXY protocol (HAProxy's, versions 1 and 2) on the listeners `proxy_protocol_listeners`
//! names: a load balancer that terminates nothing sends the client's address in a header before
//! the connection's first byte (before the TLS handshake on a TLS listener).
//!
//! Such a listener requires the header: a connection without one, with a malformed one, or whose
//! header does not arrive within the header deadline is closed. The header is believed only from a
//! peer in `trusted_proxies` (anyone else could claim any address): a connection from another peer
//! is closed before anything is read. The address the header gives becomes the connection's peer
//! address, so the connection bounds, the failed-login throttle, the audit log's `client_ip` and the
//! `X-Forwarded-For` sent upstream all see the client. A `LOCAL` (v2) or `UNKNOWN` (v1) header, which
//! balancers send for their own health checks, keeps the TCP peer.
//!
//! The header's framing is read here, exactly as long as it is (nothing of the request after it is
//! consumed); its contents are parsed by the `ppp` crate.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature's first bytes, enough to tell it from v1's `PROXY `.
const V2_START: &[u8; 6] = b"\r\n\r\n\0\r";
/// A v1 header is at most 107 bytes (HAProxy's specification, 2.1).
const V1_MAX: usize = 107;
/// The most of a v2 header's addresses and TLVs accepted (balancers send well under 1 KiB).
const V2_MAX_BODY: usize = 4096;

/// Which listeners expect the header, and from whom it is believed.
#[derive(Debug, Clone)]
pub(crate) struct ProxyProtocol {
    listeners: Vec<SocketAddr>,
    trusted: Vec<ipnet::IpNet>,
    timeout: Duration,
}

/// Why a connection was closed before its first request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error("the peer is not a trusted proxy")]
    Untrusted,
    #[error("no PROXY protocol header in time")]
    Timeout,
    #[error("no valid PROXY protocol header: {0}")]
    Malformed(String),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

impl ProxyProtocol {
    pub(crate) fn new(
        listeners: Vec<SocketAddr>,
        trusted: Vec<ipnet::IpNet>,
        timeout: Duration,
    ) -> ProxyProtocol {
        ProxyProtocol {
            listeners,
            trusted,
            timeout,
        }
    }

    /// Whether a connection accepted on `local` (the socket's own address) must send the header.
    fn expected_on(&self, local: Option<SocketAddr>) -> bool {
        let Some(local) = local else { return false };
        self.listeners
            .iter()
            .any(|l| l.port() == local.port() && (l.ip().is_unspecified() || l.ip() == local.ip()))
    }

    /// Reads the header from a connection whose TCP peer is `peer`: the client's address, or `None`
    /// when the header names none (`LOCAL`, `UNKNOWN`).
    pub(crate) async fn read<S: AsyncRead + Unpin + ?Sized>(
        &self,
        stream: &mut S,
        peer: Option<IpAddr>,
    ) -> Result<Option<SocketAddr>, Refused> {
        if !peer.is_some_and(|ip| self.trusted.iter().any(|n| n.contains(&ip))) {
            return Err(Refused::Untrusted);
        }
        let header = tokio::time::timeout(self.timeout, read_header(stream))
            .await
            .map_err(|_| Refused::Timeout)??;
        source(&header)
    }

    /// The socket of a connection whose listener expects the header (`None`: it does not), for
    /// [`accept`](Self::accept).
    pub(crate) fn expected_fd(&self, stream: &L4Stream) -> Option<std::os::unix::io::RawFd> {
        use std::os::unix::io::AsRawFd;
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(PeerAddr::as_inet).copied());
        self.expected_on(local).then(|| stream.as_raw_fd())
    }

    /// Reads the header of a connection (socket `fd`) that has its peer address in its socket
    /// digest, and makes the client's address that digest's peer address.
    pub(crate) async fn accept<S>(
        &self,
        stream: &mut S,
        fd: std::os::unix::io::RawFd,
    ) -> Result<(), Refused>
    where
        S: AsyncRead + GetSocketDigest + Unpin + ?Sized,
    {
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(PeerAddr::as_inet).map(|a| a.ip()));
        let source = self.read(stream, peer).await?;
        if let Some(source) = source {
            let digest = SocketDigest::from_raw_fd(fd);
            let _ = digest.peer_addr.set(Some(PeerAddr::Inet(source)));
            stream.set_socket_digest(digest);
        }
        Ok(())
    }
}

/// Reads exactly one header's bytes.
async fn read_header<S: AsyncRead + Unpin + ?Sized>(s: &mut S) -> Result<Vec<u8>, Refused> {
    let mut buf = vec![0u8; V2_START.len()];
    s.read_exact(&mut buf).await?;
    if buf == b"PROXY " {
        // Version 1: text up to CRLF.
        while !buf.ends_with(b"\r\n") {
            if buf.len() >= V1_MAX {
                return Err(Refused::Malformed("a version 1 line over 107 bytes".into()));
            }
            buf.push(s.read_u8().await?);
        }
        return Ok(buf);
    }
    if buf != V2_START {
        return Err(Refused::Malformed(
            "the connection did not start with one".into(),
        ));
    }
    // Version 2: a 16-byte header whose last two bytes are the length of what follows.
    buf.resize(16, 0);
    s.read_exact(&mut buf[V2_START.len()..]).await?;
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX_BODY {
        return Err(Refused::Malformed(format!(
            "a version 2 header of {len} bytes"
        )));
    }
    buf.resize(16 + len, 0);
    s.read_exact(&mut buf[16..]).await?;
    Ok(buf)
}

/// The client's address a complete header gives.
fn source(header: &[u8]) -> Result<Option<SocketAddr>, Refused> {
    use ppp::{v1, v2, HeaderResult};
    let bad = |e: String| Refused::Malformed(e);
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Unknown => None,
        }),
        HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (v2::Command::Local, _) => None,
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            (v2::Command::Proxy, _) => None,
        }),
        HeaderResult::V1(Err(e)) => Err(bad(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(bad(e.to_string())),
    }
}

/// Reads the header before the TLS handshake of the TLS listeners that expect it.
#[derive(Debug)]
pub(crate) struct BeforeTls(pub(crate) std::sync::Arc<ProxyProtocol>);

#[async_trait]
impl pingora::listeners::PreTlsProcess for BeforeTls {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let Some(fd) = self.0.expected_fd(stream) else {
            return Ok(());
        };
        self.0.accept(stream, fd).await.map_err(|e| {
            log::debug!("connection closed: {e}");
            pingora::Error::explain(pingora::ErrorType::AcceptError, "PROXY protocol header")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pp() -> ProxyProtocol {
        ProxyProtocol::new(
            vec!["0.0.0.0:8443".parse().unwrap()],
            vec!["10.0.0.0/8".parse().unwrap()],
            Duration::from_secs(1),
        )
    }

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, Refused>, Vec<u8>) {
        let mut s = bytes;
        let r = pp().read(&mut s, "10.1.2.3".parse().ok()).await;
        (r, s.to_vec())
    }

    #[tokio::test]
    async fn version_1_and_2_give_the_client_and_leave_the_request_unread() {
        let (r, rest) =
            read(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\nGET / HTTP/1.1\r\n").await;
        assert_eq!(r.unwrap(), "203.0.113.7:51000".parse().ok());
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (r, _) = read(b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n").await;
        assert_eq!(r.unwrap(), "[2001:db8::7]:51000".parse().ok());
        let (r, rest) = read(b"PROXY UNKNOWN\r\nG").await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"G");

        let v2 = |command: u8| {
            let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            h.extend_from_slice(&[0x20 | command, 0x11, 0, 12]);
            h.extend_from_slice(&[198, 51, 100, 9, 10, 0, 0, 1, 0xc3, 0x50, 1, 0xbb]);
            h.extend_from_slice(b"GET");
            h
        };
        let (r, rest) = read(&v2(1)).await;
        assert_eq!(r.unwrap(), "198.51.100.9:50000".parse().ok());
        assert_eq!(rest, b"GET");
        let (r, _) = read(&v2(0)).await;
        assert_eq!(r.unwrap(), None, "LOCAL keeps the TCP peer");
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 1 2",
        ] {
            assert!(
                read(bad).await.0.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("PROXY {}\r\n", "x".repeat(200));
        assert!(read(long.as_bytes()).await.0.is_err());
        let mut s: &[u8] = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n";
        let untrusted = pp().read(&mut s, "192.0.2.1".parse().ok()).await;
        assert!(matches!(untrusted, Err(Refused::Untrusted)));
        assert!(pp().expected_on("127.0.0.1:8443".parse().ok()));
        assert!(!pp().expected_on("127.0.0.1:8080".parse().ok()));
    }
}
