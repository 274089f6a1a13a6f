//! A total deadline for reading each request's header block (slowloris defence).
//!
//! Pingora's downstream read timeouts apply per read: a client that sends one byte every few seconds
//! never trips them and can hold a connection (and its memory) for as long as its header allowance
//! lasts. This module wraps every accepted connection in [`HeaderDeadlineStream`], which watches the
//! bytes going in and out: the clock starts when a connection opens (for its first request) or at the
//! first byte of each following request, and stops at the blank line that ends the header block; if it
//! runs out first, the read fails with `TimedOut` and Pingora closes the connection. Bodies are not
//! covered (they have per-read timeouts and size limits), and the clock restarts only after a final
//! (non-1xx) response status line has been written, so a `100 Continue` does not arm it mid-body.
//!
//! The wrapper is installed by [`HeaderDeadline`], a `ServerApp` around the proxy application.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Where a connection is in its request/response cycle, as far as header timing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests: the next byte read starts a header.
    Idle,
    /// Reading a header block; the deadline runs.
    Header,
    /// The header block is complete (body, processing, response): no header deadline.
    Done,
}

/// A connection with a total header-read deadline.
#[derive(Debug)]
pub struct HeaderDeadlineStream {
    inner: Stream,
    limit: Duration,
    phase: Phase,
    timer: Option<Pin<Box<Sleep>>>,
    /// The last bytes of the header read so far (to find `\r\n\r\n` across reads).
    tail: [u8; 3],
    /// Whether the next write is the start of a response header (an `HTTP/1.x` status line).
    response_start: bool,
}

impl HeaderDeadlineStream {
    pub fn new(inner: Stream, limit: Duration) -> HeaderDeadlineStream {
        HeaderDeadlineStream {
            inner,
            limit,
            // The first request's clock starts when the connection opens.
            phase: Phase::Header,
            timer: Some(Box::pin(tokio::time::sleep(limit))),
            tail: [0; 3],
            response_start: false,
        }
    }

    fn arm(&mut self) {
        self.phase = Phase::Header;
        self.tail = [0; 3];
        self.timer = Some(Box::pin(tokio::time::sleep_until(
            Instant::now() + self.limit,
        )));
    }

    /// Scans newly read bytes for the end of the header block.
    fn saw(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.phase == Phase::Idle {
            self.arm();
        }
        if self.phase != Phase::Header {
            return;
        }
        // The blank line may straddle the previous read: look at the last three bytes before this
        // read joined with up to three of its own, then at this read alone.
        let head = &data[..data.len().min(3)];
        let mut seam = [0u8; 6];
        seam[..3].copy_from_slice(&self.tail);
        seam[3..3 + head.len()].copy_from_slice(head);
        if memchr::memmem::find(&seam[..3 + head.len()], b"\r\n\r\n").is_some()
            || memchr::memmem::find(data, b"\r\n\r\n").is_some()
        {
            self.phase = Phase::Done;
            self.timer = None;
            self.response_start = true;
            return;
        }
        // The last three bytes seen, this read's own if it has three.
        let mut last = [0u8; 6];
        last[..3].copy_from_slice(&self.tail);
        let keep = data.len().min(3);
        last[3..3 + keep].copy_from_slice(&data[data.len() - keep..]);
        self.tail.copy_from_slice(&last[keep..keep + 3]);
    }

    /// Notes the start of what is written: a final status line ends the request cycle.
    fn wrote(&mut self, data: &[u8]) {
        if !self.response_start || data.is_empty() {
            return;
        }
        // `HTTP/1.1 200 …`: the status code's first digit is byte 9.
        if data.len() >= 10 && data.starts_with(b"HTTP/1.") {
            if data[9] != b'1' {
                self.response_start = false;
                self.phase = Phase::Idle;
            }
        } else {
            self.response_start = false;
        }
    }
}

impl AsyncRead for HeaderDeadlineStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.phase == Phase::Header {
            if let Some(t) = this.timer.as_mut() {
                if t.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "request header deadline",
                    )));
                }
            }
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &res {
            this.saw(&buf.filled()[before..]);
        }
        res
    }
}

impl AsyncWrite for HeaderDeadlineStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            this.wrote(&buf[..*n]);
        }
        res
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        // Written one slice at a time so the status-line check sees where each write starts.
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[async_trait]
impl Shutdown for HeaderDeadlineStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeaderDeadlineStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadlineStream {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadlineStream {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadlineStream {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for HeaderDeadlineStream {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for HeaderDeadlineStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// Wraps a server application so every connection gets a [`HeaderDeadlineStream`].
pub struct HeaderDeadline<A> {
    inner: Arc<A>,
    limit: Duration,
}

impl<A> HeaderDeadline<A> {
    pub fn new(inner: A, limit: Duration) -> HeaderDeadline<A> {
        HeaderDeadline {
            inner: Arc::new(inner),
            limit,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeaderDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A kept-alive connection comes back already wrapped.
        let stream: Stream = if session.as_any().is::<HeaderDeadlineStream>() {
            session
        } else {
            Box::new(HeaderDeadlineStream::new(session, self.limit))
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

impl HeaderDeadlineStream {
    /// For tests: the current phase's name.
    #[cfg(test)]
    fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Idle => "idle",
            Phase::Header => "header",
            Phase::Done => "done",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn wrapped(limit_ms: u64) -> (HeaderDeadlineStream, tokio::net::UnixStream) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let inner: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(a));
        (
            HeaderDeadlineStream::new(inner, Duration::from_millis(limit_ms)),
            b,
        )
    }

    #[tokio::test]
    async fn a_trickled_header_is_cut_off_and_a_complete_one_is_not() {
        let (mut s, mut client) = wrapped(200);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        assert_eq!(s.phase_name(), "done");
        // The response ends the cycle; the next request's first byte starts a new clock.
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(s.phase_name(), "idle");
        client.write_all(b"G").await.unwrap();
        let _ = s.read(&mut buf).await.unwrap();
        assert_eq!(s.phase_name(), "header");
        let err = s.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn the_end_of_the_header_is_found_wherever_the_reads_cut_it() {
        let request = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: \r\r\n\r\nbody";
        let end = request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        for cut in 1..request.len() {
            let (mut s, _client) = wrapped(5_000);
            let mut fed = 0;
            for piece in request.chunks(cut) {
                assert_eq!(s.phase_name(), "header", "cut {cut}, {fed} bytes in");
                s.saw(piece);
                fed += piece.len();
                if fed >= end {
                    break;
                }
            }
            assert_eq!(s.phase_name(), "done", "cut {cut}");
        }
    }

    #[tokio::test]
    async fn a_continue_response_does_not_rearm_the_clock() {
        let (mut s, mut client) = wrapped(5_000);
        client
            .write_all(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
        assert_eq!(s.phase_name(), "done");
    }
}
