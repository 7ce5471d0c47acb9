//! The `config-*` commands over the host configuration (`vbackup_host::config`).

use clap::ArgMatches;
use vbackup_host::config::{HostConfig, Setting, shown_keys};
use vbackup_qemu::store::Store;

use crate::output::CliError;
use crate::spec::text;

/// Runs a configuration command.
pub fn run(store: &Store, name: &str, m: &ArgMatches) -> Result<(), CliError> {
    let root = store.root();
    let mut config = HostConfig::load(root)?;
    let key = text(m, "key");
    match name {
        "config-get" => {
            let keys = shown_keys(key.as_deref())?;
            if m.get_flag("json") {
                println!("{}", config.shown_json(&keys));
            } else if key.is_some() {
                match config.shown(keys[0]).0 {
                    Some(Setting::Text(t)) => println!("{t}"),
                    Some(Setting::Number(n)) => println!("{n}"),
                    None => {}
                }
            } else {
                for k in keys {
                    match config.shown(k) {
                        (Some(v), false) => println!("{k} = {v}"),
                        (Some(v), true) => println!("{k} = {v}  # default"),
                        (None, _) => println!("# {k} is not set"),
                    }
                }
            }
            Ok(())
        }
        "config-set" => {
            let key = key.expect("a required argument");
            let value = text(m, "value").expect("a required argument");
            let setting = config.set(root, &key, &value)?;
            println!("{key} = {setting}");
            Ok(())
        }
        _ => {
            let key = key.expect("a required argument");
            config.unset(root, &key)?;
            println!("{key} unset");
            Ok(())
        }
    }
}
