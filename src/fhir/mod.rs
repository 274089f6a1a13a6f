//! FHIR knowledge: which paths and methods a request may use ([`classify`]), which batch Bundles only
//! read ([`batch`]), how upstream URLs in responses become public ones ([`rewrite`]), the discovery
//! documents fhir-edge serves itself ([`discovery`]; the CapabilityStatement is built by
//! [`capability`]), and the FHIR words a log may repeat ([`vocabulary`]).

pub(crate) mod batch;
pub(crate) mod capability;
pub(crate) mod classify;
pub(crate) mod discovery;
pub(crate) mod pct;
pub(crate) mod rewrite;
pub(crate) mod vocabulary;
