//! XML documents given as files: read within the document size limit, validated against the
//! grammar their root element picks, and put in libvirt's canonical form (aligned with a
//! domain's disks when one is given), as `vbackup xml validate` and `xml format` show them.

use std::io::Read;
use std::path::{Path, PathBuf};

use vbackup_core::xml::{
    BackupDef, CheckpointDef, CheckpointFormat, CheckpointMode, DocumentKind, MAX_DOCUMENT_BYTES,
    XmlError, align_backup, align_checkpoint, parse_domain, validate_document,
};

use crate::domains::now_s;
use crate::error::Error;

/// Reads a document, refusing files over the document size limit without reading them whole;
/// the error names the file.
pub fn read_document(path: &Path) -> Result<String, Error> {
    let at = |what: String| Error::Other(format!("{}: {what}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| at(e.to_string()))?;
    let mut bytes = Vec::new();
    let limit = u64::try_from(MAX_DOCUMENT_BYTES).unwrap_or(u64::MAX) + 1;
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| at(e.to_string()))?;
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(at(format!(
            "larger than the limit of {MAX_DOCUMENT_BYTES} bytes"
        )));
    }
    String::from_utf8(bytes).map_err(|_| at("not UTF-8 text".into()))
}

/// `FILE:LINE:COL: PATH: message`.
pub fn located(path: &Path, err: &XmlError) -> String {
    format!("{}:{err}", path.display())
}

/// A document `xml validate` checked.
#[derive(Debug)]
pub enum Checked {
    /// It could not be read (the message names the file).
    Unreadable(String),
    /// It is valid; its root element.
    Valid(&'static str),
    /// Its errors.
    Invalid(Vec<XmlError>),
}

/// Reads the document at `path` and checks it against the grammar its root element picks.
pub fn check(path: &Path) -> Checked {
    match read_document(path).map(|text| validate_document(&text)) {
        Err(e) => Checked::Unreadable(e.to_string()),
        Ok(Ok(kind)) => Checked::Valid(kind.root_name()),
        Ok(Err(errors)) => Checked::Invalid(errors),
    }
}

/// What `xml format` was asked.
#[derive(Debug, Clone, Default)]
pub struct FormatOptions {
    /// The document.
    pub file: PathBuf,
    /// Align the document with the disks of this `<domain>` document first.
    pub domain: Option<PathBuf>,
    /// Suffix of generated backup file names (default: the current Unix time in seconds).
    pub suffix: Option<String>,
    /// Leave out a checkpoint's embedded `<domain>`.
    pub no_domain: bool,
    /// Leave out a checkpoint's per-disk `size`.
    pub no_size: bool,
}

/// A checkpoint or backup document in libvirt's canonical form.
pub fn format_document(opts: &FormatOptions) -> Result<String, Error> {
    let file = &opts.file;
    let text = read_document(file)?;
    let kind = validate_document(&text).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(|e| located(file, e)).collect();
        Error::Other(lines.join("\n"))
    })?;
    let at = |e: XmlError| Error::Other(located(file, &e));
    let domain = match &opts.domain {
        Some(path) => {
            let domain_text = read_document(path)?;
            Some(parse_domain(&domain_text).map_err(|e| Error::Other(located(path, &e)))?)
        }
        None => None,
    };
    match kind {
        DocumentKind::Checkpoint => {
            let mut def = CheckpointDef::parse(&text, CheckpointMode::Document).map_err(at)?;
            if let Some(domain) = &domain {
                if def.name.is_none() {
                    def.fill_create_defaults(now_s());
                }
                def = align_checkpoint(&def, domain).map_err(at)?;
            }
            Ok(def.format(CheckpointFormat {
                no_domain: opts.no_domain,
                include_size: !opts.no_size,
            }))
        }
        DocumentKind::Backup => {
            let mut def = BackupDef::parse(&text).map_err(at)?;
            if let Some(domain) = &domain {
                let suffix = opts.suffix.clone().unwrap_or_else(|| now_s().to_string());
                def = align_backup(&def, domain, &suffix).map_err(at)?;
            }
            Ok(def.format())
        }
        DocumentKind::Domain => Err(Error::Other(format!(
            "{}: a <domain> document has no canonical form here; give it with --domain",
            file.display()
        ))),
    }
}
