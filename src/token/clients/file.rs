//! `clients.yaml` as written on disk, and its validation into a [`ClientRegistry`]: the
//! [`Loadable`] impl that the hot-file reloader ([`crate::reload`]) and the writer
//! ([`super::write`]) both use, so a file is accepted or refused as a whole by the same rules.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::super::secrets::parse_hash;
use super::registry::{Allowed, Client, ClientRegistry, Secret};
use crate::config::problems::{whole_file, OrderedMap, Problems, Source};
use crate::reload::Loadable;
use crate::tenant::TenantId;
use crate::time::parse_rfc3339;

/// `clients.yaml` as written on disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientsFile {
    #[serde(default)]
    pub clients: OrderedMap<ClientEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientEntry {
    pub name: String,
    /// Tenant GUIDs, or `["*"]` for every tenant in the routing table.
    pub allowed_tenants: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    #[serde(default)]
    pub secrets: Vec<SecretEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SecretEntry {
    pub id: String,
    /// `sha256:<salt, base64url>:<digest, base64url>`
    pub hash: String,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// What the owner calls this secret (the portal shows it; never a secret itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The longest description a secret may carry, in characters.
pub(crate) const MAX_DESCRIPTION: usize = 100;

/// The comment at the top of every file the writer produces.
pub(crate) const HEADER: &str = "\
# fhir-edge client registry. Managed by `fhir-edge clients ...` and the clients' self-service endpoint,
# which rewrite this file atomically; hand edits are fine too (the file is validated as a whole and
# hot-reloaded). Secrets are stored only as salted SHA-256 digests. Reference: docs/tokens-and-clients.md.
";

impl Loadable for ClientRegistry {
    type Context = ();
    const WHAT: &'static str = "client registry";

    fn from_text(path: &Path, text: &str, _: &()) -> Result<Self, Problems> {
        let mut src = Source::new(path, text);
        if text.trim().is_empty() {
            return Err(whole_file(
                path,
                "file is empty (an empty registry is `clients: {}`)",
            ));
        }
        // The hot files' reader: bounded, duplicate keys refused, values never quoted.
        let file: ClientsFile =
            crate::reload::parse::parse(text).map_err(|e| e.into_problems(path, ""))?;
        let mut clients = HashMap::with_capacity(file.clients.0.len());
        let mut seen_lower = HashSet::new();
        for (id, entry) in &file.clients.0 {
            let key = format!("clients.{id}");
            if !is_token_chars(id, 128) {
                src.at(
                    id,
                    &key,
                    "client ids are 1-128 characters of A-Z a-z 0-9 - _ .",
                );
                continue;
            }
            if !seen_lower.insert(id.to_ascii_lowercase()) {
                src.at(id, &key, "client id appears twice");
                continue;
            }
            match validate_client(id, entry) {
                Ok(c) => {
                    clients.insert(id.clone(), std::sync::Arc::new(c));
                }
                Err((field, message)) => src.at(id, format!("{key}.{field}"), message),
            }
        }
        src.finish()?;
        Ok(ClientRegistry { clients })
    }

    fn summary(&self) -> String {
        format!("{} clients", self.len())
    }
}

/// A registry from the database's entries: an entry the file's rules reject is left out, and named in
/// the second value (the database's constraints and the writers' checks make that rare: a hand edit).
pub(crate) fn registry_from_entries(file: &ClientsFile) -> (ClientRegistry, Vec<String>) {
    let mut clients = HashMap::with_capacity(file.clients.0.len());
    let mut problems = Vec::new();
    for (id, entry) in &file.clients.0 {
        match client_from_entry(id, entry) {
            Ok(c) => {
                clients.insert(id.clone(), std::sync::Arc::new(c));
            }
            Err(m) => problems.push(m),
        }
    }
    (ClientRegistry { clients }, problems)
}

/// One client entry checked by the file's rules (the database's rows are held to them too).
pub(super) fn client_from_entry(id: &str, e: &ClientEntry) -> Result<Client, String> {
    if !is_token_chars(id, 128) {
        return Err(format!(
            "client id `{id}` is not 1-128 characters of A-Z a-z 0-9 - _ ."
        ));
    }
    validate_client(id, e).map_err(|(field, m)| format!("client {id}: {field}: {m}"))
}

fn is_token_chars(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn validate_client(id: &str, e: &ClientEntry) -> Result<Client, (&'static str, String)> {
    if e.name.trim().is_empty() || e.name.len() > 128 || e.name.chars().any(char::is_control) {
        return Err(("name", "must be 1-128 printable characters".into()));
    }
    let allowed = if e.allowed_tenants.iter().any(|t| t == "*") {
        if e.allowed_tenants.len() != 1 {
            return Err(("allowed_tenants", "`*` stands alone".into()));
        }
        Allowed::All
    } else {
        let mut set = HashSet::new();
        for t in &e.allowed_tenants {
            let tenant = TenantId::parse(t)
                .ok_or_else(|| ("allowed_tenants", format!("`{t}` is not a tenant GUID")))?;
            if !set.insert(tenant) {
                return Err(("allowed_tenants", format!("{tenant} is listed twice")));
            }
        }
        if set.is_empty() {
            return Err((
                "allowed_tenants",
                "list tenant GUIDs, or `*` for all".into(),
            ));
        }
        Allowed::Only(set)
    };
    let mut secrets: Vec<Secret> = Vec::with_capacity(e.secrets.len());
    for s in &e.secrets {
        if !is_token_chars(&s.id, 64) {
            return Err((
                "secrets",
                format!("secret id `{}` is not 1-64 of A-Z a-z 0-9 - _ .", s.id),
            ));
        }
        if secrets.iter().any(|o| o.id == s.id) {
            return Err(("secrets", format!("secret id `{}` appears twice", s.id)));
        }
        let (salt, digest) = parse_hash(&s.hash).ok_or_else(|| {
            (
                "secrets",
                format!("secret `{}`: hash is not sha256:<salt>:<digest>", s.id),
            )
        })?;
        let created = parse_rfc3339(&s.created).ok_or_else(|| {
            (
                "secrets",
                format!("secret `{}`: created is not an RFC 3339 time", s.id),
            )
        })?;
        let expires = match &s.expires {
            None => None,
            Some(x) => Some(parse_rfc3339(x).ok_or_else(|| {
                (
                    "secrets",
                    format!("secret `{}`: expires is not an RFC 3339 time", s.id),
                )
            })?),
        };
        if let Some(d) = &s.description {
            if d.chars().count() > MAX_DESCRIPTION || d.chars().any(char::is_control) {
                return Err((
                    "secrets",
                    format!(
                        "secret `{}`: description is over {MAX_DESCRIPTION} characters or has control characters",
                        s.id
                    ),
                ));
            }
        }
        secrets.push(Secret {
            id: s.id.clone(),
            salt,
            digest,
            created,
            expires,
            description: s.description.clone(),
        });
    }
    Ok(Client {
        id: id.to_string(),
        name: e.name.clone(),
        allowed,
        disabled: e.disabled,
        secrets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_registries_are_rejected_whole() {
        for bad in [
            "clients:\n  c1:\n    name: x\n    allowed_tenants: [\"*\", \"145f4184-1b0b-41c7-ba24-b3c1291bfda1\"]\n",
            "clients:\n  c1:\n    name: x\n    allowed_tenants: []\n",
            "clients:\n  c1:\n    name: x\n    allowed_tenants: [\"nope\"]\n",
            "clients:\n  c1:\n    name: x\n    allowed_tenants: [\"*\"]\n    secrets:\n      - {id: a, hash: \"md5:x:y\", created: \"2026-01-01T00:00:00Z\"}\n",
            "clients:\n  c1:\n    name: x\n    allowed_tenants: [\"*\"]\n    colour: red\n",
            "clients:\n  c1:\n    name: x\n    allowed_tenants: [\"*\"]\n  C1:\n    name: y\n    allowed_tenants: [\"*\"]\n",
            "clients:\n  \"bad id\":\n    name: x\n    allowed_tenants: [\"*\"]\n",
            "",
        ] {
            assert!(ClientRegistry::from_text(Path::new("c.yaml"), bad, &()).is_err(), "{bad}");
        }
        assert!(
            ClientRegistry::from_text(Path::new("c.yaml"), "clients: {}\n", &())
                .unwrap()
                .is_empty()
        );
    }
}
