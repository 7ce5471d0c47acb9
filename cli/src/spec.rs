//! The command line's definition, declared as data in `cli/commands.toml` and turned here into
//! the one `clap::Command` that parses, completes and documents; and the reading of virsh's
//! arguments, which it takes either by position or by name.
//!
//! `checkpoint-dumpxml vm c1` and `checkpoint-dumpxml --domain vm --checkpointname c1` mean the
//! same, and so does any mix (`--domain vm c1`): clap collects the positional values and the
//! named ones separately, and [`virsh`] assigns them as virsh does: each argument takes its
//! named value if given, and the positional values go, in order, to the arguments not given by
//! name.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use clap::{Arg, ArgAction, ArgMatches, Command, value_parser};
use serde::Deserialize;

use crate::output::CliError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    arg: Vec<ArgSpec>,
    shared: BTreeMap<String, ArgSpec>,
    command: Vec<CommandSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandSpec {
    name: String,
    about: String,
    long_about: Option<String>,
    #[serde(default)]
    never_waits: bool,
    #[serde(default)]
    arg: Vec<ArgSpec>,
    #[serde(default)]
    command: Vec<CommandSpec>,
}

/// One argument, as `commands.toml` declares it (its header says what each field means).
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ArgSpec {
    #[serde(rename = "use")]
    shared: Option<String>,
    id: String,
    positional: bool,
    long: Option<String>,
    value_name: Option<String>,
    flag: bool,
    repeat: bool,
    #[serde(rename = "type")]
    kind: Kind,
    min: Option<u64>,
    default: Option<String>,
    required: bool,
    global: bool,
    help_heading: Option<String>,
    conflicts_with: Option<String>,
    requires: Option<String>,
    help: String,
    long_help: Option<String>,
    named: Option<String>,
    named_id: Option<String>,
    named_value_name: Option<String>,
    named_help: Option<String>,
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    #[default]
    Text,
    Path,
    U64,
    Shell,
}

/// The declarations, read once per process.
fn spec() -> &'static Spec {
    static SPEC: OnceLock<Spec> = OnceLock::new();
    SPEC.get_or_init(|| {
        toml::from_str(include_str!("../commands.toml")).expect("commands.toml is valid")
    })
}

/// The command line's definition, as parsed, completed and documented.
///
/// `--wait-lock` is taken before the command (`vbackup --wait-lock N CMD`) and by every command
/// that may wait for a domain's lock, but not by those that [`never_waits`]: were it global,
/// clap would offer it in their help, completion and manual page too.
pub fn command() -> Command {
    let spec = spec();
    let root = Command::new("vbackup")
        .version(env!("CARGO_PKG_VERSION"))
        .about(env!("CARGO_PKG_DESCRIPTION"));
    let root = with_args(root, &spec.arg);
    let wait_lock = root.get_arguments().find(|a| a.get_id() == "wait_lock");
    let wait_lock = wait_lock
        .cloned()
        .expect("the global options define --wait-lock");
    // Added after the commands are declared, as `mut_subcommand` moves each command it changes
    // to the end of the list the completion scripts follow (their help keeps its order).
    let waiting = spec.command.iter().filter(|c| !c.never_waits);
    waiting.fold(subcommands(root, &spec.command), |root, c| {
        root.mut_subcommand(&c.name, |sub| sub.arg(wait_lock.clone()))
    })
}

/// Whether `command` never waits for a domain's lock, so refuses `--wait-lock`.
pub fn never_waits(command: &str) -> bool {
    spec()
        .command
        .iter()
        .any(|c| c.name == command && c.never_waits)
}

fn subcommands(parent: Command, specs: &'static [CommandSpec]) -> Command {
    let parent = parent
        .subcommand_required(true)
        .arg_required_else_help(true);
    specs.iter().fold(parent, |parent, s| {
        let command = Command::new(&s.name)
            .about(&s.about)
            .long_about(s.long_about.as_deref());
        let command = with_args(command, &s.arg);
        parent.subcommand(match s.command.is_empty() {
            true => command,
            false => subcommands(command, &s.command),
        })
    })
}

fn with_args(command: Command, specs: &'static [ArgSpec]) -> Command {
    specs.iter().map(resolve).fold(command, |command, a| {
        let command = command.arg(arg(a));
        match &a.named {
            Some(long) => command.arg(
                Arg::new(named_id(a))
                    .long(long)
                    .value_name(a.named_value_name.as_deref())
                    .help(a.named_help.as_deref()),
            ),
            None => command,
        }
    })
}

/// The declaration `use = "NAME"` stands for, or the argument itself.
fn resolve(a: &'static ArgSpec) -> &'static ArgSpec {
    match &a.shared {
        Some(name) => &spec().shared[name],
        None => a,
    }
}

/// The id of the named form of a virsh argument.
fn named_id(a: &ArgSpec) -> String {
    a.named_id.clone().unwrap_or(format!("{}_named", a.id))
}

fn arg(a: &'static ArgSpec) -> Arg {
    let mut arg = Arg::new(&a.id)
        .value_name(a.value_name.clone().unwrap_or(a.id.to_uppercase()))
        .help(&a.help)
        .long_help(a.long_help.as_deref())
        .help_heading(a.help_heading.as_deref())
        .default_value(a.default.as_deref())
        .required(a.required)
        .global(a.global);
    if !a.positional {
        arg = arg.long(a.long.clone().unwrap_or(a.id.replace('_', "-")));
    }
    if let Some(other) = &a.conflicts_with {
        arg = arg.conflicts_with(other);
    }
    if let Some(other) = &a.requires {
        arg = arg.requires(other);
    }
    arg = match (a.flag, a.repeat) {
        (true, _) => arg.action(ArgAction::SetTrue),
        (false, true) if a.positional => arg.action(ArgAction::Append).num_args(1..),
        (false, true) => arg.action(ArgAction::Append),
        (false, false) => arg.action(ArgAction::Set),
    };
    match (&a.kind, a.min) {
        _ if a.flag => arg,
        (Kind::Text, _) => arg.value_parser(value_parser!(String)),
        (Kind::Path, _) => arg.value_parser(value_parser!(PathBuf)),
        (Kind::U64, None) => arg.value_parser(value_parser!(u64)),
        (Kind::U64, Some(min)) => arg.value_parser(value_parser!(u64).range(min..)),
        (Kind::Shell, _) => arg.value_parser(value_parser!(clap_complete::Shell)),
    }
}

/// A text value, when given.
pub fn text(m: &ArgMatches, id: &str) -> Option<String> {
    m.get_one::<String>(id).cloned()
}

/// A path value, when given.
pub fn path(m: &ArgMatches, id: &str) -> Option<PathBuf> {
    m.get_one::<PathBuf>(id).cloned()
}

/// Every value of a repeatable argument, in order.
pub fn texts(m: &ArgMatches, id: &str) -> Vec<String> {
    m.get_many::<String>(id)
        .into_iter()
        .flatten()
        .cloned()
        .collect()
}

/// The values of a command's virsh arguments (its positional text arguments, in order), each
/// under its virsh name (`--domain`'s: `domain`).
pub struct Virsh {
    command: String,
    values: Vec<(&'static str, Option<String>)>,
}

/// Assigns `matches`' named and positional values to `command`'s virsh arguments, in virsh's
/// way; a positional value left over is refused with virsh's message.
pub fn virsh(matches: &ArgMatches, command: &str) -> Result<Virsh, CliError> {
    let declared = spec().command.iter().find(|c| c.name == command);
    let args = declared.map(|c| c.arg.as_slice()).unwrap_or_default();
    let args = args.iter().map(resolve);
    let slots: Vec<&ArgSpec> = args
        .filter(|a| a.positional && a.kind == Kind::Text)
        .collect();
    let mut positional = slots.iter().filter_map(|a| text(matches, &a.id));
    let values = slots
        .iter()
        .map(|a| {
            let named = a.named.as_ref().and_then(|_| text(matches, &named_id(a)));
            let name = a.named.as_deref().unwrap_or(&a.id);
            (name, named.or_else(|| positional.next()))
        })
        .collect();
    match positional.next() {
        Some(extra) => Err(CliError::Other(format!("unexpected data '{extra}'"))),
        None => Ok(Virsh {
            command: command.to_owned(),
            values,
        }),
    }
}

/// The domain of a command whose only required virsh argument it is.
pub fn domain(matches: &ArgMatches, command: &str) -> Result<String, CliError> {
    virsh(matches, command)?.required("domain")
}

impl Virsh {
    /// The value of `name`, when given.
    pub fn optional(&self, name: &str) -> Option<String> {
        let value = self.values.iter().find(|(n, _)| *n == name);
        value.and_then(|(_, v)| v.clone())
    }

    /// A value the command cannot go without, refused with virsh's message when missing.
    pub fn required(&self, name: &str) -> Result<String, CliError> {
        self.optional(name).ok_or_else(|| {
            CliError::Other(format!(
                "command '{}' requires <{name}> option (give it by position or as --{name})",
                self.command
            ))
        })
    }
}
