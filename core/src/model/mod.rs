//! The domain model shared by the XML layer, the planner and the state machines.

mod domain;

pub use domain::{DiskDef, DiskDevice, DomainDef, ImageFormat, Layer, StorageType};
