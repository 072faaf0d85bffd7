//! A VM's network backend without a VM: a tap device in the host namespace (the one the
//! daemon attaches to) and one in the VM namespace, with frames copied between their
//! file descriptors the way QEMU's tap backend does.
use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    os::fd::AsRawFd,
    thread,
};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating) tap `name` inside namespace `ns`, from a thread that enters it.
pub fn open_tap(ns: &str, name: &str) -> File {
    let (ns, name) = (ns.to_owned(), name.to_owned());
    thread::spawn(move || {
        let netns = File::open(format!("/run/netns/{ns}")).expect("opening the netns");
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("entering the netns");
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("opening /dev/net/tun");
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a struct ifreq, which IfReq lays out.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) };
        assert_eq!(
            rc,
            0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        tun
    })
    .join()
    .expect("tap thread")
}

/// Copies frames both ways until a side goes away. A frame the other side refuses (its
/// interface is still down, say) is dropped, as a wire would.
pub fn relay(a: File, b: File) {
    let (a2, b2) = (a.try_clone().expect("dup"), b.try_clone().expect("dup"));
    for (mut from, mut to) in [(a, b), (b2, a2)] {
        thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let _ = to.write_all(&buf[..n]);
            }
        });
    }
}
