//! Persistent dirty bitmaps through the image handle, with QEMU's semantics and limits
//! (`qemu-img bitmap`, the `block-dirty-bitmap-*` QMP commands): list, add, remove, clear,
//! enable, disable, merge (also from another open image), and the dirty-extent query a
//! backup tool walks. The bitmaps themselves live in the metadata component
//! `meta/bitmaps`; requests mark them where every content change is announced
//! (`changes.rs`).
//!
//! Every operation that changes a bitmap is durable when it returns (QEMU's only reach the
//! disk at close), and waits until no request has I/O in flight, so that every request
//! begun before it is accounted for. Clearing a bitmap first makes every completed write
//! durable: after a crash, the content a backup read before the clear is the content on
//! disk.

use qcow2_format::bitmaps::{
    bits_for, table_size_for, BitmapDirEntry, TableEntry, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE,
    MAX_BITMAP_NAME_SIZE, MAX_BITMAP_PHYS_SIZE, MAX_BITMAP_TABLE_SIZE, MAX_GRANULARITY_BITS,
    MIN_GRANULARITY_BITS,
};

use crate::error::{invalid_arg, Error, Result};
use crate::image::{Image, State};
use crate::meta::bitmaps::{Bitmap, Bits, Status, CHUNK_BITS};

/// The longest bitmap name, in bytes (QEMU's `BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_BITMAP_NAME: usize = MAX_BITMAP_NAME_SIZE;

/// A persistent dirty bitmap as the image reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The name (bytes that are not UTF-8 replaced).
    pub name: String,
    /// Guest bytes per bit.
    pub granularity: u64,
    /// Records writes (QEMU's `auto` flag).
    pub enabled: bool,
    /// Flagged in use in the image (QEMU's `in-use`): a program that maintained it did not
    /// close the image. This library never sets the flag.
    pub in_use: bool,
    /// Its content cannot be trusted (it was in use when the image was opened): it is
    /// neither loaded nor tracked; remove it (QEMU's "inconsistent").
    pub inconsistent: bool,
    /// Bytes marked dirty: set bits times the granularity (QEMU's `count`).
    pub dirty_bytes: u64,
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("Dirty bitmap '{name}' not found"))
}

fn inconsistent(name: &str) -> Error {
    invalid_arg!(
        "bitmap '{name}' is inconsistent and cannot be used (it was in use when the image \
         was opened); remove it and add it again"
    )
}

impl Image {
    /// Every persistent bitmap, in directory order. A damaged or untrusted bitmaps
    /// extension lists nothing; [`bitmap_warnings`](Self::bitmap_warnings) says why.
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        let st = self.lock()?;
        Ok(st
            .meta
            .bitmaps
            .list
            .iter()
            .map(|b| BitmapInfo {
                name: String::from_utf8_lossy(&b.name).into_owned(),
                granularity: 1 << b.gran_bits,
                enabled: b.enabled,
                in_use: b.in_use,
                inconsistent: b.in_use,
                dirty_bytes: b.bits.count_ones() << b.gran_bits,
            })
            .collect())
    }

    /// What opening found about the bitmaps that a user should hear (QEMU prints these as
    /// warnings): an extension a program without bitmap support left behind, damage.
    pub fn bitmap_warnings(&self) -> Vec<String> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.meta.bitmaps.warnings.clone()
    }

    /// The metadata lock for a bitmap change: writable image, no request in flight, the
    /// first-write bookkeeping done (which drops a bitmaps extension that is not
    /// maintained).
    fn lock_for_bitmaps(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        if self.read_only {
            return Err(Error::ReadOnly("opened read-only".into()));
        }
        let mut st = self.lock_idle()?;
        st.meta.prepare_first_write()?;
        Ok(st)
    }

    /// The index of bitmap `name`, which must be consistent.
    fn usable(st: &State, name: &str) -> Result<usize> {
        let i = st
            .meta
            .bitmaps
            .find(name.as_bytes())
            .ok_or_else(|| not_found(name))?;
        if st.meta.bitmaps.list[i].in_use {
            return Err(inconsistent(name));
        }
        Ok(i)
    }

    /// Add a persistent bitmap `name` recording writes from now on (`enabled`), of
    /// `granularity` bytes per bit (a power of two from 512 to 2 GiB; `None`: the cluster
    /// size within 4 KiB..64 KiB, QEMU's default). Errors as QEMU's: an empty name or a bad
    /// granularity (`InvalidArgument`), a name longer than 1023 bytes (`NameTooLong`), an
    /// existing name (`Exists`), 65535 bitmaps or a full directory (`NoSpace`), a version
    /// 2 image (`Unsupported`), a read-only image.
    pub fn bitmap_add(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        if name.is_empty() {
            return Err(invalid_arg!("Bitmap name cannot be empty"));
        }
        if name.len() > MAX_BITMAP_NAME {
            return Err(Error::NameTooLong(format!(
                "Name length exceeds maximum ({MAX_BITMAP_NAME} characters)"
            )));
        }
        if name.contains('\0') {
            return Err(invalid_arg!("a bitmap name cannot contain a NUL byte"));
        }
        let cs = self.geo.cluster_size();
        let g = granularity.unwrap_or_else(|| cs.clamp(4096, 65536));
        if !g.is_power_of_two() || g < 1 << MIN_GRANULARITY_BITS {
            return Err(invalid_arg!(
                "Granularity must be power of 2 and at least 512"
            ));
        }
        if g > 1 << MAX_GRANULARITY_BITS {
            return Err(invalid_arg!(
                "Granularity exceeds maximum ({} bytes)",
                1u64 << MAX_GRANULARITY_BITS
            ));
        }
        if self.version < 3 {
            return Err(Error::Unsupported(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            ));
        }
        let gran_bits = g.trailing_zeros() as u8;
        let mut st = self.lock_for_bitmaps()?;
        let size = self.virtual_size();
        let bits = bits_for(size, gran_bits);
        let n = table_size_for(bits, cs);
        if bits.div_ceil(8) > MAX_BITMAP_PHYS_SIZE || n > u64::from(MAX_BITMAP_TABLE_SIZE) {
            return Err(invalid_arg!(
                "Too much space will be occupied by the bitmap. Use larger granularity"
            ));
        }
        if n == 0 {
            return Err(invalid_arg!("a bitmap of a 0-byte image stores nothing"));
        }
        let bm = &st.meta.bitmaps;
        if bm.find(name.as_bytes()).is_some() {
            return Err(Error::Exists(format!("Bitmap already exists: {name}")));
        }
        room_for_one_more(bm.list.iter().map(|b| b.name.len()), name.len())?;
        let m = &mut st.meta;
        let table_off = m.bitmap_new_table(n, &[])?;
        let chunks = bits.div_ceil(CHUNK_BITS);
        m.bitmaps.list.push(Bitmap {
            name: name.as_bytes().to_vec(),
            gran_bits,
            enabled,
            in_use: false,
            bits: Bits::new(bits),
            table_off,
            table_size: n as u32,
            table: vec![TableEntry::Zeros; n as usize],
            armed: Bits::new(chunks),
            touched: Bits::new(chunks),
            idle: Bits::new(chunks),
        });
        if let Err(e) = m.bitmaps_write_directory() {
            // The table stays allocated (the new directory may have reached the disk).
            m.bitmaps.list.pop();
            m.bitmaps.refresh();
            return Err(e);
        }
        Ok(())
    }

    /// Remove bitmap `name` (consistent or not) and free its clusters.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        let mut st = self.lock_for_bitmaps()?;
        let m = &mut st.meta;
        let i = m
            .bitmaps
            .find(name.as_bytes())
            .ok_or_else(|| not_found(name))?;
        let b = m.bitmaps.list.remove(i);
        if let Err(e) = m.bitmaps_write_directory() {
            m.bitmaps.list.insert(i, b);
            m.bitmaps.refresh();
            return Err(e);
        }
        m.bitmap_release(&b)
    }

    /// Clear bitmap `name`: no byte is dirty. Every completed write is made durable first.
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        let mut st = self.lock_for_bitmaps()?;
        let i = Self::usable(&st, name)?;
        st.meta.flush()?;
        st.meta.bitmap_clear(i)
    }

    /// Make bitmap `name` record writes (QEMU's `--enable`).
    pub fn bitmap_enable(&self, name: &str) -> Result<()> {
        self.bitmap_set_enabled(name, true)
    }

    /// Make bitmap `name` stop recording writes (QEMU's `--disable`).
    pub fn bitmap_disable(&self, name: &str) -> Result<()> {
        self.bitmap_set_enabled(name, false)
    }

    fn bitmap_set_enabled(&self, name: &str, on: bool) -> Result<()> {
        let mut st = self.lock_for_bitmaps()?;
        let i = Self::usable(&st, name)?;
        let m = &mut st.meta;
        if m.bitmaps.list[i].enabled == on {
            return Ok(());
        }
        m.bitmaps.list[i].enabled = on;
        let r = m.bitmap_write_flags(i);
        if r.is_err() {
            m.bitmaps.list[i].enabled = !on;
        }
        m.bitmaps.refresh();
        r
    }

    /// Merge bitmap `source` into bitmap `target` (every byte dirty in the source becomes
    /// dirty in the target; granularities may differ). The source is a bitmap of this
    /// image, or of `source_image` (qemu-img's `-b`), whose virtual size must be this
    /// image's.
    pub fn bitmap_merge(
        &self,
        target: &str,
        source: &str,
        source_image: Option<&Image>,
    ) -> Result<()> {
        let other = source_image.filter(|o| !std::ptr::eq(*o, self));
        let from_other = match other {
            Some(o) => Some(o.bitmap_snapshot(source)?),
            None => None,
        };
        let mut st = self.lock_for_bitmaps()?;
        let t = Self::usable(&st, target)?;
        let (bits, gran, size) = match from_other {
            Some(x) => x,
            None => {
                let s = Self::usable(&st, source)?;
                let b = &st.meta.bitmaps.list[s];
                (b.bits.clone(), b.gran_bits, self.virtual_size())
            }
        };
        if size != self.virtual_size() {
            return Err(invalid_arg!(
                "Bitmaps are of different sizes (destination {}, source {size}) and can't be merged",
                self.virtual_size()
            ));
        }
        st.meta.bitmap_merge(t, &bits, gran)
    }

    /// A copy of bitmap `name`'s bits, its granularity bits and the virtual size.
    fn bitmap_snapshot(&self, name: &str) -> Result<(Bits, u8, u64)> {
        let st = self.lock()?;
        let i = Self::usable(&st, name)?;
        let b = &st.meta.bitmaps.list[i];
        Ok((b.bits.clone(), b.gran_bits, self.virtual_size()))
    }

    /// Whether guest bytes from `offset` are dirty in bitmap `name`, and for how many
    /// bytes (at least 1, at most `len`, never past the virtual size) that holds: walk
    /// `[offset, offset + len)` by calling again at `offset + n`. As `block_status`, for a
    /// backup tool that reads only what changed.
    pub fn bitmap_dirty(&self, name: &str, offset: u64, len: u64) -> Result<(u64, bool)> {
        let size = self.virtual_size();
        if len == 0 || offset >= size {
            return Err(invalid_arg!(
                "range {offset}+{len} is empty or starts at or past the virtual size {size}"
            ));
        }
        let end = offset.saturating_add(len).min(size);
        let st = self.lock()?;
        let i = Self::usable(&st, name)?;
        let b = &st.meta.bitmaps.list[i];
        let (a, z) = b.bit_range(offset, end - offset);
        let (n, dirty) = b.bits.run(a, z - a);
        let run_end = ((a + n) << b.gran_bits).min(end);
        Ok((run_end - offset, dirty))
    }

    /// Whether the bitmaps are maintained by this handle (loaded from a trusted extension,
    /// or added here).
    pub fn bitmaps_maintained(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.meta.bitmaps.status == Status::Loaded
    }
}

/// QEMU's two directory limits for adding a bitmap named with `name_len` bytes beside
/// bitmaps whose names have `existing` lengths: at most 65535 bitmaps, and a directory of
/// at most 64 MiB (`NoSpace`, with QEMU's words).
fn room_for_one_more(
    existing: impl ExactSizeIterator<Item = usize>,
    name_len: usize,
) -> Result<()> {
    if existing.len() as u64 + 1 > u64::from(MAX_BITMAPS) {
        return Err(Error::NoSpace(
            "Maximum number of persistent bitmaps is already reached".into(),
        ));
    }
    let dir_size: u64 = existing
        .chain([name_len])
        .map(|n| BitmapDirEntry::encoded_len(n) as u64)
        .sum();
    if dir_size > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(Error::NoSpace(
            "Not enough space in the bitmap directory".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_65536th_bitmap_is_refused() {
        // 65,534 bitmaps take a 65,535th; 65,535 take no more (QEMU's QCOW2_MAX_BITMAPS).
        let n = MAX_BITMAPS as usize;
        assert!(room_for_one_more(std::iter::repeat_n(8, n - 1), 8).is_ok());
        let e = room_for_one_more(std::iter::repeat_n(8, n), 8).unwrap_err();
        assert!(matches!(e, Error::NoSpace(_)), "{e}");
        assert!(e.to_string().contains("Maximum number"), "{e}");
    }

    #[test]
    fn a_directory_past_64_mib_is_refused() {
        // Names of 1023 bytes take 1,048 bytes of directory each (24-byte entry, name,
        // padding to 8): 64,035 of them exceed 64 MiB while the count is within limits.
        let per = BitmapDirEntry::encoded_len(MAX_BITMAP_NAME) as u64;
        assert!(per > 1024, "{per}");
        let fit = (MAX_BITMAP_DIRECTORY_SIZE / per) as usize;
        assert!(room_for_one_more(
            std::iter::repeat_n(MAX_BITMAP_NAME, fit - 1),
            MAX_BITMAP_NAME
        )
        .is_ok());
        let e = room_for_one_more(std::iter::repeat_n(MAX_BITMAP_NAME, fit), MAX_BITMAP_NAME)
            .unwrap_err();
        assert!(matches!(e, Error::NoSpace(_)), "{e}");
        assert!(e.to_string().contains("bitmap directory"), "{e}");
    }
}
