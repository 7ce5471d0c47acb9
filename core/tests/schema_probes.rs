//! Our grammars against documents with known verdicts: the documents libvirt 11.3 printed or
//! accepted (all valid), and the probe documents of `testdata/schema/`, one rule each.
// Tests read their fixtures from the source tree; the core's no-IO rule is for library code.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

use vbackup_core::unstable::schema::{Grammar, validate};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn xml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    files.sort();
    files
}

fn check(path: &Path, grammar: Grammar) -> Result<(), String> {
    let text = std::fs::read_to_string(path).expect("readable fixture");
    let doc = roxmltree::Document::parse(&text).expect("well-formed fixture");
    validate(&doc, grammar).map_err(|violations| {
        violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" | ")
    })
}

#[test]
fn documents_printed_or_accepted_by_libvirt_are_valid() {
    let dir = repo().join("testdata/traces/libvirt-11.3");
    let mut checked = 0;
    for path in xml_files(&dir) {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let interesting = ["input-", "checkpoint-dumpxml-", "backup-dumpxml-"]
            .iter()
            .any(|p| name.starts_with(p));
        let text = std::fs::read_to_string(&path).expect("readable trace document");
        if !interesting || text.trim().is_empty() {
            continue;
        }
        let doc = roxmltree::Document::parse(&text).expect("well-formed trace document");
        let Some(grammar) = Grammar::for_root(doc.root_element().tag_name().name()) else {
            continue;
        };
        if let Err(e) = check(&path, grammar) {
            panic!("{name} should be valid: {e}");
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} libvirt documents found");
}

fn probe_report(kind: &str, grammar: Grammar) -> String {
    let base = repo().join("testdata/schema").join(kind);
    let mut report = String::new();
    for path in xml_files(&base.join("valid")) {
        if let Err(e) = check(&path, grammar) {
            panic!("{} should be valid: {e}", path.display());
        }
    }
    let invalid = xml_files(&base.join("invalid"));
    assert!(invalid.len() >= 15, "too few {kind} probes");
    for path in invalid {
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        match check(&path, grammar) {
            Ok(()) => panic!("{} should be invalid", path.display()),
            Err(e) => report.push_str(&format!("{name}: {e}\n")),
        }
    }
    report
}

#[test]
fn checkpoint_probes_get_their_verdicts_and_messages() {
    insta::assert_snapshot!(probe_report("checkpoint", Grammar::Checkpoint));
}

#[test]
fn backup_probes_get_their_verdicts_and_messages() {
    insta::assert_snapshot!(probe_report("backup", Grammar::Backup));
}

#[test]
fn both_grammars_compile_and_know_their_roots() {
    for g in [Grammar::Checkpoint, Grammar::Backup] {
        assert!(g.schema().is_ok(), "{:?}", g.schema().err());
        assert_eq!(Grammar::for_root(g.root_name()), Some(g));
    }
    assert_eq!(Grammar::for_root("domain"), None);
}

#[test]
fn wrong_root_is_a_positioned_violation() {
    let doc = roxmltree::Document::parse("<!-- x -->\n<domainbackup/>").unwrap();
    let v = validate(&doc, Grammar::Checkpoint).unwrap_err();
    assert_eq!(
        v[0].to_string(),
        "2:1: /domainbackup: unexpected element `domainbackup`; expected `domaincheckpoint`"
    );
}

#[test]
fn threads_validate_concurrently_with_their_own_caches() {
    let workers: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                for j in 0..50 {
                    let good =
                        format!("<domaincheckpoint><name>c{i}-{j}</name></domaincheckpoint>");
                    let bad = format!("<domaincheckpoint><name>.c{i}</name></domaincheckpoint>");
                    let doc = roxmltree::Document::parse(&good).unwrap();
                    assert!(validate(&doc, Grammar::Checkpoint).is_ok());
                    let doc = roxmltree::Document::parse(&bad).unwrap();
                    assert!(validate(&doc, Grammar::Checkpoint).is_err());
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker finished");
    }
}
