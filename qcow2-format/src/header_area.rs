//! Cluster 0 as a whole: header, extensions and backing file name, parsed together and
//! laid out again on rewrite.

use crate::error::{FormatError, Result};
use crate::extensions::{parse_extensions, serialize_extensions, HeaderExtension};
use crate::geometry::MAX_BACKING_NAME;
use crate::header::Header;

/// Everything stored in cluster 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderArea {
    /// The fixed header.
    pub header: Header,
    /// Header extensions in on-disk order (unknown ones kept).
    pub extensions: Vec<HeaderExtension>,
    /// Backing file name (raw bytes; not NUL-terminated on disk).
    pub backing_file: Option<Vec<u8>>,
}

impl HeaderArea {
    /// Parse and validate from the first bytes of the image (at least the header; the
    /// extension area and backing name are read as far as `buf` and the cluster allow).
    pub fn parse(buf: &[u8]) -> Result<HeaderArea> {
        Self::parse_with(Header::parse(buf)?, buf)
    }

    /// As [`HeaderArea::parse`], validating the header with
    /// [`Header::validate_for_check`] (an image without a refcount table passes).
    pub fn parse_for_check(buf: &[u8]) -> Result<HeaderArea> {
        let header = Header::decode(buf)?;
        header.validate_for_check()?;
        Self::parse_with(header, buf)
    }

    fn parse_with(header: Header, buf: &[u8]) -> Result<HeaderArea> {
        let cs = 1usize << header.cluster_bits;
        let area = &buf[..buf.len().min(cs)];
        let ext_end = if header.backing_file_offset != 0 {
            header.backing_file_offset as usize
        } else {
            cs
        };
        let extensions = parse_extensions(area, header.extensions_start(), ext_end)?;
        let backing_file = if header.backing_file_offset != 0 {
            let start = header.backing_file_offset as usize;
            let end = start + header.backing_file_size as usize;
            if end > area.len() {
                return Err(FormatError::Truncated {
                    what: "backing file name",
                    need: end,
                    have: area.len(),
                });
            }
            if start < header.extensions_start() {
                return Err(crate::error::invalid(
                    "backing_file_offset",
                    start as u64,
                    "past the header",
                ));
            }
            Some(area[start..end].to_vec())
        } else {
            None
        };
        Ok(HeaderArea {
            header,
            extensions,
            backing_file,
        })
    }

    /// The backing format extension, if present.
    pub fn backing_format(&self) -> Option<&[u8]> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::BackingFormat(v) => Some(v.as_slice()),
            _ => None,
        })
    }

    /// The external data file name extension, if present.
    pub fn data_file(&self) -> Option<&[u8]> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::DataFile(v) => Some(v.as_slice()),
            _ => None,
        })
    }

    /// Lay out header, extensions and backing name; fixes up the backing name offset and
    /// size in the header. Fails if it does not fit in one cluster.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut header = self.header.clone();
        let exts = serialize_extensions(&self.extensions);
        let mut len = header.to_bytes().len() + exts.len();
        if let Some(name) = &self.backing_file {
            if name.len() as u64 > MAX_BACKING_NAME {
                return Err(FormatError::Unencodable {
                    what: "backing file name",
                    reason: format!("{} bytes, at most {MAX_BACKING_NAME}", name.len()),
                });
            }
            header.backing_file_offset = len as u64;
            header.backing_file_size = name.len() as u32;
            len += name.len();
        } else {
            header.backing_file_offset = 0;
            header.backing_file_size = 0;
        }
        let cs = 1usize << header.cluster_bits.min(31);
        if len > cs {
            return Err(FormatError::Unencodable {
                what: "header area",
                reason: format!("{len} bytes do not fit in a {cs}-byte cluster"),
            });
        }
        let mut out = header.to_bytes();
        out.extend_from_slice(&exts);
        if let Some(name) = &self.backing_file {
            out.extend_from_slice(name);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extensions::FeatureName;

    fn header() -> Header {
        Header::decode(&{
            let mut h = vec![0u8; 112];
            h[..4].copy_from_slice(&crate::header::QCOW_MAGIC.to_be_bytes());
            h[4..8].copy_from_slice(&3u32.to_be_bytes());
            h[20..24].copy_from_slice(&9u32.to_be_bytes());
            h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
            h[36..40].copy_from_slice(&32u32.to_be_bytes());
            h[40..48].copy_from_slice(&0x600u64.to_be_bytes());
            h[48..56].copy_from_slice(&0x200u64.to_be_bytes());
            h[56..60].copy_from_slice(&1u32.to_be_bytes());
            h[96..100].copy_from_slice(&4u32.to_be_bytes());
            h[100..104].copy_from_slice(&112u32.to_be_bytes());
            h
        })
        .unwrap()
    }

    #[test]
    fn round_trip_with_backing() {
        let area = HeaderArea {
            header: header(),
            extensions: vec![
                HeaderExtension::BackingFormat(b"qcow2".to_vec()),
                HeaderExtension::FeatureNames(vec![FeatureName {
                    kind: 0,
                    bit: 0,
                    name: b"dirty bit".to_vec(),
                }]),
            ],
            backing_file: Some(b"base.qcow2".to_vec()),
        };
        let bytes = area.to_bytes().unwrap();
        let back = HeaderArea::parse(&bytes).unwrap();
        assert_eq!(back.backing_file.as_deref(), Some(&b"base.qcow2"[..]));
        assert_eq!(back.backing_format(), Some(&b"qcow2"[..]));
        assert_eq!(back.extensions, area.extensions);
        assert_eq!(back.to_bytes().unwrap(), bytes);
    }

    #[test]
    fn does_not_fit_in_small_cluster() {
        let area = HeaderArea {
            header: header(),
            extensions: vec![HeaderExtension::Unknown {
                magic: 7,
                data: vec![0; 400],
            }],
            backing_file: Some(vec![b'x'; 100]),
        };
        assert!(area
            .to_bytes()
            .unwrap_err()
            .to_string()
            .contains("do not fit"));
    }

    #[test]
    fn empty_backing_name_at_the_end_of_the_cluster_round_trips() {
        // Header (112) + one extension (8 + 384) + end marker (8) fill a 512-byte cluster:
        // an empty backing name then sits at offset 512 == cluster size, which QEMU accepts
        // (it only refuses `backing_file_offset > cluster_size`).
        let area = HeaderArea {
            header: header(),
            extensions: vec![HeaderExtension::Unknown {
                magic: 7,
                data: vec![0xab; 384],
            }],
            backing_file: Some(Vec::new()),
        };
        let bytes = area.to_bytes().unwrap();
        assert_eq!(bytes.len(), 512);
        let back = HeaderArea::parse(&bytes).unwrap();
        assert_eq!(back.header.backing_file_offset, 512);
        assert_eq!(back.backing_file.as_deref(), Some(&b""[..]));
        assert_eq!(back.to_bytes().unwrap(), bytes);
    }

    #[test]
    fn backing_name_past_buffer() {
        let mut h = header();
        h.backing_file_offset = 400;
        h.backing_file_size = 100;
        let b = h.to_bytes();
        assert!(HeaderArea::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("backing file name"));
    }
}
