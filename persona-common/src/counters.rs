//! Per-device, per-persona, per-direction, per-reason packet and byte counters (per
//! CPU).
//!
//! Every packet either program sees ends in exactly one reason, and is counted for the
//! persona it was handled with (`Active::persona` read once with the rest), or for
//! [`NO_PERSONA`] when the device had none. The numbers are part of the userspace
//! contract (metrics labels); append, never renumber.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CounterKey {
    pub ifindex: u32,
    pub persona: u32,
    pub direction: u8,
    pub reason: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CounterKey>() == 12);

impl CounterKey {
    pub const fn new(ifindex: u32, persona: u32, direction: u8, reason: Reason) -> Self {
        Self {
            ifindex,
            persona,
            direction,
            reason: reason as u8,
            _pad: [0; 2],
        }
    }
}

/// The persona id of packets a device handled without an active persona.
pub const NO_PERSONA: u32 = 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Live keys, created by the first packet of each (device, persona, direction, reason)
/// that occurs: 32 per device, for its active pair and one leaving it. A pair no table
/// owns any more is folded into `FOLDED` and its keys freed, so the map never fills with
/// the pairs a host has had over its lifetime. Preallocated: a program's insert takes a
/// free element and never waits on an allocator.
pub const MAX_COUNTER_KEYS: u32 = crate::device::MAX_DEVICES * 32;

/// `FOLDED`: the counts of (device, persona) pairs no table owns any more, one plain
/// (not per-CPU) entry per direction and reason that counted anything; only userspace
/// writes it. Not preallocated: its elements cost only what is folded, but its buckets
/// are allocated whole (16 bytes each), hence no more than 128 keys per device, e.g.
/// every device through 16 personas with 8 kinds of packet each. When it is full, a
/// pair's keys stay live and its fold is tried again.
pub const MAX_FOLDED_KEYS: u32 = crate::device::MAX_DEVICES * 128;

/// `HANDSHAKES` keys: every bucket of each attached device (a device's go with it).
pub const MAX_HANDSHAKE_KEYS: u32 = crate::device::MAX_DEVICES * (HANDSHAKE_BUCKETS + 1);

/// `TRACKED[table * 2 + direction]` (per CPU): packets of tracked flows, the bulk of all
/// traffic, counted in an array slot of the table they were handled with instead of a
/// hash key. Userspace adds a slot into the device's `allow_tracked` key in `COUNTERS`
/// when the table is freed.
pub const TRACKED_SLOTS: u32 = crate::persona::MAX_TABLES * 2;

#[inline(always)]
pub const fn tracked_slot(table: u32, direction: u8) -> u32 {
    table * 2 + direction as u32
}

macro_rules! reasons {
    ($( $(#[$doc:meta])* $name:ident = $num:literal, $label:literal, $pass:literal; )*) => {
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $( $(#[$doc])* $name = $num, )*
        }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$name,)*];

            pub const fn from_u8(v: u8) -> Option<Reason> {
                match v {
                    $( $num => Some(Reason::$name), )*
                    _ => None,
                }
            }

            /// Stable label used in metrics and output.
            pub const fn label(self) -> &'static str {
                match self { $( Reason::$name => $label, )* }
            }

            /// A packet of a persona's traffic, translated for it.
            pub const fn translated(self) -> bool {
                matches!(
                    self,
                    Reason::AllowRule | Reason::AllowDefault | Reason::AllowTracked | Reason::AllowDns
                )
            }

            pub const fn passes(self) -> bool {
                match self { $( Reason::$name => $pass, )* }
            }
        }
    };
}

reasons! {
    /// New flow admitted by a firewall rule.
    AllowRule = 1, "allow_rule", true;
    /// New flow admitted by the direction's default verdict.
    AllowDefault = 2, "allow_default", true;
    /// Packet of a tracked flow (or an ICMP error about one).
    AllowTracked = 3, "allow_tracked", true;
    /// DNS query redirected to the persona's resolver, or its reply.
    AllowDns = 4, "allow_dns", true;
    /// ARP is passed untouched so the VM and host can resolve each other.
    PassArp = 5, "pass_arp", true;
    /// IPv6 neighbour discovery and link-local traffic stay on the link, untranslated.
    PassLinkLocal = 6, "pass_link_local", true;
    /// A request to the metadata service and its answer, between the VM and the host.
    HostMetadata = 7, "host_metadata", true;
    DropRule = 16, "drop_rule", false;
    DropDefault = 17, "drop_default", false;
    /// The device is attached but no persona is active (or it lacks this family).
    DropNoPersona = 18, "drop_no_persona", false;
    /// A header is cut short, or a length field is impossible.
    DropTruncated = 19, "drop_truncated", false;
    /// IPv4 options can carry addresses (record route, source route) that would leak or
    /// bypass the translation, and normal traffic never uses them.
    DropIpOptions = 20, "drop_ip_options", false;
    /// Non-first fragments carry no ports to judge; VMs are expected to use PMTU discovery.
    DropFragment = 21, "drop_fragment", false;
    /// VMs send untagged frames on their tap; a tag means a misconfigured guest.
    DropVlan = 22, "drop_vlan", false;
    /// Extension headers (including fragments) hide the transport header.
    DropIpv6ExtHeader = 23, "drop_ipv6_ext_header", false;
    /// Neither IPv4, IPv6 nor ARP.
    DropNotIp = 24, "drop_not_ip", false;
    /// The VM sent from an address that is not its own.
    DropSpoofed = 25, "drop_spoofed", false;
    /// Addressed to neither the active persona nor a flow of an earlier one, or to an
    /// address other than the one its flow is bound to.
    DropNotPersona = 26, "drop_not_persona", false;
    /// A program runs on an interface no device is configured for.
    DropUnknownDevice = 27, "drop_unknown_device", false;
    /// Over the device's packet-rate cap (flood guard).
    DropRateLimited = 28, "drop_rate_limited", false;
    /// A new flow over the device's flow budget.
    DropFlowBudget = 29, "drop_flow_budget", false;
    /// DHCPv4 from the VM: the daemon answers it on the tap, and it goes no further.
    HostDhcp = 30, "host_dhcp", false;
    /// To the metadata address but not to its service, or from a device without one.
    DropMetadata = 31, "drop_metadata", false;
}

/// `HANDSHAKES`: TCP handshake round trips seen on the tap (SYN out to SYN-ACK in), per
/// device, as a log2 histogram in microseconds: bucket `b` counts RTTs below 2^b us;
/// bucket `HANDSHAKE_SUM` holds the sum of all RTTs in microseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HandshakeKey {
    pub ifindex: u32,
    pub bucket: u32,
}
const _: () = assert!(core::mem::size_of::<HandshakeKey>() == 8);

pub const HANDSHAKE_BUCKETS: u32 = 28;
pub const HANDSHAKE_SUM: u32 = HANDSHAKE_BUCKETS;
