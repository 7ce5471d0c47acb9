//! Helpers for the few QMP shapes serde's derive cannot express exactly (a discriminator beside
//! typed fields plus an open remainder): take known keys out of a JSON object one by one.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Removes `key` from `map` and decodes it; absent keys give `None`.
pub(crate) fn take<T: DeserializeOwned>(
    map: &mut Map<String, Value>,
    key: &str,
) -> Result<Option<T>, String> {
    match map.remove(key) {
        None => Ok(None),
        Some(value) => serde_json::from_value(value)
            .map(Some)
            .map_err(|err| format!("'{key}': {err}")),
    }
}

/// Like [`take`], for keys QMP requires.
pub(crate) fn take_required<T: DeserializeOwned>(
    map: &mut Map<String, Value>,
    key: &str,
) -> Result<T, String> {
    take(map, key)?.ok_or_else(|| format!("missing '{key}'"))
}

/// Fails if `map` still holds keys: for shapes that accept no extra members.
pub(crate) fn reject_rest(map: &Map<String, Value>) -> Result<(), String> {
    match map.keys().next() {
        None => Ok(()),
        Some(key) => Err(format!("unexpected parameter '{key}'")),
    }
}

/// Appends `(key, value)` to an ordered entry list when the value is present.
pub(crate) fn put<T: serde::Serialize>(
    entries: &mut Vec<(String, Value)>,
    key: &str,
    value: &Option<T>,
) -> Result<(), serde_json::Error> {
    if let Some(value) = value {
        entries.push((key.to_owned(), serde_json::to_value(value)?));
    }
    Ok(())
}

/// Serializes ordered entries as one JSON object, keys in the given order.
pub(crate) fn serialize_entries<S: serde::Serializer>(
    entries: &[(String, Value)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = serializer.serialize_map(Some(entries.len()))?;
    for (key, value) in entries {
        map.serialize_entry(key, value)?;
    }
    map.end()
}
