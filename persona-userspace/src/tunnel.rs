//! WireGuard tunnels of VPN personas. The kernel's module makes the interface when the
//! kernel has one; otherwise wireguard-go does, over a tun device. Both are configured
//! the standard way, with `wg set`, which reads the private key from its file itself:
//! the key never passes through this process, its logs or its errors.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    datapath::{DatapathError, Result},
    model::vpn::WireguardSpec,
};

fn fail(what: &str, detail: impl std::fmt::Display) -> DatapathError {
    DatapathError::Host(format!("{what}: {detail}"))
}

fn run(what: &str, cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(what, e))?;
    if !out.status.success() {
        return Err(fail(what, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

fn create(name: &str) -> Result<()> {
    let kernel = Command::new("ip")
        .args(["link", "add", name, "type", "wireguard"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !kernel {
        // Without the module: wireguard-go makes the interface and serves it in the
        // background until the interface is deleted.
        run(
            "starting wireguard-go",
            Command::new("wireguard-go")
                .arg(name)
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1"),
        )?;
    }
    let start = Instant::now();
    while ifindex(name).is_none() {
        if start.elapsed() > Duration::from_secs(5) {
            return Err(fail(
                "creating the tunnel",
                format!("{name} never appeared"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The tunnel `name` for `spec`, up and configured (made when missing); its ifindex.
pub fn up(name: &str, spec: &WireguardSpec) -> Result<u32> {
    if ifindex(name).is_none() {
        create(name)?;
    }
    let allowed: Vec<String> = spec.allowed_ips.iter().map(|n| n.to_string()).collect();
    let mut wg = Command::new("wg");
    wg.args(["set", name, "private-key"])
        .arg(&spec.private_key_file)
        .args(["peer", &spec.peer_public_key, "endpoint", &spec.endpoint])
        .args(["allowed-ips", &allowed.join(",")]);
    if let Some(k) = spec.persistent_keepalive {
        wg.args(["persistent-keepalive", &k.to_string()]);
    }
    run(&format!("configuring {name}"), &mut wg)?;
    run(
        &format!("bringing {name} up"),
        Command::new("ip").args(["link", "set", name, "up"]),
    )?;
    // Decrypted packets come from the peer's side, which the main table routes elsewhere.
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "0")
        .map_err(|e| fail(&format!("rp_filter of {name}"), e))?;
    ifindex(name).ok_or_else(|| fail("the tunnel", format!("{name} went away")))
}

/// Deletes the tunnel when it exists; wireguard-go ends with its interface.
pub fn down(name: &str) -> Result<()> {
    if ifindex(name).is_some() {
        run(
            &format!("deleting {name}"),
            Command::new("ip").args(["link", "del", name]),
        )?;
    }
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{name}.sock"));
    Ok(())
}
