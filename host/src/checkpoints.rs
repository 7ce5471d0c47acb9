//! A domain's checkpoints as the reading commands show them (a listing with its tree, one
//! checkpoint's relations), and editing one's XML as virsh's `checkpoint-edit` does: the
//! document in the user's editor, then, if it changed and is valid, a redefinition with it.

use std::collections::BTreeMap;
use std::process::Command;

use vbackup_core::checkpoint::{Checkpoint, ListFilter};
use vbackup_core::error::Error as EngineError;
use vbackup_core::xml::{CheckpointDef, CheckpointFormat, CheckpointMode};
use vbackup_qemu::store::Store;

use crate::domains::read_file;
use crate::error::Error;
use crate::jobs::{define_checkpoint, read_tree};

/// What an edit did.
#[derive(Debug)]
pub enum Edited {
    /// The document was saved unchanged: nothing was done.
    Unchanged,
    /// The checkpoint was redefined with the edited document.
    Redefined,
    /// The edited document was refused (invalid, renaming the checkpoint, or refused by the
    /// engine): nothing changed, and the document is kept in file `kept`.
    Refused {
        /// Why.
        error: Error,
        /// The file holding the edited document.
        kept: String,
    },
}

/// Edits checkpoint `checkpoint` of `domain` with $VISUAL or $EDITOR (default vi). An invalid
/// edit changes nothing and is kept in a file, so the work is not lost.
pub fn edit(store: &Store, domain: &str, checkpoint: &str) -> Result<Edited, Error> {
    let original = read_tree::<_, Error>(store, domain, |tree, _| {
        Ok(tree.lookup(checkpoint).map_err(EngineError::from)?.clone())
    })?;
    let xml = original.to_def().format(CheckpointFormat {
        no_domain: false,
        include_size: false,
    });
    let mut file = tempfile::Builder::new()
        .prefix(&format!("vbackup-{checkpoint}-"))
        .suffix(".xml")
        .tempfile()
        .map_err(Error::io("cannot create a temporary file to edit"))?;
    std::io::Write::write_all(&mut file, xml.as_bytes())
        .map_err(Error::io("cannot write the temporary file to edit"))?;
    let editor = ["VISUAL", "EDITOR"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|e| !e.trim().is_empty()))
        .unwrap_or_else(|| "vi".to_owned());
    // The editor variable may hold arguments (`code --wait`), so a shell splits it as virsh's
    // editor launcher does; the file goes as a separate argument, never through the shell.
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file.path())
        .status()
        .map_err(Error::io(format!("cannot run editor '{editor}'")))?;
    if !status.success() {
        return Err(Error::Other(format!(
            "operation failed: editor '{editor}' exited with {status}; checkpoint {checkpoint} not changed"
        )));
    }
    let edited = read_file(file.path())?;
    if edited == xml {
        return Ok(Edited::Unchanged);
    }
    let checked = CheckpointDef::parse(&edited, CheckpointMode::Redefine)
        .map_err(Error::from)
        .and_then(|def| match def.name.as_deref() {
            Some(name) if name == checkpoint => Ok(()),
            other => Err(Error::Other(format!(
                "invalid argument: cannot rename checkpoint {checkpoint} to {}",
                other.unwrap_or("(none)")
            ))),
        })
        .and_then(|()| define_checkpoint(store, domain, &edited, true, false, false));
    if let Err(e) = checked {
        let kept = file
            .keep()
            .map(|(_, path)| path.display().to_string())
            .unwrap_or_default();
        return Ok(Edited::Refused { error: e, kept });
    }
    Ok(Edited::Redefined)
}

/// Checkpoints as `checkpoint-list` shows them.
#[derive(Debug, Clone)]
pub struct Listing {
    /// The checkpoints chosen, in the filter's order.
    pub checkpoints: Vec<Checkpoint>,
    /// The domain's current checkpoint.
    pub current: Option<String>,
    /// For each checkpoint chosen, its children among those chosen, in the tree's order.
    pub children: BTreeMap<String, Vec<String>>,
}

impl Listing {
    /// The checkpoints chosen whose parent is not among them, in order: the roots of the tree
    /// the listing shows.
    pub fn roots(&self) -> impl Iterator<Item = &Checkpoint> {
        let chosen = |name: &str| self.checkpoints.iter().any(|c| c.name == name);
        let shown_parent = move |c: &&Checkpoint| c.parent.as_deref().is_some_and(chosen);
        self.checkpoints.iter().filter(move |c| !shown_parent(c))
    }
}

/// The checkpoints of `domain` that `filter` chooses (with `from`, among that checkpoint's
/// children, or with the filter's `roots_or_descendants` its descendants).
pub fn list(
    store: &Store,
    domain: &str,
    filter: ListFilter,
    from: Option<&str>,
) -> Result<Listing, Error> {
    read_tree::<_, Error>(store, domain, |tree, _| {
        let chosen = match from {
            Some(from) => tree
                .list_children(from, filter)
                .map_err(EngineError::from)?,
            None => tree.list(filter),
        };
        let names: Vec<&str> = chosen.iter().map(|c| c.name.as_str()).collect();
        let children = names
            .iter()
            .map(|n| {
                let kids = tree.children(n).filter(|c| names.contains(c));
                (n.to_string(), kids.map(str::to_owned).collect())
            })
            .collect();
        Ok(Listing {
            checkpoints: chosen.into_iter().cloned().collect(),
            current: tree.current().map(str::to_owned),
            children,
        })
    })
}

/// One checkpoint and its relations, as `checkpoint-info` shows them.
#[derive(Debug, Clone)]
pub struct Info {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// Its children.
    pub children: usize,
    /// Its descendants.
    pub descendants: usize,
    /// Whether it is the domain's current checkpoint.
    pub current: bool,
}

/// Checkpoint `name` of `domain` and its relations.
pub fn info(store: &Store, domain: &str, name: &str) -> Result<Info, Error> {
    read_tree::<_, Error>(store, domain, |tree, _| {
        let checkpoint = tree.lookup(name).map_err(EngineError::from)?.clone();
        let all = ListFilter {
            roots_or_descendants: true,
            ..ListFilter::default()
        };
        let descendants = tree.list_children(name, all).map_err(EngineError::from)?;
        Ok(Info {
            checkpoint,
            children: tree.children(name).count(),
            descendants: descendants.len(),
            current: tree.current() == Some(name),
        })
    })
}

/// The name of the parent of checkpoint `name` of `domain`.
pub fn parent(store: &Store, domain: &str, name: &str) -> Result<String, Error> {
    read_tree::<_, Error>(store, domain, |tree, _| {
        Ok(tree.parent(name).map_err(EngineError::from)?.name.clone())
    })
}
