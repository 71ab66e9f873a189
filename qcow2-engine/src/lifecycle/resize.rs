//! Growing the virtual size: a larger L1 table moves to a fresh area when needed, through
//! the one table switch (write, sync, header, sync). Shrinking is refused for now.
//!
//! Over a backing file longer than the old size, the new area would show the backing
//! file's data: as QEMU's `bdrv_co_truncate` (`BDRV_REQ_ZERO_WRITE`), it is made to read
//! zero before the header holds the new size: zero (sub)clusters from the first subcluster
//! boundary, explicit zero bytes for the unaligned head, in QEMU's order (so host offsets
//! match). No bitmap is dirtied by it (QEMU's truncate dirties none).

use std::sync::MutexGuard;

use crate::changes::ChangeKind;
use crate::error::{invalid_arg, Error, Result};
use crate::image::{Image, State};
use crate::meta::{MetaKind, NewTable, Which};

impl Image {
    /// Change the virtual size. Growing only; the new size must be a multiple of 512.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly("opened read-only".into()));
        }
        if new_size % 512 != 0 {
            return Err(invalid_arg!(
                "the new size {new_size} must be a multiple of 512"
            ));
        }
        let geo = self.geo;
        let mut st = self.lock_quiet()?;
        st.meta.prepare_first_write()?;
        let cur = self.virtual_size();
        if new_size < cur {
            return Err(Error::Unsupported(format!(
                "shrinking an image ({} -> {})",
                crate::options::format_size(cur),
                crate::options::format_size(new_size)
            )));
        }
        if new_size == cur {
            return Ok(());
        }
        if !st.meta.snapshots.is_empty() {
            return Err(Error::Unsupported(
                "resizing an image with internal snapshots".into(),
            ));
        }
        geo.check_virtual_size(new_size)
            .map_err(|_| crate::options::size_too_large(new_size, &geo))?;
        let zero_new = self.backing.as_ref().is_some_and(|b| b.size() > cur);
        let zero_start = cur.next_multiple_of(geo.subcluster_size());
        if zero_new && self.version < 3 && new_size > zero_start {
            // QEMU grows the L1 table, then fails in the same way.
            return Err(Error::Unsupported(
                "Failed to zero out new clusters: a version 2 image has no zero clusters, \
                 and its backing file is longer than the old size"
                    .into(),
            ));
        }
        self.announce(&mut st, cur, new_size - cur, ChangeKind::Resize)?;
        // The bitmaps grow with clean bits (as QEMU's); where a table must grow, bit 0 is
        // clear until the header holds the new size.
        let regrown = st.meta.bitmaps_resize(new_size)?;
        let (mut st, r) = if zero_new {
            self.grow_zeroed(st, cur, zero_start, new_size)?
        } else {
            let r = self.grow(&mut st, new_size, true);
            (st, r)
        };
        match (&r, regrown) {
            (Ok(()), true) => st.meta.bitmaps_resize_done()?,
            (Err(_), true) => st.meta.bitmaps.forget("a resize failed part-way"),
            _ => {}
        }
        r
    }

    /// Grow over a backing file longer than the old size `cur`: the L1 table first, then
    /// the new area zeroed from `zero_start` (the first subcluster boundary) under the
    /// lock, the unaligned head written as zero bytes without it, and only then the new
    /// size. Returns the lock again, and the result.
    fn grow_zeroed<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        cur: u64,
        zero_start: u64,
        new_size: u64,
    ) -> Result<(MutexGuard<'a, State>, Result<()>)> {
        if let Err(e) = self.grow(&mut st, new_size, false) {
            return Ok((st, Err(e)));
        }
        let (plans, mut r) = self.zero_grown_locked(&mut st, zero_start, new_size);
        drop(st);
        // Begun plans always run (they hold claims).
        for plan in plans {
            let ran = self.run(plan, &[]);
            r = r.and(ran);
        }
        let head_end = zero_start.min(new_size);
        if r.is_ok() && head_end > cur {
            let zeros = vec![0u8; (head_end - cur) as usize];
            r = self.write_data(&zeros, cur, ChangeKind::Resize);
        }
        let mut st = self.lock_quiet()?;
        if r.is_ok() {
            r = if self.virtual_size() != cur {
                Err(Error::Unsupported(
                    "the image was resized concurrently".into(),
                ))
            } else {
                self.publish_size(&mut st, new_size)
            };
        }
        Ok((st, r))
    }

    /// Grow the L1 table as needed and, with `publish`, switch the header to `new_size`.
    fn grow(&self, st: &mut State, new_size: u64, publish: bool) -> Result<()> {
        let geo = self.geo;
        let m = &mut st.meta;
        let need = geo.l1_entries_for(new_size) as usize;
        let synced = if need > m.mapping.l1().len() {
            let cs = geo.cluster_size();
            let clusters = geo.clusters_for(need as u64 * 8);
            let new_off = m.alloc_contiguous(clusters)?;
            // The new table's refcounts must be durable before the header points at it
            // (the switch syncs after writing the table).
            m.write_back(Which::Refcount)?;
            let mut table = m.mapping.l1().to_vec();
            table.resize(need, 0);
            let mut raw = qcow2_format::l1::encode_table(&table);
            raw.resize((clusters * cs) as usize, 0);
            let old_off = m.header.get().l1_table_offset;
            let old_entries = m.header.get().l1_size as u64;
            let synced = m.switch_table(
                NewTable {
                    kind: MetaKind::ActiveL1,
                    off: new_off,
                    bytes: &raw,
                    what: "new L1 table",
                },
                |h| {
                    h.l1_table_offset = new_off;
                    h.l1_size = need as u32;
                    if publish {
                        h.size = new_size;
                    }
                },
            )?;
            // The header names the new table and size: finish even if the sync failed.
            m.mapping.replace_l1(table);
            m.regions.remove(old_off);
            if old_entries > 0 {
                let on_free = m.metadata_on_free;
                m.free_clusters(old_off, geo.clusters_for(old_entries * 8), on_free)?;
                // A durable switch lets the old table be reused at once, as in QEMU (the
                // next allocation, e.g. an L2 table for the new area, takes it); after a
                // failed sync it waits in the quarantine for the next barrier.
                if synced.is_ok() {
                    m.release_quarantine()?;
                }
            }
            synced
        } else if publish {
            m.update_header(|h| h.size = new_size)?;
            m.sync()
        } else {
            Ok(())
        };
        if publish {
            // The header names the new size even when its sync failed: follow it.
            self.size_published(st, new_size);
        }
        synced
    }

    /// Switch the header to `new_size` (the L1 table already covers it), after everything
    /// the new area needed is on the disk.
    fn publish_size(&self, st: &mut State, new_size: u64) -> Result<()> {
        let m = &mut st.meta;
        // The zeroed area's entries are durable before the size that exposes them (QEMU
        // writes the size with its caches still dirty: a crash there shows the backing
        // file's data in the new area).
        m.write_back_all()?;
        m.sync()?;
        m.update_header(|h| h.size = new_size)?;
        m.sync()?;
        self.size_published(st, new_size);
        Ok(())
    }

    /// The new size is in the header: the allocator's slack and the handle follow it.
    fn size_published(&self, st: &mut State, new_size: u64) {
        st.meta
            .alloc
            .set_slack(crate::lifecycle::open::growth_slack(
                &self.geo,
                new_size,
                self.quarantine_slack,
            ));
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
    }
}
