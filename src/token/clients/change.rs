//! The changes a client registry accepts, whichever store holds it: the `fhir-edge clients …`
//! operations, the self-service endpoint's and an import. Each is applied whole or not at all: to
//! `clients.yaml` by [`super::write::update_file`] (under the file lock), to PostgreSQL in one
//! transaction ([`super::pg`]).

use super::super::secrets::{new_client_id, new_secret};
use super::file::{ClientEntry, ClientsFile, SecretEntry};
use crate::db::DbError;
use crate::time::{format_rfc3339, parse_rfc3339};

/// One change to the registry.
#[derive(Debug, Clone)]
pub(crate) enum Change {
    /// Registers a client (its id must be new).
    AddClient {
        client_id: String,
        entry: ClientEntry,
    },
    /// Adds a secret; with `expire_others_at`, the client's other secrets expire then at the latest.
    AddSecret {
        client_id: String,
        secret: SecretEntry,
        expire_others_at: Option<u64>,
    },
    /// Revokes one secret; with `keep_one`, never the client's last (the self-service rule).
    RevokeSecret {
        client_id: String,
        secret_id: String,
        keep_one: bool,
    },
    SetDisabled {
        client_id: String,
        disabled: bool,
    },
    Remove {
        client_id: String,
    },
    /// Adds every client of `file` (an id present already is refused), or with `replace`, makes the
    /// registry exactly `file`.
    Import {
        file: ClientsFile,
        replace: bool,
    },
}

impl Change {
    /// The one client the change touches (`None`: an import, which may touch every one).
    pub(crate) fn client_id(&self) -> Option<&str> {
        match self {
            Change::AddClient { client_id, .. }
            | Change::AddSecret { client_id, .. }
            | Change::RevokeSecret { client_id, .. }
            | Change::SetDisabled { client_id, .. }
            | Change::Remove { client_id } => Some(client_id),
            Change::Import { .. } => None,
        }
    }
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("no client `{0}`")]
    NoClient(String),
    #[error("no secret `{0}`")]
    NoSecret(String),
    #[error("this is the client's only secret; create a new one before deleting it")]
    LastSecret,
    #[error("client `{0}` exists already")]
    Exists(String),
    #[error("the change would make the registry invalid:\n{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] DbError),
    /// The file store could not be read or written.
    #[error("{0}")]
    File(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        StoreError::Db(DbError::from(e))
    }
}

impl StoreError {
    /// Whether the store could not be reached or may not be written (HTTP 503): not the request's
    /// fault, and worth a retry later.
    pub(crate) fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Db(DbError::Unavailable(_) | DbError::Denied(_) | DbError::Schema(_))
        )
    }
}

/// What `add` and `rotate` hand out once.
pub(crate) struct Issued {
    pub client_id: String,
    pub secret: String,
    pub secret_id: String,
    /// When the secret was made (RFC 3339).
    pub created: String,
}

/// A new client with one secret: the change, and what to show its owner once.
pub(crate) fn new_client(
    name: &str,
    allowed_tenants: Vec<String>,
    now: u64,
) -> Result<(Change, Issued), String> {
    let client_id = new_client_id()?;
    let fresh = new_secret(now, None)?;
    let issued = Issued {
        client_id: client_id.clone(),
        secret: fresh.secret,
        secret_id: fresh.entry.id.clone(),
        created: fresh.entry.created.clone(),
    };
    let entry = ClientEntry {
        name: name.to_string(),
        allowed_tenants,
        disabled: false,
        secrets: vec![fresh.entry],
    };
    Ok((Change::AddClient { client_id, entry }, issued))
}

/// A new secret for `client_id`; with `keep_old`, the others expire that many seconds from now.
pub(crate) fn new_client_secret(
    client_id: &str,
    keep_old: Option<u64>,
    now: u64,
) -> Result<(Change, Issued), String> {
    let fresh = new_secret(now, None)?;
    let issued = Issued {
        client_id: client_id.to_string(),
        secret: fresh.secret,
        secret_id: fresh.entry.id.clone(),
        created: fresh.entry.created.clone(),
    };
    let change = Change::AddSecret {
        client_id: client_id.to_string(),
        secret: fresh.entry,
        expire_others_at: keep_old.map(|d| now.saturating_add(d)),
    };
    Ok((change, issued))
}

impl ClientsFile {
    /// Applies `change` to the file's contents (validation of the result is the writer's).
    pub(crate) fn apply(&mut self, change: Change) -> Result<(), StoreError> {
        match change {
            Change::AddClient { client_id, entry } => {
                if self.position(&client_id).is_some() {
                    return Err(StoreError::Exists(client_id));
                }
                self.clients.0.push((client_id, entry));
            }
            Change::AddSecret {
                client_id,
                secret,
                expire_others_at,
            } => {
                let c = self.get_mut(&client_id)?;
                let id = secret.id.clone();
                c.secrets.push(secret);
                if let Some(at) = expire_others_at {
                    c.expire_others(&id, at);
                }
            }
            Change::RevokeSecret {
                client_id,
                secret_id,
                keep_one,
            } => self
                .get_mut(&client_id)?
                .revoke_secret(&secret_id, keep_one)?,
            Change::SetDisabled {
                client_id,
                disabled,
            } => self.get_mut(&client_id)?.disabled = disabled,
            Change::Remove { client_id } => {
                let i = self
                    .position(&client_id)
                    .ok_or(StoreError::NoClient(client_id))?;
                self.clients.0.remove(i);
            }
            Change::Import { file, replace } => {
                if replace {
                    *self = file;
                } else {
                    for (id, entry) in file.clients.0 {
                        if self.position(&id).is_some() {
                            return Err(StoreError::Exists(id));
                        }
                        self.clients.0.push((id, entry));
                    }
                }
            }
        }
        Ok(())
    }

    fn position(&self, client_id: &str) -> Option<usize> {
        self.clients.0.iter().position(|(id, _)| id == client_id)
    }

    pub(crate) fn get_mut(&mut self, client_id: &str) -> Result<&mut ClientEntry, StoreError> {
        self.clients
            .0
            .iter_mut()
            .find(|(id, _)| id == client_id)
            .map(|(_, c)| c)
            .ok_or_else(|| StoreError::NoClient(client_id.to_string()))
    }
}

impl ClientEntry {
    /// Removes secret `secret_id`; with `keep_one`, refuses to remove the client's last secret.
    pub(crate) fn revoke_secret(
        &mut self,
        secret_id: &str,
        keep_one: bool,
    ) -> Result<(), StoreError> {
        let Some(i) = self.secrets.iter().position(|s| s.id == secret_id) else {
            return Err(StoreError::NoSecret(secret_id.to_string()));
        };
        if keep_one && self.secrets.len() == 1 {
            return Err(StoreError::LastSecret);
        }
        self.secrets.remove(i);
        Ok(())
    }

    /// Sets `expires` to `at` on every other secret that would outlive it.
    pub(crate) fn expire_others(&mut self, keep: &str, at: u64) {
        for s in self.secrets.iter_mut().filter(|s| s.id != keep) {
            let sooner = s
                .expires
                .as_deref()
                .and_then(parse_rfc3339)
                .is_some_and(|e| e <= at);
            if !sooner {
                s.expires = Some(format_rfc3339(at));
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

    #[test]
    fn changes_to_a_file_are_all_or_nothing_per_rule() {
        let mut f = ClientsFile::default();
        let (add, issued) = new_client("Teams", vec!["*".into()], 1_000).unwrap();
        f.apply(add.clone()).unwrap();
        assert!(matches!(f.apply(add), Err(StoreError::Exists(_))));
        let id = issued.client_id.clone();
        let one_secret = Change::RevokeSecret {
            client_id: id.clone(),
            secret_id: issued.secret_id.clone(),
            keep_one: true,
        };
        assert!(matches!(f.apply(one_secret), Err(StoreError::LastSecret)));
        let (rotate, second) = new_client_secret(&id, Some(60), 2_000).unwrap();
        f.apply(rotate).unwrap();
        let c = f.get_mut(&id).unwrap();
        assert_eq!(c.secrets.len(), 2);
        assert_eq!(
            c.secrets[0].expires.as_deref(),
            Some(format_rfc3339(2_060).as_str())
        );
        assert_eq!(c.secrets[1].id, second.secret_id);
        assert!(c.secrets[1].expires.is_none());
        assert!(matches!(
            f.apply(Change::Remove {
                client_id: "nope".into()
            }),
            Err(StoreError::NoClient(_))
        ));
    }
}
