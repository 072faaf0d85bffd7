//! The metadata service's packets: a VM's request leaves for the host's stack from the
//! device's peer address, and the answer to that address comes back from the service.
use persona_common::{
    FAMILY_V4, PROTO_TCP,
    counters::Reason,
    metadata::{METADATA_PORT, METADATA_V4},
};

use crate::{
    maps::METADATA,
    parse::{Ip, L4, narrow, widen},
    plan::{OUTER_DST, OUTER_SRC, Plan},
};

#[inline(always)]
pub fn is_request(ip: &Ip) -> bool {
    ip.family == FAMILY_V4 && narrow(&ip.dst) == METADATA_V4
}

#[inline(always)]
fn peer(ifindex: u32) -> Option<[u8; 4]> {
    // SAFETY: the value is copied out at once.
    unsafe { METADATA.get(ifindex) }.map(|p| p.addr)
}

/// A request from the VM: only TCP to the service's port of a device that has one.
#[inline(always)]
pub fn request(ifindex: u32, ip: &Ip, l4: &L4, plan: &mut Plan) -> Reason {
    if ip.proto != PROTO_TCP || l4.dport != METADATA_PORT {
        return Reason::DropMetadata;
    }
    match peer(ifindex) {
        Some(addr) => {
            plan.src = widen(addr);
            plan.flags = OUTER_SRC;
            Reason::HostMetadata
        }
        None => Reason::DropMetadata,
    }
}

/// An answer of the service to this device's peer address, which the VM must see
/// addressed to itself; `None` for any other packet.
#[inline(always)]
pub fn answer(ifindex: u32, ip: &Ip, l4: &L4, inner: [u8; 16], plan: &mut Plan) -> Option<Reason> {
    if ip.family != FAMILY_V4
        || ip.proto != PROTO_TCP
        || l4.sport != METADATA_PORT
        || narrow(&ip.src) != METADATA_V4
        || peer(ifindex)? != narrow(&ip.dst)
    {
        return None;
    }
    plan.dst = inner;
    plan.flags = OUTER_DST;
    Some(Reason::HostMetadata)
}
