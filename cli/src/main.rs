//! `vbackup`: incremental backups of QEMU virtual machines, with virsh-like commands.
//!
//! The commands are declared in `cli/commands.toml` ([`spec`]); each command group lives in its
//! own module, and this file only dispatches.

mod commands;
mod config;
mod demo;
mod managed;
mod output;
mod spec;
mod xml_cmd;

// The host runtime's modules under the names the command modules use.
use vbackup_host::processes::lock_holder_lines;
use vbackup_host::session;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Usage errors exit 1 like every other error (as virsh's do); --help and --version 0.
    let matches = match command().try_get_matches() {
        Ok(matches) => matches,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let wait_lock = wait_lock_of(&matches);
    let domain = domain_of(&matches);
    let state_dir = spec::path(&matches, "state_dir");
    let state_dir = state_dir.as_deref();
    let (name, sub) = matches.subcommand().expect("a command is required");
    // Lock files name what their holder does: this command line, without the program.
    let operation: Vec<String> = std::env::args().skip(1).collect();
    session::configure_locking(session::LockSettings {
        wait: std::time::Duration::from_secs(wait_lock.unwrap_or(0)),
        operation: operation.join(" "),
    });
    // Every outcome below is reported with the command's domain, which its hints name.
    let report = |result: Result<(), output::CliError>| report(result, domain.as_deref());
    if wait_lock.is_some() && NEVER_WAIT.contains(&name) {
        eprintln!(
            "error: --wait-lock: '{name}' never waits for the domain lock (it reads the store while another vbackup holds it)"
        );
        return ExitCode::FAILURE;
    }
    match name {
        "xml" => xml_cmd::run(sub),
        "demo" => report(demo::run(sub)),
        "completion" => {
            let shell = *sub.get_one("shell").expect("a required argument");
            // The script comes from the same definitions the parser uses, so it cannot drift.
            // Rendered into memory first: clap_complete panics on a failed write, and a reader
            // that stops early (`| head`) is no reason to crash.
            let mut script = Vec::new();
            clap_complete::generate::<clap_complete::Shell, _>(
                shell,
                &mut command(),
                "vbackup",
                &mut script,
            );
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => report(Err(output::CliError::io(
                    "cannot write the completion script",
                )(e))),
            }
        }
        "man" => report(man(spec::path(sub, "dir").as_deref())),
        _ if name.starts_with("config-") => {
            report(session::open_store(state_dir).and_then(|store| config::run(&store, name, sub)))
        }
        _ if managed::runs(name) => report(managed::run(state_dir, name, sub)),
        _ => {
            let result = commands::run(state_dir, name, sub);
            // An image locked by another process: name the image and who holds it.
            let holders = match &result {
                Err(e) => session::open_store(state_dir)
                    .map(|store| lock_holder_lines(&store, &operation, e))
                    .unwrap_or_default(),
                Ok(()) => Vec::new(),
            };
            if let (Err(e), false) = (&result, holders.is_empty()) {
                eprintln!("error: {}", output::message(e));
                holders.iter().for_each(|h| eprintln!("error: {h}"));
                return ExitCode::FAILURE;
            }
            report(result)
        }
    }
}

/// Writes the manual: the top page to stdout, or every page into `dir`.
fn man(dir: Option<&std::path::Path>) -> Result<(), output::CliError> {
    let command = command();
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

/// The commands that never wait for a domain's lock (they read the store while another
/// vbackup holds the domain), so that `--wait-lock` is refused there rather than silently
/// ignored, and is not offered in their help.
const NEVER_WAIT: [&str; 10] = [
    "list",
    "domblklist",
    "checkpoint-list",
    "checkpoint-parent",
    "checkpoint-info",
    "backup-dumpxml",
    "domjobinfo",
    "xml",
    "completion",
    "man",
];

/// The domain the command line names, by position or with `--domain` (as [`spec::virsh`]
/// assigns them), so that error hints can name it; `None` for a command without one.
fn domain_of(matches: &clap::ArgMatches) -> Option<String> {
    let (name, sub) = matches.subcommand()?;
    spec::virsh(sub, name).ok()?.optional("domain")
}

/// The command line's definition, as parsed, completed and documented.
///
/// `--wait-lock` is taken before the command (`vbackup --wait-lock N CMD`) and by every command
/// that may wait for a domain's lock, but not by those [`NEVER_WAIT`] names: were it global,
/// clap would offer it in their help, completion and manual page too.
fn command() -> clap::Command {
    let command = spec::command();
    let wait_lock = command
        .get_arguments()
        .find(|a| a.get_id() == "wait_lock")
        .cloned()
        .expect("the global options define --wait-lock");
    let waiting: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .filter(|name| !NEVER_WAIT.contains(&name.as_str()))
        .collect();
    waiting.iter().fold(command, |command, name| {
        command.mut_subcommand(name, |sub| sub.arg(wait_lock.clone()))
    })
}

/// `--wait-lock`'s value, before the command or after it (the latter wins).
fn wait_lock_of(matches: &clap::ArgMatches) -> Option<u64> {
    let after = matches
        .subcommand()
        .and_then(|(_, sub)| sub.try_get_one::<u64>("wait_lock").ok().flatten());
    after
        .or_else(|| matches.try_get_one::<u64>("wait_lock").ok().flatten())
        .copied()
}

/// Prints an error as virsh does, with what to do next when the cause is known, and turns the
/// outcome into an exit code. `domain` is the command's domain, named in the hint when known.
fn report(result: Result<(), output::CliError>, domain: Option<&str>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = output::message(&e);
            match e.next_step(domain) {
                Some(hint) => eprintln!("error: {message}\nerror: {hint}"),
                None => eprintln!("error: {message}"),
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_comes_from_either_argument_form() {
        let domain = |args: &[&str]| {
            let matches = command()
                .try_get_matches_from(std::iter::once("vbackup").chain(args.iter().copied()))
                .expect("a valid command line");
            domain_of(&matches)
        };
        assert_eq!(domain(&["backup-begin", "web1"]).as_deref(), Some("web1"));
        assert_eq!(
            domain(&["backup-begin", "--domain", "web1"]).as_deref(),
            Some("web1")
        );
        // The named form takes the domain; the positional value goes to the next argument.
        assert_eq!(
            domain(&["checkpoint-delete", "--domain", "web1", "c1"]).as_deref(),
            Some("web1")
        );
        assert_eq!(
            domain(&["backup-create", "web1", "--state-dir", "/tmp/s"]).as_deref(),
            Some("web1")
        );
        assert_eq!(domain(&["list"]), None);
        assert_eq!(domain(&["completion", "bash"]), None);
    }

    #[test]
    fn the_command_definitions_are_consistent() {
        // clap checks its definitions only when asked (or in debug builds at parse time).
        spec::command().debug_assert();
        command().debug_assert();
    }

    #[test]
    fn wait_lock_goes_before_the_command_or_with_one_that_waits_but_not_with_a_reader() {
        let parse = |args: &[&str]| {
            command().try_get_matches_from(std::iter::once("vbackup").chain(args.iter().copied()))
        };
        let wait = |args: &[&str]| wait_lock_of(&parse(args).expect("a valid command line"));
        assert_eq!(wait(&["--wait-lock", "5", "start", "vm"]), Some(5));
        assert_eq!(wait(&["start", "vm", "--wait-lock", "5"]), Some(5));
        assert_eq!(
            wait(&["checkpoint-create-as", "--wait-lock", "7", "vm", "c1"]),
            Some(7)
        );
        assert_eq!(wait(&["backup-create", "vm", "--wait-lock", "3"]), Some(3));
        assert_eq!(wait(&["start", "vm"]), None);
        // Before a reader it parses, so that main refuses it with its reason.
        assert_eq!(wait(&["--wait-lock", "5", "list"]), Some(5));
        for name in NEVER_WAIT {
            let sub = command().find_subcommand(name).cloned().expect("a command");
            assert!(
                sub.get_arguments().all(|a| a.get_id() != "wait_lock"),
                "{name} offers --wait-lock"
            );
        }
        let err = parse(&["domjobinfo", "vm", "--wait-lock", "5"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
    }
}
