//! A small guest for QEMU, made only from Debian packages on this machine: the kernel
//! of `linux-image-amd64`, its virtio network modules, and `busybox-static` as the whole
//! userland, packed into an initramfs whose `/init` configures the address given on the
//! kernel command line and then answers commands on the second serial port.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cpio::Archive, run};

/// The network driver and what it needs; loaded in this order.
const MODULES: &[&str] = &["virtio_pci", "virtio_net"];

/// Bumped when the initramfs changes shape, so that built guests are rebuilt (a change
/// to the init or agent scripts rebuilds them by itself).
const GUEST_VERSION: &str = "2 (ethtool)";

const INIT: &str = include_str!("guest/init.sh");
const AGENT: &str = include_str!("guest/agent.sh");

pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest")
}

/// Builds `target/guest/{vmlinuz,initramfs.cpio}` unless they are there for the kernel
/// package apt offers now.
pub fn build() -> anyhow::Result<PathBuf> {
    let dir = dir();
    let package = kernel_package()?;
    let stamp = dir.join("built-from");
    let scripts = {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        (INIT, AGENT).hash(&mut h);
        h.finish()
    };
    let built_from = format!("{package} {GUEST_VERSION} scripts {scripts:016x}");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(built_from.as_str())
        && dir.join("vmlinuz").exists()
        && dir.join("initramfs.cpio").exists()
    {
        return Ok(dir);
    }
    eprintln!("xtask: building the guest from {package} and busybox-static");
    let work = dir.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    run(Command::new("apt-get")
        .args(["download", "-qq", "-o", "APT::Sandbox::User=root", &package])
        .current_dir(&work))?;
    let deb = fs::read_dir(&work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let root = work.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let vmlinuz = fs::read_dir(root.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the kernel package has no /boot/vmlinuz-*")?;
    fs::copy(&vmlinuz, dir.join("vmlinuz"))?;
    let modules = resolve_modules(&root.join("lib/modules"))?;
    initramfs(&modules)?.write_to(&dir.join("initramfs.cpio"))?;
    fs::remove_dir_all(&work)?;
    fs::write(&stamp, &built_from)?;
    Ok(dir)
}

/// `linux-image-amd64` is a metapackage: the real image is its dependency.
fn kernel_package() -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .context("running apt-cache")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .context("apt knows no linux-image-amd64 (apt-get update?)")
}

/// The `.ko` files of MODULES and everything they depend on, dependencies first.
fn resolve_modules(modules_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut by_name = BTreeMap::new();
    index(modules_dir, &mut by_name)?;
    let mut order = Vec::new();
    for m in MODULES {
        visit(m, &by_name, &mut order)?;
    }
    Ok(order)
}

fn index(dir: &Path, by_name: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            index(&p, by_name)?;
        } else if let Some(name) = p.file_name().and_then(|n| n.to_str())
            && let Some(stem) = name.strip_suffix(".ko")
        {
            by_name.insert(stem.replace('-', "_"), p);
        }
    }
    Ok(())
}

fn visit(
    name: &str,
    by_name: &BTreeMap<String, PathBuf>,
    order: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let path = by_name
        .get(name)
        .with_context(|| format!("the kernel package has no module {name}"))?;
    if order.contains(path) {
        return Ok(());
    }
    for dep in depends(&fs::read(path)?) {
        visit(&dep, by_name, order)?;
    }
    order.push(path.clone());
    Ok(())
}

/// The `depends=` entry of a module's `.modinfo` section.
fn depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect()
}

fn initramfs(modules: &[PathBuf]) -> anyhow::Result<Archive> {
    let busybox = fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?;
    if !busybox.starts_with(b"\x7fELF") {
        bail!("/bin/busybox is not an ELF binary");
    }
    let mut a = Archive::default();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "etc",
        "lib",
        "lib/modules",
        "www",
        "root",
    ] {
        a.dir(d);
    }
    a.char_device("dev/console", 5, 1);
    a.file("bin/busybox", 0o755, busybox);
    a.file("init", 0o755, INIT.as_bytes().to_vec());
    a.file("bin/persona-agent", 0o755, AGENT.as_bytes().to_vec());
    let mut order = String::new();
    for m in modules {
        let name = m.file_name().unwrap().to_string_lossy().into_owned();
        a.file(&format!("lib/modules/{name}"), 0o644, fs::read(m)?);
        order.push_str(&name);
        order.push('\n');
    }
    a.file("lib/modules/order", 0o644, order.into_bytes());
    add_program(&mut a, Path::new("/usr/sbin/ethtool"))?;
    a.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
    );
    Ok(a)
}

/// A dynamically linked host program with the libraries `ldd` names, at their host
/// paths: the guest runs the same Debian release's userland.
fn add_program(a: &mut Archive, program: &Path) -> anyhow::Result<()> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .with_context(|| format!("running ldd {}", program.display()))?;
    if !out.status.success() {
        bail!("ldd {} failed (is it installed?)", program.display());
    }
    let mut files = vec![program.to_path_buf()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    for f in files {
        let rel = f.strip_prefix("/")?;
        let mut dir = PathBuf::new();
        for part in rel.parent().into_iter().flat_map(Path::components) {
            dir.push(part);
            a.dir(&dir.to_string_lossy());
        }
        let data = fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        a.file(&rel.to_string_lossy(), 0o755, data);
    }
    Ok(())
}
