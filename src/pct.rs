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

fn hex(c: u8) -> Option<u8> {
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
