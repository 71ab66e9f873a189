//! A whole image from the input bytes, opened read/write on in-memory storage (no backing
//! file: the fuzzer stays hermetic), then the fixed script of `common.rs`: reads, writes,
//! discard, write-zeroes, flush, map, check and repair, reads again, close.
#![no_main]

use std::sync::Arc;

use host_io::MemStorage;
use libfuzzer_sys::fuzz_target;
use qcow2_engine::{Image, OpenOptions};

mod common;

fuzz_target!(|data: &[u8]| {
    let storage = MemStorage::from_vec(data.to_vec());
    let opts = OpenOptions {
        no_backing: true,
        ..OpenOptions::default()
    };
    let Ok(img) = Image::open_storage(Arc::new(storage), &opts, None) else {
        return;
    };
    common::exercise(&img, common::Script::default());
    let _ = img.close();
});
