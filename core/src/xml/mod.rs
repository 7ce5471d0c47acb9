//! libvirt-compatible `<domaincheckpoint>`, `<domainbackup>` and (a reader for) `<domain>` XML.

pub mod relaxng;
pub mod schema;
