//! Time as fhir-edge reads it: a process-wide monotonic clock, and wall-clock time as it writes and
//! reads it: Unix seconds, RFC 3339 UTC timestamps
//! (`2026-11-29T04:00:00Z`, through the `time` crate) and operator durations (`90s`, `30m`, `12h`,
//! `7d`). The duration syntax is ours and tiny: a bare number is seconds, which humantime (the
//! obvious crate) refuses, and the four units are all an operator needs for secret lifetimes.

use std::num::NonZeroU8;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use time::format_description::well_known::iso8601::{Config, EncodedConfig, TimePrecision};
use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{OffsetDateTime, PrimitiveDateTime};

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Time since the first call in this process: a monotonic clock whose readings fit in an atomic
/// word, for deadlines and last-seen times that threads share (node ejections, idle connections,
/// limiter state).
pub(crate) fn monotonic() -> Duration {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

/// [`monotonic`] in whole milliseconds.
pub(crate) fn monotonic_ms() -> u64 {
    u64::try_from(monotonic().as_millis()).unwrap_or(u64::MAX)
}

/// `secs` as a UTC time, clamped to the last second RFC 3339's four-digit years can write.
fn utc(secs: u64) -> OffsetDateTime {
    let latest = PrimitiveDateTime::MAX.assume_utc().unix_timestamp();
    let secs = i64::try_from(secs).unwrap_or(i64::MAX).min(latest);
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// `2026-11-29T04:00:00Z`
pub(crate) fn format_rfc3339(secs: u64) -> String {
    // Whole seconds in years 1970..=9999 always format; the fallback is never reached.
    utc(secs)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// ISO 8601 extended format with exactly three fractional digits and `Z` (an RFC 3339 profile).
const MILLIS: EncodedConfig = Config::DEFAULT
    .set_time_precision(TimePrecision::Second {
        decimal_digits: NonZeroU8::new(3),
    })
    .encode();

/// `2026-11-29T04:00:00.123Z`, now.
pub(crate) fn rfc3339_now_millis() -> String {
    OffsetDateTime::now_utc()
        .format(&Iso8601::<MILLIS>)
        .unwrap_or_else(|_| format_rfc3339(now_unix()))
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` (RFC 3339 §5.6) into Unix seconds; `None` for
/// anything else or a time before 1970.
pub(crate) fn parse_rfc3339(s: &str) -> Option<u64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

/// Parses `90s`, `30m`, `12h`, `7d` (a bare number is seconds) into seconds.
pub(crate) fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().ok()?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_rejects_nonsense() {
        let t = 1_795_910_400; // 2026-11-29T00:00:00Z (day 20786)
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(t), "2026-11-29T00:00:00Z");
        assert_eq!(format_rfc3339(t + 4 * 3600 + 61), "2026-11-29T04:01:01Z");
        assert_eq!(format_rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(parse_rfc3339("2026-11-29T00:00:00Z"), Some(t));
        assert_eq!(parse_rfc3339("2026-11-29T01:30:00.25+01:30"), Some(t));
        assert_eq!(parse_rfc3339("2026-11-28T22:00:00-02:00"), Some(t));
        for secs in [0, 59, 951_782_400, t, 4_102_444_800] {
            assert_eq!(parse_rfc3339(&format_rfc3339(secs)), Some(secs));
        }
        for bad in [
            "2026-11-29",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-29T00:00:00",
            "2026-11-29T24:00:00Z",
            "x026-11-29T00:00:00Z",
            "2026-11-29T00:00:00.Z",
            "1969-12-31T23:59:59Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn now_with_millis_is_rfc3339_with_three_digits() {
        let s = rfc3339_now_millis();
        assert_eq!(s.len(), "2026-11-29T04:00:00.123Z".len(), "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[19] == b'.', "{s}");
        let secs = parse_rfc3339(&s).unwrap();
        assert!(secs.abs_diff(now_unix()) <= 1);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Some(90));
        assert_eq!(parse_duration("90s"), Some(90));
        assert_eq!(parse_duration("30m"), Some(1800));
        assert_eq!(parse_duration("12h"), Some(43_200));
        assert_eq!(parse_duration("7d"), Some(604_800));
        assert_eq!(parse_duration("7w"), None);
        assert_eq!(parse_duration("h"), None);
        assert_eq!(parse_duration(""), None);
    }
}
