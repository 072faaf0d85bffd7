//! Entry points only: the packet path is `path.rs`, with what differs by direction in
//! `from_vm.rs` and `to_vm.rs`.
// The programs only exist for the BPF target; built for the host (a workspace-wide
// `cargo clippy`), the crate is a stub with std's panic handler and a `main`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "atomic_xadd: see conntrack::add_one")
)]

mod baseline;
mod conntrack;
mod counters;
mod csum;
mod dns;
mod events;
mod firewall;
mod forward;
mod from_vm;
mod guard;
mod maps;
mod metadata;
mod nat;
mod packet;
mod parse;
mod path;
mod plan;
mod qos;
mod state;
mod to_vm;

use aya_ebpf::{
    bindings::{__sk_buff, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use persona_common::counters::Reason;

use crate::{
    packet::{Packet as _, TcPacket},
    path::Direction,
};

/// Traffic leaving the VM, as the host receives it from the tap (tcx ingress). In tc
/// the skb knows whether its L4 checksum is partial, and a GSO skb is rewritten once
/// for all its segments.
#[classifier]
pub fn persona_from_vm(ctx: TcContext) -> i32 {
    match tc_entry::<from_vm::FromVm>(ctx.skb.skb) {
        r if r.translated() => forward::from_vm(ctx.skb.skb),
        r if r.passes() => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

/// Traffic going to the VM, as it leaves the host through the tap (tcx egress).
#[classifier]
pub fn persona_to_vm(ctx: TcContext) -> i32 {
    if tc_entry::<to_vm::ToVm>(ctx.skb.skb).passes() {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// Traffic leaving by an uplink (tcx egress): a VM's packet gets the HTB class its
/// persona's QoS handed it in the mark.
#[classifier]
pub fn persona_to_uplink(ctx: TcContext) -> i32 {
    qos::to_uplink(ctx.skb.skb)
}

/// Traffic arriving on an uplink (tcx ingress): what the FIB routes to a device's tap is
/// redirected there, past the host's IP stack; everything else is left alone.
#[classifier]
pub fn persona_from_uplink(ctx: TcContext) -> i32 {
    forward::from_uplink(ctx.skb.skb)
}

#[inline(always)]
fn tc_entry<D: Direction>(skb: *mut __sk_buff) -> Reason {
    let direction = D::DIRECTION;
    let mut pkt = TcPacket::pulled(skb);
    let mut handled = path::handle::<_, D>(&mut pkt);
    if handled.reason().translated() {
        let applied = qos::apply(skb, handled.table(), direction);
        if !applied.passes() {
            handled = handled.with(applied);
        }
    }
    let reason = handled.reason();
    counters::count(pkt.ifindex, handled, direction, pkt.on_wire());
    if events::is_reported(reason) {
        events::report_drop::<TcPacket>(pkt.raw(), direction, reason as u8);
    }
    reason
}

/// The optional flood guard on the tap's XDP hook: drops what the tc program would
/// drop anyway before an skb is built for it, and never changes a byte.
#[xdp]
pub fn persona_guard(ctx: XdpContext) -> u32 {
    guard::run(ctx.ctx)
}

/// Does nothing: the floor BPF_PROG_TEST_RUN measurements of XDP are compared against.
#[xdp]
pub fn persona_baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The same floor for tc.
#[classifier]
pub fn persona_baseline_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// A tc program that does one hash lookup (the device's `ACTIVE` entry): what a
/// tracked flow's cost is compared against.
#[classifier]
pub fn persona_baseline_tc_lookup(ctx: TcContext) -> i32 {
    baseline::one_lookup(ctx.skb.skb)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
