//! What the fault sweeps (`fault_provisioning`, `fault_aio_queue`) share: the prefilled
//! starting image and its model, and the consistency checks of an image a fault left.

use std::path::Path;
use std::sync::Arc;

use host_io::MemStorage;
use qcow2_engine::{Image, Mode, OpenOptions, Provision, Repair};

use super::qemu_img_status;

/// errno values the sweeps inject.
pub const EIO: i32 = 5;
/// No space left on the device.
pub const ENOSPC: i32 = 28;

/// Open the image on `mem` with `opts`, write its first `prefill` bytes (a pattern per
/// 64 KiB), discard and zero four clusters in it, close it; returns the cluster size and
/// the guest content (`size` bytes) the sweep's model starts from.
pub fn prefill(mem: &Arc<MemStorage>, opts: &str, size: u64, prefill: u64) -> (u64, Vec<u8>) {
    let img = Image::open_storage(mem.clone(), &OpenOptions::parse(opts).unwrap(), None).unwrap();
    let cs = img.cluster_size();
    let mut off = 0;
    while off < prefill {
        let len = (64 << 10).min(prefill - off);
        img.write_at(&vec![(off >> 16) as u8 | 0x80; len as usize], off)
            .unwrap();
        off += len;
    }
    img.discard(prefill / 4, 4 * cs).unwrap();
    img.write_zeroes(prefill / 2, 4 * cs, false).unwrap();
    let mut model = vec![0u8; size as usize];
    img.read_at(&mut model, 0).unwrap();
    img.close().unwrap();
    (cs, model)
}

/// Whether a discard in this image's policy makes the range read zeros.
pub fn discard_zeroes(img: &Image) -> bool {
    !matches!(
        img.info().mode,
        Mode::Provision(Provision::Off) | Mode::Qemu { unmap: false, .. }
    )
}

/// The first messages of a report, and how many there were.
pub fn first_messages(m: &[String]) -> String {
    format!("{:?} ({} messages)", &m[..m.len().min(3)], m.len())
}

/// `qemu-img check` finds no corruption (leaks allowed) in the image at `p`.
pub fn qemu_no_corruption(p: &Path, what: &str) -> Result<(), String> {
    let (code, out, err) = qemu_img_status(&["check", p.to_str().unwrap()]);
    if code == 0 || code == 3 {
        Ok(())
    } else {
        Err(format!("qemu-img check of {what}: {out}{err}"))
    }
}

/// The image on `mem` opens read-only and our check finds no corruption; with `qemu`, a
/// copy written there passes `qemu-img check` too.
pub fn consistent(mem: &MemStorage, what: &str, qemu: Option<&Path>) -> Result<(), String> {
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let img = Image::open_storage(Arc::new(mem.snapshot()), &ro, None)
        .map_err(|e| format!("open {what}: {e}"))?;
    let r = img.check(Repair::None).map_err(|e| e.to_string())?;
    if r.corruptions != 0 {
        return Err(format!("{what}: {}", first_messages(&r.messages)));
    }
    if let Some(p) = qemu {
        std::fs::write(p, mem.to_vec()).unwrap();
        qemu_no_corruption(p, what)?;
    }
    Ok(())
}
