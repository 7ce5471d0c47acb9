//! vbackup's host configuration: `vbackup.conf` at the root of the state directory, in the
//! syntax and with the key names of libvirt's `qemu.conf` (the `config-*` commands print it).
//!
//! Contract:
//! - The file holds `key = value` lines: a value is a double-quoted string or an integer; `#`
//!   starts a comment line. Unknown keys and values of the wrong type are errors naming the
//!   line, so a typo never silently disables TLS.
//! - Keys: `backup_tls_x509_cert_dir` (directory with `ca-cert.pem`, `server-cert.pem`,
//!   `server-key.pem`), `backup_tls_x509_verify` (0 or 1, default 1: clients must present a
//!   certificate the CA signed), `backup_tls_x509_secret_file` (a file holding the server key's
//!   passphrase; libvirt takes a secret uuid instead), `backup_port_min` and `backup_port_max`
//!   (default 10809 and 10872: the ports tried for a pull backup whose TCP `<server>` gives
//!   none).
//! - The settings apply to domains attached to a QEMU (`define --qmp`): vbackup starts their pull
//!   backups' NBD server where the backup XML says. A managed domain's daemon already runs the
//!   one NBD server it may have, on its own socket, without TLS.
//! - `config-set` checks a value before writing it (a certificate directory must hold the three
//!   files; the port range may not become empty, so a range above the default one is set
//!   maximum first) and writes the file atomically; `config-unset` goes back to the default.

pub use crate::layout::CONFIG_FILE;
use std::collections::BTreeMap;
use std::path::Path;

use vbackup_core::domain::{DomainConfig, TlsConfig};
use vbackup_qemu::store::write_atomic;

use crate::error::Error;

/// The files a backup TLS certificate directory must hold (QEMU's `tls-creds-x509` names).
pub const TLS_FILES: [&str; 3] = ["ca-cert.pem", "server-cert.pem", "server-key.pem"];

/// The certificate directory of pull backups with `tls='yes'`.
pub const CERT_DIR: &str = "backup_tls_x509_cert_dir";
/// Whether the NBD server verifies client certificates.
pub const VERIFY: &str = "backup_tls_x509_verify";
/// A file holding the passphrase of `server-key.pem`.
pub const SECRET_FILE: &str = "backup_tls_x509_secret_file";
/// Lowest TCP port for a pull backup that gives none.
pub const PORT_MIN: &str = "backup_port_min";
/// Highest such port.
pub const PORT_MAX: &str = "backup_port_max";

/// Every key, in the order `config-get` lists them.
pub const KEYS: [&str; 5] = [CERT_DIR, VERIFY, SECRET_FILE, PORT_MIN, PORT_MAX];

/// A configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// A quoted string (a path).
    Text(String),
    /// A number.
    Number(u64),
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Setting::Text(t) => {
                write!(f, "\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\""))
            }
            Setting::Number(n) => write!(f, "{n}"),
        }
    }
}

/// The host configuration as stored: only the keys that were set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    values: BTreeMap<String, Setting>,
}

fn config_error(text: String) -> Error {
    Error::Other(format!("configuration error: {text}"))
}

/// Refuses a key that is not one of [`KEYS`].
pub fn check_key(key: &str) -> Result<(), Error> {
    if KEYS.contains(&key) {
        Ok(())
    } else {
        Err(config_error(format!(
            "unknown key '{key}' (known keys: {})",
            KEYS.join(", ")
        )))
    }
}

/// The keys `config-get` shows: `key` (checked), or without one every key.
pub fn shown_keys(key: Option<&str>) -> Result<Vec<&str>, Error> {
    match key {
        Some(k) => check_key(k).map(|()| vec![k]),
        None => Ok(KEYS.to_vec()),
    }
}

/// Whether `key` takes a string (a path) rather than a number.
fn is_text(key: &str) -> bool {
    key == CERT_DIR || key == SECRET_FILE
}

fn parse_value(text: &str) -> Option<Setting> {
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(chars.next()?),
                '"' => return None,
                c => out.push(c),
            }
        }
        return Some(Setting::Text(out));
    }
    text.parse().ok().map(Setting::Number)
}

impl HostConfig {
    /// Reads `text` (the file's content); `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<HostConfig, Error> {
        let mut values = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("{}:{}", file.display(), i + 1);
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| config_error(format!("{}: expected 'key = value'", at())))?;
            let key = key.trim();
            check_key(key).map_err(|e| config_error(format!("{}: {e}", at())))?;
            let value = parse_value(value.trim()).ok_or_else(|| {
                config_error(format!(
                    "{}: the value of {key} must be a quoted string or a number",
                    at()
                ))
            })?;
            if is_text(key) != matches!(value, Setting::Text(_)) {
                return Err(config_error(format!(
                    "{}: {key} takes {}",
                    at(),
                    if is_text(key) {
                        "a quoted path"
                    } else {
                        "a number"
                    }
                )));
            }
            values.insert(key.to_owned(), value);
        }
        let config = HostConfig { values };
        config
            .port_range()
            .map_err(|e| config_error(format!("{}: {e}", file.display())))?;
        Ok(config)
    }

    /// Reads the configuration of the state directory `root` (empty when there is no file).
    pub fn load(root: &Path) -> Result<HostConfig, Error> {
        let path = root.join(CONFIG_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => HostConfig::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HostConfig::default()),
            Err(e) => Err(Error::Other(format!(
                "cannot read '{}': {e}",
                path.display()
            ))),
        }
    }

    fn text(&self, key: &str) -> Option<&str> {
        match self.values.get(key) {
            Some(Setting::Text(t)) => Some(t),
            _ => None,
        }
    }

    fn number(&self, key: &str) -> Option<u64> {
        match self.values.get(key) {
            Some(Setting::Number(n)) => Some(*n),
            _ => None,
        }
    }

    /// The TCP port range of pull backups that give no port.
    fn port_range(&self) -> Result<(u16, u16), String> {
        let defaults = DomainConfig::default();
        let port = |key: &str, default: u16| match self.number(key) {
            None => Ok(default),
            Some(n) => u16::try_from(n)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{key} must be a TCP port (1-65535), not {n}")),
        };
        let min = port(PORT_MIN, defaults.nbd_port_min)?;
        let max = port(PORT_MAX, defaults.nbd_port_max)?;
        if min > max {
            // The file never holds an empty range; the message says which key to move first.
            return Err(format!(
                "{PORT_MIN} ({min}) is above {PORT_MAX} ({max}): a range above the current one needs {PORT_MAX} set first, one below it {PORT_MIN}"
            ));
        }
        Ok((min, max))
    }

    /// The certificate directory, when one is configured.
    pub fn tls_cert_dir(&self) -> Option<&str> {
        self.text(CERT_DIR)
    }

    /// The TLS settings of the NBD server vbackup starts, when a certificate directory is set.
    pub fn tls(&self) -> Option<TlsConfig> {
        Some(TlsConfig {
            cert_dir: self.tls_cert_dir()?.to_owned(),
            verify_peer: self.number(VERIFY).is_none_or(|v| v != 0),
            secret_file: self.text(SECRET_FILE).map(str::to_owned),
        })
    }

    /// Fills the NBD port range and TLS settings into `config`.
    pub fn apply(&self, config: &mut DomainConfig) {
        if let Ok((min, max)) = self.port_range() {
            config.nbd_port_min = min;
            config.nbd_port_max = max;
        }
        config.tls = self.tls();
    }

    /// `keys` with their values as `config-get --json` shows them: `{key: {value, default}}`,
    /// `value` null when neither set nor defaulted.
    pub fn shown_json(&self, keys: &[&str]) -> serde_json::Value {
        let entry = |k: &&str| {
            let (v, default) = self.shown(k);
            let value = match v {
                Some(Setting::Text(t)) => serde_json::json!(t),
                Some(Setting::Number(n)) => serde_json::json!(n),
                None => serde_json::Value::Null,
            };
            (
                (*k).to_owned(),
                serde_json::json!({"value": value, "default": default}),
            )
        };
        serde_json::Value::Object(keys.iter().map(entry).collect())
    }

    /// The value of `key` as `config-get` shows it: set, or the default, or nothing.
    pub fn shown(&self, key: &str) -> (Option<Setting>, bool) {
        if let Some(v) = self.values.get(key) {
            return (Some(v.clone()), false);
        }
        let defaults = DomainConfig::default();
        let default = match key {
            VERIFY => Some(Setting::Number(1)),
            PORT_MIN => Some(Setting::Number(defaults.nbd_port_min.into())),
            PORT_MAX => Some(Setting::Number(defaults.nbd_port_max.into())),
            _ => None,
        };
        (default, true)
    }

    /// Sets `key` to `value` (checked as `config-set` does, the range kept non-empty) and
    /// writes the file of the state directory `root`; returns the value as stored.
    pub fn set(&mut self, root: &Path, key: &str, value: &str) -> Result<Setting, Error> {
        check_key(key)?;
        let setting = checked_value(key, value)?;
        self.values.insert(key.to_owned(), setting.clone());
        self.port_range().map_err(config_error)?;
        write_atomic(root, CONFIG_FILE, self.to_text().as_bytes())?;
        Ok(setting)
    }

    /// Removes `key` (its default applies again) and writes the file of `root`.
    pub fn unset(&mut self, root: &Path, key: &str) -> Result<(), Error> {
        check_key(key)?;
        self.values.remove(key);
        self.port_range().map_err(config_error)?;
        write_atomic(root, CONFIG_FILE, self.to_text().as_bytes())?;
        Ok(())
    }

    fn to_text(&self) -> String {
        let mut text = String::from(
            "# vbackup host configuration (libvirt qemu.conf syntax); see `vbackup config-get`.\n",
        );
        for key in KEYS {
            if let Some(v) = self.values.get(key) {
                text.push_str(&format!("{key} = {v}\n"));
            }
        }
        text
    }
}

/// Refuses a certificate directory QEMU could not use, naming what is missing.
pub fn check_cert_dir(dir: &Path) -> Result<(), Error> {
    if !dir.is_dir() {
        return Err(config_error(format!(
            "{CERT_DIR} '{}' is not a directory",
            dir.display()
        )));
    }
    let missing: Vec<&str> = TLS_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(config_error(format!(
            "{CERT_DIR} '{}' lacks {}",
            dir.display(),
            missing.join(", ")
        )))
    }
}

/// The value `config-set` stores for `key`, checked.
fn checked_value(key: &str, value: &str) -> Result<Setting, Error> {
    match key {
        CERT_DIR | SECRET_FILE => {
            let path = std::path::absolute(value).map_err(Error::io(format!("path '{value}'")))?;
            if key == CERT_DIR {
                check_cert_dir(&path)?;
            } else if !path.is_file() {
                return Err(config_error(format!(
                    "{SECRET_FILE} '{}' is not a file",
                    path.display()
                )));
            }
            let text = path
                .to_str()
                .ok_or_else(|| config_error(format!("{key}: the path is not UTF-8")))?;
            Ok(Setting::Text(text.to_owned()))
        }
        VERIFY => match value {
            "1" | "yes" | "true" => Ok(Setting::Number(1)),
            "0" | "no" | "false" => Ok(Setting::Number(0)),
            _ => Err(config_error(format!(
                "{VERIFY} takes 0 or 1, not '{value}'"
            ))),
        },
        _ => value
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .map(|p| Setting::Number(p.into()))
            .ok_or_else(|| {
                config_error(format!("{key} takes a TCP port (1-65535), not '{value}'"))
            }),
    }
}

/// The certificate files of a configured TLS directory, for messages.
pub fn tls_hint() -> String {
    format!(
        "set it with `vbackup config-set {CERT_DIR} DIR`, a directory holding {}",
        TLS_FILES.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn qemu_conf_lines_read_back_and_typos_are_errors_naming_the_line() {
        let file = PathBuf::from("/s/vbackup.conf");
        let c = HostConfig::parse(
            "# comment\nbackup_tls_x509_cert_dir = \"/etc/pki/vb\"\nbackup_tls_x509_verify = 0\nbackup_port_min = 11000\nbackup_port_max = 11010\n",
            &file,
        )
        .unwrap();
        let mut config = DomainConfig::default();
        c.apply(&mut config);
        assert_eq!((config.nbd_port_min, config.nbd_port_max), (11000, 11010));
        let tls = config.tls.unwrap();
        assert_eq!(tls.cert_dir, "/etc/pki/vb");
        assert!(!tls.verify_peer);
        assert_eq!(HostConfig::parse(&c.to_text(), &file).unwrap(), c);
        let e = HostConfig::parse("backup_tls_x509_certdir = \"/x\"\n", &file).unwrap_err();
        assert!(e.to_string().contains("vbackup.conf:1"), "{e}");
        let e = HostConfig::parse("backup_port_min = \"10\"\n", &file).unwrap_err();
        assert!(e.to_string().contains("takes a number"), "{e}");
        let e = HostConfig::parse("backup_port_min = 20000\n", &file).unwrap_err();
        assert!(e.to_string().contains("above"), "{e}");
    }

    #[test]
    fn without_a_certificate_directory_there_is_no_tls_and_verify_defaults_on() {
        let file = PathBuf::from("/s/vbackup.conf");
        assert!(HostConfig::default().tls().is_none());
        let c = HostConfig::parse("backup_tls_x509_cert_dir = \"/d\"\n", &file).unwrap();
        assert!(c.tls().unwrap().verify_peer);
    }
}
