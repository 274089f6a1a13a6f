//! Differential: whenever the routing table's fast YAML reader accepts a text, the general YAML
//! parser must read exactly the same tenants and fields from it, and the fast reader must read the
//! same when the text comes one line at a time (a large file is read in blocks). A disagreement
//! would load a different table depending on which reader ran, or where a block ended, so it is a
//! crash here.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(disagreement) = fhir_edge::routing::check_fast_yaml(text) {
        panic!("the fast YAML reader and the general parser disagree\n{disagreement}");
    }
});
