//! Building a table one entry at a time, in file order, as the parser hands entries over: the
//! table-wide checks (a tenant or a name used twice, no tenants at all) and the upstreams shared by
//! tenants whose entries agree on everything an upstream is built from.

use std::borrow::Cow;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

use crate::config::limits::TenantLimits;
use crate::config::problems::{Problem, Problems, Source};
use crate::config::routes::TenantEntry;
use crate::routing::nodes::{Balance, Upstreams};
use crate::routing::{route, Resolve, Route, RoutingTable, TableContext};
use crate::tenant::TenantId;

/// The fewest bytes a tenant's entry can take in either syntax (its GUID key alone is 36): bounds the
/// room reserved for the table from a count taken from the text, whatever the text holds.
const MIN_ENTRY_BYTES: usize = 48;

/// Validates and builds a table from entries. Nothing in it borrows from an entry, so each entry is
/// dropped as soon as it is added.
pub(super) struct Builder<'p> {
    src: Source<'p>,
    dir: &'p Path,
    ctx: &'p TableContext,
    entries: usize,
    routes: HashMap<TenantId, Arc<Route>>,
    hasher: DefaultHashBuilder,
    /// Names in use, by the route that uses each (a slot is one pointer).
    names: HashTable<Arc<Route>>,
    /// Names of entries that failed to build (only ever filled for a file that is rejected anyway),
    /// so a later entry reusing one is still reported.
    failed_names: HashMap<Box<str>, TenantId>,
    /// One upstream per distinct set of the fields it is built from.
    shared: HashTable<(SharedKey, Arc<Upstreams>)>,
}

impl<'p> Builder<'p> {
    /// A builder with room for as many tenants as `text` can name: every entry has an `upstream`
    /// (one that spells it with an escape or takes it from a YAML merge only makes the table grow
    /// once), and none is shorter than [`MIN_ENTRY_BYTES`]. Reserving up front keeps a large table
    /// from doubling its way to its size, which held both halves at once at the last doubling.
    pub(super) fn new(path: &'p Path, text: &'p str, ctx: &'p TableContext) -> Self {
        let upstreams = memchr::memmem::find_iter(text.as_bytes(), "upstream").count();
        let estimate = upstreams.min(text.len() / MIN_ENTRY_BYTES + 1);
        // Servers the tables before the current one named, and it does not, are forgotten.
        ctx.state.nodes.prune();
        Builder {
            src: Source::new(path, text),
            dir: path.parent().unwrap_or(Path::new(".")),
            ctx,
            entries: 0,
            routes: HashMap::with_capacity(estimate),
            hasher: DefaultHashBuilder::default(),
            names: HashTable::with_capacity(estimate),
            failed_names: HashMap::new(),
            shared: HashTable::new(),
        }
    }

    pub(super) fn add(&mut self, raw: &str, entry: &TenantEntry<'_>) {
        self.entries += 1;
        // Only needed for messages: built when there is one.
        let key = || format!("tenants.{raw}");
        let Some(tenant) = TenantId::parse(raw) else {
            self.src
                .at(raw, key(), "is not a tenant GUID in 8-4-4-4-12 form");
            return;
        };
        if self.routes.contains_key(&tenant) {
            self.src.at(
                raw,
                key(),
                format!("tenant {tenant} appears twice (GUIDs are case-insensitive)"),
            );
            return;
        }
        let hash = self.hasher.hash_one(&*entry.name);
        let first = self
            .names
            .find(hash, |r| *r.name == *entry.name)
            .map(|r| r.tenant)
            .or_else(|| self.failed_names.get(&*entry.name).copied());
        if let Some(first) = first {
            self.src.at(
                &entry.name,
                format!("{}.name", key()),
                format!("name `{}` is already used by tenant {first}", entry.name),
            );
        }
        match self.build_route(tenant, entry) {
            Ok(route) => {
                let route = Arc::new(route);
                if first.is_none() {
                    let hasher = &self.hasher;
                    self.names
                        .insert_unique(hash, Arc::clone(&route), |r| hasher.hash_one(&*r.name));
                }
                self.routes.insert(tenant, route);
            }
            Err(e) => {
                if first.is_none() {
                    self.failed_names.insert(entry.name.as_ref().into(), tenant);
                }
                let needle = if e.needle.is_empty() { raw } else { &e.needle };
                self.src
                    .at(needle, format!("{}.{}", key(), e.field), e.message);
            }
        }
    }

    /// The route, with the upstream it shares with every earlier tenant that agrees on all that an
    /// upstream is built from (only the first of them pays for parsing, checking and resolving it).
    fn build_route(
        &mut self,
        tenant: TenantId,
        entry: &TenantEntry<'_>,
    ) -> Result<Route, route::Invalid> {
        route::check_name(entry)?;
        let upstream_headers = route::headers(entry)?;
        let limits = TenantLimits::resolve(&self.ctx.defaults.limits, entry.limits.as_ref())
            .map_err(|(key, m)| route::invalid_limit(key, m))?;
        let key = UpstreamKey::of(entry, limits);
        let hash = self.hasher.hash_one(&key);
        let upstream = match self.shared.find(hash, |(k, _)| k.is(&key)) {
            Some((_, u)) => Arc::clone(u),
            None => {
                let built = Arc::new(route::upstreams(entry, self.dir, self.ctx, limits)?);
                let shared = (key.to_shared(hash), Arc::clone(&built));
                self.shared.insert_unique(hash, shared, |(k, _)| k.hash);
                built
            }
        };
        Ok(Route {
            tenant,
            name: entry.name.as_ref().into(),
            upstream,
            upstream_headers,
            allow_writes: entry.allow_writes,
            label: self.ctx.defaults.tenant_label,
        })
    }

    /// The problems found so far (for a file the parser then refused).
    pub(super) fn problems(self) -> Vec<Problem> {
        self.src.problems
    }

    pub(super) fn finish(mut self) -> Result<RoutingTable, Problems> {
        if self.entries == 0 {
            self.src.at(
                "tenants",
                "tenants",
                "no tenants (refusing to drop every tenant)",
            );
        }
        self.src.finish()?;
        let mut routes = self.routes;
        // An estimate far above the count (a text full of the word `upstream`) gives the room back.
        if routes.capacity() > 2 * routes.len() + 16 {
            routes.shrink_to_fit();
        }
        let mut unavailable: Vec<Box<str>> = routes
            .values()
            .filter(|r| r.upstream.unresolved())
            .map(|r| r.name.clone())
            .collect();
        unavailable.sort();
        let named = routes
            .values()
            .any(|r| r.upstream.nodes.iter().any(|n| n.named));
        let partly_unresolved = routes.values().any(|r| r.upstream.partly_unresolved());
        let refresh_at = self
            .ctx
            .refresh
            .filter(|_| named && self.ctx.resolve == Resolve::Dns)
            .map(|d| std::time::Instant::now() + d);
        Ok(RoutingTable {
            routes,
            unavailable,
            partly_unresolved,
            refresh_at,
        })
    }
}

/// The fields of a tenant's entry that its [`Upstream`] is built from, borrowed from the entry:
/// tenants whose entries agree on all of them share one upstream. Compared field by field
/// ([`SharedKey::is`]), so no value can pass for another field's (a joined string could: YAML
/// strings may hold a NUL).
#[derive(Hash)]
struct UpstreamKey<'a> {
    upstream: Option<&'a str>,
    upstreams: &'a [Cow<'a, str>],
    balance: Balance,
    limits: TenantLimits,
    tls_verify: bool,
    sni: Option<&'a str>,
    connect_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    link_bases: &'a [Cow<'a, str>],
    ca_file: Option<&'a str>,
}

impl<'a> UpstreamKey<'a> {
    fn of(entry: &'a TenantEntry<'a>, limits: TenantLimits) -> Self {
        UpstreamKey {
            upstream: entry.upstream.as_deref(),
            upstreams: &entry.upstreams,
            balance: entry.balance,
            limits,
            tls_verify: entry.tls_verify,
            sni: entry.sni.as_deref(),
            connect_timeout_ms: entry.connect_timeout_ms,
            read_timeout_ms: entry.read_timeout_ms,
            link_bases: &entry.link_bases,
            ca_file: entry.ca_file.as_deref(),
        }
    }

    fn to_shared(&self, hash: u64) -> SharedKey {
        SharedKey {
            upstream: self.upstream.map(Into::into),
            upstreams: self.upstreams.iter().map(|b| (**b).into()).collect(),
            balance: self.balance,
            limits: self.limits,
            tls_verify: self.tls_verify,
            sni: self.sni.map(Into::into),
            connect_timeout_ms: self.connect_timeout_ms,
            read_timeout_ms: self.read_timeout_ms,
            link_bases: self.link_bases.iter().map(|b| (**b).into()).collect(),
            ca_file: self.ca_file.map(Into::into),
            hash,
        }
    }
}

/// An [`UpstreamKey`] kept by the builder after the entry it came from is gone (one per distinct
/// upstream, so a handful of small allocations per table), with its hash.
struct SharedKey {
    upstream: Option<Box<str>>,
    upstreams: Box<[Box<str>]>,
    balance: Balance,
    limits: TenantLimits,
    tls_verify: bool,
    sni: Option<Box<str>>,
    connect_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    link_bases: Box<[Box<str>]>,
    ca_file: Option<Box<str>>,
    hash: u64,
}

impl SharedKey {
    /// Field by field, as [`UpstreamKey`]'s derived `Hash` reads them.
    fn is(&self, k: &UpstreamKey<'_>) -> bool {
        self.upstream.as_deref() == k.upstream
            && self.upstreams.len() == k.upstreams.len()
            && self
                .upstreams
                .iter()
                .zip(k.upstreams)
                .all(|(a, b)| **a == **b)
            && self.balance == k.balance
            && self.limits == k.limits
            && self.tls_verify == k.tls_verify
            && self.sni.as_deref() == k.sni
            && self.connect_timeout_ms == k.connect_timeout_ms
            && self.read_timeout_ms == k.read_timeout_ms
            && self.link_bases.len() == k.link_bases.len()
            && self
                .link_bases
                .iter()
                .zip(k.link_bases)
                .all(|(a, b)| **a == **b)
            && self.ca_file.as_deref() == k.ca_file
    }
}
