//! WireGuard tunnels of VPN personas. The kernel's module makes the interface when the
//! kernel has one; otherwise wireguard-go does, over a tun device. Both are configured
//! the standard way, with `wg set`. The private key is read from the key directory and
//! handed to wg on its standard input; it never reaches the logs or an error.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;

use crate::{
    datapath::{DatapathError, Result},
    keys::KeyDir,
    model::vpn::WireguardSpec,
};

fn fail(what: &str, detail: impl std::fmt::Display) -> DatapathError {
    DatapathError::Host(format!("{what}: {detail}"))
}

fn run(what: &str, cmd: &mut Command) -> Result<()> {
    run_with_input(what, cmd, &[])
}

fn run_with_input(what: &str, cmd: &mut Command, input: &[u8]) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(what, e))?;
    // A failed write (wg gone early) is told by wg's exit and stderr, read either way.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = std::io::Write::write_all(&mut stdin, input);
    }
    let out = child.wait_with_output().map_err(|e| fail(what, e))?;
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
pub fn up(name: &str, spec: &WireguardSpec, keys: &KeyDir) -> Result<u32> {
    let key = spec
        .key(keys)
        .map_err(|e| fail(&format!("the key of {name}"), e))?;
    if ifindex(name).is_none() {
        create(name)?;
    }
    let allowed: Vec<String> = spec.allowed_ips.iter().map(|n| n.to_string()).collect();
    // The key goes to wg on its standard input: wg never opens a path a persona named.
    let mut wg = Command::new("wg");
    wg.args(["set", name, "private-key", "/dev/stdin"])
        .args(["peer", &spec.peer_public_key, "endpoint", &spec.endpoint])
        .args(["allowed-ips", &allowed.join(",")]);
    if let Some(k) = spec.persistent_keepalive {
        wg.args(["persistent-keepalive", &k.to_string()]);
    }
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    run_with_input(&format!("configuring {name}"), &mut wg, key.as_bytes())?;
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
