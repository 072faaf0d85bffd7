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

use crate::{
    lab::{OUTSIDE, Site},
    netns::{Netns, sh},
};

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

impl GuestSpec {
    /// The examples' VMs: vm1 (198.18.0.2, with IPv6) on pvm1, vm2 (198.18.0.3) on pvm2.
    pub fn example(name: &str, tap: &str, n: u8) -> Self {
        Self {
            name: name.into(),
            tap: tap.into(),
            mac: format!("52:54:00:00:00:{n:02x}"),
            ip: format!("198.18.0.{n}/24"),
            gateway: "198.18.0.1".into(),
            ip6: (n == 2).then(|| ("2001:db8:1::2/64".into(), "fe80::1".into())),
            // The VM's own idea of DNS: the persona's redirect decides who answers.
            dns: "192.0.2.53".into(),
        }
    }

    /// Configured by the host's DHCP on its tap, not by the kernel command line.
    pub fn dhcp(mut self) -> Self {
        self.ip = "dhcp".into();
        self
    }
}

pub struct Guest {
    pub name: String,
    /// QEMU, when this process started it (not when libvirt did).
    child: Option<Child>,
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
                "ip -n {host_ns} tuntap add {t} mode tap vnet_hdr multi_queue && ip -n {host_ns} link set {t} up"
            ));
        }
        let dir = PathBuf::from(format!("/tmp/persona-guest-{host_ns}-{}", spec.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("guest dir");
        let append = Self::kernel_args(spec);
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
            // As libvirt runs a virtio-net guest (without vhost-net, which needs KVM): a
            // vnet header, so the guest's checksum and segmentation offloads are on,
            // and a multiqueue tap (`<driver queues='2'/>`).
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={t},script=no,downscript=no,vnet_hdr=on,queues=2"),
                "-device",
                &format!(
                    "virtio-net-pci,netdev=n0,mac={},mq=on,vectors=6,romfile=",
                    spec.mac
                ),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = qemu.spawn().expect("starting qemu-system-x86_64");
        // QEMU starts the guest once this connection is made: connect now, so that
        // guests started together boot together.
        let since = Instant::now();
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&ctl) {
                break s;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
                panic!("{}: qemu exited with {status}: {err}", spec.name);
            }
            assert!(
                since.elapsed() < BOOT_TIMEOUT,
                "{}: qemu never listened",
                spec.name
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Starting {
            name: spec.name.clone(),
            child: Some(child),
            stream: Some(stream),
            dir,
            since,
        }
    }

    /// The agent of a guest someone else started (libvirt) on the Unix socket `ctl`,
    /// with its console in `dir`.
    pub fn connect(name: &str, ctl: &std::path::Path, dir: PathBuf) -> Starting {
        let since = Instant::now();
        let stream = loop {
            if let Ok(s) = UnixStream::connect(ctl) {
                break s;
            }
            assert!(
                since.elapsed() < BOOT_TIMEOUT,
                "{name}: no agent on {}",
                ctl.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Starting {
            name: name.to_owned(),
            child: None,
            stream: Some(stream),
            dir,
            since,
        }
    }

    /// The kernel command line that configures a guest as `spec` says.
    pub fn kernel_args(spec: &GuestSpec) -> String {
        let mut append = format!(
            "console=ttyS0 panic=-1 quiet persona.name={} persona.ip={} persona.gw={} persona.dns={}",
            spec.name, spec.ip, spec.gateway, spec.dns
        );
        if let Some((ip6, gw6)) = &spec.ip6 {
            append.push_str(&format!(" persona.ip6={ip6} persona.gw6={gw6}"));
        }
        append
    }

    pub fn boot(host_ns: &str, spec: &GuestSpec) -> Guest {
        Self::start(host_ns, spec).wait()
    }

    /// Runs `cmd` through the agent. The agent checks each line's length (in bytes:
    /// commands are ASCII) and asks for it again when characters were lost on the
    /// serial line; a line that lost its end is not recovered (the read times out).
    fn command(&mut self, cmd: &str) -> (i32, String) {
        assert!(!cmd.contains('\n'), "one line per command");
        assert!(cmd.is_ascii(), "ASCII commands only: {cmd}");
        for _ in 0..RESENDS {
            self.writer
                .write_all(format!("{}:{cmd}\n", cmd.len()).as_bytes())
                .expect("writing to the guest agent");
            if let Some(answer) = self.answer(cmd) {
                return answer;
            }
            eprintln!("{}: `{cmd}` arrived garbled, sending it again", self.name);
        }
        panic!("{}: `{cmd}` arrived garbled {RESENDS} times", self.name);
    }

    /// The status and output of `cmd`; `None` when the agent asks for it again.
    fn answer(&mut self, cmd: &str) -> Option<(i32, String)> {
        let mut out = String::new();
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("{}: no answer to `{cmd}`: {e}", self.name));
            assert!(n > 0, "{}: the agent went away during `{cmd}`", self.name);
            if out.is_empty() && line.trim_end() == "@@resend@@" {
                return None;
            }
            if let Some(rc) = line
                .trim_end()
                .strip_prefix("@@rc=")
                .and_then(|r| r.strip_suffix("@@"))
            {
                out.pop();
                return Some((rc.parse().unwrap_or(-1), out));
            }
            out.push_str(&line);
        }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }
}

/// A guest QEMU was started for, not yet ready: several can boot at once.
pub struct Starting {
    name: String,
    child: Option<Child>,
    stream: Option<UnixStream>,
    dir: PathBuf,
    since: Instant,
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Times a command is sent before a garbled serial line fails the test.
const RESENDS: usize = 3;

impl Starting {
    pub fn wait(mut self) -> Guest {
        let child = self.child.take();
        let stream = self.stream.take().expect("connected once");
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

impl Vm for Guest {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(&mut self, cmd: &str) -> (i32, String) {
        self.command(cmd)
    }
}

/// A VM as the tests and the demo use it: a shell with busybox's tools.
pub trait Vm {
    fn name(&self) -> &str;

    /// Runs a shell command in the VM: its exit status and output.
    fn run(&mut self, cmd: &str) -> (i32, String);

    /// Output of a command that must succeed.
    fn ok(&mut self, cmd: &str) -> String {
        let (rc, out) = self.run(cmd);
        assert_eq!(rc, 0, "{}: `{cmd}` failed: {out}", self.name());
        out
    }

    /// The address the outside HTTP server logged for a download from this VM.
    fn identity(&mut self, site: &Site) -> String {
        let body = self.ok(&format!(
            "timeout 10 wget -q -O - http://{OUTSIDE}:8000/hello.txt"
        ));
        assert_eq!(body.trim(), "hello from outside");
        site.http_clients()
            .last()
            .cloned()
            .expect("a logged request")
    }
}

/// A network namespace standing in for a VM, behind a veth pair named like its tap,
/// with busybox's applets first in PATH so commands behave as in a guest.
pub struct NsVm {
    pub name: String,
    pub ns: Netns,
    applets: PathBuf,
}

impl NsVm {
    pub fn start(site: &Site, spec: &GuestSpec) -> Self {
        let ns = Netns::new(&format!("p-{}", spec.name));
        let (h, v) = (&site.host.name, &ns.name);
        sh(&format!(
            "ip link add {} netns {h} type veth peer name eth0 netns {v} && ip -n {h} link set {} up",
            spec.tap, spec.tap
        ));
        ns.exec(&format!(
            "ip link set eth0 address {} && ip addr add {} dev eth0 && ip link set eth0 up && ip route add default via {}",
            spec.mac, spec.ip, spec.gateway
        ));
        if let Some((ip6, gw6)) = &spec.ip6 {
            ns.exec(&format!(
                "ip -6 addr add {ip6} dev eth0 nodad && ip -6 route add default via {gw6} dev eth0"
            ));
        }
        let applets = PathBuf::from(format!("/tmp/persona-applets-{v}"));
        let www = applets.join("www");
        std::fs::create_dir_all(&www).expect("applet dir");
        std::fs::write(www.join("index.html"), format!("{}\n", spec.name)).expect("index");
        sh(&format!("busybox --install -s {}", applets.display()));
        for port in [80, 22, 23] {
            ns.exec(&format!("busybox httpd -p {port} -h {}", www.display()));
        }
        Self {
            name: spec.name.clone(),
            ns,
            applets,
        }
    }
}

impl Vm for NsVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(&mut self, cmd: &str) -> (i32, String) {
        let out = self
            .ns
            .try_exec(&format!("PATH={}:$PATH; {cmd}", self.applets.display()));
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }
}

impl Drop for NsVm {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.applets);
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
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
