//! The (sub)cluster pieces of a guest range inside one cluster: what reads, copy-on-write
//! and block status walk.

use qcow2_format::{ClusterKind, Geometry, L2Entry, SubclusterKind};

/// The pieces of `[pos, cl_end)`, inside the cluster at `cl` mapped by `entry`, that share
/// one (sub)cluster kind: `(start, end, kind)`. One piece without extended L2 entries, one
/// per subcluster touched with them.
pub(crate) fn pieces(
    geo: Geometry,
    entry: L2Entry,
    kind: ClusterKind,
    cl: u64,
    mut pos: u64,
    cl_end: u64,
) -> impl Iterator<Item = (u64, u64, SubclusterKind)> {
    let sc = geo.subcluster_size();
    std::iter::from_fn(move || {
        if pos >= cl_end {
            return None;
        }
        let end = if geo.extended_l2() {
            (cl + ((pos - cl) / sc + 1) * sc).min(cl_end)
        } else {
            cl_end
        };
        let piece = (
            pos,
            end,
            entry.subcluster_kind(kind, &geo, geo.subcluster_index(pos)),
        );
        pos = end;
        Some(piece)
    })
}
