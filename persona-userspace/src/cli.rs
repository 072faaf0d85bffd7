//! The `persona` command line.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use persona_common::{DIR_EGRESS, DIR_INGRESS};
use serde::Serialize;

use crate::{
    datapath::{
        Counters, Datapath, ShiftOptions, compile,
        kernel::{DEFAULT_PIN_DIR, KernelConfig, KernelDatapath},
    },
    model::{DeviceSpec, Manifest, PersonaSpec, load_manifests},
};

#[derive(Parser, Debug)]
#[command(
    name = "persona",
    version,
    about = "Switchable network personas for virtual machines"
)]
pub struct Cli {
    /// bpffs directory holding the pinned maps and links.
    #[arg(long, global = true, env = "PERSONA_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Host interface towards the network; persona addresses are proxied on it.
    #[arg(long, global = true, env = "PERSONA_UPLINK")]
    pub uplink: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach every Device in the manifests, give each its starting persona, and stay
    /// in the foreground. Killing it leaves traffic flowing; running it again picks up.
    Run {
        #[arg(short = 'f', long = "filename")]
        manifests: PathBuf,
        /// Detach every device on exit (SIGINT/SIGTERM) instead of leaving it running.
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Attach one device from its manifest.
    Attach {
        #[arg(short = 'f', long = "filename")]
        manifests: PathBuf,
        device: String,
    },
    /// Detach a device: programs, routes and proxies removed.
    Detach { interface: String },
    /// Make PERSONA the active persona of the device on INTERFACE.
    Shift {
        interface: String,
        persona: String,
        #[arg(short = 'f', long = "filename")]
        manifests: PathBuf,
        /// Cut flows opened before the shift instead of letting them finish.
        #[arg(long)]
        cut_flows: bool,
    },
    /// Active generation and per-reason counters of a device.
    Status {
        interface: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Check manifests without touching anything.
    Validate {
        #[arg(short = 'f', long = "filename")]
        manifests: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

struct Catalog {
    personas: BTreeMap<String, PersonaSpec>,
    devices: BTreeMap<String, DeviceSpec>,
}

fn catalog(path: &std::path::Path) -> anyhow::Result<Catalog> {
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
        uplink: cli.uplink.clone(),
        wire_host: exclusive,
        exclusive,
    })?)
}

fn ifindex(interface: &str) -> anyhow::Result<u32> {
    nix::net::if_::if_nametoindex(interface)
        .with_context(|| format!("interface {interface:?} not found"))
}

fn shift_to(
    dp: &mut KernelDatapath,
    ifindex: u32,
    name: &str,
    spec: &PersonaSpec,
    cut_flows: bool,
) -> anyhow::Result<u64> {
    let compiled = compile(spec).with_context(|| format!("Persona {name:?}"))?;
    let staged = dp.stage(&compiled)?;
    let shifted = dp.shift(ifindex, staged, ShiftOptions { cut_flows })?;
    tracing::info!(
        ifindex,
        persona = name,
        generation = shifted.generation,
        flip_us = shifted.flip.as_micros() as u64,
        "shifted"
    );
    Ok(shifted.generation)
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

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Validate { manifests } => {
            let c = catalog(manifests)?;
            for (name, p) in &c.personas {
                compile(p).with_context(|| format!("Persona {name:?}"))?;
            }
            println!(
                "{} personas, {} devices: valid",
                c.personas.len(),
                c.devices.len()
            );
        }
        Command::Run {
            manifests,
            detach_on_exit,
        } => {
            let c = catalog(manifests)?;
            let mut dp = datapath(&cli, true)?;
            let mut attached = Vec::new();
            for (name, d) in &c.devices {
                let ifindex = dp
                    .attach(d)
                    .with_context(|| format!("attaching Device {name:?}"))?;
                attached.push(ifindex);
                match (dp.active(ifindex)?, &d.persona) {
                    (Some(a), _) => println!(
                        "{name}: {} keeps generation {} (found pinned)",
                        d.interface, a.generation
                    ),
                    (None, Some(p)) => {
                        let generation = shift_to(&mut dp, ifindex, p, &c.personas[p], false)?;
                        println!("{name}: {} now {p} (generation {generation})", d.interface);
                    }
                    (None, None) => println!(
                        "{name}: {} attached without a persona: its traffic is dropped",
                        d.interface
                    ),
                }
            }
            println!("ready");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                Ok::<_, std::io::Error>(())
            })?;
            if *detach_on_exit {
                for ifindex in attached {
                    dp.detach(ifindex)?;
                }
            }
        }
        Command::Attach { manifests, device } => {
            let c = catalog(manifests)?;
            let d = c
                .devices
                .get(device)
                .with_context(|| format!("no Device named {device:?}"))?;
            let mut dp = datapath(&cli, true)?;
            let ifindex = dp.attach(d)?;
            if let (None, Some(p)) = (dp.active(ifindex)?, &d.persona) {
                shift_to(&mut dp, ifindex, p, &c.personas[p], false)?;
            }
            println!("{device}: attached to {} (ifindex {ifindex})", d.interface);
        }
        Command::Detach { interface } => {
            let mut dp = datapath(&cli, true)?;
            dp.detach(ifindex(interface)?)?;
            println!("{interface}: detached");
        }
        Command::Shift {
            interface,
            persona,
            manifests,
            cut_flows,
        } => {
            let c = catalog(manifests)?;
            let spec = c
                .personas
                .get(persona)
                .with_context(|| format!("no Persona named {persona:?}"))?;
            let ifindex = ifindex(interface)?;
            let mut dp = datapath(&cli, true)?;
            let generation = shift_to(&mut dp, ifindex, persona, spec, *cut_flows)?;
            println!("{interface}: {persona} (generation {generation})");
        }
        Command::Status { interface, output } => {
            let ifindex = ifindex(interface)?;
            let dp = datapath(&cli, false)?;
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
