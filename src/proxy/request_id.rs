//! Request ids: accepted from the client when they look like an id, generated otherwise.
//!
//! A generated id is a per-process random prefix plus a counter: unique, cheap, and not derived from
//! anything in the request. A client-sent `X-Request-Id` is kept (so callers can correlate) only when it
//! is 8-64 characters of `A-Z a-z 0-9 - _ .`; anything else is replaced, so the id cannot smuggle
//! arbitrary text into logs or upstream headers.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    pub(crate) fn new() -> RequestIds {
        // RandomState is seeded from the OS per process: good enough for uniqueness, not a secret.
        let prefix = RandomState::new().hash_one(std::process::id());
        RequestIds {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    pub(crate) fn accept_or_generate(&self, sent: Option<&[u8]>) -> String {
        if let Some(s) = sent.filter(|s| is_sane(s)) {
            // is_sane admits ASCII only.
            if let Ok(s) = std::str::from_utf8(s) {
                return s.to_string();
            }
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{:08x}", self.prefix, n)
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

fn is_sane(s: &[u8]) -> bool {
    (8..=64).contains(&s.len())
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_ids_and_replaces_others() {
        let ids = RequestIds::new();
        assert_eq!(
            ids.accept_or_generate(Some(b"abc-123_XYZ.9")),
            "abc-123_XYZ.9"
        );
        let a = ids.accept_or_generate(Some(b"has space in it"));
        let b = ids.accept_or_generate(None);
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
        assert_ne!(ids.accept_or_generate(Some(b"short")), "short");
    }
}
