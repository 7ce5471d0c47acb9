//! The `config-*` commands over the host configuration (`vbackup_host::config`).

use clap::Subcommand;
use vbackup_host::config::{HostConfig, KEYS, Setting, check_key};
use vbackup_qemu::store::Store;

use crate::output::CliError;

/// Configuration commands (named `config-*` like virsh's command families).
#[derive(Debug, Subcommand)]
#[allow(clippy::enum_variant_names)]
pub enum ConfigCommand {
    /// Show one configuration value, or every key with its value (`vbackup.conf` in the state
    /// directory; libvirt's qemu.conf names).
    ConfigGet {
        /// A key (default: all of them).
        key: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Set a configuration value: backup_tls_x509_cert_dir DIR, backup_tls_x509_verify 0|1,
    /// backup_tls_x509_secret_file FILE, backup_port_min PORT, backup_port_max PORT.
    ConfigSet {
        /// The key.
        key: String,
        /// Its new value.
        value: String,
    },
    /// Remove a configuration value (its default applies again).
    ConfigUnset {
        /// The key.
        key: String,
    },
}

/// Runs a configuration command.
pub fn run(store: &Store, command: ConfigCommand) -> Result<(), CliError> {
    let root = store.root();
    let mut config = HostConfig::load(root)?;
    match command {
        ConfigCommand::ConfigGet { key, json } => {
            let keys: Vec<&str> = match &key {
                Some(k) => {
                    check_key(k)?;
                    vec![k.as_str()]
                }
                None => KEYS.to_vec(),
            };
            if json {
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
        ConfigCommand::ConfigSet { key, value } => {
            let setting = config.set(root, &key, &value)?;
            println!("{key} = {setting}");
            Ok(())
        }
        ConfigCommand::ConfigUnset { key } => {
            config.unset(root, &key)?;
            println!("{key} unset");
            Ok(())
        }
    }
}
