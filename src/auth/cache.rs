//! A bounded cache of verified tokens, so that a client re-using its access token (the normal case:
//! one token per hour) pays one signature check per token rather than one per request.
//!
//! - **Key**: SHA-256 of the whole token string. The token itself is not kept in memory, and two
//!   tokens can share an entry only by a SHA-256 collision. Only tokens that verified *and* named a
//!   tenant are cached; a failing token is checked in full every time (so a garbage token cannot evict
//!   good entries, and a rejected token never becomes accepted).
//! - **Value**: the [`Grant`] (tenant, `own`, client, secret id, `jti` hash) with the token's `exp` and
//!   `nbf`. Time is re-checked on every hit with the verifier's leeway, exactly as the verifier does: a
//!   cached token expires at the same second an uncached one would.
//! - What can change while a token is cached is re-checked on every request by the caller, never
//!   cached: the tenant's presence in the current routing table and, for tokens of fhir-edge's own
//!   issuer, the client registry (removed or disabled client, revoked secret). Keys only change with a
//!   restart, which empties the cache.
//! - **Bound**: `auth.token_cache_entries` (default 10,000; 0 turns the cache off), evicted by
//!   quick_cache's S3-FIFO policy: a burst of one-off tokens does not flush the tokens in steady use.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{AuthFailure, Grant};

/// The key of one token: SHA-256 of its bytes.
pub(crate) type Key = [u8; 32];

pub struct TokenCache {
    inner: Option<quick_cache::sync::Cache<Key, Arc<Grant>>>,
    leeway: u64,
}

impl TokenCache {
    /// A cache of at most `entries` tokens; `0` disables caching.
    pub fn new(entries: usize, leeway_seconds: u64) -> TokenCache {
        TokenCache {
            inner: (entries > 0).then(|| quick_cache::sync::Cache::new(entries)),
            leeway: leeway_seconds,
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The cache key of `token`, or `None` when caching is off (saves the hash).
    pub fn key(&self, token: &str) -> Option<Key> {
        self.inner.as_ref()?;
        Some(Sha256::digest(token.as_bytes()).into())
    }

    /// A cached grant for `key`, re-checked against the clock (`now`, Unix seconds). An entry whose
    /// token has expired is dropped and reported as [`AuthFailure::Expired`].
    pub fn get(&self, key: &Key, now: u64) -> Option<Result<Arc<Grant>, AuthFailure>> {
        let cache = self.inner.as_ref()?;
        let grant = cache.get(key)?;
        if grant.expires.saturating_add(self.leeway) < now {
            cache.remove(key);
            return Some(Err(AuthFailure::Expired));
        }
        if grant
            .not_before
            .is_some_and(|nbf| nbf > now.saturating_add(self.leeway))
        {
            return Some(Err(AuthFailure::NotYetValid));
        }
        Some(Ok(grant))
    }

    pub fn insert(&self, key: Key, grant: Arc<Grant>) {
        if let Some(cache) = &self.inner {
            cache.insert(key, grant);
        }
    }

    /// Entries currently held.
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantId;

    fn grant(expires: u64, not_before: Option<u64>) -> Arc<Grant> {
        Arc::new(Grant {
            tenant: TenantId::parse("145f4184-1b0b-41c7-ba24-b3c1291bfda1").unwrap(),
            own: false,
            client_id: Some("c".into()),
            secret_id: None,
            jti_hash: None,
            expires,
            not_before,
        })
    }

    #[test]
    fn hits_respect_exp_and_nbf_with_leeway() {
        let c = TokenCache::new(100, 30);
        let k = c.key("a.b.c").unwrap();
        assert!(c.get(&k, 1000).is_none());
        c.insert(k, grant(1000, Some(900)));
        assert!(matches!(c.get(&k, 1030), Some(Ok(_))));
        assert!(matches!(c.get(&k, 1031), Some(Err(AuthFailure::Expired))));
        // An expired entry is gone.
        assert!(c.get(&k, 1000).is_none());
        c.insert(k, grant(5000, Some(2000)));
        assert!(matches!(c.get(&k, 1970), Some(Ok(_))));
        assert!(matches!(
            c.get(&k, 1969),
            Some(Err(AuthFailure::NotYetValid))
        ));
    }

    #[test]
    fn distinct_tokens_distinct_keys_and_bounded() {
        let c = TokenCache::new(50, 0);
        let a = c.key("a.b.c").unwrap();
        let b = c.key("a.b.d").unwrap();
        assert_ne!(a, b);
        for i in 0..1000 {
            c.insert(c.key(&format!("t{i}")).unwrap(), grant(u64::MAX / 2, None));
        }
        assert!(c.len() <= 50, "{}", c.len());
    }

    #[test]
    fn disabled_cache_holds_nothing() {
        let c = TokenCache::new(0, 0);
        assert!(c.key("a.b.c").is_none());
        c.insert([0; 32], grant(u64::MAX / 2, None));
        assert!(c.get(&[0; 32], 0).is_none());
        assert!(c.is_empty());
    }
}
