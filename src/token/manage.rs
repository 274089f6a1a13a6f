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
//! Changes go to the client registry's store (`clients.yaml`, or PostgreSQL for a fleet: every replica
//! within a second) and are published on this replica before the answer; tokens minted with a
//! deleted secret stop working from the next request. A store that cannot be written answers 503.

use std::net::IpAddr;

use bytes::Bytes;
use http::{HeaderMap, Method};
use serde_json::json;

use super::clients::change::new_client_secret;
use super::clients::{Change, ClientRegistry, StoreError};
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
    /// Handles one management request.
    pub(crate) async fn manage(
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
        if self.clients.not_ready().is_some() {
            return Err(OAuthError::Unavailable);
        }
        let client_id = {
            let registry = self.clients.load();
            let (client_id, _) = self.authenticate_client(&registry, &creds, source, now)?;
            client_id
        };
        // A client manages itself only; another id answers exactly like bad credentials.
        if client_id != id {
            return Err(OAuthError::InvalidClient { basic: true });
        }
        match resource {
            Resource::Client(_) => describe_self(&self.clients.load(), id, now),
            Resource::Secrets(_) => self.add_secret(id, now).await,
            Resource::Secret(_, secret_id) => self.delete_secret(id, secret_id).await,
        }
    }

    /// `POST .../secrets`: a new secret for client `id`, shown once.
    async fn add_secret(&self, id: &str, now: u64) -> Result<Reply, OAuthError> {
        let (change, issued) = new_client_secret(id, None, now).map_err(|e| {
            log::error!("cannot generate a secret: {e}");
            OAuthError::ServerError
        })?;
        self.clients.apply(change).await.map_err(store_error)?;
        // The store has published the change: the new secret works as soon as this reply is sent.
        Ok(Reply {
            status: 201,
            body: Bytes::from(
                json!({
                    "client_id": id,
                    "client_secret": issued.secret,
                    "client_secret_id": issued.secret_id,
                    "client_secret_expires_at": 0,
                    "created": issued.created,
                })
                .to_string(),
            ),
        })
    }

    /// `DELETE .../secrets/{secret_id}`: revokes one of client `id`'s secrets, never its last.
    async fn delete_secret(&self, id: &str, secret_id: &str) -> Result<Reply, OAuthError> {
        let change = Change::RevokeSecret {
            client_id: id.to_string(),
            secret_id: secret_id.to_string(),
            keep_one: true,
        };
        self.clients.apply(change).await.map_err(store_error)?;
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

/// The answer to a change the store did not make.
fn store_error(e: StoreError) -> OAuthError {
    match e {
        StoreError::NoSecret(_) => OAuthError::NotFound,
        StoreError::LastSecret => OAuthError::Conflict(
            "This is the client's only secret; create a new one before deleting it.",
        ),
        // Removed by another replica or an operator after this request authenticated.
        StoreError::NoClient(_) => OAuthError::InvalidClient { basic: true },
        e if e.is_unavailable() => OAuthError::Unavailable,
        e => {
            log::error!("client registry update failed: {e}");
            OAuthError::ServerError
        }
    }
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
