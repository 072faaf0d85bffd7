//! The metadata service at 169.254.169.254, as a VM's guest agent uses it: the VM
//! learns its persona and serves with the persona's certificate, reloaded at a shift;
//! another VM and the outside learn nothing of it.
use std::process::{Command, Stdio};

use hyper::Method;
use persona_tests::{
    daemon::{Daemon, metric, metric_sum},
    lab::{Lab, VM2_IFACE, VmLink, wait_until},
    netns::{Netns, sh},
};
use serde_json::{Value, json};

const IDENTITY: &str = "http://169.254.169.254/persona/v1/identity";
const KEY: &str = "http://169.254.169.254/persona/v1/tls/key";

/// A CA, and for each persona a certificate for its name signed by it, with its key
/// in the daemon's key directory.
struct Pki {
    ca_pem: String,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "persona test CA");
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        Self {
            ca_pem: issuer.pem(),
            issuer,
        }
    }

    fn persona(&self, d: &Daemon, name: &str, address: &str, host: &str) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![host.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, host);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key_file = d.put_key(&format!("{name}.key"), key.serialize_pem().as_bytes());
        let body = json!({"metadata": {"name": name}, "spec": {
            "addresses": [address],
            "gateway": "203.0.113.1",
            "firewall": {"ingress": {"default": "drop", "rules": [
                {"cidr": "198.51.100.0/24", "protocol": "tcp", "ports": "8443", "action": "allow"},
            ]}},
            "tls": {"certificate": cert.pem(), "keyFile": key_file, "names": [host]},
        }});
        let (s, v) = d.admin(Method::POST, "/personas", Some(&body));
        assert_eq!(s, 201, "{v}");
    }
}

/// The second VM of the examples (vm2 on pvm2), as a namespace behind a veth.
fn second_vm(lab: &Lab) -> Netns {
    let vm2 = Netns::new("p-vm2");
    lab.host.exec(&format!("ip link del {VM2_IFACE}"));
    sh(&format!(
        "ip link add {VM2_IFACE} netns {} type veth peer name eth0 netns {}",
        lab.host.name, vm2.name
    ));
    lab.host.exec(&format!("ip link set {VM2_IFACE} up"));
    vm2.exec("ip link set eth0 address 52:54:00:00:00:03 && ip addr add 198.18.0.3/24 dev eth0 && ip link set eth0 up && ip route add default via 198.18.0.1");
    vm2
}

fn get(ns: &Netns, url: &str) -> (u16, String) {
    get_with(ns, "-H 'Persona-Metadata: true'", url)
}

fn get_with(ns: &Netns, args: &str, url: &str) -> (u16, String) {
    let out = ns.try_exec(&format!(
        "curl -sS -m 5 {args} -o /dev/stdout -w '\\n%{{http_code}}' {url}"
    ));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Whether the outside, connecting to `address`, is served a certificate that the CA
/// vouches for and that names `host`.
fn outside_verifies(lab: &Lab, ca: &std::path::Path, address: &str, host: &str) -> bool {
    lab.out
        .try_exec(&format!(
            "timeout 5 openssl s_client -connect {address}:8443 -verify_hostname {host} -CAfile {} -verify_return_error </dev/null",
            ca.display()
        ))
        .status
        .success()
}

#[test]
fn a_vm_serves_with_its_personas_certificate_from_the_metadata_service_and_nobody_else_gets_it() {
    let lab = Lab::new(VmLink::Tap);
    let vm2 = second_vm(&lab);
    let d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/personas.yaml");
    d.cli_ok("apply -f examples/devices.yaml");
    let pki = Pki::new();
    pki.persona(&d, "web-a", "203.0.113.51/24", "a.example");
    pki.persona(&d, "web-b", "203.0.113.52/24", "b.example");
    let ca = d.data_dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    d.cli_ok("shift vm1 web-a");

    let (status, body) = get(&lab.vm, IDENTITY);
    assert_eq!(status, 200, "{body}");
    let identity: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(identity["device"], "vm1", "{identity}");
    assert_eq!(identity["persona"], "web-a", "{identity}");
    assert_eq!(
        identity["addresses"],
        json!(["203.0.113.51/24"]),
        "{identity}"
    );
    assert_eq!(identity["gateway"], "203.0.113.1", "{identity}");
    assert_eq!(identity["tls"]["names"], json!(["a.example"]), "{identity}");
    // What a guest's own web server could be tricked into fetching is refused.
    assert_eq!(get_with(&lab.vm, "", KEY).0, 403);
    assert_eq!(
        get_with(
            &lab.vm,
            "-H 'Persona-Metadata: true' -H 'X-Forwarded-For: 192.0.2.1'",
            KEY
        )
        .0,
        403
    );

    // The guest agent, with busybox's wget as a small guest image has it, keeps an
    // openssl s_server on the persona's certificate.
    let guest = d.data_dir.join("guest");
    std::fs::create_dir_all(&guest).unwrap();
    let g = guest.display();
    let reload = format!(
        "[ -f {g}/server.pid ] && kill $(cat {g}/server.pid); openssl s_server -quiet -accept 8443 -cert {g}/tls/chain.pem -key {g}/tls/key.pem -www </dev/null >/dev/null 2>&1 & echo $! > {g}/server.pid"
    );
    let agent_log = guest.join("agent.log");
    let mut agent = Command::new("ip")
        .args(["netns", "exec", &lab.vm.name])
        .arg(
            std::env::current_dir()
                .unwrap()
                .join("../packaging/persona-guest-agent"),
        )
        .args(["-d", &g.to_string(), "-r", &reload])
        .env("PERSONA_FETCH", "busybox wget")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .expect("the guest agent");
    let log = || std::fs::read_to_string(&agent_log).unwrap_or_default();
    wait_until("the outside is served web-a's certificate", || {
        outside_verifies(&lab, &ca, "203.0.113.51", "a.example")
    });
    let key_mode = std::fs::metadata(guest.join("tls/key.pem")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
        0o600,
        "{}",
        log()
    );

    d.cli_ok("shift vm1 web-b");
    wait_until(
        "the agent reloads and the outside is served web-b's",
        || outside_verifies(&lab, &ca, "203.0.113.52", "b.example"),
    );
    assert!(
        !outside_verifies(&lab, &ca, "203.0.113.52", "a.example"),
        "web-a's name is not what web-b's certificate says"
    );
    let _ = agent.kill();
    let _ = agent.wait();

    // Another VM learns its own persona, and gets no key: its persona has none.
    let (status, body) = get(&vm2, IDENTITY);
    assert_eq!(status, 200, "{body}");
    let other: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&other["device"], &other["persona"]),
        (&json!("vm2"), &json!("lab"))
    );
    assert_eq!(get(&vm2, KEY).0, 404);
    // Only the service's port, and only TCP.
    let off_port = lab.vm.try_exec("curl -sS -m 2 http://169.254.169.254:81/");
    // The host's own 169.254.169.254, if it has one, is not taken over.
    let lo = lab.host.exec("ip -4 addr show dev lo");
    assert!(!lo.contains("169.254.169.254"), "{lo}");
    assert!(!off_port.status.success());

    // The outside, routed to the host, and even posing as a device's peer address.
    lab.out.exec(
        "ip route add 169.254.169.254/32 via 198.51.100.1 && ip addr add 169.254.128.1/32 dev eth0",
    );
    for from in ["198.51.100.7", "169.254.128.1"] {
        let out = lab.out.try_exec(&format!(
            "curl -sS -m 3 -H 'Persona-Metadata: true' --interface {from} {IDENTITY}"
        ));
        assert!(
            !out.status.success() && out.stdout.is_empty(),
            "the outside got an answer from {from}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    let metrics = d.metrics();
    let requests = |device: &str, path: &str, status: &str| {
        metric_sum(
            &metrics,
            "persona_metadata_requests_total",
            &[("device", device), ("path", path), ("status", status)],
        )
    };
    assert!(requests("vm1", "identity", "200") >= 3, "{metrics}");
    assert_eq!(requests("vm2", "tls/key", "404"), 1, "{metrics}");
    assert_eq!(
        metric_sum(&metrics, "persona_metadata_requests_total", &[]),
        metric_sum(
            &metrics,
            "persona_metadata_requests_total",
            &[("device", "vm1")]
        ) + metric_sum(
            &metrics,
            "persona_metadata_requests_total",
            &[("device", "vm2")]
        ),
        "only the two VMs were answered: {metrics}"
    );
    assert_eq!(
        metric(&metrics, "persona_metadata_refused_total"),
        0,
        "the outside's attempts never even reached the service: {metrics}"
    );
    let keys = |persona: &str| {
        metric_sum(
            &metrics,
            "persona_metadata_keys_served_total",
            &[("device", "vm1"), ("persona", persona)],
        )
    };
    assert!(keys("web-a") >= 1 && keys("web-b") >= 1, "{metrics}");
    assert!(
        metric_sum(
            &metrics,
            "persona_device_packets_total",
            &[("device", "vm1"), ("reason", "drop_metadata")]
        ) >= 1,
        "{metrics}"
    );

    // Each key served is in the audit log, with the persona and generation.
    let (_, events) = d.admin(Method::GET, "/events?limit=1000", None);
    let served: Vec<&Value> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "tls-key")
        .collect();
    assert_eq!(
        served.len() as u64,
        keys("web-a") + keys("web-b"),
        "{events}"
    );
    assert!(
        served
            .iter()
            .all(|e| e["device"] == "vm1" && e["actor"] == "metadata:vm1"),
        "{served:?}"
    );
    assert!(served.iter().any(|e| e["to"] == "web-b"), "{served:?}");
}
