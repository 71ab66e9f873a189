//! `parse_snapshot_table` with an arbitrary entry count (first four input bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::snapshot::{parse_snapshot_table, serialize_snapshot_table};

fuzz_target!(|data: &[u8]| {
    let [a, b, c, d, table @ ..] = data else {
        return;
    };
    let count = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
    let Ok(entries) = parse_snapshot_table(table, count) else {
        return;
    };
    assert_eq!(entries.len(), count);
    let bytes = match serialize_snapshot_table(&entries) {
        Ok(b) => b,
        Err(e) => panic!("parsed entries do not serialize: {e:?}"),
    };
    let again = parse_snapshot_table(&bytes, count).expect("re-parse of serialized table");
    assert_eq!(again, entries);
    assert_eq!(serialize_snapshot_table(&again).unwrap(), bytes);
});
