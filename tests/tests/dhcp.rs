//! The guest's side: a VM with no configuration of its own asks DHCP on its tap, as
//! busybox's udhcpc does in a real guest image, and the daemon answers.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use persona_tests::{
    capture::Capture,
    daemon::{Daemon, metric_sum},
    lab::{Lab, UPLINK, VmLink, wait_until},
};

/// udhcpc's event script: the lease goes on the interface, and every event is logged
/// once it has been applied (the test reads LOG, then the interface).
const SCRIPT: &str = r#"#!/bin/sh
if [ "$1" = bound ]; then
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    ip route replace default via "$router"
fi
echo "$1 ip=$ip mask=$subnet router=$router dns=$dns mtu=$mtu lease=$lease" >> LOG
"#;

/// A DHCP client's event script in a directory of the daemon's data, `LOG` in its text
/// replaced by the log it writes: the directory, the script and the log.
fn event_script(d: &Daemon, client: &str, text: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = d.data_dir.join(client);
    std::fs::create_dir_all(&dir).unwrap();
    let (script, log) = (dir.join("event.sh"), dir.join("events.log"));
    std::fs::write(&script, text.replace("LOG", &log.display().to_string())).unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    (dir, script, log)
}

const DEVICE: &str = "apiVersion: persona.dev/v1
kind: Device
metadata: { name: vm1 }
spec:
  interface: pvm1
  innerV4: 198.18.0.2
  mac: \"52:54:00:00:00:02\"
  gatewayV4: 198.18.0.1
  persona: office
  dhcp: { prefix: 24, leaseSeconds: 10, mtu: 1400 }
";

/// Its address, prefix, gateway, resolver and MTU come from the daemon; its renewal is
/// answered; it is then seen outside as its persona; nothing of its DHCP reaches
/// the uplink; and a lease that would not hold the gateway is refused by field.
#[test]
fn a_vm_without_configuration_gets_its_inner_address_by_dhcp_and_renews_it() {
    let lab = Lab::new(VmLink::Tap);
    lab.vm
        .exec("ip addr flush dev eth0 && ip route flush table main");
    let d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/personas.yaml");
    d.apply_yaml(DEVICE);
    let uplink = Capture::start(&lab.host.name, UPLINK, "udp port 67 or udp port 68");

    let (_, script, log) = event_script(&d, "udhcpc", SCRIPT);
    let mut client = Command::new("ip")
        .args(["netns", "exec", &lab.vm.name, "busybox", "udhcpc", "-f"])
        .args(["-i", "eth0", "-t", "5", "-T", "1", "-s"])
        .arg(&script)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("udhcpc");
    let events = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the VM is bound", || events().contains("bound"));
    assert!(
        events().contains(
            "bound ip=198.18.0.2 mask=255.255.255.0 router=198.18.0.1 dns=198.18.0.1 mtu=1400 lease=10"
        ),
        "{}",
        events()
    );
    let configured = lab.vm.exec("ip -4 addr show dev eth0");
    assert!(configured.contains("198.18.0.2/24"), "{configured}");
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.10"),
        "configured by DHCP, the VM is seen as its persona"
    );
    // busybox renews at half the lease but never before a minute; SIGUSR1 renews now,
    // by a request sent from the VM's address to the daemon's, as a renewal is.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(client.id() as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    wait_until("the lease is renewed", || {
        events().contains("renew ip=198.18.0.2")
    });
    let _ = client.kill();
    let _ = client.wait();

    let metrics = d.metrics();
    let answered = |message: &str, answer: &str| {
        metric_sum(
            &metrics,
            "persona_dhcp_messages_total",
            &[("device", "vm1"), ("message", message), ("answer", answer)],
        )
    };
    assert!(answered("discover", "offer") >= 1, "{metrics}");
    assert!(
        answered("request", "ack") >= 2,
        "the first request and the renewal: {metrics}"
    );
    let leaked = uplink.stop();
    assert!(leaked.is_empty(), "DHCP reached the uplink: {leaked:?}");

    let bad = DEVICE.replace("prefix: 24", "prefix: 31");
    let path = d.data_dir.join("bad.yaml");
    std::fs::write(&path, bad).unwrap();
    let refused = d.cli(&format!("apply -f {}", path.display()));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("spec.dhcp.prefix"),
        "{said}"
    );
}

/// dhclient's script: the DHCPv6 lease goes on the interface, and each event is logged
/// once applied (in LOG, written in: dhclient gives its script no environment of ours).
const SCRIPT6: &str = r#"#!/bin/sh
case "$reason" in
BOUND6|RENEW6|REBIND6) ip -6 addr replace "$new_ip6_address/128" dev "$interface" nodad ;;
esac
echo "$reason $new_ip6_address" >> LOG
"#;

/// The VM's IPv6: a router advertisement (its gateway as the router, its /64 on-link,
/// addresses managed) answers its solicitation and gives it its default route, and a
/// real DHCPv6 client (dhclient -6) gets `innerV6` exactly; it is then seen outside as
/// its persona's IPv6 address, and nothing of it reached the uplink.
#[test]
fn a_vm_gets_its_ipv6_router_by_advertisement_and_its_inner_address_by_dhcpv6() {
    let lab = Lab::new(VmLink::Tap);
    lab.vm.exec(
        "ip -6 addr flush dev eth0 scope global && ip -6 route flush dev eth0 && sysctl -qw net.ipv6.conf.eth0.accept_ra=1",
    );
    let d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/personas.yaml");
    d.cli_ok("apply -f examples/devices.yaml");
    let uplink = Capture::start(
        &lab.host.name,
        UPLINK,
        // The host's and the outside's own solicitations are theirs, not the VM's.
        "udp port 546 or udp port 547 or icmp6[0] == 134 or (icmp6[0] == 133 and src host fe80::5054:ff:fe00:2)",
    );

    wait_until("the VM's link-local address is usable", || {
        let addrs = lab.vm.exec("ip -6 addr show dev eth0 scope link");
        addrs.contains("fe80::") && !addrs.contains("tentative")
    });
    let ra = lab.vm.exec("rdisc6 -1 -w 2000 eth0");
    let ra = ra.split_whitespace().collect::<Vec<_>>().join(" ");
    for said in [
        "Stateful address conf. : Yes",
        "Router lifetime : 1800",
        "Prefix : 2001:db8:1::/64 On-link : Yes Autonomous address conf.: No",
        "MTU : 1500",
        "from fe80::1",
    ] {
        assert!(ra.contains(said), "{said:?} missing from\n{ra}");
    }
    wait_until("the VM routes by the advertised router", || {
        let routes = lab.vm.exec("ip -6 route show default");
        routes.contains("via fe80::1") && routes.contains("proto ra")
    });

    let (dir, script, log) = event_script(&d, "dhclient", SCRIPT6);
    let mut client = Command::new("ip")
        .args(["netns", "exec", &lab.vm.name, "dhclient", "-6", "-d", "-1"])
        .arg("-sf")
        .arg(&script)
        .arg("-lf")
        .arg(dir.join("leases"))
        .arg("-pf")
        .arg(dir.join("pid"))
        .arg("eth0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dhclient");
    let events = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the VM is bound by DHCPv6", || events().contains("BOUND6"));
    let _ = client.kill();
    let _ = client.wait();
    assert!(events().contains("BOUND6 2001:db8:1::2"), "{}", events());
    assert_eq!(
        lab.seen_from_outside_v6().as_deref(),
        Some("2001:db8:a::10"),
        "configured by DHCPv6, the VM is seen as its persona"
    );

    let metrics = d.metrics();
    let answered = |message: &str, answer: &str| {
        metric_sum(
            &metrics,
            "persona_dhcp_messages_total",
            &[("device", "vm1"), ("message", message), ("answer", answer)],
        )
    };
    assert!(
        answered("router-solicit", "advertisement") >= 1,
        "{metrics}"
    );
    assert!(answered("solicit", "advertise") >= 1, "{metrics}");
    assert!(answered("request6", "reply") >= 1, "{metrics}");
    let leaked = uplink.stop();
    assert!(leaked.is_empty(), "reached the uplink: {leaked:?}");
}
