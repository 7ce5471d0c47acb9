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

use output::CliError;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Usage errors exit 1 like every other error (as virsh's do); --help and --version 0.
    let matches = match spec::command().try_get_matches() {
        Ok(matches) => matches,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::from(e.use_stderr()));
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
    let report = |result: Result<(), CliError>| report(result, domain.as_deref());
    if wait_lock.is_some() && spec::never_waits(name) {
        eprintln!(
            "error: --wait-lock: '{name}' never waits for the domain lock (it reads the store while another vbackup holds it)"
        );
        return ExitCode::FAILURE;
    }
    match name {
        "xml" => xml_cmd::run(sub),
        "demo" => report(demo::run(sub)),
        "completion" => {
            let shell: clap_complete::Shell = *sub.get_one("shell").expect("a required argument");
            // The script comes from the same definitions the parser uses, so it cannot drift.
            // Rendered into memory first: clap_complete panics on a failed write, and a reader
            // that stops early (`| head`) is no reason to crash.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut spec::command(), "vbackup", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => report(Err(CliError::io("cannot write the completion script")(e))),
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
                eprintln!("error: {}", e.message());
                holders.iter().for_each(|h| eprintln!("error: {h}"));
                return ExitCode::FAILURE;
            }
            report(result)
        }
    }
}

/// Writes the manual: the top page to stdout, or every page into `dir`.
fn man(dir: Option<&std::path::Path>) -> Result<(), CliError> {
    let command = spec::command();
    match dir {
        None => clap_mangen::Man::new(command)
            .render(&mut std::io::stdout())
            .map_err(CliError::io("cannot write the manual page")),
        Some(dir) => {
            let shown = dir.display();
            let failed = format!("cannot create '{shown}'");
            std::fs::create_dir_all(dir).map_err(CliError::io(failed))?;
            let failed = format!("cannot write manual pages into '{shown}'");
            clap_mangen::generate_to(command, dir).map_err(CliError::io(failed))?;
            println!("Manual pages written to {shown}");
            Ok(())
        }
    }
}

/// The domain the command line names, by position or with `--domain` (as [`spec::virsh`]
/// assigns them), so that error hints can name it; `None` for a command without one.
fn domain_of(matches: &clap::ArgMatches) -> Option<String> {
    let (name, sub) = matches.subcommand()?;
    spec::virsh(sub, name).ok()?.optional("domain")
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
fn report(result: Result<(), CliError>, domain: Option<&str>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = e.message();
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
    #[test]
    fn the_command_definitions_are_consistent() {
        // clap checks its definitions only when asked (or in debug builds at parse time).
        crate::spec::command().debug_assert();
    }
}
