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

use clap::{CommandFactory, Parser, Subcommand};
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
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    ///
    /// Install for bash: `vbackup completion bash > ~/.local/share/bash-completion/completions/vbackup`
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or with --dir write one page per command into DIR.
    ///
    /// Install: `vbackup man --dir /usr/local/share/man/man1` (then `man vbackup`,
    /// `man vbackup-backup-begin`).
    Man {
        /// Directory to write `vbackup.1` and `vbackup-COMMAND.1` into.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
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
        Command::Completion { shell } => {
            // The script comes from the same definitions the parser uses, so it cannot drift.
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "vbackup",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man { dir } => report(man(dir.as_deref())),
    }
}

/// Writes the manual: the top page to stdout, or every page into `dir`.
fn man(dir: Option<&std::path::Path>) -> Result<(), output::CliError> {
    let command = Cli::command();
    match dir {
        None => clap_mangen::Man::new(command)
            .render(&mut std::io::stdout())
            .map_err(output::CliError::io("cannot write the manual page")),
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(output::CliError::io(format!(
                "cannot create '{}'",
                dir.display()
            )))?;
            clap_mangen::generate_to(command, dir).map_err(output::CliError::io(format!(
                "cannot write manual pages into '{}'",
                dir.display()
            )))?;
            println!("Manual pages written to {}", dir.display());
            Ok(())
        }
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

    #[test]
    fn the_command_definitions_are_consistent() {
        // clap checks its definitions only when asked (or in debug builds at parse time).
        Cli::command().debug_assert();
    }
}
