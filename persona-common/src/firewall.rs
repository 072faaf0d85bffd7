//! Firewall tables: longest-prefix match on the remote address, then the port rules of
//! that prefix in order.
//!
//! Userspace folds the rules of every less specific prefix into each prefix's list
//! (most specific first), so one trie lookup finds every rule that can apply.
//!
//! A persona's prefixes are written once under a ruleset id and stay resident: every
//! table of a persona with the same firewall names the same ruleset
//! (`PersonaTable::rules`), so a shift writes no prefix. Ruleset 0 is the empty one.

/// Ruleset ids; 0, the empty ruleset, is never written.
pub const MAX_RULESETS: u32 = 8192;

pub const ACTION_ALLOW: u8 = 1;
pub const ACTION_DROP: u8 = 2;

pub const MAX_RULES_PER_PREFIX: usize = 16;
pub const MAX_PREFIXES: u32 = 262_144;

/// Bits of `ruleset` and `direction` in front of the address in every trie key.
pub const KEY_HEADER_BITS: u32 = 64;

/// Data of an LPM-trie key; the trie's prefix length covers the header fully.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwKeyV4 {
    pub ruleset: [u8; 4],
    pub direction: [u8; 4],
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<FwKeyV4>() == 12);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwKeyV6 {
    pub ruleset: [u8; 4],
    pub direction: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<FwKeyV6>() == 24);

/// Big-endian so that the trie's bit order matches the written order.
#[inline(always)]
pub const fn key_header(ruleset: u32, direction: u8) -> ([u8; 4], [u8; 4]) {
    (ruleset.to_be_bytes(), (direction as u32).to_be_bytes())
}

/// One rule: protocol (0 = any) and destination port range, inclusive.
/// Packets without ports (ICMP, other protocols) are matched as port 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    pub proto: u8,
    pub action: u8,
    pub _pad: [u8; 2],
    pub port_lo: u16,
    pub port_hi: u16,
}
const _: () = assert!(core::mem::size_of::<PortRule>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub count: u32,
    pub _pad: u32,
    pub rules: [PortRule; MAX_RULES_PER_PREFIX],
}
const _: () = assert!(core::mem::size_of::<RuleSet>() == 136);

impl PortRule {
    #[inline(always)]
    pub fn matches(&self, proto: u8, port: u16) -> bool {
        (self.proto == 0 || self.proto == proto) && self.port_lo <= port && port <= self.port_hi
    }
}
