//! Throttling of failed client authentications, per `client_id` and per source address, on
//! pingora-limits' [`Rate`]: a lock-free count-min sketch per half-window, so memory is fixed by
//! construction (no per-key map to grow under a flood of random client ids, no scan of one) and a
//! check is a few atomic loads.
//!
//! The configured window is counted as two halves: a key is throttled while the failures counted
//! in the current half and the previous one reach its limit. So at least `limit` failures within
//! one window trip it, and it recovers at the latest one window after its last failure: requests
//! get 429 with `Retry-After` until then, and nothing is ever locked out for longer (a permanent
//! lockout would let anyone who knows a client_id disable it). A sketch can only over-count: a flood
//! of distinct failing keys (tens of thousands per half-window, from more sources than the
//! per-source limit allows one) can make innocent keys look throttled until the flood stops; it
//! never lets a key past its limit. Only the token and management endpoints use it, never the FHIR
//! request path.

use std::net::IpAddr;
use std::time::Duration;

use pingora_limits::rate::{Rate, RateComponents};

/// Rows and columns of each count-min sketch: 4 × 8,192 counters, 256 KiB per half-window; four
/// of them (client and source, current and previous half) are 1 MiB whatever the traffic.
const HASHES: usize = 4;
const SLOTS: usize = 8192;

/// The configured limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub per_client: u32,
    pub per_source: u32,
    pub window_seconds: u64,
}

pub(crate) struct FailureLimiter {
    limits: Limits,
    clients: Rate,
    sources: Rate,
}

impl FailureLimiter {
    pub(crate) fn new(limits: Limits) -> FailureLimiter {
        // Half-windows of at least a second: Rate's reset check subtracts 1,000 ms from its clock
        // and would underflow in its first second with a shorter interval (only `window_seconds:
        // 1` is affected, and it gets halves of a second: throttled for at most two).
        let half = Duration::from_millis(limits.window_seconds.saturating_mul(500).max(1000));
        FailureLimiter::with_half_window(limits, half)
    }

    fn with_half_window(limits: Limits, half: Duration) -> FailureLimiter {
        FailureLimiter {
            limits,
            clients: Rate::new_with_estimator_config(half, HASHES, SLOTS),
            sources: Rate::new_with_estimator_config(half, HASHES, SLOTS),
        }
    }

    /// Seconds to wait when `client` or `source` is over its limit, else `None`.
    pub(crate) fn retry_after(&self, client: Option<&str>, source: Option<IpAddr>) -> Option<u64> {
        let by_client = client.and_then(|c| {
            self.clients
                .rate_with(&c, |r| wait(&r, self.limits.per_client))
        });
        let by_source = source.and_then(|s| {
            self.sources
                .rate_with(&s, |r| wait(&r, self.limits.per_source))
        });
        by_client.max(by_source)
    }

    /// Counts one failed authentication against `client` and `source`.
    pub(crate) fn record_failure(&self, client: Option<&str>, source: Option<IpAddr>) {
        if let Some(c) = client {
            self.clients.observe(&c, 1);
        }
        if let Some(s) = source {
            self.sources.observe(&s, 1);
        }
    }
}

/// How long until a key with these counts is under `limit` again (whole seconds, at least 1), or
/// `None` when it is under it now. Over the limit within the current half alone, the key waits for
/// that half to end and for the next one to pass; otherwise only for the current half to end
/// (then the previous half, which holds the rest of its failures, drops out).
fn wait(r: &RateComponents, limit: u32) -> Option<u64> {
    let (prev, curr) = (r.prev_samples, r.curr_samples);
    wait_at(prev, curr, r.interval, r.current_interval_fraction, limit)
}

fn wait_at(prev: isize, curr: isize, half: Duration, fraction: f64, limit: u32) -> Option<u64> {
    let limit = isize::try_from(limit).unwrap_or(isize::MAX);
    if prev.saturating_add(curr) < limit {
        return None;
    }
    let rest_of_half = half.mul_f64((1.0 - fraction).clamp(0.0, 1.0));
    let wait = if curr >= limit {
        rest_of_half + half
    } else {
        rest_of_half
    };
    Some(wait.as_secs_f64().ceil().max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> FailureLimiter {
        FailureLimiter::new(Limits {
            per_client: 3,
            per_source: 5,
            window_seconds: 60,
        })
    }

    #[test]
    fn throttles_at_the_limit_for_at_most_one_window() {
        let l = limiter();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.retry_after(Some("c"), Some(ip)), None);
            l.record_failure(Some("c"), Some(ip));
        }
        let wait = l.retry_after(Some("c"), Some(ip)).unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
        // Another client from the same source is not throttled yet (the source limit is 5).
        assert_eq!(l.retry_after(Some("d"), Some(ip)), None);
    }

    #[test]
    fn the_source_limit_covers_many_client_ids() {
        let l = limiter();
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        for i in 0..5 {
            l.record_failure(Some(&format!("guess-{i}")), Some(ip));
        }
        assert!(l.retry_after(Some("fresh"), Some(ip)).is_some());
        let elsewhere: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(l.retry_after(Some("fresh"), Some(elsewhere)).is_none());
    }

    #[test]
    fn a_throttled_key_recovers_within_one_window() {
        let limits = Limits {
            per_client: 2,
            per_source: 100,
            window_seconds: 1,
        };
        let l = FailureLimiter::with_half_window(limits, Duration::from_millis(40));
        l.record_failure(Some("c"), None);
        l.record_failure(Some("c"), None);
        // Two half-windows later both halves that held the failures have passed, however slowly
        // this test ran up to here.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(l.retry_after(Some("c"), None), None);
    }

    #[test]
    fn distinct_failing_keys_spare_a_quiet_key() {
        // Memory is the fixed sketch whatever the keys. With fewer distinct failures than counters
        // per row (2,000 over 8,192: a quiet key shares all four of its counters with three
        // failures with a probability near 1e-11), a key that never failed is not throttled.
        let l = limiter();
        for i in 0..2_000 {
            l.record_failure(Some(&format!("random-{i}")), None);
        }
        assert_eq!(l.retry_after(Some("quiet"), None), None);
    }

    #[test]
    fn the_wait_depends_on_which_half_holds_the_failures() {
        let half = Duration::from_secs(30);
        let at = |prev, curr, fraction| wait_at(prev, curr, half, fraction, 5);
        assert_eq!(at(2, 2, 0.5), None);
        assert_eq!(at(3, 2, 0.5), Some(15));
        assert_eq!(at(0, 5, 0.5), Some(45));
        assert_eq!(at(0, 5, 1.0), Some(30));
        assert_eq!(at(9, 0, 0.999_99), Some(1));
    }
}
