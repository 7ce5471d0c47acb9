//! Arguments virsh takes either by position or by name: `checkpoint-dumpxml vm c1` and
//! `checkpoint-dumpxml --domain vm --checkpointname c1` mean the same, and so does any mix
//! (`--domain vm c1`).
//!
//! clap collects the positional values and the named ones separately; [`fill`] then assigns
//! them as virsh does: each argument takes its named value if given, and the positional values
//! go, in order, to the arguments not given by name.

use clap::Args;

use crate::output::CliError;

/// A domain, by position or with `--domain`.
#[derive(Debug, Clone, Args)]
pub struct DomainArg {
    /// Domain name (or `--domain NAME`).
    #[arg(value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Domain name, as virsh's named form of DOMAIN.
    #[arg(long = "domain", id = "domain_named", value_name = "NAME")]
    pub domain_named: Option<String>,
}

impl DomainArg {
    /// The domain of a command whose only virsh argument it is.
    pub fn get(self, command: &str) -> Result<String, CliError> {
        let [domain] = fill([("domain", self.domain_named)], [self.domain])?;
        required(command, "domain", domain)
    }
}

/// Assigns named and positional values to a command's arguments, in virsh's way: `slots` are
/// the arguments in positional order with their named values; `positional` the values clap
/// gathered by position, in order (`None` once they run out). A positional value left over is
/// refused with virsh's message.
pub fn fill<const N: usize>(
    slots: [(&str, Option<String>); N],
    positional: [Option<String>; N],
) -> Result<[Option<String>; N], CliError> {
    let mut values = positional.into_iter().flatten();
    let filled = slots.map(|(_, named)| named.or_else(|| values.next()));
    match values.next() {
        Some(extra) => Err(CliError::Other(format!("unexpected data '{extra}'"))),
        None => Ok(filled),
    }
}

/// A value a command cannot go without, refused with virsh's message when missing.
pub fn required(command: &str, name: &str, value: Option<String>) -> Result<String, CliError> {
    value.ok_or_else(|| {
        CliError::Other(format!(
            "command '{command}' requires <{name}> option (give it by position or as --{name})"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    #[test]
    fn positional_values_fill_the_arguments_not_given_by_name_in_order() {
        let got = fill(
            [("domain", s("vm")), ("checkpointname", None)],
            [s("c1"), None],
        )
        .unwrap();
        assert_eq!(got, [s("vm"), s("c1")]);
        let got = fill(
            [("domain", None), ("checkpointname", s("c1"))],
            [s("vm"), None],
        )
        .unwrap();
        assert_eq!(got, [s("vm"), s("c1")]);
    }

    #[test]
    fn a_positional_value_left_over_is_refused_as_virsh_does() {
        let err = fill([("domain", s("vm"))], [s("other")]).unwrap_err();
        assert_eq!(err.to_string(), "unexpected data 'other'");
    }

    #[test]
    fn a_missing_required_argument_names_both_forms() {
        let err = required("start", "domain", None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "command 'start' requires <domain> option (give it by position or as --domain)"
        );
    }
}
