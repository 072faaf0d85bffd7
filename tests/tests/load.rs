//! Shifts under load and a restart under load, in namespaces, with real UDP traffic.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use persona::{
    datapath::{
        Datapath, ShiftOptions, compile,
        kernel::{KernelConfig, KernelDatapath},
    },
    host::{Host, Wiring as _},
    model::{FlowMode, Manifest, load_manifests},
};
use persona_tests::lab::{Lab, UPLINK, VM_IFACE, VmLink, finish_probe};

fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns");
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

fn examples() -> Vec<Manifest> {
    load_manifests(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples"
    )))
    .expect("examples")
}

/// Thousands of shifts between two personas with different addresses and rules while
/// UDP round trips flow: every reply shows exactly one persona's address, and since both
/// personas allow the flow, none is lost.
#[test]
fn shifts_under_load_lose_nothing_and_never_mix_personas() {
    let lab = Lab::new(VmLink::Veth);
    let handle = {
        let (host, pin_dir) = (lab.host.name.clone(), lab.pin_dir.clone());
        let probe = lab.start_probe(4000, 1.5);
        std::thread::spawn(move || {
            // This thread alone moves into the host's namespace.
            enter(&host);
            let mut dp = KernelDatapath::open(KernelConfig {
                pin_dir,
                uplinks: vec![UPLINK.into()],
                wire_host: true,
                ..KernelConfig::default()
            })
            .expect("datapath");
            let mut personas = Vec::new();
            let mut device = None;
            for m in examples() {
                match m {
                    Manifest::Persona { spec, .. } => {
                        personas.push(compile(&spec).expect("compiles"))
                    }
                    Manifest::Device { spec, .. } => {
                        device.get_or_insert(spec);
                    }
                    Manifest::Rule { .. } | Manifest::Application { .. } => {}
                }
            }
            // Both personas' addresses are wired up front: what is measured is the
            // datapath's shifts, which move the probe's one flow back and forth.
            let device = device.expect("a device");
            let host = Host::new(&[UPLINK.into()], None).expect("host wiring");
            let ifindex = dp.attach(&device).expect("attach");
            host.prepare_device(ifindex, &device)
                .expect("preparing the tap");
            let inner = dp.wiring(ifindex).expect("wiring").inner;
            for p in &personas {
                host.announce(ifindex, &p.addresses(), &inner, p)
                    .expect("announcing");
            }
            let start = Instant::now();
            let mut shifts = 0u32;
            let mut probe: Option<Child> = Some(probe);
            while start.elapsed() < Duration::from_secs(30) && shifts < 50_000 {
                let staged = dp.stage(&personas[shifts as usize % 2]).expect("stage");
                dp.shift(
                    ifindex,
                    staged,
                    ShiftOptions {
                        flows: FlowMode::Move,
                    },
                )
                .expect("shift");
                shifts += 1;
                if probe.as_mut().unwrap().try_wait().expect("probe").is_some() {
                    break;
                }
            }
            (shifts, finish_probe(probe.take().unwrap()), {
                dp.reclaim().expect("reclaiming");
                dp.tables_in_use()
            })
        })
    };
    let (shifts, probe, tables) = handle.join().expect("shift thread");
    eprintln!("{shifts} shifts, probe: {probe:?}");
    assert!(
        shifts >= 1000,
        "only {shifts} shifts happened during the traffic"
    );
    assert_eq!(
        probe.received, probe.sent,
        "lost round trips: {:?}",
        probe.missing
    );
    let addrs: Vec<&str> = probe.by_addr.keys().map(String::as_str).collect();
    assert_eq!(
        addrs,
        ["203.0.113.10", "203.0.113.20"],
        "each packet seen as exactly one persona, both seen"
    );
    assert_eq!(tables, 1, "every replaced table was released");
}

fn start_run(lab: &Lab) -> (Child, Vec<String>) {
    let mut child = lab
        .persona("datapath run -f examples/")
        .stdout(Stdio::piped())
        .spawn()
        .expect("persona run");
    let mut lines = Vec::new();
    let reader = BufReader::new(child.stdout.take().unwrap());
    for line in reader.lines() {
        let line = line.expect("reading persona run");
        let ready = line == "ready";
        lines.push(line);
        if ready {
            break;
        }
    }
    assert_eq!(
        lines.last().map(String::as_str),
        Some("ready"),
        "persona run never got ready: {lines:?}"
    );
    (child, lines)
}

/// SIGKILL the userspace process while traffic flows: the pinned programs keep working,
/// nothing is lost, and the next process finds the pins and keeps the active persona.
#[test]
fn sigkill_of_the_userspace_process_loses_nothing() {
    let lab = Lab::new(VmLink::Veth);
    let (mut first, lines) = start_run(&lab);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("now office (generation 1)")),
        "{lines:?}"
    );

    let probe = lab.start_probe(2000, 1.5);
    std::thread::sleep(Duration::from_millis(700));
    first.kill().expect("SIGKILL");
    first.wait().expect("reaping");
    std::thread::sleep(Duration::from_millis(700));
    let (mut second, lines) = start_run(&lab);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("keeps generation 1 (found pinned)")),
        "restart did not pick up the pins: {lines:?}"
    );
    let probe = finish_probe(probe);
    assert_eq!(
        probe.received, probe.sent,
        "lost across the restart: {:?}",
        probe.missing
    );
    assert_eq!(probe.by_addr.keys().collect::<Vec<_>>(), ["203.0.113.10"]);

    second.kill().expect("stopping");
    second.wait().expect("reaping");
    let out = lab.persona_ok(&format!("datapath shift {VM_IFACE} travel -f examples/"));
    let before = lines.iter().filter_map(|l| generation(l)).max();
    assert!(
        generation(&out) > before && before.is_some(),
        "generations continue after restarts: {out} after {lines:?}"
    );
}

fn generation(line: &str) -> Option<u64> {
    let rest = &line[line.find("generation ")? + "generation ".len()..];
    rest[..rest.find(|c: char| !c.is_ascii_digit())?]
        .parse()
        .ok()
}
