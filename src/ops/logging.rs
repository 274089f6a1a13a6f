//! The process logger: one line per record on stderr, with Pingora's own records fenced off.
//!
//! Pingora logs raw request and response bytes in some error contexts (`buf: …` on a malformed
//! message) and whole request headers at `debug`/`trace`. Those can carry bearer tokens, query strings
//! and bodies, which are secrets and PHI. So records from `pingora*` targets are capped at `warn`
//! whatever level is configured, and any part of their message from a raw-bytes marker on is cut off.
//! fhir-edge's own messages never include request contents in the first place.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    level: LevelFilter,
    json: bool,
}

/// How process log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `time LEVEL target: message`
    #[default]
    Text,
    /// One JSON object per line: `{"time", "level", "target", "message"}`, for log shippers.
    Json,
}

/// Markers after which a Pingora message may quote raw bytes.
const RAW_MARKERS: &[&str] = &[
    "buf:",
    "Request header:",
    "Sending header",
    "RequestHeader",
    "ResponseHeader",
];

fn is_pingora(target: &str) -> bool {
    target.starts_with("pingora")
}

/// Pingora errors that are routine for an operator: its upstream pool lost a race with its own
/// idle watcher for a connection and opens a new one (`connectors::reused_stream`).
fn is_benign(record: &Record) -> bool {
    record.target() == "pingora_core::connectors"
        && record.args().to_string() == "failed to acquire reusable stream"
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        let cap = if is_pingora(m.target()) {
            self.level.min(LevelFilter::Warn)
        } else {
            self.level
        };
        m.level() <= cap
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) || is_benign(record) {
            return;
        }
        let mut msg = record.args().to_string();
        if is_pingora(record.target()) {
            if let Some(i) = RAW_MARKERS.iter().filter_map(|m| msg.find(m)).min() {
                msg.truncate(i);
                msg.push_str("[raw bytes withheld]");
            }
        }
        let time = crate::time::rfc3339_now_millis();
        let line = if self.json {
            let mut l = serde_json::json!({
                "time": time,
                "level": record.level().as_str(),
                "target": record.target(),
                "message": msg,
            })
            .to_string();
            l.push('\n');
            l
        } else {
            format!("{time} {:<5} {}: {msg}\n", record.level(), record.target())
        };
        // One write per line so concurrent records do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the logger (once per process; later calls only change nothing).
pub(crate) fn init(level: LevelFilter, format: LogFormat) {
    let json = format == LogFormat::Json;
    if log::set_boxed_logger(Box::new(Logger { level, json })).is_ok() {
        log::set_max_level(level);
    }
}
