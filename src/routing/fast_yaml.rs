//! A fast reader for the routing table's usual YAML shape, with the general YAML parser as fallback.
//!
//! The general parser (`serde_yaml_ng`, libyaml underneath) first buffers every parser event of the
//! document, about 1 KB per tenant, and only then builds the structs. For a 100,000-tenant file
//! that is most of a reload's CPU time. Nearly every routing file is written the same way: block
//! mappings with one key per line, and plain or simply quoted values. This reader handles exactly
//! that subset and builds the structs in one pass over the lines.
//!
//! The rule that keeps it safe: it either produces what the general parser would produce for
//! the same text, or it declines (`None`) and the general parser reads the file. It declines on
//! anything it does not fully handle: tabs, document markers, directives, anchors, tags, flow
//! collections, block scalars, multi-line scalars, escapes in quoted strings, plain values YAML
//! could read as something other than a string (`yes`, `null`, `~`, numbers, ...), unknown or repeated
//! fields, a tenant key that is not a GUID, unusual indentation, characters YAML treats as line
//! breaks or refuses. Files that fail validation also go to the general parser, so its messages,
//! with line and column, are the ones an operator sees. The fuzz target `routes_yaml_fast_path` and
//! the unit tests below check the agreement.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::{MoreSpec, RoutesFile, TenantKey, TenantSpec};
use crate::config::problems::OrderedMap;
use crate::tenant::TenantId;

/// Reads `text` if it is in the handled subset; `None` means "use the general parser". Every string
/// in the result is a slice of `text` (the subset has no escapes), so nothing is copied.
pub(super) fn parse(text: &str) -> Option<RoutesFile<'_>> {
    let mut tenants = Vec::with_capacity(super::list_capacity(text.len(), tenant_estimate(text)));
    each(text, |key, spec| tenants.push((key, spec)))?;
    Some(RoutesFile {
        tenants: OrderedMap(tenants),
    })
}

/// [`parse`], with the text fed to a [`Reader`] one line at a time: for the differential checks
/// (`check_fast_yaml`), which must find the same as reading it whole.
pub(super) fn parse_line_by_line(text: &str) -> Option<RoutesFile<'_>> {
    let mut tenants = Vec::new();
    let mut reader = Reader::new();
    for line in text.split_inclusive('\n') {
        reader.feed_piece(line, |key, spec| tenants.push((key, spec)))?;
    }
    reader.end(|key, spec| tenants.push((key, spec)))?;
    Some(RoutesFile {
        tenants: OrderedMap(tenants),
    })
}

/// An estimate of the tenants in `text`, for reserving room: the lines ending in a colon (each
/// tenant's key line, plus `tenants:` and any header or link-base block). In the usual shape that is
/// the tenant count plus one, however many fields each entry sets; a line such as `key:  # comment`
/// is not counted, so room may still have to grow.
pub(super) fn tenant_estimate(text: &str) -> usize {
    tenant_estimate_bytes(text.as_bytes())
}

/// [`tenant_estimate`] of raw bytes (a block of a file being read).
pub(super) fn tenant_estimate_bytes(bytes: &[u8]) -> usize {
    let colon_lf = |w: &[u8]| w[2] == b'\n' && (w[1] == b':' || (w[1] == b'\r' && w[0] == b':'));
    bytes.windows(3).filter(|w| colon_lf(w)).count()
}

/// Reads `text` if it is in the handled subset, handing each tenant's entry to `add` in file order as
/// soon as it is read. `None` means "use the general parser", and may come after some entries were
/// handed over: whoever receives them must then discard what it built from them.
pub(super) fn each<'t>(
    text: &'t str,
    mut add: impl FnMut(TenantKey<'t>, TenantSpec<'t>),
) -> Option<()> {
    let mut reader = Reader::new();
    reader.feed(text, &mut add)?;
    reader.end(add)
}

/// [`each`] for a file read in pieces: [`Reader::feed`] takes the pieces in order, each a run of whole
/// lines (only the last may lack its line end), and [`Reader::end`] hands over the last entry. Where
/// the pieces are cut makes no difference to what is handed over or declined: everything the reader
/// knows between lines is kept here. Pieces that do not outlive the call (blocks of a file, read into
/// one buffer) go to [`Reader::feed_piece`], which copies the entry still open at the piece's end (a
/// few short strings), so the piece can go.
pub(super) struct Reader<'t> {
    seen_top: bool,
    /// Indentation of tenant keys, of their fields and of the current nested block.
    tenant_indent: usize,
    field_indent: usize,
    current: Option<Partial<'t>>,
    block: Block,
}

impl<'t> Reader<'t> {
    pub(super) fn new() -> Self {
        Reader {
            seen_top: false,
            tenant_indent: 0,
            field_indent: 0,
            current: None,
            block: Block::None,
        }
    }

    /// Reads the next piece, handing over every entry that ends in it; `None`: use the general parser.
    pub(super) fn feed(
        &mut self,
        text: &'t str,
        mut add: impl FnMut(TenantKey<'t>, TenantSpec<'t>),
    ) -> Option<()> {
        if !plain_text(text) {
            return None;
        }
        let mut current = self.current.take();
        let mut rest = text;
        while !rest.is_empty() {
            // A byte loop: lines are short, and `split` pays a searcher's setup on every one.
            let (raw, next) = match rest.bytes().position(|b| b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, ""),
            };
            rest = next;
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let body = line.trim_start_matches(' ');
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            let indent = line.len() - body.len();
            if indent == 0 {
                if self.seen_top || key_line(body)? != ("tenants", "") {
                    return None;
                }
                self.seen_top = true;
                continue;
            }
            if !self.seen_top {
                return None;
            }
            // A nested block (headers, link bases) takes every line indented deeper than the fields.
            if self.field_indent > 0 && indent > self.field_indent {
                let partial = current.as_mut()?;
                match &mut self.block {
                    Block::None => return None,
                    Block::Headers(at) => {
                        if *at == 0 {
                            *at = indent;
                        } else if *at != indent {
                            return None;
                        }
                        let (name, value) = key_line(body)?;
                        if !header_name(name) {
                            return None;
                        }
                        let value = scalar(value)?;
                        let headers = partial.upstream_headers.get_or_insert_with(BTreeMap::new);
                        if headers.insert(Cow::Borrowed(name), value).is_some() {
                            return None;
                        }
                    }
                    Block::Links(at) => {
                        if *at == 0 {
                            *at = indent;
                        } else if *at != indent {
                            return None;
                        }
                        let item = body.strip_prefix("- ")?;
                        let value = scalar(item.trim_start_matches(' '))?;
                        partial.link_bases.get_or_insert_with(Vec::new).push(value);
                    }
                }
                continue;
            }
            // Any other line ends an open block, which must have had at least one entry.
            if !self.block.close(current.as_ref()) {
                return None;
            }
            self.block = Block::None;
            if self.tenant_indent == 0 {
                self.tenant_indent = indent;
            }
            if indent == self.tenant_indent {
                if let Some(done) = current.take() {
                    let (key, spec) = done.finish()?;
                    add(key, spec);
                }
                let (key, rest) = key_line(body)?;
                if !rest.is_empty() || TenantId::parse(key).is_none() {
                    return None;
                }
                current = Some(Partial::new(key));
                continue;
            }
            if self.field_indent == 0 && indent > self.tenant_indent {
                self.field_indent = indent;
            }
            if indent != self.field_indent {
                return None;
            }
            let partial = current.as_mut()?;
            let (field, value) = key_line(body)?;
            self.block = partial.set(field, value)?;
        }
        self.current = current;
        Some(())
    }

    /// The same reader, holding nothing borrowed from the pieces read so far.
    fn detach(self) -> Reader<'static> {
        Reader {
            seen_top: self.seen_top,
            tenant_indent: self.tenant_indent,
            field_indent: self.field_indent,
            current: self.current.map(Partial::into_owned),
            block: self.block,
        }
    }

    /// After the last piece: hands over the last entry; `None`: use the general parser.
    pub(super) fn end(self, mut add: impl FnMut(TenantKey<'t>, TenantSpec<'t>)) -> Option<()> {
        if !self.block.close(self.current.as_ref()) {
            return None;
        }
        let (key, spec) = self.current?.finish()?;
        add(key, spec);
        Some(())
    }
}

impl Reader<'static> {
    /// [`Reader::feed`] for a piece that need not outlive the call: the entry still open at its end
    /// is copied.
    pub(super) fn feed_piece<'p>(
        &mut self,
        text: &'p str,
        add: impl FnMut(TenantKey<'p>, TenantSpec<'p>),
    ) -> Option<()> {
        let mut piece: Reader<'p> = std::mem::replace(self, Reader::new());
        piece.feed(text, add)?;
        *self = piece.detach();
        Some(())
    }
}

/// The nested block a field opened, with its indentation once its first line is seen.
enum Block {
    None,
    Headers(usize),
    Links(usize),
}

impl Block {
    /// False when the block being closed had no entries (YAML reads that as null, which the
    /// general parser refuses for these fields).
    fn close(&self, current: Option<&Partial>) -> bool {
        match self {
            Block::None => true,
            Block::Headers(_) => current.is_some_and(|p| p.upstream_headers.is_some()),
            Block::Links(_) => current.is_some_and(|p| p.link_bases.is_some()),
        }
    }
}

/// One tenant's fields as read so far (slices of the text).
struct Partial<'t> {
    key: Cow<'t, str>,
    name: Option<Cow<'t, str>>,
    upstream: Option<Cow<'t, str>>,
    tls_verify: Option<bool>,
    ca_file: Option<Cow<'t, str>>,
    sni: Option<Cow<'t, str>>,
    connect_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    upstream_headers: Option<BTreeMap<Cow<'t, str>, Cow<'t, str>>>,
    allow_writes: Option<bool>,
    link_bases: Option<Vec<Cow<'t, str>>>,
}

impl<'t> Partial<'t> {
    fn new(key: &'t str) -> Self {
        Partial {
            key: Cow::Borrowed(key),
            name: None,
            upstream: None,
            tls_verify: None,
            ca_file: None,
            sni: None,
            connect_timeout_ms: None,
            read_timeout_ms: None,
            upstream_headers: None,
            allow_writes: None,
            link_bases: None,
        }
    }

    /// The same entry holding its own strings, to outlive the piece of text it was read from.
    fn into_owned(self) -> Partial<'static> {
        fn own(s: Cow<'_, str>) -> Cow<'static, str> {
            Cow::Owned(s.into_owned())
        }
        Partial {
            key: own(self.key),
            name: self.name.map(own),
            upstream: self.upstream.map(own),
            tls_verify: self.tls_verify,
            ca_file: self.ca_file.map(own),
            sni: self.sni.map(own),
            connect_timeout_ms: self.connect_timeout_ms,
            read_timeout_ms: self.read_timeout_ms,
            upstream_headers: self
                .upstream_headers
                .map(|h| h.into_iter().map(|(k, v)| (own(k), own(v))).collect()),
            allow_writes: self.allow_writes,
            link_bases: self.link_bases.map(|l| l.into_iter().map(own).collect()),
        }
    }

    /// Sets one field from its line; `None` for an unknown or repeated field or a value outside
    /// the subset. Returns the block the field opens.
    fn set(&mut self, field: &str, value: &'t str) -> Option<Block> {
        fn once<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
            if slot.is_some() {
                return None;
            }
            *slot = Some(value?);
            Some(())
        }
        match field {
            "name" => once(&mut self.name, scalar(value))?,
            "upstream" => once(&mut self.upstream, scalar(value))?,
            "ca_file" => once(&mut self.ca_file, scalar(value))?,
            "sni" => once(&mut self.sni, scalar(value))?,
            "tls_verify" => once(&mut self.tls_verify, boolean(value))?,
            "allow_writes" => once(&mut self.allow_writes, boolean(value))?,
            "connect_timeout_ms" => once(&mut self.connect_timeout_ms, integer(value))?,
            "read_timeout_ms" => once(&mut self.read_timeout_ms, integer(value))?,
            // A repeat finds the first block's entries, or the parse already declined when that
            // block closed empty.
            "upstream_headers" if value.is_empty() && self.upstream_headers.is_none() => {
                return Some(Block::Headers(0));
            }
            "link_bases" if value.is_empty() && self.link_bases.is_none() => {
                return Some(Block::Links(0));
            }
            _ => return None,
        }
        Some(Block::None)
    }

    fn finish(self) -> Option<(TenantKey<'t>, TenantSpec<'t>)> {
        Some((
            TenantKey(self.key),
            TenantSpec {
                name: self.name?,
                upstream: self.upstream?,
                tls_verify: self.tls_verify.unwrap_or(true),
                allow_writes: self.allow_writes.unwrap_or(false),
                more: MoreSpec {
                    ca_file: self.ca_file,
                    sni: self.sni,
                    connect_timeout_ms: self.connect_timeout_ms,
                    read_timeout_ms: self.read_timeout_ms,
                    upstream_headers: self.upstream_headers.unwrap_or_default(),
                    link_bases: self.link_bases.unwrap_or_default(),
                }
                .boxed(),
            },
        ))
    }
}

/// Splits `key: value` (or `key:` with nothing or only a comment after it) into the key and the
/// value text, comment included. The key must be a plain run of name characters.
fn key_line(body: &str) -> Option<(&str, &str)> {
    // The first byte that is not a name character must be the colon.
    let colon = body
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))?;
    if colon == 0 || body.as_bytes()[colon] != b':' {
        return None;
    }
    let (key, rest) = (&body[..colon], &body[colon + 1..]);
    if rest.is_empty() {
        return Some((key, ""));
    }
    // `key:value` is one plain scalar in YAML, not a pair.
    let value = rest.strip_prefix(' ')?.trim_start_matches(' ');
    if value.starts_with('#') {
        return Some((key, ""));
    }
    Some((key, value))
}

/// A string value: double-quoted without escapes, single-quoted without doubled quotes, or a plain
/// scalar that YAML can only read as a string. A trailing ` # comment` is dropped.
fn scalar(value: &str) -> Option<Cow<'_, str>> {
    let b = value.as_bytes();
    match b.first()? {
        q @ (b'"' | b'\'') => {
            let end = value[1..].find(*q as char)? + 1;
            let content = &value[1..end];
            if *q == b'"' && content.contains('\\') {
                return None;
            }
            // `'it''s'` is an escaped quote; anything but spaces and a comment after it is an error.
            if !after_quote(&value[end + 1..]) {
                return None;
            }
            Some(Cow::Borrowed(content))
        }
        _ => {
            let text = plain(value)?;
            if !text.as_bytes()[0].is_ascii_alphabetic()
                && !matches!(text.as_bytes()[0], b'/' | b'_')
            {
                return None;
            }
            if ambiguous(text) {
                return None;
            }
            Some(Cow::Borrowed(text))
        }
    }
}

/// After a closing quote only spaces may follow, then optionally a comment after a space.
fn after_quote(rest: &str) -> bool {
    let trimmed = rest.trim_start_matches(' ');
    trimmed.is_empty() || (trimmed.len() < rest.len() && trimmed.starts_with('#'))
}

/// The text of a plain scalar (comment and trailing spaces removed) when every character is one
/// this reader accepts. Whether YAML reads it as a string, a boolean or a number is for the caller.
fn plain(value: &str) -> Option<&str> {
    let b = value.as_bytes();
    let mut end = b.len();
    for (i, &c) in b.iter().enumerate() {
        match c {
            // A comment starts at a `#` after a space; any other `#` is refused.
            b'#' if i > 0 && b[i - 1] == b' ' => {
                end = i;
                break;
            }
            // `: ` inside a plain value is a mapping in YAML (an error here).
            b':' if b.get(i + 1) == Some(&b' ') => return None,
            _ if !PLAIN[usize::from(c)] => return None,
            _ => {}
        }
    }
    let text = value[..end].trim_end_matches(' ');
    if text.is_empty() || text.ends_with(':') {
        return None;
    }
    Some(text)
}

/// Bytes a plain value may contain: letters, digits, these punctuation marks, space, and any byte
/// of a non-ASCII character (the whole text was checked for characters YAML refuses).
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b >= 0x80
            || b.is_ascii_alphanumeric()
            || matches!(
                b,
                b' ' | b'-'
                    | b'.'
                    | b'_'
                    | b'~'
                    | b'/'
                    | b':'
                    | b'%'
                    | b'?'
                    | b'&'
                    | b'='
                    | b'+'
                    | b'@'
                    | b'$'
                    | b'('
                    | b')'
                    | b','
                    | b';'
            );
        i += 1;
    }
    t
};

/// Plain words YAML 1.1 or 1.2 reads as null or a boolean.
fn ambiguous(text: &str) -> bool {
    if text.len() > 5 {
        return false;
    }
    const WORDS: [&str; 10] = [
        "null", "true", "false", "yes", "no", "on", "off", "y", "n", "~",
    ];
    WORDS.iter().any(|w| text.eq_ignore_ascii_case(w))
}

fn boolean(value: &str) -> Option<bool> {
    match plain(value)? {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// A decimal without sign, underscores or leading zeros.
fn integer(value: &str) -> Option<u64> {
    let text = plain(value)?;
    if !text.bytes().all(|b| b.is_ascii_digit()) || (text.len() > 1 && text.starts_with('0')) {
        return None;
    }
    text.parse().ok()
}

/// Header names as written in the file: letters, digits, `-` and `_`, starting with a letter.
fn header_name(name: &str) -> bool {
    name.as_bytes()[0].is_ascii_alphabetic() && !ambiguous(name)
}

/// True when the text has no character that YAML reads as a line break or refuses outright, no
/// tab, no byte order mark, and every carriage return starts a CRLF line end.
fn plain_text(text: &str) -> bool {
    let bytes = text.as_bytes();
    // Nearly every file is printable ASCII and line feeds, which this branch-free scan shows (the
    // compiler vectorises it; the byte loop below was ~19 % of a 100,000-tenant build, this no
    // longer shows in the profile). Any other byte below 0x20, DEL or a carriage return sends the
    // whole text through the exact check below.
    let unusual = bytes.chunks(4096).any(|chunk| {
        chunk.iter().fold(false, |seen, &b| {
            seen | ((b < 0x20) & (b != b'\n')) | (b == 0x7f)
        })
    });
    if !unusual {
        return non_ascii_allowed(text);
    }
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\n' | 0x20..=0x7e => {}
            b'\r' => {
                if bytes.get(i + 1) != Some(&b'\n') {
                    return false;
                }
            }
            0x80.. => {}
            _ => return false,
        }
    }
    non_ascii_allowed(text)
}

/// True when no character outside ASCII is one YAML treats as a line break or refuses.
fn non_ascii_allowed(text: &str) -> bool {
    if !text.is_ascii() {
        // C1 controls (NEL among them), the Unicode line and paragraph separators, the BOM and the
        // two non-characters YAML refuses.
        return !text.chars().any(|c| {
            matches!(
                c,
                '\u{80}'
                    ..='\u{9f}' | '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
            )
        });
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `plain_text` as a plain byte loop, the reference its fast scan must agree with.
    fn plain_text_reference(text: &str) -> bool {
        let bytes = text.as_bytes();
        bytes.iter().enumerate().all(|(i, &b)| match b {
            b'\n' | 0x20..=0x7e | 0x80.. => true,
            b'\r' => bytes.get(i + 1) == Some(&b'\n'),
            _ => false,
        }) && non_ascii_allowed(text)
    }

    #[test]
    fn the_fast_text_scan_agrees_with_the_byte_loop() {
        // Every ASCII byte, alone and before a line feed, at the start, on both sides of a scan
        // chunk boundary and at the end of a text longer than one chunk.
        let base = "tenants: # ".to_string() + &"x".repeat(9000) + "\n";
        let mut checked = 0;
        for b in 0u8..0x80 {
            for insert in [String::from(b as char), format!("{}\n", b as char)] {
                for at in [0, 4095, 4096, 4097, 8191, 8192, base.len()] {
                    let mut text = base.clone();
                    text.insert_str(at, &insert);
                    assert_eq!(
                        plain_text(&text),
                        plain_text_reference(&text),
                        "byte {b:#04x} at {at}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 128 * 2 * 7);
        for text in [
            "a\r\nb\r\n",
            "a\rb",
            "a\r",
            "\u{85}",
            "é\n",
            "\u{2028}",
            "a\u{7f}",
        ] {
            assert_eq!(plain_text(text), plain_text_reference(text), "{text:?}");
        }
        assert!(plain_text(&base) && plain_text("a\r\n") && !plain_text("a\tb"));
    }

    /// The fast reader's result, checked against the general parser's.
    fn agreed(text: &str) -> Option<RoutesFile<'_>> {
        if let Err(e) = super::super::check_fast_yaml(text) {
            panic!("disagreement on:\n{text}\n{e}");
        }
        parse(text)
    }

    const GUID_A: &str = "145f4184-1b0b-41c7-ba24-b3c1291bfda1";

    #[test]
    fn the_estimate_counts_key_lines_with_lf_or_crlf() {
        let text = "tenants:\n  00000000-0000-0000-0000-000000000001:\n    name: a\n    upstream: http://h/\n\
                    \n  00000000-0000-0000-0000-000000000002: # two\n    name: b\n    upstream: http://h/\n\
                    \n  00000000-0000-0000-0000-000000000003:\n    name: c\n    upstream: http://h/\n\
                    \n    upstream_headers:\n      X-A: 'v:'\n";
        // `tenants:`, two of the three keys (one has a comment after it) and the header block.
        assert_eq!(tenant_estimate(text), 4);
        assert_eq!(tenant_estimate(&text.replace('\n', "\r\n")), 4);
        let mut n = 0;
        assert!(each(text, |_, _| n += 1).is_some());
        assert_eq!(n, 3);
    }

    #[test]
    fn the_shipped_table_and_the_usual_shapes_take_the_fast_path() {
        let shipped = include_str!("../../conf/routes.yaml");
        assert_eq!(agreed(shipped).map(|f| f.tenants.0.len()), Some(2));
        let every_field = format!(
            "# comment\ntenants:   # trailing\n\n  {GUID_A}:  # the tenant\n    name: Hôpital Saint-Jean (north)\n    \
             upstream: 'https://fhir.example/r4?x=1&y=2' # c\n    tls_verify: false\n    ca_file: \"ca/h.pem\"\n    \
             sni: fhir.example\n    connect_timeout_ms: 250\n    read_timeout_ms: 0\n    upstream_headers:\n      \
             Authorization: \"Bearer ${{TOKEN}}\"\n      X-Api-Key: abc\n    allow_writes: true\n    link_bases:\n      \
             - https://a.example/fhir\n      -   \"http://b.example\"\n  # between tenants\n  \
             3C2F9D6E-8A41-4B7E-9F0D-2A6C5E1B7D34:\n    name: \"\"\n    upstream: http://x:1/\n"
        );
        let f = agreed(&every_field).expect("fast path");
        assert_eq!(f.tenants.0.len(), 2);
        let (_, a) = &f.tenants.0[0];
        assert_eq!(a.name, "Hôpital Saint-Jean (north)");
        assert_eq!(a.more().upstream_headers.len(), 2);
        assert_eq!(
            a.more().link_bases,
            ["https://a.example/fhir", "http://b.example"]
        );
        assert!(!a.tls_verify && a.allow_writes);
        let crlf = every_field.replace('\n', "\r\n");
        assert_eq!(agreed(&crlf), Some(f));
    }

    #[test]
    fn every_string_is_a_slice_of_the_text_not_a_copy() {
        let text = format!(
            "tenants:\n  {GUID_A}:\n    name: north\n    upstream: 'https://fhir.example/r4'\n    \
             sni: \"fhir.example\"\n    ca_file: ca.pem\n    upstream_headers:\n      X-Key: abc\n    \
             link_bases:\n      - https://a.example/fhir\n"
        );
        let f = agreed(&text).expect("fast path");
        let within = |s: &Cow<str>| {
            let range = text.as_bytes().as_ptr_range();
            matches!(s, Cow::Borrowed(b) if range.contains(&b.as_ptr()))
        };
        let (key, spec) = &f.tenants.0[0];
        let more = spec.more();
        let (header, value) = more.upstream_headers.iter().next().expect("one header");
        for s in [
            &key.0,
            &spec.name,
            &spec.upstream,
            header,
            value,
            &more.link_bases[0],
        ] {
            assert!(within(s), "{s:?} was copied");
        }
        for s in [&more.sni, &more.ca_file] {
            assert!(s.as_ref().is_some_and(within), "{s:?} was copied");
        }
    }

    #[test]
    fn anything_outside_the_subset_goes_to_the_general_parser() {
        let base = format!("tenants:\n  {GUID_A}:\n    upstream: \"http://x/\"\n");
        assert!(agreed(&format!("{base}    name: a\n")).is_some());
        let declined = [
            // Values YAML reads as something else, or that this reader does not unescape or fold.
            "    name: yes\n",
            "    name: ~\n",
            "    name: 123\n",
            "    name: \"a\\u0041\"\n",
            "    name: 'it''s'\n",
            "    name: &anchor a\n",
            "    name: !!str a\n",
            "    name: [a]\n",
            "    name: |\n      a\n",
            "    name: a\n      continued\n",
            "    name: \"a\"x\n",
            "    name: a: b\n",
            "    name: a#b\n",
            "    name:\n",
            "    name: a\n    name: b\n",
            "    name: a\n    tls_verify: True\n",
            "    name: a\n    connect_timeout_ms: 0100\n",
            "    name: a\n    connect_timeout_ms: 1_000\n",
            "    name: a\n    connect_timeout_ms: 99999999999999999999\n",
            "    name: a\n    upstream_headers:\n",
            "    name: a\n    upstream_headers: {}\n",
            "    name: a\n    upstream_headers:\n      on: x\n",
            "    name: a\n    upstream_headers:\n      A: x\n      A: y\n",
            "    name: a\n    upstream_headers:\n      A: x\n    upstream_headers:\n      B: y\n",
            "    name: a\n    link_bases:\n    link_bases:\n      - /a\n",
            "    name: a\n    link_bases:\n    - http://a/\n",
            "    name: a\n    link_bases:\n      -http://a/\n",
            // Structure and characters.
            "    name: a\n    unknown: x\n",
            "    name: a\nother: 1\n",
            "    name: a\ntenants:\n",
            "    name: a\n---\n",
            "    name: a\n   ca_file: x\n",
            "    name: a\n\t\n",
            "    name: a\n# a line separator \u{2028}  sni: x\n",
            "    name: a\n# a NEL \u{85}\n",
            "    name: a\n# a lone carriage return \r    sni: x\n",
        ];
        for extra in declined {
            let text = format!("{base}{extra}");
            assert!(agreed(&text).is_none(), "took the fast path:\n{text}");
        }
        assert!(agreed(&format!("\u{feff}{base}    name: a\n")).is_none());
        assert!(agreed("tenants:\n  not-a-guid:\n    name: a\n    upstream: x\n").is_none());
        assert!(agreed(&format!("tenants:\n  {GUID_A}:\n    name: a\n")).is_none());
        assert!(agreed(&format!("tenants:\n  {GUID_A}:\n")).is_none());
        assert!(agreed("").is_none());
    }

    /// A tenant given twice is kept twice (validation reports it), exactly as the general parser does.
    #[test]
    fn a_repeated_tenant_key_is_kept_for_validation_to_report() {
        let one = format!("  {GUID_A}:\n    name: a\n    upstream: x\n");
        let text = format!("tenants:\n{one}{one}");
        let f = agreed(&text).expect("fast path");
        assert_eq!(f.tenants.0.len(), 2);
    }

    /// What the reader hands over for `text` fed as pieces cut just after the given line ends.
    fn in_pieces<'t>(
        text: &'t str,
        cuts: &[usize],
    ) -> Option<Vec<(TenantKey<'t>, TenantSpec<'t>)>> {
        let mut got = Vec::new();
        let mut reader = Reader::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([&text.len()]) {
            reader.feed_piece(&text[from..cut], |k, s| got.push((k, s)))?;
            from = cut;
        }
        reader.end(|k, s| got.push((k, s)))?;
        Some(got)
    }

    fn whole<'t>(text: &'t str) -> Option<Vec<(TenantKey<'t>, TenantSpec<'t>)>> {
        let mut got = Vec::new();
        each(text, |k, s| got.push((k, s)))?;
        Some(got)
    }

    /// Offsets just after each line end: where a file read in pieces may be cut.
    fn line_ends(text: &str) -> Vec<usize> {
        text.match_indices('\n').map(|(i, _)| i + 1).collect()
    }

    /// A file read in pieces (a large routing table is) is read exactly as if it were read whole,
    /// wherever the pieces are cut: inside an entry, a header block or a link list, after a comment,
    /// between a carriage return's line and the next.
    #[test]
    fn pieces_cut_at_any_line_end_read_the_same_as_the_whole_text() {
        let text = format!(
            "# comment\ntenants:\n\n  {GUID_A}:  # the tenant\n    name: Hôpital\n    upstream: 'https://f/r4'\n    \
             tls_verify: false\n    ca_file: \"ca/h.pem\"\n    sni: f\n    connect_timeout_ms: 250\n    \
             upstream_headers:\n      Authorization: \"Bearer x\"\n      X-Api-Key: abc\n    allow_writes: true\n    \
             link_bases:\n      - https://a/fhir\n      - \"http://b\"\n  # between\n  \
             3C2F9D6E-8A41-4B7E-9F0D-2A6C5E1B7D34:\n    name: b\n    upstream: http://x:1/\n    link_bases:\n      - /p"
        );
        for text in [text.clone(), text.replace('\n', "\r\n")] {
            let expected = whole(&text);
            assert_eq!(expected.as_ref().map(Vec::len), Some(2));
            let ends = line_ends(&text);
            assert_eq!(in_pieces(&text, &ends), expected, "one piece per line");
            for &cut in &ends {
                assert_eq!(in_pieces(&text, &[cut]), expected, "cut at {cut}");
            }
        }
    }

    /// Every one-character edit of a table that uses every field: whatever the fast reader accepts,
    /// the general parser must read the same way, and reading it in pieces changes nothing.
    #[test]
    fn single_character_edits_never_make_the_two_readers_disagree() {
        let text = format!(
            "tenants:\n  {GUID_A}:\n    name: a b # c\n    upstream: \"http://x:1/\"\n    tls_verify: true\n    \
             read_timeout_ms: 12\n    upstream_headers:\n      X-K: 'v'\n    link_bases:\n      - /p\n"
        );
        let inserts = [
            " ", "\n", "#", ":", "-", "'", "\"", "\\", "&", "*", "!", "|", ">", "{", "[", "?", ",",
            "0", "%", "@", "`", "\r", "\t", "\u{85}", "~", "é",
        ];
        let mut accepted = 0;
        for i in 0..=text.len() {
            if !text.is_char_boundary(i) {
                continue;
            }
            let mut edits: Vec<String> = inserts
                .iter()
                .map(|s| {
                    let mut t = text.clone();
                    t.insert_str(i, s);
                    t
                })
                .collect();
            if i < text.len() {
                let mut t = text.clone();
                t.remove(i);
                edits.push(t);
            }
            for t in &edits {
                accepted += usize::from(agreed(t).is_some());
                // Read in pieces, one line each, it must be read (or declined) the same way.
                assert_eq!(in_pieces(t, &line_ends(t)), whole(t), "{t:?}");
            }
        }
        // Many edits are harmless (a space in a value, a digit in a number): those must still be
        // accepted, or the fast path would be too timid to matter.
        assert!(accepted > 100, "only {accepted} edits took the fast path");
    }
}
