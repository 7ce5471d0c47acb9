//! Dirty bitmaps: a bit per granule of one node, with QEMU's flags (recording, persistent, busy,
//! inconsistent, readonly) and the successor a backup job freezes them with.

use serde_json::Value;

use crate::errors::QmpError;

/// A fixed-length bit set, packed in 64-bit words.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    /// A set of `len` clear bits.
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the set has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Value of bit `i` (false past the end).
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i` (ignored past the end).
    pub fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Clears bit `i`.
    pub fn clear(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    /// Sets bits `[start, end)`, clipped to the length.
    pub fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.len);
        let mut i = start;
        while i < end {
            if i.is_multiple_of(64) && end - i >= 64 {
                self.words[(i / 64) as usize] = u64::MAX;
                i += 64;
            } else {
                self.set(i);
                i += 1;
            }
        }
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// True if any bit is set.
    pub fn any(&self) -> bool {
        self.words.iter().any(|w| *w != 0)
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = self.words[w] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let i = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (i < self.len).then_some(i);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w];
        }
    }

    /// Iterates the set bits in increasing order.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = self.next_set(0);
        std::iter::from_fn(move || {
            let cur = next?;
            next = self.next_set(cur + 1);
            Some(cur)
        })
    }

    /// ORs `other` (of the same length) into `self`.
    pub fn or_with(&mut self, other: &Bits) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }
}

/// One dirty bitmap attached to a node.
#[derive(Debug, Clone)]
pub(crate) struct DirtyBitmap {
    /// Identity inside the process, stable while the bitmap lives (jobs refer to it).
    pub uid: u64,
    /// None for the anonymous successors and internal bitmaps QEMU shows without a name.
    pub name: Option<String>,
    pub granularity: u64,
    /// Bytes covered (the node's length when the bitmap was created).
    pub size: u64,
    pub bits: Bits,
    pub disabled: bool,
    pub persistent: bool,
    /// Frozen by a backup job (has a successor) or otherwise claimed by an operation.
    pub busy: bool,
    /// Number of NBD exports that carry this bitmap.
    pub export_users: u32,
    pub inconsistent: bool,
    /// Loaded from a read-only image: cannot be modified.
    pub readonly: bool,
    /// The anonymous bitmap recording writes while a job has frozen this one.
    pub successor: Option<u64>,
}

impl DirtyBitmap {
    pub(crate) fn new(uid: u64, name: Option<String>, granularity: u64, size: u64) -> Self {
        Self {
            uid,
            name,
            granularity,
            size,
            bits: Bits::new(size.div_ceil(granularity)),
            disabled: false,
            persistent: false,
            busy: false,
            export_users: 0,
            inconsistent: false,
            readonly: false,
            successor: None,
        }
    }

    pub(crate) fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    /// Marks the granules of `[offset, offset+len)` if the bitmap records.
    pub(crate) fn mark(&mut self, offset: u64, len: u64) {
        if self.disabled || self.inconsistent || len == 0 {
            return;
        }
        let start = offset / self.granularity;
        let end = (offset + len).div_ceil(self.granularity);
        self.bits.set_range(start, end);
    }

    /// Dirty bytes, counted in whole granules as QEMU counts them.
    pub(crate) fn count_bytes(&self) -> u64 {
        self.bits.count() * self.granularity
    }

    pub(crate) fn is_busy(&self) -> bool {
        self.busy || self.export_users > 0 || self.successor.is_some()
    }

    /// ORs `src` in, converting granularity when they differ.
    pub(crate) fn merge_from(&mut self, src: &DirtyBitmap) {
        if src.granularity == self.granularity && src.bits.len() == self.bits.len() {
            self.bits.or_with(&src.bits);
            return;
        }
        for g in src.bits.iter_set() {
            let start = g * src.granularity;
            let end = (start + src.granularity).min(src.size.max(start + 1));
            self.bits
                .set_range(start / self.granularity, end.div_ceil(self.granularity));
        }
    }

    /// The `BlockDirtyInfo` record; `recording` reflects the successor while frozen.
    pub(crate) fn info(&self, successor_recording: Option<bool>) -> Value {
        let recording = !self.disabled || successor_recording.unwrap_or(false);
        // Members in key order (see `object`).
        let count = if self.inconsistent {
            0
        } else {
            self.count_bytes()
        };
        let mut v = crate::node::object([
            ("busy", self.is_busy().into()),
            ("count", count.into()),
            ("granularity", self.granularity.into()),
            ("persistent", self.persistent.into()),
            ("recording", recording.into()),
        ]);
        if let Some(name) = &self.name {
            v.insert("name".to_owned(), name.as_str().into());
        }
        if self.inconsistent {
            v.insert("inconsistent".to_owned(), true.into());
        }
        Value::Object(v)
    }

    /// QEMU's usability checks. `allow_ro` is true for enable/disable/backup use.
    pub(crate) fn check(&self, busy: bool, ro: bool, inconsistent: bool) -> Result<(), QmpError> {
        let name = self.display_name();
        if busy && self.is_busy() {
            return Err(QmpError::bitmap_busy(name));
        }
        if ro && self.readonly {
            return Err(QmpError::bitmap_readonly(name));
        }
        if inconsistent && self.inconsistent {
            return Err(QmpError::bitmap_inconsistent(name));
        }
        Ok(())
    }
}

/// The check sets QEMU names: BUSY|RO|INCONSISTENT.
pub(crate) const CHECK_DEFAULT: (bool, bool, bool) = (true, true, true);
/// BUSY|INCONSISTENT (enable, disable, use by a job or an export).
pub(crate) const CHECK_ALLOW_RO: (bool, bool, bool) = (true, false, true);
/// BUSY|RO (remove: inconsistent bitmaps may be removed).
pub(crate) const CHECK_REMOVE: (bool, bool, bool) = (true, true, false);

/// The default granularity QEMU picks: the cluster size clamped to [4 KiB, 64 KiB].
pub(crate) fn default_granularity(cluster_size: Option<u64>) -> u64 {
    cluster_size.unwrap_or(65536).clamp(4096, 65536)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_set_ranges_count_and_iterate() {
        let mut b = Bits::new(200);
        b.set_range(3, 140);
        assert_eq!(b.count(), 137);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(140), None);
        b.clear(3);
        assert_eq!(b.iter_set().next(), Some(4));
        b.clear_all();
        assert!(!b.any());
    }

    #[test]
    fn count_is_rounded_up_to_whole_granules() {
        // 1 MiB + 64 KiB + 100 KiB written at 0, 8M, 20M gives 1245184 bytes (reference §3).
        let mut bm = DirtyBitmap::new(1, Some("chk0".into()), 65536, 64 << 20);
        bm.mark(0, 1 << 20);
        bm.mark(8 << 20, 64 << 10);
        bm.mark(20 << 20, 100 << 10);
        assert_eq!(bm.count_bytes(), 1_245_184);
    }

    #[test]
    fn disabled_and_inconsistent_bitmaps_do_not_record() {
        let mut bm = DirtyBitmap::new(1, Some("a".into()), 65536, 1 << 20);
        bm.disabled = true;
        bm.mark(0, 10);
        assert_eq!(bm.count_bytes(), 0);
        bm.disabled = false;
        bm.inconsistent = true;
        bm.mark(0, 10);
        assert_eq!(bm.bits.count(), 0);
    }

    #[test]
    fn merging_a_finer_bitmap_rounds_to_the_coarser_granularity() {
        // 64 KiB bits into a 128 KiB bitmap: 196608 becomes 262144 (reference §7).
        let mut src = DirtyBitmap::new(1, Some("s".into()), 65536, 64 << 20);
        src.mark(0, 65536);
        src.mark(3 * 65536, 2 * 65536);
        assert_eq!(src.count_bytes(), 196_608);
        let mut dst = DirtyBitmap::new(2, Some("d".into()), 131072, 64 << 20);
        dst.merge_from(&src);
        assert_eq!(dst.count_bytes(), 393_216);
        let mut dst2 = DirtyBitmap::new(3, Some("d2".into()), 131072, 64 << 20);
        let mut src2 = DirtyBitmap::new(4, Some("s2".into()), 65536, 64 << 20);
        src2.mark(0, 3 * 65536);
        dst2.merge_from(&src2);
        assert_eq!(src2.count_bytes(), 196_608);
        assert_eq!(dst2.count_bytes(), 262_144);
    }

    #[test]
    fn info_omits_the_name_of_anonymous_bitmaps_and_shows_inconsistency() {
        let mut bm = DirtyBitmap::new(1, None, 65536, 1 << 20);
        assert!(bm.info(None).get("name").is_none());
        bm.inconsistent = true;
        bm.disabled = true;
        let info = bm.info(None);
        assert_eq!(info["inconsistent"], true);
        assert_eq!(info["recording"], false);
        assert_eq!(info["count"], 0);
    }
}
