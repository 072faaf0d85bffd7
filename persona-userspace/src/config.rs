//! Settings from a file: `/etc/persona/persona.yaml` unless `--config` or
//! PERSONA_CONFIG names another. Each key is a flag's long name (`uplink`, `listen`,
//! `min-dwell`...) and stands for that flag; the flag on the command line, or its
//! environment variable, wins over the file.
use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde_yaml::Value;

pub const DEFAULT_PATH: &str = "/etc/persona/persona.yaml";

/// The value of `--config` in the raw arguments, before clap sees them.
fn flag(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// Flags a file may set, by long name, with the environment variable each reads: the
/// global ones and the daemon's.
fn settable() -> BTreeMap<String, String> {
    let cli = <crate::cli::Cli as clap::CommandFactory>::command();
    let daemon = cli
        .find_subcommand("daemon")
        .map(|d| d.get_arguments().cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    cli.get_arguments()
        .cloned()
        .chain(daemon)
        .filter_map(|a| {
            let long = a.get_long()?.to_owned();
            let env = a.get_env()?.to_string_lossy().into_owned();
            (long != "config").then_some((long, env))
        })
        .collect()
}

fn text(path: &Path, key: &str, value: &Value) -> anyhow::Result<String> {
    Ok(match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Sequence(items) => items
            .iter()
            .map(|v| match v {
                Value::Sequence(_) | Value::Mapping(_) => {
                    bail!("{}: {key}: a list of plain values", path.display())
                }
                v => text(path, key, v),
            })
            .collect::<anyhow::Result<Vec<_>>>()?
            .join(","),
        _ => bail!(
            "{}: {key}: expected a string, number, boolean or list",
            path.display()
        ),
    })
}

/// The settings of a file, as environment variables to set: those of `env` already
/// set are left out.
fn settings(
    path: &Path,
    yaml: &str,
    env: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<(String, String)>> {
    let map: BTreeMap<String, Value> = match serde_yaml::from_str::<Option<_>>(yaml)
        .with_context(|| format!("{}: not a map of settings", path.display()))?
    {
        Some(m) => m,
        None => return Ok(Vec::new()),
    };
    let known = settable();
    let mut out = Vec::new();
    for (key, value) in &map {
        let Some(var) = known.get(key) else {
            bail!(
                "{}: {key}: no such setting (settings are flags' long names: {})",
                path.display(),
                known.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        };
        let value = text(path, key, value)?;
        if !env(var) {
            out.push((var.clone(), value));
        }
    }
    Ok(out)
}

/// Reads the settings file, if there is one, into the environment clap reads flags'
/// defaults from; returns its path. Call before any thread starts.
pub fn load(args: &[OsString]) -> anyhow::Result<Option<PathBuf>> {
    let named = flag(args).or_else(|| std::env::var_os("PERSONA_CONFIG").map(PathBuf::from));
    let path = named.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    let yaml = match std::fs::read_to_string(&path) {
        Ok(y) => y,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && named.is_none() => {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    for (var, value) in settings(&path, &yaml, |v| std::env::var_os(v).is_some())? {
        // SAFETY: main calls this before it starts any thread.
        unsafe { std::env::set_var(var, value) };
    }
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(yaml: &str) -> anyhow::Result<Vec<(String, String)>> {
        settings(Path::new("persona.yaml"), yaml, |v| v == "PERSONA_PIN_DIR")
    }

    #[test]
    fn keys_are_flags_and_the_environment_wins() {
        let got = read("uplink: [eth0, eth1]\nlisten: 127.0.0.1:7070\nmin-dwell: 5\nrules-dry-run: true\npin-dir: /elsewhere\n").unwrap();
        assert_eq!(
            got,
            [
                ("PERSONA_LISTEN".into(), "127.0.0.1:7070".into()),
                ("PERSONA_MIN_DWELL".into(), "5".into()),
                ("PERSONA_RULES_DRY_RUN".into(), "true".into()),
                ("PERSONA_UPLINK".into(), "eth0,eth1".into()),
            ]
        );
        assert!(read("").unwrap().is_empty());
    }

    #[test]
    fn unknown_keys_and_odd_values_are_refused_by_name() {
        let e = read("uplinks: [eth0]\n").unwrap_err().to_string();
        assert!(e.contains("persona.yaml: uplinks: no such setting"), "{e}");
        let e = read("listen: {a: 1}\n").unwrap_err().to_string();
        assert!(e.contains("persona.yaml: listen: expected"), "{e}");
        let e = read("- a\n- b\n").unwrap_err().to_string();
        assert!(e.contains("not a map of settings"), "{e}");
        assert_eq!(
            flag(&["persona".into(), "--config=/x.yaml".into()]),
            Some(PathBuf::from("/x.yaml"))
        );
    }
}
