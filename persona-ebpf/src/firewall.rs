//! Firewall verdicts for new flows: longest-prefix match on the remote address (in the
//! persona's resident ruleset), then the
//! first matching port rule of that prefix (its list already holds the rules of every
//! covering prefix, most specific first), else the direction's default.
use aya_ebpf::maps::lpm_trie::Key;
use persona_common::{
    FAMILY_V4,
    counters::Reason,
    firewall::{ACTION_ALLOW, FwKeyV4, FwKeyV6, KEY_HEADER_BITS, MAX_RULES_PER_PREFIX, key_header},
    persona::PersonaTable,
};

use crate::{
    maps::{FW_V4, FW_V6},
    parse::narrow,
};

#[inline(always)]
pub fn judge(
    persona: &PersonaTable,
    direction: u8,
    family: u8,
    remote: &[u8; 16],
    proto: u8,
    port: u16,
) -> Reason {
    let default_action = persona.default_action[direction as usize & 1];
    let (ruleset, direction) = key_header(persona.rules, direction);
    let rules = if family == FAMILY_V4 {
        let key = Key::new(
            KEY_HEADER_BITS + 32,
            FwKeyV4 {
                ruleset,
                direction,
                addr: narrow(remote),
            },
        );
        FW_V4.get(&key)
    } else {
        let key = Key::new(
            KEY_HEADER_BITS + 128,
            FwKeyV6 {
                ruleset,
                direction,
                addr: *remote,
            },
        );
        FW_V6.get(&key)
    };
    if let Some(set) = rules {
        for i in 0..MAX_RULES_PER_PREFIX {
            if i as u32 >= set.count {
                break;
            }
            let rule = &set.rules[i];
            if rule.matches(proto, port) {
                return if rule.action == ACTION_ALLOW {
                    Reason::AllowRule
                } else {
                    Reason::DropRule
                };
            }
        }
    }
    if default_action == ACTION_ALLOW {
        Reason::AllowDefault
    } else {
        Reason::DropDefault
    }
}
