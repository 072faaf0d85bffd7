//! `cargo xtask`: every set-up step, idempotent, so a fresh machine needs nothing else.
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod cpio;
mod guest;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: apt packages, rust-src, bpf-linker, bpffs.
    Setup,
    /// Set up, then run every test (root required: the tests load BPF programs and
    /// create network namespaces).
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, then play the demo: namespaces as VMs, two personas, a shift, counters.
    Demo {
        /// Three hosts on one etcd cluster instead: personas defined once, a VM on one
        /// host shifted from another's CLI, a VM migrated between hosts.
        #[arg(long)]
        fleet: bool,
    },
    /// Build the QEMU guest (kernel and busybox initramfs from Debian packages) into
    /// target/guest.
    Guest,
    /// Benchmarks: per-packet cost against XDP_PASS, throughput against no program and
    /// nftables, shift latency against `nft -f`, scale, control plane. Writes
    /// BENCHMARKS.md and benchmarks.json.
    Bench {
        /// Only these sections (packets, shifts, flows, lifecycle, control, throughput,
        /// scale).
        sections: Vec<String>,
    },
    /// Build the Debian package with cargo-deb: the binary, the systemd unit, the
    /// default settings and the libvirt hook, into target/debian.
    Package {
        /// Package the debug build (what the tests install), into target/debian/dev.
        #[arg(long)]
        dev: bool,
    },
}

fn package(dev: bool) -> anyhow::Result<()> {
    let mut deb = Command::new("cargo");
    deb.args(["deb", "-p", "persona-userspace", "--locked"]);
    if dev {
        deb.args(["--profile", "dev", "--no-build", "--no-strip", "--fast"])
            .args(["-o", "target/debian/dev"]);
    } else {
        deb.args(["-o", "target/debian"]);
    }
    run(&mut deb)
}

const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "dnsmasq-base",
    "bind9-dnsutils",
    "socat",
    "tcpdump",
    // Hop counts after a forward, as an operator reads them.
    "iputils-ping",
    "bpftool",
    "python3",
    "python3-venv",
    // Writes the small GeoIP database the rule-engine tests look countries up in.
    "libmaxmind-db-writer-perl",
    // promtool checks the daemon's /metrics output in the tests.
    "prometheus",
    // `persona top` is checked in a real terminal.
    "tmux",
    "curl",
    // systemd-analyze checks the unit file; dpkg installs the package in its test.
    "systemd",
    // A real libvirt runs domains with persona's hook.
    "libvirt-daemon-system",
    "libvirt-clients",
    // Real guests: QEMU, and the userland of their initramfs.
    "qemu-system-x86",
    "busybox-static",
    // IPv6 on the tap: a real DHCPv6 client (dhclient -6), and rdisc6 to read the
    // router advertisements.
    "isc-dhcp-client",
    "ndisc6",
    // Copied into the guest to show its offloads; on the host, to turn an uplink's
    // checksum offload off so that captures and receivers see complete checksums.
    "ethtool",
    // The bench's comparisons: the same persona as nftables rules, and iperf3 traffic.
    "nftables",
    "iperf3",
    // A spoofed flood from the VM, at full rate.
    "hping3",
    // VPN personas: this kernel has no WireGuard module, so wireguard-go over a tun
    // device; wg configures either.
    "wireguard-go",
    "wireguard-tools",
    // Fleet mode: etcd members in the tests, and what the etcd-client crate's build
    // needs (protoc and the well-known protos).
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
];

/// The OpenAPI fuzzer the API tests run (`tests/src/lab.rs` knows this place too).
const SCHEMATHESIS: &str = "target/tools/schemathesis";
const SCHEMATHESIS_VERSION: &str = "4.32.5";

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn answers(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn setup() -> anyhow::Result<()> {
    if !is_root() {
        bail!("persona's set-up and tests need root (BPF programs, network namespaces)");
    }
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    if !answers("bpf-linker", "--version") {
        eprintln!("xtask: installing bpf-linker (about two minutes, once per machine)");
        // 0.10.4 links against the LLVM inside the nightly toolchain; newer releases want
        // system LLVM development libraries this machine does not have.
        run(Command::new("cargo").args(["+nightly", "install", "bpf-linker@0.10.4", "--locked"]))?;
    }
    if !answers("cargo-deb", "--version") {
        eprintln!("xtask: installing cargo-deb (about a minute, once per machine)");
        run(Command::new("cargo").args(["install", "cargo-deb@3.8.0", "--locked"]))?;
    }
    if !answers(&format!("{SCHEMATHESIS}/bin/st"), "--version") {
        eprintln!(
            "xtask: installing schemathesis {SCHEMATHESIS_VERSION} from PyPI into {SCHEMATHESIS}"
        );
        run(Command::new("python3").args(["-m", "venv", SCHEMATHESIS]))?;
        run(Command::new(format!("{SCHEMATHESIS}/bin/pip")).args([
            "install",
            "-q",
            &format!("schemathesis=={SCHEMATHESIS_VERSION}"),
        ]))?;
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Test { args } => {
            setup()?;
            guest::build()?;
            // The end-to-end tests run the `persona` binary itself, which `cargo test`
            // does not build for another package's tests.
            run(Command::new("cargo").args(["build", "--bins"]))?;
            // The package tests install what `cargo xtask package` makes.
            package(true)?;
            run(Command::new("cargo").args(["test"]).args(&args))
        }
        Task::Guest => {
            setup()?;
            let dir = guest::build()?;
            println!("{}", dir.canonicalize()?.display());
            Ok(())
        }
        Task::Demo { fleet } => {
            setup()?;
            if !fleet {
                guest::build()?;
            }
            run(Command::new("cargo").args([
                "build",
                "--release",
                "-p",
                "persona-userspace",
                "-p",
                "persona-tests",
                "--bins",
            ]))?;
            // Ctrl-C goes to the demo too, which cleans up before it exits: wait for it.
            ctrlc::set_handler(|| {})?;
            run(Command::new("target/release/persona-demo")
                .args(fleet.then_some("--fleet"))
                .env("PERSONA_BIN", "target/release/persona"))
        }
        Task::Package { dev } => {
            setup()?;
            if dev {
                run(Command::new("cargo").args(["build", "--bins"]))?;
            }
            package(dev)
        }
        Task::Bench { sections } => {
            setup()?;
            run(Command::new("cargo").args([
                "build",
                "--release",
                "-p",
                "persona-userspace",
                "-p",
                "persona-tests",
                "--bins",
            ]))?;
            run(Command::new("target/release/persona-bench")
                .args(&sections)
                .env("PERSONA_BIN", "target/release/persona"))
        }
    }
}
