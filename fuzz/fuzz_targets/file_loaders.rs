//! The routing-table and client-registry loaders on arbitrary text: a table or a list of problems,
//! never a panic. And differential: where a routing table is built as its file streams by (YAML in
//! the fast reader's shape, or JSON), it must be the table its whole text builds, or a reload would
//! route by a table depending on how the file was read; a disagreement is a crash here.
#![no_main]

use std::path::Path;
use std::time::Duration;

use fhir_edge::config::RouteDefaults;
use fhir_edge::ops::metrics::TenantLabel;
use fhir_edge::reload::Loadable;
use fhir_edge::routing::RoutingTable;
use fhir_edge::token::clients::ClientRegistry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let defaults = RouteDefaults {
        connect_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ca_der: None,
        public_base: "https://edge.example/fhir".into(),
        tenant_label: TenantLabel::Name,
    };
    let _ = RoutingTable::from_text(Path::new("routes.yaml"), text, &defaults);
    // Blocks from 1 to 64 bytes, varying with the input, so entries and lines are cut everywhere.
    let block = 1 + data.len() % 64;
    if let Err(disagreement) = fhir_edge::routing::check_streamed(text, block, &defaults) {
        panic!(
            "the streamed build and the whole-text build disagree (blocks of {block})\n{disagreement}"
        );
    }
    let _ = <ClientRegistry as Loadable>::from_text(Path::new("clients.yaml"), text, &());
});
