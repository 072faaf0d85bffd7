//! One's-complement arithmetic for incremental checksum updates (RFC 1624).
//! Words are read in native order on both sides, which the sum does not care about.

#[inline(always)]
fn fold(mut sum: u64) -> u32 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum as u32
}

#[inline(always)]
fn fold16(sum: u32) -> u16 {
    let mut s = (sum & 0xffff) + (sum >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The change to a checksum when `from` is replaced by `to`, as `bpf_csum_diff` gives it.
#[inline(always)]
pub fn diff<const N: usize>(from: &[u8; N], to: &[u8; N]) -> u32 {
    let mut sum: u64 = 0;
    let mut i = 0;
    while i + 1 < N {
        let f = u16::from_ne_bytes([from[i], from[i + 1]]);
        let t = u16::from_ne_bytes([to[i], to[i + 1]]);
        sum += (!f) as u64 + t as u64;
        i += 2;
    }
    fold(sum)
}

#[inline(always)]
pub fn diff16(from: u16, to: u16) -> u32 {
    (!from) as u32 + to as u32
}

#[inline(always)]
pub fn add(a: u32, b: u32) -> u32 {
    fold(a as u64 + b as u64)
}

/// A stored checksum after a change of `diff` to the data it covers: ~(~HC + diff).
#[inline(always)]
pub fn apply(check: u16, diff: u32) -> u16 {
    !fold16(fold((!check) as u64 + diff as u64))
}
