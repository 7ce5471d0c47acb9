//! Copying the dirty or allocated extents of an export into a destination.
//!
//! First the export's block status for one meta context is walked from start to end and the
//! wanted ranges are merged; then the ranges are read with several requests in flight and
//! written at their offsets. Zero runs inside a wanted range are written as zeroes, because
//! the destination may hold older data there (an earlier backup being brought up to date).

use std::fs::File;
use std::os::unix::fs::FileExt;

use vbackup_core::export::{ExportReader, STATE_DIRTY, STATE_ZERO};

use super::error::NbdError;
use super::socket::NbdClient;
use super::{BASE_ALLOCATION, dirty_bitmap_context};

/// Where copied extents go.
pub trait ExtentSink {
    /// Writes `data` at `offset`.
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Makes `[offset, offset + length)` read as zeroes.
    fn write_zeroes(&mut self, offset: u64, length: u64) -> std::io::Result<()>;
}

/// Largest zero buffer written at once.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// A file written at offsets with `pwrite`. When `already_zero` is set (a new sparse file)
/// zero runs are skipped, so they stay holes.
#[derive(Debug)]
pub struct FileSink<'f> {
    file: &'f File,
    already_zero: bool,
    zeroes: Vec<u8>,
}

impl<'f> FileSink<'f> {
    /// A sink over a new, empty (or all-zero) file: zero runs are left as holes.
    pub fn sparse(file: &'f File) -> Self {
        Self {
            file,
            already_zero: true,
            zeroes: Vec::new(),
        }
    }

    /// A sink over a file with older contents: zero runs are written out.
    pub fn overwrite(file: &'f File) -> Self {
        Self {
            file,
            already_zero: false,
            zeroes: Vec::new(),
        }
    }
}

impl ExtentSink for FileSink<'_> {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn write_zeroes(&mut self, offset: u64, length: u64) -> std::io::Result<()> {
        if self.already_zero {
            return Ok(());
        }
        if self.zeroes.is_empty() {
            self.zeroes = vec![0u8; ZERO_CHUNK_BYTES];
        }
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let n = (end - at).min(ZERO_CHUNK_BYTES as u64) as usize;
            self.file.write_all_at(&self.zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Writes into another NBD export (for example a writable export of a new qcow2 overlay whose
/// backing file is the previous backup). Writes are pipelined; after the copy the caller must
/// call [`NbdClient::wait_writes`] (and usually [`NbdClient::flush`]) to learn their outcome.
#[derive(Debug)]
pub struct NbdSink<'c> {
    client: &'c mut NbdClient,
}

impl<'c> NbdSink<'c> {
    /// A sink writing through `client`.
    pub fn new(client: &'c mut NbdClient) -> Self {
        Self { client }
    }
}

impl ExtentSink for NbdSink<'_> {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.client
            .submit_write(offset, data)
            .map_err(std::io::Error::other)
    }

    fn write_zeroes(&mut self, offset: u64, length: u64) -> std::io::Result<()> {
        self.client
            .submit_write_zeroes(offset, length)
            .map_err(std::io::Error::other)
    }
}

/// Collects copied bytes in memory (for small exports and tests).
impl ExtentSink for Vec<u8> {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()))
            .ok_or_else(|| std::io::Error::other("offset does not fit in memory"))?;
        if self.len() < end {
            self.resize(end, 0);
        }
        self[end - data.len()..end].copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, length: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let end = usize::try_from(offset.saturating_add(length)).map_err(std::io::Error::other)?;
        if self.len() < end {
            self.resize(end, 0);
        }
        self[start..end].fill(0);
        Ok(())
    }
}

/// What a copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyReport {
    /// Number of merged ranges copied.
    pub ranges: usize,
    /// Bytes inside the copied ranges (data plus zero runs).
    pub bytes_copied: u64,
}

/// Walks the block status of `context` over the whole export and returns the merged ranges
/// `(offset, length)` whose flags satisfy `wanted`. Each reply must make progress, so the walk
/// ends after at most one request per extent boundary.
pub fn select_ranges<R: ExportReader>(
    reader: &mut R,
    context: &str,
    wanted: impl Fn(u32) -> bool,
) -> Result<Vec<(u64, u64)>, R::Error> {
    let size = reader.size();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let extents = reader.block_status(context, offset, size - offset)?;
        let before = offset;
        for e in extents {
            let length = e.length.min(size - offset);
            if length == 0 {
                break;
            }
            if wanted(e.flags) {
                match ranges.last_mut() {
                    Some((start, len)) if *start + *len == offset => *len += length,
                    _ => ranges.push((offset, length)),
                }
            }
            offset += length;
        }
        if offset == before {
            // A reader that reports no extent would loop forever; treat the rest as wanted
            // so nothing is silently skipped.
            ranges.push((offset, size - offset));
            break;
        }
    }
    Ok(ranges)
}

/// Copies the dirty extents of bitmap `bitmap` (the export must have been opened with
/// `qemu:dirty-bitmap:<bitmap>` negotiated).
pub fn copy_dirty(
    client: &mut NbdClient,
    bitmap: &str,
    sink: &mut dyn ExtentSink,
) -> Result<CopyReport, NbdError> {
    let context = dirty_bitmap_context(bitmap);
    let ranges = select_ranges(client, &context, |flags| flags & STATE_DIRTY != 0)?;
    copy_ranges(client, &ranges, sink)
}

/// Copies every extent that does not read as zeroes (the export must have been opened with
/// `base:allocation` negotiated).
pub fn copy_allocated(
    client: &mut NbdClient,
    sink: &mut dyn ExtentSink,
) -> Result<CopyReport, NbdError> {
    let ranges = select_ranges(client, BASE_ALLOCATION, |flags| flags & STATE_ZERO == 0)?;
    copy_ranges(client, &ranges, sink)
}

/// Copies the given ranges.
pub fn copy_ranges(
    client: &mut NbdClient,
    ranges: &[(u64, u64)],
    sink: &mut dyn ExtentSink,
) -> Result<CopyReport, NbdError> {
    let bytes_copied = client.copy_extents(ranges, sink)?;
    Ok(CopyReport {
        ranges: ranges.len(),
        bytes_copied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vbackup_core::export::Extent;

    /// An in-memory export with fixed extents, to test the walk without a server.
    struct Fake {
        size: u64,
        extents: Vec<(u64, u64, u32)>,
        max_per_reply: usize,
        calls: usize,
    }

    impl ExportReader for Fake {
        type Error = std::io::Error;
        fn size(&self) -> u64 {
            self.size
        }
        fn meta_contexts(&self) -> Vec<String> {
            vec!["x".into()]
        }
        fn block_status(
            &mut self,
            _: &str,
            offset: u64,
            _: u64,
        ) -> Result<Vec<Extent>, Self::Error> {
            self.calls += 1;
            Ok(self
                .extents
                .iter()
                .filter(|(o, l, _)| o + l > offset)
                .take(self.max_per_reply)
                .map(|&(o, l, flags)| Extent {
                    length: o + l - offset.max(o),
                    flags,
                })
                .collect())
        }
        fn read_at(&mut self, _: u64, _: &mut [u8]) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    #[test]
    fn selected_extents_are_merged_across_replies() {
        let mut f = Fake {
            size: 100,
            extents: vec![
                (0, 10, 1),
                (10, 10, 1),
                (20, 30, 0),
                (50, 25, 1),
                (75, 25, 0),
            ],
            max_per_reply: 1,
            calls: 0,
        };
        let r = select_ranges(&mut f, "x", |fl| fl & 1 != 0).unwrap();
        assert_eq!(r, vec![(0, 20), (50, 25)]);
        assert_eq!(f.calls, 5);
    }

    #[test]
    fn reader_without_progress_copies_the_rest_instead_of_looping() {
        let mut f = Fake {
            size: 100,
            extents: vec![(0, 10, 0)],
            max_per_reply: 8,
            calls: 0,
        };
        let r = select_ranges(&mut f, "x", |fl| fl & 1 != 0).unwrap();
        assert_eq!(r, vec![(10, 90)]);
    }

    #[test]
    fn memory_sink_writes_data_and_zeroes_at_offsets() {
        let mut v = vec![7u8; 4];
        v.write_data(6, b"ab").unwrap();
        v.write_zeroes(1, 2).unwrap();
        assert_eq!(v, vec![7, 0, 0, 7, 0, 0, b'a', b'b']);
    }
}
