//! A VM's network backend without a VM: a tap device in the host namespace (the one the
//! daemon attaches to) and one in the VM namespace, with frames copied between their
//! file descriptors the way QEMU's tap backend does.
use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating) tap `name` inside namespace `ns`, from a thread that enters it.
pub fn open_tap(ns: &str, name: &str) -> File {
    open_queues(ns, name, 1, 0).remove(0)
}

/// `n` queues of a multiqueue tap, as QEMU opens them for `queues=n`.
pub fn open_multiqueue_tap(ns: &str, name: &str, n: usize) -> Vec<File> {
    open_queues(ns, name, n, IFF_MULTI_QUEUE)
}

fn open_queues(ns: &str, name: &str, n: usize, flags: libc::c_short) -> Vec<File> {
    let (ns, name) = (ns.to_owned(), name.to_owned());
    thread::spawn(move || {
        let netns = File::open(format!("/run/netns/{ns}")).expect("opening the netns");
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("entering the netns");
        (0..n)
            .map(|_| {
                let tun = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/net/tun")
                    .expect("opening /dev/net/tun");
                let mut req = IfReq {
                    name: [0; 16],
                    flags: IFF_TAP | IFF_NO_PI | flags,
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
            .collect()
    })
    .join()
    .expect("tap thread")
}

/// Copies frames from `from` into whichever of `to` each next one picks, until `from`
/// goes away. A frame the other side refuses (its interface is still down, say) is
/// dropped, as a wire would.
fn forward(mut from: File, mut to: Vec<(File, Arc<AtomicU64>)>) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut next = 0;
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let queues = to.len();
            let (q, count) = &mut to[next % queues];
            if q.write_all(&buf[..n]).is_ok() {
                count.fetch_add(1, Ordering::Relaxed);
            }
            next += 1;
        }
    });
}

/// Copies frames both ways between a VM-side tap and the queues of a host tap: what
/// the VM sends goes into the queues in turn, what any queue gives goes to the VM.
/// Returns how many frames went into each queue.
pub fn relay(vm: File, queues: Vec<File>) -> Vec<Arc<AtomicU64>> {
    let dup = |f: &File| f.try_clone().expect("dup");
    let counts: Vec<_> = queues.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    for q in &queues {
        forward(dup(q), vec![(dup(&vm), Arc::new(AtomicU64::new(0)))]);
    }
    let into = queues.into_iter().zip(counts.iter().cloned()).collect();
    forward(vm, into);
    counts
}
