//! An image's lifetime outside guest I/O: `open` (validation, components, backing chain;
//! `locking`: QEMU's image locks an open takes),
//! `create` (qemu-img's layout and preallocation), `resize`, and `backing` files.

pub(crate) mod backing;
pub(crate) mod create;
pub(crate) mod locking;
pub(crate) mod open;
pub(crate) mod resize;
