//! Keys fetched from an issuer: a JWK Set URL, or the one an OpenID Provider's metadata names.
//!
//! One background task per issuer keeps its keys current ([`KeyRefresher`]): it fetches at once (after
//! taking the last good set from `cache_file`, if there is one), then again when `Cache-Control:
//! max-age` says (clamped to the configured bounds), after a failure every `retry_seconds`, and when
//! a token names a kid the keys do not hold: at most once per `unknown_kid_interval_seconds`, and such
//! a request waits at most `unknown_kid_wait_ms` for that fetch ([`Remote::unknown_kid`]). No other
//! request ever waits on a fetch.
//!
//! A fetch is bounded (timeouts, `max_bytes`, `max_keys`, JSON depth), follows no redirect, uses no
//! proxy, and takes `https` only unless the test-only `allow_http` is set. What it brings is used only
//! if it holds usable keys, and not if it drops every fetched key that verified a token in the last
//! hour, until the issuer has served such sets for `hold_back_seconds`. Otherwise the last good set
//! stays: an outage of the issuer, or garbage from it, changes nothing for tokens signed with known
//! keys.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jsonwebtoken::Algorithm;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::{watch, Notify};

use super::issuer::Issuer;
use super::keys::{read_jwks, JwksOrigin};
use crate::config::settings::FetchSettings;
use crate::ops::metrics::Metrics;

/// How long a key counts as in use after it verified a token.
const IN_USE: u64 = 3_600;

/// Where an issuer's keys are fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    JwksUri(String),
    /// OpenID Provider metadata: its `issuer` must be the configured one; its `jwks_uri` is fetched.
    Discovery(String),
}

/// An issuer's remote key source and the fetcher's state.
pub(crate) struct Remote {
    pub source: Source,
    pub fetch: FetchSettings,
    /// The only CAs trusted for the fetch (PEM), else the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    pub cache_file: Option<PathBuf>,
    /// The issuer's allowed algorithms.
    pub allowed: Vec<Algorithm>,
    /// Bumped after every fetch, successful or not: what unknown-kid requests wait for.
    generation: watch::Sender<u64>,
    wake: Notify,
    /// When the last unknown-kid refetch was asked for.
    last_unknown: Mutex<Option<Instant>>,
    in_flight: AtomicBool,
    /// Unix seconds of the last fetch that brought a usable set (0: never).
    pub last_success: AtomicU64,
    /// Since when the issuer serves sets that would drop every key in use.
    held_back_since: Mutex<Option<Instant>>,
}

impl Remote {
    pub(crate) fn new(
        source: Source,
        fetch: FetchSettings,
        ca_pem: Option<Vec<u8>>,
        cache_file: Option<PathBuf>,
        allowed: Vec<Algorithm>,
    ) -> Remote {
        Remote {
            source,
            fetch,
            ca_pem,
            cache_file,
            allowed,
            generation: watch::Sender::new(0),
            wake: Notify::new(),
            last_unknown: Mutex::new(None),
            in_flight: AtomicBool::new(false),
            last_success: AtomicU64::new(0),
            held_back_since: Mutex::new(None),
        }
    }

    /// A token named a kid the keys do not hold. Asks for a refetch unless one was asked for within
    /// the interval; returns what to wait for (at most `unknown_kid_wait_ms`) when a fetch is coming
    /// or under way, `None` when the request should be refused now.
    pub(crate) fn unknown_kid(
        &self,
        counters: Option<&super::issuer::IssuerCounters>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let mut done = self.generation.subscribe();
        let now = Instant::now();
        let interval = Duration::from_secs(self.fetch.unknown_kid_interval_seconds);
        {
            let mut last = self.last_unknown.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_none_or(|t| now.duration_since(t) >= interval) {
                *last = Some(now);
                self.wake.notify_one();
                if let Some(c) = counters {
                    c.refetches.inc();
                }
            } else if !self.in_flight.load(Ordering::Acquire) {
                return None;
            }
        }
        let wait = Duration::from_millis(self.fetch.unknown_kid_wait_ms);
        Some(async move {
            let _ = tokio::time::timeout(wait, done.changed()).await;
        })
    }

    fn client(&self) -> Result<reqwest::Client, String> {
        let f = &self.fetch;
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(f.connect_timeout_ms))
            .timeout(Duration::from_millis(f.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .https_only(!f.allow_http)
            .user_agent(concat!("fhir-edge/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &self.ca_pem {
            b = b.tls_built_in_root_certs(false);
            for c in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())? {
                b = b.add_root_certificate(c);
            }
        }
        b.build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }
}

/// Why a fetch brought nothing usable; [`FetchError::label`] is the metric's `result`.
#[derive(Debug)]
pub(crate) enum FetchError {
    Timeout,
    Connect(String),
    Status(u16),
    TooLarge,
    Invalid(String),
    IssuerMismatch(String),
    Empty,
    HeldBack,
    Other(String),
}

impl FetchError {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            FetchError::Timeout => "timeout",
            FetchError::Connect(_) => "connect",
            FetchError::Status(_) => "http_status",
            FetchError::TooLarge => "too_large",
            FetchError::Invalid(_) => "invalid",
            FetchError::IssuerMismatch(_) => "issuer_mismatch",
            FetchError::Empty => "empty",
            FetchError::HeldBack => "held_back",
            FetchError::Other(_) => "error",
        }
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Timeout => f.write_str("timed out"),
            FetchError::Connect(e) => write!(f, "cannot connect: {e}"),
            FetchError::Status(s) => write!(f, "answered HTTP {s}"),
            FetchError::TooLarge => f.write_str("the response is larger than fetch.max_bytes"),
            FetchError::Invalid(e) => write!(f, "{e}"),
            FetchError::IssuerMismatch(e) => write!(f, "{e}"),
            FetchError::Empty => f.write_str("the key set holds no usable key"),
            FetchError::HeldBack => f.write_str(
                "the key set drops every key that verified a token in the last hour; held back",
            ),
            FetchError::Other(e) => write!(f, "{e}"),
        }
    }
}

fn request_error(e: reqwest::Error) -> FetchError {
    if e.is_timeout() {
        FetchError::Timeout
    } else if e.is_connect() {
        FetchError::Connect(e.to_string())
    } else {
        FetchError::Other(e.to_string())
    }
}

/// One bounded GET: the body and the `max-age` the response asks for.
async fn get(
    client: &reqwest::Client,
    url: &str,
    max: usize,
) -> Result<(Vec<u8>, Option<u32>), FetchError> {
    let mut resp = client
        .get(url)
        .header(http::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(request_error)?;
    if !resp.status().is_success() {
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(FetchError::TooLarge);
    }
    let max_age = pingora_cache::cache_control::CacheControl::from_headers_named(
        "cache-control",
        resp.headers(),
    )
    .and_then(|cc| {
        if cc.no_store() || cc.no_cache() {
            Some(0)
        } else {
            cc.max_age().ok().flatten()
        }
    });
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(request_error)? {
        if body.len() + chunk.len() > max {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, max_age))
}

/// What a fetch brought: the key set's text, its keys, the warnings about keys left out, and the
/// `max-age` of the key set's response.
pub(crate) struct Fetched {
    pub text: Vec<u8>,
    pub keys: Vec<super::keys::Key>,
    pub warnings: Vec<String>,
    pub max_age: Option<u32>,
}

/// Fetches the issuer's key set once (through its metadata, for `discovery`) and reads it.
pub(crate) async fn fetch(
    issuer: &Issuer,
    client: &reqwest::Client,
) -> Result<Fetched, FetchError> {
    let Some(remote) = &issuer.remote else {
        return Err(FetchError::Other("no remote key source".into()));
    };
    let max = remote.fetch.max_bytes;
    let jwks_uri = match &remote.source {
        Source::JwksUri(u) => u.clone(),
        Source::Discovery(u) => {
            let (body, _) = get(client, u, max).await?;
            jwks_uri_from_metadata(&body, &issuer.spec.iss, remote.fetch.allow_http)?
        }
    };
    let (text, max_age) = get(client, &jwks_uri, max).await?;
    let read = read_jwks(
        &text,
        &remote.allowed,
        JwksOrigin::Remote,
        remote.fetch.max_keys,
    )
    .map_err(FetchError::Invalid)?;
    if read.keys.is_empty() {
        return Err(FetchError::Empty);
    }
    Ok(Fetched {
        text,
        keys: read.keys,
        warnings: read.warnings,
        max_age,
    })
}

/// The `jwks_uri` of OpenID Provider metadata whose `issuer` is exactly `iss` (OpenID Connect
/// Discovery §4.3).
fn jwks_uri_from_metadata(body: &[u8], iss: &str, allow_http: bool) -> Result<String, FetchError> {
    let meta = super::claims::strict_object(body, 8)
        .map_err(|e| FetchError::Invalid(format!("the provider metadata is not valid: {e}")))?;
    match meta.get("issuer").and_then(serde_json::Value::as_str) {
        Some(i) if i == iss => {}
        Some(i) => {
            return Err(FetchError::IssuerMismatch(format!(
                "the provider metadata names issuer `{i}`, not the configured `{iss}`"
            )))
        }
        None => {
            return Err(FetchError::Invalid(
                "the provider metadata has no `issuer`".into(),
            ))
        }
    }
    let uri = meta
        .get("jwks_uri")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| FetchError::Invalid("the provider metadata has no `jwks_uri`".into()))?;
    if !(uri.starts_with("https://") || allow_http && uri.starts_with("http://")) {
        return Err(FetchError::Invalid(format!(
            "the provider metadata's jwks_uri `{uri}` is not https"
        )));
    }
    Ok(uri.to_string())
}

/// Installs a fetched set unless it would drop every key in use (until that has persisted for
/// `hold_back_seconds`).
fn apply(issuer: &Issuer, remote: &Remote, fetched: &Fetched) -> Result<(), FetchError> {
    let now = crate::time::now_unix();
    let in_use = issuer.fetched_kids_used_since(now.saturating_sub(IN_USE));
    let drops_all = !in_use.is_empty()
        && !fetched
            .keys
            .iter()
            .any(|k| k.kid.as_ref().is_some_and(|kid| in_use.contains(kid)));
    {
        let mut since = remote
            .held_back_since
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if drops_all {
            let first = *since.get_or_insert_with(Instant::now);
            if first.elapsed() < Duration::from_secs(remote.fetch.hold_back_seconds) {
                return Err(FetchError::HeldBack);
            }
        }
        *since = None;
    }
    issuer
        .set_fetched(fetched.keys.clone())
        .map_err(FetchError::Invalid)?;
    remote.last_success.store(now, Ordering::Relaxed);
    Ok(())
}

/// Takes the last good set from `cache_file`, if there is one and it is usable.
fn load_cache(issuer: &Issuer, remote: &Remote, path: &Path) {
    let Ok(text) = std::fs::read(path) else {
        return;
    };
    let read = match read_jwks(
        &text,
        &remote.allowed,
        JwksOrigin::Remote,
        remote.fetch.max_keys,
    ) {
        Ok(r) if !r.keys.is_empty() => r,
        Ok(_) | Err(_) => {
            log::warn!(
                "issuer {}: cache_file {} holds no usable key set; ignored",
                issuer.spec.label,
                path.display()
            );
            return;
        }
    };
    match issuer.set_fetched(read.keys) {
        Ok(()) => log::info!(
            "issuer {}: {} keys from cache_file {}",
            issuer.spec.label,
            issuer.keys().len(),
            path.display()
        ),
        Err(e) => log::warn!("issuer {}: cache_file ignored: {e}", issuer.spec.label),
    }
}

/// The background service that keeps every remote issuer's keys current.
pub(crate) struct KeyRefresher {
    pub issuers: Vec<Arc<Issuer>>,
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl BackgroundService for KeyRefresher {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut tasks = Vec::new();
        for issuer in &self.issuers {
            let (issuer, metrics, shutdown) =
                (issuer.clone(), self.metrics.clone(), shutdown.clone());
            tasks.push(tokio::spawn(refresh(issuer, metrics, shutdown)));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// One issuer's refresh loop, until shutdown.
async fn refresh(issuer: Arc<Issuer>, metrics: Arc<Metrics>, mut shutdown: ShutdownWatch) {
    let Some(remote) = &issuer.remote else {
        return;
    };
    if let Some(path) = &remote.cache_file {
        load_cache(&issuer, remote, path);
    }
    let client = match remote.client() {
        Ok(c) => c,
        Err(e) => {
            log::error!(
                "issuer {}: {e}; its keys will not be fetched",
                issuer.spec.label
            );
            return;
        }
    };
    let f = &remote.fetch;
    loop {
        remote.in_flight.store(true, Ordering::Release);
        let outcome = fetch(&issuer, &client).await;
        let next =
            match outcome.and_then(|fetched| apply(&issuer, remote, &fetched).map(|()| fetched)) {
                Ok(fetched) => {
                    for w in &fetched.warnings {
                        log::warn!("issuer {}: {w}", issuer.spec.label);
                    }
                    log::info!(
                        "issuer {}: {} keys fetched",
                        issuer.spec.label,
                        issuer.keys().len()
                    );
                    metrics.jwks_fetch(&issuer.spec.label, "ok");
                    if let Some(path) = &remote.cache_file {
                        if let Err(e) = crate::atomic_file::write_atomically(path, &fetched.text) {
                            log::warn!("issuer {}: cache_file: {e}", issuer.spec.label);
                        }
                    }
                    let max_age = fetched.max_age.map_or(f.min_refresh_seconds, u64::from);
                    Duration::from_secs(max_age.clamp(f.min_refresh_seconds, f.max_refresh_seconds))
                }
                Err(e) => {
                    log::warn!(
                        "issuer {}: key fetch failed ({e}); the last good keys stay in use",
                        issuer.spec.label
                    );
                    metrics.jwks_fetch(&issuer.spec.label, e.label());
                    Duration::from_secs(f.retry_seconds)
                }
            };
        remote.in_flight.store(false, Ordering::Release);
        remote.generation.send_modify(|g| *g += 1);
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(next) => {}
            _ = remote.wake.notified() => {}
        }
    }
}

/// Fetches every remote issuer's keys once, for `fhir-edge check`: how many usable keys each has.
pub(crate) fn check_fetch(issuers: &[Arc<Issuer>]) -> Vec<(String, Result<usize, String>)> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return vec![("runtime".into(), Err(e.to_string()))],
    };
    rt.block_on(async {
        let mut out = Vec::new();
        for issuer in issuers {
            let Some(remote) = &issuer.remote else {
                continue;
            };
            let result = match remote.client() {
                Ok(client) => fetch(issuer, &client)
                    .await
                    .map(|f| f.keys.len())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            out.push((issuer.spec.label.clone(), result));
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::issuer::IssuerSpec;
    use crate::config::settings::ScopeClaim;

    fn fetched(kid: &str) -> Fetched {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/keys/rs256-noalg-jwks.json");
        let text = std::fs::read_to_string(path)
            .unwrap()
            .replace("\"entra-rs\"", &format!("\"{kid}\""));
        let read = read_jwks(text.as_bytes(), &[Algorithm::RS256], JwksOrigin::Remote, 10).unwrap();
        Fetched {
            text: text.into_bytes(),
            keys: read.keys,
            warnings: read.warnings,
            max_age: None,
        }
    }

    fn issuer(hold_back_seconds: u64) -> Issuer {
        let fetch = FetchSettings {
            hold_back_seconds,
            ..FetchSettings::default()
        };
        let remote = Remote::new(
            Source::JwksUri("https://idp.test/keys".into()),
            fetch,
            None,
            None,
            vec![Algorithm::RS256],
        );
        let spec = IssuerSpec {
            iss: "https://idp.test".into(),
            label: "idp".into(),
            audience: "a".into(),
            own: false,
            tenants: None,
            scope_claim: ScopeClaim::Scope,
            tenant_claim: None,
        };
        Issuer::new(spec, Vec::new(), Some(remote)).unwrap()
    }

    #[test]
    fn a_set_dropping_every_key_in_use_is_held_back_until_it_persists() {
        let i = issuer(3_600);
        let r = i.remote.as_ref().unwrap();
        apply(&i, r, &fetched("old")).unwrap();
        // Unused keys may go: a set without them is applied at once.
        apply(&i, r, &fetched("other")).unwrap();
        apply(&i, r, &fetched("old")).unwrap();
        i.keys().keys()[0].mark_used(crate::time::now_unix());
        assert!(matches!(
            apply(&i, r, &fetched("new")),
            Err(FetchError::HeldBack)
        ));
        assert_eq!(
            i.keys().keys()[0].kid.as_deref(),
            Some("old"),
            "the old key stays"
        );
        // A set that keeps the key in use is applied, and clears the hold.
        let mut both = fetched("new");
        both.keys.extend(fetched("old").keys);
        apply(&i, r, &both).unwrap();
        assert_eq!(i.keys().len(), 2);

        let quick = issuer(0);
        let r = quick.remote.as_ref().unwrap();
        apply(&quick, r, &fetched("old")).unwrap();
        quick.keys().keys()[0].mark_used(crate::time::now_unix());
        apply(&quick, r, &fetched("new")).unwrap();
        assert_eq!(
            quick.keys().keys()[0].kid.as_deref(),
            Some("new"),
            "persisted long enough"
        );
    }

    #[test]
    fn discovery_must_name_the_configured_issuer_exactly() {
        let meta = br#"{"issuer":"https://idp.test/realms/a","jwks_uri":"https://idp.test/certs"}"#;
        assert_eq!(
            jwks_uri_from_metadata(meta, "https://idp.test/realms/a", false).ok(),
            Some("https://idp.test/certs".to_string())
        );
        for iss in ["https://idp.test/realms/a/", "https://idp.test/realms/b"] {
            assert!(matches!(
                jwks_uri_from_metadata(meta, iss, false),
                Err(FetchError::IssuerMismatch(_))
            ));
        }
        let http = br#"{"issuer":"i","jwks_uri":"http://idp.test/certs"}"#;
        assert!(jwks_uri_from_metadata(http, "i", false).is_err());
        assert!(jwks_uri_from_metadata(http, "i", true).is_ok());
        let twice = br#"{"issuer":"i","issuer":"j","jwks_uri":"https://x/"}"#;
        assert!(jwks_uri_from_metadata(twice, "i", false).is_err());
    }
}
