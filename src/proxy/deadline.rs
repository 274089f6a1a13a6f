//! The downstream HTTP/1 connection as the proxy phases see it: a total deadline for each request's
//! header block, a cap on its size, and a hold on flushes that the phases arm and release.
//!
//! Pingora's downstream read timeouts apply per read, so a client that sends one byte every few
//! seconds never trips them (slowloris). [`DownstreamConn`] wraps every accepted connection: the
//! clock starts when the connection opens and, for each later request, at its first byte; it stops
//! at the blank line that ends the header block (the *client's* bytes, read here). If it runs out
//! first, the read fails with `TimedOut` and Pingora closes the connection. A header block longer
//! than the configured limits is answered `431` here and the connection closed: Pingora would cut it
//! off at 1 MiB with a `400` of its own (RFC 6585 §5 names 431 for this).
//!
//! Nothing here reads the bytes Pingora writes. The phases tell the connection what happens, through
//! the handle [`downstream`] finds on the session: `logging` (always the last phase) says the
//! response has ended, so the next byte read starts the next request's clock (and, when more bytes
//! came than the request's body, the connection is not kept: a pipelined request was sent before
//! this response, which `logging` answers by closing); `response_filter`
//! asks to hold the flushes of a response whose length Pingora cannot know (a rewritten body, sent
//! chunked), which Pingora would otherwise flush after its header, after each chunk and after the
//! last chunk: three `send`s for a small Bundle instead of one. While a hold is armed a flush only
//! marks the written bytes as owed; they go out at the end of the response (`logging` finishes the
//! body, which flushes), before any read from the client (nothing held waits on the client or the
//! upstream), and at shutdown. A mistake here costs a segment, never a stuck response.
//!
//! The wrapper is installed by [`HeaderDeadline`], a `ServerApp` around the proxy application.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::proxy::Session;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::outcome::Outcome;
use crate::proxy::conns::{Admission, ConnectionGate};
use crate::proxy::proxy_protocol::ProxyProtocol;

/// Where a connection is in its request cycle, as far as the header goes.
const HEADER: u8 = 0;
/// The header block is complete (body, processing, response): no deadline.
const DONE: u8 = 1;
/// The response has ended: the next byte read starts a header.
const IDLE: u8 = 2;
/// The header block is over its size limit: answering 431, then discarding what the client sends.
const REFUSING: u8 = 3;

/// Finds the blank line (`\r\n\r\n`) that ends a request's header block in bytes read in pieces,
/// however they are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlankLine {
    /// How much of `\r\n\r\n` the bytes so far end with (0–3).
    seen: u8,
}

impl BlankLine {
    /// The offset in `data` just past the blank line, if it ends there (and the scanner starts
    /// afresh); otherwise remembers how much of one `data` ends with.
    pub fn find(&mut self, data: &[u8]) -> Option<usize> {
        // Finish one the previous piece began, a byte at a time.
        let mut i = 0;
        while self.seen > 0 && i < data.len() {
            self.seen = match (self.seen, data[i]) {
                (1 | 3, b'\n') | (2, b'\r') => self.seen + 1,
                (_, b'\r') => 1,
                _ => 0,
            };
            i += 1;
            if self.seen == 4 {
                self.seen = 0;
                return Some(i);
            }
        }
        let rest = &data[i..];
        if let Some(at) = memchr::memmem::find(rest, b"\r\n\r\n") {
            return Some(i + at + 4);
        }
        if !rest.is_empty() {
            // `seen` is 0 here: only `rest` can begin one.
            self.seen = if rest.ends_with(b"\r\n\r") {
                3
            } else if rest.ends_with(b"\r\n") {
                2
            } else {
                u8::from(rest.ends_with(b"\r"))
            };
        }
        None
    }
}

/// A downstream connection with a header deadline, a header size cap and a flush hold.
#[derive(Debug)]
pub(crate) struct DownstreamConn {
    inner: Stream,
    limit: Duration,
    max_header_bytes: usize,
    /// `HEADER`, `DONE`, `IDLE` or `REFUSING`; the phases move it to `IDLE` through `&self`.
    phase: AtomicU8,
    timer: Option<Pin<Box<Sleep>>>,
    header_bytes: usize,
    /// Client bytes read after the current request's header block: its body, and anything the
    /// client sent before this response (a pipelined request).
    after_header: AtomicUsize,
    blank: BlankLine,
    /// The 431 still to be written while refusing, and how much of it has been.
    refusal: Option<(Vec<u8>, usize)>,
    /// Armed by `response_filter`, released when the response ends or fails.
    hold: AtomicBool,
    /// A flush was skipped while holding: the inner stream has bytes it has not sent.
    owed: bool,
    /// The connection's place under the connection bounds (given back when it drops).
    admission: Option<Admission>,
}

impl DownstreamConn {
    pub(crate) fn new(inner: Stream, limit: Duration, max_header_bytes: usize) -> DownstreamConn {
        DownstreamConn {
            inner,
            limit,
            max_header_bytes,
            // The first request's clock starts when the connection opens.
            phase: AtomicU8::new(HEADER),
            timer: Some(Box::pin(tokio::time::sleep(limit))),
            header_bytes: 0,
            after_header: AtomicUsize::new(0),
            blank: BlankLine::default(),
            refusal: None,
            hold: AtomicBool::new(false),
            owed: false,
            admission: None,
        }
    }

    /// Holds the connection's admission: between requests it may be closed to make room.
    pub(crate) fn admitted(mut self, admission: Admission) -> DownstreamConn {
        self.admission = Some(admission);
        self
    }

    /// Holds flushes until the response ends (see the module documentation).
    pub(crate) fn hold_flushes(&self) {
        self.hold.store(true, Ordering::Relaxed);
    }

    /// Lets flushes through again (an error response replaces the one being held). Returns whether
    /// a hold was armed.
    pub(crate) fn release_flushes(&self) -> bool {
        self.hold.swap(false, Ordering::Relaxed)
    }

    /// The response has ended: releases any hold (returning whether there was one) and makes the
    /// next byte read start the next request's header clock.
    pub(crate) fn response_ended(&self) -> bool {
        let ended = self
            .phase
            .compare_exchange(DONE, IDLE, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if let Some(a) = self.admission.as_ref().filter(|_| ended) {
            a.slot().mark_idle();
        }
        self.release_flushes()
    }

    /// How many client bytes were read after the current request's header block. More than its
    /// body means the client sent more before this response ended (a pipelined request).
    pub(crate) fn bytes_after_header(&self) -> usize {
        self.after_header.load(Ordering::Relaxed)
    }

    fn start_header(&mut self) {
        *self.phase.get_mut() = HEADER;
        self.header_bytes = 0;
        *self.after_header.get_mut() = 0;
        self.blank = BlankLine::default();
        self.timer = Some(Box::pin(tokio::time::sleep_until(
            Instant::now() + self.limit,
        )));
    }

    /// Follows newly read client bytes; returns false when the header block is over its limit.
    fn saw(&mut self, data: &[u8]) -> bool {
        if data.is_empty() {
            return true;
        }
        if *self.phase.get_mut() == IDLE {
            self.start_header();
        }
        if *self.phase.get_mut() != HEADER {
            *self.after_header.get_mut() += data.len();
            return true;
        }
        if let Some(end) = self.blank.find(data) {
            *self.phase.get_mut() = DONE;
            self.timer = None;
            self.header_bytes += end;
            *self.after_header.get_mut() += data.len() - end;
            return true;
        }
        self.header_bytes += data.len();
        self.header_bytes <= self.max_header_bytes
    }

    /// Writes the 431, then reads and drops what the client sends until it has sent its header's end,
    /// closed, or run out of time: a client still writing when the socket closed would get a reset
    /// instead of the answer. Ready means end of stream for Pingora.
    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some((wire, at)) = self.refusal.as_mut() {
            while *at < wire.len() {
                *at += ready!(Pin::new(&mut self.inner).poll_write(cx, &wire[*at..]))?;
            }
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
            self.refusal = None;
        }
        let mut scratch = [0u8; 8192];
        loop {
            if self
                .timer
                .as_mut()
                .is_some_and(|t| t.as_mut().poll(cx).is_ready())
            {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() || self.blank.find(buf.filled()).is_some() {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncRead for DownstreamConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.owed {
            // A read may wait long (for the next request, or while the upstream answers): nothing
            // held may wait with it.
            ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
            this.owed = false;
        }
        if *this.phase.get_mut() == REFUSING {
            return this.poll_refuse(cx);
        }
        let idle = *this.phase.get_mut() == IDLE;
        if let Some(a) = this.admission.as_ref().filter(|_| idle) {
            // Between requests: the connection gate may close this connection to make room. The
            // waker is registered before the check, so a close in between still wakes this read.
            a.slot().park(cx.waker());
            if a.slot().closing() {
                return Poll::Ready(Ok(()));
            }
        }
        if *this.phase.get_mut() == HEADER {
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
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(a) = this.admission.as_ref().filter(|_| idle) {
            if buf.filled().len() > before && !a.slot().mark_busy() {
                // Chosen to be closed as this request arrived: it is not served (end of stream).
                buf.set_filled(before);
                return Poll::Ready(Ok(()));
            }
        }
        if !this.saw(&buf.filled()[before..]) {
            // Pingora never sees these bytes: the client is answered here.
            buf.set_filled(before);
            *this.phase.get_mut() = REFUSING;
            this.refusal = Some((Outcome::HeadersTooLarge.closing_response(), 0));
            log::debug!("request header block over its limit: 431");
            return this.poll_refuse(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for DownstreamConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if *this.hold.get_mut() {
            // The inner stream keeps the bytes; the end of the response, or the next read, sends them.
            this.owed = true;
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        this.owed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        // Shutting down flushes the inner stream's buffer first.
        *this.hold.get_mut() = false;
        this.owed = false;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The downstream HTTP/1 connection of a session (every accepted connection has one; an HTTP/2
/// stream has none).
pub(crate) fn downstream(session: &Session) -> Option<&DownstreamConn> {
    session.stream()?.as_any().downcast_ref::<DownstreamConn>()
}

#[async_trait]
impl Shutdown for DownstreamConn {
    async fn shutdown(&mut self) {
        *self.hold.get_mut() = false;
        self.inner.shutdown().await
    }
}

impl UniqueID for DownstreamConn {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for DownstreamConn {
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

impl GetTimingDigest for DownstreamConn {
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

impl GetProxyDigest for DownstreamConn {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for DownstreamConn {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for DownstreamConn {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// Wraps a server application so every connection is a [`DownstreamConn`].
pub(crate) struct HeaderDeadline<A> {
    inner: Arc<A>,
    limit: Duration,
    max_header_bytes: usize,
    gate: Arc<ConnectionGate>,
    proxy_protocol: Option<Arc<ProxyProtocol>>,
}

impl<A> HeaderDeadline<A> {
    /// `limit` is the total time for a header block; `max_header_bytes` its size on the wire;
    /// `gate` admits (or refuses) each new connection; `proxy_protocol` names the plain listeners
    /// whose connections start with a PROXY protocol header (TLS ones read it before the handshake).
    pub(crate) fn new(
        inner: A,
        limit: Duration,
        max_header_bytes: usize,
        gate: Arc<ConnectionGate>,
        proxy_protocol: Option<Arc<ProxyProtocol>>,
    ) -> HeaderDeadline<A> {
        HeaderDeadline {
            inner: Arc::new(inner),
            limit,
            max_header_bytes,
            gate,
            proxy_protocol,
        }
    }
}

/// Reads the PROXY protocol header of a new plain connection on a listener that expects one.
/// False: the connection is to be closed.
async fn proxy_header(pp: &ProxyProtocol, session: &mut Stream) -> bool {
    // A TLS stream is no plain `Stream` here: its header was read before its handshake.
    let Some(fd) = session
        .as_any()
        .downcast_ref::<pingora::protocols::l4::stream::Stream>()
        .and_then(|l4| pp.expected_fd(l4))
    else {
        return true;
    };
    match pp.accept(&mut **session, fd).await {
        Ok(()) => true,
        Err(e) => {
            log::debug!("connection closed: {e}");
            false
        }
    }
}

/// Answers a connection refused by the connection gate with a `503` and closes it. What the client
/// sends is read (up to its header's end, briefly) so closing does not reset the answer away.
async fn refuse(mut stream: Stream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let wire = Outcome::TooManyConnections.closing_response();
    let answer = async {
        stream.write_all(&wire).await?;
        stream.flush().await?;
        let mut blank = BlankLine::default();
        let mut buf = [0u8; 4096];
        let mut read = 0;
        loop {
            let n = stream.read(&mut buf).await?;
            read += n;
            if n == 0 || blank.find(&buf[..n]).is_some() || read > 64 * 1024 {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeaderDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // HTTP/2 (ALPN `h2`) has frames, not a header block to time: its own limits (Pingora's
        // concurrent-stream and header-list bounds, h2's reset-flood defences) apply instead.
        let h2 = session.selected_alpn_proto() == Some(ALPN::H2);
        if session.as_any().is::<DownstreamConn>() {
            // A kept-alive HTTP/1 connection back for its next request: already admitted.
            return self.inner.process_new(session, shutdown).await;
        }
        let mut session = session;
        if let Some(pp) = &self.proxy_protocol {
            if !proxy_header(pp, &mut session).await {
                return None;
            }
        }
        let peer = session
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let admission = match self.gate.admit(peer) {
            Ok(a) => a,
            Err(bound) => {
                log::debug!("connection refused: {} bound reached", bound.as_str());
                if !h2 {
                    refuse(session).await;
                }
                return None;
            }
        };
        if h2 {
            // The HTTP/2 connection is served whole by this call; it holds its admission meanwhile.
            let result = self.inner.process_new(session, shutdown).await;
            drop(admission);
            return result;
        }
        let conn = DownstreamConn::new(session, self.limit, self.max_header_bytes);
        self.inner
            .process_new(Box::new(conn.admitted(admission)), shutdown)
            .await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

#[cfg(test)]
#[path = "deadline_tests.rs"]
mod tests;
