//! persona: switchable network identities for VMs.
//!
//! `model` holds what operators write, `datapath` turns it into BPF map tables and
//! applies it to tap devices, `host` wires the host's routes and neighbour proxies.
pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod datapath;
pub mod host;
pub mod metrics;
pub mod model;
pub mod orchestrator;
pub mod rules;
pub mod security;
pub mod store;
pub mod tls_applier;
pub mod tunnel;
