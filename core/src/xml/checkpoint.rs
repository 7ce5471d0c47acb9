//! `<domaincheckpoint>`: the typed definition, its parser (grammar, then libvirt's parser rules)
//! and its formatter in libvirt's canonical form.
//!
//! Output order is name, description, parent, creationTime, disks, domain. A disk prints
//! `name`, `checkpoint`, `bitmap` (when set) and `size` (only when asked for). The embedded
//! `<domain>` is kept as text, re-indented to its nesting level when formatted.

use super::document::{Ctx, N, load};
use super::error::{Origin, XmlError, XmlErrorKind};
use super::schema::{self, Grammar};
use super::schema_error;
use super::writer::Writer;

/// Whether a disk takes part in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CheckpointKind {
    /// `checkpoint='no'`: the disk is not tracked.
    No,
    /// `checkpoint='bitmap'`: a persistent dirty bitmap tracks the disk.
    Bitmap,
}

impl CheckpointKind {
    /// The XML spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::No => "no",
            Self::Bitmap => "bitmap",
        }
    }
}

/// One `<disk>` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointDiskDef {
    /// Disk target (`vda`) or, before alignment, possibly the absolute path of its source.
    pub name: String,
    /// Whether the disk is tracked; a listed disk without the attribute is tracked.
    pub checkpoint: CheckpointKind,
    /// Name of the bitmap; defaults to the checkpoint name on alignment.
    pub bitmap: Option<String>,
    /// Bytes dirtied since the checkpoint (output only, printed with [`CheckpointFormat::include_size`]).
    pub size_bytes: Option<u64>,
    /// Where the element was read from.
    pub origin: Origin,
}

/// A `<domaincheckpoint>` definition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckpointDef {
    /// Checkpoint name; absent in a create request until [`CheckpointDef::fill_create_defaults`].
    pub name: Option<String>,
    /// Free-form description.
    pub description: Option<String>,
    /// Name of the parent checkpoint.
    pub parent: Option<String>,
    /// Creation time in seconds since the Unix epoch.
    pub creation_time: Option<u64>,
    /// Listed disks; empty means `<disks>` was omitted (the grammar forbids an empty `<disks>`).
    pub disks: Vec<CheckpointDiskDef>,
    /// The embedded `<domain>` element, verbatim, indented as if it were a document of its own.
    pub domain_xml: Option<String>,
    /// Where the root element was read from.
    pub origin: Origin,
}

/// How a checkpoint document is to be read, as libvirt's create flags decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointMode {
    /// A new checkpoint: `<creationTime>`, `<parent>` and `<domain>` are ignored (dropped).
    Create,
    /// Re-inserting stored metadata: a name and a creation time are required, and an embedded
    /// `<domain>` must be readable.
    Redefine,
    /// Read everything the document says, with no create or redefine requirement (formatting,
    /// validation).
    Document,
}

/// Options of [`CheckpointDef::format`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckpointFormat {
    /// Leave out the embedded `<domain>` (libvirt's `NO_DOMAIN`).
    pub no_domain: bool,
    /// Print each disk's `size` when known (libvirt's `SIZE`).
    pub include_size: bool,
}

const ROOT: &str = "domaincheckpoint";

impl CheckpointDef {
    /// Parses and validates a `<domaincheckpoint>` document.
    pub fn parse(text: &str, mode: CheckpointMode) -> Result<Self, XmlError> {
        let doc = load(text)?;
        if let Err(violations) = schema::validate(&doc, Grammar::Checkpoint) {
            return Err(schema_error(violations));
        }
        let ctx = Ctx::new(&doc);
        read_checkpoint(&ctx, text, doc.root_element(), mode)
    }

    /// Fills what libvirt fills for a new checkpoint: the creation time, and the name (the
    /// creation time in decimal) when none was given.
    pub fn fill_create_defaults(&mut self, now_s: u64) {
        self.creation_time = Some(now_s);
        if self.name.is_none() {
            self.name = Some(now_s.to_string());
        }
    }

    /// Formats the definition in libvirt's canonical form (ending with a newline).
    pub fn format(&self, options: CheckpointFormat) -> String {
        let mut w = Writer::new();
        let has_children = self.name.is_some()
            || self.description.is_some()
            || self.parent.is_some()
            || self.creation_time.is_some()
            || !self.disks.is_empty()
            || (self.domain_xml.is_some() && !options.no_domain);
        if !has_children {
            w.tag(ROOT).empty();
            return w.finish();
        }
        w.tag(ROOT).open();
        if let Some(name) = &self.name {
            w.text_element("name", name);
        }
        if let Some(description) = &self.description {
            w.text_element("description", description);
        }
        if let Some(parent) = &self.parent {
            w.tag("parent").open();
            w.text_element("name", parent);
            w.end("parent");
        }
        if let Some(time) = self.creation_time {
            w.text_element("creationTime", &time.to_string());
        }
        if !self.disks.is_empty() {
            w.tag("disks").open();
            for disk in &self.disks {
                let size = disk
                    .size_bytes
                    .filter(|_| options.include_size)
                    .map(|s| s.to_string());
                w.tag("disk")
                    .attr("name", &disk.name)
                    .attr("checkpoint", disk.checkpoint.name())
                    .attr_opt("bitmap", disk.bitmap.as_deref())
                    .attr_opt("size", size.as_deref())
                    .empty();
            }
            w.end("disks");
        }
        if let Some(domain) = self.domain_xml.as_deref().filter(|_| !options.no_domain) {
            let indent = w.indent();
            w.raw(&super::embedded::indent(domain, &indent));
        }
        w.end(ROOT);
        w.finish()
    }
}

pub(crate) fn read_checkpoint(
    ctx: &Ctx<'_, '_>,
    text: &str,
    root: N<'_, '_>,
    mode: CheckpointMode,
) -> Result<CheckpointDef, XmlError> {
    ctx.expect_root(root, ROOT)?;
    ctx.check_attributes(root, &[])?;
    let (mut name, mut description, mut parent, mut time, mut disks, mut domain) =
        (None, None, None, None, None, None);
    for child in ctx.element_children(root)? {
        let slot = match child.tag_name().name() {
            "name" => &mut name,
            "description" => &mut description,
            "parent" => &mut parent,
            "creationTime" => &mut time,
            "disks" => &mut disks,
            "domain" => &mut domain,
            _ => return Err(ctx.unexpected(child)),
        };
        ctx.once(slot, child)?;
    }
    let mut def = CheckpointDef {
        origin: ctx.origin(root),
        ..CheckpointDef::default()
    };
    if let Some(node) = name {
        ctx.check_attributes(node, &[])?;
        let value = ctx.text(node)?;
        def.name = Some(ctx.checkpoint_name(node, "checkpoint name", &value)?);
    }
    if let Some(node) = description {
        ctx.check_attributes(node, &[])?;
        def.description = Some(ctx.text(node)?);
    }
    if let Some(node) = parent {
        ctx.check_attributes(node, &[])?;
        let children = ctx.element_children(node)?;
        let [pname] = children.as_slice() else {
            return Err(ctx.schema(node, "<parent> must hold exactly one <name>"));
        };
        if pname.tag_name().name() != "name" {
            return Err(ctx.unexpected(*pname));
        }
        ctx.check_attributes(*pname, &[])?;
        let value = ctx.text(*pname)?;
        def.parent = Some(ctx.checkpoint_name(*pname, "parent checkpoint name", &value)?);
    }
    if let Some(node) = time {
        ctx.check_attributes(node, &[])?;
        let value = ctx.text(node)?;
        def.creation_time = Some(ctx.unsigned(node, "<creationTime>", &value)?);
    }
    if let Some(node) = disks {
        def.disks = ctx.disks(node, |disk| read_disk(ctx, disk))?;
    }
    if let Some(node) = domain {
        if mode == CheckpointMode::Redefine {
            // Read now so that an unusable <domain> is reported against this document.
            super::domain::read_domain(ctx, node)?;
        }
        def.domain_xml = Some(super::embedded::extract(text, node));
    }
    match mode {
        CheckpointMode::Create => {
            def.creation_time = None;
            def.parent = None;
            def.domain_xml = None;
        }
        CheckpointMode::Redefine => {
            if def.name.is_none() {
                return Err(ctx.err(
                    XmlErrorKind::Invalid,
                    root,
                    "a redefined checkpoint must have a name",
                ));
            }
            if def.creation_time.is_none() {
                return Err(ctx.err(
                    XmlErrorKind::Invalid,
                    root,
                    "a redefined checkpoint must have a <creationTime>",
                ));
            }
        }
        CheckpointMode::Document => {}
    }
    Ok(def)
}

/// A backup or checkpoint disk name of libvirt's `diskTarget` form (`vda`, `sdb`, `xvda1`...).
pub fn is_valid_disk_target(name: &str) -> bool {
    let rest = name.strip_prefix("ioemu:").unwrap_or(name);
    ["xvd", "ubd", "fd", "hd", "sd", "vd"]
        .iter()
        .find_map(|p| rest.strip_prefix(p))
        .is_some_and(|suffix| {
            !suffix.is_empty()
                && suffix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

fn read_disk(ctx: &Ctx<'_, '_>, node: N<'_, '_>) -> Result<CheckpointDiskDef, XmlError> {
    ctx.check_empty(node, &["name", "checkpoint", "bitmap", "size"])?;
    let name = node
        .attribute("name")
        .ok_or_else(|| ctx.schema(node, "missing required attribute 'name'"))?;
    if !is_valid_disk_target(name) && !super::document::is_absolute_path(name) {
        return Err(ctx.schema(
            node,
            format!("disk name '{name}' is neither a disk target nor an absolute path"),
        ));
    }
    let checkpoint = match node.attribute("checkpoint") {
        None | Some("bitmap") => CheckpointKind::Bitmap,
        Some("no") => CheckpointKind::No,
        Some(other) => {
            return Err(ctx.schema(
                node,
                format!(
                    "invalid value '{other}' for attribute 'checkpoint' (expected no or bitmap)"
                ),
            ));
        }
    };
    let bitmap = node.attribute("bitmap").map(str::to_owned);
    if let Some(bitmap) = &bitmap {
        if checkpoint == CheckpointKind::No {
            return Err(ctx.schema(node, "attribute 'bitmap' requires checkpoint='bitmap'"));
        }
        if bitmap.is_empty() || bitmap.chars().any(char::is_control) {
            return Err(ctx.schema(node, format!("invalid bitmap name '{bitmap}'")));
        }
    }
    if checkpoint == CheckpointKind::No && node.attribute("size").is_some() {
        return Err(ctx.schema(node, "attribute 'size' requires checkpoint='bitmap'"));
    }
    let size_bytes = match node.attribute("size") {
        Some(text) => Some(ctx.unsigned(node, "attribute 'size'", text)?),
        None => None,
    };
    Ok(CheckpointDiskDef {
        name: name.to_owned(),
        checkpoint,
        bitmap,
        size_bytes,
        origin: ctx.origin(node),
    })
}
