//! Refcount table entries and refcount blocks for every width from 1 to 64 bits
//! (sub-byte widths are packed LSB-first, wider ones big-endian).

use crate::error::{FormatError, Result};
use crate::geometry::Geometry;

/// Bits 9..=63 of a refcount table entry: the refcount block's host offset.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount table entry.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

/// Validate a refcount table entry and return the block offset (0: no block).
pub fn reftable_entry(raw: u64, geo: &Geometry) -> Result<u64> {
    if raw & REFT_RESERVED_MASK != 0 {
        return Err(FormatError::ReservedBits {
            what: "refcount table entry",
            value: raw,
            mask: raw & REFT_RESERVED_MASK,
        });
    }
    let off = raw & REFT_OFFSET_MASK;
    if !geo.is_cluster_aligned(off) {
        return Err(FormatError::Unaligned {
            what: "refcount block",
            offset: off,
            align: geo.cluster_size(),
        });
    }
    Ok(off)
}

/// Read refcount `index` from a refcount block of refcount order `order`.
/// `block` must be at least one cluster long (or cover `index`).
pub fn get(block: &[u8], index: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = index * bits;
            let byte = block[bit / 8];
            u64::from((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[index]),
        4 => u64::from(u16::from_be_bytes([block[index * 2], block[index * 2 + 1]])),
        5 => {
            let at = index * 4;
            u64::from(u32::from_be_bytes(
                block[at..at + 4].try_into().expect("4 bytes"),
            ))
        }
        _ => {
            let at = index * 8;
            u64::from_be_bytes(block[at..at + 8].try_into().expect("8 bytes"))
        }
    }
}

/// Write refcount `index`; fails (leaving the block untouched) if `value` does not fit.
pub fn set(block: &mut [u8], index: usize, order: u32, value: u64) -> Result<()> {
    let bits = 1u32 << order;
    if bits < 64 && value >> bits != 0 {
        return Err(FormatError::RefcountOverflow { value, bits });
    }
    match order {
        0..=2 => {
            let bits = bits as usize;
            let bit = index * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut block[bit / 8];
            *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        3 => block[index] = value as u8,
        4 => block[index * 2..index * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[index * 4..index * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
    Ok(())
}

/// Apply `delta` to a refcount, failing on overflow past `max` or underflow below 0.
pub fn checked_add(current: u64, delta: i64, max: u64, bits: u32) -> Result<u64> {
    let next = if delta >= 0 {
        current.checked_add(delta as u64)
    } else {
        current.checked_sub(delta.unsigned_abs())
    };
    match next {
        Some(v) if v <= max => Ok(v),
        Some(v) => Err(FormatError::RefcountOverflow { value: v, bits }),
        None if delta < 0 => Err(FormatError::InvalidField {
            field: "refcount",
            value: current,
            expected: format!(
                "at least {} to decrement (refcount underflow)",
                delta.unsigned_abs()
            ),
        }),
        None => Err(FormatError::RefcountOverflow {
            value: u64::MAX,
            bits,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_independently() {
        for order in 0..=6u32 {
            let g = Geometry::new(9, false, order).unwrap();
            let n = g.refcount_block_entries() as usize;
            let max = g.refcount_max();
            let mut block = vec![0u8; 512];
            for i in 0..n {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                set(&mut block, i, order, v).unwrap();
            }
            for i in 0..n {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                assert_eq!(get(&block, i, order), v, "order {order} index {i}");
            }
            if order < 6 {
                let before = block.clone();
                assert!(set(&mut block, 3, order, max + 1).is_err());
                assert_eq!(block, before, "failed set must not write");
            }
        }
    }

    #[test]
    fn sub_byte_is_lsb_first() {
        let mut b = vec![0u8; 1];
        set(&mut b, 0, 0, 1).unwrap();
        assert_eq!(b[0], 0b0000_0001);
        set(&mut b, 7, 0, 1).unwrap();
        assert_eq!(b[0], 0b1000_0001);
        let mut b = vec![0u8; 1];
        set(&mut b, 1, 1, 3).unwrap();
        assert_eq!(b[0], 0b0000_1100);
        let mut b = vec![0u8; 1];
        set(&mut b, 1, 2, 0xa).unwrap();
        assert_eq!(b[0], 0xa0);
    }

    #[test]
    fn sixteen_bit_is_big_endian() {
        let mut b = vec![0u8; 4];
        set(&mut b, 1, 4, 0x1234).unwrap();
        assert_eq!(b, [0, 0, 0x12, 0x34]);
    }

    #[test]
    fn checked_add_bounds() {
        assert_eq!(
            checked_add(1, 1, 1, 1).unwrap_err(),
            FormatError::RefcountOverflow { value: 2, bits: 1 }
        );
        assert!(checked_add(0, -1, 65535, 16)
            .unwrap_err()
            .to_string()
            .contains("underflow"));
        assert_eq!(
            checked_add(u64::MAX - 1, 1, u64::MAX, 64).unwrap(),
            u64::MAX
        );
        assert!(checked_add(u64::MAX, 1, u64::MAX, 64).is_err());
        assert_eq!(checked_add(5, -2, 65535, 16).unwrap(), 3);
    }

    #[test]
    fn reftable_entries() {
        let g = Geometry::new(16, false, 4).unwrap();
        assert_eq!(reftable_entry(0x20000, &g).unwrap(), 0x20000);
        assert!(reftable_entry(0x20001, &g).is_err());
        assert!(reftable_entry(0x20200, &g)
            .unwrap_err()
            .to_string()
            .contains("aligned"));
    }
}
