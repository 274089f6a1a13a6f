//! The validated, immutable client registry and its lookups: authenticating a client's secret,
//! whether a token issued earlier still stands, and a client's description for operators and for the
//! client itself.
//!
//! A registry is built only by validating the file ([`super::file`]); nothing here changes one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::super::secrets::{self, SALT_LEN};
use crate::tenant::TenantId;
use crate::time::format_rfc3339;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    All,
    Only(HashSet<TenantId>),
}

impl Allowed {
    pub fn permits(&self, t: &TenantId) -> bool {
        match self {
            Allowed::All => true,
            Allowed::Only(set) => set.contains(t),
        }
    }
}

#[derive(Debug)]
pub struct Secret {
    pub id: String,
    pub(super) salt: [u8; SALT_LEN],
    pub(super) digest: [u8; 32],
    pub created: u64,
    pub expires: Option<u64>,
    pub description: Option<String>,
}

impl Secret {
    pub fn is_live(&self, now: u64) -> bool {
        self.expires.is_none_or(|e| now < e)
    }
}

#[derive(Debug)]
pub struct Client {
    pub id: String,
    pub name: String,
    pub allowed: Allowed,
    pub disabled: bool,
    pub secrets: Vec<Secret>,
}

impl Client {
    /// The client as JSON for operators and for the client itself: never a secret value.
    pub fn describe(&self, now: u64) -> serde_json::Value {
        let tenants: Vec<String> = match &self.allowed {
            Allowed::All => vec!["*".into()],
            Allowed::Only(set) => {
                let mut v: Vec<String> = set.iter().map(ToString::to_string).collect();
                v.sort();
                v
            }
        };
        let secrets: Vec<serde_json::Value> = self
            .secrets
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id,
                    "created": format_rfc3339(s.created),
                    "expires": s.expires.map(format_rfc3339),
                    "live": s.is_live(now),
                })
            })
            .collect();
        serde_json::json!({
            "client_id": self.id,
            "name": self.name,
            "disabled": self.disabled,
            "allowed_tenants": tenants,
            "secrets": secrets,
        })
    }
}

/// The validated, immutable registry. Clients are shared between registries, so a registry that
/// differs from another in one client (`with_client`) costs a map of pointers.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    pub(super) clients: HashMap<String, Arc<Client>>,
}

impl ClientRegistry {
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Every client, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Client> {
        self.clients.values().map(|c| &**c)
    }

    pub fn get(&self, client_id: &str) -> Option<&Client> {
        self.clients.get(client_id).map(|c| &**c)
    }

    /// The client and the secret that `secret` matches, if the client exists, is enabled and the
    /// secret is live. Every stored secret of the client is compared (and one dummy for an unknown
    /// client), in constant time, whatever matches.
    pub fn authenticate(
        &self,
        client_id: &str,
        secret: &[u8],
        now: u64,
    ) -> Option<(&Client, &Secret)> {
        let Some(client) = self.get(client_id) else {
            secrets::matches_nothing(secret);
            return None;
        };
        let mut found = None;
        for s in &client.secrets {
            if secrets::matches(&s.salt, &s.digest, secret) {
                found = Some(s);
            }
        }
        if client.disabled {
            return None;
        }
        found.filter(|s| s.is_live(now)).map(|s| (client, s))
    }

    /// Whether a token minted for `client_id` with secret `secret_id` for `tenant` still stands: the
    /// client exists and is enabled, the secret has not been revoked, and the tenant is still allowed.
    pub fn token_stands(&self, client_id: &str, secret_id: &str, tenant: &TenantId) -> bool {
        self.clients.get(client_id).is_some_and(|c| {
            !c.disabled && c.allowed.permits(tenant) && c.secrets.iter().any(|s| s.id == secret_id)
        })
    }

    /// This registry with client `id` replaced by `client`, or removed when `client` is `None`.
    pub(crate) fn with_client(&self, id: &str, client: Option<Client>) -> ClientRegistry {
        let mut clients = self.clients.clone();
        match client {
            Some(c) => {
                clients.insert(id.to_string(), Arc::new(c));
            }
            None => {
                clients.remove(id);
            }
        }
        ClientRegistry { clients }
    }

    /// Clients in a stable order, for listing.
    pub fn sorted(&self) -> Vec<&Client> {
        let mut v: Vec<&Client> = self.clients.values().map(|c| &**c).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        v
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::super::secrets::new_secret;
    use super::*;
    use crate::reload::Loadable;

    const T: &str = "145f4184-1b0b-41c7-ba24-b3c1291bfda1";

    fn registry_with(secret: &secrets::NewSecret, extra: &str) -> ClientRegistry {
        let text = format!(
            "clients:\n  c1:\n    name: Teams\n    allowed_tenants: [\"{T}\"]\n{extra}    secrets:\n      - id: {}\n        hash: \"{}\"\n        created: \"{}\"\n",
            secret.entry.id, secret.entry.hash, secret.entry.created
        );
        ClientRegistry::from_text(Path::new("clients.yaml"), &text, &()).unwrap()
    }

    #[test]
    fn a_generated_secret_authenticates_and_nothing_else_does() {
        let s = new_secret(1_000, None).unwrap();
        assert!(s.secret.len() >= 47);
        let r = registry_with(&s, "");
        let (c, sec) = r.authenticate("c1", s.secret.as_bytes(), 2_000).unwrap();
        assert_eq!(
            (c.id.as_str(), sec.id.as_str()),
            ("c1", s.entry.id.as_str())
        );
        assert!(r.authenticate("c1", b"wrong", 2_000).is_none());
        assert!(r.authenticate("c2", s.secret.as_bytes(), 2_000).is_none());
        assert!(r.token_stands("c1", &s.entry.id, &TenantId::parse(T).unwrap()));
        assert!(!r.token_stands("c1", "other", &TenantId::parse(T).unwrap()));
        assert!(!r.token_stands(
            "c1",
            &s.entry.id,
            &TenantId::parse("00000000-0000-0000-0000-000000000001").unwrap()
        ));
    }

    #[test]
    fn an_unknown_client_costs_the_same_digest_work_as_a_known_one() {
        let s = new_secret(1_000, None).unwrap();
        let r = registry_with(&s, "");
        let work = |id: &str| {
            let before = secrets::digests_so_far();
            assert!(r.authenticate(id, b"fes_wrong", 2_000).is_none());
            secrets::digests_so_far() - before
        };
        assert_eq!(work("c1"), 1);
        assert_eq!(work("no-such-client"), 1);
    }

    #[test]
    fn disabled_clients_and_expired_secrets_do_not_authenticate() {
        let s = new_secret(1_000, None).unwrap();
        let r = registry_with(&s, "    disabled: true\n");
        assert!(r.authenticate("c1", s.secret.as_bytes(), 2_000).is_none());
        assert!(!r.token_stands("c1", &s.entry.id, &TenantId::parse(T).unwrap()));
        let s = new_secret(1_000, Some(1_500)).unwrap();
        let mut r = registry_with(&s, "");
        // expires is stored; re-read it from the entry
        Arc::get_mut(r.clients.get_mut("c1").unwrap())
            .unwrap()
            .secrets[0]
            .expires = Some(1_500);
        assert!(r.authenticate("c1", s.secret.as_bytes(), 1_499).is_some());
        assert!(r.authenticate("c1", s.secret.as_bytes(), 1_500).is_none());
    }
}
