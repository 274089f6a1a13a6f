//! A trusted token issuer: its current keys, what its tokens may grant, and where the tenant is read.
//!
//! An issuer speaks only for its tenants: a token naming a tenant outside the issuer's list is refused
//! (403) whatever its signature, so one hospital's identity provider can never mint access to another
//! hospital. The tenant comes from the verified token only: from its scopes (`scope`, or `scp`), or
//! from a named claim (`tenant_claim`, e.g. Entra ID's `tid`).

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use arc_swap::{ArcSwap, Guard};
use prometheus::IntCounter;

use super::claims::Claims;
use super::keys::{Key, KeySet};
use super::remote::Remote;
use super::scope::tenant_in;
use super::AuthFailure;
use crate::config::settings::ScopeClaim;
use crate::tenant::TenantId;

/// Request-path counters of one issuer (attached once the metrics exist).
pub(crate) struct IssuerCounters {
    /// Refetches caused by a token with an unknown kid.
    pub refetches: IntCounter,
    /// Tokens refused for a kid the issuer's keys do not hold.
    pub refusals: IntCounter,
}

pub(crate) struct Issuer {
    /// The exact `iss` of its tokens.
    pub iss: String,
    /// Its name in metrics and logs.
    pub label: String,
    pub audience: String,
    /// fhir-edge's own token endpoint: its tokens are also checked against the client registry.
    pub own: bool,
    /// The tenants it may grant; `None`: any.
    pub tenants: Option<HashSet<TenantId>>,
    pub scope_claim: ScopeClaim,
    pub tenant_claim: Option<String>,
    /// Keys from configuration files: always part of the key set.
    fixed: Vec<Key>,
    keys: ArcSwap<KeySet>,
    /// Where fetched keys come from, and the fetcher's state.
    pub remote: Option<Remote>,
    pub counters: OnceLock<IssuerCounters>,
}

/// What an issuer is, apart from its keys.
pub(crate) struct IssuerSpec {
    pub iss: String,
    pub label: String,
    pub audience: String,
    pub own: bool,
    pub tenants: Option<HashSet<TenantId>>,
    pub scope_claim: ScopeClaim,
    pub tenant_claim: Option<String>,
}

impl Issuer {
    /// An issuer with the keys from its files (checked: unique kids), and fetched keys to come if
    /// `remote`.
    pub(crate) fn new(
        spec: IssuerSpec,
        fixed: Vec<Key>,
        remote: Option<Remote>,
    ) -> Result<Issuer, String> {
        let set = KeySet::new(fixed.clone())?;
        Ok(Issuer {
            iss: spec.iss,
            label: spec.label,
            audience: spec.audience,
            own: spec.own,
            tenants: spec.tenants,
            scope_claim: spec.scope_claim,
            tenant_claim: spec.tenant_claim,
            fixed,
            keys: ArcSwap::from_pointee(set),
            remote,
            counters: OnceLock::new(),
        })
    }

    /// The current keys.
    pub(crate) fn keys(&self) -> Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// Replaces the fetched keys (the file keys stay). A key keeps its record of use across sets.
    pub(crate) fn set_fetched(&self, fetched: Vec<Key>) -> Result<(), String> {
        let current = self.keys.load();
        let mut all = self.fixed.clone();
        for mut k in fetched {
            if let Some(old) = k.kid.as_deref().and_then(|kid| {
                current
                    .keys()
                    .iter()
                    .find(|o| o.kid.as_deref() == Some(kid))
            }) {
                k.last_used = old.last_used.clone();
            }
            all.push(k);
        }
        let set = KeySet::new(all)?;
        self.keys.store(Arc::new(set));
        Ok(())
    }

    /// The fetched keys (not from files) used to verify a token since `since` (Unix seconds).
    pub(crate) fn fetched_kids_used_since(&self, since: u64) -> Vec<String> {
        let fixed: Vec<&str> = self.fixed.iter().filter_map(|k| k.kid.as_deref()).collect();
        self.keys
            .load()
            .keys()
            .iter()
            .filter(|k| k.last_used.load(std::sync::atomic::Ordering::Relaxed) >= since)
            .filter_map(|k| k.kid.clone())
            .filter(|kid| !fixed.contains(&kid.as_str()))
            .collect()
    }

    /// The tenant a verified token of this issuer grants.
    pub(crate) fn tenant(&self, claims: &Claims) -> Result<TenantId, AuthFailure> {
        let tenant = match &self.tenant_claim {
            Some(name) => claims
                .others
                .get(name)
                .and_then(serde_json::Value::as_str)
                .and_then(TenantId::parse),
            None => match self.scope_claim {
                ScopeClaim::Scope => claims.scope.as_deref().and_then(tenant_in),
                ScopeClaim::Scp => claims.scp.as_deref().and_then(tenant_in),
            },
        }
        .ok_or(AuthFailure::NoTenant)?;
        match &self.tenants {
            Some(allowed) if !allowed.contains(&tenant) => Err(AuthFailure::IssuerTenant),
            _ => Ok(tenant),
        }
    }

    pub(crate) fn count_refusal(&self) {
        if let Some(c) = self.counters.get() {
            c.refusals.inc();
        }
    }
}
