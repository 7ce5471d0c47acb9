//! Alignment of checkpoint and backup definitions with domains (`testdata/xml/domain/`),
//! libvirt's rules one by one; aligned output and errors are snapshotted.
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use vbackup_core::model::DomainDef;
use vbackup_core::xml::{
    BackupDef, BackupDiskMode, CheckpointDef, CheckpointFormat, CheckpointKind, CheckpointMode,
    XmlErrorKind, align_backup, align_checkpoint, align_redefined_checkpoint, parse_domain,
};

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn domain(name: &str) -> DomainDef {
    parse_domain(&read(&format!("xml/domain/{name}.xml"))).unwrap()
}

fn backup(text: &str) -> BackupDef {
    BackupDef::parse(text).unwrap()
}

fn checkpoint(text: &str) -> CheckpointDef {
    CheckpointDef::parse(text, CheckpointMode::Create).unwrap()
}

const NO_DOMAIN: CheckpointFormat = CheckpointFormat {
    no_domain: true,
    include_size: false,
};

#[test]
fn domain_reader_understands_real_virsh_dumpxml() {
    let dom = domain("lab1-dumpxml");
    assert_eq!(dom.name, "lab1");
    assert_eq!(
        dom.uuid.as_deref(),
        Some("b4f6b492-6b54-46ba-b6ec-e27af378b3e6")
    );
    let targets: Vec<&str> = dom.disks.iter().map(|d| d.target.as_str()).collect();
    assert_eq!(targets, ["vda", "vdb"]);
    assert_eq!(
        dom.disks[0].layers[0].path.as_deref(),
        Some("/srv/lab/images/lab1-vda.qcow2")
    );
    assert_eq!(dom.disks[0].bus.as_deref(), Some("virtio"));
    let labraw = domain("labraw");
    assert_eq!(labraw.disks[1].layers[0].format.name(), "raw");
}

#[test]
fn domain_reader_follows_backing_chains_and_flags() {
    let dom = domain("mixed");
    let vda = dom.disk("vda").unwrap();
    let paths: Vec<_> = vda
        .layers
        .iter()
        .map(|l| l.path.as_deref().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/var/lib/images/mixed-vda.overlay2.qcow2",
            "/var/lib/images/mixed-vda.overlay1.qcow2",
            "/var/lib/images/mixed-vda.base.qcow2"
        ]
    );
    let indexes: Vec<_> = vda.layers.iter().map(|l| l.index).collect();
    assert_eq!(indexes, [Some(3), Some(2), Some(1)]);
    assert!(dom.disk("sda").unwrap().is_empty());
    assert!(dom.disk("vde").unwrap().readonly);
    assert_eq!(dom.disk("vdc").unwrap().layers[0].path, None);
}

#[test]
fn backup_all_generates_targets_named_after_the_source_and_suffix() {
    let aligned = align_backup(&backup("<domainbackup/>"), &domain("lab1"), "c7").unwrap();
    insta::assert_snapshot!(aligned.format());
    let vda = aligned.disks[0].backup.as_ref().unwrap();
    assert_eq!(
        vda.store.as_ref().map(|s| s.path.as_str()),
        Some("/srv/lab/images/lab1-vda.qcow2.c7")
    );
    assert_eq!(vda.mode, Some(BackupDiskMode::Full));
}

#[test]
fn backup_all_refuses_to_generate_names_for_non_file_disks() {
    let err = align_backup(&backup("<domainbackup/>"), &domain("mixed"), "1700000000").unwrap_err();
    assert_eq!(err.kind, XmlErrorKind::Alignment);
    insta::assert_snapshot!(err.to_string());
}

#[test]
fn backup_all_skips_empty_and_read_only_disks() {
    let text = "<domainbackup mode='pull'><incremental>c1</incremental>\
        <server transport='unix' socket='/run/b.sock'/></domainbackup>";
    // Only the file disks of `mixed` can get generated names: keep those and the skipped ones.
    let mut dom = domain("mixed");
    dom.disks
        .retain(|d| ["vda", "vdb", "sda", "vde"].contains(&d.target.as_str()));
    let aligned = align_backup(&backup(text), &dom, "c2").unwrap();
    insta::assert_snapshot!(aligned.format());
    let backed_up: Vec<_> = aligned
        .disks
        .iter()
        .map(|d| (d.name.as_str(), d.backup.is_some()))
        .collect();
    assert_eq!(
        backed_up,
        [("vda", true), ("vdb", true), ("sda", false), ("vde", false)]
    );
}

#[test]
fn listed_disks_come_first_and_unlisted_disks_are_not_backed_up() {
    let text = "<domainbackup><disks><disk name='vdb' type='file'>\
        <target file='/b/vdb.qcow2'/></disk></disks></domainbackup>";
    let aligned = align_backup(&backup(text), &domain("lab1"), "x").unwrap();
    insta::assert_snapshot!(aligned.format());
    assert_eq!(aligned.disks[0].name, "vdb");
    assert_eq!(aligned.disks[1].name, "vda");
    assert!(aligned.disks[1].backup.is_none());
}

#[test]
fn libvirt_pull_input_aligns_to_what_libvirt_reports() {
    let aligned = align_backup(
        &backup(&read("traces/libvirt-11.3/input-backup-pull-full.xml")),
        &domain("lab1"),
        "1795319800",
    )
    .unwrap();
    // libvirt's backup-dumpxml adds the export name and node index of the running job.
    let mut expected = backup(&read("traces/libvirt-11.3/backup-dumpxml-pull-full.xml"));
    let vda = expected.disks[0].backup.as_mut().unwrap();
    vda.export_name = None;
    vda.index = None;
    assert_eq!(aligned.format(), expected.format());
}

#[test]
fn global_incremental_is_inherited_unless_the_disk_is_full() {
    let text = read("xml/backup/valid/backupmode-full-overrides-global-incremental.xml");
    let aligned = align_backup(&backup(&text), &domain("lab1"), "s").unwrap();
    insta::assert_snapshot!(aligned.format());
    let vda = aligned.disks[0].backup.as_ref().unwrap();
    assert_eq!(
        (vda.mode, vda.incremental.as_deref()),
        (Some(BackupDiskMode::Full), None)
    );
    let vdb = aligned.disks[1].backup.as_ref().unwrap();
    assert_eq!(vdb.incremental.as_deref(), Some("c2"));

    let inherit = "<domainbackup><incremental>c1</incremental><disks>\
        <disk name='vda' type='file'><target file='/b/a'/></disk></disks></domainbackup>";
    let aligned = align_backup(&backup(inherit), &domain("lab1"), "s").unwrap();
    let vda = aligned.disks[0].backup.as_ref().unwrap();
    assert_eq!(
        (vda.mode, vda.incremental.as_deref()),
        (Some(BackupDiskMode::Incremental), Some("c1"))
    );
}

#[test]
fn listed_disk_without_target_gets_a_generated_name() {
    let text = read("xml/backup/valid/push-listed-without-target.xml");
    let aligned = align_backup(&backup(&text), &domain("lab1"), "c9").unwrap();
    insta::assert_snapshot!(aligned.format());
    let pull = read("xml/backup/valid/pull-bare-disk.xml");
    let aligned = align_backup(&backup(&pull), &domain("lab1"), "c9").unwrap();
    let scratch = aligned.disks[0]
        .backup
        .as_ref()
        .unwrap()
        .store
        .as_ref()
        .unwrap();
    assert_eq!(
        Some(scratch.path.as_str()),
        Some("/srv/lab/images/lab1-vda.qcow2.c9")
    );
    assert!(
        aligned
            .format()
            .contains("<scratch file='/srv/lab/images/lab1-vda.qcow2.c9'/>")
    );
}

fn backup_alignment_error(text: &str, dom: &str) -> String {
    let err = align_backup(&backup(text), &domain(dom), "s").unwrap_err();
    assert!(err.position.is_some(), "{err}");
    format!("{}: {err}", err.kind.name())
}

#[test]
fn backup_alignment_rejections() {
    let cases = [
        ("no_disks", "<domainbackup/>", "no-disks"),
        (
            "unknown_disk",
            "<domainbackup><disks><disk name='vdz' type='file'/></disks></domainbackup>",
            "lab1",
        ),
        (
            "duplicate_disk",
            "<domainbackup><disks><disk name='vda' type='file'/>\n<disk name='vda' backup='no'/></disks></domainbackup>",
            "lab1",
        ),
        (
            "incremental_without_checkpoint",
            "<domainbackup><disks><disk name='vda' type='file' backupmode='incremental'/></disks></domainbackup>",
            "lab1",
        ),
        (
            "disk_without_media",
            "<domainbackup><disks><disk name='sda' type='file'><target file='/b/x'/></disk></disks></domainbackup>",
            "mixed",
        ),
        (
            "listed_network_disk_without_target",
            "<domainbackup><disks><disk name='vdc' type='file'/></disks></domainbackup>",
            "mixed",
        ),
        (
            "block_disk_without_device",
            "<domainbackup><disks><disk name='vdd' type='block'/></disks></domainbackup>",
            "mixed",
        ),
    ];
    for (name, text, dom) in cases {
        insta::assert_snapshot!(
            format!("backup_rejects_{name}"),
            backup_alignment_error(text, dom)
        );
    }
}

#[test]
fn checkpoint_without_disks_tracks_every_writable_disk_with_media() {
    let mut def = checkpoint("<domaincheckpoint><name>c1</name></domaincheckpoint>");
    def.fill_create_defaults(100);
    let aligned = align_checkpoint(&def, &domain("mixed")).unwrap();
    insta::assert_snapshot!(aligned.format(NO_DOMAIN));
    let kinds: Vec<_> = aligned
        .disks
        .iter()
        .map(|d| (d.name.as_str(), d.checkpoint))
        .collect();
    assert_eq!(
        kinds,
        [
            ("vda", CheckpointKind::Bitmap),
            ("vdb", CheckpointKind::Bitmap),
            ("sda", CheckpointKind::No),
            ("vdc", CheckpointKind::Bitmap),
            ("vdd", CheckpointKind::Bitmap),
            ("vde", CheckpointKind::No),
        ]
    );
}

#[test]
fn checkpoint_disks_resolve_by_path_and_come_out_in_domain_order() {
    let text = "<domaincheckpoint><name>r1</name><disks>\
        <disk name='vdb' checkpoint='no'/>\
        <disk name='/srv/lab/images/labraw-vda.qcow2'/>\
        </disks></domaincheckpoint>";
    let aligned = align_checkpoint(&checkpoint(text), &domain("labraw")).unwrap();
    // The same result libvirt printed for checkpoint r1 of labraw (apart from parent and time).
    let expected = "<domaincheckpoint>\n  <name>r1</name>\n  <disks>\n    \
        <disk name='vda' checkpoint='bitmap' bitmap='r1'/>\n    \
        <disk name='vdb' checkpoint='no'/>\n  </disks>\n</domaincheckpoint>\n";
    assert_eq!(aligned.format(NO_DOMAIN), expected);
}

#[test]
fn checkpoint_alignment_rejections() {
    let cases = [
        (
            "no_disks",
            "<domaincheckpoint><name>a</name></domaincheckpoint>",
            "no-disks",
        ),
        (
            "too_many_disks",
            "<domaincheckpoint><name>a</name><disks><disk name='vda'/><disk name='vdb'/><disk name='vdc'/></disks></domaincheckpoint>",
            "lab1",
        ),
        (
            "unknown_disk",
            "<domaincheckpoint><name>a</name><disks><disk name='/nowhere.qcow2'/></disks></domaincheckpoint>",
            "lab1",
        ),
        (
            "duplicate_by_path",
            "<domaincheckpoint><name>a</name><disks><disk name='vda'/>\n  <disk name='/srv/lab/images/lab1-vda.qcow2' checkpoint='no'/></disks></domaincheckpoint>",
            "lab1",
        ),
        (
            "read_only_disk",
            "<domaincheckpoint><name>a</name><disks><disk name='vde'/></disks></domaincheckpoint>",
            "mixed",
        ),
        (
            "empty_disk",
            "<domaincheckpoint><name>a</name><disks><disk name='sda' checkpoint='bitmap'/></disks></domaincheckpoint>",
            "mixed",
        ),
    ];
    for (name, text, dom) in cases {
        let err = align_checkpoint(&checkpoint(text), &domain(dom)).unwrap_err();
        assert_eq!(err.kind, XmlErrorKind::Alignment);
        insta::assert_snapshot!(format!("checkpoint_rejects_{name}"), err.to_string());
    }
}

#[test]
fn checkpoint_without_name_cannot_be_aligned() {
    let err = align_checkpoint(&checkpoint("<domaincheckpoint/>"), &domain("lab1")).unwrap_err();
    assert_eq!(err.kind, XmlErrorKind::Invalid);
}

#[test]
fn redefine_aligns_with_the_embedded_domain_of_the_same_vm() {
    let text = read("traces/libvirt-11.3/input-checkpoint-redefine-c3.xml");
    let def = CheckpointDef::parse(&text, CheckpointMode::Redefine).unwrap();
    let aligned = align_redefined_checkpoint(&def, &domain("lab1")).unwrap();
    assert_eq!(aligned, def, "libvirt's own output is already aligned");
}

#[test]
fn redefine_refuses_a_domain_with_another_uuid() {
    let text = read("traces/libvirt-11.3/input-checkpoint-redefine-c3.xml");
    let def = CheckpointDef::parse(&text, CheckpointMode::Redefine).unwrap();
    let err = align_redefined_checkpoint(&def, &domain("mixed")).unwrap_err();
    assert_eq!(err.kind, XmlErrorKind::Alignment);
    insta::assert_snapshot!(err.to_string());
}

#[test]
fn redefine_without_domain_only_defaults_bitmap_names() {
    let text = "<domaincheckpoint><name>c4</name><creationTime>9</creationTime>\
        <disks><disk name='vda'/><disk name='vdz' checkpoint='no'/></disks></domaincheckpoint>";
    let def = CheckpointDef::parse(text, CheckpointMode::Redefine).unwrap();
    let aligned = align_redefined_checkpoint(&def, &domain("lab1")).unwrap();
    assert_eq!(aligned.disks[0].bitmap.as_deref(), Some("c4"));
    assert_eq!(aligned.disks[1].name, "vdz");
    assert_eq!(aligned.disks.len(), 2);
}

#[test]
fn redefine_requires_name_and_creation_time_even_for_built_definitions() {
    let def = CheckpointDef {
        name: Some("x".into()),
        ..CheckpointDef::default()
    };
    let err = align_redefined_checkpoint(&def, &domain("lab1")).unwrap_err();
    assert_eq!(err.kind, XmlErrorKind::Invalid);
    assert!(err.message.contains("creationTime"));
}

/// Thousands of disks: parsing, alignment and formatting stay linear (a quadratic step would
/// make this test take minutes instead of a fraction of a second).
#[test]
fn documents_with_thousands_of_disks_parse_align_and_format() {
    let n = 1500;
    let mut domain_xml = String::from("<domain type='kvm'>\n  <name>big</name>\n  <devices>\n");
    let mut backup_xml = String::from("<domainbackup mode='push'>\n  <disks>\n");
    let mut checkpoint_xml = String::from("<domaincheckpoint>\n  <name>c</name>\n  <disks>\n");
    for i in 0..n {
        domain_xml.push_str(&format!(
            "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
             <source file='/i/vd{i}.qcow2'/><target dev='vd{i}'/></disk>\n"
        ));
        backup_xml.push_str(&format!("    <disk name='vd{i}' type='file'/>\n"));
        checkpoint_xml.push_str(&format!("    <disk name='/i/vd{i}.qcow2'/>\n"));
    }
    domain_xml.push_str("  </devices>\n</domain>\n");
    backup_xml.push_str("  </disks>\n</domainbackup>\n");
    checkpoint_xml.push_str("  </disks>\n</domaincheckpoint>\n");

    let dom = parse_domain(&domain_xml).unwrap();
    assert_eq!(dom.disks.len(), n);
    let aligned = align_backup(&backup(&backup_xml), &dom, "s").unwrap();
    assert_eq!(aligned.disks.len(), n);
    let last = aligned.disks[n - 1].backup.as_ref().unwrap();
    assert_eq!(
        last.store.as_ref().map(|s| s.path.as_str()),
        Some(format!("/i/vd{}.qcow2.s", n - 1).as_str())
    );
    assert_eq!(BackupDef::parse(&aligned.format()).unwrap(), aligned);
    let aligned = align_checkpoint(&checkpoint(&checkpoint_xml), &dom).unwrap();
    assert!(
        aligned
            .disks
            .iter()
            .all(|d| d.bitmap.as_deref() == Some("c"))
    );
}
