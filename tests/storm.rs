//! Routing-table storms: steady load while routes.yaml is rewritten every 100 ms in every way an
//! operator or an orchestrator rewrites it. Zero misroutes, zero errors for tenants present in every
//! version, invalid versions never applied, memory and file descriptors flat.
//!
//! `SOAK_SECONDS` sets the length (default 8 s, the CI variant); run longer by hand, e.g.
//! `SOAK_SECONDS=300 cargo test --release --test integration storm -- --nocapture`.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::Algorithm;

use crate::support::tokens::{claims, sign_with};
use crate::support::{proc_status_kib, Proxy, ProxyConfig, StubUpstream};

const STABLE: usize = 16;
const CHURNING: usize = 16;

fn tenant(i: usize) -> String {
    format!("{i:08x}-5702-4000-8000-{i:012x}")
}

/// A routing table with every stable tenant and the churning ones `present` says, in `order`, each on
/// its primary or secondary upstream.
fn table(
    stubs: &[(StubUpstream, StubUpstream)],
    present: &[bool],
    secondary: bool,
    reversed: bool,
    duplicate: bool,
) -> String {
    let mut ids: Vec<usize> = (0..STABLE + CHURNING)
        .filter(|&i| i < STABLE || present[i - STABLE])
        .collect();
    if reversed {
        ids.reverse();
    }
    let mut s = String::from("tenants:\n");
    for i in ids {
        let (p, q) = &stubs[i];
        let up = if secondary {
            q.url("/fhir")
        } else {
            p.url("/fhir")
        };
        s.push_str(&format!(
            "  {}:\n    name: t{i}\n    upstream: \"{up}\"\n",
            tenant(i)
        ));
    }
    if duplicate {
        s.push_str(&format!(
            "  {}:\n    name: dup\n    upstream: \"{}\"\n",
            tenant(0).to_uppercase(),
            stubs[1].0.url("")
        ));
    }
    s
}

fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

fn fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Atomically replaces `path` (file or symlink) with `text`.
fn rename_write(dir: &Path, path: &Path, text: &str) {
    let tmp = dir.join(".routes.tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Rewrites `path` in place (truncate, then write in two pieces with a pause): a reader can catch it
/// empty or half-written.
fn in_place_write(path: &Path, text: &str) {
    // Through the symlink if it is one, like an editor that writes in place.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    let (a, b) = text.split_at(text.len() / 2);
    f.write_all(a.as_bytes()).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(3));
    f.write_all(b.as_bytes()).unwrap();
}

/// Kubernetes ConfigMap style: a new `..<version>` directory, a `..data_tmp` symlink to it renamed
/// over `..data`, and `routes.yaml -> ..data/routes.yaml`.
fn configmap_swap(dir: &Path, version: usize, text: &str) {
    let v = dir.join(format!("..v{version}"));
    fs::create_dir(&v).unwrap();
    fs::write(v.join("routes.yaml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    symlink(format!("..v{version}"), &tmp).unwrap();
    fs::rename(&tmp, dir.join("..data")).unwrap();
    let routes = dir.join("routes.yaml");
    if !fs::symlink_metadata(&routes)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
    {
        let link_tmp = dir.join(".routes-link.tmp");
        let _ = fs::remove_file(&link_tmp);
        symlink("..data/routes.yaml", &link_tmp).unwrap();
        fs::rename(&link_tmp, &routes).unwrap();
    }
    if version >= 2 {
        let _ = fs::remove_dir_all(dir.join(format!("..v{}", version - 2)));
    }
}

#[test]
fn a_routing_table_storm_never_misroutes_or_fails_a_stable_tenant() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    // Two upstreams per tenant, both answering as that tenant, so an upstream swap is legitimate and
    // any answer naming another tenant is a misroute.
    let stubs: Vec<(StubUpstream, StubUpstream)> = (0..STABLE + CHURNING)
        .map(|i| {
            (
                StubUpstream::start(&tenant(i)),
                StubUpstream::start(&tenant(i)),
            )
        })
        .collect();
    let all_present = vec![true; CHURNING];
    let meta = StubUpstream::start("meta");
    let proxy = Proxy::start(ProxyConfig::new(
        meta.url(""),
        table(&stubs, &all_present, false, false, false),
    ));
    let tokens: Vec<String> = (0..STABLE + CHURNING)
        .map(|i| {
            sign_with(
                Some("hs1"),
                "hs1",
                Algorithm::HS256,
                Some("at+jwt"),
                &claims(&tenant(i)),
            )
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let (misroutes, stable_errors, ok, churn_403) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let port = proxy.port;
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (stop, misroutes, stable_errors, ok, churn_403, tokens) = (
                stop.clone(),
                misroutes.clone(),
                stable_errors.clone(),
                ok.clone(),
                churn_403.clone(),
                tokens.clone(),
            );
            std::thread::spawn(move || {
                let mut i = w;
                let mut conn: Option<TcpStream> = None;
                let mut buf = vec![0u8; 16384];
                while !stop.load(Ordering::Relaxed) {
                    i = (i * 7 + 3) % (STABLE + CHURNING);
                    let s = conn.get_or_insert_with(|| {
                        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        s
                    });
                    let req = format!(
                        "GET /Patient/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
                        tokens[i]
                    );
                    let (status, body) = match s
                        .write_all(req.as_bytes())
                        .ok()
                        .and_then(|()| read_one(s, &mut buf))
                    {
                        Some(x) => x,
                        None => {
                            conn = None;
                            (0, String::new())
                        }
                    };
                    let want = format!("\"upstream\":\"{}\"", tenant(i));
                    match status {
                        200 if body.contains(&want) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        200 => {
                            misroutes.fetch_add(1, Ordering::Relaxed);
                            eprintln!("MISROUTE: token for {} got {body}", tenant(i));
                        }
                        403 if i >= STABLE => {
                            churn_403.fetch_add(1, Ordering::Relaxed);
                        }
                        _ if i < STABLE => {
                            stable_errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("stable tenant {} got {status}", tenant(i));
                        }
                        _ => {}
                    }
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(1500));
    let pid = proxy.pid();
    // Memory and descriptors are sampled once the storm has touched every upstream (connection pools
    // fill up to one per tenant and upstream, by design), then at the end.
    let mut baseline: Option<(u64, usize)> = None;
    let warm_after = Instant::now() + Duration::from_secs(seconds / 4 + 1);
    let dir = proxy.dir.path().to_path_buf();
    let routes = proxy.routes_path();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    // Every kind of rewrite at least five times, however slowly the file system lets them happen (a
    // CI machine writing back a fresh build once stalled renames for seconds: 5 rewrites in 8 s), but
    // never more than four times the planned length.
    const MIN_STEPS: usize = 35;
    let hard_stop = Instant::now() + Duration::from_secs(seconds * 4);
    let mut step = 0usize;
    let mut present = all_present.clone();
    let mut invalid_writes = 0;
    while (Instant::now() < deadline || step < MIN_STEPS) && Instant::now() < hard_stop {
        // Churning tenants come and go.
        for (k, p) in present.iter_mut().enumerate() {
            *p = !(k + step).is_multiple_of(3);
        }
        let secondary = step % 2 == 1;
        match step % 7 {
            0 => rename_write(
                &dir,
                &routes,
                &table(&stubs, &present, secondary, false, false),
            ),
            1 => in_place_write(&routes, &table(&stubs, &present, secondary, false, false)),
            2 => {
                invalid_writes += 1;
                in_place_write(&routes, "tenants:\n  - this: [is not, a table\n")
            }
            3 => rename_write(
                &dir,
                &routes,
                &table(&stubs, &present, secondary, true, false),
            ),
            4 => configmap_swap(
                &dir,
                step,
                &table(&stubs, &present, !secondary, false, false),
            ),
            5 => {
                invalid_writes += 1;
                rename_write(
                    &dir,
                    &routes,
                    &table(&stubs, &present, secondary, false, true),
                )
            }
            _ => rename_write(
                &dir,
                &routes,
                &table(&stubs, &all_present, secondary, true, false),
            ),
        }
        step += 1;
        std::thread::sleep(Duration::from_millis(100));
        if baseline.is_none() && Instant::now() > warm_after {
            baseline = Some((rss_kib(pid), fds(pid)));
        }
    }
    let (rss_start, fds_start) = baseline.unwrap_or((rss_kib(pid), fds(pid)));
    std::thread::sleep(Duration::from_millis(500));
    let (rss_end, fds_end) = (rss_kib(pid), fds(pid));
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.join().unwrap();
    }
    let logs = proxy.logs();
    let (applied, rejected) = (
        logs.matches("routing table reloaded").count(),
        logs.matches("routing table rejected").count(),
    );
    let (ok, mis, errs, c403) = (
        ok.load(Ordering::Relaxed),
        misroutes.load(Ordering::Relaxed),
        stable_errors.load(Ordering::Relaxed),
        churn_403.load(Ordering::Relaxed),
    );
    eprintln!(
        "storm: {seconds}s, {step} rewrites ({invalid_writes} invalid), {applied} applied, {rejected} rejected; \
         {ok} ok, {c403} churn 403s, {mis} misroutes, {errs} stable errors; RSS {rss_start}->{rss_end} KiB, fds {fds_start}->{fds_end}"
    );
    assert_eq!(mis, 0, "misrouted responses");
    assert_eq!(errs, 0, "errors for tenants present in every version");
    assert!(ok > 1000, "too little load to mean anything: {ok}");
    assert!(
        applied >= 5 && rejected >= 1,
        "the storm did not exercise reloads: {applied} applied, {rejected} rejected"
    );
    assert!(c403 > 0, "churning tenants never went away");
    assert!(
        rss_end < rss_start + rss_start / 2 + 16 * 1024,
        "memory grew: {rss_start} -> {rss_end} KiB"
    );
    assert!(
        fds_end <= fds_start + 16,
        "file descriptors grew: {fds_start} -> {fds_end}"
    );
}

/// One response with a Content-Length or chunked body from a keep-alive connection.
fn read_one(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(u16, String)> {
    let mut n = 0;
    loop {
        if n == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let got = s.read(&mut buf[n..]).ok()?;
        if got == 0 {
            return None;
        }
        n += got;
        let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let status: u16 = head.get(9..12)?.parse().ok()?;
        let body = &buf[end + 4..n];
        if head.contains("transfer-encoding: chunked") {
            if body.ends_with(b"0\r\n\r\n") {
                return Some((status, String::from_utf8_lossy(body).into_owned()));
            }
            continue;
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if body.len() >= len {
            return Some((status, String::from_utf8_lossy(&body[..len]).into_owned()));
        }
    }
}
