//! `vbackup xml validate` and `vbackup xml format`.
//!
//! `validate` picks the grammar from each document's root element (`domaincheckpoint`,
//! `domainbackup`, or `domain` for the domain reader), prints `FILE:LINE:COL: PATH: message`
//! for every error on stderr, and exits 0 only when every file is valid. `format` prints a
//! document in libvirt's canonical form, aligned with a domain's disks when `--domain` is given.

use clap::ArgMatches;
use std::path::PathBuf;
use std::process::ExitCode;
use vbackup_host::documents::{Checked, FormatOptions, check, format_document, located};
use vbackup_host::views;

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
        let checked = check(path);
        all_valid &= matches!(checked, Checked::Valid(_));
        if json {
            results.push(views::checked_json(&file, &checked));
            continue;
        }
        match checked {
            Checked::Unreadable(message) => eprintln!("{message}"),
            Checked::Valid(root) => println!("{file}: valid {root}"),
            Checked::Invalid(errors) => errors
                .iter()
                .for_each(|e| eprintln!("{}", located(path, e))),
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
