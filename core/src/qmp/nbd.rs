//! NBD server and exports: `nbd-server-start`, `nbd-server-stop`, `block-export-add`,
//! `block-export-del`.

use serde::{Deserialize, Serialize};

use super::bitmap::BitmapRef;

/// A unix socket address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixSocketAddress {
    /// Path of the socket.
    pub path: String,
    /// Linux abstract socket namespace.
    #[serde(default, rename = "abstract", skip_serializing_if = "Option::is_none")]
    pub abstract_namespace: Option<bool>,
    /// Abstract address length is the name's length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tight: Option<bool>,
}

/// A TCP address. The port is a string in QMP (a number or a service name).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct InetSocketAddress {
    /// Host name or address.
    pub host: String,
    /// Port number or service name.
    pub port: String,
    /// Host and port are numeric (no name lookup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numeric: Option<bool>,
    /// Try ports up to this one when `port` is busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u16>,
    /// Use IPv4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<bool>,
    /// Use IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    /// TCP keep-alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<bool>,
}

/// A file descriptor passed earlier with `getfd` (or a monitor's fd name).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FdSocketAddress {
    /// The fd's name or number.
    #[serde(rename = "str")]
    pub name: String,
}

/// The legacy socket address shape `nbd-server-start` takes:
/// `{"type": "unix", "data": {"path": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    content = "data",
    rename_all = "lowercase",
    deny_unknown_fields
)]
pub enum SocketAddressLegacy {
    /// A unix socket.
    Unix(UnixSocketAddress),
    /// A TCP socket.
    Inet(InetSocketAddress),
    /// A passed file descriptor.
    Fd(FdSocketAddress),
}

impl SocketAddressLegacy {
    /// A unix socket at `path`.
    pub fn unix(path: impl Into<String>) -> Self {
        SocketAddressLegacy::Unix(UnixSocketAddress {
            path: path.into(),
            ..Default::default()
        })
    }

    /// A TCP socket on `host`:`port`.
    pub fn inet(host: impl Into<String>, port: u16) -> Self {
        SocketAddressLegacy::Inet(InetSocketAddress {
            host: host.into(),
            port: port.to_string(),
            ..Default::default()
        })
    }

    /// A file descriptor passed under `name`.
    pub fn fd(name: impl Into<String>) -> Self {
        SocketAddressLegacy::Fd(FdSocketAddress { name: name.into() })
    }
}

/// Arguments of `nbd-server-start`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NbdServerStart {
    /// Where to listen.
    pub addr: SocketAddressLegacy,
    /// Id of a `tls-creds-x509` object: clients must use TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// Id of an authorization object for TLS clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    /// Connection limit; 0 means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Seconds a client may take for the handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_max_seconds: Option<u32>,
}

impl NbdServerStart {
    /// A server on `addr` without TLS or limits.
    pub fn new(addr: SocketAddressLegacy) -> Self {
        NbdServerStart {
            addr,
            tls_creds: None,
            tls_authz: None,
            max_connections: None,
            handshake_max_seconds: None,
        }
    }
}

/// Export types of `block-export-add`. Only NBD is part of this vocabulary.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum BlockExportType {
    /// An NBD export on the running NBD server.
    #[default]
    Nbd,
}

/// Arguments of `block-export-add` for an NBD export.
///
/// ```
/// # use vbackup_core::qmp::{BitmapRef, BlockExportAdd};
/// let export = BlockExportAdd { writable: Some(false), name: Some("vda".into()),
///     bitmaps: Some(vec![BitmapRef::Name("backup-vda".into())]),
///     ..BlockExportAdd::nbd("libvirt-nbd-libvirt-10-format", "libvirt-10-format") };
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BlockExportAdd {
    /// The export type (`nbd`).
    #[serde(rename = "type")]
    pub export_type: BlockExportType,
    /// The export's id (for `block-export-del` and `BLOCK_EXPORT_DELETED`).
    pub id: String,
    /// The exported node.
    pub node_name: String,
    /// Clients may write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable: Option<bool>,
    /// Flush after every write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writethrough: Option<bool>,
    /// Iothread to run the export in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iothread: Option<String>,
    /// Fail instead of moving the node to another iothread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_iothread: Option<bool>,
    /// Export name clients ask for; defaults to the node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free-form description shown to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Bitmaps offered as `qemu:dirty-bitmap:NAME` meta contexts (read-only exports need them
    /// disabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapRef>>,
    /// Offer the `qemu:allocation-depth` meta context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_depth: Option<bool>,
}

impl BlockExportAdd {
    /// An NBD export `id` of `node_name`, every option left to QEMU.
    pub fn nbd(id: impl Into<String>, node_name: impl Into<String>) -> Self {
        BlockExportAdd {
            id: id.into(),
            node_name: node_name.into(),
            ..Default::default()
        }
    }
}

/// How `block-export-del` treats connected clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockExportRemoveMode {
    /// Fail while clients are connected (QEMU's default).
    Safe,
    /// Disconnect them.
    Hard,
}

/// Arguments of `block-export-del`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockExportDel {
    /// The export's id.
    pub id: String,
    /// What to do with connected clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BlockExportRemoveMode>,
}
