//! persona as a system service: readiness and the watchdog through systemd's notify
//! socket, a settings file that flags override, audit retention, JSON logs, and a unit
//! file that systemd accepts.
use std::{
    io::{BufRead as _, BufReader},
    os::unix::net::UnixDatagram,
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use persona_tests::{
    daemon::Daemon,
    lab::{Site, persona_bin},
    netns::{sh, try_sh},
};
use serde_json::Value;

/// A datagram socket standing in for systemd's NOTIFY_SOCKET.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("persona-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self { socket, path }
    }

    fn next(&self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn readiness_watchdog_and_stopping_reach_systemd() {
    let site = Site::new();
    let notify = Notify::new();
    let path = notify.path.to_string_lossy().into_owned();
    let mut d = Daemon::start_with_env(
        &site,
        &[],
        &[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "400000")],
    );
    let first = notify.next().expect("a first notification");
    assert!(
        first.lines().any(|l| l == "READY=1") && first.contains("STATUS=serving; 0 devices"),
        "{first:?}"
    );
    // At half the interval, while the datapath answers.
    for _ in 0..3 {
        assert_eq!(notify.next().as_deref().map(str::trim), Some("WATCHDOG=1"));
    }
    d.stop();
    notify
        .socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let after: Vec<String> = std::iter::from_fn(|| notify.next()).collect();
    assert!(
        after.iter().any(|m| m.contains("STOPPING=1")),
        "STOPPING=1 once SIGTERM came: {after:?}"
    );
}

/// A settings file in a fresh directory.
fn settings(site: &Site, yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("persona-settings-{}", site.host.name));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("persona.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn events(d: &Daemon) -> Vec<Value> {
    d.cli_ok("events -o json")
        .lines()
        .map(|l| serde_json::from_str(l).expect("an event"))
        .collect()
}

#[test]
fn a_settings_file_configures_the_daemon_and_flags_override_it() {
    let site = Site::new();
    let file = settings(&site, "audit-max-events: 3\nmin-dwell: 5\n");
    let config = format!("--config={}", file.display());
    let mut d = Daemon::start_with(&site, &[]);
    for i in 0..8 {
        d.cli_ok(&format!("token create --role viewer --description t{i}"));
    }
    assert!(events(&d).len() >= 8);
    // A flag wins over the file: five kept.
    d.restart_with(&[&config, "--audit-max-events", "5"]);
    let kept = events(&d);
    assert_eq!(kept.len(), 5, "{kept:?}");
    // The file alone: three, the newest, numbered as before.
    d.restart_with(&[&config]);
    let kept = events(&d);
    assert_eq!(kept.len(), 3, "{kept:?}");
    let newest = kept.last().unwrap()["seq"].as_u64().unwrap();
    assert!(newest >= 8, "{kept:?}");

    // A key that is no flag stops the daemon before it starts, naming the key.
    let bad = settings(&site, "audit-max-event: 3\n");
    let out = site
        .persona(&format!(
            "--config {} --data-dir {} daemon",
            bad.display(),
            d.data_dir.display()
        ))
        .output()
        .expect("persona");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("persona.yaml: audit-max-event: no such setting"),
        "{err}"
    );
}

#[test]
fn the_daemon_logs_json_lines_at_info_by_default() {
    let site = Site::new();
    let data = std::env::temp_dir().join(format!("persona-json-logs-{}", site.host.name));
    let _ = std::fs::remove_dir_all(&data);
    let mut child = site
        .persona(&format!(
            "--data-dir {dir} --log-format json daemon --socket {dir}/s",
            dir = data.display()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("persona daemon");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(out.next().and_then(Result::ok).as_deref(), Some("ready"));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let err = BufReader::new(child.stderr.take().unwrap());
    let lines: Vec<Value> = err
        .lines()
        .map_while(Result::ok)
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let _ = child.wait();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["fields"]["message"] == "serving on the Unix socket"),
        "{lines:?}"
    );
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn systemd_accepts_the_unit_file() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/persona.service"
    ))
    .expect("the unit file");
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    // Verified as installed: with the binary where the unit says it is.
    let dir = std::env::temp_dir().join(format!("persona-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("persona.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/persona", &persona_bin().display().to_string()),
    )
    .unwrap();
    let out = try_sh(&format!("systemd-analyze verify {}", path.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let complaints: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("persona.service"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {text}"
    );
    let _ = sh(&format!("rm -rf {}", dir.display()));
}
