use super::*;
use crate::routing::route::expand_env;
use pingora::upstreams::peer::Peer;
use std::path::PathBuf;
use std::time::Duration;

fn defaults() -> RouteDefaults {
    RouteDefaults {
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ca_der: None,
        public_base: "https://edge.example/fhir".into(),
        tenant_label: TenantLabel::Name,
        limits: Default::default(),
        health: Default::default(),
    }
}

fn load(text: &str) -> Result<RoutingTable, Problems> {
    RoutingTable::from_text(&PathBuf::from("routes.yaml"), text, &defaults().into())
}

const A: &str = "145f4184-1b0b-41c7-ba24-b3c1291bfda1";

const B: &str = "2f1c8a44-7d0e-4c55-9a1b-0c3d5e7f9a21";

#[test]
fn tenants_on_one_upstream_share_it_but_keep_their_own_pool_group() {
    let t = load(&format!(
        "tenants:\n  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/r4\n\
         \n  {B}:\n    name: b\n    upstream: http://127.0.0.1:9/r4\n"
    ))
    .unwrap();
    let a = t.get(&TenantId::parse(A).unwrap()).unwrap();
    let b = t.get(&TenantId::parse(B).unwrap()).unwrap();
    assert!(Arc::ptr_eq(&a.upstream, &b.upstream));
    assert_ne!(a.group_key(), b.group_key());
    assert_ne!(a.group_key(), 0);
    // Any difference in what the upstream is built from means a separate one.
    let t = load(&format!(
        "tenants:\n  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/r4\n\
         \n  {B}:\n    name: b\n    upstream: http://127.0.0.1:9/r4\n    read_timeout_ms: 5\n"
    ))
    .unwrap();
    let a = t.get(&TenantId::parse(A).unwrap()).unwrap();
    let b = t.get(&TenantId::parse(B).unwrap()).unwrap();
    assert!(!Arc::ptr_eq(&a.upstream, &b.upstream));
    let t = load(&format!(
        "tenants:\n  {A}:\n    name: a\n    upstream: https://127.0.0.1:9/r4\n    sni: a.example\n\
         \n  {B}:\n    name: b\n    upstream: https://127.0.0.1:9/r4\n    sni: b.example\n"
    ))
    .unwrap();
    let a = t.get(&TenantId::parse(A).unwrap()).unwrap();
    let b = t.get(&TenantId::parse(B).unwrap()).unwrap();
    assert!(!Arc::ptr_eq(&a.upstream, &b.upstream));
}

/// An `sni` is checked when the table loads. (A NUL in one once let an `sni` spell another tenant's
/// `sni` plus `connect_timeout_ms` in the shared-upstream key; the key is a struct of the fields
/// now, and such a value no longer loads at all.)
#[test]
fn sni_must_be_a_host_name_and_needs_an_https_upstream() {
    let entry = |upstream: &str, sni: &str| {
        load(&format!(
            "tenants:\n  {A}:\n    name: a\n    upstream: {upstream}\n    sni: {sni}\n"
        ))
    };
    for good in [
        "fhir.contoso.example",
        "fhir.contoso.example.",
        "localhost",
        "x_internal.corp",
        "a-b.c1",
    ] {
        assert!(entry("https://127.0.0.1:9/", good).is_ok(), "{good}");
    }
    for bad in [
        "\"x\\0c5\"",
        "\"\"",
        "\"fhir contoso\"",
        "a..b",
        "-a.example",
        "a-.example",
        "127.0.0.1",
        "\"[::1]\"",
        "\"::1\"",
        "fhir.contoso.example:443",
        "\"h\\u00e9.example\"",
        &"a".repeat(64),
        &["abc"; 64].join("."),
    ] {
        let e = entry("https://127.0.0.1:9/", bad).unwrap_err();
        assert!(e.to_string().contains("sni"), "{bad}: {e}");
        assert_eq!(e.0[0].line, Some(5), "{bad}: {e}");
    }
    let e = entry("http://127.0.0.1:9/", "fhir.contoso.example").unwrap_err();
    assert!(e.to_string().contains("only applies to https"), "{e}");
}

#[test]
fn a_table_written_as_json_loads_like_yaml_and_reports_like_yaml() {
    let json = format!(
        r#"{{"tenants": {{"{A}": {{"name": "a", "upstream": "http://127.0.0.1:9/r4"}},
            "{B}": {{"name": "b", "upstream": "http://127.0.0.1:9/r5", "allow_writes": true}}}}}}"#
    );
    let t = load(&json).unwrap();
    assert_eq!(t.len(), 2);
    let b = t.get(&TenantId::parse(B).unwrap()).unwrap();
    assert_eq!((&*b.name, b.allow_writes), ("b", true));
    assert_eq!(b.upstream.first().base_path, "/r5");
    // Unknown keys are refused in JSON as in YAML, with the YAML parser's key path.
    let bad = json.replace("allow_writes", "allow_writez");
    let msg = load(&bad).unwrap_err().to_string();
    assert!(msg.contains("allow_writez"), "{msg}");
    // Duplicate tenants are refused too.
    let dup = format!(
        r#"{{"tenants": {{"{A}": {{"name": "a", "upstream": "http://127.0.0.1:9/r4"}},
            "{A}": {{"name": "b", "upstream": "http://127.0.0.1:9/r4"}}}}}}"#
    );
    assert!(load(&dup).is_err());
}

#[test]
fn a_name_used_twice_is_reported_with_the_first_tenant_using_it() {
    const C: &str = "00000000-0000-0000-0000-00000000000c";
    let entry = |key: &str, name: &str| {
        format!("  {key}:\n    name: {name}\n    upstream: http://127.0.0.1:9/r4\n")
    };
    let text = format!(
        "tenants:\n{}{}{}",
        entry(&A.to_uppercase(), "shared"),
        entry(B, "other"),
        entry(C, "shared")
    );
    let message = load(&text).unwrap_err().to_string();
    assert!(
        message.contains(&format!("tenants.{C}.name"))
            && message.contains(&format!("name `shared` is already used by tenant {A}")),
        "{message}"
    );
    assert!(!message.contains("`other`"), "{message}");
    // Also when the first entry with the name is itself broken: both are reported.
    let text = format!(
        "tenants:\n{}{}",
        entry(B, "shared").replace("http://", "ftp://"),
        entry(C, "shared")
    );
    let message = load(&text).unwrap_err().to_string();
    assert!(
        message.contains(&format!("tenants.{B}.upstream"))
            && message.contains(&format!("name `shared` is already used by tenant {B}")),
        "{message}"
    );
    // Distinct names, however many, are not reported; names differing in case are distinct.
    let many: String = (0..2000)
        .map(|i| {
            entry(
                &format!("00000000-0000-0000-0000-{i:012}"),
                &format!("t{i}"),
            )
        })
        .collect();
    let case = format!("tenants:\n{many}{}", entry(A, "T1"));
    assert_eq!(load(&case).unwrap().len(), 2001);
}

#[test]
fn a_route_fits_in_64_bytes() {
    // 80 with its `Arc` counts, an allocator size class: 1.6 MB less for 100,000 tenants than
    // the 96 of a route that stored its label string.
    assert!(
        std::mem::size_of::<Route>() <= 64,
        "{}",
        std::mem::size_of::<Route>()
    );
}

#[test]
fn loads_a_valid_table() {
    let t = load(&format!(
        "tenants:\n  {}:\n    name: contoso\n    upstream: http://127.0.0.1:9/r4/\n",
        A.to_uppercase()
    ))
    .unwrap();
    let r = t.get(&TenantId::parse(A).unwrap()).unwrap();
    assert_eq!(&*r.name, "contoso");
    assert_eq!(r.upstream.first().base_path, "/r4");
    assert_eq!(r.upstream.first().host, "127.0.0.1:9");
}

#[test]
fn rejects_the_whole_file_and_names_every_problem() {
    let text = format!(
        "tenants:\n  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/\n  {}:\n    name: b\n    upstream: http://127.0.0.1:9/\n  not-a-guid:\n    name: c\n    upstream: http://127.0.0.1:9/\n  00000000-0000-0000-0000-000000000002:\n    name: d\n    upstream: ftp://x/\n",
        A.to_uppercase()
    );
    let p = load(&text).unwrap_err();
    assert_eq!(p.0.len(), 3, "{p}");
    assert!(p.0[0].message.contains("appears twice"));
    assert_eq!(p.0[0].line, Some(5));
    assert!(p.0[1].key.contains("not-a-guid"));
    assert!(p.0[2].key.ends_with(".upstream"));
}

#[test]
fn rejects_unknown_keys_empty_files_and_missing_tenants() {
    let e = load(&format!(
        "tenants:\n  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/\n    colour: red\n"
    ))
    .unwrap_err();
    assert!(e.to_string().contains("unknown field `colour`"), "{e}");
    assert_eq!(e.0[0].line, Some(5));
    assert!(load("").is_err());
    assert!(load("   \n").is_err());
    assert!(load("other: 1\n").is_err());
    assert!(load("tenants:\n").is_err());
    assert!(load("tenants: {}\n").is_err());
    assert!(load(&format!("tenants:\n  {A}:\n    name: a\n    upst")).is_err());
}

#[test]
fn expands_environment_references_without_echoing_values() {
    std::env::set_var("FHIR_EDGE_TEST_TOKEN", "s3cret");
    assert_eq!(
        expand_env("Bearer ${FHIR_EDGE_TEST_TOKEN}").unwrap(),
        "Bearer s3cret"
    );
    assert_eq!(expand_env("a$b").unwrap(), "a$b");
    let e = expand_env("${FHIR_EDGE_TEST_MISSING_VAR}").unwrap_err();
    assert!(e.contains("FHIR_EDGE_TEST_MISSING_VAR"));
    assert!(expand_env("${unterminated").is_err());
    assert!(expand_env("${1X}").is_err());
}

#[test]
fn reserved_headers_cannot_be_configured() {
    let e = load(&format!("tenants:\n  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/\n    upstream_headers:\n      Host: x\n")).unwrap_err();
    assert!(e.to_string().contains("set by the proxy"), "{e}");
}

/// A key given twice anywhere in a routing entry makes the whole file invalid, in YAML and in JSON:
/// a field, an exact `upstream_headers` name, a tenant, or the document's `tenants`.
#[test]
fn a_duplicate_key_anywhere_rejects_the_file_in_every_format() {
    let entry =
        |extra: &str| format!("  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/r4\n{extra}");
    let yaml = [
        format!("tenants:\n{}", entry("    name: b\n")),
        format!(
            "tenants:\n{}",
            entry("    upstream_headers:\n      X-Key: one\n      X-Key: two\n")
        ),
        format!("tenants:\n{}{}", entry(""), entry("")),
        format!("tenants:\n{}tenants:\n{}", entry(""), entry("")),
    ];
    let one = format!(r#""{A}": {{"name": "a", "upstream": "http://127.0.0.1:9/r4"}}"#);
    let json = [
        format!(
            r#"{{"tenants": {{"{A}": {{"name": "a", "name": "b", "upstream": "http://127.0.0.1:9/r4"}}}}}}"#
        ),
        format!(
            r#"{{"tenants": {{"{A}": {{"name": "a", "upstream": "http://127.0.0.1:9/r4",
                "upstream_headers": {{"X-Key": "one", "X-Key": "two"}}}}}}}}"#
        ),
        format!(r#"{{"tenants": {{{one}, {one}}}}}"#),
        format!(r#"{{"tenants": {{{one}}}, "tenants": {{{one}}}}}"#),
    ];
    for text in yaml.iter().chain(&json) {
        let e = load(text).expect_err(text);
        let message = e.to_string();
        assert!(
            message.contains("duplicate") || message.contains("twice"),
            "{text}\n{message}"
        );
        assert!(e.0.iter().all(|p| p.line.is_some()), "{message}");
        // Header values are never quoted.
        assert!(!message.contains("two"), "{message}");
    }
    // Names differing only in case are one header too.
    let e = load(&format!(
        "tenants:\n{}",
        entry("    upstream_headers:\n      X-Key: one\n      x-key: two\n")
    ))
    .unwrap_err();
    assert!(e.to_string().contains("given twice"), "{e}");
}

/// YAML and JSON are read by different parsers into the same table; a leading `---` document
/// marker (once sent to a slower parser that took ~7x the memory) changes nothing.
#[test]
fn yaml_and_json_build_the_same_table() {
    let mut yaml = String::from("tenants:\n");
    let mut json = serde_json::Map::new();
    for i in 0..300 {
        let key = format!("00000000-0000-0000-0000-{i:012}");
        let (name, upstream) = (format!("t{i}"), format!("http://127.0.0.1:9/r{}", i % 7));
        yaml.push_str(&format!(
            "  {key}:\n    name: {name}\n    upstream: {upstream}\n"
        ));
        let mut entry = serde_json::json!({"name": name, "upstream": upstream});
        if i % 50 == 3 {
            yaml.push_str("    allow_writes: true\n    upstream_headers:\n      X-Key: \"k{}\"\n");
            entry["allow_writes"] = true.into();
            entry["upstream_headers"] = serde_json::json!({"X-Key": "k{}"});
        }
        json.insert(key, entry);
    }
    yaml.push_str(&format!(
        "  {A}:\n    name: \"a\\x61\"\n    upstream: https://127.0.0.1:9/r4\n    tls_verify: false\n    sni: s.example\n    connect_timeout_ms: 5\n    read_timeout_ms: 6\n    link_bases:\n      - http://old.example/r4\n"
    ));
    json.insert(
        A.to_uppercase(),
        serde_json::json!({"name": "aa", "upstream": "https://127.0.0.1:9/r4", "tls_verify": false,
            "sni": "s.example", "connect_timeout_ms": 5, "read_timeout_ms": 6,
            "link_bases": ["http://old.example/r4"]}),
    );
    let json = serde_json::json!({ "tenants": json });
    let whole = load(&yaml).unwrap().describe();
    assert_eq!(whole.len(), 301);
    let one_line = json.to_string();
    let escaped = one_line.replacen("t10\"", "t1\\u0030\"", 1);
    assert_ne!(escaped, one_line);
    for (what, text) in [
        ("YAML after ---", format!("---\n{yaml}")),
        ("JSON", one_line),
        (
            "pretty JSON",
            format!("\n  {}\n", serde_json::to_string_pretty(&json).unwrap()),
        ),
        ("JSON with escapes", escaped),
    ] {
        assert_eq!(load(&text).unwrap().describe(), whole, "{what}");
    }
}

/// A file can be checked where its upstreams' names do not resolve: offline, names get the
/// unspecified address, IP literals keep theirs, and every other check still runs.
#[test]
fn an_offline_build_resolves_nothing_but_checks_everything_else() {
    let ctx = TableContext::offline(defaults());
    let build = |text: &str| RoutingTable::from_text(Path::new("routes.yaml"), text, &ctx);
    let t = build(&format!(
        "tenants:\n  {A}:\n    name: a\n    upstream: https://fhir.contoso.invalid/r4\n\
         \n  {B}:\n    name: b\n    upstream: http://10.1.2.3:8080/r4\n"
    ))
    .unwrap();
    let a = t.get(&TenantId::parse(A).unwrap()).unwrap();
    let b = t.get(&TenantId::parse(B).unwrap()).unwrap();
    assert_eq!(a.upstream.first().peer.address().to_string(), "0.0.0.0:443");
    assert_eq!(
        b.upstream.first().peer.address().to_string(),
        "10.1.2.3:8080"
    );
    let e = build(&format!(
        "tenants:\n  {A}:\n    name: a\n    upstream: ftp://fhir.contoso.invalid/r4\n"
    ))
    .unwrap_err();
    assert!(e.to_string().contains("scheme"), "{e}");
}

/// Aliases multiply what a file holds without growing it (each `*u` below is three bytes and
/// replays a whole URL, which an anchor could make 4 KiB): past the alias limit the file is
/// refused while it is parsed, with a message that says so, instead of being expanded into memory.
#[test]
fn a_yaml_alias_bomb_is_refused_with_a_clear_error() {
    let aliases = vec!["*u"; 20_000].join(", ");
    let text = format!(
        "tenants:\n  {A}:\n    name: a\n    upstream: &u http://127.0.0.1:9/r4\n    link_bases: [{aliases}]\n"
    );
    let e = load(&text).unwrap_err();
    assert!(e.to_string().contains("alias"), "{e}");
    assert_eq!(e.0[0].line, Some(5), "{e}");
    // A few aliases are fine.
    let text = format!(
        "tenants:\n  {A}:\n    name: a\n    upstream: &u http://127.0.0.1:9/r4\n    link_bases: [*u, *u]\n"
    );
    assert_eq!(load(&text).unwrap().len(), 1);
}
