//! Time and peak memory of loading and reloading a 100,000-tenant routing table, as JSON and as
//! YAML, and of parsing the YAML alone with serde-saphyr (the reader in use) and serde_yaml_ng (the
//! one it replaced). Each case runs in a process of its own, so each peak (`VmHWM`) is its own.
//!
//! `cargo bench --bench table_load` (all cases), or `cargo bench --bench table_load -- json`
//! (one of `json`, `yaml`, `parse-saphyr`, `parse-yaml-ng`). `TABLE_TENANTS` changes the size.
//! Times are for one idle core; the whole proxy adds its own memory (Pingora, threads) to these peaks.
#![allow(unreachable_pub)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fhir_edge::internals::config::RouteDefaults;
use fhir_edge::internals::ops::metrics::TenantLabel;
use fhir_edge::internals::reload::{Live, ReloadOutcome};
use fhir_edge::internals::routing::RoutingTable;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CASES: [&str; 4] = ["json", "yaml", "parse-saphyr", "parse-yaml-ng"];
const RELOADS: usize = 5;

fn tenants() -> usize {
    std::env::var("TABLE_TENANTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000)
}

/// The table `benches/load.rs` serves: every tenant on one upstream, as operators' generators write it.
fn write_table(dir: &Path, n: usize) {
    let mut yaml = String::from("tenants:\n");
    let mut json = String::from("{\n  \"tenants\": {\n");
    for i in 0..n {
        let guid = format!("{:08x}-0000-4000-8000-{:012x}", i, i);
        let upstream = "http://127.0.0.1:8080/fhir";
        yaml.push_str(&format!(
            "  {guid}:\n    name: t{i}\n    upstream: \"{upstream}\"\n"
        ));
        let comma = if i + 1 < n { "," } else { "" };
        json.push_str(&format!(
            "    \"{guid}\": {{\n      \"name\": \"t{i}\",\n      \"upstream\": \"{upstream}\"\n    }}{comma}\n"
        ));
    }
    json.push_str("  }\n}\n");
    std::fs::write(dir.join("routes.yaml"), yaml).unwrap();
    std::fs::write(dir.join("routes.json"), json).unwrap();
}

fn defaults() -> RouteDefaults {
    RouteDefaults {
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ca_der: None,
        public_base: "https://edge.bench/fhir".into(),
        tenant_label: TenantLabel::Name,
        limits: Default::default(),
        health: Default::default(),
    }
}

/// `VmHWM` and `VmRSS` of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn run_case(case: &str, dir: &Path) {
    let file = if case == "json" {
        "routes.json"
    } else {
        "routes.yaml"
    };
    let path = dir.join(file);
    let size = std::fs::metadata(&path).unwrap().len();
    let (base, _) = memory_kib();
    if let Some(parser) = case.strip_prefix("parse-") {
        let text = std::fs::read_to_string(&path).unwrap();
        let started = Instant::now();
        match parser {
            "saphyr" => {
                fhir_edge::internals::reload::parse::parse::<serde::de::IgnoredAny>(&text).unwrap();
            }
            _ => {
                serde_yaml_ng::from_str::<serde::de::IgnoredAny>(&text).unwrap();
            }
        }
        let took = started.elapsed();
        let (peak, _) = memory_kib();
        println!(
            "{case:>14}: {:.1} MB of YAML parsed in {:.0} ms; peak {:.1} MiB ({:.1} MiB over the process before)",
            size as f64 / 1e6,
            took.as_secs_f64() * 1e3,
            mib(peak),
            mib(peak.saturating_sub(base))
        );
        return;
    }
    let started = Instant::now();
    let live = Live::<RoutingTable>::load_file(path, defaults()).unwrap();
    let load = started.elapsed();
    let mut times = Vec::new();
    for _ in 0..RELOADS {
        let started = Instant::now();
        assert_eq!(live.reload(true, false), ReloadOutcome::Applied);
        times.push(started.elapsed());
    }
    times.sort();
    let (peak, rss) = memory_kib();
    println!(
        "{case:>14}: {} tenants, {:.1} MB; load {:.0} ms; reload median {:.0} ms (max {:.0} ms, {RELOADS} forced reloads); peak {:.1} MiB, resident after {:.1} MiB",
        live.load().len(),
        size as f64 / 1e6,
        load.as_secs_f64() * 1e3,
        times[RELOADS / 2].as_secs_f64() * 1e3,
        times[RELOADS - 1].as_secs_f64() * 1e3,
        mib(peak),
        mib(rss)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let (Some(case), Some(dir)) = (args.first(), args.get(1)) {
        if case == "--case" {
            let (case, dir) = (dir, args.get(2).expect("--case NAME DIR"));
            run_case(case, Path::new(dir));
            return;
        }
    }
    let chosen: Vec<&str> = CASES
        .iter()
        .copied()
        .filter(|c| args.iter().all(|a| a.starts_with('-')) || args.iter().any(|a| a == c))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_table(dir.path(), tenants());
    let exe = std::env::current_exe().unwrap();
    for case in chosen {
        let status = Command::new(&exe)
            .args(["--case", case])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "{case} failed");
    }
}
