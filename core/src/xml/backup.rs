//! `<domainbackup>`: the typed definition, its parser (grammar, then libvirt's parser rules)
//! and its formatter in libvirt's canonical form.
//!
//! Output: `<domainbackup mode>`, `<incremental>`, `<server transport tls name port socket
//! fdgroup/>`, `<disks>`. A disk prints `name`, `backup`, and when backed up: `type`,
//! `backupmode`, `incremental`, `exportname`, `exportbitmap`, `index`, then `<driver type>` and
//! `<target>` (push) or `<scratch>` (pull) with their `<seclabel>`s and `<encryption>`.

use super::checkpoint::is_valid_disk_target;
use super::document::{Ctx, N, is_absolute_path, load};
use super::error::{Origin, XmlError, XmlErrorKind};
use super::schema::{self, Grammar};
use super::schema_error;
use super::writer::Writer;
use crate::model::ImageFormat;

/// Push (QEMU writes the copy) or pull (QEMU exports a point-in-time view over NBD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum BackupModeAttr {
    /// QEMU copies the disks into target images.
    #[default]
    Push,
    /// QEMU serves the disks over NBD; the client reads what it needs.
    Pull,
}

impl BackupModeAttr {
    /// The XML spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Push => "push",
            Self::Pull => "pull",
        }
    }

    /// The element holding a disk's image: `target` (push) or `scratch` (pull).
    pub fn store_element(self) -> &'static str {
        match self {
            Self::Push => "target",
            Self::Pull => "scratch",
        }
    }
}

/// How the NBD server of a pull backup listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Transport {
    /// TCP (`name` and `port`).
    #[default]
    Tcp,
    /// A unix socket (`socket`).
    Unix,
    /// A listening socket passed in by the caller (`fdgroup`).
    Fd,
}

impl Transport {
    /// The XML spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Unix => "unix",
            Self::Fd => "fd",
        }
    }
}

/// `<server>` of a pull backup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerDef {
    /// Transport; `tcp` when not given.
    pub transport: Transport,
    /// Host name or address (tcp).
    pub name: Option<String>,
    /// TCP port; `port='0'` reads as no port, as libvirt prints only non-zero ports.
    pub port: Option<u16>,
    /// Absolute socket path (unix).
    pub socket: Option<String>,
    /// Name of the file-descriptor group (fd).
    pub fdgroup: Option<String>,
    /// TLS on or off, when given.
    pub tls: Option<bool>,
}

/// `full` or `incremental`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackupDiskMode {
    /// Copy everything.
    Full,
    /// Copy what changed since a checkpoint.
    Incremental,
}

impl BackupDiskMode {
    /// The XML spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Incremental => "incremental",
        }
    }
}

/// Storage type of a backup target or scratch image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum BackupStorage {
    /// A file (`file='...'`).
    #[default]
    File,
    /// A block device (`dev='...'`).
    Block,
}

impl BackupStorage {
    /// The XML spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Block => "block",
        }
    }

    /// The attribute holding the path.
    pub fn path_attribute(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Block => "dev",
        }
    }
}

/// A `<seclabel>` of a target or scratch image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Seclabel {
    /// Security driver (`selinux`, `dac`...).
    pub model: Option<String>,
    /// Whether to relabel the image.
    pub relabel: Option<bool>,
    /// Whether the label step is skipped.
    pub labelskip: Option<bool>,
    /// The `<label>` text.
    pub label: Option<String>,
}

/// `<secret>` of an `<encryption>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// `uuid='...'`.
    Uuid(String),
    /// `usage='...'`.
    Usage(String),
}

/// `<cipher>` of an `<encryption>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cipher {
    /// Algorithm name (`aes`).
    pub name: String,
    /// Key size in bits.
    pub size_bits: u32,
    /// Mode (`cbc`, `xts`).
    pub mode: Option<String>,
    /// Hash (`sha256`).
    pub hash: Option<String>,
}

/// `<ivgen>` of an `<encryption>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ivgen {
    /// Generator name (`plain64`).
    pub name: String,
    /// Hash (`sha256`).
    pub hash: Option<String>,
}

/// The `<encryption>` of a target or scratch image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encryption {
    /// Format: `luks`, `luks2`, `luks-any`, `qcow` or `default`.
    pub format: String,
    /// Engine: `qemu` or `librbd`, when given.
    pub engine: Option<String>,
    /// The passphrase secret.
    pub secret: SecretRef,
    /// Cipher and ivgen, given together or not at all.
    pub cipher: Option<(Cipher, Ivgen)>,
}

/// A `<target>` (push) or `<scratch>` (pull).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupStoreDef {
    /// Absolute path of the file or block device (the grammar requires it on the element).
    pub path: String,
    /// Security labels.
    pub seclabels: Vec<Seclabel>,
    /// Encryption of the image.
    pub encryption: Option<Encryption>,
}

/// What is done with a disk that is backed up (`backup='yes'`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskBackup {
    /// Storage type of the target or scratch image (`file` when not given).
    pub storage: BackupStorage,
    /// Full or incremental; decided on alignment when not given.
    pub mode: Option<BackupDiskMode>,
    /// Checkpoint to back up from (overrides `<incremental>`).
    pub incremental: Option<String>,
    /// NBD export name (pull).
    pub export_name: Option<String>,
    /// Name of the bitmap exported over NBD (pull).
    pub export_bitmap: Option<String>,
    /// Storage index of the target or scratch node, as reported by a running job.
    pub index: Option<u32>,
    /// `<driver type>` of the image; qcow2 on alignment when not given.
    pub format: Option<ImageFormat>,
    /// The `<target>` or `<scratch>`, when given.
    pub store: Option<BackupStoreDef>,
}

/// One `<disk>` of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDisk {
    /// Disk target (`vda`).
    pub name: String,
    /// `None` for `backup='no'`; otherwise how the disk is backed up.
    pub backup: Option<DiskBackup>,
    /// Where the element was read from.
    pub origin: Origin,
}

/// A `<domainbackup>` definition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackupDef {
    /// Push (default) or pull.
    pub mode: BackupModeAttr,
    /// Default checkpoint for incremental disks.
    pub incremental: Option<String>,
    /// NBD server (pull only, required there).
    pub server: Option<ServerDef>,
    /// Listed disks; empty means "back up all disks".
    pub disks: Vec<BackupDisk>,
    /// Where the root element was read from.
    pub origin: Origin,
}

const ROOT: &str = "domainbackup";

/// Image formats libvirt knows by name (`storageFormat`).
pub const STORAGE_FORMATS: &[&str] = &[
    "raw", "dir", "bochs", "cloop", "dmg", "iso", "vpc", "vdi", "fat", "vhd", "ploop", "luks",
    "cow", "qcow", "qcow2", "qed", "vmdk",
];

impl BackupDef {
    /// Parses and validates a `<domainbackup>` document.
    pub fn parse(text: &str) -> Result<Self, XmlError> {
        let doc = load(text)?;
        if let Err(violations) = schema::validate(&doc, Grammar::Backup) {
            return Err(schema_error(violations));
        }
        let ctx = Ctx::new(&doc);
        read_backup(&ctx, doc.root_element())
    }

    /// Formats the definition in libvirt's canonical form (ending with a newline).
    pub fn format(&self) -> String {
        let mut w = Writer::new();
        let tag = w.tag(ROOT).attr("mode", self.mode.name());
        if self.incremental.is_none() && self.server.is_none() && self.disks.is_empty() {
            tag.empty();
            return w.finish();
        }
        tag.open();
        if let Some(incremental) = &self.incremental {
            w.text_element("incremental", incremental);
        }
        if let Some(server) = &self.server {
            let port = server.port.filter(|p| *p != 0).map(|p| p.to_string());
            w.tag("server")
                .attr("transport", server.transport.name())
                .attr_opt("tls", server.tls.map(yes_no))
                .attr_opt("name", server.name.as_deref())
                .attr_opt("port", port.as_deref())
                .attr_opt("socket", server.socket.as_deref())
                .attr_opt("fdgroup", server.fdgroup.as_deref())
                .empty();
        }
        if !self.disks.is_empty() {
            w.tag("disks").open();
            for disk in &self.disks {
                format_disk(&mut w, self.mode, disk);
            }
            w.end("disks");
        }
        w.end(ROOT);
        w.finish()
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

fn format_disk(w: &mut Writer, mode: BackupModeAttr, disk: &BackupDisk) {
    let tag = w.tag("disk").attr("name", &disk.name);
    let Some(backup) = &disk.backup else {
        tag.attr("backup", "no").empty();
        return;
    };
    let index = backup.index.filter(|i| *i != 0).map(|i| i.to_string());
    let tag = tag
        .attr("backup", "yes")
        .attr("type", backup.storage.name())
        .attr_opt("backupmode", backup.mode.map(BackupDiskMode::name))
        .attr_opt("incremental", backup.incremental.as_deref())
        .attr_opt("exportname", backup.export_name.as_deref())
        .attr_opt("exportbitmap", backup.export_bitmap.as_deref())
        .attr_opt("index", index.as_deref());
    let store = backup.store.as_ref();
    if backup.format.is_none() && store.is_none() {
        tag.empty();
        return;
    }
    tag.open();
    if let Some(format) = &backup.format {
        w.tag("driver").attr("type", format.name()).empty();
    }
    if let Some(store) = store {
        let element = mode.store_element();
        let tag = w
            .tag(element)
            .attr(backup.storage.path_attribute(), &store.path);
        if store.seclabels.is_empty() && store.encryption.is_none() {
            tag.empty();
        } else {
            tag.open();
            for label in &store.seclabels {
                let tag = w
                    .tag("seclabel")
                    .attr_opt("model", label.model.as_deref())
                    .attr_opt("relabel", label.relabel.map(yes_no))
                    .attr_opt("labelskip", label.labelskip.map(yes_no));
                match &label.label {
                    Some(text) => {
                        tag.open();
                        w.text_element("label", text);
                        w.end("seclabel");
                    }
                    None => tag.empty(),
                }
            }
            if let Some(enc) = &store.encryption {
                w.tag("encryption")
                    .attr("format", &enc.format)
                    .attr_opt("engine", enc.engine.as_deref())
                    .open();
                let secret = w.tag("secret").attr("type", "passphrase");
                match &enc.secret {
                    SecretRef::Uuid(uuid) => secret.attr("uuid", uuid).empty(),
                    SecretRef::Usage(usage) => secret.attr("usage", usage).empty(),
                }
                if let Some((cipher, ivgen)) = &enc.cipher {
                    w.tag("cipher")
                        .attr("name", &cipher.name)
                        .attr("size", &cipher.size_bits.to_string())
                        .attr_opt("mode", cipher.mode.as_deref())
                        .attr_opt("hash", cipher.hash.as_deref())
                        .empty();
                    w.tag("ivgen")
                        .attr("name", &ivgen.name)
                        .attr_opt("hash", ivgen.hash.as_deref())
                        .empty();
                }
                w.end("encryption");
            }
            w.end(element);
        }
    }
    w.end("disk");
}

pub(crate) fn read_backup(ctx: &Ctx<'_, '_>, root: N<'_, '_>) -> Result<BackupDef, XmlError> {
    ctx.expect_root(root, ROOT)?;
    ctx.check_attributes(root, &["mode"])?;
    let mode = match root.attribute("mode") {
        None | Some("push") => BackupModeAttr::Push,
        Some("pull") => BackupModeAttr::Pull,
        Some(other) => {
            return Err(ctx.schema(
                root,
                format!("invalid value '{other}' for attribute 'mode' (expected push or pull)"),
            ));
        }
    };
    let (mut incremental, mut server, mut disks) = (None, None, None);
    for child in ctx.element_children(root)? {
        let slot = match child.tag_name().name() {
            "incremental" => &mut incremental,
            "server" => &mut server,
            "disks" => &mut disks,
            _ => return Err(ctx.unexpected(child)),
        };
        ctx.once(slot, child)?;
    }
    let mut def = BackupDef {
        mode,
        origin: ctx.origin(root),
        ..BackupDef::default()
    };
    if let Some(node) = incremental {
        ctx.check_attributes(node, &[])?;
        let text = ctx.text(node)?;
        def.incremental = Some(ctx.checkpoint_name(node, "checkpoint name", &text)?);
    }
    match (mode, server) {
        (BackupModeAttr::Push, Some(node)) => {
            return Err(ctx.err(
                XmlErrorKind::Unsupported,
                node,
                "<server> is only allowed in a pull mode backup",
            ));
        }
        (BackupModeAttr::Pull, None) => {
            return Err(ctx.schema(root, "a pull mode backup requires a <server> element"));
        }
        (BackupModeAttr::Pull, Some(node)) => def.server = Some(read_server(ctx, node)?),
        (BackupModeAttr::Push, None) => {}
    }
    if let Some(node) = disks {
        def.disks = ctx.disks(node, |disk| read_disk(ctx, mode, disk))?;
    }
    Ok(def)
}

fn is_host_name(name: &str) -> bool {
    let dns = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    dns || name.parse::<std::net::Ipv6Addr>().is_ok()
}

fn read_server(ctx: &Ctx<'_, '_>, node: N<'_, '_>) -> Result<ServerDef, XmlError> {
    ctx.check_empty(
        node,
        &["transport", "name", "port", "socket", "fdgroup", "tls"],
    )?;
    let transport = match node.attribute("transport") {
        None | Some("tcp") => Transport::Tcp,
        Some("unix") => Transport::Unix,
        Some("fd") => Transport::Fd,
        Some("rdma") => {
            return Err(ctx.err(
                XmlErrorKind::Unsupported,
                node,
                "transport 'rdma' is not supported for <server>",
            ));
        }
        Some(other) => {
            return Err(ctx.schema(
                node,
                format!(
                    "invalid value '{other}' for attribute 'transport' (expected tcp, unix or fd)"
                ),
            ));
        }
    };
    // Which attributes each transport takes, as the grammar has it.
    let allowed: &[&str] = match transport {
        Transport::Tcp => &["transport", "name", "port", "tls"],
        Transport::Unix => &["transport", "socket", "tls"],
        Transport::Fd => &["transport", "fdgroup", "tls"],
    };
    if let Some(attr) = node.attributes().find(|a| !allowed.contains(&a.name())) {
        let message = if attr.name() == "socket" {
            format!(
                "a socket is only allowed with transport 'unix', not '{}'",
                transport.name()
            )
        } else {
            format!(
                "attribute '{}' is not allowed with transport '{}'",
                attr.name(),
                transport.name()
            )
        };
        return Err(ctx.schema(node, message));
    }
    let mut server = ServerDef {
        transport,
        tls: ctx.yes_no(node, "tls")?,
        ..ServerDef::default()
    };
    match transport {
        Transport::Tcp => {
            let name = node
                .attribute("name")
                .ok_or_else(|| ctx.schema(node, "missing host name for tcp transport"))?;
            if !is_host_name(name) {
                return Err(ctx.schema(node, format!("invalid host name '{name}'")));
            }
            server.name = Some(name.to_owned());
            if let Some(text) = node.attribute("port") {
                let port = ctx.unsigned(node, "attribute 'port'", text)?;
                if port > u64::from(u32::MAX) {
                    return Err(ctx.schema(node, format!("port '{text}' is out of range")));
                }
                let port = u16::try_from(port).map_err(|_| {
                    ctx.err(
                        XmlErrorKind::Invalid,
                        node,
                        format!("port '{text}' is out of range (0 to 65535)"),
                    )
                })?;
                server.port = (port != 0).then_some(port);
            }
        }
        Transport::Unix => {
            let socket = node
                .attribute("socket")
                .ok_or_else(|| ctx.schema(node, "missing socket for unix transport"))?;
            if !is_absolute_path(socket) {
                return Err(ctx.err(
                    XmlErrorKind::Invalid,
                    node,
                    format!("backup socket path '{socket}' must be absolute"),
                ));
            }
            server.socket = Some(socket.to_owned());
        }
        Transport::Fd => {
            let group = node
                .attribute("fdgroup")
                .ok_or_else(|| ctx.schema(node, "missing fdgroup for fd transport"))?;
            if group.is_empty() {
                return Err(ctx.schema(node, "fdgroup must not be empty"));
            }
            server.fdgroup = Some(group.to_owned());
        }
    }
    Ok(server)
}

fn read_disk(
    ctx: &Ctx<'_, '_>,
    mode: BackupModeAttr,
    node: N<'_, '_>,
) -> Result<BackupDisk, XmlError> {
    let name = node
        .attribute("name")
        .ok_or_else(|| ctx.schema(node, "missing required attribute 'name'"))?;
    if !is_valid_disk_target(name) {
        return Err(ctx.schema(node, format!("disk name '{name}' is not a disk target")));
    }
    let backup = ctx.yes_no(node, "backup")?.unwrap_or(true);
    let origin = ctx.origin(node);
    if !backup {
        // With backup='no' the grammar allows nothing else.
        ctx.check_empty(node, &["name", "backup"])?;
        return Ok(BackupDisk {
            name: name.to_owned(),
            backup: None,
            origin,
        });
    }
    let pull_only: &[&str] = &["exportname", "exportbitmap"];
    let mut allowed = vec![
        "name",
        "backup",
        "type",
        "backupmode",
        "incremental",
        "index",
    ];
    if mode == BackupModeAttr::Pull {
        allowed.extend_from_slice(pull_only);
    }
    if mode == BackupModeAttr::Push
        && let Some(attr) = node.attributes().find(|a| pull_only.contains(&a.name()))
    {
        return Err(ctx.schema(
            node,
            format!("attribute '{}' is only allowed in pull mode", attr.name()),
        ));
    }
    ctx.check_attributes(node, &allowed)?;
    let storage = match node.attribute("type") {
        None if mode == BackupModeAttr::Push => {
            return Err(ctx.schema(node, "a push mode disk requires the attribute 'type'"));
        }
        None | Some("file") => BackupStorage::File,
        Some("block") => BackupStorage::Block,
        Some(other @ ("network" | "dir" | "volume" | "nvme" | "vhostuser" | "vhostvdpa")) => {
            return Err(ctx.err(
                XmlErrorKind::Invalid,
                node,
                format!("unsupported disk backup type '{other}'"),
            ));
        }
        Some(other) => {
            return Err(ctx.schema(
                node,
                format!("invalid value '{other}' for attribute 'type' (expected file or block)"),
            ));
        }
    };
    let disk_mode = match node.attribute("backupmode") {
        None => None,
        Some("full") => Some(BackupDiskMode::Full),
        Some("incremental") => Some(BackupDiskMode::Incremental),
        Some(other) => {
            return Err(ctx.schema(
                node,
                format!("invalid value '{other}' for attribute 'backupmode' (expected full or incremental)"),
            ));
        }
    };
    let incremental = match node.attribute("incremental") {
        Some(_) if disk_mode == Some(BackupDiskMode::Full) => {
            return Err(ctx.schema(
                node,
                "attribute 'incremental' is not allowed with backupmode='full'",
            ));
        }
        Some(value) => Some(ctx.checkpoint_name(node, "checkpoint name", value)?),
        None => None,
    };
    let nonempty = |attr: &str| -> Result<Option<String>, XmlError> {
        match node.attribute(attr) {
            Some("") => Err(ctx.schema(node, format!("attribute '{attr}' must not be empty"))),
            other => Ok(other.map(str::to_owned)),
        }
    };
    let export_name = nonempty("exportname")?;
    let export_bitmap = nonempty("exportbitmap")?;
    let index = match node.attribute("index") {
        None => None,
        Some(text) => {
            let value = ctx.unsigned(node, "attribute 'index'", text)?;
            if value == 0 || value > u64::from(u32::MAX) {
                return Err(ctx.schema(node, format!("index '{text}' is out of range")));
            }
            u32::try_from(value).ok()
        }
    };
    let (mut driver, mut store_node) = (None, None);
    for child in ctx.element_children(node)? {
        let name = child.tag_name().name();
        if name == "driver" {
            ctx.once(&mut driver, child)?;
        } else if name == mode.store_element() {
            ctx.once(&mut store_node, child)?;
        } else if name == "target" || name == "scratch" {
            return Err(ctx.schema(
                child,
                format!("element <{name}> is not allowed in {} mode", mode.name()),
            ));
        } else {
            return Err(ctx.unexpected(child));
        }
    }
    let format = match driver {
        None => None,
        Some(d) => {
            ctx.check_empty(d, &["type"])?;
            let value = d
                .attribute("type")
                .ok_or_else(|| ctx.schema(d, "missing required attribute 'type'"))?;
            if !STORAGE_FORMATS.contains(&value) {
                return Err(ctx.schema(d, format!("unknown storage source format '{value}'")));
            }
            if mode == BackupModeAttr::Pull && value != "qcow2" {
                return Err(ctx.err(
                    XmlErrorKind::Unsupported,
                    d,
                    format!("pull mode backup for disk '{name}' requires the qcow2 format"),
                ));
            }
            Some(ImageFormat::from_name(value))
        }
    };
    if mode == BackupModeAttr::Pull {
        if storage == BackupStorage::Block && store_node.is_none() {
            return Err(ctx.schema(node, "a pull mode disk of type 'block' requires <scratch>"));
        }
        if let (Some(d), None) = (driver, store_node) {
            return Err(ctx.schema(d, "<driver> is only allowed together with <scratch>"));
        }
    }
    let store = match store_node {
        Some(s) => Some(read_store(ctx, storage, s)?),
        None => None,
    };
    Ok(BackupDisk {
        name: name.to_owned(),
        backup: Some(DiskBackup {
            storage,
            mode: disk_mode,
            incremental,
            export_name,
            export_bitmap,
            index,
            format,
            store,
        }),
        origin,
    })
}

fn read_store(
    ctx: &Ctx<'_, '_>,
    storage: BackupStorage,
    node: N<'_, '_>,
) -> Result<BackupStoreDef, XmlError> {
    let attr = storage.path_attribute();
    ctx.check_attributes(node, &[attr])?;
    let path = node
        .attribute(attr)
        .ok_or_else(|| ctx.schema(node, format!("missing required attribute '{attr}'")))?;
    if !is_absolute_path(path) {
        return Err(ctx.schema(node, format!("path '{path}' must be absolute")));
    }
    let mut store = BackupStoreDef {
        path: path.to_owned(),
        seclabels: Vec::new(),
        encryption: None,
    };
    let mut encryption = None;
    for child in ctx.element_children(node)? {
        match child.tag_name().name() {
            "seclabel" => store.seclabels.push(read_seclabel(ctx, child)?),
            "encryption" => ctx.once(&mut encryption, child)?,
            _ => return Err(ctx.unexpected(child)),
        }
    }
    if let Some(enc) = encryption {
        store.encryption = Some(read_encryption(ctx, enc)?);
    }
    Ok(store)
}

fn read_seclabel(ctx: &Ctx<'_, '_>, node: N<'_, '_>) -> Result<Seclabel, XmlError> {
    ctx.check_attributes(node, &["model", "relabel", "labelskip"])?;
    let mut label = Seclabel {
        model: node.attribute("model").map(str::to_owned),
        relabel: ctx.yes_no(node, "relabel")?,
        labelskip: ctx.yes_no(node, "labelskip")?,
        label: None,
    };
    let mut label_node = None;
    for child in ctx.element_children(node)? {
        if child.tag_name().name() != "label" {
            return Err(ctx.unexpected(child));
        }
        ctx.once(&mut label_node, child)?;
    }
    if let Some(l) = label_node {
        ctx.check_attributes(l, &[])?;
        label.label = Some(ctx.text(l)?);
    }
    // The grammar's three forms: relabel='no'; relabel='yes' (or absent) with an optional
    // <label>; or labelskip alone.
    if label.labelskip.is_some() && (label.relabel.is_some() || label.label.is_some()) {
        return Err(ctx.schema(node, "attribute 'labelskip' excludes 'relabel' and <label>"));
    }
    if label.relabel == Some(false) && label.label.is_some() {
        return Err(ctx.schema(node, "<label> requires relabel='yes'"));
    }
    Ok(label)
}

fn read_encryption(ctx: &Ctx<'_, '_>, node: N<'_, '_>) -> Result<Encryption, XmlError> {
    ctx.check_attributes(node, &["format", "engine"])?;
    let format = node
        .attribute("format")
        .ok_or_else(|| ctx.schema(node, "missing required attribute 'format'"))?;
    if !["default", "qcow", "luks", "luks2", "luks-any"].contains(&format) {
        return Err(ctx.schema(node, format!("invalid encryption format '{format}'")));
    }
    let engine = node.attribute("engine");
    if let Some(engine) = engine
        && !["qemu", "librbd"].contains(&engine)
    {
        return Err(ctx.schema(node, format!("invalid encryption engine '{engine}'")));
    }
    let (mut secret, mut cipher, mut ivgen) = (None, None, None);
    for child in ctx.element_children(node)? {
        if child.tag_name().name() == "ivgen" && cipher.is_none() {
            return Err(ctx.schema(child, "<ivgen> must follow <cipher>"));
        }
        let slot = match child.tag_name().name() {
            "secret" => &mut secret,
            "cipher" => &mut cipher,
            "ivgen" => &mut ivgen,
            _ => return Err(ctx.unexpected(child)),
        };
        ctx.once(slot, child)?;
    }
    let secret_node = secret.ok_or_else(|| ctx.schema(node, "<encryption> requires a <secret>"))?;
    ctx.check_empty(secret_node, &["type", "uuid", "usage"])?;
    if secret_node.attribute("type") != Some("passphrase") {
        return Err(ctx.schema(secret_node, "<secret> must have type='passphrase'"));
    }
    let secret = match (
        secret_node.attribute("uuid"),
        secret_node.attribute("usage"),
    ) {
        (Some(uuid), None) => SecretRef::Uuid(
            super::domain::canonical_uuid(uuid)
                .ok_or_else(|| ctx.schema(secret_node, format!("malformed uuid '{uuid}'")))?,
        ),
        (None, Some(usage)) if !usage.is_empty() => SecretRef::Usage(usage.to_owned()),
        _ => {
            return Err(ctx.schema(
                secret_node,
                "<secret> needs exactly one of 'uuid' and 'usage'",
            ));
        }
    };
    let cipher = match (cipher, ivgen) {
        (None, None) => None,
        (Some(c), Some(i)) => {
            ctx.check_empty(c, &["name", "size", "mode", "hash"])?;
            ctx.check_empty(i, &["name", "hash"])?;
            let required = |n: N<'_, '_>, attr: &str| -> Result<String, XmlError> {
                n.attribute(attr)
                    .map(str::to_owned)
                    .ok_or_else(|| ctx.schema(n, format!("missing required attribute '{attr}'")))
            };
            let size_text = required(c, "size")?;
            let size = ctx.unsigned(c, "attribute 'size'", &size_text)?;
            let size_bits = u32::try_from(size)
                .map_err(|_| ctx.schema(c, format!("cipher size '{size_text}' is out of range")))?;
            Some((
                Cipher {
                    name: required(c, "name")?,
                    size_bits,
                    mode: c.attribute("mode").map(str::to_owned),
                    hash: c.attribute("hash").map(str::to_owned),
                },
                Ivgen {
                    name: required(i, "name")?,
                    hash: i.attribute("hash").map(str::to_owned),
                },
            ))
        }
        (Some(n), None) | (None, Some(n)) => {
            return Err(ctx.schema(n, "<cipher> and <ivgen> must be given together"));
        }
    };
    Ok(Encryption {
        format: format.to_owned(),
        engine: engine.map(str::to_owned),
        secret,
        cipher,
    })
}
