//! Refcounts as the image stores them, read the way qemu-img check reads them on a
//! possibly damaged image: reserved bits of a refcount table entry are masked, a block
//! past the end of the file reads as zeros, and only an unaligned block offset or one
//! beyond the largest offset QEMU's block layer accepts makes a refcount unreadable (a
//! check error in qemu-img's counters). Also the one way check and repair change a
//! single stored refcount.

use qcow2_format::refcount::REFT_OFFSET_MASK;

use crate::error::{corrupt, Result};
use crate::meta::{Meta, Which};

/// The largest end of a request QEMU's block layer accepts (`BDRV_MAX_LENGTH`: `INT64_MAX`
/// aligned down to 1 GiB); a read past it fails with EIO instead of reading zeros.
const QEMU_MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// The offset of the refcount block covering host cluster `c`: `Ok(0)` for none, `Err(())`
/// when the table entry is unaligned or beyond what QEMU can read (the refcount cannot
/// be read).
fn block_of(m: &Meta, c: u64) -> std::result::Result<u64, ()> {
    let ti = (c >> m.geo.refcount_block_bits()) as usize;
    let off = match m.refcounts.table().get(ti) {
        None => return Ok(0),
        Some(&raw) => raw & REFT_OFFSET_MASK,
    };
    let cs = m.cluster_size();
    if off % cs != 0 || off.saturating_add(cs) > QEMU_MAX_LENGTH {
        return Err(());
    }
    Ok(off)
}

/// The stored refcount of host cluster `c`, or `None` when it cannot be read (an
/// unaligned refcount block).
pub(crate) fn stored_refcount(m: &mut Meta, c: u64, file_len: u64) -> Result<Option<u64>> {
    let block = match block_of(m, c) {
        Err(()) => return Ok(None),
        Ok(0) => return Ok(Some(0)),
        Ok(b) => b,
    };
    if block >= file_len {
        return Ok(Some(0));
    }
    m.load(Which::Refcount, block)?;
    Ok(Some(m.refcounts.get_loaded(block, c)))
}

/// Set the stored refcount of host cluster `c` (its block exists and is readable).
pub(crate) fn set_stored_refcount(m: &mut Meta, c: u64, value: u64) -> Result<()> {
    let block = match block_of(m, c) {
        Ok(b) if b != 0 && b < m.alloc.end() => b,
        _ => return Err(corrupt!("cluster {c} has no usable refcount block")),
    };
    m.load(Which::Refcount, block)?;
    m.refcounts.checked(c, value, 0)?;
    m.refcounts.set_loaded(block, c, value)?;
    if value == 0 {
        m.alloc.reset_hint();
        m.bump_free_gen();
    }
    Ok(())
}
