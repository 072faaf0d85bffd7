//! The kernel settings persona changes on the host, each with the value it had before,
//! so that they can be put back when the last device goes. The record is kept in a
//! file: a restarted daemon finds its own values in place and must not take them for
//! the host's. The file lives under /run, as long as the settings do (until a reboot).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::datapath::{DatapathError, Result};

const ROOT: &str = "/proc/sys";

pub struct Sysctls {
    record: Option<PathBuf>,
    saved: BTreeMap<String, String>,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> DatapathError {
    move |source| DatapathError::Io { context, source }
}

/// Where the settings changed for the datapath pinned at `pin_dir` are recorded.
pub fn record_for(pin_dir: &Path) -> PathBuf {
    let name: String = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "-");
    Path::new("/run/persona").join(format!("{name}.host-settings.json"))
}

pub fn path(key: &str) -> PathBuf {
    Path::new(ROOT).join(key)
}

pub fn read(key: &str) -> Option<String> {
    std::fs::read_to_string(path(key))
        .ok()
        .map(|v| v.trim().to_owned())
}

pub fn exists(key: &str) -> bool {
    path(key).exists()
}

fn write(key: &str, value: &str) -> Result<()> {
    let p = path(key);
    std::fs::write(&p, value).map_err(io(format!("writing {}", p.display())))
}

impl Sysctls {
    /// `record` keeps the saved values across restarts; without one they live as long
    /// as this process.
    pub fn open(record: Option<PathBuf>) -> Result<Self> {
        let saved = match &record {
            Some(p) if p.exists() => {
                let text =
                    std::fs::read_to_string(p).map_err(io(format!("reading {}", p.display())))?;
                serde_json::from_str(&text).map_err(|e| {
                    DatapathError::Host(format!(
                        "{}: {e}; it records the host settings persona changed, remove it only \
                         after putting them back by hand",
                        p.display()
                    ))
                })?
            }
            _ => BTreeMap::new(),
        };
        Ok(Self { record, saved })
    }

    fn persist(&self) -> Result<()> {
        let Some(p) = &self.record else {
            return Ok(());
        };
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let text = serde_json::to_string_pretty(&self.saved).expect("a map of strings");
        std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, p).map_err(io(format!("renaming {}", tmp.display())))
    }

    /// Sets `key` (`net/ipv4/conf/eth0/forwarding`), saving what it was the first time.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let before = read(key);
        if before.as_deref() == Some(value) && !self.saved.contains_key(key) {
            return Ok(());
        }
        if let Some(before) = before
            && !self.saved.contains_key(key)
        {
            self.saved.insert(key.to_owned(), before);
            self.persist()?;
        }
        write(key, value)
    }

    /// Puts back every saved setting `which` selects. A setting of an interface that is
    /// gone went with it.
    pub fn restore(&mut self, which: impl Fn(&str) -> bool) -> Result<()> {
        let keys: Vec<String> = self.saved.keys().filter(|k| which(k)).cloned().collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mut first_error = None;
        for key in keys {
            let value = self.saved[&key].clone();
            match write(&key, &value) {
                Ok(()) => {}
                Err(_) if !exists(&key) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            }
            self.saved.remove(&key);
        }
        self.persist()?;
        first_error.map_or(Ok(()), Err)
    }

    pub fn is_empty(&self) -> bool {
        self.saved.is_empty()
    }
}

/// The settings of one interface.
pub fn of_interface(key: &str, name: &str) -> bool {
    key.split('/').any(|part| part == name) && (key.contains("/conf/") || key.contains("/neigh/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_settings_are_told_apart_from_others() {
        assert!(of_interface("net/ipv4/conf/tap1/proxy_arp", "tap1"));
        assert!(of_interface("net/ipv6/neigh/tap1/proxy_delay", "tap1"));
        assert!(!of_interface("net/ipv4/conf/tap10/proxy_arp", "tap1"));
        assert!(!of_interface("net/ipv6/conf/all/forwarding", "tap1"));
    }
}
