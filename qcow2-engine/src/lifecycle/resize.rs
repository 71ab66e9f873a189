//! Growing the virtual size: a larger L1 table moves to a fresh area when needed, through
//! the one table switch (write, sync, header, sync). Shrinking is refused for now.

use crate::changes::ChangeKind;
use crate::error::{invalid_arg, Error, Result};
use crate::image::Image;
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
        self.announce(&mut st, cur, new_size - cur, ChangeKind::Resize)?;
        // The bitmaps grow with clean bits (as QEMU's); where a table must grow, bit 0 is
        // clear until the header holds the new size.
        let regrown = st.meta.bitmaps_resize(new_size)?;
        let r = self.grow(&mut st, new_size);
        match (&r, regrown) {
            (Ok(()), true) => st.meta.bitmaps_resize_done()?,
            (Err(_), true) => st.meta.bitmaps.forget("a resize failed part-way"),
            _ => {}
        }
        r
    }

    /// Grow the L1 table as needed and switch the header to `new_size`.
    fn grow(&self, st: &mut crate::image::State, new_size: u64) -> Result<()> {
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
                    h.size = new_size;
                },
            )?;
            // The header names the new table and size: finish even if the sync failed.
            m.mapping.replace_l1(table);
            m.regions.remove(old_off);
            if old_entries > 0 {
                let on_free = m.metadata_on_free;
                m.free_clusters(old_off, geo.clusters_for(old_entries * 8), on_free)?;
            }
            synced
        } else {
            m.update_header(|h| h.size = new_size)?;
            m.sync()
        };
        m.alloc.set_slack(crate::lifecycle::open::growth_slack(
            &geo,
            new_size,
            self.quarantine_slack,
        ));
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        synced
    }
}
