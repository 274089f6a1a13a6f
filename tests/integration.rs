//! fhir-edge integration tests: the real binary, stub upstreams and real clients over loopback.
//! One file per behaviour.
#![allow(unreachable_pub)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

mod audit_route;
mod authentication;
mod claim_types;
mod cli;
mod clients;
mod discovery;
mod embedding;
mod errors;
mod forwarding;
mod hardening;
mod idp;
mod isolation;
mod lifecycle;
mod metadata;
mod operations;
mod portal;
mod proxy_protocol;
mod registry;
mod reload;
mod rewriting;
mod signatures;
mod storm;
mod tls;
mod token;
mod wire;
