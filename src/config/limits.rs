//! Per-tenant request limits and upstream health rules, as `fhir-edge.yaml` (defaults) and
//! `routes.yaml` (each tenant's `limits`) state them, and resolved into the numbers the request
//! path uses ([`TenantLimits`], [`HealthPolicy`]).
//!
//! A tenant's limits are taken key by key: its own `limits` entry, else `tenant_limits` in
//! `fhir-edge.yaml`, else the built-in default. `0` means "no limit" wherever it is written, so a
//! route can lift a default.

use std::num::NonZeroU32;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;

/// Requests a tenant may have in flight at once when nothing says otherwise. Each holds at most
/// one upstream connection, so this is also the default bound on a tenant's upstream connections.
pub(crate) const DEFAULT_MAX_IN_FLIGHT: u32 = 256;

/// The largest value any limit may take.
const MAX_LIMIT: u32 = 1_000_000;

/// A tenant's limits as written (every key optional; see the module documentation).
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// Sustained requests per second (the token bucket's refill rate); 0: no rate limit.
    #[serde(default)]
    pub requests_per_second: Option<u32>,
    /// Requests that may arrive at once above the rate (the bucket's size); 0 or absent: one
    /// second's worth.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Requests of the tenant in flight at once (0: unlimited). Default 256.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// The same rate, per `client_id` within the tenant.
    #[serde(default)]
    pub per_client: Option<ClientLimitSpec>,
}

/// A per-client rate, as written.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientLimitSpec {
    /// Sustained requests per second of one client of the tenant; 0: no per-client limit.
    #[serde(default)]
    pub requests_per_second: Option<u32>,
    /// Requests above the rate at once; 0 or absent: one second's worth.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// A token bucket: `per_second` tokens a second, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Rate {
    fn of(per_second: u32, burst: u32) -> Option<Rate> {
        let per_second = NonZeroU32::new(per_second)?;
        Some(Rate {
            per_second,
            burst: NonZeroU32::new(burst).unwrap_or(per_second),
        })
    }
}

/// A tenant's limits, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TenantLimits {
    pub rate: Option<Rate>,
    pub max_in_flight: Option<NonZeroU32>,
    pub per_client: Option<Rate>,
}

impl TenantLimits {
    /// Whether any limit applies (a tenant with none needs no limiter at all).
    pub fn any(&self) -> bool {
        self.rate.is_some() || self.max_in_flight.is_some() || self.per_client.is_some()
    }

    /// Resolves a route's own `limits` over the defaults, key by key. Errors name the key.
    pub fn resolve(
        defaults: &LimitSpec,
        own: Option<&LimitSpec>,
    ) -> Result<TenantLimits, (&'static str, String)> {
        let own = own.copied().unwrap_or_default();
        let pick = |o: Option<u32>, d: Option<u32>| o.or(d);
        let client = own.per_client.unwrap_or_default();
        let dclient = defaults.per_client.unwrap_or_default();
        let values = [
            (
                "requests_per_second",
                pick(own.requests_per_second, defaults.requests_per_second),
            ),
            ("burst", pick(own.burst, defaults.burst)),
            (
                "max_in_flight",
                pick(own.max_in_flight, defaults.max_in_flight),
            ),
            (
                "per_client.requests_per_second",
                pick(client.requests_per_second, dclient.requests_per_second),
            ),
            ("per_client.burst", pick(client.burst, dclient.burst)),
        ];
        for (key, v) in values {
            if v.is_some_and(|v| v > MAX_LIMIT) {
                return Err((key, format!("must be at most {MAX_LIMIT}")));
            }
        }
        let [(_, rps), (_, burst), (_, in_flight), (_, crps), (_, cburst)] = values;
        // A burst written where no rate is (here or inherited) is a mistake; a burst inherited
        // by a route that lifts the rate (`requests_per_second: 0`) simply goes with it.
        let lifted = |own_rps: Option<u32>| own_rps == Some(0);
        if burst.is_some_and(|b| b > 0)
            && rps.unwrap_or(0) == 0
            && !(own.burst.is_none() && lifted(own.requests_per_second))
        {
            return Err(("burst", "needs requests_per_second".into()));
        }
        if cburst.is_some_and(|b| b > 0)
            && crps.unwrap_or(0) == 0
            && !(client.burst.is_none() && lifted(client.requests_per_second))
        {
            return Err((
                "per_client.burst",
                "needs per_client.requests_per_second".into(),
            ));
        }
        Ok(TenantLimits {
            rate: Rate::of(rps.unwrap_or(0), burst.unwrap_or(0)),
            max_in_flight: NonZeroU32::new(in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT)),
            per_client: Rate::of(crps.unwrap_or(0), cburst.unwrap_or(0)),
        })
    }
}

/// `upstream_health` in `fhir-edge.yaml`: when an upstream node is taken out of rotation and how it
/// comes back.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamHealthSettings {
    /// Consecutive failures (connection refused or reset, timeouts, 502/503/504) that eject a node.
    pub failures: u32,
    /// How long a node is out after its first ejection; each ejection that follows a failed return
    /// doubles it, up to `max_ejection_seconds`.
    pub ejection_seconds: u64,
    pub max_ejection_seconds: u64,
    /// Active checks: `GET {base}/metadata` on every node this often (0: off, the default).
    pub check_interval_seconds: u64,
    /// How long a check may take before it counts as failed.
    pub check_timeout_ms: u64,
}

impl Default for UpstreamHealthSettings {
    fn default() -> Self {
        UpstreamHealthSettings {
            failures: 5,
            ejection_seconds: 10,
            max_ejection_seconds: 300,
            check_interval_seconds: 0,
            check_timeout_ms: 2_000,
        }
    }
}

/// [`UpstreamHealthSettings`], checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    pub failures: NonZeroU32,
    pub ejection: Duration,
    pub max_ejection: Duration,
    /// Active check interval and timeout (`None`: passive health only).
    pub check: Option<(Duration, Duration)>,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        // The settings' defaults are valid.
        HealthPolicy::from_settings(&UpstreamHealthSettings::default()).unwrap_or(HealthPolicy {
            failures: NonZeroU32::MIN,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            check: None,
        })
    }
}

impl HealthPolicy {
    /// Checks the settings; errors name the key.
    pub fn from_settings(
        s: &UpstreamHealthSettings,
    ) -> Result<HealthPolicy, (&'static str, &'static str)> {
        let failures = NonZeroU32::new(s.failures)
            .filter(|f| f.get() <= 1000)
            .ok_or(("failures", "must be between 1 and 1000"))?;
        if !(1..=3600).contains(&s.ejection_seconds) {
            return Err(("ejection_seconds", "must be between 1 and 3600"));
        }
        if s.max_ejection_seconds < s.ejection_seconds || s.max_ejection_seconds > 86_400 {
            return Err((
                "max_ejection_seconds",
                "must be between ejection_seconds and 86400",
            ));
        }
        if s.check_interval_seconds > 3600 {
            return Err(("check_interval_seconds", "must be at most 3600 (0: off)"));
        }
        if !(1..=60_000).contains(&s.check_timeout_ms) {
            return Err(("check_timeout_ms", "must be between 1 and 60000"));
        }
        Ok(HealthPolicy {
            failures,
            ejection: Duration::from_secs(s.ejection_seconds),
            max_ejection: Duration::from_secs(s.max_ejection_seconds),
            check: (s.check_interval_seconds > 0).then(|| {
                (
                    Duration::from_secs(s.check_interval_seconds),
                    Duration::from_millis(s.check_timeout_ms),
                )
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rps: Option<u32>, burst: Option<u32>, inflight: Option<u32>) -> LimitSpec {
        LimitSpec {
            requests_per_second: rps,
            burst,
            max_in_flight: inflight,
            per_client: None,
        }
    }

    #[test]
    fn route_keys_override_defaults_one_by_one() {
        let defaults = spec(Some(100), Some(200), Some(50));
        let l = TenantLimits::resolve(&defaults, Some(&spec(Some(10), None, None))).unwrap();
        assert_eq!(
            l.rate.map(|r| (r.per_second.get(), r.burst.get())),
            Some((10, 200))
        );
        assert_eq!(l.max_in_flight.map(NonZeroU32::get), Some(50));
        // 0 lifts a default; the inherited burst goes with the rate it belongs to.
        let l = TenantLimits::resolve(&defaults, Some(&spec(Some(0), Some(0), Some(0)))).unwrap();
        assert!(!l.any());
        let l = TenantLimits::resolve(&defaults, Some(&spec(Some(0), None, None))).unwrap();
        assert_eq!(l.rate, None);
    }

    #[test]
    fn built_in_defaults_bound_in_flight_only() {
        let l = TenantLimits::resolve(&LimitSpec::default(), None).unwrap();
        assert_eq!(l.rate, None);
        assert_eq!(l.per_client, None);
        assert_eq!(
            l.max_in_flight.map(NonZeroU32::get),
            Some(DEFAULT_MAX_IN_FLIGHT)
        );
        // Burst defaults to one second's worth.
        let l = TenantLimits::resolve(&spec(Some(7), None, None), None).unwrap();
        assert_eq!(l.rate.map(|r| r.burst.get()), Some(7));
    }

    #[test]
    fn refuses_nonsense() {
        let d = LimitSpec::default();
        assert_eq!(
            TenantLimits::resolve(&d, Some(&spec(None, Some(5), None)))
                .unwrap_err()
                .0,
            "burst"
        );
        assert_eq!(
            TenantLimits::resolve(&d, Some(&spec(Some(2_000_000), None, None)))
                .unwrap_err()
                .0,
            "requests_per_second"
        );
        let bad = UpstreamHealthSettings {
            failures: 0,
            ..Default::default()
        };
        assert_eq!(HealthPolicy::from_settings(&bad).unwrap_err().0, "failures");
        assert!(HealthPolicy::default().check.is_none());
    }
}
