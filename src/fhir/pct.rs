//! Percent-decoding (RFC 3986 §2.1) and `application/x-www-form-urlencoded` bodies (WHATWG URL
//! §5.1), on the `percent-encoding` crate: the one decoder every parser here shares.
//!
//! Malformed escapes (`%`, `%G1`) are kept literally rather than rejected (as the crate does, and
//! as WHATWG URL specifies): callers that must refuse them check for `%` themselves. Form bodies are
//! split here rather than by `form_urlencoded`, which only offers a lossy UTF-8 reading: a token
//! request whose parameters are not UTF-8 must be refused, not have U+FFFD put in its secret.

use std::collections::HashMap;

use percent_encoding::percent_decode;

/// Decodes `%XX` escapes; with `plus_as_space`, also `+` as a space (the form-urlencoded rule,
/// WHATWG URL §5.1). `+` is replaced before decoding, so `%2B` stays a plus sign.
pub(crate) fn decode(raw: &[u8], plus_as_space: bool) -> Vec<u8> {
    if plus_as_space && raw.contains(&b'+') {
        let spaced: Vec<u8> = raw
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        return percent_decode(&spaced).collect();
    }
    percent_decode(raw).collect()
}

/// Parses an `application/x-www-form-urlencoded` body (WHATWG URL §5.1) into name → value. `None`
/// when a name repeats (RFC 6749 §3.1: parameters MUST NOT be included more than once) or a name or
/// value is not UTF-8 after decoding. Parameters without a value count as omitted (RFC 6749 §3.1).
pub(crate) fn parse_form(body: &[u8]) -> Option<HashMap<String, String>> {
    let text = |raw: &[u8]| String::from_utf8(decode(raw, true)).ok();
    let mut out = HashMap::new();
    for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        let (name, value) = (text(name)?, text(value)?);
        if out.contains_key(&name) {
            return None;
        }
        // Empty values are kept until the end so a later repeat of the name is still caught.
        out.insert(name, value);
    }
    out.retain(|_, v: &mut String| !v.is_empty());
    Some(out)
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
        assert!(super::parse_form(b"a=1&%61=2").is_none());
        assert!(super::parse_form(b"a=%FF").is_none());
        assert!(super::parse_form(b"%C3%28=1").is_none());
        assert!(super::parse_form(b"").unwrap().is_empty());
        let f = super::parse_form(b"s=a%2Bb+c&t=%E2%9C%93").unwrap();
        assert_eq!(f.get("s").map(String::as_str), Some("a+b c"));
        assert_eq!(f.get("t").map(String::as_str), Some("\u{2713}"));
    }

    #[test]
    fn decodes_escapes_and_keeps_malformed_ones() {
        assert_eq!(decode(b"a%2Fb%2e", false), b"a/b.");
        assert_eq!(decode(b"a+b", false), b"a+b");
        assert_eq!(decode(b"a+b", true), b"a b");
        assert_eq!(decode(b"%2B+", true), b"+ ");
        assert_eq!(decode(b"%", false), b"%");
        assert_eq!(decode(b"%4", false), b"%4");
        assert_eq!(decode(b"%G1", false), b"%G1");
        assert_eq!(decode(b"%41", false), b"A");
        assert_eq!(decode(b"%%41", false), b"%A");
    }
}
