//! `vbackup`: incremental backups of QEMU virtual machines, with virsh-like commands.
//!
//! Each command group lives in its own module; this file only dispatches.

mod commands;
mod config;
mod demo;
mod effects;
mod managed;
mod output;
mod session;
mod virsh_args;
mod xml_cmd;
mod xpath;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Incremental backup for QEMU virtual machines.
#[derive(Debug, Parser)]
#[command(name = "vbackup", version, about)]
struct Cli {
    #[command(flatten)]
    global: commands::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate and format checkpoint and backup XML documents.
    #[command(subcommand)]
    Xml(xml_cmd::XmlCommand),
    /// Domain, checkpoint, backup and job commands.
    #[command(flatten)]
    Domain(commands::DomainCommand),
    /// Managed backups: create, list, restore, delete.
    #[command(flatten)]
    Managed(managed::ManagedCommand),
    /// Host configuration: pull backup TLS certificates and NBD ports.
    #[command(flatten)]
    Config(config::ConfigCommand),
    /// Run the end-to-end demonstration on two fresh qcow2 disks.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Lock files name what their holder does: this command line, without the program.
    let operation: Vec<String> = std::env::args().skip(1).collect();
    session::configure_locking(session::LockSettings {
        wait: std::time::Duration::from_secs(cli.global.wait_lock.unwrap_or(0)),
        operation: operation.join(" "),
    });
    match cli.command {
        Command::Xml(command) => xml_cmd::run(command),
        Command::Domain(command) => report(commands::run(&cli.global, command)),
        Command::Managed(command) => report(managed::run(&cli.global, command)),
        Command::Config(command) => report(
            session::open_store(cli.global.state_dir.as_deref())
                .and_then(|store| config::run(&store, command)),
        ),
        Command::Demo(args) => report(demo::run(&args)),
    }
}

/// Prints an error as virsh does and turns the outcome into an exit code.
fn report(result: Result<(), output::CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_definitions_are_consistent() {
        // clap checks its definitions only when asked (or in debug builds at parse time).
        Cli::command().debug_assert();
    }
}
