//! The overlap map: which host ranges hold metadata, kept current as tables are
//! allocated, moved and freed, so that every host write can be checked against it in
//! O(log n) instead of a scan (QEMU's `overlap-check`).

use std::collections::BTreeMap;

/// What a metadata range holds (for overlap checks and messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKind {
    /// Cluster 0: header, extensions, backing file name.
    Header,
    /// The active L1 table.
    ActiveL1,
    /// An L2 table the active L1 points at.
    ActiveL2,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    SnapshotL1,
    /// An L2 table only snapshots' L1 tables name (inactive).
    SnapshotL2,
    /// The persistent bitmap directory.
    BitmapDirectory,
    /// A persistent bitmap's table.
    BitmapTable,
    /// A cluster of persistent bitmap data.
    BitmapData,
}

/// Host ranges holding metadata: start -> (end, kind). Ranges never overlap.
#[derive(Debug, Default)]
pub(crate) struct Regions {
    map: BTreeMap<u64, (u64, MetaKind)>,
}

impl Regions {
    /// Record `[start, start+len)` as metadata of `kind` (empty ranges are ignored).
    pub(crate) fn add(&mut self, start: u64, len: u64, kind: MetaKind) {
        if len > 0 {
            self.map.insert(start, (start.saturating_add(len), kind));
        }
    }

    /// Forget the range starting at `start`.
    pub(crate) fn remove(&mut self, start: u64) {
        self.map.remove(&start);
    }

    /// Forget the range starting at `start` if it is of `kind`.
    pub(crate) fn remove_if(&mut self, start: u64, kind: MetaKind) {
        if matches!(self.map.get(&start), Some(&(_, k)) if k == kind) {
            self.map.remove(&start);
        }
    }

    /// The metadata range overlapping `[start, start+len)`, if any: (start, end, kind).
    pub(crate) fn overlapping(&self, start: u64, len: u64) -> Option<(u64, u64, MetaKind)> {
        let end = start.checked_add(len)?;
        let (&s, &(e, k)) = self.map.range(..end).next_back()?;
        (e > start).then_some((s, e, k))
    }

    /// Whether a range of `kind` starts exactly at `start`.
    pub(crate) fn starts_at(&self, start: u64, kind: MetaKind) -> bool {
        matches!(self.map.get(&start), Some(&(_, k)) if k == kind)
    }

    /// Why writing `[start, start+len)` would damage metadata, if it would. A write of
    /// `allowed` metadata may land inside a range of that kind.
    pub(crate) fn conflict(
        &self,
        start: u64,
        len: u64,
        allowed: Option<MetaKind>,
    ) -> Option<String> {
        let (s, e, k) = self.overlapping(start, len)?;
        if Some(k) == allowed && s <= start && start + len <= e {
            return None;
        }
        Some(format!("it overlaps {k:?} at {s:#x}..{e:#x}"))
    }

    /// Every range whose kind satisfies `pred`: (start, len, kind).
    pub(crate) fn ranges_where(
        &self,
        pred: impl Fn(MetaKind) -> bool,
    ) -> Vec<(u64, u64, MetaKind)> {
        self.map
            .iter()
            .filter(|(_, (_, k))| pred(*k))
            .map(|(&s, &(e, k))| (s, e - s, k))
            .collect()
    }

    /// Starts of every range whose kind satisfies `pred`.
    pub(crate) fn starts_where(&self, pred: impl Fn(MetaKind) -> bool) -> Vec<u64> {
        self.map
            .iter()
            .filter(|(_, (_, k))| pred(*k))
            .map(|(s, _)| *s)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_and_allowed_kind() {
        let mut r = Regions::default();
        r.add(0, 512, MetaKind::Header);
        r.add(4096, 4096, MetaKind::ActiveL2);
        assert_eq!(r.overlapping(512, 100), None);
        assert_eq!(
            r.overlapping(4000, 100).map(|x| x.2),
            Some(MetaKind::ActiveL2)
        );
        assert!(r.conflict(4096, 512, Some(MetaKind::ActiveL2)).is_none());
        assert!(r.conflict(4096, 512, None).is_some());
        // Allowed kind, but running past the range's end.
        assert!(r.conflict(8000, 512, Some(MetaKind::ActiveL2)).is_some());
        r.remove_if(4096, MetaKind::Header);
        assert!(r.starts_at(4096, MetaKind::ActiveL2));
        r.remove(4096);
        assert_eq!(r.overlapping(4096, 1), None);
    }
}
