//! Editing a checkpoint's XML on this host, as virsh's `checkpoint-edit` does: the document
//! in the user's editor, then, if it changed and is valid, a redefinition with it.

use std::process::Command;

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
