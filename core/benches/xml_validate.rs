//! Throughput of RELAX NG validation: our validator against `xmllint --relaxng` (libxml2) on
//! the same generated documents. Prints figures; asserts nothing about time.
//!
//! Run with `cargo bench -p vbackup-core --bench xml_validate`.
// A benchmark reads the clock and writes temporary files; the core's rules are for library code.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vbackup_core::unstable::schema::{Grammar, validate};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A checkpoint as libvirt stores it: metadata, disks, and the embedded domain.
fn checkpoint_document(target_bytes: usize, seed: usize) -> String {
    let mut disks = String::new();
    let mut domain_disks = String::new();
    let mut i = 0;
    loop {
        let dev = format!("vd{}", (b'a' + (i % 26) as u8) as char) + &"z".repeat(i / 26);
        disks.push_str(&format!(
            "    <disk name='{dev}' checkpoint='bitmap' bitmap='c{seed}' size='{}'/>\n",
            65536 * (i + 1)
        ));
        domain_disks.push_str(&format!(
            "      <disk type='file' device='disk'>\n        <driver name='qemu' type='qcow2'/>\n        \
             <source file='/var/lib/libvirt/images/vm-{dev}.qcow2'/>\n        <target dev='{dev}' bus='virtio'/>\n      </disk>\n"
        ));
        i += 1;
        if disks.len() + domain_disks.len() + 700 >= target_bytes {
            break;
        }
    }
    format!(
        "<domaincheckpoint>\n  <name>c{seed}</name>\n  <description>nightly checkpoint {seed}</description>\n  \
         <parent>\n    <name>c{}</name>\n  </parent>\n  <creationTime>{}</creationTime>\n  <disks>\n{disks}  </disks>\n  \
         <domain type='kvm'>\n    <name>vm1</name>\n    <uuid>b4f6b492-6b54-46ba-b6ec-e27af378b3e6</uuid>\n    \
         <memory unit='KiB'>131072</memory>\n    <vcpu placement='static'>1</vcpu>\n    <os>\n      \
         <type arch='x86_64' machine='pc-i440fx-10.0'>hvm</type>\n    </os>\n    <devices>\n{domain_disks}    </devices>\n  \
         </domain>\n</domaincheckpoint>\n",
        seed.saturating_sub(1),
        1_795_319_755 + seed
    )
}

/// A pull backup over many disks, each with a scratch image and a seclabel.
fn backup_document(target_bytes: usize) -> String {
    let mut disks = String::new();
    let mut i = 0;
    while disks.len() + 200 < target_bytes {
        let dev = format!("vd{}", (b'a' + (i % 26) as u8) as char) + &"z".repeat(i / 26);
        disks.push_str(&format!(
            "    <disk name='{dev}' backup='yes' type='file' backupmode='incremental' incremental='c1' \
             exportname='{dev}' exportbitmap='backup-{dev}' index='{}'>\n      <driver type='qcow2'/>\n      \
             <scratch file='/var/lib/scratch/{dev}.qcow2'>\n        <seclabel model='dac' relabel='no'/>\n      </scratch>\n    </disk>\n",
            i + 3
        ));
        i += 1;
    }
    format!(
        "<domainbackup mode='pull'>\n  <incremental>c1</incremental>\n  \
         <server transport='unix' socket='/run/vbackup/nbd.sock'/>\n  <disks>\n{disks}  </disks>\n</domainbackup>\n"
    )
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Runs `f` repeatedly for about `budget`, returning iterations per second.
fn rate(budget: Duration, mut f: impl FnMut()) -> f64 {
    // Warm-up (also compiles the grammar and fills the caches).
    for _ in 0..10 {
        f();
    }
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < budget {
        for _ in 0..50 {
            f();
        }
        n += 50;
    }
    per_second(n, start.elapsed())
}

fn xmllint_available() -> bool {
    Command::new("xmllint")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn xmllint(schema: &Path, files: &[PathBuf]) -> Duration {
    let start = Instant::now();
    for chunk in files.chunks(1000) {
        let out = Command::new("xmllint")
            .arg("--noout")
            .arg("--relaxng")
            .arg(schema)
            .args(chunk)
            .output()
            .expect("xmllint runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("fails to validate"),
            "xmllint rejects a benchmark document: {stderr}"
        );
    }
    start.elapsed()
}

fn bench_document(name: &str, grammar: Grammar, text: &str, dir: &Path) {
    let doc = roxmltree::Document::parse(text).expect("well-formed");
    if let Err(v) = validate(&doc, grammar) {
        panic!("benchmark document is invalid: {v:?}");
    }
    let validate_only = rate(Duration::from_secs(1), || {
        validate(&doc, grammar).expect("valid");
    });
    let with_parse = rate(Duration::from_secs(1), || {
        let d = roxmltree::Document::parse(text).expect("well-formed");
        validate(&d, grammar).expect("valid");
    });
    println!("{name} ({} bytes):", text.len());
    println!("  ours, validate only:                 {validate_only:>10.0} docs/s");
    println!("  ours, parse + validate:              {with_parse:>10.0} docs/s");
    if !xmllint_available() {
        println!("  xmllint: not installed (apt-get install libxml2-utils)");
        return;
    }
    let schema = repo()
        .join("schemas")
        .join(format!("{}.rng", grammar.root_name()));
    const COPIES: usize = 2000;
    let files: Vec<PathBuf> = (0..COPIES)
        .map(|i| {
            let p = dir.join(format!("{name}-{i}.xml"));
            std::fs::write(&p, text).expect("write copy");
            p
        })
        .collect();
    let batch = xmllint(&schema, &files);
    println!(
        "  xmllint, one process over {COPIES} files: {:>10.0} docs/s",
        per_second(COPIES, batch)
    );
    const PROCESSES: usize = 100;
    let start = Instant::now();
    for _ in 0..PROCESSES {
        xmllint(&schema, &files[..1]);
    }
    println!(
        "  xmllint, one process per file:       {:>10.0} docs/s",
        per_second(PROCESSES, start.elapsed())
    );
}

fn main() {
    let dir = tempfile::tempdir().expect("temporary directory");
    println!("RELAX NG validation throughput (single thread)\n");

    // The 10,000-checkpoint load runs first, in a fresh process state, so its time includes
    // compiling the grammar and filling the caches, as when a daemon starts.
    const STORED: usize = 10_000;
    let small: Vec<String> = (0..STORED)
        .map(|i| {
            format!(
                "<domaincheckpoint>\n  <name>c{i}</name>\n  <description>checkpoint {i}</description>\n  \
                 <parent>\n    <name>c{}</name>\n  </parent>\n  <creationTime>{}</creationTime>\n  <disks>\n    \
                 <disk name='vda' checkpoint='bitmap' bitmap='c{i}'/>\n    <disk name='vdb' checkpoint='no'/>\n  \
                 </disks>\n</domaincheckpoint>\n",
                i.saturating_sub(1),
                1_795_319_755 + i
            )
        })
        .collect();
    let files: Vec<PathBuf> = small
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let p = dir.path().join(format!("c{i}.xml"));
            std::fs::write(&p, text).expect("write checkpoint");
            p
        })
        .collect();
    let start = Instant::now();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("read checkpoint");
        let doc = roxmltree::Document::parse(&text).expect("well-formed");
        validate(&doc, Grammar::Checkpoint).expect("valid");
    }
    let cold = start.elapsed();
    let start = Instant::now();
    for text in &small {
        let doc = roxmltree::Document::parse(text).expect("well-formed");
        validate(&doc, Grammar::Checkpoint).expect("valid");
    }
    let warm = start.elapsed();
    println!(
        "{STORED} small checkpoints ({} bytes each):\n  ours, read files + parse + validate (first use, grammar compile included): {:>8.1} ms\n  \
         ours, parse + validate from memory: {:>8.1} ms",
        small[0].len(),
        cold.as_secs_f64() * 1e3,
        warm.as_secs_f64() * 1e3
    );
    if xmllint_available() {
        let schema = repo().join("schemas/domaincheckpoint.rng");
        let t = xmllint(&schema, &files);
        println!(
            "  xmllint over the same files (10 processes of 1000): {:>8.1} ms",
            t.as_secs_f64() * 1e3
        );
    }
    println!();

    bench_document(
        "checkpoint-5k",
        Grammar::Checkpoint,
        &checkpoint_document(5 * 1024, 7),
        dir.path(),
    );
    println!();
    bench_document(
        "backup-5k",
        Grammar::Backup,
        &backup_document(5 * 1024),
        dir.path(),
    );
}
