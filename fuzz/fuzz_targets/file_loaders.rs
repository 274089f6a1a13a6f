//! The routing-table and client-registry loaders on arbitrary text, in either syntax: a table or a
//! list of problems, never a panic, and within the readers' limits (nesting, aliases, anchors).
//! Offline, so no input makes the target resolve host names.
#![no_main]

use std::path::Path;
use std::time::Duration;

use fhir_edge::internals::config::RouteDefaults;
use fhir_edge::internals::ops::metrics::TenantLabel;
use fhir_edge::internals::reload::Loadable;
use fhir_edge::internals::routing::{RoutingTable, TableContext};
use fhir_edge::internals::token::clients::ClientRegistry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
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
    let _ = RoutingTable::from_text(Path::new("routes.yaml"), text, &ctx);
    let _ = <ClientRegistry as Loadable>::from_text(Path::new("clients.yaml"), text, &());
});
