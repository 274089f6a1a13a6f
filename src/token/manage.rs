//! Client self-service: a client regenerates its secret and deletes old ones, authenticated with its own
//! current credentials (HTTP Basic). The Teams document asks for exactly this ("the app can re-generate
//! the secret and invalidate or delete the old secret"); the shape follows RFC 7592 (OAuth 2.0 Dynamic
//! Client Registration Management), with secrets as a sub-resource so several can overlap:
//!
//! - `GET    {base}/register/{client_id}` — the client's configuration, secrets listed without values;
//! - `POST   {base}/register/{client_id}/secrets` — a new secret, shown once (201);
//! - `DELETE {base}/register/{client_id}/secrets/{secret_id}` — revoke a secret, including the one used
//!   to authenticate; the last remaining secret cannot be deleted (409), so a client cannot lock itself
//!   out.
//!
//! Changes are written to `clients.yaml` atomically ([`super::clients::update_file`]) and published at
//! once; tokens minted with a deleted secret stop working from the next request.

use std::net::IpAddr;

use bytes::Bytes;
use http::{HeaderMap, Method};
use serde_json::json;

use super::clients::{new_secret, update_file, ClientRegistry};
use super::endpoint::{basic_candidates, Credentials, TokenService};
use crate::outcome::OAuthError;

/// Which management resource a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resource {
    Client(String),
    Secrets(String),
    Secret(String, String),
}

/// Parses the path below the management path (`/{client_id}[/secrets[/{secret_id}]]`).
pub(crate) fn parse(rest: &[u8]) -> Option<Resource> {
    let rest = std::str::from_utf8(rest).ok()?.strip_prefix('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && !s.bytes().all(|b| b == b'.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [id] if ok(id) => Some(Resource::Client(id.to_string())),
        [id, "secrets"] if ok(id) => Some(Resource::Secrets(id.to_string())),
        [id, "secrets", sid] if ok(id) && ok(sid) => {
            Some(Resource::Secret(id.to_string(), sid.to_string()))
        }
        _ => None,
    }
}

/// A successful management response.
pub(crate) struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl TokenService {
    /// Handles one management request (blocking: it may write `clients.yaml`).
    pub(crate) fn manage(
        &self,
        method: &Method,
        resource: &Resource,
        headers: &HeaderMap,
        source: Option<IpAddr>,
        now: u64,
    ) -> Result<Reply, OAuthError> {
        let (Resource::Client(id) | Resource::Secrets(id) | Resource::Secret(id, _)) = resource;
        let id = id.as_str();
        let allow = match resource {
            Resource::Client(_) => "GET",
            Resource::Secrets(_) => "POST",
            Resource::Secret(..) => "DELETE",
        };
        if method.as_str() != allow {
            return Err(OAuthError::MethodNotAllowed { allow });
        }
        let candidates =
            basic_candidates(headers)?.ok_or(OAuthError::InvalidClient { basic: true })?;
        let creds = Credentials {
            candidates,
            basic: true,
        };
        let registry = self.clients.load();
        let (client_id, _) = self.authenticate_client(&registry, &creds, source, now)?;
        // A client manages itself only; another id answers exactly like bad credentials.
        if client_id != id {
            return Err(OAuthError::InvalidClient { basic: true });
        }
        match resource {
            Resource::Client(_) => describe_self(&registry, id, now),
            Resource::Secrets(_) => self.add_secret(id, now),
            Resource::Secret(_, secret_id) => self.delete_secret(id, secret_id),
        }
    }

    /// `POST .../secrets`: a new secret for client `id`, shown once.
    fn add_secret(&self, id: &str, now: u64) -> Result<Reply, OAuthError> {
        let fresh = new_secret(now, None).map_err(server_error)?;
        let entry = fresh.entry.clone();
        update_file(&self.settings.clients_file, |f| {
            f.get_mut(id)?.secrets.push(entry);
            Ok(())
        })
        .map_err(server_error)?;
        // Written whole and renamed into place under the lock: no settle check needed, and
        // the new secret works as soon as this reply is sent.
        self.clients.reload(false, false);
        Ok(Reply {
            status: 201,
            body: Bytes::from(
                json!({
                    "client_id": id,
                    "client_secret": fresh.secret,
                    "client_secret_id": fresh.entry.id,
                    "client_secret_expires_at": 0,
                    "created": fresh.entry.created,
                })
                .to_string(),
            ),
        })
    }

    /// `DELETE .../secrets/{secret_id}`: revokes one of client `id`'s secrets, never its last.
    fn delete_secret(&self, id: &str, secret_id: &str) -> Result<Reply, OAuthError> {
        let mut last = false;
        let mut missing = false;
        let result = update_file(&self.settings.clients_file, |f| {
            let c = f.get_mut(id)?;
            if !c.secrets.iter().any(|s| s.id == secret_id) {
                missing = true;
                return Err("no such secret".into());
            }
            c.revoke_secret(secret_id, true)
                .inspect_err(|_| last = true)
        });
        match result {
            Ok(()) => {}
            Err(_) if missing => return Err(OAuthError::NotFound),
            Err(_) if last => {
                return Err(OAuthError::Conflict(
                    "This is the client's only secret; create a new one before deleting it.",
                ))
            }
            Err(e) => return Err(server_error(e)),
        }
        self.clients.reload(false, false);
        Ok(Reply {
            status: 204,
            body: Bytes::new(),
        })
    }
}

/// `GET {base}/register/{client_id}`: the client's configuration, in RFC 7591 names.
fn describe_self(registry: &ClientRegistry, id: &str, now: u64) -> Result<Reply, OAuthError> {
    let client = registry
        .get(id)
        .ok_or(OAuthError::InvalidClient { basic: true })?;
    let mut config = client.describe(now);
    // RFC 7591 names for what a client reads about itself.
    config["client_name"] = config["name"].take();
    config["grant_types"] = json!(["client_credentials"]);
    config["token_endpoint_auth_methods"] = json!(["client_secret_basic", "client_secret_post"]);
    if let Some(o) = config.as_object_mut() {
        o.remove("name");
    }
    Ok(Reply {
        status: 200,
        body: Bytes::from(config.to_string()),
    })
}

fn server_error(e: String) -> OAuthError {
    log::error!("client registry update failed: {e}");
    OAuthError::ServerError
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn management_paths() {
        assert_eq!(parse(b"/abc-1"), Some(Resource::Client("abc-1".into())));
        assert_eq!(
            parse(b"/abc/secrets"),
            Some(Resource::Secrets("abc".into()))
        );
        assert_eq!(
            parse(b"/abc/secrets/s-1"),
            Some(Resource::Secret("abc".into(), "s-1".into()))
        );
        for bad in [
            &b""[..],
            b"/",
            b"/abc/",
            b"/abc/other",
            b"/abc/secrets/",
            b"/a b",
            b"/abc/secrets/x/y",
            b"/../x",
            b"/..",
        ] {
            assert_eq!(parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
