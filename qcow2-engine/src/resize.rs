//! Growing the virtual size: a larger L1 table moves to a fresh area when needed; the
//! header switches to it in one sector write. Shrinking is refused for now.

use crate::error::{invalid_arg, Error, Result};
use crate::image::Image;
use crate::meta::{MetaKind, Which};
use crate::policy::FreeReason;

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
        let mut m = self.lock();
        m.prepare_first_write()?;
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
        if !m.snapshots.is_empty() {
            return Err(Error::Unsupported(
                "resizing an image with internal snapshots".into(),
            ));
        }
        geo.check_virtual_size(new_size)
            .map_err(|_| crate::options::size_too_large(new_size, &geo))?;
        let need = geo.l1_entries_for(new_size) as usize;
        if need > m.l1.len() {
            let cs = geo.cluster_size();
            let bytes = need as u64 * 8;
            let clusters = geo.clusters_for(bytes);
            let new_off = m.alloc_contiguous(clusters)?;
            // The whole clusters: the table is written with its zero padding.
            m.add_meta(new_off, clusters * cs, MetaKind::ActiveL1);
            // The new table's refcounts, then its content, must be durable before the
            // header points at it.
            m.write_back(Which::Refcount)?;
            let mut table = m.l1.clone();
            table.resize(need, 0);
            let mut raw = qcow2_format::l1::encode_table(&table);
            raw.resize((clusters * cs) as usize, 0);
            m.write_host(&raw, new_off, Some(MetaKind::ActiveL1), "new L1 table")?;
            m.sync()?;
            let old_off = m.area.header.l1_table_offset;
            let old_entries = m.area.header.l1_size as u64;
            m.update_header(|h| {
                h.l1_table_offset = new_off;
                h.l1_size = need as u32;
                h.size = new_size;
            })?;
            m.sync()?;
            m.l1 = table;
            m.remove_meta(old_off);
            if old_entries > 0 {
                m.free_clusters(
                    old_off,
                    geo.clusters_for(old_entries * 8),
                    FreeReason::Other,
                )?;
            }
        } else {
            m.update_header(|h| h.size = new_size)?;
            m.sync()?;
        }
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
