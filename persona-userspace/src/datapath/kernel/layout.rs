//! Pinned maps outlive the process that made them, and another release may define a
//! map differently. aya re-uses a pin by its name alone, and programs reading a map of
//! another layout read past what it holds: every pin is compared with this build's
//! definition (BPF_OBJ_GET_INFO: type, key and value size, entries, flags) before
//! anything is loaded.
use std::path::Path;

use aya::maps::MapInfo;
use aya_obj::{Object, maps::PinningType};

use super::{DatapathError, Result};

#[derive(Debug, PartialEq, Eq)]
struct Layout {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// Refuses pins in `pin_dir` whose layout differs from the object's, naming each and
/// saying what to do.
pub fn check(object: &[u8], pin_dir: &Path) -> Result<()> {
    let object = Object::parse(object)
        .map_err(|e| DatapathError::Bpf(format!("reading the BPF object: {e}")))?;
    let mut wrong = Vec::new();
    let mut names: Vec<&String> = object.maps.keys().collect();
    names.sort();
    for name in names {
        let map = &object.maps[name];
        let pin = pin_dir.join(name);
        if map.pinning() != PinningType::ByName || !pin.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&pin)
            .map_err(|e| DatapathError::Bpf(format!("{}: {e}", pin.display())))?;
        let pinned = Layout {
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        };
        let ours = Layout {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            flags: map.map_flags(),
        };
        if pinned != ours {
            wrong.push(format!("{name}: pinned {pinned}; this build {ours}"));
        }
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(DatapathError::Layout(format!(
        "maps pinned in {dir} have another layout than this build's (pinned by another \
         release):\n  {}\nThe devices they hold keep running the programs that use them. \
         To move to this release, run `persona datapath reset` (every device is detached; \
         the daemon attaches them again at its start, from the store), then start it again.",
        wrong.join("\n  "),
        dir = pin_dir.display()
    )))
}

/// Unpins every link (each program comes off its interface) and every map under
/// `pin_dir`, whatever release pinned them; returns how many of each.
pub fn remove_pins(pin_dir: &Path) -> Result<(usize, usize)> {
    if !pin_dir.exists() {
        return Ok((0, 0));
    }
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |source| DatapathError::Io {
            context: format!("removing {what}"),
            source,
        }
    };
    let _lock = super::lock(pin_dir)?;
    let mut links = 0;
    let link_dir = pin_dir.join("links");
    if link_dir.exists() {
        for entry in std::fs::read_dir(&link_dir).map_err(io(&link_dir))? {
            let path = entry.map_err(io(&link_dir))?.path();
            std::fs::remove_file(&path).map_err(io(&path))?;
            links += 1;
        }
        std::fs::remove_dir(&link_dir).map_err(io(&link_dir))?;
    }
    let mut maps = 0;
    for entry in std::fs::read_dir(pin_dir).map_err(io(pin_dir))? {
        let path = entry.map_err(io(pin_dir))?.path();
        if path.is_file() {
            std::fs::remove_file(&path).map_err(io(&path))?;
            maps += 1;
        }
    }
    Ok((links, maps))
}
