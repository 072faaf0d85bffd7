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

/// Parses every document of a YAML stream; the first bad one fails the whole stream.
pub fn parse_manifests(text: &str) -> Result<Vec<Manifest>, FieldError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| FieldError::new(format!("document {}", i + 1), e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let manifest: Manifest = serde_yaml::from_value(value)
            .map_err(|e| FieldError::new(format!("document {}", i + 1), e.to_string()))?;
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
        out.extend(parse_manifests(&text).with_context(|| format!("in {}", f.display()))?);
    }
    Ok(out)
}
