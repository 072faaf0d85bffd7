//! Installs a persona's certificate chain and key for a device: each generation in a
//! directory of its own, made current by renaming a symlink over `current` (atomic), then
//! handed on by an optional hook command.
use std::{
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    keys::KeyDir,
    model::tls::{TlsSpec, check_key},
};

pub struct TlsApplier {
    dir: PathBuf,
    hook: Option<String>,
    keys: KeyDir,
    /// Devices this process left with no TLS files at all: removing them again is a
    /// no-op, and shifts between personas without TLS make no syscall here.
    bare: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// What `current` pointed at before an install.
#[derive(Debug, Clone)]
struct Previous(Option<PathBuf>);

fn write_private(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl TlsApplier {
    pub fn new(dir: PathBuf, hook: Option<String>, keys: KeyDir) -> Self {
        Self {
            dir,
            hook,
            keys,
            bare: Default::default(),
        }
    }

    /// Where the personas' TLS keys are read from.
    pub fn keys(&self) -> &KeyDir {
        &self.keys
    }

    /// The directory of the device's TLS files in force: `chain.pem` and `key.pem`, a
    /// link to `g<GENERATION>`.
    pub fn current(&self, device: &str) -> PathBuf {
        self.dir.join(device).join("current")
    }

    fn switch(&self, device: &str, target: Option<&Path>) -> std::io::Result<()> {
        let current = self.current(device);
        match target {
            Some(t) => {
                let tmp = self.dir.join(device).join(".current.tmp");
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(t, &tmp)?;
                std::fs::rename(&tmp, &current)
            }
            None => match std::fs::remove_file(&current) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// Whether installing `tls` for `device` would change nothing: no TLS files
    /// before or after, and no hook to run.
    pub fn unchanged(&self, device: &str, tls: Option<&TlsSpec>) -> bool {
        tls.is_none()
            && self.hook.is_none()
            && self
                .bare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(device)
    }

    /// Installs `tls` (or removes the device's TLS identity when `None`) and runs the hook.
    pub fn install(
        &self,
        device: &str,
        persona: &str,
        generation: u64,
        tls: Option<&TlsSpec>,
    ) -> Result<(), String> {
        let mut bare = self.bare.lock().unwrap_or_else(|e| e.into_inner());
        if tls.is_none() && self.hook.is_none() && bare.contains(device) {
            return Ok(());
        }
        bare.remove(device);
        drop(bare);
        let device_dir = self.dir.join(device);
        std::fs::create_dir_all(&device_dir)
            .map_err(|e| format!("{}: {e}", device_dir.display()))?;
        std::fs::set_permissions(&device_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        let previous = Previous(std::fs::read_link(self.current(device)).ok());
        let target = match tls {
            Some(tls) => {
                let key = check_key(tls, &self.keys).map_err(|e| e.to_string())?;
                let gen_dir = device_dir.join(format!("g{generation}"));
                std::fs::create_dir_all(&gen_dir)
                    .map_err(|e| format!("{}: {e}", gen_dir.display()))?;
                write_private(
                    &gen_dir.join("chain.pem"),
                    tls.certificate.as_bytes(),
                    0o644,
                )
                .map_err(|e| e.to_string())?;
                write_private(&gen_dir.join("key.pem"), &key, 0o600).map_err(|e| e.to_string())?;
                Some(gen_dir)
            }
            None => None,
        };
        self.switch(device, target.as_deref())
            .map_err(|e| format!("switching {}: {e}", self.current(device).display()))?;
        if let Some(hook) = &self.hook {
            let out = Command::new("sh")
                .args(["-c", hook])
                .env("PERSONA_DEVICE", device)
                .env("PERSONA_PERSONA", persona)
                .env("PERSONA_GENERATION", generation.to_string())
                .env(
                    "PERSONA_TLS_DIR",
                    target
                        .as_deref()
                        .map(|_| self.current(device))
                        .unwrap_or_default(),
                )
                .output()
                .map_err(|e| format!("running the TLS hook: {e}"))?;
            if !out.status.success() {
                // The hook refused the new files: the previous ones are current again. The
                // hook is not run for them: whoever it serves never took the new ones.
                let _ = self.restore(device, &previous);
                let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                return Err(format!(
                    "TLS hook exited with {}: {why}",
                    out.status.code().unwrap_or(-1)
                ));
            }
        }
        self.prune(device, target.as_deref(), previous.0.as_deref());
        if target.is_none() && previous.0.is_none() {
            self.bare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(device.to_owned());
        }
        Ok(())
    }

    fn restore(&self, device: &str, previous: &Previous) -> std::io::Result<()> {
        self.switch(device, previous.0.as_deref())
    }

    /// Keeps only the current and the previous generation's files.
    fn prune(&self, device: &str, keep: Option<&Path>, previous: Option<&Path>) {
        let Ok(entries) = std::fs::read_dir(self.dir.join(device)) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let is_gen = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('g'));
            if is_gen && Some(p.as_path()) != keep && Some(p.as_path()) != previous {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
}
