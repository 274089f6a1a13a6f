//! The process logger: one line per record on stderr, with Pingora's own records fenced off.
//!
//! Pingora logs raw request and response bytes in some error contexts (`buf: …` on a malformed
//! message) and whole request headers at `debug`/`trace`. Those can carry bearer tokens, query strings
//! and bodies, which are secrets and PHI. So records from `pingora*` targets are capped at `warn`
//! whatever level is configured, and any part of their message from a raw-bytes marker on is cut off.
//! fhir-edge's own messages never include request contents in the first place.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

struct Logger {
    level: LevelFilter,
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
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut msg = record.args().to_string();
        if is_pingora(record.target()) {
            if let Some(i) = RAW_MARKERS.iter().filter_map(|m| msg.find(m)).min() {
                msg.truncate(i);
                msg.push_str("[raw bytes withheld]");
            }
        }
        let line = format!(
            "{} {:<5} {}: {}\n",
            rfc3339_now(),
            record.level(),
            record.target(),
            msg
        );
        // One write per line so concurrent records do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Installs the logger (once per process; later calls only change nothing).
pub fn init(level: LevelFilter) {
    if log::set_boxed_logger(Box::new(Logger { level })).is_ok() {
        log::set_max_level(level);
    }
}

/// `2026-11-29T03:55:23.123Z`, from the system clock, without a date crate.
pub fn rfc3339_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

/// Days since 1970-01-01 → (year, month, day); Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_786), (2026, 11, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
