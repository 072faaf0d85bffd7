//! A VPN persona sends what its allowed IPs name through a real WireGuard tunnel: the
//! peer (wireguard-go in the outside namespace) gets it decrypted with the persona's
//! address, the uplink carries only encrypted WireGuard datagrams, a 50 MB upload
//! through it arrives whole, and a shift to a persona without VPN sends the same
//! traffic out directly, in the clear.
use persona_tests::{
    capture::Capture,
    daemon::Daemon,
    lab::{Lab, OUTSIDE, UPLINK, VmLink},
    netns::sh,
    sink::{Sink, Upload},
};

/// Behind the peer: the network the VPN persona's allowed IPs name.
const BEHIND_PEER: &str = "198.18.100.7";

fn manifests(key_file: &str, peer_public: &str) -> String {
    format!(
        r#"
apiVersion: persona.dev/v1
kind: Persona
metadata: {{ name: vpn }}
spec:
  addresses: ["203.0.113.10/24"]
  gateway: 203.0.113.1
  vpn:
    wireguard:
      privateKeyFile: {key_file}
      peerPublicKey: "{peer_public}"
      endpoint: "{OUTSIDE}:51820"
      allowedIps: ["198.18.100.0/24"]
      persistentKeepalive: 5
---
apiVersion: persona.dev/v1
kind: Persona
metadata: {{ name: direct }}
spec:
  addresses: ["203.0.113.20/24"]
  gateway: 203.0.113.1
---
apiVersion: persona.dev/v1
kind: Persona
metadata: {{ name: elsewhere }}
spec:
  addresses: ["203.0.113.30/24"]
---
apiVersion: persona.dev/v1
kind: Device
metadata: {{ name: vm1 }}
spec:
  interface: pvm1
  innerV4: 198.18.0.2
  mac: "52:54:00:00:00:02"
  gatewayV4: 198.18.0.1
  persona: vpn
"#
    )
}

/// One UDP round trip from the VM to the echo server at `to`: the address the server
/// saw, if it answered.
fn round_trip(lab: &Lab, to: &str) -> Option<String> {
    let out = lab.vm.try_exec(&format!(
        "python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); s.sendto(b\"ping\", (\"{to}\", 9000)); print(s.recvfrom(100)[0].decode().split()[1])'"
    ));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Everything the host's uplink carried while the VM did 5 round trips to `to`.
fn on_the_uplink(lab: &Lab, to: &str) -> Vec<String> {
    let capture = Capture::start(&lab.host.name, UPLINK, "ip");
    for _ in 0..5 {
        assert!(round_trip(lab, to).is_some(), "a round trip failed");
    }
    capture.stop()
}

#[test]
fn a_vpn_persona_goes_through_a_real_wireguard_tunnel() {
    // A veth with its TX offloads on (the default): the VM hands over partial checksums
    // and 64 KB GSO skbs, which tc rewrites and the tunnel (a tun device read by
    // wireguard-go) must still get right.
    let lab = Lab::new(VmLink::Veth);
    let dir = std::env::temp_dir().join(format!("persona-vpn-{}", lab.host.name));
    std::fs::create_dir_all(&dir).unwrap();
    let key = |name: &str| {
        let private = sh("wg genkey").trim().to_owned();
        let file = dir.join(name);
        std::fs::write(&file, format!("{private}\n")).unwrap();
        let public = sh(&format!("wg pubkey < {}", file.display()))
            .trim()
            .to_owned();
        (file, private, public)
    };
    let (host_key, host_private, host_public) = key("persona.key");
    let (peer_key, _, peer_public) = key("peer.key");

    // The peer: wireguard-go in the outside namespace, the network behind it on its
    // tunnel interface, the persona's address routed back through the tunnel.
    let peer = format!("wgp{}", std::process::id() % 100_000);
    lab.out.exec(&format!(
        "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go {peer} && wg set {peer} private-key {} listen-port 51820 peer {host_public} allowed-ips 203.0.113.10/32 && ip link set {peer} up && ip addr add {BEHIND_PEER}/32 dev {peer} && ip route add 203.0.113.10/32 dev {peer}",
        peer_key.display()
    ));

    let d = Daemon::start(&lab);
    let host_key = d.put_key("persona.key", &std::fs::read(&host_key).unwrap());
    let file = dir.join("manifests.yaml");
    std::fs::write(&file, manifests(host_key.to_str().unwrap(), &peer_public)).unwrap();
    d.cli_ok(&format!("apply -f {}", file.display()));

    // Through the tunnel: the peer's side sees the persona's address, and the uplink
    // carries nothing but WireGuard datagrams between the host and the endpoint.
    assert_eq!(
        round_trip(&lab, BEHIND_PEER).as_deref(),
        Some("203.0.113.10")
    );
    let seen = on_the_uplink(&lab, BEHIND_PEER);
    assert!(seen.len() >= 10, "5 round trips, encrypted: {seen:?}");
    assert!(
        seen.iter()
            .all(|l| l.contains(".51820") && l.contains("UDP")),
        "only WireGuard on the uplink: {seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.contains(BEHIND_PEER)),
        "nothing in the clear: {seen:?}"
    );
    let transfer = lab.out.exec(&format!("wg show {peer} transfer"));
    assert!(!transfer.trim().is_empty(), "{transfer}");

    // 50 MB up through the tunnel arrive whole, from the persona's address.
    let mut sink = Sink::start(&lab.out.name, 5001);
    let blob = dir.join("blob");
    sh(&format!(
        "head -c {} /dev/urandom > {}",
        50 << 20,
        blob.display()
    ));
    let sum = sh(&format!("sha256sum {}", blob.display()));
    let sum = sum.split_whitespace().next().expect("sha256sum");
    lab.vm.exec(&format!(
        "timeout 120 socat -u FILE:{} TCP:{BEHIND_PEER}:5001,connect-timeout=5",
        blob.display()
    ));
    assert_eq!(
        sink.next_upload(),
        Upload::new(sum, 50 << 20, "::ffff:203.0.113.10")
    );

    // Keys never leave their files: not in the API, the audit log, or the daemon's view.
    for path in ["/personas/vpn", "/events", "/status/vm1"] {
        let (_, v) = d.admin(hyper::Method::GET, path, None);
        assert!(
            !v.to_string().contains(&host_private),
            "{path} shows the key"
        );
    }

    // Without VPN the device's traffic leaves directly, in the clear, from the other
    // persona's address.
    d.cli_ok("shift vm1 direct");
    assert_eq!(round_trip(&lab, OUTSIDE).as_deref(), Some("203.0.113.20"));
    let seen = on_the_uplink(&lab, OUTSIDE);
    assert!(
        seen.iter()
            .any(|l| l.contains("203.0.113.20.") && l.contains(&format!("> {OUTSIDE}.9000"))),
        "in the clear now: {seen:?}"
    );

    // The tunnel outlives the flip while flows opened through it are open (their
    // replies still come that way); a cut ends them, and the tunnel with them.
    assert!(lab.host.exec("ip -o link show").contains("pwg"));
    d.cli_ok("shift vm1 elsewhere");
    assert!(
        lab.host.exec("ip -o link show").contains("pwg"),
        "the VPN address drains for its open UDP flows"
    );
    d.cli_ok("shift vm1 direct --flows cut");
    let links = lab.host.exec("ip -o link show");
    assert!(
        !links.contains("pwg"),
        "the tunnel is gone: {links} {}",
        lab.host
            .exec("ip rule; ip route show table all | grep -v local")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
