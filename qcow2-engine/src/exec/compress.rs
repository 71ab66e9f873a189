//! Decompression of compressed clusters: raw deflate (QEMU's "zlib") and zstd. The
//! compressed bytes may be followed by unrelated data up to the end of their last sector;
//! exactly one cluster of output is required, as QEMU requires.

use std::io::Read;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;
use qcow2_format::CompressionType;

use crate::error::{corrupt, Result};

/// Decompress `input` into `out` (one cluster), failing unless `out` is filled.
pub(crate) fn decompress_cluster(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<()> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut st = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, produced) = decompress(&mut st, input, out, 0, flags);
    match status {
        // Output full is success even if the stream claims more, as with zlib's Z_BUF_ERROR.
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if produced == out.len() => Ok(()),
        s => Err(corrupt!(
            "deflate-compressed cluster did not decompress to {} bytes ({s:?}, got {produced})",
            out.len()
        )),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut src = input;
    let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
        .map_err(|e| corrupt!("zstd-compressed cluster has a bad frame header: {e}"))?;
    dec.read_exact(out).map_err(|e| {
        corrupt!(
            "zstd-compressed cluster did not decompress to {} bytes: {e}",
            out.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deflate_round_trip_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut c = miniz_oxide::deflate::compress_to_vec(&data, 6);
        c.extend_from_slice(&[0xaa; 300]);
        let mut out = vec![0u8; 65536];
        decompress_cluster(CompressionType::Deflate, &c, &mut out).unwrap();
        assert_eq!(out, data);
        let mut short = vec![0u8; 65537];
        assert!(decompress_cluster(CompressionType::Deflate, &c, &mut short).is_err());
        assert!(decompress_cluster(CompressionType::Deflate, &[1, 2, 3], &mut out).is_err());
    }

    #[test]
    fn zstd_garbage_is_an_error() {
        let mut out = vec![0u8; 4096];
        assert!(decompress_cluster(CompressionType::Zstd, &[0u8; 100], &mut out).is_err());
    }
}
