//! A datapath loaded on its own pin directory, removed again when dropped.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use persona::{
    datapath::{
        Counters, Datapath, ShiftOptions, Shifted, compile,
        kernel::{KernelConfig, KernelDatapath},
        programs::Program,
    },
    model::{DeviceSpec, FlowMode, PersonaSpec},
};
use persona_common::counters::Reason;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// BPF_PROG_TEST_RUN runs both programs as if on the loopback device.
pub const LOOPBACK: u32 = 1;

pub const INNER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const INNER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x1, 0, 0, 0, 0, 2);

pub fn unique_pin_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    PathBuf::from(format!(
        "/sys/fs/bpf/persona-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

pub struct Harness {
    pub dp: KernelDatapath,
    pub pin_dir: PathBuf,
}

pub fn device() -> DeviceSpec {
    DeviceSpec {
        host: None,
        interface: "lo".into(),
        inner_v4: Some(INNER_V4),
        inner_v6: Some(INNER_V6),
        mac: Some("52:54:00:00:00:02".into()),
        gateway_v4: None,
        gateway_v6: None,
        persona: None,
        labels: Default::default(),
        owner: None,
        role: None,
        flood_guard: None,
        dhcp: None,
        metadata: None,
        flow_budget: None,
        tap: None,
    }
}

pub fn persona(yaml: &str) -> PersonaSpec {
    serde_yaml::from_str(yaml)
        .unwrap_or_else(|e| panic!("test persona does not parse: {e}\n{yaml}"))
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    /// A datapath whose device (the loopback) has the inner addresses above and no persona.
    pub fn new() -> Self {
        Self::with_device(&device())
    }

    pub fn with_device(spec: &DeviceSpec) -> Self {
        let pin_dir = unique_pin_dir("pkt");
        let mut dp = KernelDatapath::open(KernelConfig {
            pin_dir: pin_dir.clone(),
            uplinks: Vec::new(),
            wire_host: false,
            ..KernelConfig::default()
        })
        .unwrap_or_else(|e| panic!("loading the datapath (are we root?): {e}"));
        dp.configure_device(LOOPBACK, spec)
            .expect("configuring the test device");
        Self { dp, pin_dir }
    }

    pub fn with_persona(yaml: &str) -> Self {
        let mut h = Self::new();
        h.shift(yaml, FlowMode::Keep);
        h
    }

    pub fn shift(&mut self, yaml: &str, flows: FlowMode) -> Shifted {
        self.shift_as(yaml, 0, flows)
    }

    /// A shift to the persona with the control plane's id `id`, which counters are
    /// kept by.
    pub fn shift_as(&mut self, yaml: &str, id: u32, flows: FlowMode) -> Shifted {
        let mut compiled = compile(&persona(yaml)).expect("test persona compiles");
        compiled.id = id;
        let staged = self.dp.stage(&compiled).expect("staging");
        self.dp
            .shift(LOOPBACK, staged, ShiftOptions { flows })
            .expect("shifting")
    }

    pub fn from_vm(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.dp
            .test_run(Program::FromVm, frame)
            .expect("test run (tc ingress)")
    }

    pub fn to_vm(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.dp
            .test_run(Program::ToVm, frame)
            .expect("test run (tc egress)")
    }

    /// A GSO skb of `segs` segments, `size` payload bytes each, through tc ingress.
    pub fn from_vm_gso(&mut self, frame: &[u8], segs: u32, size: u32) -> u32 {
        self.dp
            .test_run_gso(Program::FromVm, frame, segs, size)
            .expect("test run (tc ingress, GSO)")
    }

    /// The flood guard (XDP), which only ever drops.
    pub fn guard(&mut self, frame: &[u8]) -> u32 {
        self.dp
            .test_run(Program::Guard, frame)
            .expect("test run (XDP guard)")
            .0
    }

    pub fn counters(&self) -> Counters {
        self.dp.counters(LOOPBACK).expect("reading counters")
    }

    pub fn count(&self, direction: u8, reason: Reason) -> u64 {
        self.counters()
            .get(&(direction, reason))
            .map_or(0, |c| c.packets)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}
