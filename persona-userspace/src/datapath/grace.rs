//! Waiting until no BPF program can still be reading a table that was just replaced.
//!
//! XDP and TC programs run inside RCU read-side sections. Updating an element of a
//! map-of-maps makes the `bpf()` syscall wait for an RCU grace period before it returns
//! (`maybe_wait_bpf_programs` in kernel/bpf/syscall.c), so once it returns every program
//! run that could have seen the old `ACTIVE` value has finished. aya 0.14 cannot create
//! a standalone map-of-maps, hence the two raw syscalls here.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// The leading fields of `union bpf_attr` for BPF_MAP_CREATE; the rest stays zero.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
}

#[repr(C)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, fully initialised prefix of `union bpf_attr` of the
    // size passed; the kernel reads at most that many bytes.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>() as u32) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn create(map_type: u32, value_size: u32, inner_map_fd: u32, name: &[u8]) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size: 4,
        value_size,
        max_entries: 1,
        inner_map_fd,
        ..Default::default()
    };
    attr.map_name[..name.len()].copy_from_slice(name);
    let fd = bpf(BPF_MAP_CREATE, &attr)?;
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub struct GraceBarrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl GraceBarrier {
    pub fn new() -> io::Result<Self> {
        let inner = create(BPF_MAP_TYPE_ARRAY, 4, 0, b"persona_grace_i")?;
        let outer = create(
            BPF_MAP_TYPE_ARRAY_OF_MAPS,
            4,
            inner.as_raw_fd() as u32,
            b"persona_grace",
        )?;
        Ok(Self { outer, inner })
    }

    /// Returns once every BPF program run that started before the call has ended.
    pub fn wait(&self) -> io::Result<()> {
        let key: u32 = 0;
        let value: u32 = self.inner.as_raw_fd() as u32;
        let attr = MapUpdateAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &attr).map(drop)
    }
}

/// Grace periods waited for on a thread of their own, so that the thread owning the
/// maps hands over a batch of replaced tables and goes on shifting; it frees them when
/// the batch comes back.
pub struct GraceThread {
    batches: std::sync::mpsc::Sender<Vec<u32>>,
    done: std::sync::mpsc::Receiver<(Vec<u32>, io::Result<()>)>,
    in_flight: usize,
}

impl GraceThread {
    pub fn spawn() -> io::Result<Self> {
        let barrier = GraceBarrier::new()?;
        let (batches, rx) = std::sync::mpsc::channel::<Vec<u32>>();
        let (tx, done) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("grace".into())
            .spawn(move || {
                for batch in rx {
                    let waited = barrier.wait();
                    if tx.send((batch, waited)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            batches,
            done,
            in_flight: 0,
        })
    }

    /// Starts a grace period for `batch`; it comes back from [`finished`](Self::finished)
    /// or [`wait_all`](Self::wait_all) once no program can still read it.
    pub fn submit(&mut self, batch: Vec<u32>) -> io::Result<()> {
        self.batches
            .send(batch)
            .map_err(|_| io::Error::other("the grace-period thread is gone"))?;
        self.in_flight += 1;
        Ok(())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The batches whose grace period has ended, without waiting.
    pub fn finished(&mut self) -> Vec<(Vec<u32>, io::Result<()>)> {
        let out: Vec<_> = self.done.try_iter().collect();
        self.in_flight -= out.len();
        out
    }

    /// Every batch handed over, once its grace period has ended.
    pub fn wait_all(&mut self) -> Vec<(Vec<u32>, io::Result<()>)> {
        let mut out = Vec::with_capacity(self.in_flight);
        while self.in_flight > 0 {
            match self.done.recv() {
                Ok(r) => out.push(r),
                Err(_) => break,
            }
            self.in_flight -= 1;
        }
        out
    }
}
