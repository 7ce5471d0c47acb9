//! The greeting QEMU sends on connect, and capability negotiation (`qmp_capabilities`, which must
//! be the first command: every other command is refused until it succeeds).

use serde::{Deserialize, Serialize};

wire_enum! {
    /// Optional QMP protocol features.
    pub enum QmpCapability {
        /// Out-of-band command execution.
        Oob = "oob",
    }
}

/// QEMU's version triple.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct QemuVersion {
    /// Major version (10 for 10.0.2).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

/// The version block of the greeting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmpVersion {
    /// The numeric version.
    pub qemu: QemuVersion,
    /// The distribution's package string.
    #[serde(default)]
    pub package: String,
}

/// The greeting: `{"QMP": {"version": {...}, "capabilities": [...]}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// The server's version.
    pub version: QmpVersion,
    /// Capabilities the server offers (to be enabled with `qmp_capabilities`).
    #[serde(default)]
    pub capabilities: Vec<QmpCapability>,
}

impl Greeting {
    /// True if the server offers `capability`.
    pub fn offers(&self, capability: &QmpCapability) -> bool {
        self.capabilities.contains(capability)
    }
}

/// Arguments of `qmp_capabilities`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QmpCapabilities {
    /// Capabilities to enable (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable: Option<Vec<QmpCapability>>,
}
