//! Upstream base URLs → the public base URL, in response headers and streamed JSON bodies.
//!
//! FHIR servers put absolute URLs in what they return: `Bundle.link[].url` (self/next/previous),
//! `entry[].fullUrl`, `entry[].response.location`, `Location` and `Content-Location`. Some build them
//! from their configured base, some from the `Host` header. Left alone they make clients page straight
//! to the upstream (bypassing the proxy and handing it the proxy's bearer token) or refuse to page at all
//! (fhirpy rejects links outside its base). So every occurrence of one of the route's upstream bases is
//! replaced by the public base; the rest of the URL (paths, page tokens, query strings) is left byte for
//! byte, and links stay absolute.
//!
//! A base matches only at a URL boundary (followed by `/`, `?`, `#`, `"`, `\`, whitespace or the end),
//! so `http://h:80` never rewrites inside `http://h:8080`. Bodies are rewritten as they stream, with a
//! carry of at most one pattern length between chunks, so memory stays bounded for any body size. Both
//! the plain form and the JSON-escaped form (`https:\/\/h\/fhir`) are rewritten.

use std::sync::Arc;

/// One `from → to` replacement.
#[derive(Debug, Clone)]
struct Pattern {
    from: Vec<u8>,
    to: Vec<u8>,
}

/// The replacements of one route: each upstream base in plain and JSON-escaped form. Built once, when
/// the routing table loads.
#[derive(Debug, Clone)]
pub struct Rewrites {
    patterns: Arc<[Pattern]>,
    max_len: usize,
    /// Bytes that can start a pattern (the fast path skips everything else).
    starts: Starts,
}

/// The bytes patterns start with, searched for with SIMD when there are at most three (every base
/// starts with `h`, in both forms, unless bases mix `http` with `HTTP`).
#[derive(Debug, Clone)]
enum Starts {
    None,
    One(u8),
    Two(u8, u8),
    Three(u8, u8, u8),
    Many(Arc<[bool; 256]>),
}

impl Starts {
    fn new(bytes: &[u8]) -> Starts {
        let mut set: Vec<u8> = bytes.to_vec();
        set.sort_unstable();
        set.dedup();
        match set[..] {
            [] => Starts::None,
            [a] => Starts::One(a),
            [a, b] => Starts::Two(a, b),
            [a, b, c] => Starts::Three(a, b, c),
            _ => {
                let mut table = [false; 256];
                for &b in &set {
                    table[usize::from(b)] = true;
                }
                Starts::Many(Arc::new(table))
            }
        }
    }

    /// The offset of the first byte in `data` that can start a pattern.
    fn find(&self, data: &[u8]) -> Option<usize> {
        match self {
            Starts::None => None,
            Starts::One(a) => memchr::memchr(*a, data),
            Starts::Two(a, b) => memchr::memchr2(*a, *b, data),
            Starts::Three(a, b, c) => memchr::memchr3(*a, *b, *c, data),
            Starts::Many(table) => data.iter().position(|&b| table[usize::from(b)]),
        }
    }
}

impl Default for Rewrites {
    fn default() -> Self {
        Rewrites::new(&[], "")
    }
}

fn escape_slashes(s: &str) -> Vec<u8> {
    s.replace('/', "\\/").into_bytes()
}

impl Rewrites {
    /// Rewrites every base in `upstream_bases` (without trailing slashes) to `public_base`. Bases equal
    /// to the public base, or that would match inside it, are skipped (rewriting them would be a no-op
    /// or would corrupt public URLs).
    pub fn new(upstream_bases: &[String], public_base: &str) -> Rewrites {
        let mut patterns = Vec::new();
        for base in upstream_bases {
            let base = base.trim_end_matches('/');
            if base.is_empty() || public_base.starts_with(base) {
                continue;
            }
            patterns.push(Pattern {
                from: base.as_bytes().to_vec(),
                to: public_base.as_bytes().to_vec(),
            });
            patterns.push(Pattern {
                from: escape_slashes(base),
                to: escape_slashes(public_base),
            });
        }
        // Longest first, so a base that extends another wins.
        patterns.sort_by_key(|p| std::cmp::Reverse(p.from.len()));
        let max_len = patterns.iter().map(|p| p.from.len()).max().unwrap_or(0);
        let firsts: Vec<u8> = patterns
            .iter()
            .filter_map(|p| p.from.first().copied())
            .collect();
        let starts = Starts::new(&firsts);
        Rewrites {
            patterns: patterns.into(),
            max_len,
            starts,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The pattern matching at `data[i..]` followed by a boundary, if any. `None` also when the data
    /// ends before the boundary can be seen and `eos` is false (the caller carries it over).
    fn match_at(&self, data: &[u8], i: usize, eos: bool) -> Match<'_> {
        for p in self.patterns.iter() {
            let end = i + p.from.len();
            if end > data.len() {
                if !eos && data[i..].iter().zip(&p.from).all(|(a, b)| a == b) {
                    return Match::NeedMore;
                }
                continue;
            }
            if data[i..end] != p.from[..] {
                continue;
            }
            match data.get(end) {
                None if eos => return Match::Yes(p),
                None => return Match::NeedMore,
                Some(&b) if is_boundary(b) => return Match::Yes(p),
                Some(_) => {}
            }
        }
        Match::No
    }

    /// Rewrites a header value (a URL): a base at its start is replaced.
    pub fn header(&self, value: &[u8]) -> Option<Vec<u8>> {
        match self.match_at(value, 0, true) {
            Match::Yes(p) => {
                let mut out = p.to.clone();
                out.extend_from_slice(&value[p.from.len()..]);
                Some(out)
            }
            _ => None,
        }
    }

    /// A streaming body rewriter for one response.
    pub fn body(&self) -> BodyRewriter {
        BodyRewriter {
            rewrites: self.clone(),
            carry: Vec::new(),
        }
    }

    /// Rewrites a whole buffer.
    pub fn all(&self, data: &[u8]) -> Vec<u8> {
        let mut r = self.body();
        r.feed(data, true)
    }
}

enum Match<'a> {
    Yes(&'a Pattern),
    NeedMore,
    No,
}

/// Bytes that may follow a base URL: the URL continues with a path, query or fragment, or ends (a
/// JSON string's quote, an escape's backslash, whitespace, or a header/list separator).
fn is_boundary(b: u8) -> bool {
    matches!(
        b,
        b'/' | b'?' | b'#' | b'"' | b'\\' | b',' | b';' | b'<' | b'>' | b'\'' | b')'
    ) || b.is_ascii_whitespace()
}

/// Rewrites one response body chunk by chunk.
pub struct BodyRewriter {
    rewrites: Rewrites,
    /// The unprocessed tail of the previous chunk (shorter than the longest pattern + 1).
    carry: Vec<u8>,
}

impl BodyRewriter {
    /// Feeds the next chunk; returns the bytes that are final. With `eos`, flushes everything.
    pub fn feed(&mut self, chunk: &[u8], eos: bool) -> Vec<u8> {
        let carry = std::mem::take(&mut self.carry);
        let joined;
        let data: &[u8] = if carry.is_empty() {
            chunk
        } else {
            joined = [&carry[..], chunk].concat();
            &joined
        };
        let mut out = Vec::with_capacity(data.len() + 64);
        let mut i = 0;
        while i < data.len() {
            // Fast path: copy up to the next byte that can start a pattern.
            let next = self
                .rewrites
                .starts
                .find(&data[i..])
                .map_or(data.len(), |off| i + off);
            out.extend_from_slice(&data[i..next]);
            i = next;
            if i >= data.len() {
                break;
            }
            match self.rewrites.match_at(data, i, eos) {
                Match::Yes(p) => {
                    out.extend_from_slice(&p.to);
                    i += p.from.len();
                }
                Match::NeedMore => {
                    self.carry = data[i..].to_vec();
                    return out;
                }
                Match::No => {
                    out.push(data[i]);
                    i += 1;
                }
            }
        }
        out
    }

    /// Longest carry this rewriter can hold (for the memory bound).
    pub fn max_carry(&self) -> usize {
        self.rewrites.max_len + 1
    }
}

/// A `Content-Encoding` fhir-edge cannot decode (br, zstd, stacked encodings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnsupportedEncoding;

/// Decodes a compressed upstream body so it can be rewritten (fhir-edge asks upstreams for
/// `Accept-Encoding: identity`, but a server may compress anyway; no compressed JSON may pass
/// unrewritten).
pub(crate) enum Decoder {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    /// HTTP `deflate` is the zlib format (RFC 9110 §8.4.1.2).
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
}

impl Decoder {
    /// A decoder for a `Content-Encoding` value; `Ok(None)` for identity, `Err` for an encoding
    /// that cannot be decoded here.
    pub(crate) fn for_encoding(value: &[u8]) -> Result<Option<Decoder>, UnsupportedEncoding> {
        let v = value.trim_ascii();
        if v.is_empty() || v.eq_ignore_ascii_case(b"identity") {
            Ok(None)
        } else if v.eq_ignore_ascii_case(b"gzip") || v.eq_ignore_ascii_case(b"x-gzip") {
            Ok(Some(Decoder::Gzip(flate2::write::GzDecoder::new(
                Vec::new(),
            ))))
        } else if v.eq_ignore_ascii_case(b"deflate") {
            Ok(Some(Decoder::Zlib(flate2::write::ZlibDecoder::new(
                Vec::new(),
            ))))
        } else {
            Err(UnsupportedEncoding)
        }
    }

    /// Decodes the next chunk (and finishes the stream at `eos`).
    pub(crate) fn feed(&mut self, chunk: &[u8], eos: bool) -> std::io::Result<Vec<u8>> {
        use std::io::Write;
        macro_rules! run {
            ($d:expr) => {{
                $d.write_all(chunk)?;
                if eos {
                    $d.try_finish()?;
                }
                Ok(std::mem::take($d.get_mut()))
            }};
        }
        match self {
            Decoder::Gzip(d) => run!(d),
            Decoder::Zlib(d) => run!(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_byte_search_finds_what_a_plain_scan_finds() {
        let data: Vec<u8> = (0..2000u32).map(|i| (i * 7919 % 251) as u8).collect();
        for set in [&b""[..], b"h", b"hH", b"hHx", b"hHxy", b"\x00\xff"] {
            let starts = Starts::new(set);
            for from in [0, 1, 17, 500, 1999, 2000] {
                let want = data[from..].iter().position(|b| set.contains(b));
                assert_eq!(starts.find(&data[from..]), want, "{set:?} from {from}");
            }
        }
    }

    #[test]
    fn bases_with_different_first_bytes_are_all_rewritten() {
        let rw = Rewrites::new(
            &[
                "http://a.example/fhir".to_string(),
                "HTTP://B.EXAMPLE/FHIR".to_string(),
                "https://c.example".to_string(),
            ],
            "https://public.example/fhir",
        );
        let body = br#"{"a":"http://a.example/fhir/P/1","b":"HTTP://B.EXAMPLE/FHIR?x","c":"https:\/\/c.example\/P"}"#;
        assert_eq!(
            String::from_utf8(rw.all(body)).unwrap(),
            r#"{"a":"https://public.example/fhir/P/1","b":"https://public.example/fhir?x","c":"https:\/\/public.example\/fhir\/P"}"#
        );
    }

    fn rw() -> Rewrites {
        Rewrites::new(
            &[
                "http://10.0.0.5:8090/fhir".to_string(),
                "https://internal.example/r4/".to_string(),
            ],
            "https://edge.example/fhir",
        )
    }

    #[test]
    fn rewrites_links_full_urls_and_escaped_forms_keeping_queries() {
        let body = br#"{"link":[{"relation":"next","url":"http://10.0.0.5:8090/fhir/Patient?_count=2&_offset=2&name=x%20y"}],"entry":[{"fullUrl":"https://internal.example/r4/Patient/1"},{"fullUrl":"http:\/\/10.0.0.5:8090\/fhir\/Patient\/2"}]}"#;
        let out = String::from_utf8(rw().all(body)).unwrap();
        assert_eq!(
            out,
            r#"{"link":[{"relation":"next","url":"https://edge.example/fhir/Patient?_count=2&_offset=2&name=x%20y"}],"entry":[{"fullUrl":"https://edge.example/fhir/Patient/1"},{"fullUrl":"https:\/\/edge.example\/fhir\/Patient\/2"}]}"#
        );
    }

    #[test]
    fn only_whole_bases_match() {
        let r = rw();
        for untouched in [
            &br#"{"url":"http://10.0.0.5:80901/fhir/x"}"#[..],
            br#"{"url":"http://10.0.0.5:8090/fhirx/y"}"#,
            br#"{"url":"http://10.0.0.5:8090/fhi"}"#,
            br#"{"text":"http://10.0.0.5:8090"}"#,
        ] {
            assert_eq!(
                r.all(untouched),
                untouched,
                "{}",
                String::from_utf8_lossy(untouched)
            );
        }
        assert_eq!(
            r.all(br#""http://10.0.0.5:8090/fhir""#),
            br#""https://edge.example/fhir""#
        );
    }

    #[test]
    fn streaming_gives_the_same_bytes_whatever_the_chunking() {
        let body = br#"{"a":"http://10.0.0.5:8090/fhir/P/1","b":"http:\/\/10.0.0.5:8090\/fhir","c":"http://10.0.0.5:8090/fhirless","d":"https://internal.example/r4"}"#;
        let whole = rw().all(body);
        for size in 1..body.len() {
            let mut r = rw().body();
            let mut out = Vec::new();
            for chunk in body.chunks(size) {
                out.extend(r.feed(chunk, false));
                assert!(r.carry.len() <= r.max_carry());
            }
            out.extend(r.feed(b"", true));
            assert_eq!(out, whole, "chunk size {size}");
        }
    }

    #[test]
    fn compressed_bodies_are_decoded_in_chunks() {
        use std::io::Write;
        let plain = b"{\"url\":\"http://10.0.0.5:8090/fhir/Patient/1\"}".repeat(50);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).unwrap();
        let packed = gz.finish().unwrap();
        let mut d = Decoder::for_encoding(b"gzip").unwrap().unwrap();
        let mut out = Vec::new();
        for c in packed.chunks(7) {
            out.extend(d.feed(c, false).unwrap());
        }
        out.extend(d.feed(b"", true).unwrap());
        assert_eq!(out, plain);
        assert!(Decoder::for_encoding(b"identity").unwrap().is_none());
        assert!(Decoder::for_encoding(b"br").is_err());
    }

    #[test]
    fn headers_are_rewritten_at_their_start_only() {
        let r = rw();
        assert_eq!(
            r.header(b"http://10.0.0.5:8090/fhir/Patient/1/_history/1")
                .as_deref(),
            Some(&b"https://edge.example/fhir/Patient/1/_history/1"[..])
        );
        assert_eq!(r.header(b"/fhir/Patient/1"), None);
        assert_eq!(r.header(b"http://other/fhir/Patient/1"), None);
    }

    #[test]
    fn a_base_that_is_a_prefix_of_the_public_base_is_never_rewritten() {
        let r = Rewrites::new(
            &["https://edge.example".to_string()],
            "https://edge.example/fhir",
        );
        assert!(r.is_empty());
        let body = br#""https://edge.example/fhir/Patient/1""#;
        assert_eq!(r.all(body), body);
    }
}
