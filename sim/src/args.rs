//! Typed access to QMP `arguments`, refusing bad input with QEMU's parameter texts.

use serde_json::{Map, Value};

use crate::errors::QmpError;

/// The `arguments` object of one command (or the `data` of one transaction action).
#[derive(Clone)]
pub(crate) struct Args<'a> {
    map: Option<&'a Map<String, Value>>,
    /// Prefix of parameter names in error texts, such as `actions[0].` or `addr.`.
    prefix: String,
}

static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();

impl<'a> Args<'a> {
    pub(crate) fn new(value: Option<&'a Value>, prefix: &str) -> Result<Self, QmpError> {
        match value {
            None | Some(Value::Null) => Ok(Self {
                map: None,
                prefix: prefix.to_string(),
            }),
            Some(Value::Object(map)) => Ok(Self {
                map: Some(map),
                prefix: prefix.to_string(),
            }),
            Some(_) => Err(QmpError::invalid_parameter_type(
                prefix.trim_end_matches('.'),
                "object",
            )),
        }
    }

    fn map(&self) -> &'a Map<String, Value> {
        self.map.unwrap_or_else(|| EMPTY.get_or_init(Map::new))
    }

    fn full(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    /// Refuses any key outside `allowed`.
    pub(crate) fn only(&self, allowed: &[&str]) -> Result<(), QmpError> {
        for key in self.map().keys() {
            if !allowed.contains(&key.as_str()) {
                return Err(QmpError::unexpected_parameter(&self.full(key)));
            }
        }
        Ok(())
    }

    pub(crate) fn raw(&self, key: &str) -> Option<&'a Value> {
        self.map().get(key)
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>, QmpError> {
        match self.map().get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(QmpError::invalid_parameter_type(&self.full(key), "string")),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<&'a str, QmpError> {
        self.opt_str(key)?
            .ok_or_else(|| QmpError::missing_parameter(&self.full(key)))
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>, QmpError> {
        match self.map().get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(QmpError::invalid_parameter_type(&self.full(key), "boolean")),
        }
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool, QmpError> {
        Ok(self.opt_bool(key)?.unwrap_or(default))
    }

    pub(crate) fn opt_u64(&self, key: &str) -> Result<Option<u64>, QmpError> {
        match self.map().get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| QmpError::invalid_parameter_type(&self.full(key), "uint64")),
            Some(_) => Err(QmpError::invalid_parameter_type(&self.full(key), "integer")),
        }
    }

    pub(crate) fn u64(&self, key: &str) -> Result<u64, QmpError> {
        self.opt_u64(key)?
            .ok_or_else(|| QmpError::missing_parameter(&self.full(key)))
    }

    /// An optional enum argument: returns the value if it is one of `values`.
    pub(crate) fn opt_enum(&self, key: &str, values: &[&str]) -> Result<Option<&'a str>, QmpError> {
        match self.opt_str(key)? {
            None => Ok(None),
            Some(v) if values.contains(&v) => Ok(Some(v)),
            Some(v) => Err(QmpError::invalid_enum_value(&self.full(key), v)),
        }
    }

    pub(crate) fn sub(&self, key: &str) -> Result<Args<'a>, QmpError> {
        Args::new(self.map().get(key), &format!("{}{}.", self.prefix, key))
    }

    pub(crate) fn opt_array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, QmpError> {
        match self.map().get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(QmpError::invalid_parameter_type(&self.full(key), "array")),
        }
    }

    pub(crate) fn array(&self, key: &str) -> Result<&'a Vec<Value>, QmpError> {
        self.opt_array(key)?
            .ok_or_else(|| QmpError::missing_parameter(&self.full(key)))
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// QEMU's identifier rule for node names and job ids: a letter first, then letters, digits,
/// `-`, `.` and `_`.
pub(crate) fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_and_mistyped_arguments_use_qemu_texts() {
        let v = json!({"node": 5, "extra": true});
        let a = Args::new(Some(&v), "").unwrap();
        assert_eq!(
            a.str("name").unwrap_err().desc,
            "Parameter 'name' is missing"
        );
        assert_eq!(
            a.str("node").unwrap_err().desc,
            "Invalid parameter type for 'node', expected: string"
        );
        assert_eq!(
            a.only(&["node"]).unwrap_err().desc,
            "Parameter 'extra' is unexpected"
        );
        let s = json!({"sync": "sideways"});
        let a = Args::new(Some(&s), "actions[0].").unwrap();
        assert_eq!(
            a.opt_enum("sync", &["full"]).unwrap_err().desc,
            "Parameter 'actions[0].sync' does not accept value 'sideways'"
        );
    }

    #[test]
    fn identifiers_follow_qemu_rules() {
        assert!(id_wellformed("libvirt-2-format"));
        assert!(id_wellformed("a.b_c"));
        assert!(!id_wellformed("#block12"));
        assert!(!id_wellformed("2abc"));
        assert!(!id_wellformed(""));
    }
}
