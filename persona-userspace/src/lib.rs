//! persona: switchable network identities for VMs.
//!
//! `model` holds what operators write, `datapath` turns it into BPF map tables and
//! applies it to tap devices, `host` wires the host's routes and neighbour proxies,
//! `node` drives both as one, and `orchestrator` runs a shift as a transaction.
pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod fleet;
pub mod guest;
pub mod host;
pub mod keys;
pub mod links;
pub mod metrics;
pub mod model;
pub mod multimap;
pub mod node;
pub mod orchestrator;
pub mod rules;
pub mod security;
pub mod service;
pub mod store;
pub mod tls_applier;
pub mod tunnel;
