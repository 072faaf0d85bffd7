//! Network namespaces the tests create and remove, with commands run inside them.
use std::process::{Command, Output};

/// Runs a command, panicking with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawning sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -batch` in the namespace `ns`: thousands of commands in one process.
pub fn ip_batch(ns: &str, batch: &str) {
    let file = std::env::temp_dir().join(format!("persona-{ns}.batch"));
    std::fs::write(&file, batch).expect("batch");
    sh(&format!("ip -n {ns} -batch {}", file.display()));
    let _ = std::fs::remove_file(&file);
}

pub fn try_sh(cmd: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawning sh")
}

/// A namespace named `prefix-<pid>`, deleted on drop with everything in it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let _ = try_sh(&format!("ip netns del {name} 2>/dev/null"));
        sh(&format!("ip netns add {name}"));
        let ns = Self { name };
        ns.exec("ip link set lo up");
        ns
    }

    pub fn exec(&self, cmd: &str) -> String {
        sh(&format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            cmd.replace('\'', r"'\''")
        ))
    }

    pub fn try_exec(&self, cmd: &str) -> Output {
        try_sh(&format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            cmd.replace('\'', r"'\''")
        ))
    }

    pub fn prefix(&self) -> String {
        format!("ip netns exec {} ", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = try_sh(&format!("ip netns pids {} | xargs -r kill -9", self.name));
        let _ = try_sh(&format!("ip netns del {}", self.name));
    }
}
