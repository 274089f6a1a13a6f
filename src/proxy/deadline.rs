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
//! The same wrapper holds back the intermediate flushes of a chunked response the proxy asks it to
//! ([`HeaderDeadlineStream::hold_response`], [`crate::proxy::coalesce`]), so a small rewritten response
//! leaves in one `send`.
//!
//! The wrapper is installed by [`HeaderDeadline`], a `ServerApp` around the proxy application.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
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

use crate::proxy::coalesce::HeldFlush;

/// What the proxy asked for through [`HeaderDeadlineStream::hold_response`] and
/// [`HeaderDeadlineStream::release_response`], applied at the next read, write or flush.
const NO_REQUEST: u8 = 0;
const HOLD: u8 = 1;
const RELEASE: u8 = 2;

/// Finds the blank line (`\r\n\r\n`) that ends an HTTP header block in bytes that come in pieces,
/// however they are cut: the request headers read here, and the response headers
/// [`crate::proxy::coalesce`] follows as they are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct BlankLine {
    /// How much of `\r\n\r\n` the bytes so far end with (0–3).
    seen: u8,
}

impl BlankLine {
    /// The offset in `data` just past the blank line, if it ends there (and the scanner starts
    /// afresh); otherwise remembers how much of one `data` ends with.
    pub(crate) fn find(&mut self, data: &[u8]) -> Option<usize> {
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

/// For the randomized tests of the scanner and of the framing that uses it: a small xorshift
/// generator, the same sequence on every run.
#[cfg(test)]
pub(crate) fn test_random(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

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
    /// How much of the header's closing blank line the reads so far end with.
    blank: BlankLine,
    /// Whether the next write is the start of a response header (an `HTTP/1.x` status line).
    response_start: bool,
    /// Flushes held back for the response being written.
    held: HeldFlush,
    /// A hold or release asked for by the proxy (which only has a shared reference).
    request: AtomicU8,
}

impl HeaderDeadlineStream {
    pub fn new(inner: Stream, limit: Duration) -> HeaderDeadlineStream {
        HeaderDeadlineStream {
            inner,
            limit,
            // The first request's clock starts when the connection opens.
            phase: Phase::Header,
            timer: Some(Box::pin(tokio::time::sleep(limit))),
            blank: BlankLine::default(),
            response_start: false,
            held: HeldFlush::default(),
            request: AtomicU8::new(NO_REQUEST),
        }
    }

    /// Holds the flushes of the response about to be written until its last chunk is written (so it
    /// leaves in one `send`). For a chunked response only: anything else ends the hold at its first
    /// byte. Called by the proxy between deciding the response header and Pingora writing it.
    pub fn hold_response(&self) {
        self.request.store(HOLD, Ordering::Relaxed);
    }

    /// Lets flushes through again (the response being held will not be written as announced).
    pub fn release_response(&self) {
        self.request.store(RELEASE, Ordering::Relaxed);
    }

    /// Applies what the proxy asked for since the last call.
    fn take_request(&mut self) {
        match std::mem::replace(self.request.get_mut(), NO_REQUEST) {
            HOLD => self.held.arm(),
            RELEASE => self.held.release(),
            _ => {}
        }
    }

    fn arm(&mut self) {
        self.phase = Phase::Header;
        self.blank = BlankLine::default();
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
        if self.blank.find(data).is_some() {
            self.phase = Phase::Done;
            self.timer = None;
            self.response_start = true;
        }
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
        this.take_request();
        if this.held.holding() {
            // Pingora reads while it waits (for the upstream, or for the next request): nothing
            // held may wait with it.
            std::task::ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
            this.held.release();
        }
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
        this.take_request();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            this.wrote(&buf[..*n]);
            if this.held.holding() {
                this.held.wrote(&buf[..*n]);
            }
        }
        res
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.take_request();
        if this.held.holding() {
            // The inner stream buffers it; the last chunk's flush, or the next read, sends it.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        // Shutting down flushes the inner stream's buffer first.
        this.held.release();
        Pin::new(&mut this.inner).poll_shutdown(cx)
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

    /// A buffered connection that records what each flush sends, and can refuse to be flushed.
    #[derive(Debug, Default)]
    struct Recorder {
        buffered: Vec<u8>,
        sent: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
        flush_pending: bool,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            buf.put_slice(b"GET / HTTP/1.1\r\n\r\n");
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.get_mut().buffered.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            if this.flush_pending {
                this.flush_pending = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if !this.buffered.is_empty() {
                let segment = std::mem::take(&mut this.buffered);
                this.sent.lock().unwrap().push(segment);
            }
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    #[async_trait]
    impl Shutdown for Recorder {
        async fn shutdown(&mut self) {}
    }
    impl UniqueID for Recorder {
        fn id(&self) -> UniqueIDType {
            0
        }
    }
    impl Ssl for Recorder {}
    impl GetTimingDigest for Recorder {
        fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
            vec![]
        }
    }
    impl GetProxyDigest for Recorder {
        fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
            None
        }
    }
    impl GetSocketDigest for Recorder {
        fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
            None
        }
    }
    impl Peek for Recorder {}

    type Sent = Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

    fn recorded(flush_pending: bool) -> (HeaderDeadlineStream, Sent) {
        let sent = Sent::default();
        let inner = Recorder {
            sent: sent.clone(),
            flush_pending,
            ..Recorder::default()
        };
        (
            HeaderDeadlineStream::new(Box::new(inner), Duration::from_secs(5)),
            sent,
        )
    }

    /// Writes a chunked response the way Pingora does: each piece its own write, a flush after the
    /// header, after each chunk and after the last chunk. Returns the bytes.
    async fn write_chunked(s: &mut HeaderDeadlineStream, chunks: &[&[u8]]) -> Vec<u8> {
        let mut all = Vec::new();
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        s.write_all(head).await.unwrap();
        s.flush().await.unwrap();
        all.extend_from_slice(head);
        for c in chunks {
            let size = format!("{:X}\r\n", c.len());
            for piece in [size.as_bytes(), c, b"\r\n"] {
                s.write_all(piece).await.unwrap();
                all.extend_from_slice(piece);
            }
            s.flush().await.unwrap();
        }
        s.write_all(b"0\r\n\r\n").await.unwrap();
        s.flush().await.unwrap();
        all.extend_from_slice(b"0\r\n\r\n");
        all
    }

    #[tokio::test]
    async fn a_held_chunked_response_is_sent_in_one_flush_and_the_next_is_not_held() {
        let (mut s, sent) = recorded(false);
        s.hold_response();
        let one = write_chunked(&mut s, &[b"{\"a\":1}", b"0\r\n\r\n"]).await;
        assert_eq!(*sent.lock().unwrap(), vec![one.clone()]);
        // Not armed again: the next response flushes as Pingora asks.
        let two = write_chunked(&mut s, &[b"{}"]).await;
        assert_eq!(
            sent.lock().unwrap().len(),
            4,
            "header, chunk and end each sent"
        );
        assert_eq!(sent.lock().unwrap()[1..].concat(), two);
    }

    #[tokio::test]
    async fn held_bytes_are_sent_before_the_next_read_and_on_release() {
        // Pingora reads (the client, while it waits for the upstream) with a header held.
        let (mut s, sent) = recorded(true);
        s.hold_response();
        s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        s.flush().await.unwrap();
        assert!(sent.lock().unwrap().is_empty());
        // The first flush attempt is refused (a full socket): the read waits for it.
        let mut buf = [0u8; 64];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        assert_eq!(sent.lock().unwrap().len(), 1, "sent before the read");
        // An error response replaces the held one: released, its flush goes through.
        s.hold_response();
        s.release_response();
        s.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        s.flush().await.unwrap();
        assert_eq!(sent.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_response_that_is_not_chunked_is_not_held() {
        let (mut s, sent) = recorded(false);
        s.hold_response();
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
            .await
            .unwrap();
        s.write_all(b"{}").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            sent.lock().unwrap().len(),
            1,
            "the body's first byte ended the hold"
        );
    }

    /// Against a plain search of the joined bytes, for random strings over `\r`, `\n` and one
    /// other byte, cut anywhere.
    #[test]
    fn the_blank_line_scanner_agrees_with_a_plain_search() {
        let mut next = test_random(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let len = (next() % 24) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| b"\r\nx"[(next() % 3) as usize]).collect();
            let want = bytes
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| p + 4);
            let cut = 1 + (next() % 6) as usize;
            let mut scanner = BlankLine::default();
            let mut got = None;
            let mut at = 0;
            for piece in bytes.chunks(cut) {
                if let Some(end) = scanner.find(piece) {
                    got = Some(at + end);
                    break;
                }
                at += piece.len();
            }
            assert_eq!(got, want, "{bytes:?} cut {cut}");
        }
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
