//! Discard and write-zeroes policy: QEMU's runtime options and the five provisioning
//! modes (`policy`, parsing and the effective two-layer policy), and the pure per-cluster
//! decision a request's planner asks once (`action`).

pub(crate) mod action;
pub mod policy;
