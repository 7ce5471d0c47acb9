//! The XML test corpus (`testdata/xml/`): every valid file parses, formats to its snapshotted
//! canonical form and round-trips; every invalid file fails with its snapshotted, positioned
//! error. libvirt's own output (`testdata/traces/libvirt-11.3/`) formats back byte for byte.
// Tests read their fixtures from disk; the core's no-IO rule is about the library.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use vbackup_core::xml::{
    BackupDef, CheckpointDef, CheckpointFormat, CheckpointMode, XmlErrorKind, validate_document,
};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

/// The `.xml` files of a directory, sorted, with their stems.
fn files(dir: &str) -> Vec<(String, String)> {
    let dir = testdata().join(dir);
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            (stem, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no files in {}", dir.display());
    out
}

const ALL: CheckpointFormat = CheckpointFormat {
    no_domain: false,
    include_size: true,
};

fn checkpoint_mode(stem: &str) -> CheckpointMode {
    if stem.starts_with("redefine") {
        CheckpointMode::Redefine
    } else {
        CheckpointMode::Document
    }
}

#[test]
fn valid_checkpoints_format_canonically_and_round_trip() {
    for (stem, text) in files("xml/checkpoint/valid") {
        let mode = checkpoint_mode(&stem);
        let def = CheckpointDef::parse(&text, mode).unwrap_or_else(|e| panic!("{stem}: {e}"));
        let formatted = def.format(ALL);
        insta::assert_snapshot!(format!("checkpoint_valid__{stem}"), formatted);
        let again =
            CheckpointDef::parse(&formatted, mode).unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert_eq!(again, def, "{stem}: parse(format(x)) differs");
        assert_eq!(
            again.format(ALL),
            formatted,
            "{stem}: formatting is not a fixpoint"
        );
        if stem.ends_with("canonical") {
            assert_eq!(
                formatted, text,
                "{stem}: canonical file does not format to itself"
            );
        }
        assert!(validate_document(&text).is_ok(), "{stem}");
    }
}

#[test]
fn invalid_checkpoints_fail_with_positioned_errors() {
    for (stem, text) in files("xml/checkpoint/invalid") {
        let err = CheckpointDef::parse(&text, checkpoint_mode(&stem))
            .expect_err(&format!("{stem}: accepted"));
        assert!(err.position.is_some(), "{stem}: no position in {err}");
        insta::assert_snapshot!(
            format!("checkpoint_invalid__{stem}"),
            format!("{}: {err}", err.kind.name())
        );
    }
}

#[test]
fn valid_backups_format_canonically_and_round_trip() {
    for (stem, text) in files("xml/backup/valid") {
        let def = BackupDef::parse(&text).unwrap_or_else(|e| panic!("{stem}: {e}"));
        let formatted = def.format();
        insta::assert_snapshot!(format!("backup_valid__{stem}"), formatted);
        let again = BackupDef::parse(&formatted).unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert_eq!(again, def, "{stem}: parse(format(x)) differs");
        assert_eq!(
            again.format(),
            formatted,
            "{stem}: formatting is not a fixpoint"
        );
        if stem.ends_with("canonical") {
            assert_eq!(
                formatted, text,
                "{stem}: canonical file does not format to itself"
            );
        }
        assert!(validate_document(&text).is_ok(), "{stem}");
    }
}

#[test]
fn invalid_backups_fail_with_positioned_errors() {
    for (stem, text) in files("xml/backup/invalid") {
        let err = BackupDef::parse(&text).expect_err(&format!("{stem}: accepted"));
        assert!(err.position.is_some(), "{stem}: no position in {err}");
        insta::assert_snapshot!(
            format!("backup_invalid__{stem}"),
            format!("{}: {err}", err.kind.name())
        );
        assert!(validate_document(&text).is_err(), "{stem}");
    }
}

#[test]
fn libvirt_checkpoint_output_formats_back_byte_for_byte() {
    let mut seen = 0;
    for (stem, text) in files("traces/libvirt-11.3") {
        if !stem.starts_with("checkpoint-dumpxml-") {
            continue;
        }
        let def = CheckpointDef::parse(&text, CheckpointMode::Redefine)
            .unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert_eq!(def.format(ALL), text, "{stem}");
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} libvirt checkpoint files");
}

#[test]
fn libvirt_checkpoint_size_flag_controls_the_size_attribute() {
    let with_size = std::fs::read_to_string(
        testdata().join("traces/libvirt-11.3/checkpoint-dumpxml-c2-size.xml"),
    )
    .unwrap();
    let without_size = std::fs::read_to_string(
        testdata().join("traces/libvirt-11.3/checkpoint-dumpxml-c2-no-domain.xml"),
    )
    .unwrap();
    let def = CheckpointDef::parse(&with_size, CheckpointMode::Document).unwrap();
    assert_eq!(def.format(CheckpointFormat::default()), without_size);
}

#[test]
fn libvirt_checkpoint_no_domain_flag_drops_the_domain() {
    let full =
        std::fs::read_to_string(testdata().join("traces/libvirt-11.3/checkpoint-dumpxml-c2.xml"))
            .unwrap();
    let no_domain = std::fs::read_to_string(
        testdata().join("traces/libvirt-11.3/checkpoint-dumpxml-c2-no-domain.xml"),
    )
    .unwrap();
    let def = CheckpointDef::parse(&full, CheckpointMode::Redefine).unwrap();
    let options = CheckpointFormat {
        no_domain: true,
        include_size: false,
    };
    assert_eq!(def.format(options), no_domain);
}

#[test]
fn libvirt_backup_output_formats_back_byte_for_byte() {
    let mut seen = 0;
    for (stem, text) in files("traces/libvirt-11.3") {
        if !stem.starts_with("backup-dumpxml-") || text.trim().is_empty() {
            continue;
        }
        let def = BackupDef::parse(&text).unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert_eq!(def.format(), text, "{stem}");
        seen += 1;
    }
    assert!(seen >= 3, "only {seen} libvirt backup files");
}

#[test]
fn libvirt_inputs_are_accepted() {
    for (stem, text) in files("traces/libvirt-11.3") {
        if !stem.starts_with("input-") {
            continue;
        }
        let kind = validate_document(&text).unwrap_or_else(|e| panic!("{stem}: {e:?}"));
        assert_eq!(
            stem.starts_with("input-domain-"),
            kind.root_name() == "domain",
            "{stem}"
        );
    }
}

#[test]
fn create_mode_ignores_creation_time_parent_and_domain() {
    let text = std::fs::read_to_string(
        testdata().join("xml/checkpoint/valid/full-with-domain-canonical.xml"),
    )
    .unwrap();
    let def = CheckpointDef::parse(&text, CheckpointMode::Create).unwrap();
    assert_eq!(def.name.as_deref(), Some("c3"));
    assert_eq!(def.creation_time, None);
    assert_eq!(def.parent, None);
    assert_eq!(def.domain_xml, None);
    assert_eq!(def.disks.len(), 2);
}

#[test]
fn create_defaults_name_the_checkpoint_after_its_creation_time() {
    let mut def = CheckpointDef::parse("<domaincheckpoint/>", CheckpointMode::Create).unwrap();
    def.fill_create_defaults(1_795_319_754);
    assert_eq!(def.name.as_deref(), Some("1795319754"));
    assert_eq!(def.creation_time, Some(1_795_319_754));
    let mut named = CheckpointDef::parse(
        "<domaincheckpoint><name>n</name></domaincheckpoint>",
        CheckpointMode::Create,
    )
    .unwrap();
    named.fill_create_defaults(7);
    assert_eq!(named.name.as_deref(), Some("n"));
}

#[test]
fn schema_level_errors_are_reported_as_schema_kind() {
    let text = std::fs::read_to_string(
        testdata().join("xml/checkpoint/invalid/unknown-disk-attribute.xml"),
    )
    .unwrap();
    let err = CheckpointDef::parse(&text, CheckpointMode::Document).unwrap_err();
    assert_eq!(err.kind, XmlErrorKind::Schema);
    assert_eq!(err.path, "/domaincheckpoint/disks/disk");
    assert_eq!(err.position.map(|p| p.line), Some(3));
    assert!(err.message.contains("frobnicate"), "{err}");
}
