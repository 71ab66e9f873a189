//! Creation and open options with qemu-img's names and defaults, parsed from the
//! `key=value,key=value` strings a C caller passes.

use crate::error::{invalid_arg, Result};
use qcow2_format::CompressionType;

/// `preallocation=`: what `create` allocates up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing beyond the header, refcount structures and L1.
    #[default]
    Off,
    /// Every L2 table and data cluster is allocated (file sparse).
    Metadata,
    /// As metadata, and the data range is `fallocate`d.
    Falloc,
    /// As metadata, and zeros are written over the data range.
    Full,
}

/// Options for creating an image (qemu-img's `-o` names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (`size`), rounded up to 512 as qemu-img does. `None` takes the
    /// backing file's size.
    pub size: Option<u64>,
    /// `cluster_size`, default 64 KiB.
    pub cluster_size: u64,
    /// `compat`: 2 for "0.10", 3 for "1.1" (default).
    pub version: u32,
    /// `refcount_bits`, default 16.
    pub refcount_bits: u64,
    /// `extended_l2`.
    pub extended_l2: bool,
    /// `compression_type`.
    pub compression_type: CompressionType,
    /// `lazy_refcounts`.
    pub lazy_refcounts: bool,
    /// `backing_file`.
    pub backing_file: Option<String>,
    /// `backing_fmt` (`qcow2` or `raw`); required with a backing file.
    pub backing_fmt: Option<String>,
    /// `preallocation`.
    pub preallocation: Preallocation,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            extended_l2: false,
            compression_type: CompressionType::Deflate,
            lazy_refcounts: false,
            backing_file: None,
            backing_fmt: None,
            preallocation: Preallocation::Off,
        }
    }
}

/// Split `key=value,key=value` into pairs; `,,` escapes a comma as in QEMU.
pub fn split_options(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts.into_iter().filter(|p| !p.is_empty()) {
        match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => out.push((k.trim().to_string(), v.to_string())),
            _ => return Err(invalid_arg!("option '{p}' is not of the form key=value")),
        }
    }
    Ok(out)
}

/// Parse a size with qemu's suffixes (k, M, G, T, P, E; powers of 1024; bytes otherwise).
pub fn parse_size(key: &str, v: &str) -> Result<u64> {
    let v = v.trim();
    let (num, mult) = match v.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(invalid_arg!("{key}: unknown size suffix in '{v}'")),
            };
            (&v[..v.len() - 1], m)
        }
        _ => (v, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| invalid_arg!("{key}: '{v}' is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| invalid_arg!("{key}: '{v}' overflows 64 bits"))
}

/// A byte count in the form [`parse_size`] reads and users write: the largest binary
/// suffix that divides it exactly ("64k", "1M", "100T"), else plain bytes ("1000").
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [
        (60, 'E'),
        (50, 'P'),
        (40, 'T'),
        (30, 'G'),
        (20, 'M'),
        (10, 'k'),
    ] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// The error for a virtual size beyond what the geometry's largest L1 table (32 MiB, QEMU's
/// limit) maps, with sizes as users write them.
pub(crate) fn size_too_large(size: u64, geo: &qcow2_format::Geometry) -> crate::error::Error {
    crate::error::Error::TooLarge(format!(
        "size {} is too large for cluster_size {}: at most {} (QEMU's limit of a 32M L1 \
         table); use a larger cluster size",
        format_size(size),
        format_size(geo.cluster_size()),
        format_size(geo.max_virtual_size())
    ))
}

/// Parse a boolean as QEMU does (on/off, true/false, yes/no).
pub fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(invalid_arg!("{key}: '{v}' is not on/off")),
    }
}

impl CreateOptions {
    /// Parse qemu-img `-o` style options. Unknown keys are an error naming the key.
    pub fn parse(s: &str) -> Result<CreateOptions> {
        let mut o = CreateOptions::default();
        for (k, v) in split_options(s)? {
            match k.as_str() {
                "size" => o.size = Some(parse_size(&k, &v)?),
                "cluster_size" => o.cluster_size = parse_size(&k, &v)?,
                "compat" => {
                    o.version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(invalid_arg!("compat: '{v}' is not 0.10 or 1.1")),
                    }
                }
                "refcount_bits" => {
                    o.refcount_bits = parse_size(&k, &v)?;
                }
                "extended_l2" => o.extended_l2 = parse_bool(&k, &v)?,
                "compression_type" => {
                    o.compression_type = match v.as_str() {
                        "zlib" => CompressionType::Deflate,
                        "zstd" => CompressionType::Zstd,
                        _ => {
                            return Err(invalid_arg!("compression_type: '{v}' is not zlib or zstd"))
                        }
                    }
                }
                "lazy_refcounts" => o.lazy_refcounts = parse_bool(&k, &v)?,
                "backing_file" => o.backing_file = Some(v),
                "backing_fmt" => o.backing_fmt = Some(v),
                "preallocation" => {
                    o.preallocation = match v.as_str() {
                        "off" => Preallocation::Off,
                        "metadata" => Preallocation::Metadata,
                        "falloc" => Preallocation::Falloc,
                        "full" => Preallocation::Full,
                        _ => {
                            return Err(invalid_arg!(
                                "preallocation: '{v}' is not off, metadata, falloc or full"
                            ))
                        }
                    }
                }
                _ => return Err(invalid_arg!("unknown creation option '{k}'")),
            }
        }
        Ok(o)
    }

    /// Check option combinations as qemu-img does.
    pub fn validate(&self) -> Result<()> {
        if self.version == 2 {
            if self.refcount_bits != 16 {
                return Err(invalid_arg!(
                    "refcount_bits: different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
                ));
            }
            if self.extended_l2 {
                return Err(invalid_arg!("extended_l2: extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"));
            }
            if self.lazy_refcounts {
                return Err(invalid_arg!("lazy_refcounts: lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"));
            }
            if self.compression_type != CompressionType::Deflate {
                return Err(invalid_arg!("compression_type: non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"));
            }
        }
        if self.backing_file.is_some() && self.backing_fmt.is_none() {
            return Err(invalid_arg!(
                "backing_fmt: a backing file needs an explicit backing format (qcow2 or raw)"
            ));
        }
        if self.backing_file.is_none() && self.backing_fmt.is_some() {
            return Err(invalid_arg!("backing_fmt given without backing_file"));
        }
        if let Some(f) = &self.backing_fmt {
            if f != "qcow2" && f != "raw" {
                return Err(invalid_arg!("backing_fmt: '{f}' is not qcow2 or raw"));
            }
        }
        if self.backing_file.is_some() && self.preallocation != Preallocation::Off {
            return Err(invalid_arg!(
                "preallocation: backing file and preallocation can only be used at the same time if preallocation=off"
            ));
        }
        Ok(())
    }
}

/// Cache sizing at open (QEMU's `l2-cache-size`, `l2-cache-entry-size`,
/// `refcount-cache-size`; 0 means the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheOptions {
    /// Bytes of L2 cache; default: enough to cover the image, at most 32 MiB.
    pub l2_cache_size: u64,
    /// Size of one L2 cache entry (a slice of an L2 table); default: the cluster size.
    pub l2_cache_entry_size: u64,
    /// Bytes of refcount block cache; default: a quarter of the L2 cache.
    pub refcount_cache_size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_and_escapes() {
        let v = split_options("a=1,b=x,,y,c=2").unwrap();
        let want: Vec<(String, String)> = [("a", "1"), ("b", "x,y"), ("c", "2")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(v, want);
        assert!(split_options("").unwrap().is_empty());
        assert!(split_options("=1").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("s", "64k").unwrap(), 65536);
        assert_eq!(parse_size("s", "1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("s", "512").unwrap(), 512);
        assert!(parse_size("s", "12q").is_err());
        assert!(parse_size("s", "99999999999E").is_err());
    }

    #[test]
    fn sizes_print_as_written() {
        for s in ["64k", "1M", "1536M", "100T", "1000", "0", "15E", "3k"] {
            assert_eq!(format_size(parse_size("s", s).unwrap()), s);
        }
        assert_eq!(format_size(1 << 30), "1G");
    }

    #[test]
    fn create_options() {
        let o = CreateOptions::parse("size=1G,cluster_size=4k,compat=0.10").unwrap();
        assert_eq!(o.size, Some(1 << 30));
        assert_eq!(o.version, 2);
        o.validate().unwrap();
        let o = CreateOptions::parse("compat=0.10,refcount_bits=8").unwrap();
        assert!(o.validate().unwrap_err().to_string().contains("refcount"));
        assert!(CreateOptions::parse("bogus=1")
            .unwrap_err()
            .to_string()
            .contains("bogus"));
        assert!(CreateOptions::parse("novalue").is_err());
        let o = CreateOptions::parse("backing_file=b.qcow2").unwrap();
        assert!(o
            .validate()
            .unwrap_err()
            .to_string()
            .contains("backing_fmt"));
    }
}
