//! `HeaderArea::parse` on arbitrary bytes; whatever parses must serialize, parse back to
//! the same content, and serialize again to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::{FormatError, Header, HeaderArea};

fuzz_target!(|data: &[u8]| {
    // The unvalidated decoder must not panic either.
    if let Ok(h) = Header::decode(data) {
        let _ = h.validate();
        let _ = h.geometry();
    }
    let Ok(area) = HeaderArea::parse(data) else {
        return;
    };
    let bytes = match area.to_bytes() {
        Ok(b) => b,
        // An extension area that filled cluster 0 without an end marker cannot take one.
        Err(FormatError::Unencodable { .. }) => return,
        Err(e) => panic!("to_bytes failed with {e:?} for {area:?}"),
    };
    let again = HeaderArea::parse(&bytes).unwrap_or_else(|e| {
        panic!("re-parse of to_bytes failed: {e:?}\narea {area:?}\nbytes {bytes:02x?}")
    });
    assert_eq!(again.extensions, area.extensions);
    assert_eq!(again.backing_file, area.backing_file);
    // to_bytes lays the backing name out itself; everything else is kept.
    let mut want = area.header.clone();
    want.backing_file_offset = again.header.backing_file_offset;
    want.backing_file_size = again.header.backing_file_size;
    assert_eq!(again.header, want);
    assert_eq!(
        again.to_bytes().expect("second to_bytes"),
        bytes,
        "to_bytes is not idempotent"
    );
});
