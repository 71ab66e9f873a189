//! What the metadata reports about itself without changing anything: the end of the
//! highest host cluster in use (what a stack that grows the volume under an image watches:
//! LVM thin provisioning, where QEMU users poll `wr_highest_offset`), read from the
//! refcounts in memory without a check; and the effective cache sizes.

use qcow2_format::refcount;

use crate::error::Result;
use crate::image::Image;
use crate::meta::{Meta, Which};

impl Image {
    /// One past the last byte of the highest host cluster with a nonzero refcount: the
    /// size the file or volume must have. It covers allocations not yet flushed (a cluster
    /// is counted before its data is written), so a volume extended to it never misses a
    /// write in flight. On an image without leaks it equals `qemu-img check`'s "image end
    /// offset"; leaked clusters count (they still occupy the volume). Unlike QEMU's
    /// `wr_highest_offset` it is right from the open on and goes down when the top
    /// clusters are freed.
    ///
    /// Cost: a scan of the refcount table (in memory) from its end, and of the last
    /// non-empty refcount block (usually cached), under the metadata lock.
    ///
    /// Clusters freed but still in the quarantine (released at the next flush) count: an
    /// entry on disk may still point at them until then.
    pub fn highest_offset(&self) -> Result<u64> {
        self.lock()?.meta.highest_allocated_end()
    }
}

impl Meta {
    /// See [`Image::highest_offset`].
    pub(crate) fn highest_allocated_end(&mut self) -> Result<u64> {
        let per_block = self.geo.refcount_block_entries();
        let order = self.geo.refcount_order();
        for ti in (0..self.refcounts.table().len() as u64).rev() {
            let block = self.refcounts.block_for(ti * per_block)?;
            if block == 0 {
                continue;
            }
            self.load(Which::Refcount, block)?;
            let data = self.refcounts.blocks.get(block).expect("just loaded");
            if let Some(i) = last_nonzero_entry(data, order) {
                return Ok((ti * per_block + i + 1) * self.cluster_size());
            }
        }
        Ok(0)
    }
}

impl Meta {
    /// The caches' geometry: (L2 slice size, L2 slices, refcount block size, refcount
    /// blocks), for the runtime options an image reports.
    pub(crate) fn cache_geometry(&self) -> (u64, u64, u64, u64) {
        let (l2, rb) = (&self.mapping.l2, &self.refcounts.blocks);
        (
            l2.entry_size() as u64,
            l2.capacity() as u64,
            rb.entry_size() as u64,
            rb.capacity() as u64,
        )
    }
}

/// Index of the last nonzero refcount in a refcount block.
fn last_nonzero_entry(data: &[u8], order: u32) -> Option<u64> {
    // A word at a time from the end, then the byte, then the entries sharing that byte.
    let words = data.len() / 8;
    let word = (0..words)
        .rev()
        .find(|&w| data[w * 8..w * 8 + 8] != [0u8; 8])?;
    let byte = (word * 8..word * 8 + 8).rev().find(|&b| data[b] != 0)? as u64;
    let bits = 1u64 << order;
    let (first, last) = ((byte * 8) / bits, (byte * 8 + 7) / bits);
    (first..=last)
        .rev()
        .find(|&i| refcount::get(data, i as usize, order) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_entry_for_every_width() {
        for order in 0..=6u32 {
            let bits = 1usize << order;
            let entries = 512 * 8 / bits;
            let mut data = vec![0u8; 512];
            assert_eq!(last_nonzero_entry(&data, order), None);
            for i in [0usize, 1, 7, entries / 2, entries - 2, entries - 1] {
                data.fill(0);
                refcount::set(&mut data, i, order, 1).unwrap();
                assert_eq!(
                    last_nonzero_entry(&data, order),
                    Some(i as u64),
                    "order {order}, entry {i}"
                );
            }
        }
    }
}
