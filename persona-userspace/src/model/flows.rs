use serde::{Deserialize, Serialize};

/// What a shift does to the flows the device has open.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    clap::ValueEnum,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FlowMode {
    /// Flows opened before the shift keep the address and admission they had until they
    /// end; that address stays routed to the device until then. What nftables' SNAT
    /// does for established connections.
    #[default]
    Keep,
    /// Flows take the new persona's address at their next packet from the VM (the far
    /// end of a TCP connection then usually drops them).
    Move,
    /// Flows are forgotten: their next packets are judged by the new persona's rules as
    /// if new, and the VM's TCP connections get a reset at once.
    Cut,
}

impl FlowMode {
    pub fn label(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Move => "move",
            Self::Cut => "cut",
        }
    }
}
