//! The client registry (`clients.yaml`): who may ask for tokens, for which tenants, with which secrets.
//!
//! Secrets are generated, stored and checked by [`super::secrets`]: only salted digests live here.

//! The file is hot-reloaded like the routing table ([`crate::reload`]). Changes (the CLI, the
//! self-service endpoint) go through [`update_file`]: under an exclusive lock, read, change, validate the
//! whole result, write a temporary file, fsync, rename over the original, fsync the directory, so the
//! running proxy (and any concurrent writer) only ever sees a complete, valid file.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::secrets::{self, parse_hash, SALT_LEN};
pub(crate) use super::secrets::{new_client_id, new_secret};
use crate::config::problems::{whole_file, OrderedMap, Problems, Source};
use crate::reload::Loadable;
use crate::tenant::TenantId;
use crate::time::{format_rfc3339, parse_rfc3339};

// ---------------------------------------------------------------------------------------------
// File format.

/// `clients.yaml` as written on disk.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientsFile {
    #[serde(default)]
    pub clients: OrderedMap<ClientEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SecretEntry {
    pub id: String,
    /// `sha256:<salt, base64url>:<digest, base64url>`
    pub hash: String,
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

const HEADER: &str = "\
# fhir-edge client registry. Managed by `fhir-edge clients ...` and the clients' self-service endpoint,
# which rewrite this file atomically; hand edits are fine too (the file is validated as a whole and
# hot-reloaded). Secrets are stored only as salted SHA-256 digests. Reference: docs/tokens-and-clients.md.
";

// ---------------------------------------------------------------------------------------------
// The validated registry.

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
    salt: [u8; SALT_LEN],
    digest: [u8; 32],
    pub created: u64,
    pub expires: Option<u64>,
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

/// The validated, immutable registry.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    clients: HashMap<String, Client>,
}

impl ClientRegistry {
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    pub fn get(&self, client_id: &str) -> Option<&Client> {
        self.clients.get(client_id)
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
        let Some(client) = self.clients.get(client_id) else {
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

    /// Clients in a stable order, for listing.
    pub fn sorted(&self) -> Vec<&Client> {
        let mut v: Vec<&Client> = self.clients.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        v
    }
}

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
                    clients.insert(id.clone(), c);
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
        secrets.push(Secret {
            id: s.id.clone(),
            salt,
            digest,
            created,
            expires,
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

// ---------------------------------------------------------------------------------------------
// Changing the file.

/// Reads `path` (a missing file counts as an empty registry), applies `change`, validates the whole
/// result and replaces the file atomically, all under an exclusive lock on `<path>.lock`.
pub(crate) fn update_file<R>(
    path: &Path,
    change: impl FnOnce(&mut ClientsFile) -> Result<R, String>,
) -> Result<R, String> {
    let lock_path = sibling(path, ".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
    let mut file: ClientsFile = match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => serde_yaml_ng::from_str(&text)
            .map_err(|e| format!("{} does not parse: {e}", path.display()))?,
        Ok(_) => ClientsFile::default(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => ClientsFile::default(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let result = change(&mut file)?;
    let body = serde_yaml_ng::to_string(&file).map_err(|e| format!("cannot serialise: {e}"))?;
    let text = format!("{HEADER}{body}");
    // Never write a file the proxy would reject.
    ClientRegistry::from_text(path, &text, &())
        .map_err(|p| format!("the change would make the registry invalid:\n{p}"))?;
    write_atomically(path, text.as_bytes())?;
    drop(lock);
    Ok(result)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Temp file in the same directory, fsync, rename over `path`, fsync the directory.
fn write_atomically(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = sibling(path, &format!(".tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

// ---------------------------------------------------------------------------------------------
// Operations (the `fhir-edge clients …` CLI; each one is a single atomic update of the file).

/// What `add` and `rotate` hand out once.
pub(crate) struct Issued {
    pub client_id: String,
    pub secret: String,
    pub secret_id: String,
}

/// Registers a new client with one secret.
pub(crate) fn add_client(
    path: &Path,
    name: &str,
    allowed_tenants: Vec<String>,
    now: u64,
) -> Result<Issued, String> {
    let client_id = new_client_id()?;
    let fresh = new_secret(now, None)?;
    let entry = ClientEntry {
        name: name.to_string(),
        allowed_tenants,
        disabled: false,
        secrets: vec![fresh.entry.clone()],
    };
    let id = client_id.clone();
    update_file(path, move |f| {
        f.clients.0.push((id, entry));
        Ok(())
    })?;
    Ok(Issued {
        client_id,
        secret: fresh.secret,
        secret_id: fresh.entry.id,
    })
}

/// Adds a new secret. With `keep_old`, the client's other secrets expire that many seconds from now;
/// without, they keep working until revoked.
pub(crate) fn rotate(
    path: &Path,
    client_id: &str,
    keep_old: Option<u64>,
    now: u64,
) -> Result<Issued, String> {
    let fresh = new_secret(now, None)?;
    let entry = fresh.entry.clone();
    update_file(path, |f| {
        let c = f.get_mut(client_id)?;
        c.secrets.push(entry.clone());
        if let Some(d) = keep_old {
            c.expire_others(&entry.id, now.saturating_add(d));
        }
        Ok(())
    })?;
    Ok(Issued {
        client_id: client_id.to_string(),
        secret: fresh.secret,
        secret_id: fresh.entry.id,
    })
}

/// Revokes one secret at once (the operator may remove a client's last secret).
pub(crate) fn revoke_secret(path: &Path, client_id: &str, secret_id: &str) -> Result<(), String> {
    update_file(path, |f| {
        f.get_mut(client_id)?.revoke_secret(secret_id, false)
    })
}

pub(crate) fn set_disabled(path: &Path, client_id: &str, disabled: bool) -> Result<(), String> {
    update_file(path, |f| {
        f.get_mut(client_id)?.disabled = disabled;
        Ok(())
    })
}

pub(crate) fn remove_client(path: &Path, client_id: &str) -> Result<(), String> {
    update_file(path, |f| f.remove(client_id))
}

impl ClientsFile {
    pub(crate) fn get_mut(&mut self, client_id: &str) -> Result<&mut ClientEntry, String> {
        self.clients
            .0
            .iter_mut()
            .find(|(id, _)| id == client_id)
            .map(|(_, c)| c)
            .ok_or_else(|| format!("no client `{client_id}`"))
    }

    pub(crate) fn remove(&mut self, client_id: &str) -> Result<(), String> {
        let before = self.clients.0.len();
        self.clients.0.retain(|(id, _)| id != client_id);
        if self.clients.0.len() == before {
            return Err(format!("no client `{client_id}`"));
        }
        Ok(())
    }
}

impl ClientEntry {
    /// Removes secret `secret_id`; with `keep_one`, refuses to remove the client's last secret.
    pub(crate) fn revoke_secret(&mut self, secret_id: &str, keep_one: bool) -> Result<(), String> {
        let Some(i) = self.secrets.iter().position(|s| s.id == secret_id) else {
            return Err(format!("no secret `{secret_id}`"));
        };
        if keep_one && self.secrets.len() == 1 {
            return Err(
                "this is the client's only secret; create a new one before deleting it".into(),
            );
        }
        self.secrets.remove(i);
        Ok(())
    }

    /// Sets `expires = now + keep_old` on every other secret that would outlive it.
    pub(crate) fn expire_others(&mut self, keep: &str, expires: u64) {
        for s in self.secrets.iter_mut().filter(|s| s.id != keep) {
            let sooner = s
                .expires
                .as_deref()
                .and_then(parse_rfc3339)
                .is_some_and(|e| e <= expires);
            if !sooner {
                s.expires = Some(format_rfc3339(expires));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "145f4184-1b0b-41c7-ba24-b3c1291bfda1";

    fn registry_with(secret: &super::super::secrets::NewSecret, extra: &str) -> ClientRegistry {
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
        r.clients.get_mut("c1").unwrap().secrets[0].expires = Some(1_500);
        assert!(r.authenticate("c1", s.secret.as_bytes(), 1_499).is_some());
        assert!(r.authenticate("c1", s.secret.as_bytes(), 1_500).is_none());
    }

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

    #[test]
    fn client_ids_are_v4_uuids() {
        let id = new_client_id().unwrap();
        assert!(TenantId::parse(&id).is_some());
        assert_eq!(&id[14..15], "4");
    }

    #[test]
    fn update_file_writes_atomically_and_refuses_invalid_results() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clients.yaml");
        let s = new_secret(1_000, None).unwrap();
        let entry = s.entry.clone();
        update_file(&path, |f| {
            f.clients.0.push((
                "c1".into(),
                ClientEntry {
                    name: "Teams".into(),
                    allowed_tenants: vec!["*".into()],
                    disabled: false,
                    secrets: vec![entry],
                },
            ));
            Ok(())
        })
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# fhir-edge client registry"));
        assert!(!text.contains(&s.secret), "the secret itself was written");
        let r = ClientRegistry::from_text(&path, &text, &()).unwrap();
        assert!(r.authenticate("c1", s.secret.as_bytes(), 2_000).is_some());
        // A change that would make the file invalid is refused and the file is untouched.
        let e = update_file(&path, |f| {
            f.get_mut("c1")?.allowed_tenants = vec![];
            Ok(())
        })
        .unwrap_err();
        assert!(e.contains("invalid"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
}
