//! A persona's gateway is its next hop: with two uplinks, shifting between personas
//! with different gateways moves the device's traffic from one uplink to the other.
use persona_tests::{
    daemon::Daemon,
    lab::{Lab, OUTSIDE, VmLink},
};

const MANIFESTS: &str = r#"
apiVersion: persona.dev/v1
kind: Persona
metadata: { name: left }
spec:
  addresses: ["203.0.113.10/24"]
  gateway: 203.0.113.1
---
apiVersion: persona.dev/v1
kind: Persona
metadata: { name: right }
spec:
  addresses: ["192.0.2.20/24"]
  gateway: 192.0.2.1
---
apiVersion: persona.dev/v1
kind: Device
metadata: { name: vm1 }
spec:
  interface: pvm1
  innerV4: 198.18.0.2
  mac: "52:54:00:00:00:02"
  gatewayV4: 198.18.0.1
  persona: left
"#;

/// Packets the outside received on each of its two links while the VM sent `n`
/// datagrams, and the address it saw them from.
fn send(lab: &Lab, n: u32) -> (u64, u64, Option<String>) {
    let rx = |dev: &str| -> u64 {
        lab.out
            .exec(&format!("cat /sys/class/net/{dev}/statistics/rx_packets"))
            .trim()
            .parse()
            .unwrap()
    };
    let (a, b) = (rx("eth0"), rx("eth1"));
    let sent = lab.vm.try_exec(&format!(
        "python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); [s.sendto(bytes(64), (\"{OUTSIDE}\", 9999)) for _ in range({n})]'"
    ));
    assert!(sent.status.success());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (da, db) = (rx("eth0") - a, rx("eth1") - b);
    (da, db, lab.seen_from_outside())
}

#[test]
fn the_personas_gateway_picks_the_uplink() {
    let lab = Lab::new(VmLink::Veth);
    // A second link between host and outside, with the second persona's gateway on it.
    persona_tests::netns::sh(&format!(
        "ip link add up1 netns {} type veth peer name eth1 netns {}",
        lab.host.name, lab.out.name
    ));
    lab.host
        .exec("ip link set up1 up && ip route add 192.0.2.1 dev up1");
    lab.out.exec(&format!(
        "ip link set eth1 up && ip addr add 192.0.2.1/32 dev eth1 && ip route add 192.0.2.0/24 dev eth1 src {OUTSIDE}"
    ));
    let d = Daemon::start_with(&lab, &["--uplink", "up0,up1"]);
    let file = std::env::temp_dir().join(format!("persona-gateways-{}.yaml", lab.host.name));
    std::fs::write(&file, MANIFESTS).unwrap();
    d.cli_ok(&format!("apply -f {}", file.display()));
    let _ = std::fs::remove_file(&file);

    let (left_up0, left_up1, seen) = send(&lab, 200);
    assert_eq!(seen.as_deref(), Some("203.0.113.10"));
    assert!(
        left_up0 >= 200 && left_up1 < 10,
        "left leaves by up0: {left_up0} on up0, {left_up1} on up1"
    );

    d.cli_ok("shift vm1 right");
    let (right_up0, right_up1, seen) = send(&lab, 200);
    assert_eq!(
        seen.as_deref(),
        Some("192.0.2.20"),
        "replies come back by up1"
    );
    assert!(
        right_up1 >= 200 && right_up0 < 10,
        "right leaves by up1: {right_up0} on up0, {right_up1} on up1"
    );

    d.cli_ok("shift vm1 left");
    let (up0, up1, seen) = send(&lab, 200);
    assert_eq!(seen.as_deref(), Some("203.0.113.10"));
    assert!(up0 >= 200 && up1 < 10, "back on up0: {up0} / {up1}");
}
