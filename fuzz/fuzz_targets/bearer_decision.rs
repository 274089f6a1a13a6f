//! The bearer/JWT/scope decision on arbitrary Authorization headers and query strings: never a panic,
//! and a grant only ever names the one tenant its scope names.
#![no_main]

use std::sync::OnceLock;

use fhir_edge::internals::auth::{self, scope::tenant_in, TokenCache, Verifier, VerifyKey};
use jsonwebtoken::{Algorithm, DecodingKey};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/keys/");
        let read = |f: &str| std::fs::read(format!("{keys}{f}")).unwrap_or_default();
        let mut out = Vec::new();
        if let Ok(k) = DecodingKey::from_rsa_pem(&read("rs256.pub.pem")) {
            out.push(VerifyKey {
                kid: Some("rs1".into()),
                alg: Algorithm::RS256,
                key: k,
                issuer: "https://issuer.test/".into(),
                audience: "fhir-edge-tests".into(),
                own: false,
            });
        }
        if let Ok(k) = DecodingKey::from_secret(read("hs256.secret").trim_ascii_end()) {
            out.push(VerifyKey {
                kid: Some("hs1".into()),
                alg: Algorithm::HS256,
                key: k,
                issuer: "https://issuer.test/".into(),
                audience: "fhir-edge-tests".into(),
                own: false,
            });
        }
        Verifier::new(out, 30)
    })
}

fuzz_target!(|data: &[u8]| {
    // First byte: where the query starts; the rest: header value, then query.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(split).min(rest.len());
    let (value, query) = rest.split_at(cut);
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(value) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
    let query = (!query.is_empty()).then_some(query);
    // A fresh cache per input: the decision through the cache (miss, then hit) must equal the
    // uncached one.
    let cache = TokenCache::new(4, 30);
    let direct = auth::authenticate(verifier(), &TokenCache::new(0, 30), &headers, query, 8192);
    let missed = auth::authenticate(verifier(), &cache, &headers, query, 8192);
    let hit = auth::authenticate(verifier(), &cache, &headers, query, 8192);
    assert_eq!(
        direct.as_ref().map(|g| g.tenant).err(),
        missed.as_ref().map(|g| g.tenant).err()
    );
    assert_eq!(
        direct.as_ref().map(|g| g.tenant).ok(),
        hit.as_ref().map(|g| g.tenant).ok()
    );
    if let Ok(grant) = direct {
        let token = auth::bearer::extract(&headers, 8192).unwrap_or_default();
        let (claims, _) = verifier()
            .verify(token)
            .unwrap_or_else(|_| panic!("verified once, not twice"));
        let scope = claims.scope.as_deref().unwrap_or_default();
        assert_eq!(tenant_in(scope), Some(grant.tenant));
    }
    // Scope parsing alone, on the same bytes.
    if let Ok(s) = std::str::from_utf8(value) {
        if let Some(t) = tenant_in(s) {
            let canonical = t.to_string();
            assert_eq!(
                s.split(' ')
                    .filter(|e| e.eq_ignore_ascii_case(&canonical))
                    .count(),
                1
            );
        }
    }
});
