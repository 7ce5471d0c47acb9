//! `vbackup_core` for Python: XML validation and formatting, and the per-domain engine.
//!
//! This one file is all the glue between vbackup-core's public API and Python. Inputs and outputs
//! of [`Domain::handle`] cross the boundary as plain dicts in the JSON shapes `python/README.md`
//! documents (QMP messages exactly as on the wire, as in the trace format). Each call converts a
//! Python object into a `serde_json::Value`, decodes that into the engine's types in Rust, and
//! turns the engine's outputs back into values and then Python objects. Malformed input raises
//! `ValueError`; a request the engine (or the XML layer) refuses is an answer, not an exception.

use std::time::{SystemTime, UNIX_EPOCH};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Value, json};

use vbackup::Domain as Engine;
use vbackup::backup::{BackupPlan, BackupSpec, NbdServer, NbdTransport};
use vbackup::checkpoint::{Checkpoint, CheckpointTree, DeleteScope, ListFilter};
use vbackup::domain::{
    BitmapDrift, DomainConfig, DomainEvent, FileError, FileErrorKind, FileOp, FileOpId, Input,
    Output, PushWrite, Reply, Request, RequestId, StoreOp, TlsConfig,
};
use vbackup::error::Error;
use vbackup::link::Timestamp;
use vbackup::model::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};
use vbackup::qmp::QmpIn;
use vbackup::xml::{
    BackupDef, CheckpointDef, CheckpointFormat, CheckpointMode, DocumentKind, XmlError,
    align_backup, align_checkpoint, align_redefined_checkpoint, parse_domain, validate_document,
};

/// Deepest nesting of lists and dicts accepted from Python (QMP messages are shallow).
const MAX_DEPTH: usize = 64;

// ----- Python <-> JSON -----

fn value_error(message: impl Into<String>) -> PyErr {
    PyValueError::new_err(message.into())
}

/// A Python object (None, bool, int, float, str, list, tuple, dict with str keys) as JSON.
fn to_value(obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        return Err(value_error(format!(
            "input nested deeper than {MAX_DEPTH} levels"
        )));
    }
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.cast::<PyInt>().is_ok() {
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        return Err(value_error(format!(
            "integer {obj} does not fit in 64 bits"
        )));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return serde_json::Number::from_f64(f.value())
            .map(Value::Number)
            .ok_or_else(|| value_error(format!("{obj} is not a finite number")));
    }
    if obj.cast::<PyString>().is_ok() {
        return Ok(Value::String(obj.extract::<String>()?));
    }
    if let Ok(dict) = obj.cast::<PyDict>() {
        let mut map = Map::new();
        for (key, item) in dict.iter() {
            if key.cast::<PyString>().is_err() {
                return Err(value_error(format!("dict key {key:?} is not a str")));
            }
            map.insert(key.extract::<String>()?, to_value(&item, depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    if obj.cast::<PyList>().is_ok() || obj.cast::<PyTuple>().is_ok() {
        let mut items = Vec::new();
        for item in obj.try_iter()? {
            items.push(to_value(&item?, depth + 1)?);
        }
        return Ok(Value::Array(items));
    }
    let type_name = obj.get_type().name()?;
    Err(value_error(format!(
        "a value of type {type_name} has no JSON form (use None, bool, int, float, str, list or dict)"
    )))
}

/// JSON as Python objects: dicts, lists, str, int, float, bool and None.
fn to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (key, item) in map {
                dict.set_item(key, to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

fn optional_value(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Value> {
    obj.map_or(Ok(Value::Null), |o| to_value(o, 0))
}

// ----- reading dict fields -----

/// The members of a JSON object, read one by one; unknown members are refused at the end.
struct Fields<'a> {
    what: &'a str,
    map: Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn new(what: &'a str, value: Value) -> Result<Self, String> {
        match value {
            Value::Object(map) => Ok(Self { what, map }),
            Value::Null => Ok(Self {
                what,
                map: Map::new(),
            }),
            other => Err(format!("{what}: expected a dict, got {other}")),
        }
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(format!("{}: '{key}' must be a str, got {other}", self.what)),
        }
    }

    fn required_string(&mut self, key: &str) -> Result<String, String> {
        self.string(key)?
            .ok_or_else(|| format!("{}: '{key}' is required", self.what))
    }

    fn boolean(&mut self, key: &str) -> Result<bool, String> {
        match self.take(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(other) => Err(format!(
                "{}: '{key}' must be a bool, got {other}",
                self.what
            )),
        }
    }

    fn unsigned(&mut self, key: &str) -> Result<Option<u64>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(other) => Err(format!(
                "{}: '{key}' must be a non-negative int, got {other}",
                self.what
            )),
        }
    }

    fn strings(&mut self, key: &str) -> Result<Vec<String>, String> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(format!(
                        "{}: '{key}' must hold str items, got {other}",
                        self.what
                    )),
                })
                .collect(),
            Some(other) => Err(format!(
                "{}: '{key}' must be a list of str, got {other}",
                self.what
            )),
        }
    }

    fn finish(self) -> Result<(), String> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(key) => Err(format!("{}: unknown key '{key}'", self.what)),
        }
    }
}

// ----- XML -----

fn messages(errors: &[XmlError]) -> Vec<String> {
    errors.iter().map(ToString::to_string).collect()
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks a `<domaincheckpoint>`, `<domainbackup>` or `<domain>` document against its grammar
/// and libvirt's parser rules, as `vbackup xml validate` does. Returns one message per error
/// (`LINE:COL: PATH: message`); an empty list means the document is valid.
#[pyfunction]
fn validate_xml(text: &str) -> Vec<String> {
    match validate_document(text) {
        Ok(_) => Vec::new(),
        Err(errors) => messages(&errors),
    }
}

/// The canonical (libvirt) form of a checkpoint or backup document, as `vbackup xml format`
/// prints it. With `domain` (a `<domain>` document) the definition is first aligned with its
/// disks; `suffix` names generated backup files (default: the current Unix time in seconds).
/// Raises `ValueError` with every error's message, one per line, when the document is invalid.
#[pyfunction]
#[pyo3(signature = (text, *, domain=None, suffix=None, no_domain=false, no_size=false))]
fn format_xml(
    text: &str,
    domain: Option<&str>,
    suffix: Option<&str>,
    no_domain: bool,
    no_size: bool,
) -> PyResult<String> {
    format_document(text, domain, suffix, no_domain, no_size).map_err(value_error)
}

fn format_document(
    text: &str,
    domain: Option<&str>,
    suffix: Option<&str>,
    no_domain: bool,
    no_size: bool,
) -> Result<String, String> {
    let kind = validate_document(text).map_err(|errors| messages(&errors).join("\n"))?;
    let domain = domain
        .map(|d| parse_domain(d).map_err(|e| format!("domain: {e}")))
        .transpose()?;
    let text_error = |e: XmlError| e.to_string();
    match kind {
        DocumentKind::Checkpoint => {
            let mut def =
                CheckpointDef::parse(text, CheckpointMode::Document).map_err(text_error)?;
            if let Some(domain) = &domain {
                if def.name.is_none() {
                    def.fill_create_defaults(now_s());
                }
                def = align_checkpoint(&def, domain).map_err(text_error)?;
            }
            Ok(def.format(CheckpointFormat {
                no_domain,
                include_size: !no_size,
            }))
        }
        DocumentKind::Backup => {
            let mut def = BackupDef::parse(text).map_err(text_error)?;
            if let Some(domain) = &domain {
                let suffix = suffix.map_or_else(|| now_s().to_string(), str::to_owned);
                def = align_backup(&def, domain, &suffix).map_err(text_error)?;
            }
            Ok(def.format())
        }
        DocumentKind::Domain => {
            Err("a <domain> document has no canonical form here; give it as domain= instead".into())
        }
    }
}

// ----- the domain definition and configuration -----

/// One layer from its dict form: a node name, or `{"node-name", "path", "format", "storage"}`.
fn layer(target: &str, value: Value) -> Result<Layer, String> {
    let what = format!("disk '{target}'");
    let (node_name, path, format, storage) = match value {
        Value::String(node) => (Some(node), None, None, None),
        other => {
            let mut f = Fields::new(&what, other)?;
            let node = f.string("node-name")?;
            let path = f.string("path")?;
            let format = f.string("format")?;
            let storage = f.string("storage")?;
            f.finish()?;
            (node, path, format, storage)
        }
    };
    let storage = match storage.as_deref() {
        None | Some("file") => StorageType::File,
        Some("block") => StorageType::Block,
        Some("network") => StorageType::Network,
        Some(other) => {
            return Err(format!(
                "{what}: storage '{other}' (expected file, block or network)"
            ));
        }
    };
    Ok(Layer {
        storage,
        format: ImageFormat::from_name(format.as_deref().unwrap_or("qcow2")),
        path,
        index: None,
        node_name,
    })
}

/// A definition from its dict form (see the README): `{"name", "uuid"?, "disks": {target:
/// layers}}`, or the engine's own serialized form with `disks` as a list.
fn definition_from_dict(value: Value) -> Result<DomainDef, String> {
    if value.get("disks").is_some_and(Value::is_array) {
        return serde_json::from_value(value).map_err(|e| format!("domain definition: {e}"));
    }
    let mut f = Fields::new("domain definition", value)?;
    let name = f.string("name")?.unwrap_or_else(|| "domain".to_owned());
    let uuid = f.string("uuid")?;
    let disks = match f.take("disks") {
        Some(Value::Object(map)) => map,
        None => return Err("domain definition: 'disks' is required".into()),
        Some(other) => {
            return Err(format!(
                "domain definition: 'disks' must be a dict of target to layers, got {other}"
            ));
        }
    };
    f.finish()?;
    let mut out = Vec::new();
    for (target, layers) in disks {
        let layers = match layers {
            Value::Array(items) => items
                .into_iter()
                .map(|l| layer(&target, l))
                .collect::<Result<Vec<_>, _>>()?,
            one => vec![layer(&target, one)?],
        };
        out.push(DiskDef {
            target,
            device: DiskDevice::Disk,
            bus: None,
            readonly: false,
            transient: false,
            layers,
        });
    }
    Ok(DomainDef {
        name,
        uuid,
        disks: out,
    })
}

/// Gives the layers of `def` the node names of `names` (target to one name or a list, top first).
fn apply_node_names(def: &mut DomainDef, names: Value) -> Result<(), String> {
    let Value::Object(map) = names else {
        return Err("node_names: expected a dict of disk target to node name(s)".into());
    };
    for (target, value) in map {
        let names: Vec<String> = match value {
            Value::String(s) => vec![s],
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(format!("node_names['{target}']: {other} is not a str")),
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(format!(
                    "node_names['{target}']: {other} is not a str or list"
                ));
            }
        };
        let Some(disk) = def.disks.iter_mut().find(|d| d.target == target) else {
            return Err(format!("node_names: the domain has no disk '{target}'"));
        };
        if names.len() > disk.layers.len() {
            return Err(format!(
                "node_names['{target}']: {} names for {} layers",
                names.len(),
                disk.layers.len()
            ));
        }
        for (layer, name) in disk.layers.iter_mut().zip(names) {
            layer.node_name = Some(name);
        }
    }
    Ok(())
}

fn config_from_dict(value: Value) -> Result<DomainConfig, String> {
    let mut config = DomainConfig::default();
    let mut f = Fields::new("config", value)?;
    let port = |v: Option<u64>, default: u16| -> Result<u16, String> {
        v.map_or(Ok(default), |p| {
            u16::try_from(p).map_err(|_| format!("config: port {p} out of range"))
        })
    };
    config.nbd_port_min = port(f.unsigned("nbd-port-min")?, config.nbd_port_min)?;
    config.nbd_port_max = port(f.unsigned("nbd-port-max")?, config.nbd_port_max)?;
    if let Some(ms) = f.unsigned("command-timeout-ms")? {
        config.command_timeout_ms = ms;
    }
    config.query_nodes_before_delete = f.boolean("query-nodes-before-delete")?;
    config.push_write = match f.string("push-write")?.as_deref() {
        None | Some("deferred") => PushWrite::Deferred,
        Some("qemu-flushes") => PushWrite::QemuFlushes,
        Some(other) => {
            return Err(format!(
                "config: push-write '{other}' (expected deferred or qemu-flushes)"
            ));
        }
    };
    if let Some(tls) = f.take("tls") {
        let mut t = Fields::new("config tls", tls)?;
        config.tls = Some(TlsConfig {
            cert_dir: t.required_string("cert-dir")?,
            verify_peer: t.boolean("verify-peer")?,
            secret_file: t.string("secret-file")?,
        });
        t.finish()?;
    }
    if let Some(server) = f.take("nbd-server-running") {
        let mut s = Fields::new("config nbd-server-running", server)?;
        let transport = match (s.string("socket")?, s.string("host")?) {
            (Some(socket), None) => NbdTransport::Unix { socket },
            (None, Some(host)) => NbdTransport::Tcp {
                host,
                port: s
                    .unsigned("port")?
                    .map(|p| u16::try_from(p).map_err(|_| format!("port {p} out of range")))
                    .transpose()?,
            },
            _ => {
                return Err(
                    "config nbd-server-running: give 'socket' or 'host' (and 'port')".into(),
                );
            }
        };
        let tls = s.take("tls").map(|v| v.as_bool().unwrap_or(false));
        s.finish()?;
        config.nbd_server_running = Some(NbdServer { transport, tls });
    }
    f.finish()?;
    Ok(config)
}

// ----- inputs -----

/// An input decoded, or a refusal the glue answers itself (an XML definition that does not
/// parse or align is a bad request, answered like the engine's own refusals).
enum Decoded {
    Input(Box<Input>),
    Refused(RequestId, String),
    Nothing,
}

fn decode_input(state: &DomainState, now_ms: u64, value: Value) -> Result<Decoded, String> {
    let bare = |name: &str| match name {
        "tick" => Some(Input::Tick),
        "reconnected" => Some(Input::Reconnected),
        "link-down" => Some(Input::LinkDown),
        _ => None,
    };
    let map = match value {
        Value::String(name) => {
            return bare(&name)
                .map(|i| Decoded::Input(Box::new(i)))
                .ok_or_else(|| {
                    format!("unknown input '{name}' (expected tick, reconnected or link-down)")
                });
        }
        Value::Object(map) => map,
        other => return Err(format!("input must be a dict, got {other}")),
    };
    if map.contains_key("request") {
        return decode_request(state, now_ms, map);
    }
    if let Some(file_done) = map.get("file-done") {
        if map.len() != 1 {
            return Err("a file-done input has only the 'file-done' key".into());
        }
        let mut f = Fields::new("file-done", file_done.clone())?;
        let id = f.unsigned("id")?.ok_or("file-done: 'id' is required")?;
        let kind = match f.string("kind")?.as_deref() {
            None | Some("other") => FileErrorKind::Other,
            Some("already-exists") => FileErrorKind::AlreadyExists,
            Some("not-found") => FileErrorKind::NotFound,
            Some("permission-denied") => FileErrorKind::PermissionDenied,
            Some("no-space") => FileErrorKind::NoSpace,
            Some(other) => {
                return Err(format!(
                    "file-done: unknown kind '{other}' (expected already-exists, not-found, \
                     permission-denied, no-space or other)"
                ));
            }
        };
        let path = f.string("path")?.unwrap_or_default();
        let result = match f.string("error")? {
            None => Ok(()),
            Some(message) => Err(FileError::new(kind, path, message)),
        };
        f.finish()?;
        return Ok(Decoded::Input(Box::new(Input::FileDone(
            FileOpId(id),
            result,
        ))));
    }
    if map.len() == 1
        && let Some(input) = map.keys().next().and_then(|k| bare(k))
    {
        return Ok(Decoded::Input(Box::new(input)));
    }
    if ["QMP", "return", "error", "event"]
        .iter()
        .any(|k| map.contains_key(*k))
    {
        return match QmpIn::from_value(Value::Object(map)) {
            Ok(QmpIn::Greeting(_)) => Ok(Decoded::Input(Box::new(Input::Reconnected))),
            Ok(QmpIn::Reply {
                id: Some(id),
                result,
            }) => Ok(Decoded::Input(Box::new(Input::Reply(id, result)))),
            // A reply without an id answers nothing the engine sent.
            Ok(QmpIn::Reply { id: None, .. }) => Ok(Decoded::Nothing),
            Ok(QmpIn::Event(event)) => Ok(Decoded::Input(Box::new(Input::Event(event)))),
            Err(e) => Err(format!("not a QMP message: {e}")),
        };
    }
    let keys: Vec<&str> = map.keys().map(String::as_str).collect();
    Err(format!(
        "unknown input with keys {keys:?}: expected a request ({{\"request\": ...}}), a QMP \
         greeting, reply or event, {{\"file-done\": ...}}, or tick, reconnected, link-down"
    ))
}

fn list_filter(f: &mut Fields<'_>, roots_key: &str) -> Result<ListFilter, String> {
    Ok(ListFilter {
        roots_or_descendants: f.boolean(roots_key)?,
        topological: f.boolean("topological")?,
        leaves: f.boolean("leaves")?,
        no_leaves: f.boolean("no-leaves")?,
    })
}

/// A new checkpoint's engine form: parsed, defaults filled, aligned, the domain embedded.
fn new_checkpoint(state: &DomainState, text: &str, now_s: u64) -> Result<Checkpoint, String> {
    let mut def = CheckpointDef::parse(text, CheckpointMode::Create).map_err(|e| e.to_string())?;
    def.fill_create_defaults(now_s);
    let mut aligned = align_checkpoint(&def, &state.def).map_err(|e| e.to_string())?;
    aligned.domain_xml = state.domain_xml.clone();
    Checkpoint::from_def(&aligned).map_err(|e| e.to_string())
}

fn decode_request(
    state: &DomainState,
    now_ms: u64,
    map: Map<String, Value>,
) -> Result<Decoded, String> {
    let mut f = Fields::new("request", Value::Object(map))?;
    let name = f.required_string("request")?;
    let id = RequestId(f.unsigned("id")?.ok_or("request: 'id' is required")?);
    let now_s = now_ms / 1000;
    // XML that does not parse or align is the caller's to fix: answered, not raised.
    let refused = |message: String| Ok(Decoded::Refused(id, message));
    let request = match name.as_str() {
        "checkpoint-create" => {
            let xml = f.required_string("xml")?;
            let quiesce = f.boolean("quiesce")?;
            match new_checkpoint(state, &xml, now_s) {
                Ok(checkpoint) => Request::CheckpointCreate {
                    checkpoint,
                    quiesce,
                },
                Err(e) => {
                    f.finish()?;
                    return refused(e);
                }
            }
        }
        "checkpoint-redefine" => {
            let xml = f.required_string("xml")?;
            let validate = f.boolean("validate")?;
            let parsed = CheckpointDef::parse(&xml, CheckpointMode::Redefine)
                .and_then(|def| align_redefined_checkpoint(&def, &state.def))
                .map_err(|e| e.to_string())
                .and_then(|def| Checkpoint::from_def(&def).map_err(|e| e.to_string()));
            match parsed {
                Ok(checkpoint) => Request::CheckpointRedefine {
                    checkpoint,
                    validate,
                },
                Err(e) => {
                    f.finish()?;
                    return refused(e);
                }
            }
        }
        "checkpoint-delete" => Request::CheckpointDelete {
            name: f.required_string("name")?,
            scope: match f.string("scope")?.as_deref() {
                None | Some("single") => DeleteScope::Single,
                Some("children") => DeleteScope::WithChildren,
                Some("children-only") => DeleteScope::ChildrenOnly,
                Some(other) => {
                    return Err(format!(
                        "request: scope '{other}' (expected single, children or children-only)"
                    ));
                }
            },
            metadata_only: f.boolean("metadata-only")?,
        },
        "checkpoint-delete-each" => Request::CheckpointDeleteEach {
            names: f.strings("names")?,
        },
        "checkpoint-list" => Request::CheckpointList {
            filter: list_filter(&mut f, "roots")?,
        },
        "checkpoint-list-children" => Request::CheckpointListChildren {
            name: f.required_string("name")?,
            filter: list_filter(&mut f, "descendants")?,
        },
        "checkpoint-lookup" => Request::CheckpointLookup {
            name: f.required_string("name")?,
        },
        "checkpoint-parent" => Request::CheckpointParent {
            name: f.required_string("name")?,
        },
        "checkpoint-get-xml" => Request::CheckpointGetXml {
            name: f.required_string("name")?,
            size: f.boolean("size")?,
        },
        "backup-begin" => {
            let xml = f.string("xml")?;
            let checkpoint_xml = f.string("checkpoint-xml")?;
            let reuse_external = f.boolean("reuse-external")?;
            let suffix = f.string("suffix")?;
            f.finish()?;
            let checkpoint = match checkpoint_xml
                .map(|t| new_checkpoint(state, &t, now_s))
                .transpose()
            {
                Ok(c) => c,
                Err(e) => return refused(e),
            };
            let suffix = suffix.unwrap_or_else(|| {
                checkpoint
                    .as_ref()
                    .map_or_else(|| now_s.to_string(), |c| c.name.clone())
            });
            let spec = BackupDef::parse(xml.as_deref().unwrap_or("<domainbackup/>"))
                .and_then(|def| align_backup(&def, &state.def, &suffix))
                .map_err(|e| e.to_string())
                .and_then(|def| BackupSpec::from_def(&def).map_err(|e| e.to_string()));
            return match spec {
                Ok(spec) => Ok(Decoded::Input(Box::new(Input::Request(
                    id,
                    Request::BackupBegin {
                        spec,
                        checkpoint,
                        reuse_external,
                    },
                )))),
                Err(e) => refused(e),
            };
        }
        "backup-get-xml" => Request::BackupGetXml,
        "job-stats" => Request::JobStats {
            completed: f.boolean("completed")?,
            keep_completed: f.boolean("keep-completed")?,
        },
        "abort-job" => Request::AbortJob,
        "block-job-abort" => Request::BlockJobAbort {
            disk: f.required_string("disk")?,
        },
        other => return Err(format!("unknown request '{other}'")),
    };
    f.finish()?;
    Ok(Decoded::Input(Box::new(Input::Request(id, request))))
}

// ----- outputs -----

/// A checkpoint as the store keeps it: without per-disk sizes.
fn stored_checkpoint_xml(checkpoint: &Checkpoint) -> String {
    let mut def = checkpoint.to_def();
    for disk in &mut def.disks {
        disk.size_bytes = None;
    }
    def.format(CheckpointFormat::default())
}

fn checkpoint_value(checkpoint: &Checkpoint) -> Value {
    let sizes: Map<String, Value> = checkpoint
        .disks
        .iter()
        .filter_map(|d| d.size_bytes.map(|s| (d.target.clone(), Value::from(s))))
        .collect();
    json!({
        "name": checkpoint.name,
        "parent": checkpoint.parent,
        "xml": checkpoint.to_def().format(CheckpointFormat { no_domain: false, include_size: true }),
        "sizes": sizes,
    })
}

fn backup_value(plan: &BackupPlan) -> Value {
    json!({
        "xml": plan.to_def().format(),
        "plan": serde_json::to_value(plan).unwrap_or(Value::Null),
    })
}

fn error_value(error: &Error) -> Value {
    let mut value = json!({"kind": error.category(), "message": error.to_string()});
    if let Error::QemuRefused {
        command,
        class,
        desc,
    } = error
    {
        value["command"] = json!(command);
        value["class"] = json!(class);
        value["desc"] = json!(desc);
    }
    value
}

fn pairs(items: &[(String, String)], first: &str, second: &str) -> Value {
    items
        .iter()
        .map(|(a, b)| json!({first: a, second: b}))
        .collect()
}

fn drift_value(drift: &BitmapDrift) -> Value {
    json!({
        "event": "bitmap-drift",
        "missing": pairs(&drift.missing, "checkpoint", "disk"),
        "orphans": pairs(&drift.orphans, "node", "bitmap"),
        "removed": pairs(&drift.removed, "node", "bitmap"),
    })
}

fn output_value(output: &Output) -> Value {
    match output {
        Output::Send(id, command) => json!({"send": command.to_wire(Some(id))}),
        Output::Persist(op) => json!({"persist": match op {
            StoreOp::PutCheckpoint(c) => json!({
                "op": "put-checkpoint", "name": c.name, "xml": stored_checkpoint_xml(c),
            }),
            StoreOp::DeleteCheckpoint(name) => json!({"op": "delete-checkpoint", "name": name}),
            StoreOp::SetCurrentCheckpoint(name) => {
                json!({"op": "set-current-checkpoint", "name": name})
            }
            StoreOp::PutBackupJournal(plan) => json!({
                "op": "put-backup-journal",
                "journal": serde_json::to_value(plan).unwrap_or(Value::Null),
            }),
            StoreOp::DeleteBackupJournal => json!({"op": "delete-backup-journal"}),
            StoreOp::SetPendingCheckpoints(names) => {
                json!({"op": "set-pending-checkpoints", "names": names})
            }
        }}),
        Output::File(id, op) => {
            let (name, path) = match op {
                FileOp::CreateExclusive { path } => ("create-exclusive", path),
                FileOp::Remove { path } => ("remove", path),
                FileOp::Sync { path } => ("sync", path),
            };
            json!({"file": {"id": id.0, "op": name, "path": path}})
        }
        Output::Respond(id, Ok(reply)) => {
            let ok = match reply {
                Reply::Done => json!({}),
                Reply::Checkpoint(c) => json!({"checkpoint": checkpoint_value(c)}),
                Reply::CheckpointNames(names) => json!({"names": names}),
                Reply::Backup(plan) => json!({"backup": backup_value(plan)}),
                Reply::Stats(stats) => {
                    json!({"stats": serde_json::to_value(stats).unwrap_or(Value::Null)})
                }
            };
            json!({"respond": {"id": id.0, "ok": ok}})
        }
        Output::Respond(id, Err(error)) => {
            json!({"respond": {"id": id.0, "error": error_value(error)}})
        }
        Output::Emit(event) => json!({"emit": match event {
            DomainEvent::BlockJob { disk, state } => json!({
                "event": "block-job", "disk": disk,
                "state": serde_json::to_value(state).unwrap_or(Value::Null),
            }),
            DomainEvent::JobCompleted(stats) => json!({
                "event": "job-completed",
                "stats": serde_json::to_value(stats).unwrap_or(Value::Null),
            }),
            DomainEvent::CheckpointCreated(name) => {
                json!({"event": "checkpoint-created", "name": name})
            }
            DomainEvent::CheckpointDeleted(name) => {
                json!({"event": "checkpoint-deleted", "name": name})
            }
            DomainEvent::BitmapDrift(drift) => drift_value(drift),
        }}),
    }
}

// ----- the Domain class -----

struct DomainState {
    def: DomainDef,
    /// The `<domain>` document the domain was built from, embedded in new checkpoints.
    domain_xml: Option<String>,
}

/// The engine of one domain (VM): feed it inputs with `handle`, carry out the outputs it
/// returns in order, and feed `"tick"` once `next_deadline()` has passed.
///
/// `definition` is a libvirt `<domain>` document (then `node_names` gives each disk's QEMU node
/// names, `{"vda": "libvirt-1-format"}` or a list, top layer first) or a dict
/// `{"name": "vm", "disks": {"vda": {"node-name": ..., "path": ..., "format": "qcow2"}}}` (a
/// disk's value may also be a node name alone, or a list of layers, top first). To restart
/// from stored state give the stored `checkpoints` (their XML), the `current` checkpoint's
/// name, the backup `journal` and the `pending_checkpoints`, as the persist outputs wrote them.
#[pyclass(name = "Domain", module = "vbackup_core")]
struct PyDomain {
    engine: Engine,
    state: DomainState,
}

#[pymethods]
impl PyDomain {
    #[new]
    #[pyo3(signature = (definition, *, node_names=None, config=None, checkpoints=None, current=None, journal=None, pending_checkpoints=None))]
    fn new(
        definition: &Bound<'_, PyAny>,
        node_names: Option<&Bound<'_, PyAny>>,
        config: Option<&Bound<'_, PyAny>>,
        checkpoints: Option<Vec<String>>,
        current: Option<String>,
        journal: Option<&Bound<'_, PyAny>>,
        pending_checkpoints: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let (mut def, domain_xml) = if let Ok(text) = definition.extract::<String>() {
            let def = parse_domain(&text).map_err(|e| value_error(format!("domain: {e}")))?;
            (def, Some(text.trim_end().to_owned()))
        } else {
            let def = definition_from_dict(to_value(definition, 0)?).map_err(value_error)?;
            (def, None)
        };
        let names = optional_value(node_names)?;
        if !names.is_null() {
            apply_node_names(&mut def, names).map_err(value_error)?;
        }
        for disk in &def.disks {
            if !disk.readonly && disk.layers.first().is_some_and(|l| l.node_name.is_none()) {
                return Err(value_error(format!(
                    "disk '{}' has no QEMU node name: give node_names={{'{}': NODE}} (from \
                     query-named-block-nodes)",
                    disk.target, disk.target
                )));
            }
        }
        let config = config_from_dict(optional_value(config)?).map_err(value_error)?;
        let mut stored = Vec::new();
        for (index, text) in checkpoints.unwrap_or_default().iter().enumerate() {
            let checkpoint = CheckpointDef::parse(text, CheckpointMode::Document)
                .map_err(|e| e.to_string())
                .and_then(|def| Checkpoint::from_def(&def).map_err(|e| e.to_string()))
                .map_err(|e| value_error(format!("checkpoints[{index}]: {e}")))?;
            stored.push(checkpoint);
        }
        let tree = CheckpointTree::load(stored, current.as_deref());
        let journal = match optional_value(journal)? {
            Value::Null => None,
            value => Some(
                serde_json::from_value::<BackupPlan>(value)
                    .map_err(|e| value_error(format!("journal: {e}")))?,
            ),
        };
        let engine = Engine::new(def.clone(), config, tree, journal)
            .with_pending_checkpoints(pending_checkpoints.unwrap_or_default());
        Ok(Self {
            engine,
            state: DomainState { def, domain_xml },
        })
    }

    /// Feeds one input (a dict, or "tick", "reconnected", "link-down") at time `now_ms`
    /// (milliseconds on any monotonic or wall clock, the same for every call) and returns
    /// every output, in the order they must be carried out.
    fn handle<'py>(
        &mut self,
        py: Python<'py>,
        now_ms: u64,
        input: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let value = to_value(input, 0)?;
        let outputs: Vec<Value> =
            match decode_input(&self.state, now_ms, value).map_err(value_error)? {
                Decoded::Input(input) => self
                    .engine
                    .handle(Timestamp::from_ms(now_ms), *input)
                    .iter()
                    .map(output_value)
                    .collect(),
                Decoded::Refused(id, message) => vec![json!({"respond": {
                    "id": id.0, "error": {"kind": "request", "message": message},
                }})],
                Decoded::Nothing => Vec::new(),
            };
        let list = PyList::empty(py);
        for output in &outputs {
            list.append(to_py(py, output)?)?;
        }
        Ok(list)
    }

    /// When `"tick"` should next be fed (milliseconds), or None.
    fn next_deadline(&self) -> Option<u64> {
        self.engine.next_deadline().map(Timestamp::as_ms)
    }

    /// Whether a QMP session is up and reconciled (requests that talk to QEMU are accepted).
    #[getter]
    fn connected(&self) -> bool {
        self.engine.view().connected
    }

    /// The names of the checkpoints, parents before children.
    #[getter]
    fn checkpoints(&self) -> Vec<String> {
        self.engine
            .view()
            .checkpoints
            .iter()
            .map(|c| c.name.clone())
            .collect()
    }

    /// The current checkpoint's name, if any.
    #[getter]
    fn current_checkpoint(&self) -> Option<String> {
        self.engine.view().checkpoints.current().map(str::to_owned)
    }

    /// The domain definition as the engine sees it (disks as a list, with layers).
    fn definition<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(
            py,
            &serde_json::to_value(&self.state.def).unwrap_or(Value::Null),
        )
    }

    /// What the running backup waits for right now, in words; None when no backup runs.
    fn backup_waiting_for(&self) -> Option<String> {
        self.engine.backup_waiting_for()
    }

    fn __repr__(&self) -> String {
        format!(
            "Domain(name={:?}, disks={:?})",
            self.state.def.name,
            self.state
                .def
                .disks
                .iter()
                .map(|d| d.target.as_str())
                .collect::<Vec<_>>()
        )
    }
}

/// vbackup's engine for Python management stacks: XML validation and formatting, and the
/// per-domain state machine that decides every QMP command of checkpoints and backups.
#[pymodule(name = "vbackup_core")]
fn python_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(validate_xml, m)?)?;
    m.add_function(wrap_pyfunction!(format_xml, m)?)?;
    m.add_class::<PyDomain>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
