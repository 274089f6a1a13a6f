//! The audit (access) log: one JSON line per request, PHI-free by construction.
//!
//! A line says who (client id, tenant GUID and name, a hash of the token's `jti`), what (method, one
//! of a fixed set or `OTHER`, and the **route template** — `/Patient/{id}`, `/Observation`,
//! `/metadata`, `/token` — built only from FHIR words, never ids, names or query strings, which are
//! PHI), and how it went (status, upstream status, upstream, latency, bytes sent).
//! Every field is either a fixed vocabulary, a value fhir-edge generated, or an identifier of a
//! tenant, client or upstream from its own configuration; nothing is copied from the request except
//! a client-sent `X-Request-Id` that passed the request-id check. Lines go to stdout (default),
//! stderr or a file opened for appending, one `write` per line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

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

pub(crate) struct AuditLog {
    sink: Sink,
}

enum Sink {
    Stdout,
    Stderr,
    File(Mutex<File>),
    Off,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_failure: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    pub latency_ms: f64,
    pub bytes_out: usize,
}

impl AuditLog {
    pub(crate) fn open(target: &Target) -> std::io::Result<AuditLog> {
        let sink = match target {
            Target::Stdout => Sink::Stdout,
            Target::Stderr => Sink::Stderr,
            Target::Off => Sink::Off,
            Target::File(p) => Sink::File(Mutex::new(
                OpenOptions::new().create(true).append(true).open(p)?,
            )),
        };
        Ok(AuditLog { sink })
    }

    pub(crate) fn enabled(&self) -> bool {
        !matches!(self.sink, Sink::Off)
    }

    /// Writes one line; `Err` when it could not be written (counted by the caller).
    pub(crate) fn write(&self, record: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        match &self.sink {
            Sink::Off => Ok(()),
            Sink::Stdout => std::io::stdout().lock().write_all(&line),
            Sink::Stderr => std::io::stderr().lock().write_all(&line),
            Sink::File(f) => f.lock().unwrap_or_else(|p| p.into_inner()).write_all(&line),
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
        let log = AuditLog::open(&Target::File(path.clone())).unwrap();
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
            upstream: Some("10.0.0.5:8090"),
            auth_failure: None,
            error: None,
            latency_ms: 1.25,
            bytes_out: 10,
        };
        log.write(&r).unwrap();
        log.write(&r).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
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
