//! The bitmaps' writes, as [`Meta`] operations (they allocate, write, sync and free):
//! arming chunks (write intent), storing chunks (lazy clearing, close, merge), clearing,
//! and rewriting the directory. Ordering, besides the write intent of `mod.rs`:
//! - a new data cluster, table or directory is written, and its refcount durable, before
//!   the entry or extension that names it (one sync between);
//! - a table entry or directory that stops naming a cluster is durable before the cluster
//!   is reused (frees go through the quarantine);
//! - bits are only ever cleared on disk where memory has them clear: whatever part of
//!   such a write lands, the disk keeps a superset of the exact bits.

use std::collections::BTreeMap;

use qcow2_format::bitmaps::{serialize_directory, NewDirEntry, TableEntry};
use qcow2_format::extensions::BitmapsExt;

use super::{Bitmap, Bits, Status, CHUNK_BITS, CHUNK_BYTES};
use crate::error::{Error, Result};
use crate::meta::{Meta, MetaKind, Which};

/// What a cluster of bitmap data holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    Zeros,
    Ones,
    Mixed,
}

/// Consecutive runs of sorted values: (first, count).
fn runs(v: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &x in v {
        match out.last_mut() {
            Some((s, n)) if *s + *n == x => *n += 1,
            _ => out.push((x, 1)),
        }
    }
    out
}

impl Meta {
    /// Guest bytes `[off, off + len)` are about to change: mark them in every bitmap that
    /// records writes, and arm the chunks whose bits are not yet safe on disk (durable
    /// before this returns). The hot path is two tests when the bits are already set.
    pub(crate) fn bitmaps_will_change(&mut self, off: u64, len: u64) -> Result<()> {
        if !self.bitmaps.tracking() {
            return Ok(());
        }
        let need = self.bitmaps.mark(off, len);
        if need.is_empty() {
            return Ok(());
        }
        self.arm_chunks(&need)
    }

    /// Write all ones over each chunk's sector (allocating the data cluster where the
    /// table has none), durably, then mark the chunks armed.
    fn arm_chunks(&mut self, need: &[(usize, u64)]) -> Result<()> {
        let cs = self.cluster_size();
        let spc = Bitmap::chunks_per_entry(cs);
        let mut groups: BTreeMap<(usize, u64), Vec<u64>> = BTreeMap::new();
        for &(i, c) in need {
            groups.entry((i, c / spc)).or_default().push(c % spc);
        }
        let mut fresh: Vec<(usize, u64, Vec<u64>)> = Vec::new();
        for ((i, t), secs) in groups {
            match self.bitmaps.list[i].table[t as usize] {
                TableEntry::Ones => {}
                TableEntry::Cluster(d) => {
                    for (s, n) in runs(&secs) {
                        let buf = vec![0xffu8; (n * CHUNK_BYTES) as usize];
                        self.write_meta(
                            &buf,
                            d + s * CHUNK_BYTES,
                            MetaKind::BitmapData,
                            "bitmap data",
                        )?;
                    }
                }
                TableEntry::Zeros => fresh.push((i, t, secs)),
            }
        }
        let placed = self.place_fresh(fresh.len() as u64, |m, k, d| {
            let (_, _, secs) = &fresh[k];
            let mut buf = vec![0u8; cs as usize];
            for &s in secs {
                buf[(s * CHUNK_BYTES) as usize..((s + 1) * CHUNK_BYTES) as usize].fill(0xff);
            }
            m.write_meta(&buf, d, MetaKind::BitmapData, "bitmap data")
        })?;
        self.sync()?;
        if !placed.is_empty() {
            for (k, d) in placed.into_iter().enumerate() {
                let (i, t, _) = fresh[k];
                self.set_table_entry(i, t, TableEntry::Cluster(d))?;
            }
            self.sync()?;
        }
        for &(i, c) in need {
            let b = &mut self.bitmaps.list[i];
            b.armed.set_range(c, c + 1);
            b.touched.set_range(c, c + 1);
        }
        Ok(())
    }

    /// Allocate `n` data clusters and fill each with `fill(meta, index, offset)`; their
    /// refcounts are written back (not synced). Nothing names them yet: on failure they
    /// are given back.
    fn place_fresh(
        &mut self,
        n: u64,
        mut fill: impl FnMut(&mut Meta, usize, u64) -> Result<()>,
    ) -> Result<Vec<u64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let cs = self.cluster_size();
        let runs = self.alloc_clusters(n)?;
        let hosts: Vec<u64> = runs
            .iter()
            .flat_map(|r| (0..r.count).map(move |k| r.off + k * cs))
            .collect();
        let r = (|| -> Result<()> {
            for (k, &d) in hosts.iter().enumerate() {
                self.regions.add(d, cs, MetaKind::BitmapData);
                fill(self, k, d)?;
            }
            self.write_back(Which::Refcount)
        })();
        if let Err(e) = r {
            for &d in &hosts {
                self.regions.remove_if(d, MetaKind::BitmapData);
                let _ = self.unallocate(d, 1);
            }
            return Err(e);
        }
        Ok(hosts)
    }

    /// Write table entry `t` of bitmap `i` (8 bytes: atomic), then record it.
    fn set_table_entry(&mut self, i: usize, t: u64, e: TableEntry) -> Result<()> {
        let off = self.bitmaps.list[i].table_off + t * 8;
        self.write_meta(
            &e.encode().to_be_bytes(),
            off,
            MetaKind::BitmapTable,
            "bitmap table entry",
        )?;
        self.bitmaps.list[i].table[t as usize] = e;
        Ok(())
    }

    /// A data cluster named by a table entry no longer is: forget it as metadata and drop
    /// its reference (after the next barrier, through the quarantine).
    fn release_bitmap_cluster(&mut self, d: u64, kind: MetaKind, clusters: u64) -> Result<()> {
        self.regions.remove_if(d, kind);
        let on_free = self.metadata_on_free;
        self.free_clusters(d, clusters, on_free)
    }

    /// Store chunks `chunks` (sorted) of bitmap `i`: their exact bits when `unarm` (they
    /// are disarmed), else their bits with armed chunks kept all ones. With `normalize` (or
    /// where the table has no data cluster) a cluster whose content is all zeros or all
    /// ones becomes the table entry that says so. Not synced, except between new data
    /// clusters and the entries naming them.
    pub(crate) fn bitmap_store_chunks(
        &mut self,
        i: usize,
        chunks: &[u64],
        unarm: bool,
        normalize: bool,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let spc = Bitmap::chunks_per_entry(cs);
        let mut groups: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for &c in chunks {
            groups.entry(c / spc).or_default().push(c % spc);
        }
        let mut entries: Vec<(u64, TableEntry, Option<u64>)> = Vec::new();
        let mut fresh: Vec<u64> = Vec::new();
        for (t, secs) in groups {
            let b = &self.bitmaps.list[i];
            let cur = b.table[t as usize];
            let want = if normalize || !matches!(cur, TableEntry::Cluster(_)) {
                classify(b, t, spc, unarm)
            } else {
                Content::Mixed
            };
            match (cur, want) {
                (TableEntry::Cluster(d), Content::Mixed) => {
                    for (s, n) in runs(&secs) {
                        let buf = chunk_bytes(&self.bitmaps.list[i], t * spc + s, n, unarm);
                        self.write_meta(
                            &buf,
                            d + s * CHUNK_BYTES,
                            MetaKind::BitmapData,
                            "bitmap data",
                        )?;
                    }
                }
                (TableEntry::Cluster(d), Content::Zeros) => {
                    entries.push((t, TableEntry::Zeros, Some(d)))
                }
                (TableEntry::Cluster(d), Content::Ones) => {
                    entries.push((t, TableEntry::Ones, Some(d)))
                }
                (_, Content::Mixed) => fresh.push(t),
                (TableEntry::Ones, Content::Zeros) => entries.push((t, TableEntry::Zeros, None)),
                (TableEntry::Zeros, Content::Ones) => entries.push((t, TableEntry::Ones, None)),
                _ => {}
            }
        }
        let placed = self.place_fresh(fresh.len() as u64, |m, k, d| {
            let buf = chunk_bytes(&m.bitmaps.list[i], fresh[k] * spc, spc, unarm);
            m.write_meta(&buf, d, MetaKind::BitmapData, "bitmap data")
        })?;
        for (k, d) in placed.into_iter().enumerate() {
            entries.push((fresh[k], TableEntry::Cluster(d), None));
        }
        if !entries.is_empty() {
            if !fresh.is_empty() {
                self.sync()?;
            }
            for (t, e, free) in entries {
                self.set_table_entry(i, t, e)?;
                if let Some(d) = free {
                    self.release_bitmap_cluster(d, MetaKind::BitmapData, 1)?;
                }
            }
        }
        if unarm {
            let b = &mut self.bitmaps.list[i];
            for &c in chunks {
                b.armed.clear_range(c, c + 1);
                b.touched.clear_range(c, c + 1);
                b.idle.clear_range(c, c + 1);
            }
        }
        Ok(())
    }

    /// At a flush (after its sync): store the armed chunks no request touched in the last
    /// two flush intervals with their exact bits and disarm them (md's lazy clearing); the
    /// others stay armed. The writes are made durable by a later barrier.
    pub(crate) fn bitmaps_lazy_clear(&mut self) -> Result<()> {
        if !self.bitmaps.maintained() {
            return Ok(());
        }
        for i in 0..self.bitmaps.list.len() {
            let b = &mut self.bitmaps.list[i];
            if b.in_use {
                continue;
            }
            let mut idle = Vec::new();
            let armed: Vec<u64> = b.armed.ones().collect();
            for c in armed {
                if b.touched.get(c) {
                    b.idle.clear_range(c, c + 1);
                } else if b.idle.get(c) {
                    idle.push(c);
                } else {
                    b.idle.set_range(c, c + 1);
                }
            }
            b.touched.clear_all();
            if !idle.is_empty() {
                self.bitmap_store_chunks(i, &idle, true, false)?;
            }
        }
        Ok(())
    }

    /// At close (after a flush): store every bitmap exactly, data clusters that became
    /// all zeros or all ones replaced by table entries. Returns whether anything was
    /// written (the caller then flushes again).
    pub(crate) fn bitmaps_store_exact(&mut self) -> Result<bool> {
        if !self.bitmaps.maintained() {
            return Ok(false);
        }
        let mut wrote = false;
        for i in 0..self.bitmaps.list.len() {
            let chunks: Vec<u64> = self.bitmaps.list[i].armed.ones().collect();
            if !chunks.is_empty() {
                self.bitmap_store_chunks(i, &chunks, true, true)?;
                wrote = true;
            }
        }
        Ok(wrote)
    }

    /// Clear bitmap `i` in memory and on disk (every table entry zero, its data clusters
    /// freed), durably.
    pub(crate) fn bitmap_clear(&mut self, i: usize) -> Result<()> {
        let b = &mut self.bitmaps.list[i];
        b.bits.clear_all();
        b.armed.clear_all();
        b.touched.clear_all();
        b.idle.clear_all();
        for t in 0..b.table.len() as u64 {
            match self.bitmaps.list[i].table[t as usize] {
                TableEntry::Zeros => {}
                TableEntry::Ones => self.set_table_entry(i, t, TableEntry::Zeros)?,
                TableEntry::Cluster(d) => {
                    self.set_table_entry(i, t, TableEntry::Zeros)?;
                    self.release_bitmap_cluster(d, MetaKind::BitmapData, 1)?;
                }
            }
        }
        self.sync()
    }

    /// Or `src` (granularity `1 << src_gran` bits) into bitmap `i`, durably.
    pub(crate) fn bitmap_merge(&mut self, i: usize, src: &Bits, src_gran: u8) -> Result<()> {
        let b = &mut self.bitmaps.list[i];
        let mut changed: Vec<u64> = Vec::new();
        let mut at = 0;
        while at < src.len() {
            let (n, dirty) = src.run(at, u64::MAX);
            if dirty {
                let off = at << src_gran;
                let len = n << src_gran;
                let (a, z) = b.bit_range(off, len);
                if a < z {
                    for c in a / CHUNK_BITS..=(z - 1) / CHUNK_BITS {
                        let (ca, cz) = (a.max(c * CHUNK_BITS), z.min((c + 1) * CHUNK_BITS));
                        if !b.bits.all_set(ca, cz) && changed.last() != Some(&c) {
                            changed.push(c);
                        }
                    }
                    b.bits.set_range(a, z);
                }
            }
            at += n.max(1);
        }
        if changed.is_empty() {
            return Ok(());
        }
        self.bitmap_store_chunks(i, &changed, false, false)?;
        self.sync()
    }

    /// Write bitmap `i`'s flags into its directory entry in place (4 bytes: atomic),
    /// durably.
    pub(crate) fn bitmap_write_flags(&mut self, i: usize) -> Result<()> {
        let (dir, _) = self.bitmaps.dir.expect("a loaded bitmap has a directory");
        let pos: usize = self.bitmaps.list[..i]
            .iter()
            .map(|b| qcow2_format::bitmaps::BitmapDirEntry::encoded_len(b.name.len()))
            .sum();
        let flags = self.bitmaps.list[i].flags();
        self.write_meta(
            &flags.to_be_bytes(),
            dir + pos as u64 + 12,
            MetaKind::BitmapDirectory,
            "bitmap directory entry",
        )?;
        self.sync()
    }

    /// Write a new directory from the list and switch the extension to it (adding the
    /// extension, or removing it when the list is empty), durably; the old directory is
    /// freed.
    pub(crate) fn bitmaps_write_directory(&mut self) -> Result<()> {
        let storage = self.storage.clone();
        let old = self.bitmaps.dir;
        if self.bitmaps.list.is_empty() {
            self.header.remove_bitmaps_ext(&*storage)?;
            self.bitmaps.dir = None;
            self.bitmaps.status = Status::Absent;
        } else {
            let entries: Vec<NewDirEntry> = self
                .bitmaps
                .list
                .iter()
                .map(|b| NewDirEntry {
                    table_offset: b.table_off,
                    table_size: b.table_size,
                    flags: b.flags(),
                    granularity_bits: b.gran_bits,
                    name: &b.name,
                })
                .collect();
            let bytes = serialize_directory(&entries);
            let len = bytes.len() as u64;
            let off = self.alloc_contiguous(self.geo.clusters_for(len))?;
            self.regions.add(off, len, MetaKind::BitmapDirectory);
            let r = (|| -> Result<()> {
                self.write_meta(&bytes, off, MetaKind::BitmapDirectory, "bitmap directory")?;
                self.write_back(Which::Refcount)?;
                self.sync()
            })();
            if let Err(e) = r {
                self.regions.remove_if(off, MetaKind::BitmapDirectory);
                let _ = self.unallocate(off, self.geo.clusters_for(len));
                return Err(e);
            }
            let ext = BitmapsExt {
                nb_bitmaps: self.bitmaps.list.len() as u32,
                directory_size: len,
                directory_offset: off,
            };
            // Once the switch was attempted the new directory may be the one on disk: it
            // stays allocated (a leak at worst) whatever happens.
            if self.header.bitmaps_ext().is_some() {
                self.header.switch_bitmaps_ext(&*storage, ext)?;
            } else {
                self.header.add_bitmaps_ext(&*storage, ext)?;
            }
            self.bitmaps.dir = Some((off, len));
            self.bitmaps.status = Status::Loaded;
        }
        if let Some((o, l)) = old {
            self.release_bitmap_cluster(o, MetaKind::BitmapDirectory, self.geo.clusters_for(l))?;
        }
        self.bitmaps.refresh();
        Ok(())
    }

    /// Give back the clusters a removed bitmap owned (after the directory that named it
    /// is gone): its data clusters and its table.
    pub(crate) fn bitmap_release(&mut self, b: &Bitmap) -> Result<()> {
        if b.table.is_empty() {
            return Ok(()); // never read: its clusters stay, leaks for a repair to free
        }
        for e in &b.table {
            if let TableEntry::Cluster(d) = *e {
                self.release_bitmap_cluster(d, MetaKind::BitmapData, 1)?;
            }
        }
        let n = self.geo.clusters_for(u64::from(b.table_size) * 8);
        self.release_bitmap_cluster(b.table_off, MetaKind::BitmapTable, n)
    }

    /// A new, empty table of `n` entries; returns its offset.
    pub(crate) fn bitmap_new_table(&mut self, n: u64, entries: &[TableEntry]) -> Result<u64> {
        let clusters = self.geo.clusters_for(n * 8);
        let off = self.alloc_contiguous(clusters)?;
        self.regions.add(off, n * 8, MetaKind::BitmapTable);
        let mut raw: Vec<u64> = entries.iter().map(|e| e.encode()).collect();
        raw.resize(n as usize, 0);
        if let Err(e) = self.write_meta(
            &qcow2_format::l1::encode_table(&raw),
            off,
            MetaKind::BitmapTable,
            "bitmap table",
        ) {
            self.regions.remove_if(off, MetaKind::BitmapTable);
            let _ = self.unallocate(off, clusters);
            return Err(e);
        }
        Ok(off)
    }

    /// The first metadata change drops an extension that is not maintained (QEMU drops
    /// one that is not vouched for at its first header update; a damaged one it would
    /// not have opened). Its clusters become leaks.
    pub(crate) fn bitmaps_first_write(&mut self) -> Result<()> {
        if !self.bitmaps.needs_first_write() {
            return Ok(());
        }
        let storage = self.storage.clone();
        self.header.remove_bitmaps_ext(&*storage)?;
        self.bitmaps.status = Status::Absent;
        self.bitmaps.list.clear();
        self.bitmaps.dir = None;
        self.bitmaps.refresh();
        Ok(())
    }

    /// Before the virtual size grows to `new_size`: every bitmap grows with clean bits.
    /// Returns whether a table had to grow, in which case bit 0 is clear now (the new
    /// tables are only right for the new size) and [`bitmaps_resize_done`] sets it again
    /// once the header holds the new size.
    ///
    /// [`bitmaps_resize_done`]: Meta::bitmaps_resize_done
    pub(crate) fn bitmaps_resize(&mut self, new_size: u64) -> Result<bool> {
        if !self.bitmaps.maintained() {
            return Ok(false);
        }
        if let Some(b) = self.bitmaps.list.iter().find(|b| b.in_use) {
            return Err(Error::Unsupported(format!(
                "resizing an image whose bitmap '{}' is inconsistent (remove it first)",
                String::from_utf8_lossy(&b.name)
            )));
        }
        let cs = self.cluster_size();
        let spc = Bitmap::chunks_per_entry(cs);
        let mut grow: Vec<(usize, u64)> = Vec::new();
        let mut ones_tail: Vec<(usize, u64)> = Vec::new();
        for (i, b) in self.bitmaps.list.iter_mut().enumerate() {
            let old_bits = b.bits.len();
            let bits = qcow2_format::bitmaps::bits_for(new_size, b.gran_bits);
            b.bits.resize(bits);
            b.armed.resize(bits.div_ceil(CHUNK_BITS));
            b.touched.resize(bits.div_ceil(CHUNK_BITS));
            b.idle.resize(bits.div_ceil(CHUNK_BITS));
            let n = qcow2_format::bitmaps::table_size_for(bits, cs);
            if n != u64::from(b.table_size) {
                grow.push((i, n));
            }
            // A last entry of all ones also covered the bits past the old end, which must
            // read clean now.
            let last = old_bits.div_ceil(cs * 8).saturating_sub(1);
            if bits > old_bits && b.table.get(last as usize) == Some(&TableEntry::Ones) {
                ones_tail.push((i, last));
            }
        }
        for (i, last) in ones_tail {
            let chunks: Vec<u64> = (last * spc..(last + 1) * spc).collect();
            self.bitmap_store_chunks(i, &chunks, true, true)?;
        }
        if grow.is_empty() {
            return Ok(false);
        }
        let storage = self.storage.clone();
        self.header.set_bitmaps_bit(&*storage, false)?;
        for (i, n) in grow {
            let old = std::mem::take(&mut self.bitmaps.list[i].table);
            let old_off = self.bitmaps.list[i].table_off;
            let old_size = self.bitmaps.list[i].table_size;
            let off = match self.bitmap_new_table(n, &old) {
                Ok(off) => off,
                Err(e) => {
                    self.bitmaps.list[i].table = old;
                    return Err(e);
                }
            };
            let mut table = old;
            table.resize(n as usize, TableEntry::Zeros);
            let b = &mut self.bitmaps.list[i];
            b.table = table;
            b.table_off = off;
            b.table_size = n as u32;
            self.write_back(Which::Refcount)?;
            let clusters = self.geo.clusters_for(u64::from(old_size) * 8);
            self.release_bitmap_cluster(old_off, MetaKind::BitmapTable, clusters)?;
        }
        self.sync()?;
        self.bitmaps_write_directory()?;
        Ok(true)
    }

    /// After a resize whose bitmaps needed new tables: the header holds the new size, so
    /// the bitmaps are vouched for again.
    pub(crate) fn bitmaps_resize_done(&mut self) -> Result<()> {
        let storage = self.storage.clone();
        self.header.set_bitmaps_bit(&*storage, true)
    }
}

/// The bytes of `n` chunks of `b` from chunk `first`: exact bits, or all ones for armed
/// chunks unless `exact`.
fn chunk_bytes(b: &Bitmap, first: u64, n: u64, exact: bool) -> Vec<u8> {
    let mut buf = vec![0u8; (n * CHUNK_BYTES) as usize];
    for k in 0..n {
        let c = first + k;
        let part = &mut buf[(k * CHUNK_BYTES) as usize..((k + 1) * CHUNK_BYTES) as usize];
        if !exact && b.armed.get(c) {
            part.fill(0xff);
        } else {
            b.bits.store(c * CHUNK_BITS, part);
        }
    }
    buf
}

/// What table entry `t`'s cluster would hold (armed chunks all ones unless `exact`).
fn classify(b: &Bitmap, t: u64, spc: u64, exact: bool) -> Content {
    let (mut zeros, mut ones) = (true, true);
    for c in t * spc..(t + 1) * spc {
        if !exact && b.armed.get(c) {
            zeros = false;
        } else {
            let (a, z) = (c * CHUNK_BITS, (c + 1) * CHUNK_BITS);
            zeros &= b.bits.none_set(a, z);
            ones &= b.bits.all_set(a, z);
        }
        if !zeros && !ones {
            return Content::Mixed;
        }
    }
    if zeros {
        Content::Zeros
    } else {
        Content::Ones
    }
}
