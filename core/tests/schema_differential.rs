//! Differential test of our RELAX NG validator against libxml2 (`xmllint --relaxng`), the
//! reference: on every test document of the repository and on generated documents, both must
//! give the same verdict.
//!
//! xmllint runs once per grammar over a whole batch of files, which keeps the test fast.
// Tests read fixtures and run xmllint; the core's no-IO rule is for library code.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use vbackup_core::unstable::schema::{Grammar, validate};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn require_xmllint() {
    let ok = Command::new("xmllint")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "xmllint is not installed: the differential RELAX NG test needs it as its oracle. \
         Install it with `apt-get install libxml2-utils` (.ci/run does this)."
    );
}

/// xmllint's verdict for each file: `true` when it validates.
fn xmllint_verdicts(grammar: Grammar, files: &[PathBuf]) -> BTreeMap<PathBuf, bool> {
    let schema = repo()
        .join("schemas")
        .join(format!("{}.rng", grammar.root_name()));
    let mut verdicts = BTreeMap::new();
    // Bounded batches keep the command line short.
    for chunk in files.chunks(400) {
        let output = Command::new("xmllint")
            .arg("--noout")
            .arg("--relaxng")
            .arg(&schema)
            .args(chunk)
            .output()
            .expect("xmllint runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        for line in stderr.lines() {
            if let Some(file) = line.strip_suffix(" validates") {
                verdicts.insert(PathBuf::from(file), true);
            } else if let Some(file) = line.strip_suffix(" fails to validate") {
                verdicts.insert(PathBuf::from(file), false);
            } else if let Some((file, _)) = line.split_once(": parser error :") {
                // libxml2 refused to parse it (for instance nesting deeper than its limit of
                // 256): the document is rejected. `FILE:LINE: parser error : ...`.
                if let Some((file, _)) = file.rsplit_once(':') {
                    verdicts.entry(PathBuf::from(file)).or_insert(false);
                }
            }
        }
        for file in chunk {
            assert!(
                verdicts.contains_key(file),
                "xmllint gave no verdict for {}:\n{stderr}",
                file.display()
            );
        }
    }
    verdicts
}

fn our_verdict(text: &str, grammar: Grammar) -> Result<(), String> {
    let doc = roxmltree::Document::parse(text).map_err(|e| e.to_string())?;
    validate(&doc, grammar).map_err(|v| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" | ")
    })
}

/// Compares verdicts on files; returns how many were compared.
fn compare(files: Vec<(PathBuf, Grammar)>) -> usize {
    let mut by_grammar: BTreeMap<Grammar, Vec<PathBuf>> = BTreeMap::new();
    for (path, grammar) in files {
        by_grammar.entry(grammar).or_default().push(path);
    }
    let mut disagreements = Vec::new();
    let mut compared = 0;
    for (grammar, paths) in &by_grammar {
        let reference = xmllint_verdicts(*grammar, paths);
        for path in paths {
            let text = std::fs::read_to_string(path).expect("readable document");
            let ours = our_verdict(&text, *grammar);
            let theirs = reference[path];
            compared += 1;
            if ours.is_ok() != theirs {
                disagreements.push(format!(
                    "{}: xmllint says {}, we say {:?}\n{text}",
                    path.display(),
                    if theirs { "valid" } else { "invalid" },
                    ours
                ));
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} disagreement(s) with xmllint:\n{}",
        disagreements.len(),
        disagreements.join("\n---\n")
    );
    compared
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() && depth < 8 {
            walk(&path, out, depth + 1);
        } else if path.extension().is_some_and(|x| x == "xml") {
            out.push(path);
        }
    }
}

/// Every repository document whose root names one of our grammars.
fn repository_documents() -> Vec<(PathBuf, Grammar)> {
    let mut paths = Vec::new();
    for dir in ["testdata/xml", "testdata/schema", "testdata/traces"] {
        walk(&repo().join(dir), &mut paths, 0);
    }
    paths.sort();
    let mut documents = Vec::new();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        // Malformed documents are the parser's business, not the grammar's.
        let Ok(doc) = roxmltree::Document::parse(&text) else {
            continue;
        };
        if let Some(grammar) = Grammar::for_root(doc.root_element().tag_name().name()) {
            documents.push((path, grammar));
        }
    }
    documents
}

#[test]
fn repository_documents_get_the_same_verdict_as_xmllint() {
    require_xmllint();
    let documents = repository_documents();
    assert!(
        documents.len() >= 90,
        "only {} documents found",
        documents.len()
    );
    let compared = compare(documents);
    eprintln!("compared {compared} repository documents with xmllint");
}

// ----- generated documents -----

/// What may appear in a generated element: children (by name), attributes with candidate
/// values, and candidate texts. Candidate lists mix valid and invalid values.
struct ElementVocab {
    name: &'static str,
    children: &'static [&'static str],
    attributes: &'static [(&'static str, &'static [&'static str])],
    texts: &'static [&'static str],
}

const DISK_NAMES: &[&str] = &[
    "vda",
    "sdb1",
    "ioemu:hda",
    "xvdz_9",
    "/var/lib/x.qcow2",
    "disk",
    "vd",
    "",
];
const YES_NO: &[&str] = &["yes", "no", " yes ", "maybe", "&#9;no", "YES"];
const PATHS: &[&str] = &["/b/vda.qcow2", "/dev/sdz", "relative.qcow2", "/a b", ""];
const NUMBERS: &[&str] = &[
    "0",
    "42",
    " 7 ",
    "-1",
    "+3",
    "4294967296",
    "18446744073709551615",
    "x",
];
const NAMES: &[&str] = &["c1", "c-2.x", "_a", ".hidden", "a/b", "", "1795319755"];

const CHECKPOINT_VOCAB: &[ElementVocab] = &[
    ElementVocab {
        name: "domaincheckpoint",
        children: &[
            "name",
            "description",
            "parent",
            "creationTime",
            "disks",
            "domain",
        ],
        attributes: &[],
        texts: &[],
    },
    ElementVocab {
        name: "name",
        children: &[],
        attributes: &[],
        texts: NAMES,
    },
    ElementVocab {
        name: "description",
        children: &[],
        attributes: &[],
        texts: &["first", "", "a &amp; b", "<![CDATA[x<y]]>"],
    },
    ElementVocab {
        name: "parent",
        children: &["name"],
        attributes: &[],
        texts: &[],
    },
    ElementVocab {
        name: "creationTime",
        children: &[],
        attributes: &[],
        texts: NUMBERS,
    },
    ElementVocab {
        name: "disks",
        children: &["disk"],
        attributes: &[],
        texts: &[],
    },
    ElementVocab {
        name: "disk",
        children: &[],
        attributes: &[
            ("name", DISK_NAMES),
            ("checkpoint", &["bitmap", "no", " no", "foo"]),
            ("bitmap", &["c1", ""]),
            ("size", NUMBERS),
        ],
        texts: &[],
    },
    ElementVocab {
        name: "domain",
        children: &["name", "devices", "disk"],
        attributes: &[("type", &["kvm", "qemu"])],
        texts: &["x"],
    },
    ElementVocab {
        name: "devices",
        children: &["disk", "devices"],
        attributes: &[("a", &["1"])],
        texts: &["t"],
    },
];

const BACKUP_VOCAB: &[ElementVocab] = &[
    ElementVocab {
        name: "domainbackup",
        children: &["incremental", "server", "disks"],
        attributes: &[("mode", &["push", "pull", " pull ", "mirror"])],
        texts: &[],
    },
    ElementVocab {
        name: "incremental",
        children: &[],
        attributes: &[],
        texts: NAMES,
    },
    ElementVocab {
        name: "server",
        children: &[],
        attributes: &[
            ("transport", &["tcp", "unix", "fd", "rdma"]),
            (
                "name",
                &["localhost", "10.0.0.1", "fe80::1", "bad host", ""],
            ),
            ("port", NUMBERS),
            ("socket", PATHS),
            ("fdgroup", &["g1"]),
            ("tls", YES_NO),
        ],
        texts: &[],
    },
    ElementVocab {
        name: "disks",
        children: &["disk"],
        attributes: &[],
        texts: &[],
    },
    ElementVocab {
        name: "disk",
        children: &["target", "scratch", "driver"],
        attributes: &[
            ("name", DISK_NAMES),
            ("backup", YES_NO),
            ("type", &["file", "block", "network"]),
            ("backupmode", &["full", "incremental", "diff"]),
            ("incremental", &["c1"]),
            ("exportname", &["vda"]),
            ("exportbitmap", &["b"]),
            ("index", NUMBERS),
        ],
        texts: &[],
    },
    ElementVocab {
        name: "target",
        children: &["seclabel", "encryption"],
        attributes: &[("file", PATHS), ("dev", PATHS)],
        texts: &[],
    },
    ElementVocab {
        name: "scratch",
        children: &["seclabel", "encryption"],
        attributes: &[("file", PATHS), ("dev", PATHS)],
        texts: &[],
    },
    ElementVocab {
        name: "driver",
        children: &[],
        attributes: &[("type", &["qcow2", "raw", "vmdk", "qcow3"])],
        texts: &[],
    },
    ElementVocab {
        name: "seclabel",
        children: &["label"],
        attributes: &[
            ("model", &["dac"]),
            ("relabel", YES_NO),
            ("labelskip", YES_NO),
        ],
        texts: &[],
    },
    ElementVocab {
        name: "label",
        children: &[],
        attributes: &[],
        texts: &["system_u:r:t:s0"],
    },
    ElementVocab {
        name: "encryption",
        children: &["secret", "cipher", "ivgen"],
        attributes: &[
            ("format", &["luks", "qcow", "luks3"]),
            ("engine", &["qemu", "x"]),
        ],
        texts: &[],
    },
    ElementVocab {
        name: "secret",
        children: &[],
        attributes: &[
            ("type", &["passphrase", "volume"]),
            (
                "uuid",
                &[
                    "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f",
                    "0a81f5b284037b23c8d621ccc2f80d6f",
                    "nope",
                ],
            ),
            ("usage", &["key"]),
        ],
        texts: &[],
    },
    ElementVocab {
        name: "cipher",
        children: &[],
        attributes: &[("name", &["aes"]), ("size", NUMBERS), ("mode", &["xts"])],
        texts: &[],
    },
    ElementVocab {
        name: "ivgen",
        children: &[],
        attributes: &[("name", &["plain64"]), ("hash", &["sha256"])],
        texts: &[],
    },
];

/// Builds a document from a tape of random numbers (generated by proptest). Running out of tape
/// ends the document early, so shorter tapes make smaller documents.
struct Builder<'t> {
    tape: &'t [u32],
    pos: usize,
    vocab: &'static [ElementVocab],
    out: String,
}

impl Builder<'_> {
    fn next(&mut self, n: usize) -> usize {
        let v = self.tape.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        if n == 0 { 0 } else { v as usize % n }
    }

    /// Candidate lists start with valid values: prefer those two times out of three.
    fn pick(&mut self, values: &[&'static str]) -> &'static str {
        if self.chance(65) {
            values[self.next(values.len().min(2))]
        } else {
            values[self.next(values.len())]
        }
    }

    /// A biased coin; once the tape is used up it always says no, which ends the document.
    fn chance(&mut self, percent: usize) -> bool {
        self.pos < self.tape.len() && self.next(100) < percent
    }

    fn element(&mut self, name: &str, depth: usize) {
        let Some(vocab) = self.vocab.iter().find(|v| v.name == name) else {
            self.out.push_str(&format!("<{name}/>"));
            return;
        };
        let indent = "  ".repeat(depth);
        self.out.push('<');
        self.out.push_str(name);
        for (attr, values) in vocab.attributes {
            // The first attribute is usually the required one: give it most often.
            if self.chance(if attr == &vocab.attributes[0].0 {
                85
            } else {
                30
            }) {
                let value = self.pick(values);
                let quote = if self.chance(50) { '\'' } else { '"' };
                self.out.push_str(&format!(" {attr}={quote}{value}{quote}"));
            }
        }
        if self.chance(1) {
            self.out.push_str(" xmlns='urn:elsewhere'");
        }
        if self.chance(1) {
            self.out.push_str(" xml:lang='en'");
        }
        if self.chance(1) {
            self.out.push_str(" stray='1'");
        }
        let mut children: Vec<&str> = Vec::new();
        if depth < 6 {
            if let [only] = vocab.children {
                let count = if self.chance(85) { 1 + self.next(3) } else { 0 };
                for _ in 0..count {
                    children.push(only);
                }
            } else {
                for child in vocab.children {
                    if self.chance(45) {
                        children.push(child);
                    }
                }
                // Shuffle a little: order matters only in some places.
                if children.len() > 1 && self.chance(50) {
                    let i = self.next(children.len());
                    let j = self.next(children.len());
                    children.swap(i, j);
                }
            }
            if self.chance(8) && !vocab.children.is_empty() {
                children.push(vocab.children[self.next(vocab.children.len())]);
            }
            if self.chance(2) {
                children.push("unknown");
            }
        }
        let mut body = String::new();
        for child in children {
            if self.pos >= self.tape.len() {
                break;
            }
            let saved = std::mem::take(&mut self.out);
            body.push('\n');
            body.push_str(&indent);
            body.push_str("  ");
            if self.chance(5) {
                body.push_str("<!-- note -->");
            }
            self.element(child, depth + 1);
            body.push_str(&std::mem::replace(&mut self.out, saved));
        }
        if !body.is_empty() {
            body.push('\n');
            body.push_str(&indent);
        }
        if !vocab.texts.is_empty() && self.chance(95) {
            let text = self.pick(vocab.texts);
            body.push_str(text);
        } else if self.chance(1) {
            body.push_str("stray text");
        }
        if body.is_empty() && self.chance(70) {
            self.out.push_str("/>");
        } else {
            self.out.push('>');
            self.out.push_str(&body);
            self.out.push_str(&format!("</{name}>"));
        }
    }
}

fn generate(grammar: Grammar, tape: &[u32]) -> String {
    let vocab = match grammar {
        Grammar::Checkpoint => CHECKPOINT_VOCAB,
        Grammar::Backup => BACKUP_VOCAB,
    };
    let mut b = Builder {
        tape,
        pos: 0,
        vocab,
        out: String::new(),
    };
    b.element(grammar.root_name(), 0);
    b.out.push('\n');
    b.out
}

#[test]
fn generated_documents_get_the_same_verdict_as_xmllint() {
    require_xmllint();
    const PER_GRAMMAR: usize = 1000;
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut runner = TestRunner::deterministic();
    let tape = proptest::collection::vec(any::<u32>(), 8..200);
    let mut files = Vec::new();
    let mut valid = 0;
    let mut reasons = BTreeMap::new();
    for grammar in [Grammar::Checkpoint, Grammar::Backup] {
        for i in 0..PER_GRAMMAR {
            let tree = tape.new_tree(&mut runner).expect("tape");
            let text = generate(grammar, &tree.current());
            let verdict = our_verdict(&text, grammar);
            valid += usize::from(verdict.is_ok());
            if let Err(e) = verdict {
                let first = e.split(" | ").next().unwrap_or_default();
                let message = first.splitn(3, ": ").nth(2).unwrap_or_default();
                *reasons
                    .entry(message.chars().take(50).collect::<String>())
                    .or_insert(0usize) += 1;
            }
            let path = dir.path().join(format!("{}-{i}.xml", grammar.root_name()));
            std::fs::write(&path, text).expect("write generated document");
            files.push((path, grammar));
        }
    }
    let mut reasons: Vec<(usize, String)> = reasons.into_iter().map(|(m, n)| (n, m)).collect();
    reasons.sort();
    eprintln!(
        "most frequent first violations: {:?}",
        reasons.iter().rev().take(12).collect::<Vec<_>>()
    );
    let compared = compare(files);
    eprintln!("compared {compared} generated documents with xmllint ({valid} valid)");
    // Both verdicts must be well represented, or the comparison says little.
    assert!(
        valid >= compared / 10 && valid <= compared * 9 / 10,
        "{valid} of {compared} valid"
    );
}
