//! Host routing in BPF, the way Cilium's BPF host routing does it: a translated packet
//! is forwarded by the program itself, with a FIB lookup (which honours the persona's
//! `from ADDR` rule) and a redirect, and skips the host's IP stack. Whatever the lookup
//! cannot finish goes the kernel's way: local delivery, a tunnel, an MTU to report, an
//! unresolved neighbour, an expiring TTL, an interface that is neither an uplink nor a
//! device.
use core::{ffi::c_void, mem};

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup as FibLookup,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use persona_common::{
    host::{ROUTE_IN_BPF, Routing},
    metadata::METADATA_V4,
};

use crate::{
    csum,
    maps::{ACTIVE, ROUTING},
    packet::{Packet, TcPacket, load},
    parse::{self, L3, V4_CHECK, V4_OFF, V6_OFF},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const V4_TTL: usize = V4_OFF + mem::offset_of!(Ipv4Hdr, ttl);
const V6_HOP_LIMIT: usize = V6_OFF + mem::offset_of!(Ipv6Hdr, hop_limit);
const ETH_ADDRS: usize = 12;

#[inline(always)]
fn routing() -> Option<&'static Routing> {
    ROUTING.get(0).filter(|r| r.flags & ROUTE_IN_BPF != 0)
}

/// A packet the VM sent, translated and admitted: straight out of an uplink.
#[inline(never)]
pub fn from_vm(skb: *mut __sk_buff) -> i32 {
    let Some(routing) = routing() else {
        return TC_ACT_OK;
    };
    let uplinks = routing.uplinks;
    forward(skb, |oif| oif != 0 && uplinks.contains(&oif))
}

/// A packet arriving on an uplink for a device with a persona: straight to the tap,
/// whose egress program translates it for the VM.
#[inline(never)]
pub fn from_uplink(skb: *mut __sk_buff) -> i32 {
    if routing().is_none() {
        return TC_ACT_OK;
    }
    // SAFETY: only compared against null.
    forward(skb, |oif| unsafe { ACTIVE.get(oif) }.is_some())
}

#[inline(always)]
fn forward(skb: *mut __sk_buff, allowed: impl Fn(u32) -> bool) -> i32 {
    let mut p = TcPacket::from_raw(skb);
    // SAFETY: plain data, valid when zeroed.
    let mut fib: FibLookup = unsafe { mem::zeroed() };
    let v4 = match parse::l3(&p) {
        Ok(L3::V4) => {
            let Ok(h) = load::<Ipv4Hdr, _>(&p, V4_OFF) else {
                return TC_ACT_OK;
            };
            if h.ttl <= 1 {
                return TC_ACT_OK;
            }
            // Only the host's own metadata service sends from its address, and only to
            // a tap: from the network it is forged, and would reach a VM past its firewall.
            if h.src_addr == METADATA_V4 {
                return TC_ACT_SHOT;
            }
            fib.family = AF_INET;
            fib.l4_protocol = h.proto;
            fib.__bindgen_anon_2.tos = h.tos;
            fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(h.src_addr);
            fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(h.dst_addr);
            true
        }
        Ok(L3::V6) => {
            let Ok(h) = load::<Ipv6Hdr, _>(&p, V6_OFF) else {
                return TC_ACT_OK;
            };
            if h.hop_limit <= 1 {
                return TC_ACT_OK;
            }
            fib.family = AF_INET6;
            fib.l4_protocol = h.next_hdr;
            fib.__bindgen_anon_3.ipv6_src = words(h.src_addr);
            fib.__bindgen_anon_4.ipv6_dst = words(h.dst_addr);
            false
        }
        _ => return TC_ACT_OK,
    };
    fib.ifindex = p.ifindex;
    // tot_len 0: the kernel checks the skb itself against the MTU, GSO included.
    // SAFETY: the context and a lookup structure of the size given.
    let rc = unsafe {
        bpf_fib_lookup(
            skb as *mut c_void,
            &mut fib,
            mem::size_of::<FibLookup>() as i32,
            0,
        )
    } as u32;
    let oif = fib.ifindex;
    // Anything but a complete answer goes the kernel's way: an unresolved neighbour is
    // resolved there (and the MTU checked, which the lookup only does on success).
    if rc != BPF_FIB_LKUP_RET_SUCCESS || !allowed(oif) {
        return TC_ACT_OK;
    }
    let mut macs = [0u8; ETH_ADDRS];
    macs[..6].copy_from_slice(&fib.dmac);
    macs[6..].copy_from_slice(&fib.smac);
    if p.store(0, &macs).is_err() || decrement_ttl(&mut p, v4).is_err() {
        return TC_ACT_OK;
    }
    // SAFETY: a helper taking plain values.
    unsafe { bpf_redirect(oif, 0) as i32 }
}

#[inline(always)]
fn words(a: [u8; 16]) -> [u32; 4] {
    // SAFETY: same size, any bit pattern is valid.
    unsafe { mem::transmute(a) }
}

/// What the host's forwarding would have done to the hop count.
#[inline(always)]
fn decrement_ttl(p: &mut TcPacket, v4: bool) -> Result<(), ()> {
    if v4 {
        let old: [u8; 2] = load(p, V4_TTL).map_err(|_| ())?;
        let new = [old[0].wrapping_sub(1), old[1]];
        p.store(V4_TTL, &new).map_err(|_| ())?;
        let diff = csum::diff16(u16::from_ne_bytes(old), u16::from_ne_bytes(new));
        p.fix_l3_csum(V4_CHECK, diff).map_err(|_| ())
    } else {
        let hops: [u8; 1] = load(p, V6_HOP_LIMIT).map_err(|_| ())?;
        p.store(V6_HOP_LIMIT, &[hops[0].wrapping_sub(1)])
            .map_err(|_| ())
    }
}
