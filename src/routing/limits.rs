//! Per-tenant request limits on the request path: a token bucket for the tenant, one per client of
//! the tenant, and a count of requests in flight.
//!
//! The buckets are governor's GCRA limiters (one 64-bit word of state each, checked with one
//! compare-and-swap). A route carries its tenant's resolved limits (shared with every tenant that
//! has the same); the state lives in the [`LimiterRegistry`], one [`TenantLimiter`] per tenant that
//! has sent a request lately, made on its first request. The registry outlives tables, so a reload
//! keeps every bucket of a tenant whose limits did not change (and the in-flight count even when
//! they did). Per-client buckets live in one keyed limiter per distinct per-client rate, keyed by
//! tenant and a hash of the client id. [`LimiterRegistry::sweep`] drops, every minute, state that
//! has nothing to remember (a full bucket, nothing in flight), so memory is bounded by the tenants
//! and clients active in the last minute or so, never by the size of the table.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

use crate::config::limits::{Rate, TenantLimits};
use crate::tenant::TenantId;

type ClientKey = (TenantId, u64);
type ClientLimiter = DefaultKeyedRateLimiter<ClientKey>;

fn clock() -> &'static DefaultClock {
    static CLOCK: OnceLock<DefaultClock> = OnceLock::new();
    CLOCK.get_or_init(DefaultClock::default)
}

fn quota(r: Rate) -> Quota {
    Quota::per_second(r.per_second).allow_burst(r.burst)
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The tenant's requests per second.
    Rate,
    /// The tenant's requests in flight.
    InFlight,
    /// One client's requests per second within the tenant.
    ClientRate,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Rate => "rate",
            Limit::InFlight => "in_flight",
            Limit::ClientRate => "client_rate",
        }
    }
}

/// A refusal: which limit, and when to try again (whole seconds, at least 1, for `Retry-After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub limit: Limit,
    pub retry_after: u32,
}

/// A wait in whole seconds for `Retry-After`: rounded up, at least 1.
pub(crate) fn retry_after_seconds(wait: Duration) -> u32 {
    let whole = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    u32::try_from(whole.max(1)).unwrap_or(u32::MAX)
}

/// A request counted as in flight for its tenant until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One tenant's limits and their state.
pub struct TenantLimiter {
    pub limits: TenantLimits,
    tenant: TenantId,
    rate: Option<DefaultDirectRateLimiter>,
    clients: Option<Arc<ClientLimiter>>,
    in_flight: Arc<AtomicU32>,
    /// When the tenant last sent a request (seconds on the limiter clock's scale).
    last_seen: AtomicU64,
}

impl std::fmt::Debug for TenantLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantLimiter")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl TenantLimiter {
    /// Admits one request of `client` (its id, if the token names one), or says which limit it is
    /// over. The in-flight count is taken first (it can be given back), then the client's bucket,
    /// then the tenant's, so a client over its own rate does not drain its tenant's bucket.
    pub fn admit(&self, client: Option<&str>) -> Result<Option<InFlight>, Throttled> {
        let now = now_secs();
        if self.last_seen.load(Ordering::Relaxed) != now {
            self.last_seen.store(now, Ordering::Relaxed);
        }
        let guard = match self.limits.max_in_flight {
            None => None,
            Some(max) => {
                let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
                let guard = InFlight(self.in_flight.clone());
                if before >= max.get() {
                    return Err(Throttled {
                        limit: Limit::InFlight,
                        retry_after: 1,
                    });
                }
                Some(guard)
            }
        };
        if let (Some(clients), Some(client)) = (&self.clients, client) {
            let key = (self.tenant, client_hash(client));
            if let Err(not_until) = clients.check_key(&key) {
                return Err(Throttled {
                    limit: Limit::ClientRate,
                    retry_after: retry_after_seconds(not_until.wait_time_from(clock().now())),
                });
            }
        }
        if let Some(rate) = &self.rate {
            if let Err(not_until) = rate.check() {
                return Err(Throttled {
                    limit: Limit::Rate,
                    retry_after: retry_after_seconds(not_until.wait_time_from(clock().now())),
                });
            }
        }
        Ok(guard)
    }

    /// Requests of the tenant in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether this state has nothing to remember: nothing in flight, and idle long enough for
    /// every bucket to be full again (a fresh limiter would decide the same).
    fn forgettable(&self, now: u64) -> bool {
        let refill =
            |r: Option<Rate>| r.map_or(0, |r| u64::from(r.burst.get() / r.per_second.get()) + 1);
        let idle = now.saturating_sub(self.last_seen.load(Ordering::Relaxed));
        self.in_flight() == 0 && idle > refill(self.limits.rate).max(refill(self.limits.per_client))
    }
}

/// Whole seconds on the process-wide monotonic clock.
fn now_secs() -> u64 {
    crate::time::monotonic().as_secs()
}

/// A client id's key in the per-client limiter: a hash with a per-process seed, so no client can
/// choose an id that shares another's bucket on purpose.
fn client_hash(client: &str) -> u64 {
    static SEED: OnceLock<hashbrown::DefaultHashBuilder> = OnceLock::new();
    SEED.get_or_init(hashbrown::DefaultHashBuilder::default)
        .hash_one(client)
}

/// Every active tenant's limiter state, kept across table builds.
#[derive(Default)]
pub struct LimiterRegistry {
    tenants: DashMap<TenantId, Arc<TenantLimiter>, hashbrown::DefaultHashBuilder>,
    clients: Mutex<HashMap<Rate, Weak<ClientLimiter>>>,
}

impl std::fmt::Debug for LimiterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimiterRegistry")
            .field("tenants", &self.tenants.len())
            .finish_non_exhaustive()
    }
}

impl LimiterRegistry {
    /// Admits one request of `tenant`, whose route says `limits`, from `client` (the id its token
    /// names, if any); see [`TenantLimiter::admit`].
    pub fn admit(
        &self,
        tenant: TenantId,
        limits: &TenantLimits,
        client: Option<&str>,
    ) -> Result<Option<InFlight>, Throttled> {
        if !limits.any() {
            return Ok(None);
        }
        if let Some(l) = self.tenants.get(&tenant) {
            if l.limits == *limits {
                return l.admit(client);
            }
        }
        self.limiter(tenant, *limits).admit(client)
    }

    /// The state for `tenant` with `limits`: the one it has if its limits are the same, else a new
    /// one (keeping its in-flight count: the limits changed with a reload).
    pub fn limiter(&self, tenant: TenantId, limits: TenantLimits) -> Arc<TenantLimiter> {
        let mut entry = self
            .tenants
            .entry(tenant)
            .or_insert_with(|| self.make(tenant, limits, None));
        if entry.limits != limits {
            let kept = entry.in_flight.clone();
            *entry = self.make(tenant, limits, Some(kept));
        }
        entry.clone()
    }

    fn make(
        &self,
        tenant: TenantId,
        limits: TenantLimits,
        in_flight: Option<Arc<AtomicU32>>,
    ) -> Arc<TenantLimiter> {
        Arc::new(TenantLimiter {
            limits,
            tenant,
            rate: limits
                .rate
                .map(|r| DefaultDirectRateLimiter::direct_with_clock(quota(r), clock().clone())),
            clients: limits.per_client.map(|r| self.clients(r)),
            in_flight: in_flight.unwrap_or_default(),
            last_seen: AtomicU64::new(now_secs()),
        })
    }

    /// The keyed limiter every tenant with per-client rate `r` shares.
    fn clients(&self, r: Rate) -> Arc<ClientLimiter> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = clients.get(&r).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(ClientLimiter::dashmap_with_clock(quota(r), clock().clone()));
        clients.insert(r, Arc::downgrade(&l));
        l
    }

    /// Drops the state of tenants and clients that have nothing to remember (full buckets,
    /// nothing in flight). Run every minute.
    pub fn sweep(&self) {
        self.sweep_as_of(now_secs());
    }

    /// [`sweep`](Self::sweep) as if the clock said `now` (whole seconds) for tenant state.
    fn sweep_as_of(&self, now: u64) {
        self.tenants.retain(|_, l| !l.forgettable(now));
        self.tenants.shrink_to_fit();
        let live: Vec<Arc<ClientLimiter>> = {
            let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
            clients.retain(|_, w| w.strong_count() > 0);
            clients.values().filter_map(Weak::upgrade).collect()
        };
        for l in live {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Tenants with limiter state now.
    pub fn tenants(&self) -> usize {
        self.tenants.len()
    }

    /// Per-client buckets held now.
    pub fn client_buckets(&self) -> usize {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .values()
            .filter_map(Weak::upgrade)
            .map(|l| l.len())
            .sum()
    }
}

/// The background service that sweeps idle limiter state (tenants' and clients') every minute.
pub(crate) struct Sweeper {
    pub(crate) state: Arc<crate::routing::RoutingState>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Sweeper {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.state.limiters.sweep(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    const T: &str = "145f4184-1b0b-41c7-ba24-b3c1291bfda1";

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        })
    }

    #[test]
    fn a_burst_then_throttled_with_a_wait() {
        let reg = LimiterRegistry::default();
        let t = TenantId::parse(T).unwrap();
        let l = reg.limiter(
            t,
            TenantLimits {
                rate: rate(1, 3),
                ..Default::default()
            },
        );
        for _ in 0..3 {
            assert!(l.admit(None).is_ok());
        }
        let refused = l.admit(None).unwrap_err();
        assert_eq!(refused.limit, Limit::Rate);
        assert_eq!(refused.retry_after, 1);
    }

    #[test]
    fn in_flight_is_given_back_and_kept_across_limit_changes() {
        let reg = LimiterRegistry::default();
        let t = TenantId::parse(T).unwrap();
        let two = TenantLimits {
            max_in_flight: NonZeroU32::new(2),
            ..Default::default()
        };
        let l = reg.limiter(t, two);
        let a = l.admit(None).unwrap();
        let _b = l.admit(None).unwrap();
        assert_eq!(l.admit(None).unwrap_err().limit, Limit::InFlight);
        assert_eq!(l.in_flight(), 2, "a refusal gives its count back");
        drop(a);
        assert!(l.admit(None).is_ok());
        // Same limits: the same limiter. Other limits: a new one with the same count.
        assert!(Arc::ptr_eq(&l, &reg.limiter(t, two)));
        let three = TenantLimits {
            max_in_flight: NonZeroU32::new(3),
            ..two
        };
        let l3 = reg.limiter(t, three);
        assert!(!Arc::ptr_eq(&l, &l3));
        assert_eq!(l3.in_flight(), 1);
        // No limits: admitted without any state.
        assert!(reg
            .admit(t, &TenantLimits::default(), None)
            .unwrap()
            .is_none());
        // State with something in flight is kept by a sweep.
        reg.sweep();
        assert_eq!(reg.tenants(), 1);
    }

    #[test]
    fn state_is_kept_only_for_tenants_and_clients_with_something_to_remember() {
        let reg = LimiterRegistry::default();
        let limits = TenantLimits {
            max_in_flight: NonZeroU32::new(8),
            per_client: rate(1000, 1),
            ..Default::default()
        };
        let ids: Vec<TenantId> = (0..100_000u32)
            .map(|i| TenantId::parse(&format!("00000000-0000-4000-8000-{i:012x}")).unwrap())
            .collect();
        for id in &ids {
            drop(reg.admit(*id, &limits, Some("client")));
        }
        let busy = reg.admit(ids[0], &limits, Some("client")).unwrap();
        assert_eq!(reg.tenants(), 100_000);
        assert_eq!(reg.client_buckets(), 100_000);
        // Long after: only the tenant with a request in flight is remembered; every client bucket
        // has filled again (1,000 a second, one deep) and goes too.
        std::thread::sleep(Duration::from_millis(20));
        reg.sweep_as_of(now_secs() + 10);
        assert_eq!(reg.tenants(), 1);
        assert_eq!(reg.client_buckets(), 0);
        drop(busy);
        reg.sweep_as_of(now_secs() + 10);
        assert_eq!(reg.tenants(), 0);
    }

    #[test]
    fn clients_have_their_own_buckets() {
        let reg = LimiterRegistry::default();
        let t = TenantId::parse(T).unwrap();
        let l = reg.limiter(
            t,
            TenantLimits {
                per_client: rate(1, 2),
                ..Default::default()
            },
        );
        assert!(l.admit(Some("a")).is_ok());
        assert!(l.admit(Some("a")).is_ok());
        assert_eq!(l.admit(Some("a")).unwrap_err().limit, Limit::ClientRate);
        assert!(l.admit(Some("b")).is_ok(), "another client is not affected");
        assert!(l.admit(None).is_ok(), "no client id: only tenant limits");
        assert_eq!(reg.client_buckets(), 2);
    }
}
