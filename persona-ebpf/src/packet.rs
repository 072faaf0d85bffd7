//! Bounds-checked access to the frame, and the two ways of changing it: direct writes
//! in XDP, helpers in TC (where the skb may carry a partial checksum that only
//! `bpf_l4_csum_replace` knows how to update).
use aya_ebpf::{
    bindings::{__sk_buff, xdp_md},
    programs::TcContext,
};
use persona_common::counters::Reason;

use crate::{csum, parse};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
/// Headers the TC program reads or writes, the quoted ones of an ICMPv6 error included.
const TC_PULL_LEN: u32 = 160;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4Csum {
    /// Covers only the L4 header and payload (ICMPv4, or a change inside the payload).
    Plain,
    /// Covers the IP pseudo-header as well (TCP, ICMPv6).
    Pseudo,
    /// UDP: a zero checksum means "none" and stays zero; a computed zero is sent as 0xffff.
    UdpPseudo,
}

/// Subprograms take the raw context pointer, which the verifier tracks in a register,
/// and rebuild their packet view from it: packet pointers passed through the stack
/// into a subprogram lose their type.
pub trait Packet: Sized {
    type Raw: Copy;
    fn from_raw(raw: Self::Raw) -> Self;
    fn raw(&self) -> Self::Raw;
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn ifindex(&self) -> u32;
    fn store<const N: usize>(&mut self, off: usize, bytes: &[u8; N]) -> Result<(), Reason>;
    fn fix_l3_csum(&mut self, off: usize, diff: u32) -> Result<(), Reason>;
    fn fix_l4_csum(&mut self, off: usize, diff: u32, kind: L4Csum) -> Result<(), Reason>;
}

/// No header the programs touch lies further in than this.
const MAX_OFFSET: usize = 256;

#[inline(always)]
pub fn ptr_at<T, P: Packet>(p: &P, off: usize) -> Result<*mut T, Reason> {
    // Offsets that crossed into a subprogram are unknown to the verifier: bound them
    // before any pointer arithmetic.
    if off > MAX_OFFSET {
        return Err(Reason::DropTruncated);
    }
    let start = p.data();
    if start + off + core::mem::size_of::<T>() > p.data_end() {
        return Err(Reason::DropTruncated);
    }
    Ok((start + off) as *mut T)
}

#[inline(always)]
pub fn load<T: Copy, P: Packet>(p: &P, off: usize) -> Result<T, Reason> {
    let ptr = ptr_at::<T, P>(p, off)?;
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the frame.
    Ok(unsafe { ptr.read_unaligned() })
}

#[inline(always)]
pub fn load_u16<P: Packet>(p: &P, off: usize) -> Result<u16, Reason> {
    load::<[u8; 2], P>(p, off).map(u16::from_ne_bytes)
}

pub struct XdpPacket {
    raw: *mut xdp_md,
    data: usize,
    data_end: usize,
    pub ifindex: u32,
    pub len: u64,
}

impl XdpPacket {
    #[inline(always)]
    fn fix_csum(&mut self, off: usize, diff: u32, udp: bool) -> Result<(), Reason> {
        let ptr = ptr_at::<[u8; 2], Self>(self, off)?;
        // SAFETY: bounds checked by `ptr_at`.
        let old = u16::from_ne_bytes(unsafe { ptr.read_unaligned() });
        if udp && old == 0 {
            return Ok(());
        }
        let mut new = csum::apply(old, diff);
        if udp && new == 0 {
            new = 0xffff;
        }
        // SAFETY: as above.
        unsafe { ptr.write_unaligned(new.to_ne_bytes()) };
        Ok(())
    }
}

impl Packet for XdpPacket {
    type Raw = *mut xdp_md;

    #[inline(always)]
    fn from_raw(raw: *mut xdp_md) -> Self {
        // SAFETY: reading fields of the context the kernel handed us.
        let (data, data_end, ifindex) = unsafe {
            (
                (*raw).data as usize,
                (*raw).data_end as usize,
                (*raw).ingress_ifindex,
            )
        };
        Self {
            raw,
            data,
            data_end,
            ifindex,
            len: (data_end - data) as u64,
        }
    }
    #[inline(always)]
    fn raw(&self) -> *mut xdp_md {
        self.raw
    }
    #[inline(always)]
    fn data(&self) -> usize {
        self.data
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.data_end
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ifindex
    }
    #[inline(always)]
    fn store<const N: usize>(&mut self, off: usize, bytes: &[u8; N]) -> Result<(), Reason> {
        let ptr = ptr_at::<[u8; N], Self>(self, off)?;
        // SAFETY: bounds checked by `ptr_at`.
        unsafe { ptr.write_unaligned(*bytes) };
        Ok(())
    }
    #[inline(always)]
    fn fix_l3_csum(&mut self, off: usize, diff: u32) -> Result<(), Reason> {
        self.fix_csum(off, diff, false)
    }
    #[inline(always)]
    fn fix_l4_csum(&mut self, off: usize, diff: u32, kind: L4Csum) -> Result<(), Reason> {
        self.fix_csum(off, diff, kind == L4Csum::UdpPseudo)
    }
}

pub struct TcPacket {
    ctx: TcContext,
    pub ifindex: u32,
    pub len: u64,
}

impl TcPacket {
    /// Makes the headers linear and writable first: what follows reads them directly.
    #[inline(always)]
    pub fn pulled(raw: *mut __sk_buff) -> Self {
        let p = Self::from_raw(raw);
        let len = p.ctx.len();
        // A failed pull leaves the headers non-linear; parsing then reports them truncated.
        let _ = p
            .ctx
            .pull_data(if len < TC_PULL_LEN { len } else { TC_PULL_LEN });
        p
    }

    /// What the skb stands for on the wire: a GSO skb is `gso_segs` frames, each with
    /// its own copy of the headers.
    #[inline(always)]
    pub fn on_wire(&self) -> Wire {
        // SAFETY: reading a field of the context the kernel handed us.
        let segs = unsafe { (*self.ctx.skb.skb).gso_segs } as u64;
        if segs <= 1 {
            return Wire::new(1, self.len);
        }
        let headers = parse::headers_len(self).unwrap_or(0) as u64;
        Wire::new(segs, self.len + (segs - 1) * headers)
    }
}

/// Packets and bytes in one register (segments in the top 16 bits): the counting
/// subprogram has no argument to spare.
#[derive(Clone, Copy)]
pub struct Wire(u64);

impl Wire {
    #[inline(always)]
    pub fn new(packets: u64, bytes: u64) -> Self {
        Self((packets << 48) | (bytes & ((1 << 48) - 1)))
    }

    #[inline(always)]
    pub fn packets(self) -> u64 {
        self.0 >> 48
    }

    #[inline(always)]
    pub fn bytes(self) -> u64 {
        self.0 & ((1 << 48) - 1)
    }
}

impl Packet for TcPacket {
    type Raw = *mut __sk_buff;

    #[inline(always)]
    fn from_raw(raw: *mut __sk_buff) -> Self {
        let ctx = TcContext::new(raw);
        Self {
            // SAFETY: reading a field of the context the kernel handed us.
            ifindex: unsafe { (*raw).ifindex },
            len: ctx.len() as u64,
            ctx,
        }
    }
    #[inline(always)]
    fn raw(&self) -> *mut __sk_buff {
        self.ctx.skb.skb
    }
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ifindex
    }
    #[inline(always)]
    fn store<const N: usize>(&mut self, off: usize, bytes: &[u8; N]) -> Result<(), Reason> {
        self.ctx
            .store(off, bytes, 0)
            .map_err(|_| Reason::DropTruncated)
    }
    #[inline(always)]
    fn fix_l3_csum(&mut self, off: usize, diff: u32) -> Result<(), Reason> {
        self.ctx
            .l3_csum_replace(off, 0, diff as u64, 0)
            .map_err(|_| Reason::DropTruncated)
    }
    #[inline(always)]
    fn fix_l4_csum(&mut self, off: usize, diff: u32, kind: L4Csum) -> Result<(), Reason> {
        let flags = match kind {
            L4Csum::Plain => 0,
            L4Csum::Pseudo => BPF_F_PSEUDO_HDR,
            L4Csum::UdpPseudo => BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0,
        };
        self.ctx
            .l4_csum_replace(off, 0, diff as u64, flags)
            .map_err(|_| Reason::DropTruncated)
    }
}
