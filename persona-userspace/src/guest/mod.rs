//! The guest's side of a persona: what a VM is told about itself on its own tap.
pub mod dhcp;
pub mod ipv6;
pub mod metadata;
pub mod responder;
