//! Guest requests of the differential tests, run twice: as a qemu-io command (quiet) and
//! through the engine.

use qcow2_engine::Image;

/// One guest request (offsets and lengths in bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write the pattern byte.
    Write(u64, u64, u8),
    /// Write zeroes keeping the allocation.
    Zero(u64, u64),
    /// Write zeroes that may unmap.
    ZeroUnmap(u64, u64),
    /// Discard.
    Discard(u64, u64),
    /// Read (its content is compared elsewhere).
    Read(u64, u64),
    /// A compressed write of the pattern byte (qemu-io only: the engine writes none).
    Compress(u64, u64, u8),
}

impl Op {
    /// The qemu-io command.
    pub fn qemu(&self) -> String {
        match *self {
            Op::Write(o, l, p) => format!("write -q -P {p} {o} {l}"),
            Op::Zero(o, l) => format!("write -q -z {o} {l}"),
            Op::ZeroUnmap(o, l) => format!("write -q -z -u {o} {l}"),
            Op::Discard(o, l) => format!("discard -q {o} {l}"),
            Op::Read(o, l) => format!("read -q {o} {l}"),
            Op::Compress(o, l, p) => format!("write -q -c -P {p} {o} {l}"),
        }
    }

    /// The same request through the engine.
    pub fn engine(&self, img: &Image) -> qcow2_engine::Result<()> {
        match *self {
            Op::Write(o, l, p) => img.write_at(&vec![p; l as usize], o),
            Op::Zero(o, l) => img.write_zeroes(o, l, false),
            Op::ZeroUnmap(o, l) => img.write_zeroes(o, l, true),
            Op::Discard(o, l) => img.discard(o, l),
            Op::Read(o, l) => img.read_at(&mut vec![0; l as usize], o),
            Op::Compress(..) => unreachable!("compressed writes go through qemu-io"),
        }
    }
}
