//! `vbackup xml validate` and `vbackup xml format`.
//!
//! `validate` picks the grammar from each document's root element (`domaincheckpoint`,
//! `domainbackup`, or `domain` for the domain reader), prints `FILE:LINE:COL: PATH: message`
//! for every error on stderr, and exits 0 only when every file is valid. `format` prints a
//! document in libvirt's canonical form, aligned with a domain's disks when `--domain` is given.

use clap::{Args, Subcommand};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vbackup_core::xml::MAX_DOCUMENT_BYTES;
use vbackup_core::xml::{
    BackupDef, CheckpointDef, CheckpointFormat, CheckpointMode, DocumentKind, XmlError,
    align_backup, align_checkpoint, parse_domain, validate_document,
};

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
        XmlCommand::Format(args) => match format(&args) {
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

/// Reads a document, refusing files over the document size limit without reading them whole.
fn read(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    let limit = u64::try_from(MAX_DOCUMENT_BYTES).unwrap_or(u64::MAX) + 1;
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(format!(
            "{}: larger than the limit of {MAX_DOCUMENT_BYTES} bytes",
            path.display()
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))
}

fn located(path: &Path, err: &XmlError) -> String {
    format!("{}:{err}", path.display())
}

fn validate(args: &ValidateArgs) -> ExitCode {
    let mut all_valid = true;
    let mut results = Vec::new();
    for path in &args.files {
        let file = path.display().to_string();
        let text = match read(path) {
            Ok(text) => text,
            Err(message) => {
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

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn format(args: &FormatArgs) -> Result<String, String> {
    let text = read(&args.file)?;
    let kind = validate_document(&text).map_err(|errors| {
        errors
            .iter()
            .map(|e| located(&args.file, e))
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let at = |e: XmlError| located(&args.file, &e);
    let domain = match &args.domain {
        Some(path) => {
            let domain_text = read(path)?;
            Some(parse_domain(&domain_text).map_err(|e| located(path, &e))?)
        }
        None => None,
    };
    match kind {
        DocumentKind::Checkpoint => {
            let mut def = CheckpointDef::parse(&text, CheckpointMode::Document).map_err(at)?;
            if let Some(domain) = &domain {
                if def.name.is_none() {
                    def.fill_create_defaults(now_s());
                }
                def = align_checkpoint(&def, domain).map_err(at)?;
            }
            Ok(def.format(CheckpointFormat {
                no_domain: args.no_domain,
                include_size: !args.no_size,
            }))
        }
        DocumentKind::Backup => {
            let mut def = BackupDef::parse(&text).map_err(at)?;
            if let Some(domain) = &domain {
                let suffix = args.suffix.clone().unwrap_or_else(|| now_s().to_string());
                def = align_backup(&def, domain, &suffix).map_err(at)?;
            }
            Ok(def.format())
        }
        DocumentKind::Domain => Err(format!(
            "{}: a <domain> document has no canonical form here; give it with --domain",
            args.file.display()
        )),
    }
}
