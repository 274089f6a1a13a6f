//! FHIR knowledge: which paths and methods a request may use ([`classify`]), which batch Bundles only
//! read ([`batch`]), how upstream URLs in responses become public ones ([`rewrite`]), and the discovery
//! documents fhir-edge serves itself ([`discovery`]).

pub mod batch;
pub mod classify;
pub mod discovery;
pub mod pct;
pub mod rewrite;
