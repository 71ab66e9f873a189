//! Feature bits of the v3 header: incompatible, compatible and autoclear.

/// Incompatible feature bits: an implementation must refuse an image with unknown ones set.
pub mod incompatible {
    /// Refcounts may be stale (lazy refcounts, unclean shutdown); repair before trusting.
    pub const DIRTY: u64 = 1 << 0;
    /// The image is corrupt; no writes until repaired.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    /// The compression type field (byte 104) is not deflate.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// Extended L2 entries (subcluster allocation).
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every incompatible bit this crate knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits: unknown ones may be ignored.
pub mod compatible {
    /// Lazy refcounts: refcount updates may be deferred while the dirty bit is set.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
    /// Every compatible bit this crate knows.
    pub const KNOWN: u64 = LAZY_REFCOUNTS;
}

/// Autoclear feature bits: a writer that does not maintain one must clear it.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image.
    pub const RAW_EXTERNAL: u64 = 1 << 1;
    /// Every autoclear bit this crate knows.
    pub const KNOWN: u64 = BITMAPS | RAW_EXTERNAL;
}

/// Human names of the incompatible bits that are set, unknown ones as `bit N`.
pub fn describe_incompatible(bits: u64) -> Vec<String> {
    const NAMES: [&str; 5] = [
        "dirty",
        "corrupt",
        "external data file",
        "compression type",
        "extended L2",
    ];
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| match NAMES.get(b as usize) {
            Some(n) => (*n).to_string(),
            None => format!("bit {b}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_known_and_unknown_bits() {
        let v = describe_incompatible(incompatible::DIRTY | incompatible::EXTENDED_L2 | (1 << 9));
        assert_eq!(v, vec!["dirty", "extended L2", "bit 9"]);
    }
}
