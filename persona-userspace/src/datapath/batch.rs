//! Reading a whole hash map in a few syscalls (BPF_MAP_LOOKUP_BATCH) instead of two per
//! key: a scrape of thousands of devices reads each counter map once. aya 0.14 has no
//! batch operations, hence the raw syscall.
use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::MapData;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per syscall.
const CHUNK: usize = 4096;

/// The batch part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of a hash map: keys of `K`, values of `value_len` bytes each (for a
/// per-CPU map, one 8-byte-aligned slot per possible CPU), as raw bytes.
pub fn lookup_all<K: aya::Pod>(map: &MapData, value_len: usize) -> io::Result<Vec<(K, Vec<u8>)>> {
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let key_len = size_of::<K>();
    let mut keys = vec![0u8; key_len * CHUNK];
    let mut values = vec![0u8; value_len * CHUNK];
    // A hash map's batch position is its bucket index.
    let mut token_in: u32 = 0;
    let mut token_out: u32 = 0;
    let mut first = true;
    let mut out = Vec::new();
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token_in as *const u32 as u64
            },
            out_batch: &mut token_out as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd,
            ..Default::default()
        };
        // SAFETY: the attr points at buffers of `count` keys and values of the map's
        // sizes, which the kernel fills; it reads no more than `size_of::<BatchAttr>()`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let done = match (ret < 0).then(io::Error::last_os_error) {
            None => false,
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Some(e) => return Err(e),
        };
        for i in 0..attr.count as usize {
            // SAFETY: the kernel wrote `count` whole keys; K is plain data.
            let key: K =
                unsafe { std::ptr::read_unaligned(keys[i * key_len..].as_ptr() as *const K) };
            out.push((key, values[i * value_len..(i + 1) * value_len].to_vec()));
        }
        if done {
            return Ok(out);
        }
        first = false;
        token_in = token_out;
    }
}

/// Each CPU's `T` of a per-CPU value as the kernel lays it out (8-byte aligned slots).
pub fn per_cpu<T: aya::Pod>(bytes: &[u8], cpus: usize) -> impl Iterator<Item = T> + '_ {
    let slot = size_of::<T>().next_multiple_of(8);
    (0..cpus).filter_map(move |c| {
        let at = bytes.get(c * slot..c * slot + size_of::<T>())?;
        // SAFETY: `at` holds size_of::<T>() bytes of a T the kernel wrote.
        Some(unsafe { std::ptr::read_unaligned(at.as_ptr() as *const T) })
    })
}
