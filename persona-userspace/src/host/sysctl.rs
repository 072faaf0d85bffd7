//! The kernel settings persona changes on the host, each with the value it had before,
//! so that they can be put back when the last device goes. The record is kept in a
//! file: a restarted daemon finds its own values in place and must not take them for
//! the host's. The file lives under /run, as long as the settings do (until a reboot).
//! Each change is a line appended to it (`[key, value]` saved, `[key]` put back): with
//! thousands of devices, each attach costs a line, not the whole record written again.
use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::datapath::{DatapathError, Result};

const ROOT: &str = "/proc/sys";

pub struct Sysctls {
    record: Option<Record>,
    saved: BTreeMap<String, String>,
}

/// The file the saved values are kept in, and how many lines it has.
struct Record {
    path: PathBuf,
    lines: usize,
}

/// Past this many lines, and twice as many as there are saved values, the record is
/// written anew.
const COMPACT_AFTER: usize = 256;

/// The saved values a record holds: in lines, or as one JSON object (how earlier
/// versions wrote it).
fn parse_record(text: &str) -> std::result::Result<(BTreeMap<String, String>, usize), String> {
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text)
            .map(|saved| (saved, usize::MAX))
            .map_err(|e| e.to_string());
    }
    let mut saved = BTreeMap::new();
    let mut lines = 0;
    // Every change ends with a newline: a last line without one is a write that failed
    // (and its change was not made).
    let whole = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    if whole.len() < text.len() {
        lines = usize::MAX;
    }
    for (n, line) in whole.lines().enumerate() {
        let change: Vec<String> =
            serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        match <[String; 2]>::try_from(change) {
            Ok([key, value]) => saved.insert(key, value),
            Err(change) => match <[String; 1]>::try_from(change) {
                Ok([key]) => saved.remove(&key),
                Err(_) => return Err(format!("line {}: neither [key, value] nor [key]", n + 1)),
            },
        };
        lines = lines.saturating_add(1);
    }
    Ok((saved, lines))
}

impl Record {
    /// Appends `changes` (already made to `saved`), or writes the record anew when it
    /// has grown long.
    fn write(
        &mut self,
        saved: &BTreeMap<String, String>,
        changes: &[(&str, Option<&str>)],
    ) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let line = |key: &str, value: Option<&str>| {
            let change: Vec<&str> = std::iter::once(key).chain(value).collect();
            serde_json::to_string(&change).expect("strings") + "\n"
        };
        let lines = self.lines.saturating_add(changes.len());
        if lines <= COMPACT_AFTER.max(2 * saved.len()) {
            let text: String = changes.iter().map(|&(k, v)| line(k, v)).collect();
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(io(format!("opening {}", self.path.display())))?;
            if let Err(e) = f.write_all(text.as_bytes()) {
                // Maybe torn: the next change writes the record anew.
                self.lines = usize::MAX;
                return Err(io(format!("writing {}", self.path.display()))(e));
            }
            self.lines = lines;
            return Ok(());
        }
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        let text: String = saved.iter().map(|(k, v)| line(k, Some(v))).collect();
        std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &self.path).map_err(io(format!("renaming {}", tmp.display())))?;
        self.lines = saved.len();
        Ok(())
    }
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
        let Some(path) = record else {
            return Ok(Self {
                record: None,
                saved: BTreeMap::new(),
            });
        };
        let (saved, lines) = match path.exists() {
            true => {
                let text = std::fs::read_to_string(&path)
                    .map_err(io(format!("reading {}", path.display())))?;
                parse_record(&text).map_err(|e| {
                    DatapathError::Host(format!(
                        "{}: {e}; it records the host settings persona changed, remove it only \
                         after putting them back by hand",
                        path.display()
                    ))
                })?
            }
            false => (BTreeMap::new(), 0),
        };
        Ok(Self {
            record: Some(Record { path, lines }),
            saved,
        })
    }

    fn persist(&mut self, changes: &[(&str, Option<&str>)]) -> Result<()> {
        match &mut self.record {
            Some(r) => r.write(&self.saved, changes),
            None => Ok(()),
        }
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
            self.saved.insert(key.to_owned(), before.clone());
            if let Err(e) = self.persist(&[(key, Some(&before))]) {
                self.saved.remove(key);
                return Err(e);
            }
        }
        write(key, value)
    }

    /// Puts back every saved setting. A setting of an interface that is gone went with
    /// it.
    pub fn restore_all(&mut self) -> Result<()> {
        let keys = self.saved.keys().cloned().collect();
        self.restore(keys)
    }

    /// Puts back the saved settings of one interface: looked up by their prefixes, not
    /// found among those of every interface.
    pub fn restore_interface(&mut self, name: &str) -> Result<()> {
        let mut keys = Vec::new();
        for family in ["ipv4", "ipv6"] {
            for table in ["conf", "neigh"] {
                let prefix = format!("net/{family}/{table}/{name}/");
                let found = self.saved.range(prefix.clone()..);
                keys.extend(
                    found
                        .map(|(k, _)| k)
                        .take_while(|k| k.starts_with(&prefix))
                        .cloned(),
                );
            }
        }
        self.restore(keys)
    }

    fn restore(&mut self, keys: Vec<String>) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut first_error = None;
        let mut restored = Vec::new();
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
            restored.push(key);
        }
        let changes: Vec<(&str, Option<&str>)> =
            restored.iter().map(|k| (k.as_str(), None)).collect();
        self.persist(&changes)?;
        first_error.map_or(Ok(()), Err)
    }

    pub fn is_empty(&self) -> bool {
        self.saved.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_s_settings_are_told_apart_from_others() {
        let dir = std::env::temp_dir().join(format!("persona-sysctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let record = dir.join("sysctl.json");
        // The last three in the order the record keeps them.
        let keys = [
            "net/ipv4/conf/pzt1/proxy_arp",
            "net/ipv6/neigh/pzt1/proxy_delay",
            "net/ipv4/conf/pzt10/proxy_arp",
            "net/ipv4/conf/pzt1x/proxy_arp",
            "net/ipv6/conf/pzt2/forwarding",
        ];
        // Settings of interfaces that do not exist: restoring them finds them gone.
        let saved: BTreeMap<&str, &str> = keys.iter().map(|k| (*k, "0")).collect();
        std::fs::write(&record, serde_json::to_string(&saved).unwrap()).unwrap();
        let mut s = Sysctls::open(Some(record.clone())).unwrap();
        s.restore_interface("pzt1").unwrap();
        let left: Vec<&str> = s.saved.keys().map(String::as_str).collect();
        assert_eq!(left, keys[2..]);
        let reopened = Sysctls::open(Some(record)).unwrap();
        assert_eq!(reopened.saved, s.saved, "what is left is what is recorded");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_record_is_appended_to_and_written_anew_once_long() {
        let dir = std::env::temp_dir().join(format!("persona-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("settings.json");
        let mut record = Record {
            path: path.clone(),
            lines: 0,
        };
        let mut saved = BTreeMap::new();
        let key = |i: usize| format!("net/ipv4/conf/pzt{i}/proxy_arp");
        for round in 0..4 {
            for i in 0..100 {
                saved.insert(key(i), round.to_string());
                record
                    .write(&saved, &[(&key(i), Some(&round.to_string()))])
                    .unwrap();
            }
            for i in 0..50 {
                saved.remove(&key(i));
            }
            let gone: Vec<String> = (0..50).map(key).collect();
            let changes: Vec<(&str, Option<&str>)> =
                gone.iter().map(|k| (k.as_str(), None)).collect();
            record.write(&saved, &changes).unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(parse_record(&text).unwrap().0, saved, "round {round}");
            assert!(text.lines().count() <= COMPACT_AFTER, "round {round}");
        }
        assert!(parse_record("[\"a\", \"b\", \"c\"]\n").is_err());
        let (torn, lines) = parse_record("[\"a\",\"1\"]\n[\"b\",\"2\"]\n[\"c\",\"").unwrap();
        assert_eq!(
            torn.keys().collect::<Vec<_>>(),
            ["a", "b"],
            "a torn last line is no change"
        );
        assert_eq!(
            lines,
            usize::MAX,
            "and the record is written anew at the next one"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
