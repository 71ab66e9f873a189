//! The discard policies every policy-wide test and bench runs under: the five provisioning
//! modes and QEMU's two discard option sets.

/// Open-option strings, one per policy.
pub const POLICIES: [&str; 7] = [
    "provision=off",
    "provision=full",
    "provision=metadata",
    "provision=thin",
    "provision=reuse",
    "discard=unmap",
    "discard=unmap,discard-no-unref=on",
];
