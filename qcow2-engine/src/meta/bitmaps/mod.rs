//! Persistent dirty bitmaps, maintained: the bitmaps component owns each bitmap's exact
//! bits in memory, its table as it is on disk, and the write-intent state that keeps the
//! on-disk copy safe across a crash (`disk.rs` carries out the writes, `load.rs` reads
//! the bitmaps at open, `bits.rs` is the bit vector).
//!
//! **Write intent** (Linux md's write-intent bitmap, per 512-byte sector of bitmap data,
//! a *chunk* of 4096 bits): before a request changes guest content, its range is marked
//! in memory, and every chunk it touches whose bits are not known to be set on disk is
//! *armed*: its sector is written as all ones and synced, under the metadata lock, before
//! the request's own I/O or metadata edit is planned. So while an image is open the
//! bitmap on disk is a superset of every range whose new data may have reached the disk,
//! and it is never flagged in use: after a crash every bitmap opens as consistent (in
//! QEMU too) and marks at least what changed. Invariant: an unarmed chunk's durable bits
//! are a superset of its bits in memory; an armed chunk's are all ones.
//!
//! Setting is batched (a chunk at a time, one sync per request that needs any); clearing
//! is lazy: a chunk that saw no request in two consecutive flush intervals is rewritten
//! with its exact bits and disarmed at the flush that ends the second (md clears after
//! a chunk has been idle for a while too: a chunk of a busy region, left untouched for
//! one short interval by chance, is not cleared only to be armed again at its next
//! write); close stores every bitmap exactly.

mod bits;
mod disk;
mod load;

use qcow2_format::bitmaps::{TableEntry, BME_FLAG_AUTO, BME_FLAG_IN_USE};

pub(crate) use bits::Bits;
pub(crate) use load::load;

/// Bits per chunk: one 512-byte sector of bitmap data.
pub(crate) const CHUNK_BITS: u64 = 4096;
/// Bytes of bitmap data per chunk.
pub(crate) const CHUNK_BYTES: u64 = CHUNK_BITS / 8;

/// What the bitmaps extension of an open image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Status {
    /// No bitmaps extension.
    Absent,
    /// Loaded and maintained (autoclear bit 0 vouched for it and it is sound).
    Loaded,
    /// Present but not vouched for (autoclear bit 0 clear): QEMU considers every bitmap
    /// inconsistent; the first write drops the extension.
    Untrusted,
    /// Vouched for but unusable (the reason): not maintained, reported; the first write
    /// drops the extension (its clusters become leaks for a repair to free).
    Damaged(String),
}

/// One persistent bitmap.
#[derive(Debug)]
pub(crate) struct Bitmap {
    /// Name (1 to 1023 bytes).
    pub(crate) name: Vec<u8>,
    /// log2 of the granularity.
    pub(crate) gran_bits: u8,
    /// Records writes (QEMU's `auto` flag).
    pub(crate) enabled: bool,
    /// Flagged in use on disk when the image was opened: its content cannot be trusted,
    /// so it is kept and reported but neither loaded nor tracked.
    pub(crate) in_use: bool,
    /// The exact bits (empty when in use).
    pub(crate) bits: Bits,
    /// Host offset of the table.
    pub(crate) table_off: u64,
    /// Entries in the table (as the directory says).
    pub(crate) table_size: u32,
    /// The table as it is on disk (empty when it could not be read).
    pub(crate) table: Vec<TableEntry>,
    /// Per chunk: its sector on disk is all ones (write intent).
    pub(crate) armed: Bits,
    /// Per chunk: a request touched it since the last flush.
    pub(crate) touched: Bits,
    /// Per armed chunk: no request touched it between the last two flushes (one more
    /// idle interval and it is cleared).
    pub(crate) idle: Bits,
}

impl Bitmap {
    /// The flags the directory holds for this bitmap.
    pub(crate) fn flags(&self) -> u32 {
        (if self.enabled { BME_FLAG_AUTO } else { 0 })
            | (if self.in_use { BME_FLAG_IN_USE } else { 0 })
    }

    /// Whether requests mark it.
    fn tracks(&self) -> bool {
        self.enabled && !self.in_use
    }

    /// Bit range `[a, z)` covering guest bytes `[off, off + len)` (`len > 0`).
    pub(crate) fn bit_range(&self, off: u64, len: u64) -> (u64, u64) {
        let a = off >> self.gran_bits;
        let z = ((off + len - 1) >> self.gran_bits) + 1;
        (a.min(self.bits.len()), z.min(self.bits.len()))
    }

    /// Chunks per table entry (data cluster) of an image with `cs`-byte clusters.
    pub(crate) fn chunks_per_entry(cs: u64) -> u64 {
        cs / CHUNK_BYTES
    }
}

/// The bitmaps of one open image.
#[derive(Debug)]
pub(crate) struct Bitmaps {
    pub(crate) status: Status,
    /// The directory on disk: offset and size.
    pub(crate) dir: Option<(u64, u64)>,
    pub(crate) list: Vec<Bitmap>,
    /// What open found worth telling (QEMU prints these as warnings).
    pub(crate) warnings: Vec<String>,
    /// Some bitmap records writes (the fast test on every request).
    tracking: bool,
}

impl Bitmaps {
    /// No bitmaps.
    pub(crate) fn absent() -> Bitmaps {
        Bitmaps {
            status: Status::Absent,
            dir: None,
            list: Vec::new(),
            warnings: Vec::new(),
            tracking: false,
        }
    }

    /// Whether the bitmaps are loaded and kept up to date (autoclear bit 0 stays set).
    pub(crate) fn maintained(&self) -> bool {
        self.status == Status::Loaded
    }

    /// Whether the first write still has to drop an extension that is not maintained.
    pub(crate) fn needs_first_write(&self) -> bool {
        matches!(self.status, Status::Untrusted | Status::Damaged(_))
    }

    /// Whether any request must mark a bitmap.
    #[inline]
    pub(crate) fn tracking(&self) -> bool {
        self.tracking
    }

    /// Recompute [`tracking`](Self::tracking) after the list or a flag changed.
    pub(crate) fn refresh(&mut self) {
        self.tracking = self.maintained() && self.list.iter().any(Bitmap::tracks);
    }

    /// The index of the bitmap named `name`.
    pub(crate) fn find(&self, name: &[u8]) -> Option<usize> {
        self.list.iter().position(|b| b.name == name)
    }

    /// Mark guest bytes `[off, off + len)` in every bitmap that tracks writes; returns the
    /// chunks `(bitmap, chunk)` to arm before the change may reach the disk (in order).
    pub(crate) fn mark(&mut self, off: u64, len: u64) -> Vec<(usize, u64)> {
        let mut need = Vec::new();
        for (i, b) in self.list.iter_mut().enumerate() {
            if !b.tracks() || len == 0 {
                continue;
            }
            let (a, z) = b.bit_range(off, len);
            if a >= z {
                continue;
            }
            for c in a / CHUNK_BITS..=(z - 1) / CHUNK_BITS {
                if b.armed.get(c) {
                    b.touched.set_range(c, c + 1);
                } else if !b
                    .bits
                    .all_set(a.max(c * CHUNK_BITS), z.min((c + 1) * CHUNK_BITS))
                {
                    need.push((i, c));
                }
            }
            b.bits.set_range(a, z);
        }
        need
    }

    /// The bitmaps are unusable (`why`): not maintained, reported, dropped at the first
    /// write.
    pub(crate) fn mark_damaged(&mut self, why: String) {
        self.list.clear();
        self.warnings.push(format!(
            "the bitmaps are damaged ({why}); they are not maintained, and the first write \
             drops them (run 'qemu-img check -r all' to free their clusters)"
        ));
        self.status = Status::Damaged(why);
        self.refresh();
    }

    /// Forget every bitmap (the extension stopped being trusted, e.g. a repair dropped
    /// it): nothing is maintained from now on.
    pub(crate) fn forget(&mut self, why: &str) {
        if self.status == Status::Absent {
            return;
        }
        self.list.clear();
        self.dir = None;
        self.status = Status::Untrusted;
        self.warnings.push(format!("bitmaps dropped: {why}"));
        self.refresh();
    }
}
