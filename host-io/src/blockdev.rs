//! Block-device queue limits read from sysfs (`/sys/dev/block/MAJ:MIN/queue/*`).

use std::fs;
use std::path::PathBuf;

use crate::sys::dev_major_minor;

/// The queue limits the file backend uses. `None` means the attribute could not be read
/// (no sysfs in a container, unusual device), which is treated as "unknown", not "no".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueLimits {
    /// `discard_granularity`: 0 means the device cannot discard.
    pub(crate) discard_granularity: Option<u64>,
    /// `discard_max_bytes`: 0 means the device cannot discard.
    pub(crate) discard_max_bytes: Option<u64>,
    /// `write_zeroes_max_bytes`: 0 means no zeroing offload (BLKZEROOUT then writes zero
    /// pages in the kernel, and unmapping zeroout is refused).
    pub(crate) write_zeroes_max_bytes: Option<u64>,
}

impl QueueLimits {
    /// Whether the device can discard, as far as sysfs says.
    pub(crate) fn can_discard(&self) -> bool {
        self.discard_granularity != Some(0) && self.discard_max_bytes != Some(0)
    }
}

/// Read one numeric queue attribute of device `rdev`. Partitions have no `queue`
/// directory of their own; their parent disk's is used.
fn queue_attr(rdev: u64, name: &str) -> Option<u64> {
    let (major, minor) = dev_major_minor(rdev);
    let dev = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let candidates = [
        dev.join("queue").join(name),
        dev.join("..").join("queue").join(name),
    ];
    candidates
        .iter()
        .find_map(|p| fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse().ok())
}

/// Queue limits of block device `rdev`.
pub(crate) fn queue_limits(rdev: u64) -> QueueLimits {
    QueueLimits {
        discard_granularity: queue_attr(rdev, "discard_granularity"),
        discard_max_bytes: queue_attr(rdev, "discard_max_bytes"),
        write_zeroes_max_bytes: queue_attr(rdev, "write_zeroes_max_bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_no_discard_and_unknown_means_maybe() {
        let mut q = QueueLimits::default();
        assert!(q.can_discard());
        q.discard_granularity = Some(4096);
        q.discard_max_bytes = Some(1 << 30);
        assert!(q.can_discard());
        q.discard_granularity = Some(0);
        assert!(!q.can_discard());
        q.discard_granularity = Some(512);
        q.discard_max_bytes = Some(0);
        assert!(!q.can_discard());
    }

    #[test]
    fn missing_device_reads_as_unknown() {
        // Major 4000, minor 0: not a registered block major on Linux.
        let rdev = 4000u64 << 8;
        assert_eq!(dev_major_minor(rdev), (4000, 0));
        let q = queue_limits(rdev);
        assert_eq!(q.discard_granularity, None);
    }
}
