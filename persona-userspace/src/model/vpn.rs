//! A persona's VPN: a WireGuard peer. The private key stays in a file on the host; only
//! its path is stored, so it never reaches the store, the API or the audit log.
use std::path::PathBuf;

use base64::Engine as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::FieldError;
use crate::keys::KeyDir;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VpnSpec {
    pub wireguard: WireguardSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WireguardSpec {
    pub private_key_file: PathBuf,
    pub peer_public_key: String,
    /// host:port of the peer.
    pub endpoint: String,
    pub allowed_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
}

fn err(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError::new(format!("spec.vpn.wireguard.{field}"), reason)
}

pub fn decode_key(text: &str) -> Option<[u8; 32]> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
}

impl WireguardSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        if decode_key(&self.peer_public_key).is_none() {
            return Err(err(
                "peerPublicKey",
                "is not a base64 WireGuard key (32 bytes)",
            ));
        }
        let (host, port) = self
            .endpoint
            .rsplit_once(':')
            .ok_or_else(|| err("endpoint", format!("{:?} is not host:port", self.endpoint)))?;
        if host.trim_matches(['[', ']']).is_empty() || port.parse::<u16>().map_or(true, |p| p == 0)
        {
            return Err(err(
                "endpoint",
                format!("{:?} is not host:port", self.endpoint),
            ));
        }
        if self.allowed_ips.is_empty() {
            return Err(err("allowedIps", "at least one prefix is required"));
        }
        Ok(())
    }

    /// The private key, from its file in the key directory: where the daemon runs.
    pub fn key(&self, keys: &KeyDir) -> Result<[u8; 32], FieldError> {
        let bytes = keys
            .read(&self.private_key_file)
            .map_err(|reason| err("privateKeyFile", reason))?;
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(decode_key)
            .ok_or_else(|| err("privateKeyFile", "holds no WireGuard key"))
    }
}
