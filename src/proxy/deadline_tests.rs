//! Unit tests of the downstream connection wrapper, over a socket pair and a recording stream.

use super::*;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn wrapped(limit_ms: u64, max_header_bytes: usize) -> (DownstreamConn, tokio::net::UnixStream) {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let inner: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(a));
    (
        DownstreamConn::new(inner, Duration::from_millis(limit_ms), max_header_bytes),
        b,
    )
}

#[tokio::test]
async fn a_trickled_header_is_cut_off_and_a_complete_one_is_not() {
    let (mut s, mut client) = wrapped(200, 4096);
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(s.read(&mut buf).await.unwrap() > 0);
    // The phases say the response ended; the next request's first byte starts a new clock.
    s.response_ended();
    client.write_all(b"G").await.unwrap();
    let _ = s.read(&mut buf).await.unwrap();
    let err = s.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
}

#[tokio::test]
async fn bytes_after_the_header_are_counted_until_the_next_request_starts() {
    let (mut s, mut client) = wrapped(5_000, 4096);
    client
        .write_all(b"POST /1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /2")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(s.read(&mut buf).await.unwrap() > 0);
    // A 2-byte body and 6 bytes of a pipelined request.
    assert_eq!(s.bytes_after_header(), 8);
    s.response_ended();
    client.write_all(b"GET /3 HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(s.read(&mut buf).await.unwrap() > 0);
    assert_eq!(s.bytes_after_header(), 0);
}

#[tokio::test]
async fn a_header_block_over_the_limit_is_answered_431_and_the_connection_ends() {
    let (mut s, mut client) = wrapped(5_000, 64);
    let mut request = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    request.extend_from_slice(&[b'a'; 1000]);
    request.extend_from_slice(b"\r\n\r\n");
    client.write_all(&request).await.unwrap();
    // Pingora reads in pieces; the piece that crosses the limit never reaches it, and the rest of
    // the header is read and dropped before the end of stream.
    let mut buf = [0u8; 48];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    assert!(total <= 64, "{total} bytes reached Pingora");
    let mut answer = vec![0u8; 1024];
    let n = client.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    assert!(answer.contains("too-long"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
}

/// A buffered connection that records what each flush sends.
#[derive(Debug, Default)]
struct Recorder {
    buffered: Vec<u8>,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
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
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
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

type Sent = Arc<Mutex<Vec<Vec<u8>>>>;

fn recorded() -> (DownstreamConn, Sent) {
    let sent = Sent::default();
    let inner = Recorder {
        sent: sent.clone(),
        ..Recorder::default()
    };
    (
        DownstreamConn::new(Box::new(inner), Duration::from_secs(5), 4096),
        sent,
    )
}

/// Three writes, each flushed, as any writer might make them.
async fn write_three(s: &mut DownstreamConn) {
    for piece in [&b"head"[..], b"body", b"end"] {
        s.write_all(piece).await.unwrap();
        s.flush().await.unwrap();
    }
}

#[tokio::test]
async fn held_flushes_leave_in_one_send_when_the_response_ends() {
    let (mut s, sent) = recorded();
    s.hold_flushes();
    write_three(&mut s).await;
    assert!(sent.lock().unwrap().is_empty());
    assert!(s.response_ended(), "a hold was armed");
    s.flush().await.unwrap();
    assert_eq!(*sent.lock().unwrap(), vec![b"headbodyend".to_vec()]);
    // Not armed again: the next response flushes as its writer asks.
    write_three(&mut s).await;
    assert_eq!(sent.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn held_bytes_are_sent_before_the_next_read_and_at_shutdown() {
    let (mut s, sent) = recorded();
    s.hold_flushes();
    s.write_all(b"head").await.unwrap();
    s.flush().await.unwrap();
    let mut buf = [0u8; 64];
    assert!(s.read(&mut buf).await.unwrap() > 0);
    assert_eq!(
        *sent.lock().unwrap(),
        vec![b"head".to_vec()],
        "sent before the read"
    );
    s.write_all(b"tail").await.unwrap();
    s.flush().await.unwrap();
    AsyncWriteExt::shutdown(&mut s).await.unwrap();
    assert_eq!(sent.lock().unwrap().concat(), b"headtail");
}

#[tokio::test]
async fn a_released_hold_lets_the_error_response_through() {
    let (mut s, sent) = recorded();
    s.hold_flushes();
    assert!(s.release_flushes());
    s.write_all(b"HTTP/1.1 502").await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(sent.lock().unwrap().len(), 1);
    assert!(!s.response_ended(), "nothing was held any more");
}

/// A small xorshift generator: the same sequence on every run.
fn random(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// Against a plain search of the joined bytes, for random strings over `\r`, `\n` and one other
/// byte, cut anywhere.
#[test]
fn the_blank_line_scanner_agrees_with_a_plain_search() {
    let mut next = random(0x2545_f491_4f6c_dd1d);
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
        let (mut s, _client) = wrapped(5_000, 4096);
        let mut fed = 0;
        for piece in request.chunks(cut) {
            assert_eq!(*s.phase.get_mut(), HEADER, "cut {cut}, {fed} bytes in");
            assert!(s.saw(piece));
            fed += piece.len();
            if fed >= end {
                break;
            }
        }
        assert_eq!(*s.phase.get_mut(), DONE, "cut {cut}");
        assert_eq!(s.bytes_after_header(), fed - end, "cut {cut}");
    }
}
