//! TCP resets sent to a VM for the connections a `cut` shift forgets, so that its
//! applications see the connection end at once instead of waiting on a dead one.
//!
//! Frames go out of the tap with `PACKET_QDISC_BYPASS`, which skips the tc egress hook:
//! they are already what the VM must see, addressed to its own address.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use persona_common::{FAMILY_V4, PROTO_TCP};

/// One connection of the VM to reset: the far end as the VM knows it, and the
/// sequence number the VM expects next (the acknowledgement it last sent).
#[derive(Debug, Clone, Copy)]
pub struct Reset {
    pub family: u8,
    pub remote: [u8; 16],
    pub inner: [u8; 16],
    pub remote_port: u16,
    pub local_port: u16,
    pub seq: u32,
}

pub(crate) fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub(crate) fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// The Ethernet frame of a bare RST from `r.remote` to the VM.
pub fn frame(vm_mac: [u8; 6], src_mac: [u8; 6], r: &Reset) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&r.remote_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&r.local_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&r.seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x04;
    let v4 = r.family == FAMILY_V4;
    let (src, dst) = if v4 {
        (&r.remote[..4], &r.inner[..4])
    } else {
        (&r.remote[..], &r.inner[..])
    };
    let pseudo = sum16(src) + sum16(dst) + u32::from(PROTO_TCP) + tcp.len() as u32;
    let check = fold(pseudo + sum16(&tcp));
    tcp[16..18].copy_from_slice(&check.to_be_bytes());

    let mut out = Vec::with_capacity(14 + 40 + tcp.len());
    out.extend_from_slice(&vm_mac);
    out.extend_from_slice(&src_mac);
    if v4 {
        out.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[12..16].copy_from_slice(src);
        ip[16..20].copy_from_slice(dst);
        let check = fold(sum16(&ip));
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        out.extend_from_slice(&ip);
    } else {
        out.extend_from_slice(&0x86ddu16.to_be_bytes());
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        out.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        out.extend_from_slice(&[PROTO_TCP, 64]);
        out.extend_from_slice(src);
        out.extend_from_slice(dst);
    }
    out.extend_from_slice(&tcp);
    out
}

pub(crate) fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Sends the frames out of `ifindex` towards the VM; returns how many went.
pub fn send(ifindex: u32, frames: &[Vec<u8>]) -> io::Result<usize> {
    // SAFETY: plain socket calls on a descriptor this function owns; every pointer
    // passed points at a live local of the size given.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        check(libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        ))?;
        let on: libc::c_int = 1;
        check(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as u32,
        ))?;
        let mut sent = 0;
        for f in frames {
            check(libc::send(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) as libc::c_int)?;
            sent += 1;
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_frame_has_valid_checksums() {
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&[203, 0, 113, 80]);
        let mut inner = [0u8; 16];
        inner[..4].copy_from_slice(&[198, 18, 0, 2]);
        let f = frame(
            [2; 6],
            [4; 6],
            &Reset {
                family: FAMILY_V4,
                remote,
                inner,
                remote_port: 80,
                local_port: 40000,
                seq: 0x1234_5678,
            },
        );
        assert_eq!(f.len(), 54);
        assert_eq!(fold(sum16(&f[14..34])), 0, "IPv4 header checksum");
        let pseudo = sum16(&f[26..34]) + u32::from(PROTO_TCP) + 20;
        assert_eq!(fold(pseudo + sum16(&f[34..])), 0, "TCP checksum");
        assert_eq!(f[34 + 13], 0x04, "RST only");
    }
}
