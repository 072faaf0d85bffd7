//! Answers the DHCP, DHCPv6 and router solicitations of every device's VM on its tap,
//! as OVN answers from ovn-controller, and advertises the router now and then: one
//! packet socket for the namespace, which the kernel gives only UDP to port 67 or 547
//! and router solicitations arriving on an interface. It listens to every protocol, as tcpdump does:
//! such a socket sees a frame before tc, whose programs then drop it (`host_dhcp`), so
//! nothing of it goes further than the tap. Outgoing frames are never shown to it, so
//! they pay nothing for it. The answer is sent straight back into the tap, past its
//! queueing discipline and its programs.
use std::{
    collections::HashMap,
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::Arc,
    time::Instant,
};

use tokio::io::unix::AsyncFd;

use super::{dhcp, ipv6};
use crate::{
    datapath::reset::check, host::announce::mac_of, metrics::DhcpLabels, orchestrator::Orchestrator,
};

/// Not in libc yet: Linux 4.20's socket option that keeps outgoing frames away.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// `udp dst port 67 or (ip6 and udp dst port 547) or (icmp6 and ip6[40] == 133)` as
/// `tcpdump -dd` gives it.
const FILTER: [libc::sock_filter; 23] = [
    op(0x28, 0, 0, 0x0000000c),
    op(0x15, 0, 11, 0x000086dd),
    op(0x30, 0, 0, 0x00000014),
    op(0x15, 0, 3, 0x00000011),
    op(0x28, 0, 0, 0x00000038),
    op(0x15, 15, 0, 0x00000043),
    op(0x15, 14, 15, 0x00000223),
    op(0x15, 3, 0, 0x0000003a),
    op(0x15, 0, 13, 0x0000002c),
    op(0x30, 0, 0, 0x00000036),
    op(0x15, 0, 11, 0x0000003a),
    op(0x30, 0, 0, 0x00000036),
    op(0x15, 8, 9, 0x00000085),
    op(0x15, 0, 8, 0x00000800),
    op(0x30, 0, 0, 0x00000017),
    op(0x15, 0, 6, 0x00000011),
    op(0x28, 0, 0, 0x00000014),
    op(0x45, 4, 0, 0x00001fff),
    op(0xb1, 0, 0, 0x0000000e),
    op(0x48, 0, 0, 0x00000010),
    op(0x15, 0, 1, 0x00000043),
    op(0x6, 0, 0, 0x00040000),
    op(0x6, 0, 0, 0x00000000),
];

const fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket calls on a descriptor made here; every pointer passed points
    // at a live value of the size given.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        let prog = libc::sock_fprog {
            len: FILTER.len() as u16,
            filter: FILTER.as_ptr().cast_mut(),
        };
        check(libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const prog).cast(),
            size_of::<libc::sock_fprog>() as u32,
        ))?;
        let on: libc::c_int = 1;
        for option in [libc::PACKET_QDISC_BYPASS, PACKET_IGNORE_OUTGOING] {
            check(libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                option,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as u32,
            ))?;
        }
        Ok(fd)
    }
}

/// One frame and the interface it arrived on; `None` for one this host sent.
fn receive(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<(usize, u32)>> {
    // SAFETY: `buf` and `from` are live and of the sizes given.
    unsafe {
        let mut from: libc::sockaddr_ll = std::mem::zeroed();
        let mut len = size_of::<libc::sockaddr_ll>() as u32;
        let n = libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&raw mut from).cast(),
            &mut len,
        );
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((from.sll_pkttype != libc::PACKET_OUTGOING)
            .then_some((n as usize, from.sll_ifindex as u32)))
    }
}

fn send(fd: &OwnedFd, ifindex: u32, frame: &[u8]) -> io::Result<()> {
    // SAFETY: `frame` and `to` are live and of the sizes given.
    unsafe {
        let mut to: libc::sockaddr_ll = std::mem::zeroed();
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        let n = libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const to).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        );
        check(n as libc::c_int).map(|_| ())
    }
}

/// Messages from one interface read per second at most; a VM that sends more is not
/// read past that, and does not slow the answers to the others.
const PER_SECOND: u32 = 20;

/// Answers DHCP on every attached device's interface until the daemon stops.
pub async fn serve(orchestrator: Arc<Orchestrator>) -> io::Result<()> {
    // SAFETY: the OwnedFd is the socket's only owner and lives inside the AsyncFd for
    // as long as it is registered.
    let fd = unsafe { AsyncFd::register(open()?) }.map_err(|e| io::Error::other(e.to_string()))?;
    let mut buf = vec![0u8; 2048];
    let mut read: HashMap<u32, (Instant, u32)> = HashMap::new();
    let mut advertise = tokio::time::interval(super::ipv6::ADVERTISE_EVERY);
    loop {
        let mut ready = tokio::select! {
            ready = fd.readable() => ready?,
            _ = advertise.tick() => {
                advertise_routers(&orchestrator, fd.get_ref());
                continue;
            }
        };
        let got = match ready.try_io(|fd| receive(fd.get_ref(), &mut buf)) {
            Ok(Ok(got)) => got,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading DHCP from the taps");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            Err(_would_block) => continue,
        };
        let Some((n, ifindex)) = got else {
            continue;
        };
        let now = Instant::now();
        let (since, count) = read.entry(ifindex).or_insert((now, 0));
        if now.duration_since(*since).as_secs() >= 1 {
            (*since, *count) = (now, 0);
        }
        *count += 1;
        if *count > PER_SECOND {
            continue;
        }
        if let Some((device, frame)) = handle(&orchestrator, ifindex, &buf[..n])
            && let Err(e) = send(fd.get_ref(), ifindex, &frame)
        {
            tracing::warn!(device, error = %e, "sending a DHCP answer");
        }
    }
}

/// Every device with an inner IPv6 address is told of its router again, before the
/// lifetime of the last advertisement runs out.
fn advertise_routers(o: &Orchestrator, fd: &OwnedFd) {
    let Ok(devices) = o.devices() else {
        return;
    };
    for (device, spec) in devices {
        let Some(ifindex) = crate::datapath::ifindex(&spec.interface)
            .ok()
            .filter(|&i| o.runs_here(&spec) && o.is_attached(i))
        else {
            continue;
        };
        let Some(lease) = mac_of(&spec.interface)
            .ok()
            .and_then(|mac| spec.dhcp_lease6(mac))
        else {
            continue;
        };
        let (all, group) = ipv6::ALL_NODES;
        if let Err(e) = send(fd, ifindex, &ipv6::advertisement(&lease, group, all)) {
            tracing::debug!(device, error = %e, "advertising the router");
        }
    }
}

fn count(o: &Orchestrator, device: &str, message: &str, answer: &str) {
    o.metrics()
        .dhcp
        .get_or_create(&DhcpLabels {
            device: device.to_owned(),
            message: message.into(),
            answer: answer.into(),
        })
        .inc();
}

/// The answer to a frame from the device at `ifindex`, and the device's name.
fn handle(o: &Orchestrator, ifindex: u32, frame: &[u8]) -> Option<(String, Vec<u8>)> {
    let (device, spec) = o.device_at(ifindex)?;
    if frame.get(12..14) == Some(&[0x86, 0xdd]) {
        return handle6(o, device, &spec, frame);
    }
    let m = match dhcp::parse(frame) {
        Ok(m) => m,
        Err(why) => {
            tracing::debug!(device, why, "not a DHCP message");
            return None;
        }
    };
    let lease = spec.dhcp_lease(mac_of(&spec.interface).ok()?);
    let kind = lease
        .as_ref()
        .filter(|_| spec.answers_mac(m.chaddr))
        .and_then(|l| dhcp::decide(&m, l));
    count(
        o,
        &device,
        m.kind.label(),
        kind.map_or("none", dhcp::Kind::label),
    );
    let (kind, lease) = (kind?, lease?);
    tracing::debug!(
        device,
        message = m.kind.label(),
        answer = kind.label(),
        "DHCP"
    );
    Some((device, dhcp::answer(&m, kind, &lease)))
}

fn handle6(
    o: &Orchestrator,
    device: String,
    spec: &crate::model::DeviceSpec,
    frame: &[u8],
) -> Option<(String, Vec<u8>)> {
    let asked = match ipv6::parse(frame) {
        Ok(a) => a,
        Err(why) => {
            tracing::debug!(device, why, "not a router solicitation or DHCPv6");
            return None;
        }
    };
    let answered = mac_of(&spec.interface)
        .ok()
        .and_then(|mac| spec.dhcp_lease6(mac))
        .filter(|_| spec.answers_mac(asked.mac))
        .and_then(|lease| ipv6::answer(&asked, &lease));
    count(
        o,
        &device,
        asked.label(),
        answered.as_ref().map_or("none", |(l, _)| l),
    );
    answered.map(|(_, frame)| (device, frame))
}
