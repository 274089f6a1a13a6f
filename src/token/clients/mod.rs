//! The client registry (`clients.yaml`): who may ask for tokens, for which tenants, with which secrets.
//!
//! Secrets are generated, stored and checked by [`super::secrets`]: only salted digests live here.
//!
//! The file is hot-reloaded like the routing table ([`crate::reload`]); changes (the CLI, the
//! self-service endpoint) go through [`update_file`], so the running proxy (and any concurrent writer)
//! only ever sees a complete, valid file. One concept per file:
//!
//! - [`registry`]: the validated, immutable registry and its lookups (authentication, whether an
//!   issued token still stands, the description shown to operators and clients).
//! - [`file`](mod@file): the file as written on disk and its validation into a registry (the
//!   [`Loadable`](crate::reload::Loadable) impl).
//! - [`write`](mod@write): changing the file: locked read, change, validate, atomic replace.
//! - [`edit`]: the changes themselves: the `fhir-edge clients …` operations and the edits of one
//!   client's entry that they and the self-service endpoint make.

mod edit;
mod file;
mod registry;
mod write;

pub(crate) use super::secrets::new_secret;
pub(crate) use edit::{add_client, remove_client, revoke_secret, rotate, set_disabled, Issued};
pub(crate) use file::SecretEntry;
pub use registry::ClientRegistry;
pub(crate) use write::update_file;
