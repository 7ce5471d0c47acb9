//! A minimal reader of libvirt `<domain>` XML into [`DomainDef`]: the name, the uuid and the
//! disks (type, device, format, source, target, read-only, transient, backing chain).
//!
//! It reads what `virsh dumpxml` prints and ignores everything else in the document, so it
//! works on real, full domain definitions. It does not validate the rest of the domain.

use super::document::{Ctx, N, load};
use super::error::{XmlError, XmlErrorKind};
use super::names;
use crate::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};

/// Longest backing chain read from a `<domain>`; longer chains are refused rather than walked.
pub const MAX_BACKING_CHAIN: usize = 200;

/// Parses a `<domain>` document.
pub fn parse_domain(text: &str) -> Result<DomainDef, XmlError> {
    let doc = load(text)?;
    let ctx = Ctx::new(&doc);
    read_domain(&ctx, doc.root_element())
}

/// Reads a `<domain>` element (a whole document's root, or one embedded in a checkpoint).
pub fn read_domain(ctx: &Ctx<'_, '_>, node: N<'_, '_>) -> Result<DomainDef, XmlError> {
    ctx.expect_root(node, "domain")?;
    let mut name = None;
    let mut uuid = None;
    let mut disks = Vec::new();
    for child in node.children().filter(|c| c.is_element()) {
        match child.tag_name().name() {
            "name" => {
                let text = ctx.text(child)?;
                names::validate_domain_name(&text).map_err(|e| {
                    ctx.err(
                        XmlErrorKind::Invalid,
                        child,
                        format!("domain name '{text}' {e}"),
                    )
                })?;
                name = Some(text);
            }
            "uuid" => {
                let text = ctx.text(child)?;
                uuid = Some(canonical_uuid(&text).ok_or_else(|| {
                    ctx.err(
                        XmlErrorKind::Invalid,
                        child,
                        format!("malformed uuid '{text}'"),
                    )
                })?);
            }
            "devices" => {
                for dev in child.children().filter(|c| c.is_element()) {
                    if dev.tag_name().name() == "disk" {
                        disks.push(read_disk(ctx, dev)?);
                    }
                }
            }
            _ => {}
        }
    }
    let name = name.ok_or_else(|| ctx.err(XmlErrorKind::Invalid, node, "domain has no <name>"))?;
    Ok(DomainDef { name, uuid, disks })
}

/// Lowercase, dashed form of a uuid given with or without dashes; `None` if it is not one.
pub fn canonical_uuid(text: &str) -> Option<String> {
    let hex: String = text
        .trim()
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

fn storage_type(ctx: &Ctx<'_, '_>, node: N<'_, '_>) -> Result<StorageType, XmlError> {
    Ok(match node.attribute("type").unwrap_or("file") {
        "file" => StorageType::File,
        "block" => StorageType::Block,
        "dir" => StorageType::Dir,
        "network" => StorageType::Network,
        "volume" => StorageType::Volume,
        "nvme" => StorageType::Nvme,
        "vhostuser" => StorageType::Vhostuser,
        other => {
            return Err(ctx.err(
                XmlErrorKind::Unsupported,
                node,
                format!("unsupported disk storage type '{other}'"),
            ));
        }
    })
}

/// The image path of a `<source>` for its storage type; `None` for sources without a local path.
fn source_path(storage: StorageType, source: N<'_, '_>) -> Option<String> {
    let attr = match storage {
        StorageType::File => "file",
        StorageType::Block => "dev",
        StorageType::Dir => "dir",
        _ => return None,
    };
    source.attribute(attr).map(str::to_owned)
}

fn index_attr(ctx: &Ctx<'_, '_>, node: N<'_, '_>) -> Result<Option<u32>, XmlError> {
    match node.attribute("index") {
        None => Ok(None),
        Some(text) => {
            let value = ctx.unsigned(node, "attribute 'index'", text)?;
            u32::try_from(value)
                .map(Some)
                .map_err(|_| ctx.schema(node, format!("index '{text}' is out of range")))
        }
    }
}

/// Builds a layer from an element holding `type`, a format child and `<source>`; `None` when
/// the element describes no media.
fn read_layer(
    ctx: &Ctx<'_, '_>,
    node: N<'_, '_>,
    format_element: &str,
) -> Result<Option<Layer>, XmlError> {
    let storage = storage_type(ctx, node)?;
    let source = node
        .children()
        .find(|c| c.is_element() && c.tag_name().name() == "source");
    let Some(source) = source else {
        return Ok(None);
    };
    let path = source_path(storage, source);
    let has_media = match storage {
        StorageType::File | StorageType::Block | StorageType::Dir => path.is_some(),
        _ => true,
    };
    if !has_media {
        return Ok(None);
    }
    let format = node
        .children()
        .find(|c| c.is_element() && c.tag_name().name() == format_element)
        .and_then(|d| d.attribute("type"))
        // libvirt never probes formats: an unspecified format is raw.
        .map_or(ImageFormat::Raw, ImageFormat::from_name);
    let index = match index_attr(ctx, source)? {
        Some(i) => Some(i),
        None => index_attr(ctx, node)?,
    };
    Ok(Some(Layer {
        storage,
        format,
        path,
        index,
        node_name: None,
    }))
}

fn read_disk(ctx: &Ctx<'_, '_>, node: N<'_, '_>) -> Result<DiskDef, XmlError> {
    let device = match node.attribute("device").unwrap_or("disk") {
        "disk" => DiskDevice::Disk,
        "cdrom" => DiskDevice::Cdrom,
        "floppy" => DiskDevice::Floppy,
        "lun" => DiskDevice::Lun,
        other => {
            return Err(ctx.err(
                XmlErrorKind::Unsupported,
                node,
                format!("unsupported disk device '{other}'"),
            ));
        }
    };
    let child = |name: &str| {
        node.children()
            .find(|c| c.is_element() && c.tag_name().name() == name)
    };
    let target_node = child("target")
        .ok_or_else(|| ctx.err(XmlErrorKind::Invalid, node, "disk has no <target>"))?;
    let target = target_node
        .attribute("dev")
        .ok_or_else(|| {
            ctx.err(
                XmlErrorKind::Invalid,
                target_node,
                "disk target has no 'dev' attribute",
            )
        })?
        .to_owned();
    let bus = target_node.attribute("bus").map(str::to_owned);
    let mut layers = Vec::new();
    if let Some(top) = read_layer(ctx, node, "driver")? {
        layers.push(top);
        let mut next = child("backingStore");
        while let Some(backing) = next {
            if layers.len() >= MAX_BACKING_CHAIN {
                return Err(ctx.err(
                    XmlErrorKind::Limit,
                    backing,
                    format!("backing chain is longer than {MAX_BACKING_CHAIN} images"),
                ));
            }
            match read_layer(ctx, backing, "format")? {
                Some(layer) => layers.push(layer),
                None => break,
            }
            next = backing
                .children()
                .find(|c| c.is_element() && c.tag_name().name() == "backingStore");
        }
    }
    Ok(DiskDef {
        target,
        device,
        bus,
        readonly: child("readonly").is_some(),
        transient: child("transient").is_some(),
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_disks_with_backing_chain_and_flags() {
        let text = "<domain type='kvm'><name>vm1</name>\
            <uuid>B4F6B4926B5446BAB6ECE27AF378B3E6</uuid><devices>\
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
              <source file='/i/top.qcow2' index='3'/>\
              <backingStore type='file' index='2'><format type='qcow2'/><source file='/i/mid.qcow2'/>\
                <backingStore type='block' index='1'><format type='raw'/><source dev='/dev/sdz'/><backingStore/></backingStore>\
              </backingStore>\
              <target dev='vda' bus='virtio'/></disk>\
            <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>\
            <disk type='network' device='disk'><driver type='raw'/><source protocol='nbd' name='x'/>\
              <target dev='vdb'/><transient/></disk>\
            </devices></domain>";
        let dom = parse_domain(text).unwrap();
        assert_eq!(dom.name, "vm1");
        assert_eq!(
            dom.uuid.as_deref(),
            Some("b4f6b492-6b54-46ba-b6ec-e27af378b3e6")
        );
        let vda = dom.disk("vda").unwrap();
        assert_eq!(vda.layers.len(), 3);
        assert_eq!(vda.layers[0].index, Some(3));
        assert_eq!(vda.layers[1].path.as_deref(), Some("/i/mid.qcow2"));
        assert_eq!(vda.layers[2].storage, StorageType::Block);
        assert_eq!(vda.layers[2].format, ImageFormat::Raw);
        let sda = dom.disk("sda").unwrap();
        assert!(sda.readonly && sda.is_empty());
        assert_eq!(sda.device, DiskDevice::Cdrom);
        let vdb = dom.disk("vdb").unwrap();
        assert!(vdb.transient && !vdb.is_empty());
        assert_eq!(vdb.layers[0].path, None);
    }

    #[test]
    fn domain_name_that_escapes_a_directory_is_refused() {
        let err = parse_domain("<domain><name>../etc</name></domain>").unwrap_err();
        assert_eq!(err.kind, XmlErrorKind::Invalid);
        assert_eq!(err.path, "/domain/name");
    }
}
