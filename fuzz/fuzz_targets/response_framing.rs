//! The flush hold (`coalesce::HeldFlush`): written in any cut, it holds exactly while a plain
//! byte-by-byte reading of Pingora's chunked framing is still inside the response, so it ends at the
//! last chunk's final byte, and at the first byte of anything that is not that framing.
#![no_main]

use fhir_edge::proxy::coalesce::HeldFlush;
use libfuzzer_sys::fuzz_target;

/// The framing, one byte at a time: the specification the tracker's jumps and skips must keep.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Ref {
    Off,
    Start,
    /// The last up-to-four header bytes, to see the blank line.
    Head(u32),
    Size(u64, u8),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    EndCr,
    EndLf,
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

fn step(s: Ref, b: u8) -> Ref {
    match s {
        Ref::Off => Ref::Off,
        Ref::Start if b == b'H' => Ref::Head(u32::from(b)),
        Ref::Start => Ref::Off,
        Ref::Head(last) => {
            let last = last << 8 | u32::from(b);
            if last == u32::from_be_bytes(*b"\r\n\r\n") {
                Ref::Size(0, 0)
            } else {
                Ref::Head(last)
            }
        }
        Ref::Size(v, n) if n < 16 => match hex(b) {
            Some(d) => Ref::Size(v << 4 | d, n + 1),
            None if b == b'\r' && n > 0 => Ref::SizeLf(v),
            None => Ref::Off,
        },
        Ref::Size(..) => Ref::Off,
        Ref::SizeLf(0) if b == b'\n' => Ref::EndCr,
        Ref::SizeLf(v) if b == b'\n' => Ref::Data(v),
        Ref::Data(1) => Ref::DataCr,
        Ref::Data(n) => Ref::Data(n - 1),
        Ref::DataCr if b == b'\r' => Ref::DataLf,
        Ref::DataLf if b == b'\n' => Ref::Size(0, 0),
        Ref::EndCr if b == b'\r' => Ref::EndLf,
        _ => Ref::Off,
    }
}

/// A response as Pingora writes a chunked one: the head, then `{:X}\r\n` data `\r\n` per chunk, then
/// `0\r\n\r\n`. Chunk sizes and contents come from the input, so data can look like framing.
fn response(input: &[u8]) -> (Vec<u8>, usize) {
    let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n".to_vec();
    out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
    let mut rest = input;
    while let Some((&len, tail)) = rest.split_first() {
        // Mostly small chunks; from 0xC0 up, 64 to 4,096 bytes.
        let want = if len >= 0xC0 {
            usize::from(len - 0xBF) * 64
        } else {
            usize::from(len % 64) + 1
        };
        let take = want.min(tail.len());
        if take == 0 {
            break;
        }
        out.extend_from_slice(format!("{take:X}\r\n").as_bytes());
        out.extend_from_slice(&tail[..take]);
        out.extend_from_slice(b"\r\n");
        rest = &tail[take..];
    }
    out.extend_from_slice(b"0\r\n\r\n");
    let end = out.len();
    (out, end)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((&cut_seed, input)) = rest.split_first() else {
        return;
    };
    // Half the inputs are well-formed responses (then maybe one byte changed, or more bytes after
    // the end); the other half are the raw bytes.
    let (bytes, end) = if mode & 1 == 0 {
        let (mut r, end) = response(input);
        if mode & 2 != 0 && !input.is_empty() {
            let at = usize::from(input[0]) * 7 % r.len();
            r[at] ^= input[input.len() - 1] | 1;
        }
        if mode & 4 != 0 {
            r.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        }
        (r, Some(end).filter(|_| mode & 2 == 0))
    } else {
        (input.to_vec(), None)
    };

    let mut held = HeldFlush::default();
    held.arm();
    let mut spec = Ref::Start;
    let mut at = 0;
    let mut k = usize::from(cut_seed);
    while at < bytes.len() {
        k = k.wrapping_mul(31).wrapping_add(usize::from(bytes[at]) + 3);
        // Mostly pieces of 1..=32 bytes, sometimes up to 512, sometimes everything left at once.
        let len = match k % 11 {
            0 => bytes.len(),
            1 | 2 => 1 + k / 11 % 512,
            _ => 1 + k / 11 % 32,
        };
        let next = (at + len).min(bytes.len());
        held.wrote(&bytes[at..next]);
        for &b in &bytes[at..next] {
            spec = step(spec, b);
        }
        assert_eq!(
            held.holding(),
            spec != Ref::Off,
            "after {next} of {} bytes",
            bytes.len()
        );
        // An untouched response is held up to its last byte and released by it.
        if let Some(end) = end {
            assert_eq!(held.holding(), next < end, "end at {end}, written {next}");
        }
        at = next;
    }
});
