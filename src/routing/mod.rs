//! The routing table: tenant GUID → that tenant's upstream FHIR server.
//!
//! A [`RoutingTable`] is immutable once built. It is built from the text of `routes.yaml` (read by
//! [`crate::reload`], parsed entry by entry through [`crate::config::routes`]), validated as a whole
//! (one bad entry rejects the file: a partly applied table is how tenants go missing or end up on the
//! wrong server), with its upstreams resolved in the way the caller says ([`Resolve`]: DNS happens
//! while loading, never on the request path, or not at all for an offline check), and then published
//! with one `ArcSwap::store`. A request takes one snapshot of its [`Route`] and keeps it for every
//! later phase, so authorisation and upstream choice can never see two different tables.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};

use crate::config::problems::{whole_file, Problems};
use crate::config::routes::RoutesDocument;
use crate::config::RouteDefaults;
use crate::ops::metrics::TenantLabel;
use crate::reload::{parse, Loadable};
use crate::routing::nodes::Upstreams;
use crate::routing::upstream::UpstreamUrl;
use crate::tenant::{GuidText, TenantId};

mod build;
pub(crate) mod limits;
pub(crate) mod nodes;
pub(crate) mod probe;
mod route;
pub(crate) mod upstream;

/// One tenant's route, shared by every request of that tenant while this table is current.
#[derive(Debug)]
pub struct Route {
    pub tenant: TenantId,
    /// Operator-chosen label for logs and metrics (never PHI). A `Box`, not an `Arc`: no counts in
    /// its allocation, which is then the name's length rounded up (16 bytes less per tenant).
    pub name: Box<str>,
    /// The tenant's nodes (one or more). Shared by every tenant whose upstream settings are
    /// identical (built once per table load), so a table of 100,000 tenants on a few servers holds a
    /// few peers. Pooling stays per tenant through [`Route::group_key`], which `upstream_peer` sets
    /// on its copy of the peer.
    pub upstream: Arc<Upstreams>,
    /// Extra headers sent upstream (credentials for the hospital's server, for instance).
    pub upstream_headers: Box<[(HeaderName, HeaderValue)]>,
    pub allow_writes: bool,
    /// Which value this tenant's metric `tenant` labels take ([`Route::label`]): one byte, where a
    /// stored label string took sixteen (and for GUID labels an allocation per tenant).
    label: TenantLabel,
}

impl Route {
    /// This tenant's connection-pool group (see [`group_key`]): computed when asked, a few
    /// multiplications, rather than stored. Like [`Route::label`], and the boxed header list, this
    /// keeps a route at 64 bytes (80 with its `Arc` counts, an allocator size class) instead of 96 (112).
    pub fn group_key(&self) -> u64 {
        group_key(self.tenant)
    }

    /// This tenant's value of metric `tenant` labels (name, GUID or `none`, per
    /// `admin.tenant_label`), made when asked and without allocating.
    pub fn label(&self) -> Label<'_> {
        match self.label {
            TenantLabel::Name => Label::Str(&self.name),
            TenantLabel::Guid => Label::Guid(self.tenant.text()),
            TenantLabel::Off => Label::Str(crate::ops::metrics::NO_TENANT),
        }
    }
}

/// A route's metric label ([`Route::label`]): a `&str` by `Deref`.
pub enum Label<'a> {
    Str(&'a str),
    Guid(GuidText),
}

impl std::ops::Deref for Label<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Label::Str(s) => s,
            Label::Guid(g) => g,
        }
    }
}

/// An immutable, validated routing table.
#[derive(Debug, Default)]
pub struct RoutingTable {
    /// hashbrown's default hasher (foldhash): the keys come from the operator's file, and a request
    /// only looks up a tenant named by a verified token, so SipHash's flooding resistance buys
    /// nothing here, while it was most of a lookup's cost.
    routes: hashbrown::HashMap<TenantId, Arc<Route>>,
    /// Names of the tenants none of whose upstream hosts resolved when this table was built.
    unavailable: Vec<Box<str>>,
    /// Some node's host did not resolve (its tenant may have others that did).
    partly_unresolved: bool,
    /// When the table's host names are due to be resolved again (`None`: no names, or never).
    refresh_at: Option<std::time::Instant>,
}

/// How a table build turns upstream host names into addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// The system resolver (blocking: a table is built off the request path).
    Dns,
    /// No lookups: IP literals are used as written and host names get the unspecified address, so a
    /// file can be checked where its upstreams' names do not resolve (`fhir-edge check --offline`).
    /// Every other check still runs. Such a table is for checking only and must never serve.
    Offline,
}

impl Resolve {
    fn address(self, url: &UpstreamUrl) -> Result<SocketAddr, String> {
        match self {
            Resolve::Dns => url.resolve(),
            Resolve::Offline => {
                let ip = url
                    .host
                    .parse::<IpAddr>()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                Ok(SocketAddr::new(ip, url.port))
            }
        }
    }
}

/// What building a table needs besides the file: the static config's route defaults, and how to
/// resolve upstream host names. `RouteDefaults` converts into it with `Resolve::Dns`.
#[derive(Debug, Clone)]
pub struct TableContext {
    pub defaults: RouteDefaults,
    pub resolve: Resolve,
    /// How long a table whose upstreams include host names serves before it is rebuilt to resolve
    /// them again (`None`: only on edits and SIGHUP).
    pub refresh: Option<std::time::Duration>,
    /// What outlives a table: limiter state and node health.
    pub state: Arc<RoutingState>,
}

/// The state tables hand on to the tables that replace them: each tenant's limiter (while its
/// limits stay the same) and each upstream server's health.
#[derive(Debug)]
pub struct RoutingState {
    pub limiters: limits::LimiterRegistry,
    pub nodes: nodes::NodeRegistry,
}

impl RoutingState {
    /// State for tables built with `health`, without metrics.
    pub fn detached(health: crate::config::limits::HealthPolicy) -> Arc<RoutingState> {
        RoutingState::new(health, None)
    }

    /// State for tables built with `health`, exporting node metrics to `metrics` when given.
    pub(crate) fn new(
        health: crate::config::limits::HealthPolicy,
        metrics: Option<Arc<crate::ops::metrics::Metrics>>,
    ) -> Arc<RoutingState> {
        Arc::new(RoutingState {
            limiters: limits::LimiterRegistry::default(),
            nodes: nodes::NodeRegistry::new(health, metrics),
        })
    }
}

impl TableContext {
    /// A context for checking a file without resolving any host name ([`Resolve::Offline`]).
    pub fn offline(defaults: RouteDefaults) -> TableContext {
        TableContext {
            state: RoutingState::new(defaults.health, None),
            defaults,
            resolve: Resolve::Offline,
            refresh: None,
        }
    }
}

impl From<RouteDefaults> for TableContext {
    fn from(defaults: RouteDefaults) -> TableContext {
        TableContext {
            state: RoutingState::new(defaults.health, None),
            defaults,
            resolve: Resolve::Dns,
            refresh: None,
        }
    }
}

impl Loadable for RoutingTable {
    type Context = TableContext;
    const WHAT: &'static str = "routing table";

    fn from_text(path: &Path, text: &str, ctx: &TableContext) -> Result<Self, Problems> {
        RoutingTable::from_text(path, text, ctx)
    }

    fn summary(&self) -> String {
        match self.unavailable.len() {
            0 => format!("{} tenants", self.len()),
            n => format!(
                "{} tenants, {n} unavailable (host does not resolve)",
                self.len()
            ),
        }
    }

    fn retry(&self) -> bool {
        self.partly_unresolved
            || self
                .refresh_at
                .is_some_and(|at| std::time::Instant::now() >= at)
    }
}

impl RoutingTable {
    /// Tenants (by name) none of whose upstream hosts resolved when this table was built: they are
    /// answered 503 until a rebuild (every poll while any host is unresolved, and on SIGHUP)
    /// resolves them.
    pub fn unavailable(&self) -> &[Box<str>] {
        &self.unavailable
    }

    /// Names of tenants (at most `limit`, in name order) every one of whose nodes is out of
    /// rotation now, and how many more there are.
    pub fn all_nodes_out(&self, limit: usize) -> (Vec<&str>, usize) {
        let mut names: Vec<&str> = self
            .routes
            .values()
            .filter(|r| r.upstream.all_out().is_some())
            .map(|r| &*r.name)
            .collect();
        names.sort_unstable();
        let more = names.len().saturating_sub(limit);
        names.truncate(limit);
        (names, more)
    }

    pub fn get(&self, tenant: &TenantId) -> Option<&Arc<Route>> {
        self.routes.get(tenant)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Builds a table from a file's text, YAML or JSON (`path` is used for messages and relative
    /// `ca_file`s). Each entry is built as the parser reaches it and then dropped, so what a load
    /// holds is the text and the table. Blocking with [`Resolve::Dns`]: upstream host names are
    /// resolved here.
    pub fn from_text(
        path: &Path,
        text: &str,
        ctx: &TableContext,
    ) -> Result<RoutingTable, Problems> {
        Self::from_text_as(parse::Syntax::of(text), path, text, ctx)
    }

    /// [`RoutingTable::from_text`] read in a given syntax: for the fuzz target that reads JSON text
    /// as YAML too, not for the proxy.
    #[doc(hidden)]
    pub fn from_text_as(
        syntax: parse::Syntax,
        path: &Path,
        text: &str,
        ctx: &TableContext,
    ) -> Result<RoutingTable, Problems> {
        if text.trim().is_empty() {
            return Err(whole_file(
                path,
                "file is empty (refusing to drop every tenant)",
            ));
        }
        let mut builder = build::Builder::new(path, text, ctx);
        let mut at = String::new();
        let document = RoutesDocument {
            each: |key: std::borrow::Cow<'_, str>, entry| builder.add(&key, &entry),
            at: &mut at,
        };
        if let Err(e) = parse::parse_seed_as(syntax, text, document) {
            // The parser stops at its first problem; those the builder found before it are
            // reported too.
            let mut problems = builder.problems();
            problems.extend(e.into_problems(path, &at).0);
            return Err(Problems(problems));
        }
        builder.finish()
    }

    /// Every route, in tenant order, with every field (header values too, which `Debug` hides):
    /// for tests and the fuzz targets that compare two tables.
    #[doc(hidden)]
    pub fn describe(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .routes
            .iter()
            .map(|(tenant, r)| {
                let headers: Vec<_> = r
                    .upstream_headers
                    .iter()
                    .map(|(n, v)| format!("{n}={:?}", v.as_bytes()))
                    .collect();
                format!("{tenant} {r:?} {headers:?} {}", &*r.label())
            })
            .collect();
        all.sort();
        all
    }
}

/// One connection-pool group per tenant: Pingora pools upstream connections by address and TLS
/// settings, so without this two tenants on one server would share keep-alive connections.
fn group_key(t: TenantId) -> u64 {
    // Any value stable for the process and distinct per tenant works: a mix of the GUID's two halves
    // (64 bits, so two of 100,000 tenants collide with probability ~3e-10, as with any 64-bit hash;
    // never 0, which the shared peers carry).
    let v = t.to_u128();
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (mix(v as u64) ^ mix((v >> 64) as u64).rotate_left(17)) | 1
}

#[cfg(test)]
mod tests;
