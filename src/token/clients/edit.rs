//! The changes made to `clients.yaml`: the `fhir-edge clients …` operations (each one a single atomic
//! [`update_file`]) and the edits of a file's entries that they and the self-service endpoint
//! ([`crate::token::manage`]) make.

use std::path::Path;

use super::super::secrets::{new_client_id, new_secret};
use super::file::{ClientEntry, ClientsFile};
use super::write::update_file;
use crate::time::{format_rfc3339, parse_rfc3339};

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
    use crate::tenant::TenantId;

    #[test]
    fn client_ids_are_v4_uuids() {
        let id = new_client_id().unwrap();
        assert!(TenantId::parse(&id).is_some());
        assert_eq!(&id[14..15], "4");
    }
}
