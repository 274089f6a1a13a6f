//! FHIR knowledge: which paths and methods a request may use ([`classify`]), which batch Bundles only
//! read ([`batch`]), how upstream URLs in responses become public ones ([`rewrite`]), the discovery
//! documents fhir-edge serves itself ([`discovery`]; the CapabilityStatement is built by
//! [`capability`]), and the FHIR words a log may repeat ([`vocabulary`]).

pub mod batch;
pub mod capability;
pub mod classify;
pub mod discovery;
pub mod pct;
pub mod rewrite;
pub mod vocabulary;
