//! `<managedbackup>`: the stored description of a managed backup, in the same canonical style as
//! the libvirt documents (two-space indentation, single-quoted attributes).
//!
//! ```xml
//! <managedbackup>
//!   <uuid>0f6b...</uuid>
//!   <domain>vm1</domain>
//!   <parent>
//!     <uuid>5c1a...</uuid>
//!   </parent>
//!   <checkpoint>c2</checkpoint>
//!   <description>nightly</description>
//!   <creationTime>1700000000</creationTime>
//!   <sequence>7</sequence>
//!   <mode>incremental</mode>
//!   <disks>
//!     <disk name='vda' path='/b/vda.qcow2' format='qcow2' virtualSize='1048576' allocatedSize='196608' digest='sha256:...'/>
//!   </disks>
//! </managedbackup>
//! ```
//!
//! Parsing validates the document against `schemas/managedbackup.rng`, then checks every
//! element and attribute again with positioned errors (so the rules hold whatever the grammar
//! says), then the record's own rules ([`ManagedBackup::check`]). Formatting then parsing gives
//! the same record.

use super::record::{BackupImage, BackupKind, Digest, ManagedBackup};
use crate::model::ImageFormat;
use std::sync::OnceLock;

use crate::xml::document::{Ctx, N, load};
use crate::xml::error::{XmlError, XmlErrorKind};
use crate::xml::relaxng::{Schema, SchemaError};
use crate::xml::schema_error;
use crate::xml::writer::Writer;

const ROOT: &str = "managedbackup";

/// The grammar's RELAX NG source.
pub const GRAMMAR: &str = include_str!("../../../schemas/managedbackup.rng");

/// The compiled grammar, compiled on first use.
fn grammar() -> Result<&'static Schema, &'static SchemaError> {
    static SCHEMA: OnceLock<Result<Schema, SchemaError>> = OnceLock::new();
    SCHEMA.get_or_init(|| Schema::compile(GRAMMAR)).as_ref()
}

fn validate(doc: &roxmltree::Document<'_>) -> Result<(), XmlError> {
    let violations = match grammar() {
        Ok(schema) => match schema.validate(doc) {
            Ok(()) => return Ok(()),
            Err(v) => v,
        },
        Err(e) => {
            return Err(XmlError {
                kind: XmlErrorKind::Schema,
                position: None,
                path: "/".into(),
                message: format!("grammar managedbackup does not compile: {e}"),
            });
        }
    };
    Err(schema_error(violations))
}

impl ManagedBackup {
    /// The canonical `<managedbackup>` document (ending with a newline).
    pub fn format(&self) -> String {
        let mut w = Writer::new();
        w.tag(ROOT).open();
        w.text_element("uuid", &self.uuid);
        w.text_element("domain", &self.domain);
        if let Some(parent) = &self.parent {
            w.tag("parent").open();
            w.text_element("uuid", parent);
            w.end("parent");
        }
        if let Some(checkpoint) = &self.checkpoint {
            w.text_element("checkpoint", checkpoint);
        }
        if let Some(description) = &self.description {
            w.text_element("description", description);
        }
        w.text_element("creationTime", &self.creation_time.to_string());
        if let Some(sequence) = self.sequence {
            w.text_element("sequence", &sequence.to_string());
        }
        w.text_element("mode", self.kind.name());
        w.tag("disks").open();
        for image in &self.disks {
            w.tag("disk")
                .attr("name", &image.disk)
                .attr("path", &image.path)
                .attr("format", image.format.name())
                .attr("virtualSize", &image.virtual_size_bytes.to_string())
                .attr("allocatedSize", &image.allocated_size_bytes.to_string())
                .attr("digest", image.digest.as_str())
                .empty();
        }
        w.end("disks");
        w.end(ROOT);
        w.finish()
    }

    /// Parses a `<managedbackup>` document.
    pub fn parse(text: &str) -> Result<Self, XmlError> {
        let doc = load(text)?;
        validate(&doc)?;
        let ctx = Ctx::new(&doc);
        let root = doc.root_element();
        ctx.expect_root(root, ROOT)?;
        ctx.check_attributes(root, &[])?;
        let mut slots: [Option<N<'_, '_>>; 9] = [None; 9];
        const NAMES: [&str; 9] = [
            "uuid",
            "domain",
            "parent",
            "checkpoint",
            "description",
            "creationTime",
            "mode",
            "disks",
            "sequence",
        ];
        for child in ctx.element_children(root)? {
            let Some(i) = NAMES.iter().position(|n| *n == child.tag_name().name()) else {
                return Err(ctx.unexpected(child));
            };
            ctx.once(&mut slots[i], child)?;
        }
        let [
            uuid,
            domain,
            parent,
            checkpoint,
            description,
            time,
            mode,
            disks,
            sequence,
        ] = slots;
        let required = |slot, name| required(&ctx, root, slot, name);
        let plain_text = |node: N<'_, '_>| -> Result<String, XmlError> {
            ctx.check_attributes(node, &[])?;
            ctx.text(node)
        };
        let uuid_node = required(uuid, "uuid")?;
        let uuid = plain_text(uuid_node)?;
        let domain = plain_text(required(domain, "domain")?)?;
        let parent = match parent {
            Some(node) => {
                ctx.check_attributes(node, &[])?;
                let children = ctx.element_children(node)?;
                let [inner] = children.as_slice() else {
                    return Err(ctx.schema(node, "<parent> must hold exactly one <uuid>"));
                };
                if inner.tag_name().name() != "uuid" {
                    return Err(ctx.unexpected(*inner));
                }
                Some(plain_text(*inner)?)
            }
            None => None,
        };
        let checkpoint = checkpoint.map(plain_text).transpose()?;
        let description = description.map(plain_text).transpose()?;
        let time_node = required(time, "creationTime")?;
        let creation_time = ctx.unsigned(time_node, "<creationTime>", &plain_text(time_node)?)?;
        let sequence = match sequence {
            Some(node) => Some(ctx.unsigned(node, "<sequence>", &plain_text(node)?)?),
            None => None,
        };
        let mode_node = required(mode, "mode")?;
        let mode_text = plain_text(mode_node)?;
        let kind = BackupKind::from_name(&mode_text).ok_or_else(|| {
            ctx.schema(
                mode_node,
                format!("invalid mode '{mode_text}' (expected full or incremental)"),
            )
        })?;
        let disks_node = required(disks, "disks")?;
        ctx.check_attributes(disks_node, &[])?;
        let mut images = Vec::new();
        for disk in ctx.element_children(disks_node)? {
            if disk.tag_name().name() != "disk" {
                return Err(ctx.unexpected(disk));
            }
            images.push(read_disk(&ctx, disk)?);
        }
        let record = ManagedBackup {
            uuid,
            domain,
            parent,
            checkpoint,
            creation_time,
            sequence,
            description,
            kind,
            disks: images,
        };
        record
            .check()
            .map_err(|e| ctx.err(XmlErrorKind::Invalid, uuid_node, e.to_string()))?;
        Ok(record)
    }
}

fn required<'a, 'i>(
    ctx: &Ctx<'a, 'i>,
    root: N<'a, 'i>,
    slot: Option<N<'a, 'i>>,
    name: &str,
) -> Result<N<'a, 'i>, XmlError> {
    slot.ok_or_else(|| ctx.schema(root, format!("missing required element <{name}>")))
}

fn read_disk(ctx: &Ctx<'_, '_>, node: N<'_, '_>) -> Result<BackupImage, XmlError> {
    const ATTRS: [&str; 6] = [
        "name",
        "path",
        "format",
        "virtualSize",
        "allocatedSize",
        "digest",
    ];
    ctx.check_empty(node, &ATTRS)?;
    let attr = |name: &str| {
        node.attribute(name)
            .ok_or_else(|| ctx.schema(node, format!("missing required attribute '{name}'")))
    };
    let size = |name: &str| -> Result<u64, XmlError> {
        ctx.unsigned(node, &format!("attribute '{name}'"), attr(name)?)
    };
    let digest_text = attr("digest")?;
    let digest = Digest::parse(digest_text).ok_or_else(|| {
        ctx.schema(
            node,
            format!(
                "invalid digest '{digest_text}' (expected sha256:, sha256-tree: or blake3-tree: and 64 lowercase hex digits)"
            ),
        )
    })?;
    Ok(BackupImage {
        disk: attr("name")?.to_owned(),
        path: attr("path")?.to_owned(),
        format: ImageFormat::from_name(attr("format")?),
        virtual_size_bytes: size("virtualSize")?,
        allocated_size_bytes: size("allocatedSize")?,
        digest,
    })
}
