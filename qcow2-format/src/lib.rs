//! # qcow2-format
//!
//! The qcow2 on-disk format as plain data: parse, validate and serialize every structure
//! an image holds, big-endian and byte-exact. No I/O and no `unsafe`: the engine reads
//! bytes through `host-io` and hands them here.
//!
//! - [`header`]: the fixed header (v2 and v3) and [`features`] bits;
//! - [`extensions`] and [`header_area`]: cluster 0 as a whole, unknown extensions kept;
//! - [`l1`], [`l2`], [`compressed`]: table entries and the cluster/subcluster kinds;
//! - [`refcount`]: refcount table entries and blocks of 1 to 64 bits;
//! - [`snapshot`]: internal snapshot table entries;
//! - [`bitmaps`]: the persistent bitmap directory and bitmap table entries;
//! - [`geometry`]: index math and the limits QEMU enforces.
//!
//! A hostile input never panics and never makes this crate allocate in proportion to a
//! size field it has not checked against the buffer it was given.
#![forbid(unsafe_code)]

pub mod bitmaps;
mod bytes;
pub mod compressed;
pub mod error;
pub mod extensions;
pub mod features;
pub mod geometry;
pub mod header;
pub mod header_area;
pub mod l1;
pub mod l2;
pub mod refcount;
pub mod snapshot;

pub use compressed::CompressedDescriptor;
pub use error::{FormatError, Result};
pub use extensions::HeaderExtension;
pub use geometry::Geometry;
pub use header::{CompressionType, Header};
pub use header_area::HeaderArea;
pub use l1::L1Entry;
pub use l2::{ClusterKind, L2Entry, SubclusterKind};
pub use snapshot::SnapshotEntry;

static_assertions::const_assert_eq!(header::V2_HEADER_LEN, 72);
static_assertions::const_assert_eq!(header::V3_HEADER_MIN_LEN, 104);
static_assertions::const_assert_eq!(extensions::FEATURE_NAME_ENTRY_LEN, 48);
static_assertions::const_assert_eq!(snapshot::SNAPSHOT_FIXED_LEN, 40);
static_assertions::const_assert_eq!(l2::L2E_OFFSET_MASK & l2::L2E_RESERVED_MASK, 0);
static_assertions::const_assert_eq!(l1::L1E_OFFSET_MASK & l1::L1E_RESERVED_MASK, 0);
