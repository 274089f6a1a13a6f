//! Differential: a routing table written as JSON is YAML too, and the two readers must build the
//! same table from it. Generated tables are JSON (read by serde_json); an operator converting one to
//! YAML, or a JSON file whose first character is not `{`, goes to serde-saphyr. Where both readers
//! accept a text and the tables differ, tenants would be routed by which reader ran: a crash here.
#![no_main]

use std::path::Path;
use std::time::Duration;

use fhir_edge::internals::config::RouteDefaults;
use fhir_edge::internals::ops::metrics::TenantLabel;
use fhir_edge::internals::reload::parse::Syntax;
use fhir_edge::internals::routing::{RoutingTable, TableContext};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if Syntax::of(text) != Syntax::Json {
        return;
    }
    let ctx = TableContext::offline(RouteDefaults {
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ca_der: None,
        public_base: "https://edge.example/fhir".into(),
        tenant_label: TenantLabel::Name,
        limits: Default::default(),
        health: Default::default(),
    });
    let path = Path::new("routes.json");
    let json = RoutingTable::from_text_as(Syntax::Json, path, text, &ctx);
    let yaml = RoutingTable::from_text_as(Syntax::Yaml, path, text, &ctx);
    if let (Ok(json), Ok(yaml)) = (json, yaml) {
        let (json, yaml) = (json.describe(), yaml.describe());
        assert!(
            json == yaml,
            "the JSON and YAML readers built different tables\nJSON: {json:?}\nYAML: {yaml:?}"
        );
    }
});
