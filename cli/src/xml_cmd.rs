//! `vbackup xml validate` and `vbackup xml format`.
//!
//! `validate` picks the grammar from each document's root element (`domaincheckpoint`,
//! `domainbackup`, or `domain` for the domain reader), prints `FILE:LINE:COL: PATH: message`
//! for every error on stderr, and exits 0 only when every file is valid. `format` prints a
//! document in libvirt's canonical form, aligned with a domain's disks when `--domain` is given.

use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use vbackup_core::xml::validate_document;
use vbackup_host::documents::{FormatOptions, format_document, located, read_document};

/// The `xml` subcommands.
#[derive(Debug, Subcommand)]
pub enum XmlCommand {
    /// Check documents against their grammar and libvirt's parser rules.
    Validate(ValidateArgs),
    /// Print a document in libvirt's canonical form.
    Format(FormatArgs),
}

/// Arguments of `xml validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Documents to check.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Machine-readable output: one array with each file's result and errors, on stdout.
    #[arg(long)]
    json: bool,
}

/// Arguments of `xml format`.
#[derive(Debug, Args)]
pub struct FormatArgs {
    /// Align the document with the disks of this `<domain>` document first.
    #[arg(long, value_name = "DOMAIN.xml")]
    domain: Option<PathBuf>,
    /// Suffix of generated backup file names (default: the current Unix time in seconds).
    #[arg(long)]
    suffix: Option<String>,
    /// Leave out a checkpoint's embedded `<domain>`.
    #[arg(long)]
    no_domain: bool,
    /// Leave out a checkpoint's per-disk `size`.
    #[arg(long)]
    no_size: bool,
    /// The document.
    file: PathBuf,
}

/// Runs an `xml` subcommand.
pub fn run(command: XmlCommand) -> ExitCode {
    match command {
        XmlCommand::Validate(args) => validate(&args),
        XmlCommand::Format(a) => match format_document(&FormatOptions {
            file: a.file,
            domain: a.domain,
            suffix: a.suffix,
            no_domain: a.no_domain,
            no_size: a.no_size,
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
    }
}

fn validate(args: &ValidateArgs) -> ExitCode {
    let mut all_valid = true;
    let mut results = Vec::new();
    for path in &args.files {
        let file = path.display().to_string();
        let text = match read_document(path) {
            Ok(text) => text,
            Err(e) => {
                let message = e.to_string();
                all_valid = false;
                if args.json {
                    results.push(serde_json::json!({"file": file, "valid": false, "root": null,
                        "errors": [{"line": null, "column": null, "path": null, "message": message}]}));
                } else {
                    eprintln!("{message}");
                }
                continue;
            }
        };
        match validate_document(&text) {
            Ok(kind) if args.json => results.push(serde_json::json!({
                "file": file, "valid": true, "root": kind.root_name(), "errors": []
            })),
            Ok(kind) => println!("{file}: valid {}", kind.root_name()),
            Err(errors) => {
                all_valid = false;
                if args.json {
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
                for err in errors.iter().filter(|_| !args.json) {
                    eprintln!("{}", located(path, err));
                }
            }
        }
    }
    if args.json {
        crate::output::print_json(serde_json::Value::Array(results));
    }
    if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
