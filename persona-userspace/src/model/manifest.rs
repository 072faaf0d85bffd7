use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{DeviceSpec, FieldError, PersonaSpec};

pub const API_VERSION: &str = "persona.dev/v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
}

/// One YAML document: `apiVersion`, `kind`, `metadata`, `spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum Manifest {
    Persona {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: PersonaSpec,
    },
    Device {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: DeviceSpec,
    },
    Rule {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: crate::rules::RuleSpec,
    },
    Application {
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Metadata,
        spec: crate::rules::apps::ApplicationSpec,
    },
}

impl Manifest {
    pub fn name(&self) -> &str {
        &self.header().1.name
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Manifest::Persona { .. } => "Persona",
            Manifest::Device { .. } => "Device",
            Manifest::Rule { .. } => "Rule",
            Manifest::Application { .. } => "Application",
        }
    }

    fn header(&self) -> (&str, &Metadata) {
        match self {
            Manifest::Persona {
                api_version,
                metadata,
                ..
            }
            | Manifest::Device {
                api_version,
                metadata,
                ..
            }
            | Manifest::Rule {
                api_version,
                metadata,
                ..
            }
            | Manifest::Application {
                api_version,
                metadata,
                ..
            } => (api_version, metadata),
        }
    }

    fn validate(&self) -> Result<(), FieldError> {
        let (api_version, metadata) = self.header();
        if api_version != API_VERSION {
            return Err(FieldError::new(
                "apiVersion",
                format!("{api_version:?} is not supported (expected {API_VERSION:?})"),
            ));
        }
        validate_name(&metadata.name)?;
        match self {
            Manifest::Persona { spec, .. } => spec.validate(),
            Manifest::Device { spec, .. } => spec.validate(),
            Manifest::Rule { spec, .. } => spec.validate(),
            Manifest::Application { spec, .. } => spec.validate(),
        }
    }
}

/// Object names: what kubectl users expect, and safe in paths and URLs.
pub fn validate_name(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "metadata.name",
            format!("{name:?} must be 1-63 lowercase letters, digits or '-'"),
        ))
    }
}

/// A document read as its kind's type: its errors know their line and field path.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Typed<S> {
    #[serde(rename = "apiVersion")]
    api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: Metadata,
    spec: S,
}

fn typed<S: serde::de::DeserializeOwned>(
    doc: serde_yaml::Deserializer<'_>,
) -> Result<(String, Metadata, S), FieldError> {
    let t: Typed<S> = serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let text = inner.to_string();
        // The location goes first, not at the end of the reason; the YAML parser's own
        // path, as coarse or as fine as the field path, goes.
        let reason = text.rfind(" at line ").map_or(&*text, |i| &text[..i]);
        let cuts = path.match_indices(['.', '[']).map(|(i, _)| i);
        let reason = cuts
            .chain([path.len()])
            .find_map(|i| reason.strip_prefix(&format!("{}: ", &path[..i])))
            .unwrap_or(reason);
        let at = inner
            .location()
            .map(|l| format!("line {}, column {}", l.line(), l.column()));
        let field = match (at, path.as_str()) {
            (Some(at), ".") => at,
            (Some(at), p) => format!("{at}: {p}"),
            (None, p) => p.to_owned(),
        };
        FieldError::new(field, reason)
    })?;
    Ok((t.api_version, t.metadata, t.spec))
}

/// Parses every document of a YAML stream; the first bad one fails the whole stream.
/// A document is read twice: for its kind, then as that kind's type.
pub fn parse_manifests(text: &str) -> Result<Vec<Manifest>, FieldError> {
    let mut out = Vec::new();
    let docs = serde_yaml::Deserializer::from_str(text);
    for (i, (doc, again)) in docs
        .zip(serde_yaml::Deserializer::from_str(text))
        .enumerate()
    {
        let document = || format!("document {}", i + 1);
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| FieldError::new(document(), e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let manifest = match value.get("kind").and_then(|k| k.as_str()) {
            Some("Persona") => typed(again).map(|(api_version, metadata, spec)| {
                Manifest::Persona {
                    api_version,
                    metadata,
                    spec,
                }
            }),
            Some("Device") => typed(again).map(|(api_version, metadata, spec)| Manifest::Device {
                api_version,
                metadata,
                spec,
            }),
            Some("Rule") => typed(again).map(|(api_version, metadata, spec)| Manifest::Rule {
                api_version,
                metadata,
                spec,
            }),
            Some("Application") => {
                typed(again).map(|(api_version, metadata, spec)| Manifest::Application {
                    api_version,
                    metadata,
                    spec,
                })
            }
            Some(other) => Err(FieldError::new(
                "kind",
                format!(
                    "unknown variant `{other}`, expected one of `Persona`, `Device`, `Rule`, `Application`"
                ),
            )),
            None => Err(FieldError::new("kind", "missing: Persona, Device, Rule or Application")),
        }
        .map_err(|e| FieldError::new(format!("{}, {}", document(), e.field), e.reason))?;
        manifest.validate().map_err(|e| FieldError {
            field: format!(
                "{} {:?}: {}",
                manifest.kind_name(),
                manifest.name(),
                e.field
            ),
            reason: e.reason,
        })?;
        out.push(manifest);
    }
    Ok(out)
}

/// Reads a file, or every `.yaml`/`.yml` file of a directory in name order.
pub fn load_manifests(path: &Path) -> anyhow::Result<Vec<Manifest>> {
    use anyhow::Context as _;
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
        {
            let p = entry?.path();
            if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        out.extend(parse_manifests(&text).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?);
    }
    Ok(out)
}
