//! Guest requests: each planned under the metadata lock and carried out by an executor.
//! `read` (with the lock-free entry cache), `write` (in place or allocating), `zero`
//! (discard and write-zeroes), `status` (block status and maps); `claims` keeps running
//! plans apart; `pieces` walks the (sub)clusters of a range.

pub(crate) mod claims;
pub(crate) mod pieces;
pub(crate) mod read;
pub(crate) mod status;
pub(crate) mod write;
pub(crate) mod zero;
