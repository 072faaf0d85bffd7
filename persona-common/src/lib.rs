//! Types shared between the persona eBPF programs and userspace.
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, carries its padding explicitly and
//! has its size asserted, so both sides agree byte for byte. Addresses are kept as byte
//! arrays in network order; an IPv4 address occupies the first four bytes of a
//! sixteen-byte address where one type holds both families.
#![no_std]

pub mod conntrack;
pub mod counters;
pub mod device;
pub mod events;
pub mod firewall;
pub mod guard;
pub mod host;
pub mod metadata;
pub mod persona;
pub mod qos;

/// Traffic leaving the VM: received on the tap, handled by tc (tcx) ingress.
pub const DIR_EGRESS: u8 = 0;
/// Traffic going to the VM: sent out of the tap, handled by TC (tcx) egress.
pub const DIR_INGRESS: u8 = 1;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// Names of the maps in the object file, pinned under the same names.
pub mod map_names {
    pub const DEVICES: &str = "DEVICES";
    pub const ACTIVE: &str = "ACTIVE";
    pub const PERSONAS: &str = "PERSONAS";
    pub const FW_V4: &str = "FW_V4";
    pub const FW_V6: &str = "FW_V6";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const COUNTERS: &str = "COUNTERS";
    pub const FOLDED: &str = "FOLDED";
    pub const TRACKED: &str = "TRACKED";
    pub const HOST_WIRING: &str = "HOST_WIRING";
    pub const EVENTS: &str = "EVENTS";
    pub const HANDSHAKES: &str = "HANDSHAKES";
    pub const GUARD: &str = "GUARD";
    pub const ROUTING: &str = "ROUTING";
    pub const DRAINS: &str = "DRAINS";
    pub const FLOW_BUDGET: &str = "FLOW_BUDGET";
    pub const METADATA: &str = "METADATA";
    pub const QOS: &str = "QOS";
}

pub mod program_names {
    pub const FROM_VM: &str = "persona_from_vm";
    pub const TO_VM: &str = "persona_to_vm";
    pub const GUARD: &str = "persona_guard";
    pub const FROM_UPLINK: &str = "persona_from_uplink";
    pub const TO_UPLINK: &str = "persona_to_uplink";
    pub const BASELINE: &str = "persona_baseline_pass";
    pub const BASELINE_TC: &str = "persona_baseline_tc_pass";
    pub const BASELINE_TC_LOOKUP: &str = "persona_baseline_tc_lookup";
}

#[cfg(feature = "user")]
mod pod {
    use crate::{
        conntrack, counters, device, events, firewall, guard, host, metadata, persona, qos,
    };

    macro_rules! pod {
        ($($t:ty),* $(,)?) => {
            $(
                // SAFETY: repr(C), Copy, every byte (padding included) is an explicit field.
                unsafe impl aya::Pod for $t {}
            )*
        };
    }

    pod!(
        device::DeviceConfig,
        persona::Active,
        persona::PersonaTable,
        firewall::FwKeyV4,
        firewall::FwKeyV6,
        firewall::RuleSet,
        conntrack::CtKey,
        conntrack::CtEntry,
        conntrack::FlowBudget,
        counters::CounterKey,
        counters::Counter,
        counters::HandshakeKey,
        host::HostWiring,
        host::Routing,
        host::DrainKey,
        host::Drain,
        events::DropEvent,
        guard::GuardState,
        metadata::MetadataPeer,
        qos::Qos,
    );
}
