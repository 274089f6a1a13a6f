//! Bearer-token extraction (RFC 6750 §2.1), bounded before any parsing.
//!
//! Exactly one `Authorization` header, scheme `Bearer` in any case, then a `b64token`. Tokens offered
//! another way (the `access_token` query parameter of RFC 6750 §2.3) are refused outright: query strings
//! end up in logs and browser history, and a request carrying two credentials is ambiguous.

use http::header::AUTHORIZATION;
use http::HeaderMap;

use super::AuthFailure;

/// Returns the token of the single `Authorization: Bearer` header.
pub fn extract(headers: &HeaderMap, max_len: usize) -> Result<&str, AuthFailure> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return Err(AuthFailure::Missing),
        (Some(v), None) => v.as_bytes(),
        (Some(_), Some(_)) => return Err(AuthFailure::Malformed),
    };
    // RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token; the scheme is case-insensitive (RFC 9110 §11.1).
    let Some(space) = value.iter().position(|&b| b == b' ') else {
        return Err(if value.eq_ignore_ascii_case(b"bearer") {
            AuthFailure::Malformed
        } else {
            // Another scheme (Basic, Negotiate…): no bearer credentials were offered.
            AuthFailure::Missing
        });
    };
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(AuthFailure::Missing);
    }
    let token = trim_spaces(rest);
    if token.is_empty() {
        return Err(AuthFailure::Malformed);
    }
    if token.len() > max_len {
        return Err(AuthFailure::TooLarge);
    }
    if !is_b64token(token) {
        return Err(AuthFailure::Malformed);
    }
    // is_b64token admits ASCII only, so this cannot fail; map it anyway rather than unwrap.
    std::str::from_utf8(token).map_err(|_| AuthFailure::Malformed)
}

fn trim_spaces(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&c| c != b' ').unwrap_or(b.len());
    let end = b.iter().rposition(|&c| c != b' ').map_or(start, |i| i + 1);
    &b[start..end]
}

/// b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
fn is_b64token(t: &[u8]) -> bool {
    let body_end = t.iter().rposition(|&c| c != b'=').map_or(0, |i| i + 1);
    body_end > 0 && t[..body_end].iter().all(|&c| B64TOKEN[usize::from(c)])
}

/// The b64token body characters, as a table (a token is checked byte by byte on every request).
static B64TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        c += 1;
    }
    t
};

/// True when the raw query string carries an `access_token` parameter (RFC 6750 §2.3), also when its
/// name is percent-encoded.
pub(crate) fn query_has_access_token(query: &[u8]) -> bool {
    query.split(|&b| b == b'&').any(|pair| {
        let name = pair.split(|&b| b == b'=').next().unwrap_or_default();
        crate::fhir::pct::decode(name, true).eq_ignore_ascii_case(b"access_token")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(
            extract(&headers(&["bearer abc.def.ghi"]), 100),
            Ok("abc.def.ghi")
        );
        assert_eq!(
            extract(&headers(&["BEARER  abc.def.ghi"]), 100),
            Ok("abc.def.ghi")
        );
    }

    #[test]
    fn missing_malformed_and_oversized() {
        assert_eq!(extract(&headers(&[]), 100), Err(AuthFailure::Missing));
        assert_eq!(
            extract(&headers(&["Basic dXNlcjpwdw=="]), 100),
            Err(AuthFailure::Missing)
        );
        assert_eq!(
            extract(&headers(&["Bearer"]), 100),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            extract(&headers(&["Bearer    "]), 100),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            extract(&headers(&["Bearer a b"]), 100),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            extract(&headers(&["Bearer a,b"]), 100),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            extract(&headers(&["Bearer =="]), 100),
            Err(AuthFailure::Malformed)
        );
        assert_eq!(
            extract(&headers(&["Bearer a.b.c", "Bearer a.b.c"]), 100),
            Err(AuthFailure::Malformed)
        );
        let long = format!("Bearer {}", "a".repeat(101));
        assert_eq!(extract(&headers(&[&long]), 100), Err(AuthFailure::TooLarge));
    }

    #[test]
    fn access_token_in_query_is_detected() {
        assert!(query_has_access_token(b"access_token=x"));
        assert!(query_has_access_token(b"a=1&ACCESS_TOKEN=x"));
        assert!(query_has_access_token(b"access%5Ftoken=x"));
        assert!(query_has_access_token(b"access_token"));
        assert!(!query_has_access_token(b"name=access_token"));
        assert!(!query_has_access_token(b"x_access_token=1"));
        assert!(!query_has_access_token(b""));
        assert!(!query_has_access_token(b"%"));
    }
}
