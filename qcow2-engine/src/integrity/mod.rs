//! Integrity: the one walker of the L1/L2 tree (`walk`), the consistency check with
//! qemu-img's rules and counters (`check`, `bitmaps` for persistent bitmap clusters), and
//! repair (`repair`).

pub(crate) mod bitmaps;
pub mod check;
pub(crate) mod repair;
pub(crate) mod walk;
