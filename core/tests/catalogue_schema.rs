//! The `<managedbackup>` grammar agrees with `xmllint --relaxng` on formatted records and on
//! their mutations, and everything the formatter writes is valid.

// A test may write files for the external oracle; the core itself never does.
#![allow(clippy::disallowed_methods)]

use std::process::Command;

use vbackup_core::catalogue::{BackupImage, BackupKind, Digest, GRAMMAR, ManagedBackup};
use vbackup_core::model::ImageFormat;
use vbackup_core::unstable::relaxng::Schema;

fn record(kind: BackupKind) -> ManagedBackup {
    ManagedBackup {
        uuid: "0f0e0d0c-0b0a-4909-8807-060504030201".into(),
        domain: "vm one".into(),
        parent: (kind == BackupKind::Incremental)
            .then(|| "01020304-0506-4708-890a-0b0c0d0e0f10".into()),
        checkpoint: Some("c.1".into()),
        creation_time: 1_763_790_000,
        sequence: Some(3),
        description: Some("a & b".into()),
        kind,
        disks: vec![
            BackupImage {
                disk: "vda".into(),
                path: "/srv/b/vda.qcow2".into(),
                format: ImageFormat::Qcow2,
                virtual_size_bytes: 1 << 30,
                allocated_size_bytes: 0,
                digest: Digest::sha256(&[7; 32]),
            },
            BackupImage {
                disk: "vdb".into(),
                path: "/srv/b/it's.qcow2".into(),
                format: ImageFormat::Raw,
                virtual_size_bytes: u64::MAX,
                allocated_size_bytes: 1,
                digest: Digest::sha256(&[0xfe; 32]),
            },
        ],
    }
}

fn documents() -> Vec<(String, String)> {
    let full = record(BackupKind::Full).format();
    let inc = record(BackupKind::Incremental).format();
    let mut docs = vec![
        ("full".to_owned(), full.clone()),
        ("inc".to_owned(), inc.clone()),
    ];
    let mutations: [(&str, &str, &str); 12] = [
        ("no-mode", "  <mode>full</mode>\n", ""),
        ("bad-mode", "<mode>full</mode>", "<mode>Full</mode>"),
        ("upper-digest", "sha256:0707", "sha256:0A07"),
        ("relative-path", "path='/srv/b/vda", "path='srv/b/vda"),
        ("negative-size", "allocatedSize='0'", "allocatedSize='-1'"),
        ("bad-uuid", "<uuid>0f0e0d0c", "<uuid>0F0E0D0C"),
        (
            "extra-attr",
            "<disk name='vda'",
            "<disk extra='1' name='vda'",
        ),
        ("empty-disks", "<disks>", "<disks/><x>"),
        ("reordered", "  <domain>vm one</domain>\n", ""),
        // Records written before sequence numbers existed stay valid.
        ("no-sequence", "  <sequence>3</sequence>\n", ""),
        ("negative-sequence", "<sequence>3<", "<sequence>-3<"),
        ("word-sequence", "<sequence>3<", "<sequence>three<"),
    ];
    for (name, from, to) in mutations {
        let text = full.replacen(from, to, 1);
        assert_ne!(text, full, "mutation {name} applies");
        let text = if name == "reordered" {
            text.replace("<mode>", "<domain>vm one</domain>\n  <mode>")
        } else if name == "empty-disks" {
            text.replace("</disks>", "</x>")
        } else {
            text
        };
        docs.push((name.to_owned(), text));
    }
    docs
}

#[test]
fn formatted_records_are_valid_and_parse_back() {
    let schema = Schema::compile(GRAMMAR).unwrap();
    for kind in [BackupKind::Full, BackupKind::Incremental] {
        let text = record(kind).format();
        let doc = roxmltree::Document::parse(&text).unwrap();
        assert_eq!(schema.validate(&doc), Ok(()), "{text}");
        assert_eq!(ManagedBackup::parse(&text).unwrap(), record(kind));
    }
}

#[test]
fn grammar_verdicts_match_xmllint() {
    let available = Command::new("xmllint")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    // The oracle is part of the test: without it the test fails rather than passing unseen.
    assert!(
        available,
        "xmllint missing: install libxml2-utils (bash .ci/run does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let rng = dir.path().join("managedbackup.rng");
    std::fs::write(&rng, GRAMMAR).unwrap();
    let schema = Schema::compile(GRAMMAR).unwrap();
    let mut invalid = 0;
    for (name, text) in documents() {
        let path = dir.path().join(format!("{name}.xml"));
        std::fs::write(&path, &text).unwrap();
        let theirs = Command::new("xmllint")
            .args(["--noout", "--relaxng"])
            .arg(&rng)
            .arg(&path)
            .output()
            .unwrap()
            .status
            .success();
        let doc = roxmltree::Document::parse(&text).unwrap();
        let ours = schema.validate(&doc).is_ok();
        assert_eq!(
            ours, theirs,
            "{name}: ours {ours}, xmllint {theirs}\n{text}"
        );
        if !ours {
            invalid += 1;
            assert!(
                ManagedBackup::parse(&text).is_err(),
                "{name} is refused by the parser"
            );
        }
    }
    assert_eq!(
        invalid, 10,
        "every mutation but the reordering and the missing sequence is invalid"
    );
}
