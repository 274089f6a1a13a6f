//! The routing table's file format: `routes.yaml`, or the same document written as JSON.
//!
//! Plain data: serde structs that refuse unknown keys and duplicate keys, and a reader that hands
//! each tenant's entry to its caller as the parser reaches it, so no list of 100,000 parsed entries
//! (nor any node tree) ever exists. What the values mean is checked by [`crate::routing`], which
//! builds the table from these entries; which syntax a file is in, and its limits, are
//! [`crate::reload::parse`]'s.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// One tenant's entry as the file states it. Strings borrow from the file's text where the parser
/// allows (serde_json, for values without escapes); the entry is dropped as soon as its route is built.
#[derive(Deserialize, Debug, PartialEq, schemars::JsonSchema)]
#[schemars(description = "One tenant's route")]
#[serde(deny_unknown_fields)]
pub(crate) struct TenantEntry<'t> {
    #[serde(borrow)]
    pub name: Cow<'t, str>,
    /// The tenant's FHIR server (base URL); or `upstreams`, several nodes of one server.
    #[serde(default, borrow)]
    pub upstream: Option<Cow<'t, str>>,
    /// Several base URLs serving the same data, requests spread over them (`balance`); failing
    /// nodes are taken out of rotation (docs/isolation.md).
    #[serde(default, borrow)]
    pub upstreams: Vec<Cow<'t, str>>,
    #[serde(default)]
    pub balance: crate::routing::nodes::Balance,
    /// Request limits of this tenant (each key overrides `tenant_limits` in fhir-edge.yaml).
    #[serde(default)]
    pub limits: Option<crate::config::limits::LimitSpec>,
    #[serde(default = "yes")]
    pub tls_verify: bool,
    #[serde(default, borrow)]
    pub ca_file: Option<Cow<'t, str>>,
    #[serde(default, borrow)]
    pub sni: Option<Cow<'t, str>>,
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub read_timeout_ms: Option<u64>,
    #[serde(default, borrow)]
    pub upstream_headers: Headers<'t>,
    #[serde(default)]
    pub allow_writes: bool,
    /// Other base URLs this upstream puts in its links (rewritten to the public base too).
    #[serde(default, borrow)]
    pub link_bases: Vec<Cow<'t, str>>,
}

fn yes() -> bool {
    true
}

/// `upstream_headers` in file order. A name given twice, spelled exactly the same, is refused here
/// (a map would keep the last one silently, and serde_json does not refuse it); spellings that differ
/// only in case are refused when the route is built, as header names are case-insensitive.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Headers<'t>(pub Vec<(Cow<'t, str>, Cow<'t, str>)>);

impl schemars::JsonSchema for Headers<'_> {
    fn schema_name() -> Cow<'static, str> {
        "UpstreamHeaders".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Header name → value, sent upstream with every request of the tenant",
            "type": "object",
            "additionalProperties": {"type": "string"}
        })
    }
}

/// The routing file as a whole, for its JSON Schema (the reader streams it instead).
#[derive(schemars::JsonSchema)]
#[schemars(
    description = "fhir-edge's routing table: tenant GUID → that tenant's upstream FHIR server (docs/routing.md)"
)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(crate) struct RoutesFile<'t> {
    /// Tenant GUID → its route.
    tenants: std::collections::BTreeMap<String, TenantEntry<'t>>,
}

impl<'de: 't, 't> Deserialize<'de> for Headers<'t> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct HeadersVisitor;
        impl<'de> Visitor<'de> for HeadersVisitor {
            type Value = Headers<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of header names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Headers<'de>, A::Error> {
                let mut list: Vec<(Cow<'de, str>, Cow<'de, str>)> = Vec::new();
                while let Some(name) = m.next_key::<Text<'de>>()? {
                    // Names only: a header value may be a credential.
                    if list.iter().any(|(n, _)| *n == name.0) {
                        return Err(de::Error::custom(format_args!(
                            "header `{}` is given twice",
                            name.0
                        )));
                    }
                    let value = m.next_value::<Text<'de>>()?;
                    list.push((name.0, value.0));
                }
                Ok(Headers(list))
            }
        }
        d.deserialize_map(HeadersVisitor)
    }
}

/// A string that borrows from the text where the parser can. `Cow<str>`'s own `Deserialize` always
/// copies, and serde's `borrow` attribute cannot reach map keys.
pub(crate) struct Text<'t>(pub Cow<'t, str>);

impl<'de: 't, 't> Deserialize<'de> for Text<'t> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(TextVisitor)
    }
}

/// The document (`tenants`, and no other key, exactly once), handing each tenant's key and entry to
/// `each` in file order. `at` is the key path being read (`tenants.<key>`), so that a parse error,
/// which names only the field, is reported with the entry it is in.
pub(crate) struct RoutesDocument<'a, F> {
    pub each: F,
    pub at: &'a mut String,
}

impl<'de, F: FnMut(Cow<'de, str>, TenantEntry<'de>)> DeserializeSeed<'de>
    for RoutesDocument<'_, F>
{
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(Cow<'de, str>, TenantEntry<'de>)> Visitor<'de> for RoutesDocument<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a routing table (a mapping with the key `tenants`)")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut m: A) -> Result<(), A::Error> {
        let mut seen = false;
        self.at.clear();
        while let Some(key) = m.next_key::<Text<'de>>()? {
            if key.0 != "tenants" {
                return Err(de::Error::unknown_field(&key.0, &["tenants"]));
            }
            if seen {
                return Err(de::Error::duplicate_field("tenants"));
            }
            seen = true;
            "tenants".clone_into(self.at);
            m.next_value_seed(Tenants(&mut self))?;
            self.at.clear();
        }
        if !seen {
            return Err(de::Error::missing_field("tenants"));
        }
        Ok(())
    }
}

/// The `tenants` mapping, each entry handed on as it is read.
struct Tenants<'d, 'a, F>(&'d mut RoutesDocument<'a, F>);

impl<'de, F: FnMut(Cow<'de, str>, TenantEntry<'de>)> DeserializeSeed<'de> for Tenants<'_, '_, F> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(Cow<'de, str>, TenantEntry<'de>)> Visitor<'de> for Tenants<'_, '_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping of tenant GUIDs to their routes")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        while let Some(key) = m.next_key::<Text<'de>>()? {
            self.0.at.clear();
            self.0.at.push_str("tenants.");
            self.0.at.push_str(&key.0);
            let entry = m.next_value::<TenantEntry<'de>>()?;
            (self.0.each)(key.0, entry);
            // Between entries, a problem is in the mapping, not in the entry just read.
            "tenants".clone_into(self.0.at);
        }
        Ok(())
    }
}
