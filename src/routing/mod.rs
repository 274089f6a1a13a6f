//! The routing table: tenant GUID → that tenant's upstream FHIR server.
//!
//! A [`RoutingTable`] is immutable once built. It is loaded from `routes.yaml`, validated as a whole
//! (one bad entry rejects the file: a partly applied table is how tenants go missing or end up on the
//! wrong server), resolved (DNS happens here, never on the request path) and then published with one
//! `ArcSwap::store` by [`crate::reload`]. A request takes one snapshot of its [`Route`] and keeps it for every
//! later phase, so authorisation and upstream choice can never see two different tables.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashTable;
use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;

use crate::config::problems::{whole_file, OrderedMap, Problems, Source};
use crate::config::RouteDefaults;
use crate::fasthash::TableHash;
use crate::ops::metrics::TenantLabel;
use crate::reload::{FileBlocks, Leftovers, Loadable};
use crate::routing::upstream::{read_ca_file, Upstream, UpstreamUrl};
use crate::tenant::{GuidText, TenantId};

mod fast_yaml;
pub mod upstream;

/// One tenant's route, shared by every request of that tenant while this table is current.
#[derive(Debug)]
pub struct Route {
    pub tenant: TenantId,
    /// Operator-chosen label for logs and metrics (never PHI). A `Box`, not an `Arc`: no counts in
    /// its allocation, which is then the name's length rounded up (16 bytes less per tenant).
    pub name: Box<str>,
    /// Shared by every tenant whose upstream settings are identical (built once per table load), so
    /// a table of 100,000 tenants on a few servers holds a few peers. Pooling stays per tenant through
    /// [`Route::group_key`], which `upstream_peer` sets on its copy of the peer.
    pub upstream: Arc<Upstream>,
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
    /// Unkeyed hashing ([`crate::fasthash`]): the keys come from the operator's file.
    routes: HashMap<TenantId, Arc<Route>, TableHash>,
}

impl Loadable for RoutingTable {
    type Context = RouteDefaults;
    const WHAT: &'static str = "routing table";

    fn from_text(path: &Path, text: &str, defaults: &RouteDefaults) -> Result<Self, Problems> {
        RoutingTable::from_text(path, text, defaults)
    }

    fn from_text_keeping_leftovers<'t>(
        path: &Path,
        text: &'t str,
        defaults: &RouteDefaults,
    ) -> Result<(Self, Leftovers<'t>), Problems> {
        RoutingTable::build(path, text, defaults)
    }

    fn from_blocks(
        path: &Path,
        blocks: &mut FileBlocks<'_>,
        defaults: &RouteDefaults,
    ) -> Option<Self> {
        RoutingTable::build_streamed(path, blocks, defaults)
    }

    fn summary(&self) -> String {
        format!("{} tenants", self.len())
    }
}

impl RoutingTable {
    pub fn get(&self, tenant: &TenantId) -> Option<&Arc<Route>> {
        self.routes.get(tenant)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Builds a table from file text (`path` is used for messages and relative `ca_file`s).
    /// Blocking: upstream host names are resolved here.
    pub fn from_text(
        path: &Path,
        text: &str,
        defaults: &RouteDefaults,
    ) -> Result<RoutingTable, Problems> {
        RoutingTable::build(path, text, defaults).map(|(table, _file)| table)
    }

    /// The table, and what is left of the parsed file (a reload frees it once the table serves).
    fn build<'t>(
        path: &Path,
        text: &'t str,
        defaults: &RouteDefaults,
    ) -> Result<(RoutingTable, Leftovers<'t>), Problems> {
        if text.trim().is_empty() {
            return Err(whole_file(
                path,
                "file is empty (refusing to drop every tenant)",
            ));
        }
        // A table written as JSON (which is YAML too) is parsed by serde_json straight into the
        // structs, and one in the usual YAML shape by `fast_yaml`: both several times faster than
        // the general YAML parser and without its per-event buffer, which for 100,000 tenants is
        // ~100 MB. Anything they decline goes to the general parser, whose messages (with key
        // paths and positions) are the ones reported.
        if text.trim_start().starts_with('{') {
            if let Some(file) = read_json(text) {
                let table = Builder::from_list(path, text, defaults, &file)?;
                return Ok((table, Some(Box::new(file))));
            }
        } else {
            // The fast reader hands over each entry as it reads it, so no list of 100,000 parsed
            // entries (8.8 MB) exists at any point. If it declines part-way, what was built so far is
            // dropped and the general parser reads the file from the start.
            let estimate = list_capacity(text.len(), fast_yaml::tenant_estimate(text));
            let mut builder = Builder::new(path, text, defaults, estimate);
            if fast_yaml::each(text, |key, spec| builder.add(&key, &spec)).is_some() {
                return builder.finish().map(|table| (table, None));
            }
        }
        match serde_yaml_ng::from_str::<RoutesFile>(text) {
            Ok(file) => {
                let table = Builder::from_list(path, text, defaults, &file)?;
                Ok((table, Some(Box::new(file))))
            }
            Err(e) => {
                let mut src = Source::new(path, text);
                src.yaml_error(&e);
                Err(Problems(src.problems))
            }
        }
    }
}

impl RoutingTable {
    /// A table built as the file streams by: the file's text (~9.5 MB for 100,000 tenants in YAML,
    /// ~12 MB in JSON) is never in memory at once, only a block of it, so a reload's peak is the old
    /// table and the new one. One pass counts the tenants to size the table, a second builds it.
    /// `None` for anything the fast YAML reader or serde_json declines and for any problem at all:
    /// the whole text is then read and built by [`Self::build`], whose messages carry line and
    /// column.
    fn build_streamed<R: std::io::Read + std::io::Seek>(
        path: &Path,
        blocks: &mut FileBlocks<'_, R>,
        defaults: &RouteDefaults,
    ) -> Option<RoutingTable> {
        // As `build` decides: JSON when the text starts with `{` after whitespace (ASCII whitespace
        // here; other text goes the fast reader's way, which declines it). Read cut anywhere, as a
        // JSON file may be a single line.
        let json = loop {
            let block = blocks.skim_raw().ok()??;
            match block.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b) => break *b == b'{',
                None => continue,
            }
        };
        blocks.rewind().ok()?;
        if json {
            Self::build_streamed_json(path, blocks, defaults)
        } else {
            Self::build_streamed_yaml(path, blocks, defaults)
        }
    }

    fn build_streamed_yaml<R: std::io::Read + std::io::Seek>(
        path: &Path,
        blocks: &mut FileBlocks<'_, R>,
        defaults: &RouteDefaults,
    ) -> Option<RoutingTable> {
        let mut estimate = 0;
        while let Some(block) = blocks.skim().ok()? {
            estimate += fast_yaml::tenant_estimate_bytes(block);
        }
        let capacity = list_capacity(blocks.read_so_far(), estimate);
        blocks.rewind().ok()?;
        // No text for messages: a problem sends the file to the whole-text build, which reports it.
        let mut builder = Builder::new(path, "", defaults, capacity);
        let mut reader = fast_yaml::Reader::new();
        while let Some(block) = blocks.next_block().ok()? {
            // The next block reuses the buffer: the entry still open at this one's end is copied.
            reader.feed_piece(block, |key, spec| builder.add(&key, &spec))?;
        }
        reader.end(|key, spec| builder.add(&key, &spec))?;
        builder.finish().ok()
    }

    /// serde_json reads the file through a buffer of its own and hands each entry to the builder
    /// (its strings are then copies, dropped once the entry is built): no text, no list of entries.
    fn build_streamed_json<R: std::io::Read + std::io::Seek>(
        path: &Path,
        blocks: &mut FileBlocks<'_, R>,
        defaults: &RouteDefaults,
    ) -> Option<RoutingTable> {
        use serde::de::DeserializeSeed;
        let mut braces = 0;
        while let Some(block) = blocks.skim_raw().ok()? {
            braces += json_braces(block);
        }
        let capacity = list_capacity(blocks.read_so_far(), braces);
        blocks.rewind().ok()?;
        let mut builder = Builder::new(path, "", defaults, capacity);
        let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(
            64 << 10,
            blocks,
        ));
        JsonRoutes(|key: TenantKey<'_>, spec: TenantSpec<'_>| builder.add(&key, &spec))
            .deserialize(&mut de)
            .ok()?;
        de.end().ok()?;
        builder.finish().ok()
    }
}

/// Validates and builds a table one entry at a time, in file order, from whichever reader read
/// the file. Nothing in it borrows from an entry, so entries can be dropped as soon as they are added.
struct Builder<'p> {
    src: Source<'p>,
    dir: &'p Path,
    defaults: &'p RouteDefaults,
    entries: usize,
    routes: HashMap<TenantId, Arc<Route>, TableHash>,
    /// Names in use, by the route that uses each (a slot is one pointer).
    names: HashTable<Arc<Route>>,
    /// Names of entries that failed to build (only ever filled for a file that is rejected anyway),
    /// so a later entry reusing one is still reported.
    failed_names: HashMap<Box<str>, TenantId, TableHash>,
    /// One upstream per distinct set of the fields it is built from.
    shared: HashTable<(SharedKey, Arc<Upstream>)>,
}

fn name_hash(name: &str) -> u64 {
    TableHash::default().hash_one(name)
}

impl<'p> Builder<'p> {
    /// A builder with room for `estimate` tenants (callers bound it with [`list_capacity`]).
    fn new(path: &'p Path, text: &'p str, defaults: &'p RouteDefaults, estimate: usize) -> Self {
        Builder {
            src: Source::new(path, text),
            dir: path.parent().unwrap_or(Path::new(".")),
            defaults,
            entries: 0,
            routes: HashMap::with_capacity_and_hasher(estimate, TableHash::default()),
            names: HashTable::with_capacity(estimate),
            failed_names: HashMap::default(),
            shared: HashTable::new(),
        }
    }

    /// The table from a parsed file's list.
    fn from_list(
        path: &'p Path,
        text: &'p str,
        defaults: &'p RouteDefaults,
        file: &RoutesFile<'_>,
    ) -> Result<RoutingTable, Problems> {
        let estimate = list_capacity(text.len(), file.tenants.0.len());
        let mut builder = Builder::new(path, text, defaults, estimate);
        for (key, spec) in &file.tenants.0 {
            builder.add(key, spec);
        }
        builder.finish()
    }

    fn add(&mut self, raw: &str, spec: &TenantSpec<'_>) {
        self.entries += 1;
        let src = &mut self.src;
        // Only needed for messages: built when there is one.
        let key = || format!("tenants.{raw}");
        let Some(tenant) = TenantId::parse(raw) else {
            src.at(raw, key(), "is not a tenant GUID in 8-4-4-4-12 form");
            return;
        };
        if self.routes.contains_key(&tenant) {
            src.at(
                raw,
                key(),
                format!("tenant {tenant} appears twice (GUIDs are case-insensitive)"),
            );
            return;
        }
        let hash = name_hash(&spec.name);
        let first = self
            .names
            .find(hash, |r| *r.name == *spec.name)
            .map(|r| r.tenant)
            .or_else(|| self.failed_names.get(&*spec.name).copied());
        if let Some(first) = first {
            src.at(
                &spec.name,
                format!("{}.name", key()),
                format!("name `{}` is already used by tenant {first}", spec.name),
            );
        }
        let built = build_route(tenant, spec, self.dir, self.defaults, &mut self.shared);
        match built {
            Ok(route) => {
                let route = Arc::new(route);
                if first.is_none() {
                    self.names
                        .insert_unique(hash, Arc::clone(&route), |r| name_hash(&r.name));
                }
                self.routes.insert(tenant, route);
            }
            Err((field, needle, message)) => {
                if first.is_none() {
                    self.failed_names.insert(spec.name.as_ref().into(), tenant);
                }
                let needle = if needle.is_empty() {
                    raw.to_string()
                } else {
                    needle
                };
                src.at(&needle, format!("{}.{field}", key()), message)
            }
        }
    }

    fn finish(mut self) -> Result<RoutingTable, Problems> {
        if self.entries == 0 {
            self.src.at(
                "tenants",
                "tenants",
                "no tenants (refusing to drop every tenant)",
            );
        }
        self.src.finish()?;
        Ok(RoutingTable {
            routes: self.routes,
        })
    }
}

/// The fewest bytes a tenant's entry can take in either form (its GUID key alone is 36): bounds the
/// room reserved for the tenant list from a count taken from the text, whatever the text holds.
const MIN_ENTRY_BYTES: usize = 48;

/// Room for the tenant list of a text of `text_len` bytes: `estimate` (an upper bound on the
/// tenants, from the text's shape), no more than the text could hold.
fn list_capacity(text_len: usize, estimate: usize) -> usize {
    estimate.min(text_len / MIN_ENTRY_BYTES + 1)
}

/// A table written as JSON and read whole (a file the streamed build declined: one with a problem, whose
/// messages need the text), read by serde_json into a tenant list reserved at its final size. serde_json
/// gives no entry count, so the list would otherwise double its way there: at 100,000 tenants the
/// last doubling holds 5.6 MB and 11.3 MB at once, and the list keeps 2.5 MB it does not use. `None`
/// on anything serde_json refuses (the general parser then reads the file and reports).
fn read_json(text: &str) -> Option<RoutesFile<'_>> {
    use serde::de::DeserializeSeed;
    let mut list = Vec::with_capacity(list_capacity(text.len(), json_braces(text.as_bytes())));
    let mut de = serde_json::Deserializer::from_str(text);
    JsonRoutes(|key, spec| list.push((key, spec)))
        .deserialize(&mut de)
        .ok()?;
    de.end().ok()?;
    Some(RoutesFile {
        tenants: OrderedMap(list),
    })
}

/// The `{`s in `bytes` (a JSON text, or a block of it to add up): each tenant's entry is an object, so
/// the count of a whole text bounds its tenants from above (the document, the `tenants` object,
/// header blocks and braces inside strings are the rest).
fn json_braces(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'{').count()
}

/// A JSON routing table's document (`tenants`, and no other key, exactly once), handing each tenant's
/// entry to `.0` in file order as serde_json reads it: into a list for [`read_json`], straight into the
/// table's builder when the file streams by ([`RoutingTable::build_streamed`]).
struct JsonRoutes<F>(F);

impl<'de, F: FnMut(TenantKey<'de>, TenantSpec<'de>)> serde::de::DeserializeSeed<'de>
    for JsonRoutes<F>
{
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(TenantKey<'de>, TenantSpec<'de>)> serde::de::Visitor<'de> for JsonRoutes<F> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a routing table")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut m: A) -> Result<(), A::Error> {
        use serde::de::Error;
        let mut seen = false;
        while let Some(key) = m.next_key::<Cow<'de, str>>()? {
            if key != "tenants" {
                return Err(A::Error::unknown_field(&key, &["tenants"]));
            }
            if seen {
                return Err(A::Error::duplicate_field("tenants"));
            }
            seen = true;
            m.next_value_seed(JsonTenants(&mut self.0))?;
        }
        if !seen {
            return Err(A::Error::missing_field("tenants"));
        }
        Ok(())
    }
}

/// The `tenants` mapping, each entry handed to `.0` as it is read.
struct JsonTenants<'f, F>(&'f mut F);

impl<'de, F: FnMut(TenantKey<'de>, TenantSpec<'de>)> serde::de::DeserializeSeed<'de>
    for JsonTenants<'_, F>
{
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(TenantKey<'de>, TenantSpec<'de>)> serde::de::Visitor<'de>
    for JsonTenants<'_, F>
{
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a mapping of tenants")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        while let Some((key, spec)) = m.next_entry()? {
            (self.0)(key, spec);
        }
        Ok(())
    }
}

/// For the differential fuzz target and the unit tests, not for the proxy: the fast YAML reader's
/// result on `text` checked against the general parser's, and against its own when it reads the
/// text one line at a time (as a file read in blocks is). `Ok(true)` when the fast reader took the
/// file and all agree, `Ok(false)` when it declined (both ways), `Err` describing a disagreement.
#[doc(hidden)]
pub fn check_fast_yaml(text: &str) -> Result<bool, String> {
    let fast = fast_yaml::parse(text);
    let by_line = fast_yaml::parse_line_by_line(text);
    if by_line != fast {
        return Err(format!(
            "fast reader, whole text: {fast:?}\nfast reader, line by line: {by_line:?}"
        ));
    }
    let Some(fast) = fast else {
        return Ok(false);
    };
    match serde_yaml_ng::from_str::<RoutesFile>(text) {
        Ok(general) if general == fast => Ok(true),
        Ok(general) => Err(format!(
            "fast reader: {fast:?}\ngeneral parser: {general:?}"
        )),
        Err(e) => Err(format!(
            "fast reader: {fast:?}\ngeneral parser refused: {e}"
        )),
    }
}

/// For the fuzz target `file_loaders` and the unit tests, not for the proxy: when the table is
/// built from `text` as a file streams by (in blocks of `block` bytes), it must be the table the
/// whole text builds, and what was read must hash as the text. `Ok(true)` when it was built so and
/// all agree, `Ok(false)` when the streamed build declined (the whole text is then read, as a
/// reload does), `Err` describing a disagreement.
#[doc(hidden)]
pub fn check_streamed(text: &str, block: usize, defaults: &RouteDefaults) -> Result<bool, String> {
    let path = Path::new("routes.yaml");
    let mut file = std::io::Cursor::new(text.as_bytes());
    let mut blocks = FileBlocks::with_block_size(&mut file, block);
    let Some(streamed) = RoutingTable::build_streamed(path, &mut blocks, defaults) else {
        return Ok(false);
    };
    let read = blocks.finish().map_err(|e| e.to_string())?;
    if read != (crate::reload::hash_text(text), text.len()) {
        return Err(format!("read {read:?} from a text of {} bytes", text.len()));
    }
    match RoutingTable::from_text(path, text, defaults) {
        Ok(whole) if describe_routes(&whole) == describe_routes(&streamed) => Ok(true),
        Ok(whole) => Err(format!(
            "streamed: {:?}\nwhole text: {:?}",
            describe_routes(&streamed),
            describe_routes(&whole)
        )),
        Err(e) => Err(format!(
            "streamed: {:?}\nwhole text refused: {e}",
            describe_routes(&streamed)
        )),
    }
}

/// Every route, in tenant order, with every field (header values too, which `Debug` hides).
fn describe_routes(t: &RoutingTable) -> Vec<String> {
    let mut all: Vec<String> = t
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

/// For the benches: reads a routing file with the fast YAML reader or the general parser only,
/// without validation, and returns the number of tenants (`None` when the reader declined or failed).
#[doc(hidden)]
pub fn read_routes_yaml(text: &str, general: bool) -> Option<usize> {
    let file = if general {
        serde_yaml_ng::from_str::<RoutesFile>(text).ok()
    } else {
        fast_yaml::parse(text)
    };
    file.map(|f| f.tenants.0.len())
}

// ---------------------------------------------------------------------------------------------
// File format.

/// The parsed file. Its strings borrow from the file's text where the reader allows: always with
/// the fast YAML reader (it declines escapes, so every value is a slice of the text), for values
/// without escapes with serde_json (tenant keys too, through [`TenantKey`]; `upstream_headers` names
/// are still copied), never with the general YAML parser. A 100,000-tenant table the fast reader
/// takes then parses into no string allocations at all instead of ~300,000 (~10 MB of fresh memory a
/// reload no longer touches).
#[derive(Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct RoutesFile<'t> {
    #[serde(borrow)]
    tenants: OrderedMap<TenantSpec<'t>, TenantKey<'t>>,
}

/// A tenant's key as written. `Cow<str>`'s own `Deserialize` always copies, and serde's `borrow`
/// attribute cannot reach map keys, so this borrows from the text wherever the reader can (serde_json,
/// for a key without escapes read from the whole text; the fast YAML reader, always): 100,000 fewer
/// allocations (~5 MB) when a large JSON table is read whole. Streamed, keys are copies, each dropped
/// once its entry is built.
#[derive(Debug, PartialEq)]
struct TenantKey<'t>(Cow<'t, str>);

impl std::ops::Deref for TenantKey<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TenantKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de: 't, 't> Deserialize<'de> for TenantKey<'t> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = TenantKey<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a tenant GUID")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(TenantKey(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(TenantKey(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(TenantKey(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// One tenant's entry. The fields few tenants set are boxed, so that the list of 100,000 entries
/// a large table parses into is 88 bytes per tenant rather than 208.
#[derive(Debug, PartialEq)]
struct TenantSpec<'t> {
    name: Cow<'t, str>,
    upstream: Cow<'t, str>,
    tls_verify: bool,
    allow_writes: bool,
    /// `None` when every field in it has its default ([`MoreSpec::boxed`]).
    more: Option<Box<MoreSpec<'t>>>,
}

/// The fields few tenants set; [`NO_MORE`] is the value with all of them at their defaults.
#[derive(Debug, PartialEq)]
struct MoreSpec<'t> {
    ca_file: Option<Cow<'t, str>>,
    sni: Option<Cow<'t, str>>,
    connect_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    upstream_headers: BTreeMap<Cow<'t, str>, Cow<'t, str>>,
    /// Other base URLs this upstream puts in its links (rewritten to the public base too).
    link_bases: Vec<Cow<'t, str>>,
}

/// The entry as the file states it (what serde reads); converted to [`TenantSpec`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry<'t> {
    #[serde(borrow)]
    name: Cow<'t, str>,
    #[serde(borrow)]
    upstream: Cow<'t, str>,
    #[serde(default = "yes")]
    tls_verify: bool,
    #[serde(default, borrow)]
    ca_file: Option<Cow<'t, str>>,
    #[serde(default, borrow)]
    sni: Option<Cow<'t, str>>,
    #[serde(default)]
    connect_timeout_ms: Option<u64>,
    #[serde(default)]
    read_timeout_ms: Option<u64>,
    #[serde(default, borrow)]
    upstream_headers: BTreeMap<Cow<'t, str>, Cow<'t, str>>,
    #[serde(default)]
    allow_writes: bool,
    #[serde(default, borrow)]
    link_bases: Vec<Cow<'t, str>>,
}

impl<'de: 't, 't> Deserialize<'de> for TenantSpec<'t> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let e = TenantEntry::deserialize(d)?;
        Ok(TenantSpec {
            name: e.name,
            upstream: e.upstream,
            tls_verify: e.tls_verify,
            allow_writes: e.allow_writes,
            more: MoreSpec {
                ca_file: e.ca_file,
                sni: e.sni,
                connect_timeout_ms: e.connect_timeout_ms,
                read_timeout_ms: e.read_timeout_ms,
                upstream_headers: e.upstream_headers,
                link_bases: e.link_bases,
            }
            .boxed(),
        })
    }
}

/// What [`TenantSpec::more`] gives for a tenant that sets none of those fields.
static NO_MORE: MoreSpec<'static> = MoreSpec {
    ca_file: None,
    sni: None,
    connect_timeout_ms: None,
    read_timeout_ms: None,
    upstream_headers: BTreeMap::new(),
    link_bases: Vec::new(),
};

impl<'t> MoreSpec<'t> {
    /// Boxed, or `None` when every field has its default: both readers build entries this way, so
    /// they compare equal exactly when the files say the same.
    fn boxed(self) -> Option<Box<MoreSpec<'t>>> {
        (self != NO_MORE).then(|| Box::new(self))
    }
}

impl<'t> TenantSpec<'t> {
    fn more(&self) -> &MoreSpec<'t> {
        self.more.as_deref().unwrap_or(&NO_MORE)
    }
}

fn yes() -> bool {
    true
}

/// Headers an operator may not set: they frame the message or carry routing decisions that belong to
/// the proxy.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
];

/// Builds one route; on failure returns (field, text to locate, message).
fn build_route(
    tenant: TenantId,
    spec: &TenantSpec<'_>,
    dir: &Path,
    defaults: &RouteDefaults,
    shared: &mut HashTable<(SharedKey, Arc<Upstream>)>,
) -> Result<Route, (&'static str, String, String)> {
    let err = |field: &'static str, needle: &str, m: String| (field, needle.to_string(), m);
    if spec.name.is_empty()
        || spec.name.len() > 64
        || !spec
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(err(
            "name",
            &spec.name,
            "must be 1-64 characters of A-Z a-z 0-9 - _ .".into(),
        ));
    }
    let more = spec.more();
    let mut upstream_headers = Vec::with_capacity(more.upstream_headers.len());
    for (raw_name, raw_value) in &more.upstream_headers {
        let name = HeaderName::from_bytes(raw_name.as_bytes()).map_err(|_| {
            err(
                "upstream_headers",
                raw_name,
                format!("`{raw_name}` is not a header name"),
            )
        })?;
        if RESERVED_HEADERS.contains(&name.as_str()) {
            return Err(err(
                "upstream_headers",
                raw_name,
                format!("`{raw_name}` is set by the proxy and may not be configured"),
            ));
        }
        if upstream_headers.iter().any(|(n, _)| *n == name) {
            return Err(err(
                "upstream_headers",
                raw_name,
                format!("`{raw_name}` is given twice"),
            ));
        }
        // The value may hold a credential: messages name the header, never the value.
        let expanded = expand_env(raw_value)
            .map_err(|m| err("upstream_headers", raw_name, format!("{raw_name}: {m}")))?;
        let mut value = HeaderValue::from_str(&expanded).map_err(|_| {
            err(
                "upstream_headers",
                raw_name,
                format!("{raw_name}: value is not a valid header value"),
            )
        })?;
        value.set_sensitive(true);
        upstream_headers.push((name, value));
    }
    // Everything the upstream is built from, as written; tenants that agree on all of it share one
    // (and only the first of them pays for parsing, validating and resolving it).
    let key = UpstreamKey::of(spec);
    let hash = TableHash::default().hash_one(&key);
    let upstream = match shared.find(hash, |(k, _)| k.is(&key)) {
        Some((_, u)) => Arc::clone(u),
        None => {
            let url = UpstreamUrl::parse(&spec.upstream)
                .map_err(|m| err("upstream", &spec.upstream, m))?;
            if !url.tls && !spec.tls_verify {
                return Err(err(
                    "tls_verify",
                    "tls_verify",
                    "only applies to https upstreams".into(),
                ));
            }
            if let Some(sni) = &more.sni {
                if !url.tls {
                    return Err(err("sni", "sni", "only applies to https upstreams".into()));
                }
                if !is_host_name(sni) {
                    return Err(err(
                        "sni",
                        "sni",
                        "must be a DNS host name (labels of A-Z a-z 0-9 - _, at most 253 characters)"
                            .into(),
                    ));
                }
            }
            // Group 0 in the shared peer; each request's copy gets the tenant's group.
            let mut settings = defaults.peer_settings(0);
            settings.tls_verify = spec.tls_verify;
            settings.sni = more.sni.as_deref().map(str::to_string);
            if let Some(ms) = more.connect_timeout_ms {
                settings.connect_timeout =
                    timeout(ms).map_err(|m| err("connect_timeout_ms", "connect_timeout_ms", m))?;
            }
            if let Some(ms) = more.read_timeout_ms {
                settings.read_timeout =
                    timeout(ms).map_err(|m| err("read_timeout_ms", "read_timeout_ms", m))?;
            }
            for b in &more.link_bases {
                let parsed = UpstreamUrl::parse(b).map_err(|m| err("link_bases", b, m))?;
                settings.link_bases.push(parsed.base_url());
            }
            if let Some(ca) = &more.ca_file {
                let p = dir.join(&**ca);
                settings.ca_der = Some(read_ca_file(&p).map_err(|m| err("ca_file", ca, m))?);
            }
            let addr = url
                .resolve()
                .map_err(|m| err("upstream", &spec.upstream, m))?;
            let built = Upstream::build(&url, addr, &settings)
                .map_err(|m| err("upstream", &spec.upstream, m))?;
            let built = Arc::new(built);
            shared.insert_unique(hash, (key.to_shared(hash), Arc::clone(&built)), |(k, _)| {
                k.hash
            });
            built
        }
    };
    Ok(Route {
        tenant,
        name: spec.name.as_ref().into(),
        upstream,
        upstream_headers: upstream_headers.into_boxed_slice(),
        allow_writes: spec.allow_writes,
        label: defaults.tenant_label,
    })
}

/// The fields of a tenant's entry that its [`Upstream`] is built from, borrowed from the entry:
/// tenants whose entries agree on all of them share one upstream. Compared field by field
/// ([`SharedKey::is`]), so no value can pass for another field's (a joined string could: YAML
/// strings may hold a NUL).
#[derive(Hash)]
struct UpstreamKey<'a> {
    upstream: &'a str,
    tls_verify: bool,
    sni: Option<&'a str>,
    connect_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    link_bases: &'a [Cow<'a, str>],
    ca_file: Option<&'a str>,
}

impl<'a> UpstreamKey<'a> {
    fn of(spec: &'a TenantSpec<'a>) -> Self {
        let more = spec.more();
        UpstreamKey {
            upstream: &spec.upstream,
            tls_verify: spec.tls_verify,
            sni: more.sni.as_deref(),
            connect_timeout_ms: more.connect_timeout_ms,
            read_timeout_ms: more.read_timeout_ms,
            link_bases: &more.link_bases,
            ca_file: more.ca_file.as_deref(),
        }
    }
}

/// An [`UpstreamKey`] kept by the table builder after the entry it came from is gone (one per distinct
/// upstream, so a handful of small allocations per table), with its hash.
struct SharedKey {
    upstream: Box<str>,
    tls_verify: bool,
    sni: Option<Box<str>>,
    connect_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    link_bases: Box<[Box<str>]>,
    ca_file: Option<Box<str>>,
    hash: u64,
}

impl SharedKey {
    /// Field by field, as [`UpstreamKey`]'s derived equality.
    fn is(&self, k: &UpstreamKey<'_>) -> bool {
        *self.upstream == *k.upstream
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

impl UpstreamKey<'_> {
    fn to_shared(&self, hash: u64) -> SharedKey {
        SharedKey {
            upstream: self.upstream.into(),
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

/// A DNS host name as TLS SNI carries it (RFC 6066 §3: no IP literals): dot-separated labels of 1-63
/// letters, digits, `-` (not at either end) or `_` (seen in internal names), 253 characters at most,
/// an optional final dot. Checked when the table loads so a typo, a control character or an address
/// fails there, with the file and line, instead of on every request's TLS handshake.
fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.parse::<std::net::IpAddr>().is_err()
        && s.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn timeout(ms: u64) -> Result<Duration, String> {
    if (1..=3_600_000).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err("must be between 1 and 3600000".into())
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

/// Replaces `${NAME}` with the environment variable `NAME`. A missing variable is an error that names
/// the variable (never its value). `$` not followed by `{` is kept as is.
fn expand_env(value: &str) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${…} reference".to_string())?;
        let name = &after[..end];
        if name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            || name.as_bytes()[0].is_ascii_digit()
        {
            return Err(format!("`${{{name}}}` is not a valid variable reference"));
        }
        let v =
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
        out.push_str(&v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn defaults() -> RouteDefaults {
        RouteDefaults {
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            ca_der: None,
            public_base: "https://edge.example/fhir".into(),
            tenant_label: TenantLabel::Name,
        }
    }

    fn load(text: &str) -> Result<RoutingTable, Problems> {
        RoutingTable::from_text(&PathBuf::from("routes.yaml"), text, &defaults())
    }

    const A: &str = "145f4184-1b0b-41c7-ba24-b3c1291bfda1";

    const B: &str = "2f1c8a44-7d0e-4c55-9a1b-0c3d5e7f9a21";

    #[test]
    fn tenants_on_one_upstream_share_it_but_keep_their_own_pool_group() {
        let t = load(&format!(
            "tenants:\n  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/r4\n\
             \n  {B}:\n    name: b\n    upstream: http://127.0.0.1:9/r4\n"
        ))
        .unwrap();
        let a = t.get(&TenantId::parse(A).unwrap()).unwrap();
        let b = t.get(&TenantId::parse(B).unwrap()).unwrap();
        assert!(Arc::ptr_eq(&a.upstream, &b.upstream));
        assert_ne!(a.group_key(), b.group_key());
        assert_ne!(a.group_key(), 0);
        // Any difference in what the upstream is built from means a separate one.
        let t = load(&format!(
            "tenants:\n  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/r4\n\
             \n  {B}:\n    name: b\n    upstream: http://127.0.0.1:9/r4\n    read_timeout_ms: 5\n"
        ))
        .unwrap();
        let a = t.get(&TenantId::parse(A).unwrap()).unwrap();
        let b = t.get(&TenantId::parse(B).unwrap()).unwrap();
        assert!(!Arc::ptr_eq(&a.upstream, &b.upstream));
        let t = load(&format!(
            "tenants:\n  {A}:\n    name: a\n    upstream: https://127.0.0.1:9/r4\n    sni: a.example\n\
             \n  {B}:\n    name: b\n    upstream: https://127.0.0.1:9/r4\n    sni: b.example\n"
        ))
        .unwrap();
        let a = t.get(&TenantId::parse(A).unwrap()).unwrap();
        let b = t.get(&TenantId::parse(B).unwrap()).unwrap();
        assert!(!Arc::ptr_eq(&a.upstream, &b.upstream));
    }

    /// An `sni` is checked when the table loads. (A NUL in one once let an `sni` spell another tenant's
    /// `sni` plus `connect_timeout_ms` in the shared-upstream key; the key is a struct of the fields
    /// now, and such a value no longer loads at all.)
    #[test]
    fn sni_must_be_a_host_name_and_needs_an_https_upstream() {
        let entry = |upstream: &str, sni: &str| {
            load(&format!(
                "tenants:\n  {A}:\n    name: a\n    upstream: {upstream}\n    sni: {sni}\n"
            ))
        };
        for good in [
            "fhir.contoso.example",
            "fhir.contoso.example.",
            "localhost",
            "x_internal.corp",
            "a-b.c1",
        ] {
            assert!(entry("https://127.0.0.1:9/", good).is_ok(), "{good}");
        }
        for bad in [
            "\"x\\0c5\"",
            "\"\"",
            "\"fhir contoso\"",
            "a..b",
            "-a.example",
            "a-.example",
            "127.0.0.1",
            "\"[::1]\"",
            "\"::1\"",
            "fhir.contoso.example:443",
            "\"h\\u00e9.example\"",
            &"a".repeat(64),
            &["abc"; 64].join("."),
        ] {
            let e = entry("https://127.0.0.1:9/", bad).unwrap_err();
            assert!(e.to_string().contains("sni"), "{bad}: {e}");
            assert_eq!(e.0[0].line, Some(5), "{bad}: {e}");
        }
        let e = entry("http://127.0.0.1:9/", "fhir.contoso.example").unwrap_err();
        assert!(e.to_string().contains("only applies to https"), "{e}");
    }

    #[test]
    fn a_table_written_as_json_loads_like_yaml_and_reports_like_yaml() {
        let json = format!(
            r#"{{"tenants": {{"{A}": {{"name": "a", "upstream": "http://127.0.0.1:9/r4"}},
                "{B}": {{"name": "b", "upstream": "http://127.0.0.1:9/r5", "allow_writes": true}}}}}}"#
        );
        let t = load(&json).unwrap();
        assert_eq!(t.len(), 2);
        let b = t.get(&TenantId::parse(B).unwrap()).unwrap();
        assert_eq!((&*b.name, b.allow_writes), ("b", true));
        assert_eq!(b.upstream.base_path, "/r5");
        // Unknown keys are refused in JSON as in YAML, with the YAML parser's key path.
        let bad = json.replace("allow_writes", "allow_writez");
        let msg = load(&bad).unwrap_err().to_string();
        assert!(msg.contains("allow_writez"), "{msg}");
        // Duplicate tenants are refused too.
        let dup = format!(
            r#"{{"tenants": {{"{A}": {{"name": "a", "upstream": "http://127.0.0.1:9/r4"}},
                "{A}": {{"name": "b", "upstream": "http://127.0.0.1:9/r4"}}}}}}"#
        );
        assert!(load(&dup).is_err());
    }

    #[test]
    fn json_keys_are_slices_of_the_text_unless_escaped() {
        // The second key spells its first character as `\u0032` ("2"): serde_json must copy it, and
        // it must still read as the same GUID.
        let escaped = format!("\\u0032{}", &B[1..]);
        let json = format!(
            r#"{{"tenants": {{"{A}": {{"name": "a", "upstream": "http://127.0.0.1:9/r4"}},
                "{escaped}": {{"name": "b", "upstream": "http://127.0.0.1:9/r4"}}}}}}"#
        );
        let file: RoutesFile = serde_json::from_str(&json).unwrap();
        let range = json.as_bytes().as_ptr_range();
        let [(a, _), (b, _)] = file.tenants.0.as_slice() else {
            panic!("two tenants expected")
        };
        assert!(
            matches!(&a.0, Cow::Borrowed(k) if range.contains(&k.as_ptr())),
            "{a:?} was copied"
        );
        assert!(matches!(&b.0, Cow::Owned(_)), "{b:?}");
        assert_eq!((&**a, &**b), (A, B));
        assert_eq!(load(&json).unwrap().len(), 2);
    }

    #[test]
    fn a_name_used_twice_is_reported_with_the_first_tenant_using_it() {
        const C: &str = "00000000-0000-0000-0000-00000000000c";
        let entry = |key: &str, name: &str| {
            format!("  {key}:\n    name: {name}\n    upstream: http://127.0.0.1:9/r4\n")
        };
        let text = format!(
            "tenants:\n{}{}{}",
            entry(&A.to_uppercase(), "shared"),
            entry(B, "other"),
            entry(C, "shared")
        );
        let message = load(&text).unwrap_err().to_string();
        assert!(
            message.contains(&format!("tenants.{C}.name"))
                && message.contains(&format!("name `shared` is already used by tenant {A}")),
            "{message}"
        );
        assert!(!message.contains("`other`"), "{message}");
        // Also when the first entry with the name is itself broken: both are reported.
        let text = format!(
            "tenants:\n{}{}",
            entry(B, "shared").replace("http://", "ftp://"),
            entry(C, "shared")
        );
        let message = load(&text).unwrap_err().to_string();
        assert!(
            message.contains(&format!("tenants.{B}.upstream"))
                && message.contains(&format!("name `shared` is already used by tenant {B}")),
            "{message}"
        );
        // Distinct names, however many, are not reported; names differing in case are distinct.
        let many: String = (0..2000)
            .map(|i| {
                entry(
                    &format!("00000000-0000-0000-0000-{i:012}"),
                    &format!("t{i}"),
                )
            })
            .collect();
        let case = format!("tenants:\n{many}{}", entry(A, "T1"));
        assert_eq!(load(&case).unwrap().len(), 2001);
    }

    #[test]
    fn a_json_table_reads_as_the_derived_reader_reads_it_into_a_list_of_its_size() {
        let mut json = String::from(r#"{"tenants": {"#);
        for i in 0..1000 {
            json.push_str(&format!(
                r#""00000000-0000-0000-0000-{i:012}": {{"name": "t{i}", "upstream": "http://127.0.0.1:9/r4"}},"#
            ));
        }
        json.push_str(&format!(
            r#""{A}": {{"name": "a", "upstream": "https://h.example/r4", "tls_verify": false,
                "sni": "s.example", "connect_timeout_ms": 5, "read_timeout_ms": 6, "allow_writes": true,
                "upstream_headers": {{"X-K": "v{{}}"}}, "link_bases": ["/p"], "ca_file": "ca.pem"}},
              "\u0032{}": {{"name": "b\u0062", "upstream": "http://127.0.0.1:9/r4"}}}}}}"#,
            &B[1..]
        ));
        let fast = read_json(&json).expect("read");
        let derived: RoutesFile = serde_json::from_str(&json).unwrap();
        assert_eq!(fast, derived);
        assert_eq!(fast.tenants.0.len(), 1002);
        // One `{` per entry, plus the document, `tenants`, one header block and one in a string.
        assert!(
            fast.tenants.0.capacity() <= 1006,
            "{}",
            fast.tenants.0.capacity()
        );
        // What the derived reader refuses, this one refuses too (the general parser then reports).
        for bad in [
            r#"{"tenants": {}, "extra": 1}"#.to_string(),
            r#"{"tenants": {}, "tenants": {}}"#.to_string(),
            r#"{"other": {}}"#.to_string(),
            r#"{}"#.to_string(),
            format!("{json} x"),
            json[..json.len() - 1].to_string(),
        ] {
            assert!(serde_json::from_str::<RoutesFile>(&bad).is_err(), "{bad}");
            assert!(read_json(&bad).is_none(), "{bad}");
        }
        // No more room than the text could fill, whatever it holds.
        let braces = format!(r#"{{"tenants": {{}}, "x": "{}"}}"#, "{".repeat(100_000));
        assert_eq!(
            list_capacity(braces.len(), 100_002),
            braces.len() / MIN_ENTRY_BYTES + 1
        );
    }

    /// The table built from `text` as a file streams by in blocks of `block` bytes (`None`: declined,
    /// and the reload reads the file again, whole), checking that the blocks then hash the whole
    /// file, as a reload requires.
    fn streamed(text: &str, block: usize) -> Option<RoutingTable> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.yaml");
        std::fs::write(&path, text).unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        let mut blocks = FileBlocks::with_block_size(&mut file, block);
        let table = RoutingTable::build_streamed(&path, &mut blocks, &defaults())?;
        assert_eq!(
            blocks.finish().unwrap(),
            (crate::reload::hash_text(text), text.len())
        );
        Some(table)
    }

    #[test]
    fn yaml_and_json_tables_stream_into_the_table_their_whole_text_builds() {
        let mut yaml = String::from("tenants:\n");
        let mut json = serde_json::Map::new();
        for i in 0..300 {
            let key = format!("00000000-0000-0000-0000-{i:012}");
            let (name, upstream) = (format!("t{i}"), format!("http://127.0.0.1:9/r{}", i % 7));
            yaml.push_str(&format!(
                "  {key}:\n    name: {name}\n    upstream: {upstream}\n"
            ));
            if i % 50 == 3 {
                yaml.push_str(
                    "    allow_writes: true\n    upstream_headers:\n      X-Key: \"k{}\"\n",
                );
            }
            let mut entry = serde_json::json!({"name": name, "upstream": upstream});
            if i % 50 == 3 {
                entry["allow_writes"] = true.into();
                entry["upstream_headers"] = serde_json::json!({"X-Key": "k{}"});
            }
            json.insert(key, entry);
        }
        let more = format!(
            "  {A}:\n    name: a\n    upstream: https://127.0.0.1:9/r4\n    tls_verify: false\n    sni: s.example\n    connect_timeout_ms: 5\n    read_timeout_ms: 6\n    link_bases:\n      - http://old.example/r4\n"
        );
        yaml.push_str(&more);
        json.insert(
            A.to_uppercase(),
            serde_json::json!({"name": "a", "upstream": "https://127.0.0.1:9/r4", "tls_verify": false,
                "sni": "s.example", "connect_timeout_ms": 5, "read_timeout_ms": 6,
                "link_bases": ["http://old.example/r4"]}),
        );
        let json = serde_json::json!({ "tenants": json });
        let one_line = json.to_string();
        let pretty = format!("\n  {}\n", serde_json::to_string_pretty(&json).unwrap());
        // An escape in a key and in a value: serde_json copies them.
        let escaped = one_line.replacen("t10\"", "t1\\u0030\"", 1);
        assert_ne!(escaped, one_line);
        let whole = describe_routes(&load(&yaml).unwrap());
        assert_eq!(whole.len(), 301);
        for (what, text) in [
            ("YAML", &yaml),
            ("JSON", &one_line),
            ("pretty JSON", &pretty),
            ("JSON with escapes", &escaped),
        ] {
            assert_eq!(
                describe_routes(&load(text).unwrap()),
                whole,
                "{what}, whole text"
            );
            for block in [1, 7, 64, 4096, 1 << 20] {
                let table = streamed(text, block).unwrap_or_else(|| panic!("{what} declined"));
                assert_eq!(describe_routes(&table), whole, "{what}, blocks of {block}");
                assert_eq!(
                    check_streamed(text, block, &defaults()),
                    Ok(true),
                    "{what}, in memory"
                );
            }
        }
    }

    #[test]
    fn a_json_file_with_anything_wrong_is_not_streamed_but_read_whole() {
        let good = format!(
            r#"{{"tenants": {{"{A}": {{"name": "a", "upstream": "http://127.0.0.1:9/r4"}}}}}}"#
        );
        assert!(streamed(&good, 16).is_some());
        for bad in [
            good.replace("tenants", "tenantz"),
            good.replace(r#""name""#, r#""nmae""#),
            good.replace("http://", "ftp://"),
            format!("{good} x"),
            good[..good.len() - 1].to_string(),
            r#"{"tenants": {}, "tenants": {}}"#.to_string(),
            r#"{"tenants": {}}"#.to_string(),
            format!(
                r#"{{"tenants": {{"{A}": {{"name": "a", "upstream": "http://127.0.0.1:9/r4"}},
                    "{A}": {{"name": "b", "upstream": "http://127.0.0.1:9/r4"}}}}}}"#
            ),
            "{".to_string(),
            "   \n ".to_string(),
        ] {
            assert!(streamed(&bad, 16).is_none(), "{bad}");
            assert_eq!(check_streamed(&bad, 16, &defaults()), Ok(false), "{bad}");
            assert!(load(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_file_the_fast_reader_declines_part_way_is_built_afresh_by_the_general_parser() {
        // The fast reader hands over the first two entries, then declines the escape in the third:
        // nothing from the first attempt may survive (it would read as each tenant appearing twice).
        const C: &str = "00000000-0000-0000-0000-00000000000c";
        let text = format!(
            "tenants:\n  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/r4\n\
             \n  {B}:\n    name: b\n    upstream: http://127.0.0.1:9/r4\n\
             \n  {C}:\n    name: \"c\\x63\"\n    upstream: http://127.0.0.1:9/r4\n"
        );
        let mut handed = 0;
        assert!(fast_yaml::each(&text, |_, _| handed += 1).is_none());
        assert_eq!(handed, 2);
        let t = load(&text).unwrap();
        assert_eq!(t.len(), 3);
        let c = t.get(&TenantId::parse(C).unwrap()).unwrap();
        assert_eq!(&*c.name, "cc");
        // All three share one upstream, built once by the general parser's pass.
        let a = t.get(&TenantId::parse(A).unwrap()).unwrap();
        assert!(Arc::ptr_eq(&a.upstream, &c.upstream));
    }

    #[test]
    fn a_route_fits_in_64_bytes() {
        // 80 with its `Arc` counts, an allocator size class: 1.6 MB less for 100,000 tenants than
        // the 96 of a route that stored its label string.
        assert!(
            std::mem::size_of::<Route>() <= 64,
            "{}",
            std::mem::size_of::<Route>()
        );
    }

    #[test]
    fn loads_a_valid_table() {
        let t = load(&format!(
            "tenants:\n  {}:\n    name: contoso\n    upstream: http://127.0.0.1:9/r4/\n",
            A.to_uppercase()
        ))
        .unwrap();
        let r = t.get(&TenantId::parse(A).unwrap()).unwrap();
        assert_eq!(&*r.name, "contoso");
        assert_eq!(r.upstream.base_path, "/r4");
        assert_eq!(r.upstream.host, "127.0.0.1:9");
    }

    #[test]
    fn rejects_the_whole_file_and_names_every_problem() {
        let text = format!(
            "tenants:\n  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/\n  {}:\n    name: b\n    upstream: http://127.0.0.1:9/\n  not-a-guid:\n    name: c\n    upstream: http://127.0.0.1:9/\n  00000000-0000-0000-0000-000000000002:\n    name: d\n    upstream: ftp://x/\n",
            A.to_uppercase()
        );
        let p = load(&text).unwrap_err();
        assert_eq!(p.0.len(), 3, "{p}");
        assert!(p.0[0].message.contains("appears twice"));
        assert_eq!(p.0[0].line, Some(5));
        assert!(p.0[1].key.contains("not-a-guid"));
        assert!(p.0[2].key.ends_with(".upstream"));
    }

    #[test]
    fn rejects_unknown_keys_empty_files_and_missing_tenants() {
        let e = load(&format!(
            "tenants:\n  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/\n    colour: red\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        assert_eq!(e.0[0].line, Some(5));
        assert!(load("").is_err());
        assert!(load("   \n").is_err());
        assert!(load("other: 1\n").is_err());
        assert!(load("tenants:\n").is_err());
        assert!(load("tenants: {}\n").is_err());
        assert!(load(&format!("tenants:\n  {A}:\n    name: a\n    upst")).is_err());
    }

    #[test]
    fn expands_environment_references_without_echoing_values() {
        std::env::set_var("FHIR_EDGE_TEST_TOKEN", "s3cret");
        assert_eq!(
            expand_env("Bearer ${FHIR_EDGE_TEST_TOKEN}").unwrap(),
            "Bearer s3cret"
        );
        assert_eq!(expand_env("a$b").unwrap(), "a$b");
        let e = expand_env("${FHIR_EDGE_TEST_MISSING_VAR}").unwrap_err();
        assert!(e.contains("FHIR_EDGE_TEST_MISSING_VAR"));
        assert!(expand_env("${unterminated").is_err());
        assert!(expand_env("${1X}").is_err());
    }

    #[test]
    fn reserved_headers_cannot_be_configured() {
        let e = load(&format!("tenants:\n  {A}:\n    name: a\n    upstream: http://127.0.0.1:9/\n    upstream_headers:\n      Host: x\n")).unwrap_err();
        assert!(e.to_string().contains("set by the proxy"), "{e}");
    }
}
