//! Taps persona makes itself: persistent, with the virtio-net header and several queues,
//! as QEMU opens them (`-netdev tap,ifname=NAME,script=no,vnet_hdr=on,queues=N`, or
//! libvirt's `<target dev='NAME' managed='no'/>`). The device's programs are attached
//! before any VM opens the tap, so none of the VM's packets ever passes unguarded, and
//! the tap outlives the VM: a restarted VM finds it as it was.
use std::{fs::OpenOptions, os::fd::AsRawFd as _};

use crate::{
    datapath::{DatapathError, Result},
    model::TapSpec,
};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// `struct ifreq` with the name and the flags, as TUNSETIFF and SIOC[GS]IFFLAGS read it.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_short) -> Self {
        let mut req = Self {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
}

fn fail(name: &str, what: &str) -> impl FnOnce(std::io::Error) -> DatapathError {
    let context = format!("tap {name}: {what}");
    move |source| DatapathError::Io { context, source }
}

fn ioctl<T>(fd: i32, request: libc::c_ulong, arg: T) -> std::io::Result<()> {
    // SAFETY: each request here takes an integer, or a pointer to an `IfReq` that
    // lives across the call.
    let rc = unsafe { libc::ioctl(fd, request, arg) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn open_tun(name: &str) -> Result<std::fs::File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(fail(name, "opening /dev/net/tun"))
}

fn flags(spec: &TapSpec) -> libc::c_short {
    let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if spec.multi_queue {
        flags |= IFF_MULTI_QUEUE;
    }
    flags
}

/// Makes `name` a persistent tap, up, owned as `spec` says; true when it made it,
/// false when a tap of that name was there already.
pub fn create(name: &str, spec: &TapSpec) -> Result<bool> {
    crate::model::check_interface_name(name).map_err(DatapathError::Refused)?;
    if crate::datapath::ifindex(name).is_ok() {
        return Ok(false);
    }
    let tun = open_tun(name)?;
    let fd = tun.as_raw_fd();
    let mut req = IfReq::new(name, flags(spec));
    ioctl(fd, TUNSETIFF, &mut req as *mut IfReq).map_err(fail(name, "creating it"))?;
    if let Some(user) = spec.user {
        ioctl(fd, TUNSETOWNER, user as libc::c_ulong).map_err(fail(name, "setting its owner"))?;
    }
    if let Some(group) = spec.group {
        ioctl(fd, TUNSETGROUP, group as libc::c_ulong).map_err(fail(name, "setting its group"))?;
    }
    ioctl(fd, TUNSETPERSIST, 1 as libc::c_ulong).map_err(fail(name, "making it persistent"))?;
    if let Err(e) = up(name) {
        // Not left behind down, where the next attempt would take it as made.
        let _ = ioctl(fd, TUNSETPERSIST, 0 as libc::c_ulong);
        return Err(e);
    }
    Ok(true)
}

/// Sets the interface administratively up: routes through it can be added, and it
/// carries traffic once a VM opens it.
fn up(name: &str) -> Result<()> {
    // SAFETY: a plain datagram socket, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(fail(name, "opening a socket")(
            std::io::Error::last_os_error(),
        ));
    }
    let mut req = IfReq::new(name, 0);
    let result = ioctl(sock, libc::SIOCGIFFLAGS, &mut req as *mut IfReq).and_then(|()| {
        req.flags |= libc::IFF_UP as libc::c_short;
        ioctl(sock, libc::SIOCSIFFLAGS, &mut req as *mut IfReq)
    });
    // SAFETY: `sock` is ours and open.
    unsafe { libc::close(sock) };
    result.map_err(fail(name, "setting it up"))
}

/// A tap opened to be deleted: it goes when this is dropped after [`Removal::delete`]
/// (or once a VM still holding it lets go).
pub struct Removal {
    name: String,
    tun: std::fs::File,
}

/// Opens a tap for deletion, `None` when it is not there. Refused, changing nothing,
/// when it cannot be deleted: a running VM holds a single-queue tap.
pub fn open(name: &str, spec: &TapSpec) -> Result<Option<Removal>> {
    crate::model::check_interface_name(name).map_err(DatapathError::Refused)?;
    if crate::datapath::ifindex(name).is_err() {
        return Ok(None);
    }
    let tun = open_tun(name)?;
    // Re-opening a tap needs its flags; one made elsewhere may differ in its queues.
    let mut busy = false;
    for f in [flags(spec), flags(spec) ^ IFF_MULTI_QUEUE] {
        let mut req = IfReq::new(name, f);
        match ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) {
            Ok(()) => {
                return Ok(Some(Removal {
                    name: name.to_owned(),
                    tun,
                }));
            }
            Err(e) => busy |= e.raw_os_error() == Some(libc::EBUSY),
        }
    }
    Err(DatapathError::Refused(if busy {
        format!("tap {name:?} is held by a running VM (its only queue): stop the VM first")
    } else {
        format!("interface {name:?} is not a tap persona can delete")
    }))
}

impl Removal {
    pub fn delete(self) -> Result<()> {
        ioctl(self.tun.as_raw_fd(), TUNSETPERSIST, 0 as libc::c_ulong)
            .map_err(fail(&self.name, "ending its persistence"))
    }
}

/// Deletes a tap made persistent by [`create`] (or `ip tuntap add`); a tap that is not
/// there is success.
pub fn delete(name: &str, spec: &TapSpec) -> Result<()> {
    match open(name, spec)? {
        Some(r) => r.delete(),
        None => Ok(()),
    }
}
