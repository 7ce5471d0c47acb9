//! The reader interface of a point-in-time export (a pull backup's view of one disk).
//!
//! The simulator's export views and the real NBD client implement the same trait, so the pull
//! logic that copies dirty extents is shared between simulation and reality.

/// A run of bytes with the same block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes.
    pub length: u64,
    /// Status flags as NBD reports them for the queried meta context. For `base:allocation`:
    /// bit 0 = hole (unallocated), bit 1 = reads as zero. For `qemu:dirty-bitmap:NAME`: bit 0 =
    /// dirty.
    pub flags: u32,
}

/// Flag of `base:allocation`: the range is not allocated.
pub const STATE_HOLE: u32 = 1;
/// Flag of `base:allocation`: the range reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// Flag of `qemu:dirty-bitmap:NAME`: the range is dirty.
pub const STATE_DIRTY: u32 = 1;

/// Reads a point-in-time export: its size, block status per meta context, and data.
pub trait ExportReader {
    /// The error type of the transport.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Size of the export in bytes.
    fn size(&self) -> u64;

    /// Meta contexts this export offers, such as `base:allocation` or
    /// `qemu:dirty-bitmap:backup-vda`.
    fn meta_contexts(&self) -> Vec<String>;

    /// Block status of `[offset, offset + length)` for one meta context. The extents are
    /// contiguous from `offset`; they may cover less than `length` (the caller asks again from
    /// where they end) but never more than the export.
    fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, Self::Error>;

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Self::Error>;
}
