//! `persona datapath ...`: the pinned datapath, worked on directly without the daemon.
use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context as _, bail};
use persona_common::{DIR_EGRESS, DIR_INGRESS};
use serde::Serialize;

use super::{Cli, DatapathCommand, Output};
use crate::{
    datapath::{
        Counters, Datapath, compile,
        kernel::{KernelConfig, KernelDatapath},
    },
    host::Host,
    model::{DeviceSpec, FlowMode, Manifest, PersonaSpec, load_manifests},
    node::Node,
};

pub(super) struct Catalog {
    pub personas: BTreeMap<String, PersonaSpec>,
    pub devices: BTreeMap<String, DeviceSpec>,
}

pub(super) fn catalog(path: &std::path::Path) -> anyhow::Result<Catalog> {
    let mut personas = BTreeMap::new();
    let mut devices = BTreeMap::new();
    for m in load_manifests(path)? {
        match m {
            Manifest::Persona { metadata, spec, .. } => {
                if personas.insert(metadata.name.clone(), spec).is_some() {
                    bail!("Persona {:?} is defined twice", metadata.name);
                }
            }
            Manifest::Device { metadata, spec, .. } => {
                if devices.insert(metadata.name.clone(), spec).is_some() {
                    bail!("Device {:?} is defined twice", metadata.name);
                }
            }
            // Rules need the daemon's engine; the pinned datapath has no use for them.
            Manifest::Rule { .. } | Manifest::Application { .. } => {}
        }
    }
    for (name, d) in &devices {
        if let Some(p) = &d.persona
            && !personas.contains_key(p)
        {
            bail!("Device {name:?}: spec.persona: no Persona named {p:?}");
        }
    }
    Ok(Catalog { personas, devices })
}

fn datapath(cli: &Cli, exclusive: bool) -> anyhow::Result<KernelDatapath> {
    Ok(KernelDatapath::open(KernelConfig {
        pin_dir: cli.pin_dir.clone(),
        uplinks: cli.uplink.clone(),
        wire_host: exclusive,
        exclusive,
        routing: cli.host_routing,
        metadata: false,
    })?)
}

/// The pinned datapath with the host's wiring, as the daemon drives it.
fn node(cli: &Cli) -> anyhow::Result<Node> {
    let host = Host::new(
        &cli.uplink,
        Some(crate::host::sysctl::record_for(&cli.pin_dir)),
    )?
    .with_keys(crate::keys::KeyDir::new(&cli.key_dir));
    Ok(Node::new(Box::new(datapath(cli, true)?), Box::new(host)))
}

fn ifindex(interface: &str) -> anyhow::Result<u32> {
    Ok(crate::datapath::ifindex(interface)?)
}

impl Catalog {
    /// Without the daemon's store, a persona's counter id is its place among the
    /// manifests' personas, by name.
    fn shift_to(
        &self,
        dp: &mut Node,
        ifindex: u32,
        name: &str,
        flows: Option<FlowMode>,
    ) -> anyhow::Result<u64> {
        let spec = self
            .personas
            .get(name)
            .with_context(|| format!("no Persona named {name:?}"))?;
        let id = self.personas.keys().position(|p| p == name).unwrap_or(0) as u32 + 1;
        let flows = flows.or(spec.flows).unwrap_or_default();
        shift_to(dp, ifindex, name, id, spec, flows)
    }
}

fn shift_to(
    node: &mut Node,
    ifindex: u32,
    name: &str,
    id: u32,
    spec: &PersonaSpec,
    flows: FlowMode,
) -> anyhow::Result<u64> {
    // Without the daemon there is no record of other devices' leases: each pool's
    // first address.
    let leases: Vec<ipnet::IpNet> = spec
        .address_pool
        .iter()
        .filter_map(|p| ipnet::IpNet::new(p.hosts().next()?, p.prefix_len()).ok())
        .collect();
    let mut compiled =
        compile(&spec.leased(&leases)).with_context(|| format!("Persona {name:?}"))?;
    compiled.id = id;
    let applied = node.apply(ifindex, compiled, None, flows, None)?;
    let flipped = applied.flipped().cloned().context("a shift flips")?;
    node.commit(applied)?;
    // No daemon sweeps for this process: the previous addresses go now unless open
    // flows still use them.
    node.sweep()?;
    tracing::info!(
        ifindex,
        persona = name,
        generation = flipped.generation,
        flip_us = flipped.flip.as_micros() as u64,
        "shifted"
    );
    Ok(flipped.generation)
}

#[derive(Serialize)]
struct StatusRow {
    direction: &'static str,
    reason: &'static str,
    packets: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct Status {
    interface: String,
    ifindex: u32,
    generation: Option<u64>,
    addresses: Vec<IpAddr>,
    counters: Vec<StatusRow>,
}

fn status_rows(c: &Counters) -> Vec<StatusRow> {
    c.iter()
        .filter(|(_, v)| v.packets > 0)
        .map(|((dir, reason), v)| StatusRow {
            direction: if *dir == DIR_EGRESS {
                "egress"
            } else if *dir == DIR_INGRESS {
                "ingress"
            } else {
                "?"
            },
            reason: reason.label(),
            packets: v.packets,
            bytes: v.bytes,
        })
        .collect()
}

pub(super) fn run(cli: &Cli, command: &DatapathCommand) -> anyhow::Result<()> {
    match command {
        DatapathCommand::Run {
            manifests,
            detach_on_exit,
        } => {
            let c = catalog(manifests)?;
            let mut dp = node(cli)?;
            let mut attached = Vec::new();
            for (name, d) in &c.devices {
                let ifindex = dp
                    .attach(d)
                    .with_context(|| format!("attaching Device {name:?}"))?;
                attached.push(ifindex);
                match (dp.datapath.active(ifindex)?, &d.persona) {
                    (Some(a), _) => println!(
                        "{name}: {} keeps generation {} (found pinned)",
                        d.interface, a.generation
                    ),
                    (None, Some(p)) => {
                        let generation = c.shift_to(&mut dp, ifindex, p, None)?;
                        println!("{name}: {} now {p} (generation {generation})", d.interface);
                    }
                    (None, None) => println!(
                        "{name}: {} attached without a persona: its traffic is dropped",
                        d.interface
                    ),
                }
            }
            println!("ready");
            // Signals are awaited on a thread of their own: the host's netlink runtime
            // must not run inside another, and this one sweeps each second meanwhile.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stop.clone();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let waiter = std::thread::spawn(move || {
                let waited = rt.block_on(async {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    Ok::<_, std::io::Error>(())
                });
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
                waited
            });
            let mut last = std::time::Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if last.elapsed() >= std::time::Duration::from_secs(1) {
                    last = std::time::Instant::now();
                    if let Err(e) = dp.sweep() {
                        tracing::warn!(error = %e, "sweeping connection tracking");
                    }
                }
            }
            waiter
                .join()
                .map_err(|_| anyhow::anyhow!("the signal thread panicked"))??;
            if *detach_on_exit {
                for ifindex in attached {
                    dp.detach(ifindex)?;
                }
            }
        }
        DatapathCommand::Attach { manifests, device } => {
            let c = catalog(manifests)?;
            let d = c
                .devices
                .get(device)
                .with_context(|| format!("no Device named {device:?}"))?;
            let mut dp = node(cli)?;
            let ifindex = dp.attach(d)?;
            if let (None, Some(p)) = (dp.datapath.active(ifindex)?, &d.persona) {
                c.shift_to(&mut dp, ifindex, p, None)?;
            }
            println!("{device}: attached to {} (ifindex {ifindex})", d.interface);
        }
        DatapathCommand::Reset => {
            let (links, maps) = crate::datapath::kernel::remove_pins(&cli.pin_dir)?;
            println!(
                "{}: {links} program links and {maps} maps unpinned",
                cli.pin_dir.display()
            );
        }
        DatapathCommand::Detach { interface } => {
            let mut dp = node(cli)?;
            dp.detach(ifindex(interface)?)?;
            println!("{interface}: detached");
        }
        DatapathCommand::Shift {
            interface,
            persona,
            manifests,
            flows,
        } => {
            let c = catalog(manifests)?;
            let ifindex = ifindex(interface)?;
            let mut dp = node(cli)?;
            let generation = c.shift_to(&mut dp, ifindex, persona, *flows)?;
            println!("{interface}: {persona} (generation {generation})");
        }
        DatapathCommand::Status { interface, output } => {
            let ifindex = ifindex(interface)?;
            let dp = datapath(cli, false)?;
            let active = dp.active(ifindex)?;
            let status = Status {
                interface: interface.clone(),
                ifindex,
                generation: active.map(|a| a.generation),
                addresses: dp.active_addresses(ifindex)?,
                counters: status_rows(&dp.counters(ifindex)?),
            };
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                Output::Table => {
                    let addrs: Vec<String> =
                        status.addresses.iter().map(|a| a.to_string()).collect();
                    match status.generation {
                        Some(g) => {
                            println!("{interface}: generation {g}, seen as {}", addrs.join(", "))
                        }
                        None => println!("{interface}: no active persona"),
                    }
                    println!(
                        "{:<9} {:<22} {:>12} {:>14}",
                        "DIRECTION", "REASON", "PACKETS", "BYTES"
                    );
                    for r in &status.counters {
                        println!(
                            "{:<9} {:<22} {:>12} {:>14}",
                            r.direction, r.reason, r.packets, r.bytes
                        );
                    }
                }
            }
        }
    }
    Ok(())
}
