//! `vbackup xml validate` and `vbackup xml format`.
//!
//! `validate` picks the grammar from each document's root element (`domaincheckpoint`,
//! `domainbackup`, or `domain` for the domain reader), prints `FILE:LINE:COL: PATH: message`
//! for every error on stderr, and exits 0 only when every file is valid. `format` prints a
//! document in libvirt's canonical form, aligned with a domain's disks when `--domain` is given.

use clap::ArgMatches;
use std::path::PathBuf;
use std::process::ExitCode;
use vbackup_core::xml::validate_document;
use vbackup_host::documents::{FormatOptions, format_document, located, read_document};

use crate::spec::{path, text};

/// Runs an `xml` subcommand.
pub fn run(m: &ArgMatches) -> ExitCode {
    match m.subcommand() {
        Some(("validate", m)) => validate(m),
        Some((_, m)) => match format_document(&FormatOptions {
            file: path(m, "file").expect("a required argument"),
            domain: path(m, "domain"),
            suffix: text(m, "suffix"),
            no_domain: m.get_flag("no_domain"),
            no_size: m.get_flag("no_size"),
        }) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("{message}");
                ExitCode::FAILURE
            }
        },
        None => unreachable!("a subcommand is required"),
    }
}

fn validate(m: &ArgMatches) -> ExitCode {
    let json = m.get_flag("json");
    let mut all_valid = true;
    let mut results = Vec::new();
    for path in m.get_many::<PathBuf>("files").into_iter().flatten() {
        let file = path.display().to_string();
        let text = match read_document(path) {
            Ok(text) => text,
            Err(e) => {
                let message = e.to_string();
                all_valid = false;
                if json {
                    results.push(serde_json::json!({"file": file, "valid": false, "root": null,
                        "errors": [{"line": null, "column": null, "path": null, "message": message}]}));
                } else {
                    eprintln!("{message}");
                }
                continue;
            }
        };
        match validate_document(&text) {
            Ok(kind) if json => results.push(serde_json::json!({
                "file": file, "valid": true, "root": kind.root_name(), "errors": []
            })),
            Ok(kind) => println!("{file}: valid {}", kind.root_name()),
            Err(errors) => {
                all_valid = false;
                if json {
                    let errors: Vec<serde_json::Value> = errors
                        .iter()
                        .map(|e| {
                            serde_json::json!({
                                "line": e.position.map(|p| p.line),
                                "column": e.position.map(|p| p.column),
                                "path": e.path,
                                "message": e.message,
                            })
                        })
                        .collect();
                    results.push(serde_json::json!({"file": file, "valid": false, "root": null, "errors": errors}));
                }
                for err in errors.iter().filter(|_| !json) {
                    eprintln!("{}", located(path, err));
                }
            }
        }
    }
    if json {
        crate::output::print_json(serde_json::Value::Array(results));
    }
    if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
