//! The client registry: who may ask for tokens, for which tenants, with which secrets.
//!
//! Secrets are generated, stored and checked by [`super::secrets`]: only salted digests are kept,
//! in the file and in the database alike. One concept per file:
//!
//! - [`registry`]: the validated, immutable registry and its lookups (authentication, whether an
//!   issued token still stands, the description shown to operators and clients).
//! - [`file`](mod@file): `clients.yaml` as written on disk and the rules every client is held to,
//!   whichever store it comes from (the [`Loadable`](crate::reload::Loadable) impl).
//! - [`change`]: the changes a registry accepts (the CLI's, the self-service endpoint's, an import).
//! - [`store`]: where the registry lives, `clients.yaml` or PostgreSQL, and the one way to change it.
//! - [`write`](mod@write): changing the file: locked read, change, validate, atomic replace.
//! - [`pg`]: the registry's tables: reading them and changing them in one transaction.
//! - [`sync`]: a replica's snapshot of the database, kept current by `LISTEN`/`NOTIFY`.

pub(crate) mod change;
pub(crate) mod file;
pub(crate) mod pg;
mod registry;
pub(crate) mod store;
pub(crate) mod sync;
mod write;

pub(crate) use change::{Change, Issued, StoreError};
pub(crate) use file::{registry_from_entries, ClientsFile, SecretEntry};
pub use registry::ClientRegistry;
pub(crate) use registry::{Allowed, Client};
pub(crate) use store::{ClientStore, StoreConfig};
pub(crate) use write::{apply_to_file, read_file};
