//! TLS listeners' certificates: chosen per handshake by the client's SNI, and hot-reloaded.
//!
//! Each listener has a [`CertStore`], Pingora's rustls acceptor asks it for a certificate at every
//! handshake ([`ResolvesServerCert`]): the pair whose certificate names the SNI host (exactly, or by
//! a `*.` wildcard one label deep), else the listener's default pair. [`CertReloader`] reads the
//! files every [`POLL`] and compares a hash of their contents (a few kilobytes), so cert-manager's
//! symlink swaps, certbot's renames and edits in place are all seen: a changed set that loads and
//! whose keys match their certificates replaces the old one with one atomic swap, so new handshakes
//! use it and open connections are untouched; one that does not is refused, logged and counted, and
//! the old pairs keep serving. Protocol versions are TLS 1.2 and 1.3 (Pingora's rustls settings) with rustls'
//! cipher suites, all AEAD with forward secrecy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::ops::metrics::Metrics;

/// How often the certificate files are looked at.
const POLL: Duration = Duration::from_secs(2);

/// One loaded pair and the names it serves.
#[derive(Debug)]
struct Pair {
    /// Lower-case DNS names from the certificate's subjectAltName (`*.example.org` kept as is).
    names: Vec<String>,
    key: Arc<CertifiedKey>,
    /// The certificate's `notAfter`, Unix seconds.
    not_after: i64,
}

/// A listener's pairs: the default first.
#[derive(Debug)]
pub(crate) struct Certificates {
    pairs: Vec<Pair>,
}

fn load_pair(cert: &PathBuf, key: &PathBuf) -> Result<Pair, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, private, &provider).map_err(|e| {
        format!(
            "{} and {}: not a usable pair ({e})",
            cert.display(),
            key.display()
        )
    })?;
    let end = certified
        .cert
        .first()
        .ok_or_else(|| format!("{}: no certificate in it", cert.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(end.as_ref())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    let not_after = parsed.validity().not_after.timestamp();
    drop(parsed);
    Ok(Pair {
        names,
        key: Arc::new(certified),
        not_after,
    })
}

impl Certificates {
    /// Loads `(certificate chain, key)` PEM pairs, the default first: every pair must load and its
    /// key must match its certificate.
    pub(crate) fn load(pairs: &[(PathBuf, PathBuf)]) -> Result<Certificates, String> {
        let pairs = pairs
            .iter()
            .map(|(c, k)| load_pair(c, k))
            .collect::<Result<Vec<_>, _>>()?;
        if pairs.is_empty() {
            return Err("no certificate".into());
        }
        Ok(Certificates { pairs })
    }

    /// The pair for `sni`: an exact name, then a wildcard one label deep, then the default.
    fn choose(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(host) = sni.map(str::to_ascii_lowercase) {
            let wildcard = host.split_once('.').map(|(_, rest)| format!("*.{rest}"));
            let found = self
                .pairs
                .iter()
                .find(|p| p.names.contains(&host))
                .or_else(|| {
                    wildcard.and_then(|w| self.pairs.iter().find(|p| p.names.contains(&w)))
                });
            if let Some(p) = found {
                return Some(p.key.clone());
            }
        }
        self.pairs.first().map(|p| p.key.clone())
    }
}

/// A listener's certificates, as the handshakes see them.
#[derive(Debug)]
pub(crate) struct CertStore {
    /// The listener, for logs and metric labels (from the config, never from a client).
    pub label: String,
    pairs: Vec<(PathBuf, PathBuf)>,
    current: ArcSwap<Certificates>,
}

impl CertStore {
    pub(crate) fn open(label: String, pairs: Vec<(PathBuf, PathBuf)>) -> Result<CertStore, String> {
        let current = ArcSwap::from_pointee(Certificates::load(&pairs)?);
        Ok(CertStore {
            label,
            pairs,
            current,
        })
    }

    /// The earliest `notAfter` of the pairs now served.
    fn expiry(&self) -> i64 {
        self.current
            .load()
            .pairs
            .iter()
            .map(|p| p.not_after)
            .min()
            .unwrap_or(0)
    }

    /// A hash of every file's contents.
    fn fingerprint(&self) -> Option<[u8; 32]> {
        let mut h = Sha256::new();
        for (c, k) in &self.pairs {
            h.update(std::fs::read(c).ok()?);
            h.update(std::fs::read(k).ok()?);
        }
        Some(h.finalize().into())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load().choose(hello.server_name())
    }
}

/// Reloads every TLS listener's certificates when their files change.
pub(crate) struct CertReloader {
    pub stores: Vec<Arc<CertStore>>,
    pub metrics: Arc<Metrics>,
}

impl CertReloader {
    fn publish_expiry(&self, store: &CertStore) {
        self.metrics
            .tls_expiry
            .with_label_values(&[&store.label])
            .set(store.expiry());
    }

    /// Looks at one store: reloads when its files' contents changed.
    fn check(&self, store: &CertStore, seen: &mut Option<[u8; 32]>) {
        let Some(now) = store.fingerprint() else {
            // A file is missing for a moment (a rename in progress): look again next time.
            return;
        };
        if seen.as_ref() == Some(&now) {
            return;
        }
        let result = match Certificates::load(&store.pairs) {
            Ok(c) => {
                store.current.store(Arc::new(c));
                log::info!("TLS {}: certificates reloaded", store.label);
                self.publish_expiry(store);
                "applied"
            }
            Err(e) => {
                log::error!(
                    "TLS {}: new certificates refused, the old ones keep serving: {e}",
                    store.label
                );
                "rejected"
            }
        };
        self.metrics
            .tls_reloads
            .with_label_values(&[&store.label, result])
            .inc();
        *seen = Some(now);
    }
}

#[async_trait]
impl BackgroundService for CertReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut seen: Vec<Option<[u8; 32]>> = self.stores.iter().map(|s| s.fingerprint()).collect();
        for s in &self.stores {
            self.publish_expiry(s);
        }
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(POLL) => {
                    for (store, seen) in self.stores.iter().zip(seen.iter_mut()) {
                        self.check(store, seen);
                    }
                }
            }
        }
    }
}
