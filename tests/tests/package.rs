//! The Debian package `cargo xtask package` builds: it installs with dpkg, holds the
//! binary, the systemd unit (which systemd accepts as installed), the default settings
//! as a conffile and the libvirt hook, and purges cleanly.
use persona_tests::netns::{sh, try_sh};

const EXPECTED: [&str; 6] = [
    "/usr/bin/persona",
    "/lib/systemd/system/persona.service",
    "/etc/persona/persona.yaml",
    "/etc/libvirt/hooks/qemu.d/persona",
    "/usr/share/doc/persona/README.md",
    "/usr/share/persona/persona-guest-agent",
];

#[test]
fn the_debian_package_installs_what_a_host_needs_and_purges_cleanly() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debian/dev");
    let deb = std::fs::read_dir(dir)
        .unwrap_or_else(|e| {
            panic!("{dir}: {e}; `cargo xtask package --dev` makes it (cargo xtask test does)")
        })
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");
    let info = sh(&format!(
        "dpkg-deb --field {} Package Version Depends",
        deb.display()
    ));
    assert!(info.contains("Package: persona"), "{info}");
    assert!(info.contains("iproute2"), "{info}");

    sh(&format!("dpkg -i {}", deb.display()));
    let files = sh("dpkg -L persona");
    let missing: Vec<&&str> = EXPECTED.iter().filter(|f| !files.contains(**f)).collect();
    let conffiles = sh("dpkg-query -W -f='${Conffiles}' persona");
    let version = try_sh("/usr/bin/persona --version");
    let verify = try_sh("systemd-analyze verify /lib/systemd/system/persona.service");
    let hook = std::fs::read_to_string("/etc/libvirt/hooks/qemu.d/persona").unwrap_or_default();
    let hook_mode = std::fs::metadata("/etc/libvirt/hooks/qemu.d/persona")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .unwrap_or(0);
    sh("dpkg --purge persona");

    assert!(missing.is_empty(), "not installed: {missing:?}\n{files}");
    assert!(
        conffiles.contains("/etc/persona/persona.yaml"),
        "{conffiles}"
    );
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("persona "),
        "{version:?}"
    );
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        hook.contains("exec /usr/bin/persona hook libvirt \"$@\""),
        "{hook}"
    );
    assert_eq!(hook_mode & 0o111, 0o111, "the hook is executable");
    for f in EXPECTED {
        assert!(
            !std::path::Path::new(f).exists(),
            "{f} left after the purge"
        );
    }
}
