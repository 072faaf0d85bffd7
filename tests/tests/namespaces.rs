//! End to end in namespaces this test creates: real programs on a real veth or tap,
//! real TCP, a real DNS server, the `persona` binary itself.
use persona_tests::{
    capture::{Capture, checksums},
    lab::{Lab, OUTSIDE, OUTSIDE_V6, UPLINK, VmLink},
    sink::{Sink, Upload},
};

fn identity_firewall_and_dns(link: VmLink) -> Lab {
    let lab = Lab::new(link);
    lab.persona_ok("datapath attach vm1 -f examples/");

    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.10"),
        "outside sees the office persona"
    );
    assert_eq!(
        lab.reach_vm("203.0.113.10", 22).as_deref(),
        Some("ssh-ok"),
        "ingress rule admits ssh"
    );
    assert_eq!(
        lab.reach_vm("203.0.113.10", 23),
        None,
        "ingress default drops telnet"
    );
    assert_eq!(
        lab.reach_vm("198.18.0.2", 22),
        None,
        "the inner address is not reachable"
    );
    let smtp = lab
        .vm
        .try_exec("socat -T2 - TCP:198.51.100.7:25,connect-timeout=2 </dev/null");
    assert!(!smtp.status.success(), "egress rule drops smtp");

    // The VM asks a server that does not exist; the persona's resolver answers for it.
    let answer = lab
        .vm
        .exec("dig +short +time=2 +tries=1 @192.0.2.53 persona.test");
    assert_eq!(answer.trim(), "192.0.2.80");

    let out = lab.persona_ok("datapath shift pvm1 travel -f examples/");
    assert!(out.contains("travel (generation"), "{out}");
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.20"),
        "outside sees the travel persona"
    );
    assert_eq!(
        lab.reach_vm("203.0.113.10", 22),
        None,
        "the old address is gone"
    );
    assert_eq!(
        lab.reach_vm("203.0.113.20", 22),
        None,
        "travel admits nothing inbound"
    );

    let status = lab.persona_ok("datapath status pvm1 -o json");
    let v: serde_json::Value = serde_json::from_str(&status).expect("status is JSON");
    let rows = v["counters"].as_array().expect("counters");
    let count = |dir: &str, reason: &str| {
        rows.iter()
            .find(|r| r["direction"] == dir && r["reason"] == reason)
            .map_or(0, |r| r["packets"].as_u64().unwrap())
    };
    assert!(count("egress", "allow_dns") >= 1, "{status}");
    assert!(count("ingress", "drop_default") >= 1, "{status}");
    assert!(count("egress", "drop_rule") >= 1, "{status}");
    assert_eq!(v["addresses"][0], "203.0.113.20");

    lab.persona_ok("datapath detach pvm1");
    assert_eq!(
        lab.seen_from_outside(),
        None,
        "detached: no route, nothing answers"
    );
    let routes = lab.host.exec("ip route show");
    assert!(!routes.contains("203.0.113.20"), "routes removed: {routes}");
    lab
}

#[test]
fn veth_vm_is_seen_as_its_persona_with_firewall_and_dns() {
    drop(identity_firewall_and_dns(VmLink::Veth));
}

#[test]
fn tap_vm_is_seen_as_its_persona_with_firewall_and_dns() {
    drop(identity_firewall_and_dns(VmLink::Tap));
}

#[test]
fn multiqueue_tap_vm_is_seen_as_its_persona_on_every_queue() {
    let lab = identity_firewall_and_dns(VmLink::MultiQueueTap);
    let per_queue: Vec<u64> = lab
        .queue_frames
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    assert!(
        per_queue.iter().all(|&n| n >= 10),
        "both queues carried the VM's traffic: {per_queue:?}"
    );
}

#[test]
fn host_wiring_routes_and_proxies_the_persona_address() {
    let lab = Lab::new(VmLink::Veth);
    lab.persona_ok("datapath attach vm1 -f examples/");
    let routes = lab
        .host
        .exec("ip route show dev pvm1; ip -6 route show dev pvm1");
    assert!(routes.contains("203.0.113.10 via 198.18.0.2"), "{routes}");
    assert!(
        routes.contains("2001:db8:a::10 via 2001:db8:1::2"),
        "{routes}"
    );
    let proxies = lab.host.exec("ip neigh show proxy");
    assert!(
        proxies.contains("203.0.113.10 dev up0"),
        "proxy ARP on the uplink: {proxies}"
    );
    assert!(
        proxies.contains("2001:db8:a::10 dev up0"),
        "proxy NDP on the uplink: {proxies}"
    );
    assert!(
        proxies.contains("fe80::1 dev pvm1"),
        "the VM's IPv6 gateway answered on the tap: {proxies}"
    );
    // The persona's gateway is the next hop of its address, by policy routing.
    let office_table = u32::from(std::net::Ipv4Addr::new(203, 0, 113, 10));
    let rules = lab.host.exec("ip rule show");
    assert!(
        rules.contains("lookup main suppress_prefixlength 31")
            && rules.contains(&format!("from 203.0.113.10 lookup {office_table}")),
        "{rules}"
    );
    let table = lab
        .host
        .exec(&format!("ip route show table {office_table}"));
    assert!(table.contains("default via 203.0.113.1"), "{table}");

    // With no open flow using it, the previous persona's address goes with the shift.
    lab.persona_ok("datapath shift pvm1 travel -f examples/");
    let proxies = lab.host.exec("ip neigh show proxy dev up0");
    assert!(
        proxies.contains("203.0.113.20") && !proxies.contains("203.0.113.10"),
        "{proxies}"
    );
    lab.persona_ok("datapath shift pvm1 office -f examples/");

    // Each command is its own process: what detach undoes must come from pinned state.
    lab.persona_ok("datapath shift pvm1 travel -f examples/");
    lab.persona_ok("datapath detach pvm1");
    let proxies = lab.host.exec("ip neigh show proxy");
    assert_eq!(
        proxies.trim(),
        "",
        "detach withdraws every proxy entry, gateways included"
    );
    let routes = lab
        .host
        .exec("ip route show table all; ip -6 route show table all; ip rule show");
    assert!(
        !routes.contains("203.0.113.10")
            && !routes.contains("203.0.113.20")
            && !routes.contains("2001:db8:a::"),
        "routes and rules withdrawn: {routes}"
    );
}

/// A VM behind a veth with TX offload on (the default) hands tc partial checksums and,
/// with no XDP program on the veth to take GSO away, TSO-sized skbs; with offload off,
/// complete checksums and MTU frames. Either way 20 MB up over IPv4 and IPv6 arrive
/// with their SHA-256 from the persona's address, and the uplink (checksummed in
/// software, so a wrong sum shows) carries no bad checksum.
#[test]
fn bulk_uploads_arrive_intact_with_veth_offloads_on_and_off() {
    let lab = Lab::new(VmLink::Veth);
    lab.persona_ok("datapath attach vm1 -f examples/");
    lab.site.host.exec(&format!("ethtool -K {UPLINK} tx off"));
    let mut sink = Sink::start(&lab.site.out.name, 5001);
    let blob = std::env::temp_dir().join(format!("persona-blob-{}", std::process::id()));
    lab.site.host.exec(&format!(
        "head -c 20971520 /dev/urandom > {}",
        blob.display()
    ));
    let sum = lab.site.host.exec(&format!("sha256sum {}", blob.display()));
    let sum = sum.split_whitespace().next().expect("sha256sum");
    for offload in ["on", "off"] {
        lab.vm.exec(&format!("ethtool -K eth0 tx {offload}"));
        let features = lab.vm.exec("ethtool -k eth0");
        assert!(
            features.contains(&format!("tx-checksumming: {offload}")),
            "{features}"
        );
        let pcap = std::env::temp_dir().join(format!(
            "persona-uplink-{}-{offload}.pcap",
            std::process::id()
        ));
        let capture = Capture::sent_to_file(&lab.site.host.name, UPLINK, "tcp port 5001", &pcap);
        for (to, from) in [
            (format!("TCP:{OUTSIDE}:5001"), "::ffff:203.0.113.10"),
            (format!("TCP6:[{OUTSIDE_V6}]:5001"), "2001:db8:a::10"),
        ] {
            lab.vm.exec(&format!(
                "timeout 60 socat -u FILE:{} {to},connect-timeout=5",
                blob.display()
            ));
            assert_eq!(
                sink.next_upload(),
                Upload::new(sum, 20 << 20, from),
                "offload {offload}, upload to {to}"
            );
        }
        drop(capture.stop());
        // tcpdump may miss some of 14,500 segments under load; what it holds is checked.
        for filter in ["ip", "ip6"] {
            let found = checksums(&pcap, filter);
            assert!(
                found.packets >= 7_000,
                "offload {offload}, {filter}: {found:?}"
            );
            assert_eq!(found.bad, 0, "offload {offload}, {filter}: {found:?}");
        }
        let _ = std::fs::remove_file(&pcap);
    }
    let _ = std::fs::remove_file(&blob);
}

/// Packets the host's forward hook saw: an nftables counter in that hook.
fn forwarded_by_the_host(lab: &Lab) -> u64 {
    let out = lab.host.exec("nft list chain inet probe forward");
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {out}"))
}

/// The hop count the VM sees on the outside's echo replies, one router away.
fn reply_hops(lab: &Lab, dst: &str) -> String {
    let out = lab.vm.exec(&format!("ping -c 2 -W 2 {dst}"));
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("ttl="))
        .unwrap_or_else(|| panic!("no reply from {dst}: {out}"))
        .to_owned()
}

/// Traffic both ways, v4 and v6: TCP out and in, echo requests out and their replies in,
/// each reply one router away.
fn both_ways(lab: &Lab) {
    assert_eq!(lab.seen_from_outside().as_deref(), Some("203.0.113.10"));
    assert_eq!(
        lab.reach_vm("203.0.113.10", 22).as_deref(),
        Some("ssh-ok"),
        "the outside reaches the VM"
    );
    assert_eq!(reply_hops(lab, OUTSIDE), "63");
    assert_eq!(reply_hops(lab, OUTSIDE_V6), "63");
}

/// With `--host-routing bpf` the programs forward both ways themselves: once the next
/// hops' neighbours are resolved (the first packets to an unresolved one go the
/// kernel's way), the host's forward hook sees none of the VM's traffic, and the hop
/// count drops by one as a router's would. With `--host-routing kernel` (the default)
/// the host's stack forwards it.
#[test]
fn host_routing_in_bpf_skips_the_host_stack_and_kernel_routing_does_not() {
    let lab = Lab::new(VmLink::Veth);
    lab.host.exec(
        "nft add table inet probe && nft add chain inet probe forward '{ type filter hook forward priority 0; policy accept; }' && nft add rule inet probe forward counter",
    );
    lab.persona_ok("--host-routing bpf datapath attach vm1 -f examples/");
    both_ways(&lab);
    let warm = forwarded_by_the_host(&lab);
    both_ways(&lab);
    assert_eq!(
        forwarded_by_the_host(&lab) - warm,
        0,
        "BPF routing forwarded it all"
    );

    lab.persona_ok("--host-routing kernel datapath attach vm1 -f examples/");
    let before = forwarded_by_the_host(&lab);
    both_ways(&lab);
    assert!(
        forwarded_by_the_host(&lab) - before >= 8,
        "with kernel routing the host's stack forwards"
    );
}
