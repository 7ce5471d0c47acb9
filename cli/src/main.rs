//! `vbackup`: incremental backups of QEMU virtual machines, with virsh-like commands.
//!
//! Each command group lives in its own module; this file only dispatches.

mod xml_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Incremental backup for QEMU virtual machines.
#[derive(Debug, Parser)]
#[command(name = "vbackup", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate and format checkpoint and backup XML documents.
    #[command(subcommand)]
    Xml(xml_cmd::XmlCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Xml(command) => xml_cmd::run(command),
    }
}
