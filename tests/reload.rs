//! Hot reload of routes.yaml: edits apply within about a second; bad edits never do.

use std::fs;
use std::time::Duration;

use crate::support::proxy::routes_yaml;
use crate::support::{
    eventually, routes_generation, status_with_token, tokens::token, Env, TENANT_A, TENANT_B,
    TENANT_C,
};

const WITHIN: Duration = Duration::from_secs(2);

/// The status and the serving upstream's name for a request of `tenant`.
fn probe(env: &Env, tenant: &str) -> (u16, String) {
    let (status, body) = status_with_token(&env.proxy, "/Patient/1", &token(tenant));
    let who = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["upstream"].as_str().map(str::to_string))
        .unwrap_or_default();
    (status, who)
}

fn routes_with_c(env: &Env) -> String {
    routes_yaml(&[
        (TENANT_A, "tenant-a", &env.a.url("/r4"), ""),
        (TENANT_B, "tenant-b", &env.b.url(""), ""),
        (TENANT_C, "tenant-c", &env.b.url("/c"), ""),
    ])
}

#[test]
fn adding_a_tenant_takes_effect_within_two_seconds() {
    let env = Env::start();
    assert_eq!(probe(&env, TENANT_C).0, 403);
    fs::write(env.proxy.routes_path(), routes_with_c(&env)).unwrap();
    assert!(
        eventually(WITHIN, || probe(&env, TENANT_C).0 == 200),
        "tenant C never became routable"
    );
    assert_eq!(env.b.last().target, "/c/Patient/1");
    assert!(env
        .proxy
        .logs()
        .contains("routing table reloaded: 3 tenants"));
}

#[test]
fn invalid_edits_keep_the_last_good_table() {
    let env = Env::start();
    let good = fs::read_to_string(env.proxy.routes_path()).unwrap();
    let dup = format!(
        "{good}  {}:\n    name: dup\n    upstream: \"{}\"\n",
        TENANT_A.to_uppercase(),
        env.b.url("")
    );
    let bad_versions = [
        ("broken YAML", format!("{good}\n  : : [unclosed")),
        (
            "unknown key",
            good.replace("name: tenant-b", "name: tenant-b\n    colour: red"),
        ),
        ("duplicate GUID", dup),
        ("empty file", String::new()),
        ("no tenants", "tenants: {}\n".to_string()),
        (
            "bad upstream URL",
            good.replace(&env.b.url(""), "ftp://nowhere"),
        ),
        // Cut inside tenant B's entry, as an in-place write caught half-way would be.
        (
            "truncated",
            good[..good.find("name: tenant-b").unwrap() + 8].to_string(),
        ),
    ];
    for (i, (why, text)) in bad_versions.iter().enumerate() {
        fs::write(env.proxy.routes_path(), text).unwrap();
        assert!(
            eventually(WITHIN, || env
                .proxy
                .logs()
                .matches("routing table rejected")
                .count()
                > i),
            "{why}: no rejection logged"
        );
        assert_eq!(probe(&env, TENANT_A), (200, "tenant-a".into()), "{why}");
        assert_eq!(probe(&env, TENANT_B), (200, "tenant-b".into()), "{why}");
    }
    assert!(
        !env.proxy.logs().contains("routing table reloaded"),
        "a bad version was applied"
    );
}

#[test]
fn an_atomic_rename_reloads() {
    let env = Env::start();
    let tmp = env.proxy.dir.path().join(".routes.yaml.tmp");
    fs::write(&tmp, routes_with_c(&env)).unwrap();
    fs::rename(&tmp, env.proxy.routes_path()).unwrap();
    assert!(eventually(WITHIN, || probe(&env, TENANT_C).0 == 200));
    // And a second rename after the first (the watch survives the inode change).
    let only_a = routes_yaml(&[(TENANT_A, "tenant-a", &env.a.url("/r4"), "")]);
    fs::write(&tmp, only_a).unwrap();
    fs::rename(&tmp, env.proxy.routes_path()).unwrap();
    assert!(eventually(WITHIN, || probe(&env, TENANT_B).0 == 403));
    assert_eq!(probe(&env, TENANT_A), (200, "tenant-a".into()));
}

/// A file renamed into place is complete, so it applies at once; an in-place write still waits out the
/// debounce window (and the settle check), because it may be caught half-written. With a 10 s window,
/// the rename must apply long before the window would end, and the in-place write must not.
#[test]
fn a_rename_applies_at_once_and_an_in_place_write_waits_for_the_debounce() {
    let env = Env::start_with(|c| c.reload_debounce_ms = 10_000);
    let tmp = env.proxy.dir.path().join(".routes.yaml.tmp");
    fs::write(&tmp, routes_with_c(&env)).unwrap();
    fs::rename(&tmp, env.proxy.routes_path()).unwrap();
    assert!(
        eventually(WITHIN, || probe(&env, TENANT_C).0 == 200),
        "a rename waited for the debounce window"
    );

    let only_a = routes_yaml(&[(TENANT_A, "tenant-a", &env.a.url("/r4"), "")]);
    fs::write(env.proxy.routes_path(), only_a).unwrap();
    std::thread::sleep(WITHIN);
    assert_eq!(
        probe(&env, TENANT_B),
        (200, "tenant-b".into()),
        "an in-place write was applied before its debounce window ended"
    );
    // A rename during that window does not cut it short: the in-place write may still be going on.
    let a_and_c = routes_yaml(&[
        (TENANT_A, "tenant-a", &env.a.url("/r4"), ""),
        (TENANT_C, "tenant-c", &env.b.url("/c"), ""),
    ]);
    fs::write(&tmp, a_and_c).unwrap();
    fs::rename(&tmp, env.proxy.routes_path()).unwrap();
    std::thread::sleep(WITHIN);
    assert_eq!(probe(&env, TENANT_B), (200, "tenant-b".into()));
    assert_eq!(
        env.proxy.logs().matches("routing table reloaded").count(),
        1,
        "{}",
        env.proxy.logs()
    );
}

#[test]
fn an_upstream_swap_moves_a_tenant_to_its_new_server() {
    let env = Env::start();
    assert_eq!(probe(&env, TENANT_A), (200, "tenant-a".into()));
    let swapped = routes_yaml(&[
        (TENANT_A, "tenant-a", &env.b.url("/moved"), ""),
        (TENANT_B, "tenant-b", &env.b.url(""), ""),
    ]);
    fs::write(env.proxy.routes_path(), swapped).unwrap();
    assert!(eventually(WITHIN, || probe(&env, TENANT_A).1 == "tenant-b"));
    assert_eq!(env.b.last().target, "/moved/Patient/1");
}

/// Kubernetes mounts a ConfigMap as `routes.yaml -> ..data/routes.yaml`, `..data -> ..<timestamp>`,
/// and updates it by renaming a new `..data` symlink over the old one.
#[test]
fn a_configmap_style_symlink_swap_reloads() {
    use std::os::unix::fs::symlink;
    let env = Env::start();
    let dir = env.proxy.dir.path();
    let v1 = dir.join("..2026_01_01_v1");
    fs::create_dir(&v1).unwrap();
    fs::copy(env.proxy.routes_path(), v1.join("routes.yaml")).unwrap();
    symlink("..2026_01_01_v1", dir.join("..data")).unwrap();
    fs::remove_file(env.proxy.routes_path()).unwrap();
    symlink("..data/routes.yaml", env.proxy.routes_path()).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(probe(&env, TENANT_A).0, 200);

    let v2 = dir.join("..2026_01_01_v2");
    fs::create_dir(&v2).unwrap();
    fs::write(v2.join("routes.yaml"), routes_with_c(&env)).unwrap();
    symlink("..2026_01_01_v2", dir.join("..data_tmp")).unwrap();
    fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    fs::remove_dir_all(&v1).unwrap();
    assert!(
        eventually(WITHIN, || probe(&env, TENANT_C).0 == 200),
        "the symlink swap was not noticed"
    );
}

#[test]
fn deleting_the_file_keeps_the_table_and_recreating_it_reloads() {
    let env = Env::start();
    fs::remove_file(env.proxy.routes_path()).unwrap();
    assert!(eventually(WITHIN, || env
        .proxy
        .logs()
        .contains("unreadable")));
    assert_eq!(probe(&env, TENANT_A), (200, "tenant-a".into()));
    fs::write(env.proxy.routes_path(), routes_with_c(&env)).unwrap();
    assert!(eventually(WITHIN, || probe(&env, TENANT_C).0 == 200));
}

#[test]
fn sighup_reloads_without_stopping_the_proxy() {
    let mut env = Env::start();
    env.proxy.signal("HUP");
    assert!(eventually(WITHIN, || env
        .proxy
        .logs()
        .contains("SIGHUP: reloading")));
    assert!(env.proxy.is_running());
    assert_eq!(probe(&env, TENANT_A), (200, "tenant-a".into()));
}

/// The reloader's own reads raise inotify access events; they must not trigger further reloads (the
/// file would otherwise be re-read every debounce window, forever, and an invalid one re-reported).
#[test]
fn a_rejected_file_is_reported_once_not_in_a_loop() {
    let env = Env::start_with(|c| c.log_level = "debug".into());
    fs::write(env.proxy.routes_path(), "tenants: [not, a, map]\n").unwrap();
    assert!(eventually(WITHIN, || env
        .proxy
        .logs()
        .contains("routing table rejected")));
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        env.proxy.logs().matches("routing table rejected").count(),
        1,
        "{}",
        env.proxy.logs()
    );
    // At most one more read (a trailing event of the write itself), not one per debounce window.
    assert!(
        env.proxy.logs().matches("unchanged").count() <= 2,
        "{}",
        env.proxy.logs()
    );
    assert_eq!(probe(&env, TENANT_A), (200, "tenant-a".into()));
}

/// `VmHWM` (peak) and `VmRSS` (now) of a process, in KiB.
#[cfg(feature = "mimalloc")]
fn peak_and_rss_kib(pid: u32) -> (u64, u64) {
    use crate::support::proc_status_kib;
    (
        proc_status_kib(pid, "VmHWM:"),
        proc_status_kib(pid, "VmRSS:"),
    )
}

/// A large table is built into memory that is garbage a moment later (the text, the parsed file, and
/// on a reload the table it replaces). The proxy hands it back to the OS (a few seconds after the last
/// reload) instead of sitting on it while idle: resident memory falls well below the reload's peak.
/// (Without that, mimalloc keeps the pages of an idle process: resident stayed at its peak.) The same
/// happens at once after the first load at start, but what Pingora allocates after it can make a new
/// peak, so only the reload is checked.
#[cfg(feature = "mimalloc")]
#[test]
fn a_large_tables_garbage_is_returned_to_the_os_after_a_reload() {
    const N: usize = 50_000;
    let meta = crate::support::StubUpstream::start("meta");
    let up = crate::support::StubUpstream::start("big");
    let upstream = up.url("/fhir");
    let table = |prefix: &str| {
        let mut s = String::from("tenants:\n");
        for i in 0..N {
            s.push_str(&format!(
                "  {i:08x}-0000-4000-8000-{i:012x}:\n    name: {prefix}{i}\n    upstream: \"{upstream}\"\n"
            ));
        }
        s
    };
    let first = table("t");
    let text_kib = first.len() as u64 / 1024;
    let proxy = crate::support::Proxy::start(crate::support::ProxyConfig::new(meta.url(""), first));
    let last = format!("{:08x}-0000-4000-8000-{:012x}", N - 1, N - 1);
    let (status, _) = status_with_token(&proxy, "/Patient/1", &token(&last));
    assert_eq!(
        status, 200,
        "the last tenant of the large table is not routed"
    );

    // A reload in which every tenant changes: old table, new text and parsed file all become garbage.
    let tmp = proxy.dir.path().join(".routes.yaml.tmp");
    fs::write(&tmp, table("renamed-")).unwrap();
    fs::rename(&tmp, proxy.routes_path()).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || proxy
            .logs()
            .contains(&format!("routing table reloaded: {N} tenants"))),
        "the large table was not reloaded"
    );
    // Released 3 s after the last reload; well before tokio lets the idle reload thread exit (10 s),
    // which would hand its pages back too.
    let returned = eventually(Duration::from_secs(8), || {
        let (peak, rss) = peak_and_rss_kib(proxy.pid());
        peak >= rss + text_kib
    });
    let (peak, rss) = peak_and_rss_kib(proxy.pid());
    assert!(
        returned,
        "after a reload: resident {rss} KiB, peak {peak} KiB, file {text_kib} KiB"
    );
}

/// A routing file larger than the limit is refused before it is read whole, with a message that
/// says why, and the last good table keeps serving.
#[test]
fn a_routes_file_over_the_size_limit_is_refused_and_the_last_table_serves() {
    let env = Env::start();
    let file = fs::File::create(env.proxy.routes_path()).unwrap();
    file.set_len(100 << 20).unwrap();
    assert!(
        eventually(WITHIN, || env.proxy.logs().contains("larger than 32 MiB")),
        "{}",
        env.proxy.logs()
    );
    assert_eq!(probe(&env, TENANT_A), (200, "tenant-a".into()));
}

/// The same table written as JSON (what generators should write) loads like the YAML one, and a
/// key given twice inside an entry rejects the JSON file as it does the YAML one.
#[test]
fn a_json_routes_file_reloads_and_a_duplicate_key_in_it_is_rejected() {
    let env = Env::start();
    let entry =
        |name: &str, upstream: &str| serde_json::json!({"name": name, "upstream": upstream});
    let json = serde_json::json!({"tenants": {
        TENANT_A: entry("tenant-a", &env.a.url("/r4")),
        TENANT_B: entry("tenant-b", &env.b.url("")),
        TENANT_C: entry("tenant-c", &env.b.url("/c")),
    }})
    .to_string();
    fs::write(env.proxy.routes_path(), &json).unwrap();
    assert!(eventually(WITHIN, || probe(&env, TENANT_C).0 == 200));
    let dup = json.replacen(r#""name":"tenant-c""#, r#""name":"tenant-c","name":"x""#, 1);
    assert_ne!(dup, json);
    fs::write(env.proxy.routes_path(), dup).unwrap();
    assert!(
        eventually(WITHIN, || env
            .proxy
            .logs()
            .contains("duplicate field `name`")),
        "{}",
        env.proxy.logs()
    );
    assert_eq!(probe(&env, TENANT_C), (200, "tenant-b".into()));
}

/// Each poll checks the file even when nothing changed, and the metric of the last check's time
/// moves with it: a reloader that stops checking shows as a growing age, which deploy/prometheus
/// alerts on.
#[test]
fn every_poll_is_recorded_as_a_check_in_the_metrics() {
    let env = Env::start_with(|c| c.server = "  reload_poll_seconds: 1".into());
    let series = "fhir_edge_config_last_check_timestamp_seconds{file=\"routes\"}";
    let value = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let first = value(&env.proxy.metrics_when(|m| value(m).is_some())).unwrap();
    assert!(first > 1.7e9, "{first}");
    let later = env
        .proxy
        .metrics_when(|m| value(m).is_some_and(|v| v > first));
    assert!(
        value(&later).unwrap() > first,
        "no check recorded after {first}"
    );
}

#[test]
fn a_tenant_whose_host_does_not_resolve_is_unavailable_and_the_others_serve() {
    // `.invalid` never resolves (RFC 6761).
    let env = Env::start_with(|c| c.server = "  reload_poll_seconds: 1".into());
    let unresolvable = routes_yaml(&[
        (
            TENANT_A,
            "tenant-a",
            "http://fhir.hospital-a.invalid:8080/r4",
            "",
        ),
        (TENANT_B, "tenant-b", &env.b.url(""), ""),
    ]);
    let gen = |m: &str| routes_generation(m);
    let before = gen(&env.proxy.admin("/metrics").1);
    fs::write(env.proxy.routes_path(), unresolvable).unwrap();
    // The edit is accepted, not refused for one hospital's DNS.
    assert!(eventually(WITHIN, || probe(&env, TENANT_A).0 == 503));
    let (status, body) = status_with_token(&env.proxy, "/Patient/1", &token(TENANT_A));
    assert_eq!(status, 503);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["resourceType"], "OperationOutcome");
    assert_eq!(v["issue"][0]["code"], "transient");
    assert!(!body.contains("invalid"), "the host name leaked: {body}");
    assert_eq!(probe(&env, TENANT_B), (200, "tenant-b".into()));
    let (ready, detail) = env.proxy.admin("/readyz");
    assert_eq!(ready, 200);
    assert!(
        detail.contains("unavailable tenants") && detail.contains("tenant-a"),
        "{detail}"
    );
    let metrics = env.proxy.admin("/metrics").1;
    assert!(
        metrics.contains("fhir_edge_routing_unavailable_tenants 1"),
        "{metrics}"
    );
    // While a host does not resolve, every poll tries again (the text has not changed).
    let tried = gen(&metrics);
    assert!(tried > before);
    assert!(eventually(Duration::from_secs(5), || gen(&env
        .proxy
        .admin("/metrics")
        .1)
        > tried));
    let lines = env.proxy.access_log_at_least(1);
    assert!(lines
        .iter()
        .any(|l| l["error"] == "tenant_unavailable" && l["tenant_name"] == "tenant-a"));
    // Fixed: the tenant serves again, and the polls stop rebuilding.
    fs::write(
        env.proxy.routes_path(),
        routes_yaml(&[
            (TENANT_A, "tenant-a", &env.a.url("/r4"), ""),
            (TENANT_B, "tenant-b", &env.b.url(""), ""),
        ]),
    )
    .unwrap();
    assert!(eventually(WITHIN, || probe(&env, TENANT_A) == (200, "tenant-a".into())));
    assert!(env
        .proxy
        .admin("/metrics")
        .1
        .contains("fhir_edge_routing_unavailable_tenants 0"));
}

#[test]
fn a_start_with_a_host_that_does_not_resolve_serves_the_other_tenants() {
    let b = crate::support::StubUpstream::start("tenant-b");
    let meta = crate::support::StubUpstream::start("meta");
    let routes = routes_yaml(&[
        (
            TENANT_A,
            "tenant-a",
            "http://fhir.hospital-a.invalid/r4",
            "",
        ),
        (TENANT_B, "tenant-b", &b.url(""), ""),
    ]);
    let proxy =
        crate::support::Proxy::start(crate::support::ProxyConfig::new(meta.url(""), routes));
    assert_eq!(
        status_with_token(&proxy, "/Patient/1", &token(TENANT_A)).0,
        503
    );
    assert_eq!(
        status_with_token(&proxy, "/Patient/1", &token(TENANT_B)).0,
        200
    );
}

#[test]
fn host_names_are_resolved_again_on_a_timer_and_address_literals_are_not() {
    let env = Env::start_with(|c| {
        c.server = "  reload_poll_seconds: 1\n  dns_refresh_seconds: 1".into();
    });
    let gen = || routes_generation(&env.proxy.admin("/metrics").1);
    // The stubs are named by address (127.0.0.1): nothing to resolve, no rebuilds.
    let start = gen();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(gen(), start, "an address-only table was rebuilt");
    // Named by host (localhost): rebuilt, so resolved again, every refresh interval.
    let port = env.a.addr.port();
    fs::write(
        env.proxy.routes_path(),
        routes_yaml(&[
            (
                TENANT_A,
                "tenant-a",
                &format!("http://localhost:{port}/r4"),
                "",
            ),
            (TENANT_B, "tenant-b", &env.b.url(""), ""),
        ]),
    )
    .unwrap();
    assert!(eventually(WITHIN, || gen() > start));
    let edited = gen();
    assert!(eventually(Duration::from_secs(6), || gen() >= edited + 2.0));
    assert_eq!(probe(&env, TENANT_A), (200, "tenant-a".into()));
}
