//! Entry points only: the packet path is `path.rs`, with what differs by direction in
//! `from_vm.rs` and `to_vm.rs`.
// The programs only exist for the BPF target; built for the host (a workspace-wide
// `cargo clippy`), the crate is a stub with std's panic handler and a `main`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod conntrack;
mod counters;
mod csum;
mod dns;
mod events;
mod firewall;
mod from_vm;
mod maps;
mod nat;
mod packet;
mod parse;
mod path;
mod plan;
mod state;
mod to_vm;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use persona_common::{DIR_EGRESS, DIR_INGRESS};

use crate::packet::{Packet as _, TcPacket, XdpPacket};

/// Traffic leaving the VM, as it arrives on the tap.
#[xdp]
pub fn persona_from_vm(ctx: XdpContext) -> u32 {
    let mut pkt = XdpPacket::from_raw(ctx.ctx);
    let handled = path::handle::<_, from_vm::FromVm>(&mut pkt);
    let reason = handled.reason();
    counters::count(pkt.ifindex, handled.persona(), DIR_EGRESS, reason, pkt.len);
    if events::is_reported(reason) {
        events::report_drop::<XdpPacket>(pkt.raw(), DIR_EGRESS, reason as u8);
    }
    if reason.passes() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// Traffic going to the VM, as it leaves the host through the tap (tcx egress).
#[classifier]
pub fn persona_to_vm(ctx: TcContext) -> i32 {
    let mut pkt = TcPacket::pulled(ctx.skb.skb);
    let handled = path::handle::<_, to_vm::ToVm>(&mut pkt);
    let reason = handled.reason();
    counters::count(pkt.ifindex, handled.persona(), DIR_INGRESS, reason, pkt.len);
    if events::is_reported(reason) {
        events::report_drop::<TcPacket>(pkt.raw(), DIR_INGRESS, reason as u8);
    }
    if reason.passes() {
        TC_ACT_OK
    } else {
        TC_ACT_SHOT
    }
}

/// Does nothing: the floor BPF_PROG_TEST_RUN measurements are compared against.
#[xdp]
pub fn persona_baseline_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
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
