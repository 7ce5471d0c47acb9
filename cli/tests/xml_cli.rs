//! `vbackup xml validate` and `vbackup xml format` as a user runs them.

use std::path::PathBuf;
use std::process::{Command, Output};

fn testdata(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(rel)
}

fn vbackup(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vbackup"))
        .args(args)
        .output()
        .unwrap()
}

fn path(rel: &str) -> String {
    testdata(rel).to_string_lossy().into_owned()
}

#[test]
fn validate_accepts_every_kind_of_valid_document() {
    let files = [
        path("xml/checkpoint/valid/full-with-domain-canonical.xml"),
        path("xml/backup/valid/pull-unix-canonical.xml"),
        path("xml/domain/mixed.xml"),
    ];
    let args: Vec<&str> = ["xml", "validate"]
        .into_iter()
        .chain(files.iter().map(String::as_str))
        .collect();
    let out = vbackup(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("valid domaincheckpoint"));
    assert!(stdout.contains("valid domainbackup"));
    assert!(stdout.contains("valid domain\n"));
}

#[test]
fn validate_prints_file_line_column_path_and_fails() {
    let bad = path("xml/backup/invalid/port-out-of-range.xml");
    let good = path("xml/backup/valid/empty.xml");
    let out = vbackup(&["xml", "validate", &good, &bad]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr,
        format!("{bad}:2:3: /domainbackup/server: port '70000' is out of range (0 to 65535)\n")
    );
}

#[test]
fn validate_rejects_unknown_root_elements() {
    let bad = path("xml/checkpoint/invalid/wrong-root.xml");
    let out = vbackup(&["xml", "validate", &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown root element 'domainsnapshot'"));
}

#[test]
fn format_reproduces_libvirt_output() {
    let file = path("traces/libvirt-11.3/checkpoint-dumpxml-c1.xml");
    let out = vbackup(&["xml", "format", &file]);
    assert!(out.status.success());
    assert_eq!(out.stdout, std::fs::read(&file).unwrap());
}

#[test]
fn format_with_domain_aligns_the_backup() {
    let out = vbackup(&[
        "xml",
        "format",
        "--domain",
        &path("xml/domain/lab1.xml"),
        "--suffix",
        "c5",
        &path("xml/backup/valid/empty.xml"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("<target file='/srv/lab/images/lab1-vda.qcow2.c5'/>"),
        "{stdout}"
    );
    assert!(
        stdout.contains("<target file='/srv/lab/images/lab1-vdb.qcow2.c5'/>"),
        "{stdout}"
    );
}

#[test]
fn format_with_domain_reports_alignment_errors() {
    let out = vbackup(&[
        "xml",
        "format",
        "--domain",
        &path("xml/domain/no-disks.xml"),
        &path("xml/checkpoint/valid/create-name-description.xml"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least one disk"));
}

#[test]
fn format_can_drop_domain_and_size() {
    let out = vbackup(&[
        "xml",
        "format",
        "--no-domain",
        "--no-size",
        &path("traces/libvirt-11.3/checkpoint-dumpxml-c2.xml"),
    ]);
    assert!(out.status.success());
    assert_eq!(
        out.stdout,
        std::fs::read(testdata(
            "traces/libvirt-11.3/checkpoint-dumpxml-c2-no-domain.xml"
        ))
        .unwrap()
    );
}
