//! Percent-decoding (RFC 3986 §2.1), the one implementation every parser here shares.
//!
//! Malformed escapes (`%`, `%G1`) are kept literally rather than rejected: callers that must refuse
//! them check for `%` themselves.

/// Decodes `%XX` escapes; with `plus_as_space`, also `+` as a space (the form-urlencoded rule,
/// WHATWG URL §5.1).
pub fn decode(raw: &[u8], plus_as_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        if c == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(if plus_as_space && c == b'+' { b' ' } else { c });
        i += 1;
    }
    out
}

/// Parses an `application/x-www-form-urlencoded` body (WHATWG URL §5.1) into name → value. `None`
/// when a name repeats (RFC 6749 §3.1: parameters MUST NOT be included more than once) or a name or
/// value is not UTF-8 after decoding. Parameters without a value count as omitted (RFC 6749 §3.1).
pub fn parse_form(body: &[u8]) -> Option<std::collections::HashMap<String, String>> {
    let mut out = std::collections::HashMap::new();
    for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        let name = String::from_utf8(decode(name, true)).ok()?;
        let value = String::from_utf8(decode(value, true)).ok()?;
        if out.contains_key(&name) {
            return None;
        }
        // Empty values are kept until the end so a later repeat of the name is still caught.
        out.insert(name, value);
    }
    out.retain(|_, v: &mut String| !v.is_empty());
    Some(out)
}

/// The value of one hex digit (either case).
pub(crate) fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn forms_decode_and_refuse_repeats() {
        let f = super::parse_form(b"grant_type=client_credentials&scope=a+b%20c&empty=&x").unwrap();
        assert_eq!(
            f.get("grant_type").map(String::as_str),
            Some("client_credentials")
        );
        assert_eq!(f.get("scope").map(String::as_str), Some("a b c"));
        assert!(!f.contains_key("empty") && !f.contains_key("x"));
        assert!(super::parse_form(b"a=1&a=2").is_none());
        assert!(super::parse_form(b"a=1&a=").is_none());
        assert!(super::parse_form(b"a=%FF").is_none());
        assert!(super::parse_form(b"").unwrap().is_empty());
    }

    #[test]
    fn decodes_escapes_and_keeps_malformed_ones() {
        assert_eq!(decode(b"a%2Fb%2e", false), b"a/b.");
        assert_eq!(decode(b"a+b", false), b"a+b");
        assert_eq!(decode(b"a+b", true), b"a b");
        assert_eq!(decode(b"%", false), b"%");
        assert_eq!(decode(b"%4", false), b"%4");
        assert_eq!(decode(b"%G1", false), b"%G1");
        assert_eq!(decode(b"%41", false), b"A");
    }
}
