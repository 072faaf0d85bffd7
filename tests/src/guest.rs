//! Real virtual machines: QEMU guests (Debian kernel, busybox initramfs, built by
//! `cargo xtask guest`) on tap devices in a site's host namespace, driven through a
//! command agent on their second serial port.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::sh;

/// What the guest is told on its kernel command line.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub name: String,
    /// The tap device in the host namespace.
    pub tap: String,
    pub mac: String,
    /// Inner address with prefix, e.g. 198.18.0.2/24.
    pub ip: String,
    pub gateway: String,
    pub ip6: Option<(String, String)>,
    pub dns: String,
}

pub struct Guest {
    pub name: String,
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    dir: PathBuf,
    pub booted_in: Duration,
}

/// Where `cargo xtask guest` put the kernel and initramfs.
pub fn image_dir() -> PathBuf {
    std::env::var_os("PERSONA_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/guest")))
}

/// QEMU's accelerator: KVM when the host offers hardware virtualisation to any guest
/// kernel. A host whose /dev/kvm is PVM (kvm_pvm, paravirtual nesting) boots only
/// PVM-aware kernels, and Debian's is not one: software emulation there.
pub fn accelerator() -> (&'static str, &'static str) {
    let hardware = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| std::path::Path::new("/sys/module").join(m).exists());
    let openable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    match (hardware, openable) {
        (true, true) => ("kvm", "KVM"),
        (false, true) => (
            "tcg",
            "software emulation (this /dev/kvm is PVM, which Debian's kernel cannot run on)",
        ),
        _ => ("tcg", "software emulation (no usable /dev/kvm)"),
    }
}

/// Both images are there.
pub fn available() -> bool {
    let d = image_dir();
    d.join("vmlinuz").exists() && d.join("initramfs.cpio").exists()
}

impl Guest {
    /// Starts QEMU for `spec` in the namespace `host_ns` (creating the tap when missing);
    /// returns once the guest has configured its network and its agent answers.
    pub fn start(host_ns: &str, spec: &GuestSpec) -> Starting {
        let images = image_dir();
        assert!(
            available(),
            "no guest images in {}: run `cargo xtask guest` (cargo xtask test does)",
            images.display()
        );
        let t = &spec.tap;
        if !crate::netns::try_sh(&format!("ip -n {host_ns} link show {t}"))
            .status
            .success()
        {
            sh(&format!(
                "ip -n {host_ns} tuntap add {t} mode tap && ip -n {host_ns} link set {t} up"
            ));
        }
        let dir = PathBuf::from(format!("/tmp/persona-guest-{host_ns}-{}", spec.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("guest dir");
        let mut append = format!(
            "console=ttyS0 panic=-1 quiet persona.name={} persona.ip={} persona.gw={} persona.dns={}",
            spec.name, spec.ip, spec.gateway, spec.dns
        );
        if let Some((ip6, gw6)) = &spec.ip6 {
            append.push_str(&format!(" persona.ip6={ip6} persona.gw6={gw6}"));
        }
        let ctl = dir.join("ctl.sock");
        let (accel, _) = accelerator();
        let mut qemu = Command::new("ip");
        qemu.args(["netns", "exec", host_ns, "qemu-system-x86_64"])
            .args(["-accel", accel, "-m", "256", "-smp", "1"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(images.join("vmlinuz"))
            .arg("-initrd")
            .arg(images.join("initramfs.cpio"))
            .args(["-append", &append])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("console.log").display()))
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=on", ctl.display()))
            // No vnet header: the guest is offered no checksum or segmentation offload,
            // so every frame on the tap is complete, as the XDP program expects.
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={t},script=no,downscript=no,vnet_hdr=off"),
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={},romfile=", spec.mac),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = qemu.spawn().expect("starting qemu-system-x86_64");
        Starting {
            name: spec.name.clone(),
            child: Some(child),
            ctl,
            dir,
            since: Instant::now(),
        }
    }

    pub fn boot(host_ns: &str, spec: &GuestSpec) -> Guest {
        Self::start(host_ns, spec).wait()
    }

    /// Runs a shell command in the guest: its exit status and output.
    pub fn run(&mut self, cmd: &str) -> (i32, String) {
        assert!(!cmd.contains('\n'), "one line per command");
        self.writer
            .write_all(format!("{cmd}\n").as_bytes())
            .expect("writing to the guest agent");
        let mut out = String::new();
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("{}: no answer to `{cmd}`: {e}", self.name));
            assert!(n > 0, "{}: the agent went away during `{cmd}`", self.name);
            if let Some(rc) = line
                .trim_end()
                .strip_prefix("@@rc=")
                .and_then(|r| r.strip_suffix("@@"))
            {
                out.pop();
                return (rc.parse().unwrap_or(-1), out);
            }
            out.push_str(&line);
        }
    }

    /// Output of a command that must succeed.
    pub fn ok(&mut self, cmd: &str) -> String {
        let (rc, out) = self.run(cmd);
        assert_eq!(rc, 0, "{}: `{cmd}` failed: {out}", self.name);
        out
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }
}

/// A guest QEMU was started for, not yet ready: several can boot at once.
pub struct Starting {
    name: String,
    child: Option<Child>,
    ctl: PathBuf,
    dir: PathBuf,
    since: Instant,
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

impl Starting {
    pub fn wait(mut self) -> Guest {
        let mut child = self.child.take().expect("started once");
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&self.ctl) {
                break s;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                panic!("{}: qemu exited with {status}: {err}", self.name);
            }
            assert!(
                self.since.elapsed() < BOOT_TIMEOUT,
                "{}: qemu never listened",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        stream
            .set_read_timeout(Some(BOOT_TIMEOUT))
            .expect("read timeout");
        let mut guest = Guest {
            name: self.name.clone(),
            child,
            writer: stream.try_clone().expect("clone"),
            reader: BufReader::new(stream),
            dir: self.dir.clone(),
            booted_in: Duration::ZERO,
        };
        let mut line = String::new();
        loop {
            line.clear();
            let n = guest.reader.read_line(&mut line).unwrap_or(0);
            if n == 0 {
                panic!(
                    "{}: the guest did not come up; console:\n{}",
                    guest.name,
                    guest.console()
                );
            }
            if line.trim() == "@@ready@@" {
                break;
            }
        }
        guest.booted_in = self.since.elapsed();
        guest
            .reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(120)))
            .expect("read timeout");
        guest
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
