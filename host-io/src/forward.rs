//! `Storage` for `Arc<S>` and `Box<S>`, so a test can keep a handle on a backend (e.g. a
//! `CrashStorage` to take crash images) while the engine owns another.

use std::io;
use std::sync::Arc;

use crate::storage::{Capabilities, DiscardOutcome, Storage, ZeroMethod, ZeroMode};

macro_rules! forward_storage {
    ($ty:ty) => {
        impl<S: Storage + ?Sized> Storage for $ty {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_at(buf, offset)
            }
            fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> io::Result<()> {
                (**self).read_vectored_at(bufs, offset)
            }
            fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
                (**self).write_vectored_at(bufs, offset)
            }
            fn flush(&self) -> io::Result<()> {
                (**self).flush()
            }
            fn flush_count(&self) -> u64 {
                (**self).flush_count()
            }
            fn discard_count(&self) -> u64 {
                (**self).discard_count()
            }
            fn zero_count(&self) -> u64 {
                (**self).zero_count()
            }
            fn len(&self) -> io::Result<u64> {
                (**self).len()
            }
            fn is_empty(&self) -> io::Result<bool> {
                (**self).is_empty()
            }
            fn set_len(&self, len: u64) -> io::Result<()> {
                (**self).set_len(len)
            }
            fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).allocate(offset, len)
            }
            fn discard(&self, offset: u64, len: u64) -> io::Result<DiscardOutcome> {
                (**self).discard(offset, len)
            }
            fn write_zeroes(
                &self,
                offset: u64,
                len: u64,
                mode: ZeroMode,
            ) -> io::Result<ZeroMethod> {
                (**self).write_zeroes(offset, len, mode)
            }
            fn capabilities(&self) -> Capabilities {
                (**self).capabilities()
            }
            fn data_run(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
                (**self).data_run(offset, len)
            }
            fn as_file(&self) -> Option<&crate::FileStorage> {
                (**self).as_file()
            }
            fn allocated_size(&self) -> io::Result<Option<u64>> {
                (**self).allocated_size()
            }
        }
    };
}

forward_storage!(Arc<S>);
forward_storage!(Box<S>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CrashStorage, MemStorage};

    #[test]
    fn shared_handles_see_the_same_backend() {
        let crash = Arc::new(CrashStorage::new(vec![0; 4096]));
        let engine_side: Box<dyn Storage> = Box::new(crash.clone());
        engine_side.write_at(b"hi", 0).unwrap();
        engine_side.flush().unwrap();
        assert_eq!(crash.op_count(), 2);
        let boxed: Box<MemStorage> = Box::new(MemStorage::new());
        boxed.write_at(b"x", 10).unwrap();
        assert_eq!(Storage::len(&boxed).unwrap(), 11);
    }

    #[test]
    fn request_counters_pass_through_wrappers() {
        let mem = Arc::new(MemStorage::new());
        let faulty: Box<dyn Storage> = Box::new(crate::FaultyStorage::new(mem.clone()));
        faulty.write_at(&[1; 8192], 0).unwrap();
        faulty.discard(0, 4096).unwrap();
        faulty
            .write_zeroes(4096, 4096, ZeroMode::KeepAllocated)
            .unwrap();
        faulty.write_zeroes(0, 4096, ZeroMode::Unmap).unwrap();
        faulty.flush().unwrap();
        let counts = |s: &dyn Storage| (s.flush_count(), s.discard_count(), s.zero_count());
        assert_eq!(counts(&*faulty), (1, 1, 2));
        assert_eq!(counts(&*mem), (1, 1, 2));
    }
}
