//! The layers of `core/src`: the state machines (checkpoint operations, backup runs, the
//! reconcile, managed backups) depend on the kernel and on leaf modules only, never on the
//! router (`crate::domain`, `crate::Domain`) nor on each other; the kernel and the public
//! vocabulary (`crate::protocol`) sit below every machine. A machine can then be read and
//! tested alone, and there is no import circle.
//!
//! The check reads every source file, takes the crate paths it names in code (`use`
//! declarations, braces expanded, and paths written inline such as `crate::x::f(..)`), resolves
//! `super::` and `self::`, and compares them with the layer of the file.
// A test reads the crate's own sources; the core's no-IO rule is for the library.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};

/// A module path inside the crate, e.g. `["backup", "run"]`.
type ModPath = Vec<String>;

/// The state machines, by module path prefix.
const MACHINES: &[&[&str]] = &[
    &["checkpoint", "ops"],
    &["backup", "run"],
    &["reconcile"],
    &["managed"],
];

/// Modules below every machine.
const BELOW_MACHINES: &[&[&str]] = &[&["kernel"], &["protocol"]];

/// What a module may not name.
fn router(path: &[String]) -> bool {
    matches!(path.first().map(String::as_str), Some("domain" | "Domain"))
}

fn has_prefix(path: &[String], prefix: &[&str]) -> bool {
    path.len() >= prefix.len() && path.iter().zip(prefix).all(|(a, b)| a == b)
}

fn machine_of(path: &[String]) -> Option<&'static [&'static str]> {
    MACHINES.iter().copied().find(|m| has_prefix(path, m))
}

/// The module path of a source file below `core/src`.
fn module_of(relative: &Path) -> ModPath {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

/// The source without comments (line comments, doc comments, block comments).
fn strip_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            let end = after.find('\n').unwrap_or(after.len());
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix("/*") {
            let end = after.find("*/").map_or(after.len(), |e| e + 2);
            rest = &after[end..];
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`, aliases `x as y`) into full paths.
fn expand_use(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split_whitespace().next().unwrap_or("").to_owned()];
    };
    let prefix: String = tree[..open]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let inner = tree[open + 1..].trim_end();
    let inner = inner.strip_suffix('}').unwrap_or(inner);
    let mut items = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(|item| {
            expand_use(item)
                .into_iter()
                .map(|p| format!("{prefix}{p}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Resolves a path written in module `here` to a crate path, if it names the crate.
fn resolve(here: &[String], path: &str) -> Option<ModPath> {
    let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: ModPath = match segments.first() {
        Some(&"crate") => Vec::new(),
        Some(&"super") | Some(&"self") => here.to_vec(),
        _ => return None,
    };
    let mut rest = &segments[..];
    if rest.first() == Some(&"crate") {
        rest = &rest[1..];
    }
    while let Some(first) = rest.first() {
        match *first {
            "super" => {
                base.pop();
            }
            "self" => {}
            _ => break,
        }
        rest = &rest[1..];
    }
    base.extend(rest.iter().map(|s| (*s).to_owned()));
    Some(base)
}

/// Every crate path a file names in code.
fn crate_paths(here: &[String], source: &str) -> Vec<ModPath> {
    let code = strip_comments(source);
    let mut found = Vec::new();
    // `use` declarations, possibly over several lines.
    let mut rest = code.as_str();
    while let Some(at) = rest.find("use ") {
        let before_ok = rest[..at]
            .chars()
            .last()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        let after = &rest[at + 4..];
        let end = after.find(';').unwrap_or(after.len());
        if before_ok {
            for p in expand_use(&after[..end]) {
                found.extend(resolve(here, &p));
            }
        }
        rest = &after[end.min(after.len())..];
    }
    // Paths written inline.
    for start in ["crate::", "super::"] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(start) {
            let before_ok = rest[..at]
                .chars()
                .last()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'));
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            if before_ok {
                found.extend(resolve(here, tail[..end].trim_end_matches(':')));
            }
            rest = &tail[end.max(1)..];
        }
    }
    found
}

/// The layering violations of one file.
fn violations(relative: &Path, source: &str) -> Vec<String> {
    let here = module_of(relative);
    let own_machine = machine_of(&here);
    let below = BELOW_MACHINES.iter().any(|b| has_prefix(&here, b));
    if own_machine.is_none() && !below {
        return Vec::new();
    }
    let mut bad = Vec::new();
    for path in crate_paths(&here, source) {
        let shown = format!("crate::{}", path.join("::"));
        if router(&path) {
            bad.push(format!(
                "{}: names the router ({shown})",
                relative.display()
            ));
        } else if let Some(m) = machine_of(&path)
            && (below || Some(m) != own_machine)
        {
            bad.push(format!(
                "{}: names the machine {} ({shown})",
                relative.display(),
                m.join("::")
            ));
        }
    }
    bad.sort();
    bad.dedup();
    bad
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            source_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn machines_depend_on_the_kernel_only_never_on_the_router_or_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let mut bad = Vec::new();
    let mut machine_files = 0;
    let mut kernel_uses_in_machines = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).expect("below src");
        let source = std::fs::read_to_string(file).expect("readable source");
        let here = module_of(relative);
        if machine_of(&here).is_some() {
            machine_files += 1;
            kernel_uses_in_machines += crate_paths(&here, &source)
                .iter()
                .filter(|p| p.first().is_some_and(|s| s == "kernel"))
                .count();
        }
        bad.extend(violations(relative, &source));
    }
    // The check must see the machines and their kernel imports, or it checks nothing.
    assert!(
        machine_files >= 3,
        "found {machine_files} machine files below {}",
        src.display()
    );
    assert!(kernel_uses_in_machines >= 10, "{kernel_uses_in_machines}");
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

#[test]
fn a_machine_naming_the_router_or_another_machine_is_reported() {
    let ops = Path::new("checkpoint/ops.rs");
    let source = "//! use crate::domain::Input; in a comment is fine\n\
        use super::{Checkpoint, DeleteScope};\n\
        use crate::kernel::{ctx::Ctx, state::{Core, Owner}};\n\
        use crate::{domain::Output, backup::run::BackupRun};\n\
        fn f() { let _ = crate::reconcile::Reconcile::default(); }\n";
    assert_eq!(
        violations(ops, source),
        vec![
            "checkpoint/ops.rs: names the machine backup::run (crate::backup::run::BackupRun)",
            "checkpoint/ops.rs: names the machine reconcile (crate::reconcile::Reconcile::default)",
            "checkpoint/ops.rs: names the router (crate::domain::Output)",
        ]
    );
    // Inside a machine, its own submodules and its parent's leaf items are fine.
    let run = Path::new("backup/run.rs");
    assert!(
        violations(
            run,
            "use super::{BackupPlan, run::Step};\nuse self::inner::X;\n"
        )
        .is_empty()
    );
    // The kernel may name no machine at all, not even through `super`.
    let kernel = Path::new("kernel/ctx.rs");
    assert_eq!(
        violations(kernel, "use super::super::checkpoint::ops::ShortOp;\n"),
        vec!["kernel/ctx.rs: names the machine checkpoint::ops (crate::checkpoint::ops::ShortOp)"]
    );
    assert_eq!(
        violations(Path::new("reconcile.rs"), "use crate::Domain;\n"),
        vec!["reconcile.rs: names the router (crate::Domain)"]
    );
}
