//! Throttling of failed client authentications, per `client_id` and per source address.
//!
//! A fixed window per key: once a key has `limit` failures inside the window it opened, requests for
//! that key get 429 with `Retry-After` until the window closes, then start afresh. Nothing is ever
//! locked out for longer than one window, so a legitimate client recovers on its own (a permanent
//! lockout would let anyone who knows a client_id disable it). Memory is bounded: at most
//! `MAX_KEYS` keys are tracked; when full, expired windows are dropped first and new keys are not
//! tracked until there is room (fail open rather than grow without bound under a flood of random
//! client_ids). The map sits behind a mutex held for a few instructions; only the token and
//! management endpoints use it, never the FHIR request path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

const MAX_KEYS: usize = 100_000;

/// The configured limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_client: u32,
    pub per_source: u32,
    pub window_seconds: u64,
}

#[derive(Hash, PartialEq, Eq, Clone)]
enum Key {
    Client(String),
    Source(IpAddr),
}

struct Window {
    start: u64,
    failures: u32,
}

pub struct FailureLimiter {
    limits: Limits,
    windows: Mutex<HashMap<Key, Window>>,
}

impl FailureLimiter {
    pub fn new(limits: Limits) -> FailureLimiter {
        FailureLimiter {
            limits,
            windows: Mutex::new(HashMap::new()),
        }
    }

    fn keys(client: Option<&str>, source: Option<IpAddr>) -> impl Iterator<Item = Key> {
        client
            .map(|c| Key::Client(c.to_string()))
            .into_iter()
            .chain(source.map(Key::Source))
    }

    fn limit(&self, key: &Key) -> u32 {
        match key {
            Key::Client(_) => self.limits.per_client,
            Key::Source(_) => self.limits.per_source,
        }
    }

    /// Seconds to wait when `client` or `source` is over its limit at `now`, else `None`.
    pub fn retry_after(
        &self,
        client: Option<&str>,
        source: Option<IpAddr>,
        now: u64,
    ) -> Option<u64> {
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        Self::keys(client, source)
            .filter_map(|k| {
                let w = windows.get(&k)?;
                let end = w.start + self.limits.window_seconds;
                (now < end && w.failures >= self.limit(&k)).then(|| end - now)
            })
            .max()
    }

    /// Counts one failed authentication against `client` and `source`.
    pub fn record_failure(&self, client: Option<&str>, source: Option<IpAddr>, now: u64) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let window = self.limits.window_seconds;
        for k in Self::keys(client, source) {
            if !windows.contains_key(&k) && windows.len() >= MAX_KEYS {
                windows.retain(|_, w| now < w.start + window);
                if windows.len() >= MAX_KEYS {
                    continue;
                }
            }
            let w = windows.entry(k).or_insert(Window {
                start: now,
                failures: 0,
            });
            if now >= w.start + window {
                *w = Window {
                    start: now,
                    failures: 0,
                };
            }
            w.failures = w.failures.saturating_add(1);
        }
    }
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
    fn throttles_after_the_limit_and_recovers_when_the_window_ends() {
        let l = limiter();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for t in 0..3 {
            assert_eq!(l.retry_after(Some("c"), Some(ip), 100 + t), None);
            l.record_failure(Some("c"), Some(ip), 100 + t);
        }
        assert_eq!(l.retry_after(Some("c"), Some(ip), 103), Some(57));
        // Another client from the same source is not throttled yet (the source limit is 5)…
        assert_eq!(l.retry_after(Some("d"), Some(ip), 103), None);
        // …and the throttled client recovers when its window ends.
        assert_eq!(l.retry_after(Some("c"), Some(ip), 160), None);
        l.record_failure(Some("c"), Some(ip), 160);
        assert_eq!(l.retry_after(Some("c"), None, 161), None);
    }

    #[test]
    fn the_source_limit_covers_many_client_ids() {
        let l = limiter();
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        for i in 0..5 {
            l.record_failure(Some(&format!("guess-{i}")), Some(ip), 10);
        }
        assert!(l.retry_after(Some("fresh"), Some(ip), 11).is_some());
        assert!(l
            .retry_after(Some("fresh"), Some("10.0.0.3".parse().unwrap()), 11)
            .is_none());
    }
}
