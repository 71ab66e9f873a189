//! The synchronous executor: carries out a plan's host I/O on the calling thread, without
//! the metadata lock, and reads the sources of guest data (host clusters, zeros, the
//! backing file, compressed clusters) for reads and copy-on-write alike.

use crate::error::{Error, Result};
use crate::exec::compress::decompress_cluster;
use crate::exec::host_write::{write_steps, Step};
use crate::image::Image;
use crate::plan::{Fill, HostIo, Piece, Plan};
use crate::provision::action::HostEffect;
use crate::request::read::Src;
use qcow2_format::CompressedDescriptor;

impl Image {
    /// Run a plan's host I/O. Returns how many advisory host effects failed.
    pub(crate) fn execute(&self, plan: &Plan, data: &[u8]) -> Result<u64> {
        let mut failures = 0;
        for io in &plan.io {
            match io {
                HostIo::Write { host, pieces } => self.host_write(*host, pieces, data)?,
                HostIo::Effect { off, len, effect } => {
                    let r = match effect {
                        HostEffect::Discard => self.storage.discard(*off, *len).map(|_| ()),
                        HostEffect::Anchor => self
                            .storage
                            .write_zeroes(*off, *len, host_io::ZeroMode::KeepAllocated)
                            .map(|_| ()),
                    };
                    failures += u64::from(r.is_err());
                }
            }
        }
        Ok(failures)
    }

    fn host_write(&self, host: u64, pieces: &[Piece], data: &[u8]) -> Result<()> {
        let io = |h: u64| Error::io_lazy(move || format!("writing data at host offset {h:#x}"));
        // The common overwrite, straight from the caller's buffer with nothing to plan.
        if let [Piece {
            len,
            fill: Fill::Guest { at },
        }] = pieces
        {
            return self
                .storage
                .write_at(&data[*at..*at + *len as usize], host)
                .map_err(io(host));
        }
        let cheap_zero = self.storage.capabilities().zero_keep_allocated;
        let steps = write_steps(host, pieces, cheap_zero);
        if let Some((off, len)) = steps.first {
            self.storage
                .write_zeroes(off, len, host_io::ZeroMode::KeepAllocated)
                .map_err(io(off))?;
        }
        for step in &steps.steps {
            if let Some((off, at, len)) = step.guest_only(pieces) {
                // Straight from the caller's buffer.
                self.storage
                    .write_at(&data[at..at + len as usize], off)
                    .map_err(io(off))?;
                continue;
            }
            match step {
                Step::Zero { off, len } => self
                    .storage
                    .write_zeroes(*off, *len, host_io::ZeroMode::KeepAllocated)
                    .map(|_| ())
                    .map_err(io(*off))?,
                Step::Run { off, range } => {
                    let run = &pieces[range.clone()];
                    let mut buf = vec![0u8; run.iter().map(|p| p.len as usize).sum()];
                    let mut at = 0;
                    for p in run {
                        let part = &mut buf[at..at + p.len as usize];
                        match p.fill {
                            Fill::Guest { at: g } => part.copy_from_slice(&data[g..g + part.len()]),
                            Fill::Zeroes => {}
                            Fill::Old { guest, src } => self.read_src(src, part, guest)?,
                        }
                        at += part.len();
                    }
                    self.storage.write_at(&buf, *off).map_err(io(*off))?;
                }
            }
        }
        Ok(())
    }

    /// Fill `part` (guest offset `guest`) from `src`.
    pub(crate) fn read_src(&self, src: Src, part: &mut [u8], guest: u64) -> Result<()> {
        match src {
            Src::Host(h) => self.storage.read_at(part, h).map_err(Error::io_lazy(|| {
                format!("reading data at host offset {h:#x}")
            })),
            Src::Zero => {
                part.fill(0);
                Ok(())
            }
            Src::Backing => match &self.backing {
                Some(b) => b.read_at(part, guest),
                None => {
                    part.fill(0);
                    Ok(())
                }
            },
            Src::Compressed(d, in_cl) => {
                let cluster = self.decompress(&d)?;
                part.copy_from_slice(&cluster[in_cl as usize..in_cl as usize + part.len()]);
                Ok(())
            }
        }
    }

    /// Read and decompress one compressed cluster.
    pub(crate) fn decompress(&self, d: &CompressedDescriptor) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size() as usize;
        let (start, end) = d.host_range();
        let mut input = vec![0u8; (end - start) as usize];
        self.storage
            .read_at(&mut input, start)
            .map_err(Error::io_lazy(|| {
                format!("reading compressed cluster at {start:#x}")
            }))?;
        let mut out = vec![0u8; cs];
        decompress_cluster(self.compression, &input, &mut out)?;
        Ok(out)
    }
}
