//! A real libvirt daemon of the test's own: in a site's host network namespace, and in
//! a mount namespace where /etc/libvirt and /run/libvirt are the test's directories, so
//! that nothing of the machine's libvirt configuration is read or changed.
use std::{
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use crate::{
    guest::{Guest, GuestSpec, Starting, image_dir},
    lab::Site,
    netns::{sh, try_sh},
};

pub struct Libvirt {
    pub dir: PathBuf,
}

pub fn available() -> bool {
    Path::new("/usr/sbin/libvirtd").exists() && Path::new("/usr/bin/virsh").exists()
}

/// The interface of a domain: on a tap made beforehand (`managed='no'`), or on one
/// libvirt makes.
pub enum Nic<'a> {
    Premade(&'a str),
    Managed,
}

impl Libvirt {
    /// Starts libvirtd with `hook` (a shell script's text) as its QEMU hook.
    pub fn start(site: &Site, hook: &str) -> Self {
        assert!(
            available(),
            "libvirt is not installed (cargo xtask setup installs it)"
        );
        let dir = PathBuf::from(format!("/tmp/persona-libvirt-{}", site.host.name));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["etc", "run", "domains"] {
            std::fs::create_dir_all(dir.join(sub)).expect("libvirt's directories");
        }
        let etc = dir.join("etc");
        sh(&format!("cp -a /etc/libvirt/. {}/", etc.display()));
        let _ = std::fs::remove_dir_all(etc.join("hooks"));
        std::fs::create_dir_all(etc.join("hooks")).unwrap();
        let qemu_conf = std::fs::read_to_string(etc.join("qemu.conf")).unwrap_or_default();
        // QEMU as root with no sandbox of libvirt's: the test's taps and images are
        // root's, and this machine has no cgroup controllers to spare.
        std::fs::write(
            etc.join("qemu.conf"),
            format!(
                "{qemu_conf}\nuser = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\ncgroup_controllers = [ ]\n"
            ),
        )
        .unwrap();
        let hook_path = etc.join("hooks/qemu");
        std::fs::write(&hook_path, hook).unwrap();
        sh(&format!("chmod 755 {}", hook_path.display()));
        sh("mkdir -p /run/libvirt");
        sh(&format!(
            "ip netns exec {ns} unshare -m --propagation private sh -c 'mount --bind {d}/etc /etc/libvirt && mount --bind {d}/run /run/libvirt && virtlogd -d -p {d}/virtlogd.pid && libvirtd -d -p {d}/libvirtd.pid'",
            ns = site.host.name,
            d = dir.display()
        ));
        let libvirt = Self { dir };
        let since = Instant::now();
        while !libvirt.virsh("version").status.success() {
            // The first start probes QEMU's capabilities: about ten seconds.
            assert!(
                since.elapsed() < Duration::from_secs(90),
                "libvirtd did not answer"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        libvirt
    }

    fn virsh_command(&self, args: &str) -> String {
        format!(
            "virsh -q -c 'qemu:///system?socket={}/run/libvirt-sock' {args}",
            self.dir.display()
        )
    }

    pub fn virsh(&self, args: &str) -> Output {
        try_sh(&self.virsh_command(args))
    }

    pub fn virsh_ok(&self, args: &str) -> String {
        sh(&self.virsh_command(args))
    }

    /// Defines and starts a domain for the guest `spec` (software emulation, the test
    /// guest's kernel and initramfs), and connects to its agent.
    pub fn start_guest(&self, spec: &GuestSpec, nic: Nic) -> Starting {
        let dir = self.dir.join("domains").join(&spec.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let images = image_dir().canonicalize().expect("the guest images");
        let target = match nic {
            Nic::Premade(tap) => {
                format!("<target dev='{tap}' managed='no'/><driver queues='2'/>")
            }
            Nic::Managed => String::new(),
        };
        let ctl = dir.join("ctl.sock");
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type><kernel>{k}</kernel><initrd>{i}</initrd><cmdline>{cmdline}</cmdline></os>\
             <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\
             <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
             <interface type='ethernet'><mac address='{mac}'/>{target}<model type='virtio'/></interface>\
             <serial type='file'><source path='{console}'/><target port='0'/></serial>\
             <serial type='unix'><source mode='bind' path='{ctl}'/><target port='1'/></serial>\
             <memballoon model='none'/></devices></domain>",
            name = spec.name,
            k = images.join("vmlinuz").display(),
            i = images.join("initramfs.cpio").display(),
            cmdline = Guest::kernel_args(spec),
            mac = spec.mac,
            console = dir.join("console.log").display(),
            ctl = ctl.display(),
        );
        let file = dir.join("domain.xml");
        std::fs::write(&file, xml).unwrap();
        // Defined anew each start: a stopped domain of that name goes first.
        let _ = self.virsh(&format!("undefine {}", spec.name));
        self.virsh_ok(&format!("define {}", file.display()));
        self.virsh_ok(&format!("start {}", spec.name));
        Guest::connect(&spec.name, &ctl, dir)
    }

    /// `virsh destroy`: QEMU killed, as a crashed or forced-off VM.
    pub fn destroy(&self, name: &str) {
        self.virsh_ok(&format!("destroy {name}"));
    }

    /// The host side of a domain's interface, as libvirt reports it.
    pub fn tap_of(&self, name: &str) -> String {
        self.virsh_ok(&format!("domiflist {name}"))
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let list = self.virsh("list --name");
        for name in String::from_utf8_lossy(&list.stdout).split_whitespace() {
            let _ = self.virsh(&format!("destroy {name}"));
        }
        let all = self.virsh("list --all --name");
        for name in String::from_utf8_lossy(&all.stdout).split_whitespace() {
            let _ = self.virsh(&format!("undefine {name}"));
        }
        for pid in ["libvirtd.pid", "virtlogd.pid"] {
            if let Ok(p) = std::fs::read_to_string(self.dir.join(pid)) {
                let _ = try_sh(&format!("kill {}", p.trim()));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
