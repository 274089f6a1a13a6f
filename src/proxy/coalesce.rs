//! One `send` for a whole chunked response, where Pingora would make three.
//!
//! A response whose body fhir-edge rewrites loses its `Content-Length` and goes out chunked. Pingora
//! flushes a chunked response after its header, after every chunk and after the last chunk, so a
//! small Bundle that arrived from the upstream in one read leaves in three TCP segments (header,
//! body, the 5-byte `0\r\n\r\n`), each a `send` and, on loopback, a wake-up of the reader. An
//! unrewritten response with a `Content-Length` leaves in one, because Pingora does not flush those
//! until they are complete.
//!
//! [`HeldFlush`] lets the downstream connection wrapper ([`crate::proxy::deadline::HeaderDeadlineStream`])
//! skip those intermediate flushes for one response, which the proxy arms in its response filter.
//! It follows the bytes being written, the header block and then the chunked framing, and ends the
//! hold as soon as the last chunk (`0\r\n\r\n`) has been written, so the flush that follows it sends
//! everything at once. Anything it does not recognise as that framing ends the hold at once: a
//! mistake costs a segment, never a stuck response. The wrapper also flushes whatever is held before
//! it reads from the client again (Pingora watches the client while it waits for the upstream), so
//! held bytes never wait for the upstream or for the next request.

use crate::fhir::pct::hex;
use crate::proxy::deadline::BlankLine;

/// Where the written bytes are, while a flush is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Not holding: every flush goes through.
    #[default]
    Off,
    /// Armed; nothing written yet. The first byte must start a status line.
    Start,
    /// In the header block, looking for its closing blank line.
    Head(BlankLine),
    /// In a chunk-size line: its value so far and how many hex digits it had.
    Size(u64, u8),
    /// After a chunk size's `\r`.
    SizeLf(u64),
    /// Chunk data still to come.
    Data(u64),
    /// After a chunk's data: `\r`, then `\n`.
    DataCr,
    DataLf,
    /// After the last chunk's size line: the final `\r`, then `\n`.
    EndCr,
    EndLf,
}

/// Tracks one held response; see the module documentation.
#[derive(Debug, Default)]
pub struct HeldFlush {
    state: State,
}

/// The longest chunk-size line taken: 16 hex digits is a `u64`.
const MAX_SIZE_DIGITS: u8 = 16;

impl HeldFlush {
    /// Holds flushes from the next write (a response's status line) until its last chunk.
    pub fn arm(&mut self) {
        self.state = State::Start;
    }

    /// Stops holding; the next flush goes through.
    pub fn release(&mut self) {
        self.state = State::Off;
    }

    /// Whether a flush now would be skipped.
    pub fn holding(&self) -> bool {
        self.state != State::Off
    }

    /// Follows bytes that were just written.
    pub fn wrote(&mut self, mut data: &[u8]) {
        while let Some((&b, rest)) = data.split_first() {
            match self.state {
                State::Off => return,
                State::Data(n) => {
                    // Chunk data is skipped, not scanned.
                    let take = usize::try_from(n).map_or(data.len(), |n| n.min(data.len()));
                    data = &data[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                }
                // Inside the header block: jump to its end.
                State::Head(mut blank) => match blank.find(data) {
                    Some(at) => {
                        self.state = State::Size(0, 0);
                        data = &data[at..];
                    }
                    None => {
                        self.state = State::Head(blank);
                        return;
                    }
                },
                state => {
                    self.state = step(state, b);
                    data = rest;
                }
            }
        }
    }
}

/// One byte of framing (never called in `Head` or `Data`).
fn step(state: State, b: u8) -> State {
    match (state, b) {
        (State::Off, _) => State::Off,
        (State::Start, b'H') => State::Head(BlankLine::default()),
        (State::Size(v, n), b) if n < MAX_SIZE_DIGITS => match hex(b) {
            Some(d) => State::Size(v << 4 | u64::from(d), n + 1),
            None if b == b'\r' && n > 0 => State::SizeLf(v),
            None => State::Off,
        },
        (State::SizeLf(0), b'\n') => State::EndCr,
        (State::SizeLf(v), b'\n') => State::Data(v),
        (State::DataCr, b'\r') => State::DataLf,
        (State::DataLf, b'\n') => State::Size(0, 0),
        (State::EndCr, b'\r') => State::EndLf,
        // The last chunk is complete: the next flush sends the whole response.
        (State::EndLf, b'\n') => State::Off,
        // Anything else is not the framing this expects (trailers, a different response).
        _ => State::Off,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n\
        Transfer-Encoding: chunked\r\n\r\n";

    fn chunk(data: &[u8]) -> Vec<u8> {
        let mut c = format!("{:X}\r\n", data.len()).into_bytes();
        c.extend_from_slice(data);
        c.extend_from_slice(b"\r\n");
        c
    }

    /// The response as Pingora writes it, and the offset where its last chunk ends.
    fn response(chunks: &[&[u8]]) -> Vec<u8> {
        let mut r = HEAD.to_vec();
        for c in chunks {
            r.extend_from_slice(&chunk(c));
        }
        r.extend_from_slice(b"0\r\n\r\n");
        r
    }

    /// Feeds `bytes` in pieces of `cut` and returns the offset after which the hold ended.
    fn released_at(bytes: &[u8], cut: usize) -> Option<usize> {
        let mut h = HeldFlush::default();
        h.arm();
        let mut at = 0;
        for piece in bytes.chunks(cut) {
            for (i, b) in piece.iter().enumerate() {
                h.wrote(std::slice::from_ref(b));
                if !h.holding() {
                    return Some(at + i + 1);
                }
            }
            at += piece.len();
        }
        None
    }

    #[test]
    fn the_hold_ends_exactly_at_the_last_chunk_however_the_writes_are_cut() {
        // Chunk data that looks like framing must be skipped, not read.
        let body: &[u8] = b"0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n";
        for chunks in [
            vec![],
            vec![&b"{}"[..]],
            vec![body, &[b'x'; 300][..], b"\r\n"],
        ] {
            let r = response(&chunks);
            for cut in [1, 2, 3, 5, 7, 64, r.len()] {
                // Byte by byte, as the written pieces would be fed.
                assert_eq!(released_at(&r, cut), Some(r.len()), "cut {cut}");
                // And in whole pieces.
                let mut h = HeldFlush::default();
                h.arm();
                let pieces: Vec<&[u8]> = r.chunks(cut).collect();
                for (i, p) in pieces.iter().enumerate() {
                    assert!(h.holding(), "released before piece {i} of cut {cut}");
                    h.wrote(p);
                }
                assert!(
                    !h.holding(),
                    "still holding after the last chunk, cut {cut}"
                );
            }
        }
    }

    /// Whole writes (the header scanner's jump, the chunk-data skip) agree with single bytes on any
    /// input, cut anywhere: random strings over the bytes the framing is made of.
    #[test]
    fn whole_writes_and_single_bytes_agree_on_random_framing() {
        let alphabet = b"H\r\n\r\n0123456789aAfFxX";
        let mut next = crate::proxy::deadline::test_random(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let mut bytes = b"H".to_vec();
            bytes.extend((0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]));
            let cut = 1 + (next() % 8) as usize;
            let mut whole = HeldFlush::default();
            whole.arm();
            // The reference: one byte at a time, through `step`, the blank-line scanner, or chunk
            // data counted down.
            let mut reference = State::Start;
            for piece in bytes.chunks(cut) {
                whole.wrote(piece);
                for &b in piece {
                    reference = match reference {
                        State::Data(1) => State::DataCr,
                        State::Data(n) => State::Data(n - 1),
                        State::Head(mut blank) => match blank.find(&[b]) {
                            Some(_) => State::Size(0, 0),
                            None => State::Head(blank),
                        },
                        state => step(state, b),
                    };
                }
                assert_eq!(whole.state, reference, "{bytes:?} cut {cut}");
            }
        }
    }

    #[test]
    fn a_big_chunk_size_is_counted_not_scanned() {
        let data = vec![b'\n'; 70_000];
        let r = response(&[&data[..]]);
        assert_eq!(released_at(&r, 4096), Some(r.len()));
    }

    #[test]
    fn anything_but_the_expected_framing_ends_the_hold_at_once() {
        for (bytes, at) in [
            // Not a status line.
            (&b"{\"resourceType\":\"Bundle\"}"[..], 1),
            // A body that is not chunked.
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", 39),
            // A chunk size with no digits, one with too many, and a bad chunk end.
            (b"HTTP/1.1 200 OK\r\n\r\n\r\n", 20),
            (b"HTTP/1.1 200 OK\r\n\r\n11111111111111111\r\n", 36),
            (b"HTTP/1.1 200 OK\r\n\r\n2\r\nabXY", 25),
            // Trailers after the last chunk.
            (b"HTTP/1.1 200 OK\r\n\r\n0\r\nX-T: 1\r\n\r\n", 23),
        ] {
            assert_eq!(
                released_at(bytes, 1),
                Some(at),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn released_or_never_armed_it_does_not_hold() {
        let mut h = HeldFlush::default();
        assert!(!h.holding());
        h.wrote(HEAD);
        assert!(!h.holding());
        h.arm();
        assert!(h.holding());
        h.release();
        h.wrote(HEAD);
        assert!(!h.holding());
    }
}
