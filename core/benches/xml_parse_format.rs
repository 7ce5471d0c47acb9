//! Throughput of the XML layer end to end: parse (with grammar validation and parser rules)
//! and format a ~5 KB `<domaincheckpoint>` and `<domainbackup>`, and the time to load 10,000
//! stored checkpoint files the way the store does at start-up. Prints figures; asserts nothing
//! about time. (`xml_validate` compares the grammar check alone with xmllint.)
//!
//! Run with `cargo bench -p vbackup-core --bench xml_parse_format`.
// A benchmark reads the clock and writes temporary files; the core's rules are for library code.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};
use vbackup_core::xml::{BackupDef, CheckpointDef, CheckpointFormat, CheckpointMode};

/// A stored checkpoint of a VM with enough disks to make the document about `target_bytes`.
fn checkpoint_document(target_bytes: usize, seed: usize) -> String {
    let mut disks = String::new();
    let mut domain_disks = String::new();
    let mut i = 0;
    while disks.len() + domain_disks.len() + 600 < target_bytes {
        let dev = format!("vd{}{}", (b'a' + (i % 26) as u8) as char, i / 26);
        disks.push_str(&format!(
            "    <disk name='{dev}' checkpoint='bitmap' bitmap='c{seed}'/>\n"
        ));
        domain_disks.push_str(&format!(
            "      <disk type='file' device='disk'>\n        <driver name='qemu' type='qcow2'/>\n        \
             <source file='/var/lib/libvirt/images/vm-{dev}.qcow2'/>\n        <target dev='{dev}' bus='virtio'/>\n      </disk>\n"
        ));
        i += 1;
    }
    format!(
        "<domaincheckpoint>\n  <name>c{seed}</name>\n  <description>nightly checkpoint {seed}</description>\n  \
         <parent>\n    <name>c{}</name>\n  </parent>\n  <creationTime>{}</creationTime>\n  <disks>\n{disks}  </disks>\n  \
         <domain type='kvm'>\n    <name>vm</name>\n    <uuid>b4f6b492-6b54-46ba-b6ec-e27af378b3e6</uuid>\n    \
         <memory unit='KiB'>1048576</memory>\n    <devices>\n{domain_disks}    </devices>\n  </domain>\n</domaincheckpoint>\n",
        seed.saturating_sub(1),
        1_795_319_754 + seed
    )
}

fn backup_document(target_bytes: usize) -> String {
    let mut disks = String::new();
    let mut i = 0;
    while disks.len() + 200 < target_bytes {
        let dev = format!("vd{}{}", (b'a' + (i % 26) as u8) as char, i / 26);
        disks.push_str(&format!(
            "    <disk name='{dev}' backup='yes' type='file' backupmode='incremental' incremental='c6' \
             exportname='{dev}' exportbitmap='backup-{dev}' index='{}'>\n      <driver type='qcow2'/>\n      \
             <scratch file='/var/lib/libvirt/scratch/{dev}.qcow2'/>\n    </disk>\n",
            i + 10
        ));
        i += 1;
    }
    format!(
        "<domainbackup mode='pull'>\n  <incremental>c6</incremental>\n  \
         <server transport='unix' socket='/run/vbackup/nbd.sock'/>\n  <disks>\n{disks}  </disks>\n</domainbackup>\n"
    )
}

/// Runs `f` repeatedly for about `budget` and returns calls per second.
fn rate(budget: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget {
        for _ in 0..16 {
            f();
        }
        calls += 16;
    }
    calls as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let budget = Duration::from_secs(2);
    let checkpoint = checkpoint_document(5 * 1024, 7);
    let options = CheckpointFormat::default();
    assert_eq!(
        CheckpointDef::parse(&checkpoint, CheckpointMode::Redefine)
            .unwrap()
            .format(options),
        checkpoint,
        "the benchmark document is canonical"
    );
    let backup = backup_document(5 * 1024);
    assert_eq!(BackupDef::parse(&backup).unwrap().format(), backup);

    let parse_cp = rate(budget, || {
        std::hint::black_box(CheckpointDef::parse(&checkpoint, CheckpointMode::Redefine).unwrap());
    });
    let round_cp = rate(budget, || {
        let def = CheckpointDef::parse(&checkpoint, CheckpointMode::Redefine).unwrap();
        std::hint::black_box(def.format(options));
    });
    let parse_bk = rate(budget, || {
        std::hint::black_box(BackupDef::parse(&backup).unwrap());
    });
    let round_bk = rate(budget, || {
        std::hint::black_box(BackupDef::parse(&backup).unwrap().format());
    });
    println!(
        "checkpoint {} B: parse+validate {parse_cp:.0} docs/s, parse+validate+format {round_cp:.0} docs/s",
        checkpoint.len()
    );
    println!(
        "backup     {} B: parse+validate {parse_bk:.0} docs/s, parse+validate+format {round_bk:.0} docs/s",
        backup.len()
    );

    // 10,000 stored checkpoints of a two-disk VM (about the size libvirt writes), read back.
    let dir = tempfile::tempdir().unwrap();
    let count = 10_000;
    for seed in 0..count {
        std::fs::write(
            dir.path().join(format!("c{seed}.xml")),
            checkpoint_document(1500, seed),
        )
        .unwrap();
    }
    let start = Instant::now();
    let mut loaded = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        CheckpointDef::parse(&text, CheckpointMode::Redefine).unwrap();
        loaded += 1;
    }
    assert_eq!(loaded, count);
    println!(
        "loaded {count} stored checkpoint files (read + parse + validate) in {:.3} s",
        start.elapsed().as_secs_f64()
    );
}
