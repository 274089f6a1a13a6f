//! The path classifier: only `GET|HEAD {base}/metadata` byte for byte is unauthenticated; a path
//! that may be forwarded is below the base and free of dot segments, escapes, `;` and `\`; a route
//! template holds only FHIR words and placeholders.
#![no_main]

use fhir_edge::internals::fhir::classify::{self, OwnEndpoint};
use fhir_edge::internals::fhir::vocabulary;
use libfuzzer_sys::fuzz_target;

const BASES: [&str; 3] = ["", "/fhir", "/fhir/r4"];
const METHODS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, target)) = data.split_first() else {
        return;
    };
    let base = BASES[usize::from(sel) % BASES.len()];
    let method: http::Method = METHODS[usize::from(sel / 3) % METHODS.len()]
        .parse()
        .unwrap();
    let (path, _query) = classify::split_target(target);
    if classify::is_public_metadata(&method, path, base) {
        assert_eq!(path, format!("{base}/metadata").as_bytes());
        assert!(method == http::Method::GET || method == http::Method::HEAD);
    }
    if let Ok(rest) = classify::fhir_remainder(path, base) {
        assert_eq!([base.as_bytes(), rest].concat(), path);
        for seg in rest.split(|&b| b == b'/') {
            assert!(seg != b"." && seg != b"..");
            assert!(!seg
                .iter()
                .any(|b| matches!(b, b'%' | b';' | b'\\' | b'#' | b'?')));
        }
    }
    match classify::own_endpoint(path, base, "/token", "/register") {
        Some(OwnEndpoint::Token) => assert_eq!(path, format!("{base}/token").as_bytes()),
        Some(OwnEndpoint::Jwks) => {
            assert_eq!(path, format!("{base}/.well-known/jwks.json").as_bytes())
        }
        _ => {}
    }
    // A route template repeats only FHIR words: every segment is a listed resource type, keyword
    // or operation name, or a placeholder; never client text.
    let template = classify::route_template(path, base);
    assert!(!template.contains('%') && !template.contains('?'));
    if !template.starts_with('{') {
        for seg in template.split('/').skip(1) {
            assert!(
                matches!(seg, "{id}" | "{other}" | "")
                    || vocabulary::resource_type(seg.as_bytes()).is_some()
                    || vocabulary::keyword_or_operation(seg.as_bytes()).is_some(),
                "{template}"
            );
        }
    }
});
