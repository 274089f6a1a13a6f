//! The link rewriter: fed a body in any cut, it writes what a plain byte-by-byte reference writes
//! for the whole body, and no upstream base followed by a URL boundary (or the end) is left in it,
//! in the plain or the JSON-escaped form.
#![no_main]

use fhir_edge::internals::fhir::rewrite::Rewrites;
use libfuzzer_sys::fuzz_target;

const PUBLIC: &str = "https://edge.example/fhir";
/// Route shapes: one base; a base beside a longer one it is a prefix of; bases that differ only in
/// letter case (two first bytes for the vectorised search); a base the public base starts with
/// (skipped).
const BASE_SETS: [&[&str]; 4] = [
    &["http://10.0.0.5:8080/fhir"],
    &["http://ehr:80", "http://ehr:8080/R4"],
    &[
        "http://a.example/fhir",
        "HTTP://A.EXAMPLE/fhir",
        "Http://b/x",
        "hTTP://c/y",
    ],
    &["https://edge.example", "http://up/fhir"],
];

/// The rewriter's boundary set: what may follow a base URL.
fn is_boundary(b: u8) -> bool {
    matches!(
        b,
        b'/' | b'?' | b'#' | b'"' | b'\\' | b',' | b';' | b'<' | b'>' | b'\'' | b')'
    ) || b.is_ascii_whitespace()
}

fn escaped(s: &str) -> Vec<u8> {
    s.replace('/', "\\/").into_bytes()
}

/// (from, to) pairs, longest `from` first, as the rewriter orders them.
fn patterns(bases: &[&str]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut p = Vec::new();
    for b in bases {
        if PUBLIC.starts_with(b) {
            continue;
        }
        p.push((b.as_bytes().to_vec(), PUBLIC.as_bytes().to_vec()));
        p.push((escaped(b), escaped(PUBLIC)));
    }
    p.sort_by_key(|(f, _)| std::cmp::Reverse(f.len()));
    p
}

/// One position at a time: the longest pattern that matches here and is followed by a boundary or
/// the end is replaced; otherwise one byte is copied.
fn reference(pats: &[(Vec<u8>, Vec<u8>)], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    'outer: while i < data.len() {
        for (from, to) in pats {
            let end = i + from.len();
            if data.get(i..end) == Some(&from[..]) && data.get(end).is_none_or(|&b| is_boundary(b))
            {
                out.extend_from_slice(to);
                i = end;
                continue 'outer;
            }
        }
        out.push(data[i]);
        i += 1;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Some((&cut_seed, body)) = rest.split_first() else {
        return;
    };
    let bases = BASE_SETS[usize::from(sel) % BASE_SETS.len()];
    let owned: Vec<String> = bases.iter().map(|b| b.to_string()).collect();
    let rw = Rewrites::new(&owned, PUBLIC);
    let pats = patterns(bases);
    let want = reference(&pats, body);
    assert_eq!(rw.all(body), want, "whole body");

    // The same body in pieces of 1..=16 bytes (sizes from the seed and the body itself), the last
    // piece fed with end-of-stream; half the time an empty end-of-stream piece follows instead.
    let mut r = rw.body();
    let mut got = Vec::new();
    let mut at = 0;
    let mut k = usize::from(cut_seed);
    let empty_eos = sel & 0x80 != 0;
    while at < body.len() {
        k = k.wrapping_mul(31).wrapping_add(usize::from(body[at]) + 7);
        let end = (at + 1 + k % 16).min(body.len());
        let last = end == body.len() && !empty_eos;
        got.extend(r.feed(&body[at..end], last));
        at = end;
    }
    if empty_eos || body.is_empty() {
        got.extend(r.feed(&[], true));
    }
    assert_eq!(got, want, "in pieces");

    // Nothing of the upstream is left where a client could follow it.
    for (from, _) in &pats {
        for i in 0..got.len() {
            if got[i..].starts_with(from) {
                let next = got.get(i + from.len());
                assert!(
                    next.is_some_and(|&b| !is_boundary(b)),
                    "an upstream base escaped at {i}"
                );
            }
        }
    }
});
