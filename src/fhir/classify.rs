//! Request classification: which requests skip authentication, which paths may be forwarded, and
//! which methods a tenant's route accepts. Pure functions over raw bytes, so they can be fuzzed.
//!
//! The unauthenticated rule is a **byte-exact** comparison of the raw path with `{base}/metadata`:
//! never a prefix match and never a match after normalisation (`/metadata/../Patient`, `//metadata`,
//! `/metadata;x`, `/%6Detadata`, `/METADATA` all need a token). Proxies that normalised before
//! matching have shipped auth bypasses (Envoy CVE-2019-9901, CVE-2021-29492).
//!
//! Forwarded paths are held to a strict grammar: segments of unreserved characters plus the few
//! FHIR uses (`$` for operations, `_` for `_search`/`_history`), with no dot segments, no
//! empty segments, no `%` escapes, no `;` parameters and no backslashes. The upstream path is the
//! tenant's base path plus this remainder, so a dot segment or an encoded slash that the upstream
//! decodes could otherwise walk out of one tenant's base path into another's on a shared server.

use http::Method;

use super::vocabulary;

/// Splits a raw request target into path and query (without the `?`).
pub fn split_target(target: &[u8]) -> (&[u8], Option<&[u8]>) {
    match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], Some(&target[i + 1..])),
        None => (target, None),
    }
}

/// True only for `GET`/`HEAD` of exactly `{base}/metadata` (the query is not part of `path`).
pub fn is_public_metadata(method: &Method, path: &[u8], base: &str) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && path.len() == base.len() + "/metadata".len()
        && path.starts_with(base.as_bytes())
        && &path[base.len()..] == b"/metadata"
}

/// fhir-edge's own endpoints below the public base (when the token endpoint is configured).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnEndpoint<'a> {
    /// `{base}{token path}`, byte-exact.
    Token,
    /// `{base}/.well-known/jwks.json`, byte-exact.
    Jwks,
    /// `{base}/.well-known/smart-configuration`, byte-exact.
    SmartConfiguration,
    /// `{base}/authorize`, byte-exact.
    Authorize,
    /// `{base}{management path}` and below; the rest of the path (parsed by the endpoint).
    Manage(&'a [u8]),
}

pub(crate) const JWKS_PATH: &str = "/.well-known/jwks.json";
pub(crate) const SMART_CONFIGURATION_PATH: &str = "/.well-known/smart-configuration";
pub(crate) const AUTHORIZE_PATH: &str = "/authorize";

/// Which of fhir-edge's own endpoints `path` names, if any. Exact byte comparisons, like the metadata
/// rule: these endpoints do not take a bearer token, so no normalisation may widen them.
pub fn own_endpoint<'a>(
    path: &'a [u8],
    base: &str,
    token_path: &str,
    management_path: &str,
) -> Option<OwnEndpoint<'a>> {
    let rest = path.strip_prefix(base.as_bytes())?;
    if rest == token_path.as_bytes() {
        return Some(OwnEndpoint::Token);
    }
    if rest == JWKS_PATH.as_bytes() {
        return Some(OwnEndpoint::Jwks);
    }
    if rest == SMART_CONFIGURATION_PATH.as_bytes() {
        return Some(OwnEndpoint::SmartConfiguration);
    }
    if rest == AUTHORIZE_PATH.as_bytes() {
        return Some(OwnEndpoint::Authorize);
    }
    let below = rest.strip_prefix(management_path.as_bytes())?;
    (below.is_empty() || below.starts_with(b"/")).then_some(OwnEndpoint::Manage(below))
}

/// Why a path cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not below the public base path: 404.
    NotUnderBase,
    /// Below the base, but outside the grammar above: 400.
    Rejected,
}

/// The part of `path` below `base` (`""`, `"/"` or `/Type/...`), if it may be forwarded.
pub fn fhir_remainder<'a>(path: &'a [u8], base: &str) -> Result<&'a [u8], PathError> {
    let rest = path
        .strip_prefix(base.as_bytes())
        .ok_or(PathError::NotUnderBase)?;
    if rest.is_empty() || rest == b"/" {
        return Ok(rest);
    }
    let Some(segments) = rest.strip_prefix(b"/") else {
        return Err(PathError::NotUnderBase);
    };
    // One trailing slash is tolerated (`/Patient/`); empty segments elsewhere are not.
    let segments = segments.strip_suffix(b"/").unwrap_or(segments);
    for segment in segments.split(|&b| b == b'/') {
        if segment.is_empty() || segment == b"." || segment == b".." {
            return Err(PathError::Rejected);
        }
        if !segment.iter().all(|&b| is_segment_byte(b)) {
            return Err(PathError::Rejected);
        }
    }
    Ok(rest)
}

fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'$'
                | b':'
                | b'@'
                | b'!'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b'\''
        )
}

/// The route template of a path, for logs and metrics: only words of the FHIR vocabulary
/// (`super::vocabulary`) survive. Resource type names are kept where FHIR puts a type (even
/// positions: `Type/{id}/Compartment`), REST keywords and operation names wherever they appear; every
/// other segment becomes `{id}` at an odd position (where FHIR puts ids:
/// `Type/{id}/_history/{id}`) and `{other}` at an even one. A path segment is client text, so
/// nothing outside the vocabulary is ever copied: `/Patient/_john.smith@x.org` is
/// `/Patient/{id}`, `/Patient/1/Smith` is `/Patient/{id}/{other}`. Never contains the query string.
pub fn route_template(path: &[u8], base: &str) -> String {
    let rest = match fhir_remainder(path, base) {
        Ok(rest) => rest,
        Err(PathError::NotUnderBase) => return "{outside-base}".into(),
        Err(PathError::Rejected) => return "{invalid}".into(),
    };
    let rest = rest.strip_prefix(b"/").unwrap_or(rest);
    let rest = rest.strip_suffix(b"/").unwrap_or(rest);
    if rest.is_empty() {
        return "/".into();
    }
    let mut out = String::new();
    for (i, seg) in rest.split(|&b| b == b'/').enumerate() {
        out.push('/');
        let word = vocabulary::keyword_or_operation(seg).or_else(|| {
            (i % 2 == 0)
                .then(|| vocabulary::resource_type(seg))
                .flatten()
        });
        out.push_str(match (word, i % 2) {
            (Some(word), _) => word,
            (None, 1) => "{id}",
            (None, _) => "{other}",
        });
    }
    out
}

/// What the method policy says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MethodPolicy {
    Allowed,
    /// `POST {base}`: allowed when the body is a `batch` Bundle of reads, checked as it streams.
    BatchOfReads,
    /// 405.
    NotAllowed,
}

/// The methods the Patients app uses: reads, `POST [type]/_search` and `POST [base]` (batch).
/// Everything else is a write, refused unless the tenant's route allows writes.
pub(crate) fn method_policy(method: &Method, remainder: &[u8], allow_writes: bool) -> MethodPolicy {
    if method == Method::GET || method == Method::HEAD {
        return MethodPolicy::Allowed;
    }
    if method == Method::POST {
        if remainder.is_empty() || remainder == b"/" {
            return if allow_writes {
                MethodPolicy::Allowed
            } else {
                MethodPolicy::BatchOfReads
            };
        }
        let trimmed = remainder.strip_suffix(b"/").unwrap_or(remainder);
        if trimmed.ends_with(b"/_search") {
            return MethodPolicy::Allowed;
        }
    }
    let write = method == Method::POST
        || method == Method::PUT
        || method == Method::PATCH
        || method == Method::DELETE;
    if write && allow_writes {
        MethodPolicy::Allowed
    } else {
        MethodPolicy::NotAllowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_metadata_path_is_public() {
        for base in ["", "/fhir", "/fhir/r4"] {
            let exact = format!("{base}/metadata");
            assert!(is_public_metadata(&Method::GET, exact.as_bytes(), base));
            assert!(is_public_metadata(&Method::HEAD, exact.as_bytes(), base));
            assert!(!is_public_metadata(&Method::POST, exact.as_bytes(), base));
            for bypass in [
                "/metadata/",
                "/metadata/../Patient",
                "//metadata",
                "/metadata;x",
                "/METADATA",
                "/Metadata",
                "/%6Detadata",
                "/metadata%2F..%2FPatient",
                "/metadata%00",
                "/./metadata",
                "/metadata#x",
                "\\metadata",
                "/metadata.json",
                "/x/../metadata",
            ] {
                let p = format!("{base}{bypass}");
                assert!(!is_public_metadata(&Method::GET, p.as_bytes(), base), "{p}");
            }
        }
        assert!(!is_public_metadata(&Method::GET, b"/metadata", "/fhir"));
        assert!(!is_public_metadata(&Method::GET, b"/fhi/metadata", "/fhir"));
    }

    #[test]
    fn own_endpoints_match_exactly() {
        fn e(p: &str) -> Option<OwnEndpoint<'_>> {
            own_endpoint(p.as_bytes(), "/fhir", "/token", "/register")
        }
        assert_eq!(e("/fhir/token"), Some(OwnEndpoint::Token));
        assert_eq!(e("/fhir/.well-known/jwks.json"), Some(OwnEndpoint::Jwks));
        assert_eq!(
            e("/fhir/register/abc/secrets"),
            Some(OwnEndpoint::Manage(b"/abc/secrets"))
        );
        assert_eq!(e("/fhir/register"), Some(OwnEndpoint::Manage(b"")));
        for other in [
            "/token",
            "/fhir/token/",
            "/fhir/TOKEN",
            "/fhir//token",
            "/fhir/registers",
            "/fhir/%74oken",
            "/fhir/token;x",
        ] {
            assert_eq!(e(other), None, "{other}");
        }
    }

    #[test]
    fn forwarded_paths_follow_the_grammar() {
        assert_eq!(
            fhir_remainder(b"/fhir/Patient/123", "/fhir"),
            Ok(&b"/Patient/123"[..])
        );
        assert_eq!(fhir_remainder(b"/fhir", "/fhir"), Ok(&b""[..]));
        assert_eq!(fhir_remainder(b"/fhir/", "/fhir"), Ok(&b"/"[..]));
        assert_eq!(
            fhir_remainder(b"/Patient/_search", ""),
            Ok(&b"/Patient/_search"[..])
        );
        assert_eq!(
            fhir_remainder(b"/Patient/$everything", ""),
            Ok(&b"/Patient/$everything"[..])
        );
        assert_eq!(fhir_remainder(b"/Patient/", ""), Ok(&b"/Patient/"[..]));
        assert_eq!(
            fhir_remainder(b"/fhirx/Patient", "/fhir"),
            Err(PathError::NotUnderBase)
        );
        assert_eq!(
            fhir_remainder(b"/Patient", "/fhir"),
            Err(PathError::NotUnderBase)
        );
        assert_eq!(
            fhir_remainder(b"http://h/Patient", ""),
            Err(PathError::NotUnderBase)
        );
        for bad in [
            "/Patient/../Observation",
            "/Patient/./1",
            "/..",
            "//Patient",
            "/Patient//1",
            "/Patient/%2e%2e/x",
            "/Patient%2F1",
            "/Patient/1;x",
            "/Patient/..;/x",
            "/Patient\\1",
            "/Patient/1#frag",
            "/Patient/\u{e9}",
            "/Patient/1 ",
            "/Patient/1%00",
        ] {
            assert_eq!(
                fhir_remainder(bad.as_bytes(), ""),
                Err(PathError::Rejected),
                "{bad}"
            );
        }
    }

    #[test]
    fn route_templates_never_keep_ids_or_queries() {
        assert_eq!(
            route_template(b"/fhir/Patient/123", "/fhir"),
            "/Patient/{id}"
        );
        assert_eq!(route_template(b"/Patient/Smith", ""), "/Patient/{id}");
        assert_eq!(route_template(b"/Observation", ""), "/Observation");
        assert_eq!(route_template(b"/Patient/_search", ""), "/Patient/_search");
        assert_eq!(
            route_template(b"/Patient/9/_history/2", ""),
            "/Patient/{id}/_history/{id}"
        );
        assert_eq!(
            route_template(b"/Patient/9/Observation", ""),
            "/Patient/{id}/Observation"
        );
        assert_eq!(
            route_template(b"/Patient/$everything", ""),
            "/Patient/$everything"
        );
        assert_eq!(route_template(b"/metadata", ""), "/metadata");
        assert_eq!(route_template(b"/", ""), "/");
        assert_eq!(route_template(b"/john-smith", ""), "/{other}");
        // Client text that merely looks like a FHIR word is not one.
        assert_eq!(
            route_template(b"/Patient/_john.smith@x.org", ""),
            "/Patient/{id}"
        );
        assert_eq!(
            route_template(b"/Patient/1/Smith", ""),
            "/Patient/{id}/{other}"
        );
        assert_eq!(route_template(b"/Smith", ""), "/{other}");
        assert_eq!(route_template(b"/$Smith", ""), "/{other}");
        assert_eq!(
            route_template(b"/MedicationOrder/7/$everything", ""),
            "/MedicationOrder/{id}/$everything"
        );
        // Found by the path_classifier fuzz target: a template never contains `?` or `%`, so it can
        // never be mistaken for (or carry) a query string.
        assert_eq!(route_template(b"/fhir/token", ""), "/{other}/{id}");
        assert_eq!(route_template(b"/Patient/../x", ""), "{invalid}");
        assert_eq!(route_template(b"/other", "/fhir"), "{outside-base}");
    }

    /// Random paths mixing FHIR words with client text that carries a canary, shaped like the words
    /// (`_x`, `$x`, capitalised letters): no template segment is ever anything but a listed word or
    /// a placeholder, so the canary never survives.
    #[test]
    fn route_templates_of_random_paths_keep_only_fhir_words() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let words = [
            "Patient",
            "Observation",
            "_search",
            "_history",
            "$everything",
            "metadata",
        ];
        let alphabet = b"ABCZabcz019-._~$:@!*+,='";
        for _ in 0..20_000 {
            let mut path = String::new();
            for _ in 0..1 + next() % 6 {
                path.push('/');
                let pick = next() % 6;
                if pick == 0 {
                    path.push_str(words[(next() % words.len() as u64) as usize]);
                    continue;
                }
                path.push_str(["", "_", "$", "P", "_P", "$P"][pick as usize]);
                path.push_str("Canary");
                for _ in 0..next() % 8 {
                    path.push(char::from(
                        alphabet[(next() % alphabet.len() as u64) as usize],
                    ));
                }
            }
            let template = route_template(path.as_bytes(), "");
            assert!(!template.contains("Canary"), "{path} -> {template}");
            if template.starts_with('{') {
                continue;
            }
            for seg in template.split('/').skip(1) {
                assert!(
                    matches!(seg, "{id}" | "{other}")
                        || vocabulary::resource_type(seg.as_bytes()).is_some()
                        || vocabulary::keyword_or_operation(seg.as_bytes()).is_some(),
                    "{path} -> {template}"
                );
            }
        }
    }

    #[test]
    fn method_policy_allows_reads_search_and_batch() {
        use MethodPolicy::*;
        assert_eq!(method_policy(&Method::GET, b"/Patient/1", false), Allowed);
        assert_eq!(method_policy(&Method::HEAD, b"/Patient/1", false), Allowed);
        assert_eq!(
            method_policy(&Method::POST, b"/Patient/_search", false),
            Allowed
        );
        assert_eq!(method_policy(&Method::POST, b"", false), BatchOfReads);
        assert_eq!(method_policy(&Method::POST, b"/", false), BatchOfReads);
        assert_eq!(method_policy(&Method::POST, b"/", true), Allowed);
        assert_eq!(method_policy(&Method::POST, b"/Patient", false), NotAllowed);
        assert_eq!(
            method_policy(&Method::PUT, b"/Patient/1", false),
            NotAllowed
        );
        assert_eq!(
            method_policy(&Method::DELETE, b"/Patient/1", false),
            NotAllowed
        );
        assert_eq!(
            method_policy(&Method::PATCH, b"/Patient/1", false),
            NotAllowed
        );
        assert_eq!(
            method_policy(&Method::OPTIONS, b"/Patient", false),
            NotAllowed
        );
        assert_eq!(method_policy(&Method::PUT, b"/Patient/1", true), Allowed);
        assert_eq!(method_policy(&Method::POST, b"/Patient", true), Allowed);
        assert_eq!(
            method_policy(&Method::OPTIONS, b"/Patient", true),
            NotAllowed
        );
    }
}
