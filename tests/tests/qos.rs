//! QoS per persona: a rate the VM's traffic is shaped to, both ways, and the DSCP the
//! network sees; a shift changes them with the rest of the persona.
use std::process::{Command, Stdio};

use hyper::Method;
use persona_tests::{
    capture::Capture,
    daemon::Daemon,
    lab::{Lab, OUTSIDE, VmLink},
};
use serde_json::{Value, json};

const PACED: &str = "203.0.113.61";
const FREE: &str = "203.0.113.62";

/// Mbit/s the receiving end counted, over 4 s of iperf3 from the VM (`-R`: to it).
fn iperf(lab: &Lab, reverse: bool) -> f64 {
    let mut server = Command::new("ip")
        .args(["netns", "exec", &lab.out.name])
        .args(["iperf3", "-s", "-1", "-B", OUTSIDE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    for _ in 0..100 {
        if lab.out.try_exec("ss -ltn | grep -q :5201").status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = lab.vm.try_exec(&format!(
        "iperf3 -c {OUTSIDE} -t 4 -O 1 -J {}",
        if reverse { "-R" } else { "" }
    ));
    let _ = server.kill();
    let _ = server.wait();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no rate in {v}"))
        / 1e6
}

fn persona(d: &Daemon, name: &str, address: &str, qos: Value) -> (u16, Value) {
    let body = json!({"metadata": {"name": name}, "spec": {
        "addresses": [format!("{address}/24")],
        "gateway": "203.0.113.1",
        "qos": qos,
    }});
    d.admin(Method::POST, "/personas", Some(&body))
}

#[test]
fn a_persona_shapes_its_vm_to_its_rate_and_marks_its_dscp_and_a_shift_lifts_both() {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start(&lab);
    d.cli_ok("apply -f examples/personas.yaml");
    d.cli_ok("apply -f examples/devices.yaml");
    let qos = json!({"egressRate": "20mbit", "ingressRate": "20mbit", "dscp": "af41"});
    let (s, v) = persona(&d, "paced", PACED, qos);
    assert_eq!(s, 201, "{v}");
    let (s, v) = persona(&d, "free", FREE, json!({}));
    assert_eq!(s, 201, "{v}");

    d.cli_ok("shift vm1 paced");
    let marked = Capture::start(
        &lab.out.name,
        "eth0",
        &format!("src host {PACED} and tcp and (ip[1] & 0xfc) = 0x88"),
    );
    let unmarked = Capture::start(
        &lab.out.name,
        "eth0",
        &format!("src host {PACED} and tcp and (ip[1] & 0xfc) != 0x88"),
    );
    let up = iperf(&lab, false);
    let down = iperf(&lab, true);
    assert!((18.0..=21.0).contains(&up), "from the VM: {up:.1} Mbit/s");
    assert!((18.0..=21.0).contains(&down), "to the VM: {down:.1} Mbit/s");
    let (marked, unmarked) = (marked.stop(), unmarked.stop());
    assert!(marked.len() > 100, "{} marked AF41", marked.len());
    assert!(unmarked.is_empty(), "unmarked: {unmarked:?}");
    let metrics = d.metrics();
    for direction in ["egress", "ingress"] {
        for name in ["persona_qos_backlog_bytes", "persona_qos_dropped_packets"] {
            let series =
                format!("{name}{{device=\"vm1\",persona=\"paced\",direction=\"{direction}\"}} ");
            assert!(metrics.contains(&series), "{series} missing from {metrics}");
        }
    }
    let qdisc = lab.host.exec("tc qdisc show dev up0 root");
    assert!(qdisc.starts_with("qdisc htb 5e5e: root"), "{qdisc}");

    d.cli_ok("shift vm1 free");
    let unmarked = Capture::start(
        &lab.out.name,
        "eth0",
        &format!("src host {FREE} and tcp and (ip[1] & 0xfc) = 0"),
    );
    let up = iperf(&lab, false);
    let down = iperf(&lab, true);
    assert!(up > 60.0, "from the VM, unshaped: {up:.1} Mbit/s");
    assert!(down > 60.0, "to the VM, unshaped: {down:.1} Mbit/s");
    assert!(unmarked.stop().len() > 100, "not marked any more");
    assert!(
        !d.metrics()
            .contains("persona_qos_backlog_bytes{device=\"vm1\""),
        "no class shapes vm1 any more"
    );

    for (qos, field, why) in [
        (
            json!({"egressRate": "fast"}),
            "spec.qos.egressRate",
            "is not a rate",
        ),
        (
            json!({"ingressRate": "2kbit"}),
            "spec.qos.ingressRate",
            "outside 8kbit",
        ),
        (
            json!({"dscp": "af51"}),
            "spec.qos.dscp",
            "is not a DSCP name",
        ),
        (json!({"dscp": 64}), "spec.qos.dscp", "is not a DSCP"),
        (json!({"burst": 1}), "spec.qos", "unknown field"),
    ] {
        let (s, v) = persona(&d, "bad", "203.0.113.63", qos.clone());
        let said = v.to_string();
        assert!(
            s == 422 && said.contains(field) && said.contains(why),
            "{qos}: {s} {said}"
        );
    }
    let (s, _) = d.admin(Method::GET, "/personas/bad", None);
    assert_eq!(s, 404, "nothing of a refused persona is stored");
}
