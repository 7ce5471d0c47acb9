//! Replays the fuzzers' seed corpus (every XML file under `testdata/`) through all parsers,
//! together with deterministic damage to each file (truncations, deleted and doubled bytes):
//! nothing may panic, and whatever a parser accepts must survive format then parse.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use vbackup_core::xml::{
    BackupDef, CheckpointDef, CheckpointFormat, CheckpointMode, align_backup, align_checkpoint,
    parse_domain, validate_document,
};

fn xml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            xml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "xml") {
            out.push(path);
        }
    }
}

fn seed_corpus() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata");
    let mut paths = Vec::new();
    xml_files(&root.join("xml"), &mut paths);
    xml_files(&root.join("traces"), &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

const ALL: CheckpointFormat = CheckpointFormat {
    no_domain: false,
    include_size: true,
};

/// What the fuzz targets do with one input.
fn exercise(text: &str) {
    for mode in [
        CheckpointMode::Create,
        CheckpointMode::Redefine,
        CheckpointMode::Document,
    ] {
        if let Ok(def) = CheckpointDef::parse(text, mode) {
            let formatted = def.format(ALL);
            let again = CheckpointDef::parse(&formatted, mode)
                .unwrap_or_else(|e| panic!("formatted checkpoint rejected: {e}\n{formatted}"));
            assert_eq!(again.format(ALL), formatted);
        }
    }
    if let Ok(def) = BackupDef::parse(text) {
        let formatted = def.format();
        let again = BackupDef::parse(&formatted)
            .unwrap_or_else(|e| panic!("formatted backup rejected: {e}\n{formatted}"));
        assert_eq!(again, def);
    }
    if let Ok(domain) = parse_domain(text) {
        let _ = align_backup(&BackupDef::default(), &domain, "seed");
        let def = CheckpointDef {
            name: Some("seed".to_owned()),
            ..CheckpointDef::default()
        };
        let _ = align_checkpoint(&def, &domain);
    }
    let _ = validate_document(text);
}

#[test]
fn seed_corpus_never_panics_and_round_trips() {
    let corpus = seed_corpus();
    assert!(
        corpus.len() > 100,
        "seed corpus has only {} files",
        corpus.len()
    );
    for (path, text) in &corpus {
        let result = std::panic::catch_unwind(|| exercise(text));
        assert!(result.is_ok(), "{}", path.display());
    }
}

#[test]
fn damaged_seed_files_never_panic() {
    for (path, text) in seed_corpus() {
        let bytes = text.as_bytes();
        // Spread ~40 cut points over each file; damage must keep the text UTF-8.
        let step = (bytes.len() / 40).max(1);
        for at in (0..bytes.len()).step_by(step) {
            if !text.is_char_boundary(at) {
                continue;
            }
            let truncated = &text[..at];
            let next = text[at..].chars().next().map_or(0, char::len_utf8);
            let deleted = format!("{}{}", &text[..at], &text[at + next..]);
            let doubled = format!("{}{}", &text[..at + next], &text[at..]);
            for damaged in [truncated, deleted.as_str(), doubled.as_str()] {
                let result = std::panic::catch_unwind(|| exercise(damaged));
                assert!(result.is_ok(), "{} damaged at byte {at}", path.display());
            }
        }
    }
}
