//! What operators write: personas and devices, as YAML manifests.
mod device;
mod flows;
mod manifest;
mod persona;
pub mod qos;
mod scope;
pub mod tls;
pub mod vpn;

pub use device::{
    DeviceSpec, FloodGuard, MetadataSpec, TapSpec, check_host_name, check_interface_name,
};
pub use flows::FlowMode;
pub use manifest::{API_VERSION, Manifest, load_manifests, parse_manifests, validate_name};
pub use persona::{
    Action, DirectionSpec, FirewallSpec, PersonaSpec, PortRange, Protocol, RuleSpec,
};
pub use scope::AddressScope;

/// Where a value failed to deserialize, as a field path (`spec.addresses[1]`); `None`
/// at the top.
pub fn field_path(path: &serde_path_to_error::Path) -> Option<String> {
    let p = path.to_string();
    (p != ".").then_some(p)
}

/// A bad input, naming the field path and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests;
