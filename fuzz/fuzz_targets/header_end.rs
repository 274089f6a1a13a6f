//! The header-end scanner of the downstream connection (`deadline::BlankLine`): fed the client's
//! bytes in any cut, it reports the end of the header block exactly where a plain search of the
//! joined bytes finds the first `\r\n\r\n`, and nothing before it.
#![no_main]

use fhir_edge::internals::proxy::deadline::BlankLine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut_seed, bytes)) = data.split_first() else {
        return;
    };
    let want = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4);
    let mut scanner = BlankLine::default();
    let mut at = 0;
    let mut k = usize::from(cut_seed);
    let mut got = None;
    while at < bytes.len() {
        k = k.wrapping_mul(31).wrapping_add(usize::from(bytes[at]) + 3);
        // Mostly pieces of 1..=8 bytes (a trickling client), sometimes up to 512 or all at once.
        let len = match k % 11 {
            0 => bytes.len(),
            1 | 2 => 1 + k / 11 % 512,
            _ => 1 + k / 11 % 8,
        };
        let next = (at + len).min(bytes.len());
        if let Some(end) = scanner.find(&bytes[at..next]) {
            got = Some(at + end);
            break;
        }
        at = next;
    }
    assert_eq!(got, want);
});
