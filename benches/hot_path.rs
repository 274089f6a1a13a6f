//! Micro-benchmarks of the per-request work: JWT verification and signing (RS256, ES256, HS256),
//! scope → tenant, routing-table lookup at 10, 1,000 and 100,000 tenants, and the whole
//! authenticate-and-route decision with the token cache hit, missed and turned off; a tenant's
//! request limits; and the CPU work of reloading a 100,000-tenant table.
//!
//! Every group name carries the JWT crypto backend it was built with, so the two backends can be
//! compared: `cargo bench --bench hot_path` (aws-lc-rs, the default) and
//! `cargo bench --bench hot_path --no-default-features --features rust-crypto`.
#![allow(unreachable_pub)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use jsonwebtoken::{encode, Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::json;

use fhir_edge::internals::auth::{self, scope::tenant_from_scope, TokenCache, Verifier, VerifyKey};
use fhir_edge::internals::config::RouteDefaults;
use fhir_edge::internals::routing::{RoutingTable, TableContext};
use fhir_edge::internals::tenant::TenantId;
use serde::de::IgnoredAny;

const ISS: &str = "https://issuer.bench/";
const BACKEND: &str = if cfg!(feature = "aws-lc") {
    "aws_lc_rs"
} else {
    "rust_crypto"
};
const AUD: &str = "bench";

fn key(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/keys")
            .join(name),
    )
    .unwrap()
}

fn verifier() -> Verifier {
    auth::install_crypto();
    let secret = key("hs256.secret");
    let keys = vec![
        (
            "rs1",
            Algorithm::RS256,
            DecodingKey::from_rsa_pem(&key("rs256.pub.pem")).unwrap(),
        ),
        (
            "es1",
            Algorithm::ES256,
            DecodingKey::from_ec_pem(&key("es256.pub.pem")).unwrap(),
        ),
        (
            "hs1",
            Algorithm::HS256,
            DecodingKey::from_secret(secret.trim_ascii_end()).unwrap(),
        ),
    ];
    Verifier::new(
        keys.into_iter()
            .map(|(kid, alg, key)| VerifyKey {
                kid: Some(kid.into()),
                alg,
                key,
                issuer: ISS.into(),
                audience: AUD.into(),
                own: false,
            })
            .collect(),
        30,
    )
}

fn tenant(i: usize) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", i, i)
}

fn encoding_key(kid: &str) -> EncodingKey {
    auth::install_crypto();
    match kid {
        "rs1" => EncodingKey::from_rsa_pem(&key("rs256.pem")).unwrap(),
        "es1" => EncodingKey::from_ec_pem(&key("es256.pem")).unwrap(),
        _ => EncodingKey::from_secret(key("hs256.secret").trim_ascii_end()).unwrap(),
    }
}

fn mint(kid: &str, alg: Algorithm, tenant: &str) -> String {
    mint_with(&encoding_key(kid), kid, alg, tenant, 0)
}

/// A token; `n` makes its `jti` (and so the token) unique.
fn mint_with(enc: &EncodingKey, kid: &str, alg: Algorithm, tenant: &str, n: usize) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    h.typ = Some("at+jwt".into());
    let claims = json!({"iss": ISS, "aud": AUD, "exp": now + 3600, "iat": now, "sub": "c",
        "client_id": "c", "jti": format!("jti-{n}"), "scope": format!("system/*.read {tenant}")});
    encode(&h, &claims, enc).unwrap()
}

fn table(n: usize) -> RoutingTable {
    let mut text = String::from("tenants:\n");
    for i in 0..n {
        text.push_str(&format!(
            "  {}:\n    name: t{i}\n    upstream: \"http://127.0.0.1:{}/r4\"\n",
            tenant(i),
            1024 + i % 60000
        ));
    }
    RoutingTable::from_text(
        &PathBuf::from("bench-routes.yaml"),
        &text,
        &defaults().into(),
    )
    .unwrap()
}

fn defaults() -> RouteDefaults {
    RouteDefaults {
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ca_der: None,
        public_base: "https://edge.bench/fhir".into(),
        tenant_label: fhir_edge::internals::ops::metrics::TenantLabel::Name,
        limits: Default::default(),
        health: Default::default(),
    }
}

/// The reload's CPU work for a 100,000-tenant table written as JSON and as YAML the way
/// `benches/load.rs` writes them (~12 MB and ~9 MB, every tenant on the same upstream): the change
/// check, and parse + validate + build.
fn bench_reload(c: &mut Criterion) {
    let mut tenants = serde_json::Map::new();
    for i in 0..100_000 {
        tenants.insert(
            tenant(i),
            json!({"name": format!("t{i}"), "upstream": "http://127.0.0.1:8080/fhir"}),
        );
    }
    let text = serde_json::to_string_pretty(&json!({ "tenants": tenants })).unwrap();
    let path = PathBuf::from("bench-routes.json");
    let ctx: TableContext = defaults().into();
    let mut g = c.benchmark_group("reload_100k");
    g.sample_size(10);
    // SHA-256 of the text: what a check of an unchanged file costs besides reading it.
    g.bench_function("change_check", |b| {
        b.iter(|| fhir_edge::internals::reload::read::fingerprint(black_box(text.as_bytes())))
    });
    g.bench_function("parse_validate_build_json", |b| {
        b.iter(|| RoutingTable::from_text(&path, black_box(&text), &ctx).unwrap())
    });
    // The same table as YAML, written the way `benches/load.rs` and most operators write it.
    let mut yaml = String::from("tenants:\n");
    for i in 0..100_000 {
        yaml.push_str(&format!(
            "  {}:\n    name: t{i}\n    upstream: \"http://127.0.0.1:8080/fhir\"\n",
            tenant(i)
        ));
    }
    let yaml_path = PathBuf::from("bench-routes.yaml");
    g.bench_function("parse_validate_build_yaml", |b| {
        b.iter(|| RoutingTable::from_text(&yaml_path, black_box(&yaml), &ctx).unwrap())
    });
    // Parsing only (nothing built), by the YAML reader in use against the one it replaced, on the
    // same text.
    g.bench_function("read_yaml_serde_saphyr", |b| {
        b.iter(|| {
            fhir_edge::internals::reload::parse::parse::<IgnoredAny>(black_box(&yaml)).unwrap()
        })
    });
    g.bench_function("read_yaml_serde_yaml_ng", |b| {
        b.iter(|| serde_yaml_ng::from_str::<IgnoredAny>(black_box(&yaml)).unwrap())
    });
    g.finish();
}

fn bench_verify(c: &mut Criterion) {
    let v = verifier();
    let mut g = c.benchmark_group(format!("jwt_verify/{BACKEND}"));
    for (kid, alg) in [
        ("rs1", Algorithm::RS256),
        ("es1", Algorithm::ES256),
        ("hs1", Algorithm::HS256),
    ] {
        let t = mint(kid, alg, &tenant(1));
        g.bench_function(format!("{alg:?}"), |b| {
            b.iter(|| v.verify(black_box(&t)).unwrap())
        });
    }
    g.finish();
}

/// A key from a fetched JWK Set (an Entra-shaped RSA key without `alg`, and an ES256 JWK) against the
/// same key from a PEM file: the per-token cost of a remote-JWKS issuer.
fn bench_remote_keys(c: &mut Criterion) {
    let file = verifier();
    let mut g = c.benchmark_group(format!("jwt_verify_key_source/{BACKEND}"));
    for (fixture, kid, file_kid, alg) in [
        ("rs256-noalg-jwks.json", "entra-rs", "rs1", Algorithm::RS256),
        ("jwks.json", "jwks-es", "es1", Algorithm::ES256),
    ] {
        let remote = Verifier::with_fetched_jwks(ISS, AUD, &[alg], &key(fixture), 30).unwrap();
        let enc = encoding_key(file_kid);
        let from_file = mint_with(&enc, file_kid, alg, &tenant(1), 0);
        let from_jwks = mint_with(&enc, kid, alg, &tenant(1), 0);
        g.bench_function(format!("{alg:?}/file"), |b| {
            b.iter(|| file.verify(black_box(&from_file)).unwrap())
        });
        g.bench_function(format!("{alg:?}/jwks_uri"), |b| {
            b.iter(|| remote.verify(black_box(&from_jwks)).unwrap())
        });
    }
    g.finish();
}

/// What the token endpoint pays per token for the signature.
fn bench_sign(c: &mut Criterion) {
    let mut g = c.benchmark_group(format!("jwt_sign/{BACKEND}"));
    for (kid, alg) in [
        ("rs1", Algorithm::RS256),
        ("es1", Algorithm::ES256),
        ("hs1", Algorithm::HS256),
    ] {
        let enc = encoding_key(kid);
        let mut n = 0;
        g.bench_function(format!("{alg:?}"), |b| {
            b.iter(|| {
                n += 1;
                black_box(mint_with(&enc, kid, alg, &tenant(1), n))
            })
        });
    }
    g.finish();
}

fn bench_scope(c: &mut Criterion) {
    let scope = format!("system/*.read launch {}", tenant(7));
    c.bench_function("scope_to_tenant", |b| {
        b.iter(|| tenant_from_scope(Some(black_box(scope.as_str()))).unwrap())
    });
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing_lookup");
    for n in [10usize, 1_000, 100_000] {
        let t = table(n);
        let ids: Vec<TenantId> = (0..n)
            .step_by((n / 10).max(1))
            .map(|i| TenantId::parse(&tenant(i)).unwrap())
            .collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &ids, |b, ids| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % ids.len();
                black_box(t.get(&ids[i]).unwrap());
            })
        });
    }
    g.finish();
}

/// The per-request cost of a tenant's limits (`src/routing/limits.rs`): admitting a request and
/// giving its in-flight place back. `none` is the baseline (a tenant without limits); the others
/// add the in-flight count, the tenant's token bucket and a per-client bucket, then the same across
/// 100,000 tenants with state, and a refusal. Rates are high enough that the buckets never empty
/// (except `refused`), so every iteration takes the admitting path.
fn bench_limiter(c: &mut Criterion) {
    use fhir_edge::internals::config::limits::{ClientLimitSpec, LimitSpec, TenantLimits};
    use fhir_edge::internals::routing::limits::LimiterRegistry;
    let resolve =
        |spec: LimitSpec| TenantLimits::resolve(&LimitSpec::default(), Some(&spec)).unwrap();
    let high = Some(1_000_000);
    let unlimited = resolve(LimitSpec {
        max_in_flight: Some(0),
        ..LimitSpec::default()
    });
    let in_flight = resolve(LimitSpec::default());
    let rate = resolve(LimitSpec {
        requests_per_second: high,
        burst: high,
        ..LimitSpec::default()
    });
    let per_client = resolve(LimitSpec {
        requests_per_second: high,
        burst: high,
        per_client: Some(ClientLimitSpec {
            requests_per_second: high,
            burst: high,
        }),
        ..LimitSpec::default()
    });
    let refused = resolve(LimitSpec {
        requests_per_second: Some(1),
        burst: Some(1),
        ..LimitSpec::default()
    });
    let registry = LimiterRegistry::default();
    let one = TenantId::parse(&tenant(7)).unwrap();
    let mut g = c.benchmark_group("tenant_limits");
    for (name, limits) in [
        ("none", unlimited),
        ("in_flight", in_flight),
        ("rate_and_in_flight", rate),
        ("rate_in_flight_and_client", per_client),
        ("refused", refused),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| drop(black_box(registry.admit(one, &limits, Some("client-1")))))
        });
    }
    // State for 100,000 tenants; each request is one of them, in turn.
    let many = LimiterRegistry::default();
    let ids: Vec<TenantId> = (0..100_000)
        .map(|i| TenantId::parse(&tenant(i)).unwrap())
        .collect();
    for id in &ids {
        drop(many.admit(*id, &per_client, Some("client-1")));
    }
    let mut i = 0;
    g.bench_function("rate_in_flight_and_client/100000_tenants", |b| {
        b.iter(|| {
            i = (i + 7919) % ids.len();
            drop(black_box(many.admit(ids[i], &per_client, Some("client-1"))))
        })
    });
    g.finish();
}

/// The whole request-filter decision for a valid token: extract, verify (or hit the cache), tenant
/// from scope, route lookup in a 1,000-tenant table. `cached`: the same token every time (the normal
/// client); `uncached`: cache off; `unique`: a different token per request with the cache on (every
/// lookup misses and inserts — the cache-defeating worst case).
fn bench_decision(c: &mut Criterion) {
    let v = verifier();
    let t = table(1_000);
    let mut g = c.benchmark_group(format!("authenticate_and_route/{BACKEND}"));
    for (kid, alg) in [
        ("rs1", Algorithm::RS256),
        ("es1", Algorithm::ES256),
        ("hs1", Algorithm::HS256),
    ] {
        let header = |token: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("authorization", format!("Bearer {token}").parse().unwrap());
            h
        };
        let one = header(&mint(kid, alg, &tenant(500)));
        let enc = encoding_key(kid);
        let many: Vec<http::HeaderMap> = (0..2_000)
            .map(|n| header(&mint_with(&enc, kid, alg, &tenant(n % 1_000), n)))
            .collect();
        let decide = |cache: &TokenCache, h: &http::HeaderMap| {
            let grant =
                auth::authenticate(&v, cache, black_box(h), Some(b"name=x&_count=10"), 8192)
                    .unwrap();
            black_box(t.get(&grant.tenant).unwrap());
        };
        let off = TokenCache::new(0, 30);
        g.bench_function(format!("{alg:?}/uncached"), |b| {
            b.iter(|| decide(&off, &one))
        });
        let on = TokenCache::new(10_000, 30);
        g.bench_function(format!("{alg:?}/cached"), |b| b.iter(|| decide(&on, &one)));
        // 2,000 distinct tokens through a 100-entry cache: every request misses.
        let small = TokenCache::new(100, 30);
        let mut i = 0;
        g.bench_function(format!("{alg:?}/unique"), |b| {
            b.iter(|| {
                i = (i + 1) % many.len();
                decide(&small, &many[i])
            })
        });
    }
    g.finish();
}

/// jsonwebtoken's own aws-lc-rs provider (parses the key on every call) beside fhir-edge's (keys
/// parsed once; `src/auth/parsed_keys.rs`), signature only, interleaved in one run.
#[cfg(feature = "aws-lc")]
fn bench_key_handling(c: &mut Criterion) {
    use jsonwebtoken::crypto::{aws_lc::DEFAULT_PROVIDER, CryptoProvider};
    assert!(auth::install_crypto());
    let ours = CryptoProvider::try_get_default().unwrap();
    let mut g = c.benchmark_group("jwt_key_handling/aws_lc_rs");
    let msg = b"eyJhbGciOiJSUzI1NiIsInR5cCI6ImF0K2p3dCJ9.eyJzY29wZSI6InN5c3RlbS8qLnJlYWQifQ";
    let rs_pub = DecodingKey::from_rsa_pem(&key("rs256.pub.pem")).unwrap();
    let es_pub = DecodingKey::from_ec_pem(&key("es256.pub.pem")).unwrap();
    for (alg, kid, dec) in [
        (Algorithm::RS256, "rs1", &rs_pub),
        (Algorithm::ES256, "es1", &es_pub),
    ] {
        let enc = encoding_key(kid);
        let sig = (DEFAULT_PROVIDER.signer_factory)(&alg, &enc)
            .unwrap()
            .try_sign(msg)
            .unwrap();
        for (name, p) in [("jsonwebtoken", &DEFAULT_PROVIDER), ("parsed_once", ours)] {
            g.bench_function(format!("verify/{alg:?}/{name}"), |b| {
                b.iter(|| {
                    (p.verifier_factory)(&alg, dec)
                        .unwrap()
                        .verify(black_box(msg), &sig)
                        .unwrap()
                })
            });
            g.bench_function(format!("sign/{alg:?}/{name}"), |b| {
                b.iter(|| {
                    (p.signer_factory)(&alg, &enc)
                        .unwrap()
                        .try_sign(black_box(msg))
                        .unwrap()
                })
            });
        }
    }
    g.finish();
}

#[cfg(not(feature = "aws-lc"))]
fn bench_key_handling(_: &mut Criterion) {}

criterion_group!(
    benches,
    bench_key_handling,
    bench_verify,
    bench_remote_keys,
    bench_sign,
    bench_scope,
    bench_lookup,
    bench_decision,
    bench_limiter,
    bench_reload
);
criterion_main!(benches);
