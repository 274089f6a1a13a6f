//! The audit (access) log: one JSON line per request, PHI-free by construction.
//!
//! A line says who (client id, tenant GUID and name, a hash of the token's `jti`), what (method, one
//! of a fixed set or `OTHER`, and the **route template** — `/Patient/{id}`, `/Observation`,
//! `/metadata`, `/token` — built only from FHIR words, never ids, names or query strings, which are
//! PHI), and how it went (status, upstream status, upstream, latency, bytes sent).
//! Every field is either a fixed vocabulary, a value fhir-edge generated, or an identifier of a
//! tenant, client or upstream from its own configuration; nothing is copied from the request except
//! a client-sent `X-Request-Id` that passed the request-id check. Lines go to stdout (default),
//! stderr or a file opened for appending, written by a thread of their own ([`AuditLog`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use prometheus::IntCounter;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Stdout,
    Stderr,
    File(PathBuf),
    Off,
}

/// The audit log: lines are serialised on the worker that answered the request and handed to a
/// writer thread through a bounded queue. A worker never waits for the disk: when the queue is full
/// (the sink is slower than the traffic, or stuck) the line is dropped and counted in
/// `fhir_edge_audit_lines_dropped_total`. A file target is reopened (a new file after logrotate's
/// rename) when [`AuditLog::reopen`] is called: on `SIGHUP`.
pub(crate) struct AuditLog {
    queue: Option<SyncSender<Vec<u8>>>,
    reopen: Arc<AtomicBool>,
    dropped: IntCounter,
}

/// What the writer thread writes to.
enum Sink {
    Stdout,
    Stderr,
    File(PathBuf, File),
}

/// The counters the audit log keeps.
pub(crate) struct AuditCounters {
    /// Lines the queue had no room for.
    pub dropped: IntCounter,
    /// Lines the sink refused (a full disk, a closed pipe).
    pub failed: IntCounter,
}

/// One request.
#[derive(Serialize)]
pub(crate) struct Record<'a> {
    pub time: &'a str,
    pub request_id: &'a str,
    /// Written as [`method_label`]: a method is client text too.
    #[serde(serialize_with = "serialize_method")]
    pub method: &'a http::Method,
    pub route: &'a str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti_hash: Option<&'a str>,
    /// The registration portal's action (`client_created`, `secret_revoked`, …) and the portal
    /// account (its id, never the e-mail address) that took it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub portal_action: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<&'a str>,
    /// The client's address (the TCP peer, or from a trusted proxy's `X-Forwarded-For`): a
    /// service's address, never a patient's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_failure: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    pub latency_ms: f64,
    pub bytes_out: usize,
}

fn open_append(p: &PathBuf) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(p)
}

impl AuditLog {
    /// Opens the target (a file now, so a path that cannot be written stops the start) and starts
    /// the writer thread with a queue of `queue` lines.
    pub(crate) fn open(
        target: &Target,
        queue: usize,
        counters: AuditCounters,
    ) -> std::io::Result<AuditLog> {
        let sink = match target {
            Target::Off => {
                return Ok(AuditLog {
                    queue: None,
                    reopen: Arc::new(AtomicBool::new(false)),
                    dropped: counters.dropped,
                })
            }
            Target::Stdout => Sink::Stdout,
            Target::Stderr => Sink::Stderr,
            Target::File(p) => Sink::File(p.clone(), open_append(p)?),
        };
        let (tx, rx) = sync_channel(queue.max(1));
        let reopen = Arc::new(AtomicBool::new(false));
        let flag = reopen.clone();
        std::thread::Builder::new()
            .name("fhir-edge-audit".into())
            .spawn(move || write_lines(rx, sink, &flag, &counters.failed))?;
        Ok(AuditLog {
            queue: Some(tx),
            reopen,
            dropped: counters.dropped,
        })
    }

    pub(crate) fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// Queues one line; never waits. A line the queue has no room for is dropped and counted.
    pub(crate) fn write(&self, record: &Record) {
        let Some(queue) = &self.queue else {
            return;
        };
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        match queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// A handle that asks the writer to reopen a file target before its next write (after
    /// logrotate renamed it): called on `SIGHUP`.
    pub(crate) fn reopener(&self) -> impl Fn() + Send + Sync + 'static {
        let (flag, queue) = (self.reopen.clone(), self.queue.clone());
        move || {
            flag.store(true, Ordering::Relaxed);
            if let Some(q) = &queue {
                // An empty line wakes the writer; a full queue wakes it anyway.
                let _ = q.try_send(Vec::new());
            }
        }
    }
}

/// The writer thread: takes whatever is queued, writes it with one `write` per batch.
fn write_lines(rx: Receiver<Vec<u8>>, mut sink: Sink, reopen: &AtomicBool, failed: &IntCounter) {
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        batch.clear();
        let mut lines = u64::from(!first.is_empty());
        batch.extend_from_slice(&first);
        while batch.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(l) => {
                    lines += u64::from(!l.is_empty());
                    batch.extend_from_slice(&l);
                }
                Err(_) => break,
            }
        }
        if reopen.swap(false, Ordering::Relaxed) {
            if let Sink::File(path, file) = &mut sink {
                match open_append(path) {
                    Ok(f) => *file = f,
                    Err(e) => log::error!("cannot reopen the audit log {}: {e}", path.display()),
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let written = match &mut sink {
            Sink::Stdout => std::io::stdout().lock().write_all(&batch),
            Sink::Stderr => std::io::stderr().lock().write_all(&batch),
            Sink::File(_, f) => f.write_all(&batch),
        };
        if let Err(e) = written {
            failed.inc_by(lines);
            log::error!("cannot write the audit log: {e}");
        }
    }
}

/// The method as the log names it: one of the methods fhir-edge knows (RFC 9110 §9 and PATCH, RFC
/// 5789), or `OTHER`. An extension method is any token the client chose, so it is never copied.
pub(crate) fn method_label(method: &http::Method) -> &'static str {
    use http::Method as M;
    match *method {
        M::GET => "GET",
        M::HEAD => "HEAD",
        M::POST => "POST",
        M::PUT => "PUT",
        M::PATCH => "PATCH",
        M::DELETE => "DELETE",
        M::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

fn serialize_method<S: serde::Serializer>(m: &&http::Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(method_label(m))
}

/// A short, stable, non-reversible handle on a token's `jti`: correlates the requests made with one
/// token without putting anything usable in the log.
pub(crate) fn jti_hash(jti: &str) -> String {
    let d = Sha256::digest(jti.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_without_empty_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let counters = AuditCounters {
            dropped: IntCounter::new("d", "d").unwrap(),
            failed: IntCounter::new("f", "f").unwrap(),
        };
        let log = AuditLog::open(&Target::File(path.clone()), 16, counters).unwrap();
        let r = Record {
            time: "2026-11-29T00:00:00.000Z",
            request_id: "r1",
            method: &http::Method::GET,
            route: "/Patient/{id}",
            status: 200,
            upstream_status: Some(200),
            tenant: Some("145f4184-1b0b-41c7-ba24-b3c1291bfda1"),
            tenant_name: Some("contoso"),
            client_id: None,
            jti_hash: Some(&jti_hash("abc")),
            portal_action: None,
            account: None,
            client_ip: Some("10.1.2.3"),
            upstream: Some("10.0.0.5:8090"),
            auth_failure: None,
            error: None,
            latency_ms: 1.25,
            bytes_out: 10,
        };
        log.write(&r);
        log.write(&r);
        let mut text = String::new();
        for _ in 0..200 {
            text = std::fs::read_to_string(&path).unwrap();
            if text.lines().count() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["route"], "/Patient/{id}");
        assert!(v.get("client_id").is_none());
        assert_eq!(v["jti_hash"].as_str().unwrap().len(), 16);
        assert_eq!(v["method"], "GET");
    }

    #[test]
    fn methods_outside_the_known_set_are_one_bucket() {
        assert_eq!(method_label(&http::Method::PATCH), "PATCH");
        for m in ["PROPFIND", "CANARYSMITH", "TRACE", "CONNECT", "get"] {
            let m = http::Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(method_label(&m), "OTHER", "{m}");
        }
    }
}
