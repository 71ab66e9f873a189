//! Backing files: qcow2 or raw, opened read-only by the name and format in the header,
//! relative to the image's directory, with a depth limit and loop detection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use host_io::{FileStorage, Storage};

use crate::error::{invalid_arg, Error, Result};
use crate::image::{Image, OpenOptions};

/// Longest backing chain followed.
pub const MAX_BACKING_DEPTH: usize = 64;

/// What unallocated clusters read from.
#[derive(Debug)]
pub(crate) enum Backing {
    /// A qcow2 image.
    Qcow2(Box<Image>),
    /// A raw file: `size` bytes, zeros after.
    Raw(Arc<dyn Storage>, u64),
}

impl Backing {
    /// Fill `buf` from guest offset `off`; bytes past the backing file's end read zero.
    pub(crate) fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let size = match self {
            Backing::Qcow2(img) => img.virtual_size(),
            Backing::Raw(_, size) => *size,
        };
        let avail = size.saturating_sub(off).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Qcow2(img) => img.read_at(head, off),
            Backing::Raw(s, _) => s.read_at(head, off).map_err(Error::io_lazy(|| {
                format!("reading raw backing file at {off:#x}")
            })),
        }
    }

    /// Virtual size of the backing file.
    pub(crate) fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(img) => img.virtual_size(),
            Backing::Raw(_, size) => *size,
        }
    }
}

/// Resolve a backing name against the directory of the image that names it.
pub(crate) fn resolve(name: &str, image_dir: Option<&Path>) -> PathBuf {
    let p = Path::new(name);
    match image_dir {
        Some(d) if p.is_relative() => d.join(p),
        _ => p.to_path_buf(),
    }
}

/// Open a backing file. `chain` holds the canonical paths already open above it.
pub(crate) fn open_backing(
    name: &[u8],
    fmt: Option<&[u8]>,
    image_dir: Option<&Path>,
    chain: &[PathBuf],
    opts: &OpenOptions,
) -> Result<Backing> {
    let name =
        std::str::from_utf8(name).map_err(|_| invalid_arg!("backing file name is not UTF-8"))?;
    if chain.len() >= MAX_BACKING_DEPTH {
        return Err(invalid_arg!(
            "backing chain deeper than {MAX_BACKING_DEPTH} at '{name}'"
        ));
    }
    let path = resolve(name, image_dir);
    let canon = std::fs::canonicalize(&path).map_err(Error::io_lazy(|| {
        format!(
            "Could not open backing file: Could not open '{}'",
            path.display()
        )
    }))?;
    if chain.contains(&canon) {
        return Err(invalid_arg!(
            "backing chain loop: '{}' is already in the chain",
            canon.display()
        ));
    }
    // Locked as a read-only open (QEMU's COW child): nobody may write or resize it.
    let storage = FileStorage::open(&canon, &crate::lifecycle::locking::file_options(opts, true))
        .map_err(|e| {
        crate::lifecycle::locking::open_error(e, Some("Could not open backing file"))
    })?;
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let fmt = match fmt {
        Some(f) => std::str::from_utf8(f).unwrap_or("").to_string(),
        None => probe(&*storage)?.to_string(),
    };
    let mut chain = chain.to_vec();
    chain.push(canon.clone());
    match fmt.as_str() {
        "qcow2" => {
            // Read-only below: discard policy does not apply to backing files.
            let o = OpenOptions {
                read_only: true,
                discard: Default::default(),
                // Backing files are read by the executors through the overlay, never queued.
                aio: crate::AioMode::Threads,
                ..opts.clone()
            };
            let img = Image::open_storage_in_chain(storage, &o, canon.parent(), &chain)?;
            Ok(Backing::Qcow2(Box::new(img)))
        }
        "raw" => {
            let size = storage
                .len()
                .map_err(Error::io("reading the raw backing file's size"))?;
            Ok(Backing::Raw(storage, size))
        }
        other => Err(Error::Unsupported(format!("backing file format '{other}'"))),
    }
}

/// Guess qcow2 or raw from the magic (only used when the header names no format).
fn probe(s: &dyn Storage) -> Result<&'static str> {
    let mut m = [0u8; 4];
    s.read_at(&mut m, 0)
        .map_err(Error::io("probing the backing file format"))?;
    Ok(
        if u32::from_be_bytes(m) == qcow2_format::header::QCOW_MAGIC {
            "qcow2"
        } else {
            "raw"
        },
    )
}
