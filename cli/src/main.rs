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
    // Usage errors exit 1 like every other error (as virsh's do); --help and --version 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
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

/// Prints an error as virsh does, with what to do next when the cause is known, and turns the
/// outcome into an exit code.
fn report(result: Result<(), output::CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = e.to_string();
            match next_step(&e, &message) {
                Some(hint) => eprintln!("error: {message}\nerror: {hint}"),
                None => eprintln!("error: {message}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// What to do about an error whose cause is outside vbackup: a daemon that went away, a full
/// filesystem.
fn next_step(e: &output::CliError, message: &str) -> Option<&'static str> {
    use output::CliError;
    let link_lost = matches!(
        e,
        CliError::Drive(vbackup_core::driver::DriveError::Link(_))
            | CliError::Engine(vbackup_core::error::Error::LinkLost(_))
            | CliError::Qmp(vbackup_qemu::qmp_socket::QmpSocketError::Closed)
    ) || message.contains("Broken pipe")
        || message.contains("connection closed");
    if message.contains("No space left on device") || message.contains("os error 28") {
        Some(
            "the filesystem is full (the state directory's, or the one of the file named above): free space there and run the command again",
        )
    } else if link_lost {
        Some(
            "the storage daemon (or QEMU) stopped while the command ran (killed or crashed); run 'vbackup domjobinfo DOMAIN' to see what became of the job, then 'vbackup start DOMAIN' (a managed domain) before trying again",
        )
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_filesystem_is_named_with_what_to_do() {
        let e = output::CliError::Io {
            what: "cannot write 'x'".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        let hint = next_step(&e, &e.to_string()).expect("a hint");
        assert!(hint.starts_with("the filesystem is full"), "{hint}");
        let other = output::CliError::Other("invalid argument: x".into());
        assert_eq!(next_step(&other, &other.to_string()), None);
    }

    #[test]
    fn the_command_definitions_are_consistent() {
        // clap checks its definitions only when asked (or in debug builds at parse time).
        Cli::command().debug_assert();
    }
}
