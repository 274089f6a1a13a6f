//! The PostgreSQL database that a fleet of fhir-edge replicas shares (the `database` section): how to
//! reach it, a small pool for writes, one dedicated connection for `LISTEN`, and the schema's versioned
//! migrations ([`migrate`]).
//!
//! The connection URL is a secret (it carries the password): it is read from an environment variable
//! or a file, never from the config itself, and it appears in no log line, error or `Debug` output.
//! TLS follows the URL's `sslmode` (`disable`, `prefer`, `require`); when TLS is used the server's
//! certificate and host name are always verified (rustls), against the system's roots or the
//! `ca_file` given.

pub(crate) mod migrate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The validated `database` section.
#[derive(Clone)]
pub(crate) struct DbConfig {
    /// The parsed URL (host, port, user, password, database, `sslmode`).
    pub pg: tokio_postgres::Config,
    /// Where the URL came from, for messages (`env FHIR_EDGE_DATABASE_URL`, `file /run/…`).
    pub source: String,
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    pub query_timeout: Duration,
}

impl std::fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it carries the password.
        f.debug_struct("DbConfig")
            .field("source", &self.source)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

impl DbConfig {
    /// Reads the URL from `url_file` or the environment variable `url_env` and checks it. Messages
    /// never quote the URL.
    pub(crate) fn read_url(
        url_env: &str,
        url_file: Option<&Path>,
    ) -> Result<(tokio_postgres::Config, String), String> {
        let (text, source) = match url_file {
            Some(p) => (
                std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read {}: {}", p.display(), e.kind()))?,
                format!("file {}", p.display()),
            ),
            None => (
                std::env::var(url_env).map_err(|_| {
                    format!("the environment variable {url_env} (the database URL) is not set")
                })?,
                format!("env {url_env}"),
            ),
        };
        let pg: tokio_postgres::Config = text
            .trim()
            .parse()
            .map_err(|_| format!("the database URL in {source} is not a PostgreSQL URL or key=value string (postgresql://user:password@host:port/db?sslmode=require)"))?;
        if pg.get_hosts().is_empty() {
            return Err(format!("the database URL in {source} names no host"));
        }
        Ok((pg, source))
    }

    /// A short description for logs: host, port and database, never the user's password.
    pub(crate) fn describe(&self) -> String {
        let host = match self.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        format!(
            "postgres {host}:{port}/{} (URL from {})",
            self.pg.get_dbname().unwrap_or("?"),
            self.source
        )
    }

    fn with_timeouts(&self) -> tokio_postgres::Config {
        let mut pg = self.pg.clone();
        pg.connect_timeout(self.connect_timeout);
        pg.application_name("fhir-edge");
        // The server ends a statement that runs away; the client-side timeouts bound the rest.
        pg.options(format!(
            "-c statement_timeout={}",
            self.query_timeout.as_millis()
        ));
        pg
    }

    /// The TLS connector: rustls with verification, against `ca_file` or the system's roots.
    fn tls(&self) -> Result<MakeRustlsConnect, DbError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                use rustls::pki_types::pem::PemObject;
                let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
                    .map_err(|e| DbError::Config(format!("ca_file {}: {e}", path.display())))?;
                for c in certs {
                    let c =
                        c.map_err(|e| DbError::Config(format!("ca_file {}: {e}", path.display())))?;
                    roots
                        .add(c)
                        .map_err(|e| DbError::Config(format!("ca_file {}: {e}", path.display())))?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    // A system root rustls cannot use is skipped, as every rustls client does.
                    let _ = roots.add(c);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| DbError::Config(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    /// One connection whose driver runs on the current runtime until the connection ends.
    /// Notifications (`LISTEN`) are passed to `notices` when given.
    pub(crate) async fn connect(
        &self,
        notices: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    ) -> Result<tokio_postgres::Client, DbError> {
        let tls = self.tls()?;
        let (client, mut connection) = tokio::time::timeout(
            self.connect_timeout + Duration::from_secs(1),
            self.with_timeouts().connect(tls),
        )
        .await
        .map_err(|_| DbError::Unavailable("connecting timed out".into()))?
        .map_err(DbError::from)?;
        tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                        if let Some(tx) = &notices {
                            if tx.send(n.payload().to_string()).is_err() {
                                break;
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        log::warn!("database connection ended: {}", DbError::from(e));
                        break;
                    }
                    None => break,
                }
            }
        });
        Ok(client)
    }

    /// As [`DbConfig::connect`], to a database whose schema this build can use
    /// ([`migrate::check`]).
    pub(crate) async fn connect_checked(
        &self,
        notices: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    ) -> Result<tokio_postgres::Client, DbError> {
        let client = self.connect(notices).await?;
        migrate::check(&client).await?;
        Ok(client)
    }

    /// A small pool of connections for writes.
    pub(crate) fn pool(&self) -> Result<Pool, DbError> {
        let manager = Manager::from_config(
            self.with_timeouts(),
            self.tls()?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(manager)
            .max_size(self.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.connect_timeout))
            .create_timeout(Some(self.connect_timeout))
            .recycle_timeout(Some(self.connect_timeout))
            .build()
            .map_err(|e| DbError::Config(format!("pool: {e}")))
    }
}

/// Runs `f` on a runtime of its own: for work before Pingora's runtimes exist (start-up) or outside
/// them (the command line).
pub(crate) fn block_on<R, E: From<DbError>>(
    f: impl std::future::Future<Output = Result<R, E>>,
) -> Result<R, E> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| E::from(DbError::Config(format!("cannot start a runtime: {e}"))))?
        .block_on(f)
}

/// Why a database operation failed, in the terms callers act on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DbError {
    /// The database cannot be reached or did not answer in time: retry later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The role may not do this (a read-only role asked to write).
    #[error("the database role lacks a privilege: {0}")]
    Denied(String),
    /// The schema is missing, too old or too new for this build.
    #[error("{0}")]
    Schema(String),
    #[error("database settings: {0}")]
    Config(String),
    /// Anything else the server refused (a constraint, a serialisation failure after retries).
    #[error("the database refused the change: {0}")]
    Refused(String),
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> DbError {
        // The server's message names tables and constraints, never a parameter's value (all values are
        // bound parameters), so it is safe to log.
        match e.as_db_error() {
            Some(db) => {
                let code = db.code();
                let text = format!("{} ({})", db.message(), code.code());
                if code == &SqlState::INSUFFICIENT_PRIVILEGE
                    || code == &SqlState::READ_ONLY_SQL_TRANSACTION
                {
                    DbError::Denied(text)
                } else if code == &SqlState::UNDEFINED_TABLE {
                    DbError::Schema(format!(
                        "the database has no fhir-edge schema ({text}); run `fhir-edge db migrate`"
                    ))
                } else if code.code().starts_with("08")
                    || code.code().starts_with("57")
                    || code.code().starts_with("53")
                    || code == &SqlState::INVALID_PASSWORD
                    || code == &SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                    || code == &SqlState::INVALID_CATALOG_NAME
                {
                    DbError::Unavailable(text)
                } else {
                    DbError::Refused(text)
                }
            }
            // I/O, TLS, a closed connection, a timeout: the database is out of reach. The causes
            // (a refused connection, an untrusted certificate) say what to fix.
            None => {
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    text.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                DbError::Unavailable(text)
            }
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> DbError {
        match e {
            deadpool_postgres::PoolError::Backend(e) => DbError::from(e),
            other => DbError::Unavailable(other.to_string()),
        }
    }
}
