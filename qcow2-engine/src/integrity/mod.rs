//! Integrity: the one walker of the L1/L2 tree (`walk`), the consistency check with
//! qemu-img's rules, counters and order (`check`: counting in `count`, stored refcounts in
//! `stored`, the COPIED flags in `copied`, persistent bitmap clusters in `bitmaps`), the
//! refcount rebuild (`repair`), and the overlap test repair writes pass (`overlap`).

pub(crate) mod bitmaps;
pub mod check;
pub(crate) mod copied;
pub(crate) mod count;
pub(crate) mod overlap;
pub(crate) mod repair;
pub(crate) mod stored;
pub(crate) mod walk;
