//! # libqcowprov C ABI
//!
//! The only crate exporting `extern "C"` symbols. Filled by the C ABI issue.
