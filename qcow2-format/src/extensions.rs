//! Header extensions: the typed ones QEMU defines, and unknown ones kept byte-exact.

use crate::bytes::{be32, be64, pad8, put32, put64};
use crate::error::{FormatError, Result};

/// Extension magic: end of the extension area.
pub const EXT_END: u32 = 0x0000_0000;
/// Extension magic: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Extension magic: feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Extension magic: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Extension magic: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Extension magic: external data file name ("DATA").
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Longest backing format name QEMU accepts (`bs->backing_format` is `char[16]`, NUL
/// included): a longer backing format extension makes QEMU refuse the image.
pub const MAX_BACKING_FORMAT_LEN: usize = 15;

/// Length of one feature name table entry.
pub const FEATURE_NAME_ENTRY_LEN: usize = 48;

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name, at most 46 bytes, NUL padding stripped.
    pub name: Vec<u8>,
}

/// The bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Host offset of the bitmap directory.
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// The extension's 24-byte payload as stored.
    pub fn to_payload(&self) -> [u8; 24] {
        let mut out = [0u8; 24];
        put32(&mut out, 0, self.nb_bitmaps);
        put64(&mut out, 8, self.directory_size);
        put64(&mut out, 16, self.directory_offset);
        out
    }
}

/// A parsed header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderExtension {
    /// Format of the backing file (e.g. `qcow2`, `raw`).
    BackingFormat(Vec<u8>),
    /// Feature name table.
    FeatureNames(Vec<FeatureName>),
    /// Persistent dirty bitmaps.
    Bitmaps(BitmapsExt),
    /// Full disk encryption header (offset, length).
    Crypto {
        /// Host offset of the encryption header.
        offset: u64,
        /// Its length.
        length: u64,
    },
    /// External data file name.
    DataFile(Vec<u8>),
    /// An extension this crate does not know; rewritten byte-exact.
    Unknown {
        /// Its magic.
        magic: u32,
        /// Its payload (without padding).
        data: Vec<u8>,
    },
}

impl HeaderExtension {
    /// The extension's magic number.
    pub fn magic(&self) -> u32 {
        match self {
            HeaderExtension::BackingFormat(_) => EXT_BACKING_FORMAT,
            HeaderExtension::FeatureNames(_) => EXT_FEATURE_NAMES,
            HeaderExtension::Bitmaps(_) => EXT_BITMAPS,
            HeaderExtension::Crypto { .. } => EXT_CRYPTO,
            HeaderExtension::DataFile(_) => EXT_DATA_FILE,
            HeaderExtension::Unknown { magic, .. } => *magic,
        }
    }

    fn payload(&self) -> Vec<u8> {
        match self {
            HeaderExtension::BackingFormat(v) | HeaderExtension::DataFile(v) => v.clone(),
            HeaderExtension::Unknown { data, .. } => data.clone(),
            HeaderExtension::FeatureNames(list) => {
                let mut out = vec![0u8; list.len() * FEATURE_NAME_ENTRY_LEN];
                for (i, f) in list.iter().enumerate() {
                    let e = &mut out[i * FEATURE_NAME_ENTRY_LEN..(i + 1) * FEATURE_NAME_ENTRY_LEN];
                    e[0] = f.kind;
                    e[1] = f.bit;
                    let n = f.name.len().min(46);
                    e[2..2 + n].copy_from_slice(&f.name[..n]);
                }
                out
            }
            HeaderExtension::Bitmaps(b) => b.to_payload().to_vec(),
            HeaderExtension::Crypto { offset, length } => {
                let mut out = vec![0u8; 16];
                put64(&mut out, 0, *offset);
                put64(&mut out, 8, *length);
                out
            }
        }
    }

    fn decode(magic: u32, data: &[u8], at: usize) -> Result<HeaderExtension> {
        let bad = |reason: String| FormatError::BadExtension { magic, at, reason };
        Ok(match magic {
            EXT_BACKING_FORMAT => {
                if data.len() > MAX_BACKING_FORMAT_LEN {
                    return Err(bad(format!(
                        "backing format name length {} exceeds {MAX_BACKING_FORMAT_LEN}",
                        data.len()
                    )));
                }
                HeaderExtension::BackingFormat(data.to_vec())
            }
            EXT_DATA_FILE => HeaderExtension::DataFile(data.to_vec()),
            EXT_FEATURE_NAMES => {
                if data.len() % FEATURE_NAME_ENTRY_LEN != 0 {
                    return Err(bad(format!(
                        "feature name table length {} is not a multiple of 48",
                        data.len()
                    )));
                }
                let list = data
                    .chunks_exact(FEATURE_NAME_ENTRY_LEN)
                    .map(|e| {
                        let name = &e[2..];
                        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                        FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: name[..end].to_vec(),
                        }
                    })
                    .collect();
                HeaderExtension::FeatureNames(list)
            }
            EXT_BITMAPS => {
                if data.len() != 24 {
                    return Err(bad(format!(
                        "bitmaps extension length {} (expected 24)",
                        data.len()
                    )));
                }
                if be32(data, 4) != 0 {
                    return Err(bad("bitmaps extension reserved field is not zero".into()));
                }
                HeaderExtension::Bitmaps(BitmapsExt {
                    nb_bitmaps: be32(data, 0),
                    directory_size: be64(data, 8),
                    directory_offset: be64(data, 16),
                })
            }
            EXT_CRYPTO => {
                if data.len() != 16 {
                    return Err(bad(format!(
                        "crypto extension length {} (expected 16)",
                        data.len()
                    )));
                }
                HeaderExtension::Crypto {
                    offset: be64(data, 0),
                    length: be64(data, 8),
                }
            }
            _ => HeaderExtension::Unknown {
                magic,
                data: data.to_vec(),
            },
        })
    }
}

/// Parse the extension area `buf[start..end]` (end: the backing name offset, or the end of
/// cluster 0). Stops at the end marker; reaching `end` without one is accepted, as QEMU does.
pub fn parse_extensions(buf: &[u8], start: usize, end: usize) -> Result<Vec<HeaderExtension>> {
    let end = end.min(buf.len());
    let mut at = start;
    let mut out: Vec<HeaderExtension> = Vec::new();
    while at + 8 <= end {
        let magic = be32(buf, at);
        let len = be32(buf, at + 4) as usize;
        if magic == EXT_END {
            break;
        }
        let data_at = at + 8;
        if len > end - data_at {
            return Err(FormatError::BadExtension {
                magic,
                at,
                reason: format!("length {len} runs past byte {end}"),
            });
        }
        let ext = HeaderExtension::decode(magic, &buf[data_at..data_at + len], at)?;
        if !matches!(ext, HeaderExtension::Unknown { .. }) && out.iter().any(|e| e.magic() == magic)
        {
            return Err(FormatError::BadExtension {
                magic,
                at,
                reason: "extension appears twice".into(),
            });
        }
        out.push(ext);
        at = data_at + pad8(len);
    }
    Ok(out)
}

/// Where each extension of `exts` starts, and where the end marker goes, when they are laid
/// out from byte `start` (as [`serialize_extensions`] does, and as they were parsed).
pub fn extension_offsets(exts: &[HeaderExtension], start: usize) -> (Vec<usize>, usize) {
    let mut at = start;
    let mut out = Vec::with_capacity(exts.len());
    for e in exts {
        out.push(at);
        at += 8 + pad8(e.payload().len());
    }
    (out, at)
}

/// Serialize extensions, each padded to 8 bytes, followed by the end marker.
pub fn serialize_extensions(exts: &[HeaderExtension]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in exts {
        let data = e.payload();
        let mut hdr = [0u8; 8];
        put32(&mut hdr, 0, e.magic());
        put32(&mut hdr, 4, data.len() as u32);
        out.extend_from_slice(&hdr);
        out.extend_from_slice(&data);
        out.resize(pad8(out.len()), 0);
    }
    out.extend_from_slice(&[0u8; 8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<HeaderExtension> {
        vec![
            HeaderExtension::BackingFormat(b"qcow2".to_vec()),
            HeaderExtension::FeatureNames(vec![
                FeatureName {
                    kind: 0,
                    bit: 0,
                    name: b"dirty bit".to_vec(),
                },
                FeatureName {
                    kind: 1,
                    bit: 0,
                    name: b"lazy refcounts".to_vec(),
                },
            ]),
            HeaderExtension::Bitmaps(BitmapsExt {
                nb_bitmaps: 1,
                directory_size: 40,
                directory_offset: 0x50000,
            }),
            HeaderExtension::Crypto {
                offset: 0x10000,
                length: 0x1000,
            },
            HeaderExtension::DataFile(b"data.raw".to_vec()),
            HeaderExtension::Unknown {
                magic: 0x1234_5678,
                data: vec![1, 2, 3],
            },
        ]
    }

    #[test]
    fn round_trip_every_kind() {
        let exts = all_kinds();
        let bytes = serialize_extensions(&exts);
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(parse_extensions(&bytes, 0, bytes.len()).unwrap(), exts);
        // Unknown payload survives byte-exact, padding included.
        let again = serialize_extensions(&parse_extensions(&bytes, 0, bytes.len()).unwrap());
        assert_eq!(again, bytes);
    }

    #[test]
    fn offsets_follow_the_layout() {
        let exts = all_kinds();
        let bytes = serialize_extensions(&exts);
        let (offs, end) = extension_offsets(&exts, 0);
        assert_eq!(end, bytes.len() - 8);
        for (e, &o) in exts.iter().zip(&offs) {
            assert_eq!(be32(&bytes, o), e.magic());
        }
    }

    #[test]
    fn overlong_extension_is_an_error() {
        let mut b = serialize_extensions(&[HeaderExtension::BackingFormat(b"raw".to_vec())]);
        b[4..8].copy_from_slice(&1000u32.to_be_bytes());
        let e = parse_extensions(&b, 0, b.len()).unwrap_err().to_string();
        assert!(e.contains("runs past"), "{e}");
    }

    #[test]
    fn duplicate_and_malformed_known_extensions() {
        let b = serialize_extensions(&[
            HeaderExtension::BackingFormat(b"raw".to_vec()),
            HeaderExtension::BackingFormat(b"qcow2".to_vec()),
        ]);
        assert!(parse_extensions(&b, 0, b.len())
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let b = serialize_extensions(&[HeaderExtension::Unknown {
            magic: EXT_BITMAPS,
            data: vec![0; 8],
        }]);
        assert!(parse_extensions(&b, 0, b.len()).is_err());
        let b = serialize_extensions(&[HeaderExtension::Unknown {
            magic: EXT_FEATURE_NAMES,
            data: vec![0; 47],
        }]);
        assert!(parse_extensions(&b, 0, b.len()).is_err());
    }

    #[test]
    fn overlong_backing_format_is_refused_like_qemu() {
        let ok = serialize_extensions(&[HeaderExtension::BackingFormat(vec![b'f'; 15])]);
        assert_eq!(parse_extensions(&ok, 0, ok.len()).unwrap().len(), 1);
        let b = serialize_extensions(&[HeaderExtension::BackingFormat(vec![b'f'; 16])]);
        let e = parse_extensions(&b, 0, b.len()).unwrap_err();
        assert!(
            matches!(&e, FormatError::BadExtension { magic: EXT_BACKING_FORMAT, at: 0, reason } if reason.contains("exceeds 15")),
            "{e:?}"
        );
    }

    #[test]
    fn every_truncation_is_handled() {
        let bytes = serialize_extensions(&all_kinds());
        for n in 0..bytes.len() {
            let _ = parse_extensions(&bytes[..n], 0, n);
            let _ = parse_extensions(&bytes, 0, n);
        }
    }
}
