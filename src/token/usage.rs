//! When each client secret was last used, for the portal's secrets table: noted in memory when a
//! secret authenticates, and taken in batches by the portal's service, which writes them to its
//! store. Only when the portal is on; a note costs one uncontended lock and, the first time a secret
//! is seen in a batch, two small allocations.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub(crate) struct Usage {
    enabled: AtomicBool,
    /// client id → secret id → latest Unix time.
    pending: Mutex<HashMap<String, HashMap<String, u64>>>,
}

impl Usage {
    pub(crate) fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    /// Notes that `secret_id` of `client_id` authenticated at `now`.
    pub(crate) fn note(&self, client_id: &str, secret_id: &str, now: u64) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let secrets = match pending.get_mut(client_id) {
            Some(s) => s,
            None => pending.entry(client_id.to_string()).or_default(),
        };
        match secrets.get_mut(secret_id) {
            Some(t) => *t = (*t).max(now),
            None => {
                secrets.insert(secret_id.to_string(), now);
            }
        }
    }

    /// Everything noted since the last call.
    pub(crate) fn take(&self) -> Vec<((String, String), u64)> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        pending
            .into_iter()
            .flat_map(|(c, secrets)| secrets.into_iter().map(move |(s, t)| ((c.clone(), s), t)))
            .collect()
    }

    /// What is noted for `client_id` and not yet taken.
    pub(crate) fn pending_for(&self, client_id: &str) -> HashMap<String, u64> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(client_id)
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_keep_the_latest_time_and_are_taken_once() {
        let u = Usage::default();
        u.note("c", "s1", 5);
        assert!(u.take().is_empty(), "noted while disabled");
        u.enable();
        u.note("c", "s1", 5);
        u.note("c", "s1", 9);
        u.note("c", "s1", 7);
        u.note("c", "s2", 1);
        assert_eq!(u.pending_for("c").get("s1"), Some(&9));
        let mut taken = u.take();
        taken.sort();
        assert_eq!(
            taken,
            vec![
                (("c".into(), "s1".into()), 9),
                (("c".into(), "s2".into()), 1)
            ]
        );
        assert!(u.take().is_empty());
    }
}
