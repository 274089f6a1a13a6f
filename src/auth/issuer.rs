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
    /// Who it is and what its tokens may grant.
    pub spec: IssuerSpec,
    /// Keys from configuration files: always part of the key set.
    fixed: Vec<Key>,
    keys: ArcSwap<KeySet>,
    /// Where fetched keys come from, and the fetcher's state.
    pub remote: Option<Remote>,
    pub counters: OnceLock<IssuerCounters>,
}

/// What an issuer is, apart from its keys.
pub(crate) struct IssuerSpec {
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
            spec,
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
        let tenant = match &self.spec.tenant_claim {
            Some(name) => claims
                .others
                .get(name)
                .and_then(serde_json::Value::as_str)
                .and_then(TenantId::parse),
            None => match self.spec.scope_claim {
                ScopeClaim::Scope => claims.scope.as_deref().and_then(tenant_in),
                ScopeClaim::Scp => claims.scp.as_deref().and_then(tenant_in),
            },
        }
        .ok_or(AuthFailure::NoTenant)?;
        match &self.spec.tenants {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::claims::strict_object;

    const A: &str = "145f4184-1b0b-41c7-ba24-b3c1291bfda1";
    const B: &str = "3c2f9d6e-8a41-4b7e-9f0d-2a6c5e1b7d34";

    fn issuer(
        tenants: Option<&[&str]>,
        scope_claim: ScopeClaim,
        tenant_claim: Option<&str>,
    ) -> Issuer {
        let spec = IssuerSpec {
            iss: "i".into(),
            label: "i".into(),
            audience: "a".into(),
            own: false,
            tenants: tenants.map(|l| l.iter().filter_map(|t| TenantId::parse(t)).collect()),
            scope_claim,
            tenant_claim: tenant_claim.map(Into::into),
        };
        Issuer::new(spec, Vec::new(), None).unwrap()
    }

    fn claims(json: &str) -> Claims {
        let m = strict_object(json.as_bytes(), 8).unwrap();
        Claims::from_members(m).unwrap()
    }

    #[test]
    fn an_issuer_grants_only_its_tenants() {
        let i = issuer(Some(&[A]), ScopeClaim::Scope, None);
        assert_eq!(
            i.tenant(&claims(&format!(r#"{{"scope":"{A}"}}"#))),
            Ok(TenantId::parse(A).unwrap())
        );
        assert_eq!(
            i.tenant(&claims(&format!(r#"{{"scope":"{B}"}}"#))),
            Err(AuthFailure::IssuerTenant)
        );
        let any = issuer(None, ScopeClaim::Scope, None);
        assert!(any
            .tenant(&claims(&format!(r#"{{"scope":"{B}"}}"#)))
            .is_ok());
    }

    #[test]
    fn the_tenant_comes_from_the_configured_claim_only() {
        let scp = issuer(None, ScopeClaim::Scp, None);
        assert!(scp
            .tenant(&claims(&format!(r#"{{"scp":["x.read","{A}"]}}"#)))
            .is_ok());
        assert_eq!(
            scp.tenant(&claims(&format!(r#"{{"scope":"{A}"}}"#))),
            Err(AuthFailure::NoTenant),
            "an scp issuer does not read scope"
        );
        let tid = issuer(Some(&[B]), ScopeClaim::Scope, Some("tid"));
        assert!(tid
            .tenant(&claims(&format!(r#"{{"tid":"{B}","scope":"{A}"}}"#)))
            .is_ok());
        assert_eq!(
            tid.tenant(&claims(&format!(r#"{{"scope":"{B}"}}"#))),
            Err(AuthFailure::NoTenant)
        );
        assert_eq!(
            tid.tenant(&claims(&format!(r#"{{"tid":["{B}"]}}"#))),
            Err(AuthFailure::NoTenant)
        );
        assert_eq!(
            tid.tenant(&claims(&format!(r#"{{"tid":"{A}"}}"#))),
            Err(AuthFailure::IssuerTenant)
        );
    }
}
