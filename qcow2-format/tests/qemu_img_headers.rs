//! Cross-checks the format crate against images made by QEMU's own tools.
//!
//! For every `qemu-img create -f qcow2` option combination that changes the on-disk layout,
//! this creates an image, parses cluster 0 with [`HeaderArea::parse`] and compares it with
//! `qemu-img info --output=json` and with the options requested. It then walks the metadata
//! QEMU wrote (L1, L2, refcount table and blocks, snapshot table) with the crate's decoders
//! and checks it for consistency, and re-serializes cluster 0 byte-exact.
//!
//! A second test patches single header fields of a QEMU-made image and asserts both the
//! crate's specific error and that QEMU itself refuses the patched image.
//!
//! `qemu-img` and `qemu-io` are required: without them the tests fail (install
//! `qemu-utils`; CI does).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use qcow2_format::extensions::{EXT_BACKING_FORMAT, EXT_FEATURE_NAMES};
use qcow2_format::{
    l1, refcount, snapshot, ClusterKind, FormatError, Geometry, HeaderArea, HeaderExtension,
    L1Entry, L2Entry, SubclusterKind,
};
use serde_json::Value;

/// Virtual size of every test image.
const VSIZE: u64 = 16 << 20;
/// Guest bytes `[0, WRITE_LEN)` written with `WRITE_BYTE` before a snapshot is taken.
const WRITE_LEN: u64 = 128 << 10;
const WRITE_BYTE: u8 = 0x5a;
/// Guest offset of the compressed cluster written by combos with `compressed` set.
const COMP_OFF: u64 = 8 << 20;
/// How much of the file is read as "the head" (cluster 0 is at most 2 MiB).
const HEAD_MAX: u64 = (2 << 20) + (64 << 10);

// ------------------------------------------------------------------------------------------
// Process and file helpers
// ------------------------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!(
            "qcow2-format-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fail loudly (never skip) when the QEMU tools are missing.
fn require_qemu_tools() {
    for tool in ["qemu-img", "qemu-io"] {
        match Command::new(tool).arg("--version").output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "`{tool} --version` failed ({}): {}; install qemu-utils (CI installs it)",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!(
                "{tool} is required by this test but could not be run ({e}); install qemu-utils \
                 (e.g. `apt-get install qemu-utils`) -- CI installs it"
            ),
        }
    }
}

fn run(dir: &Path, prog: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

fn read_at(f: &File, off: u64, len: u64) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off)
        .map_err(|e| format!("read {len} bytes at {off:#x}: {e}"))?;
    Ok(buf)
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

// ------------------------------------------------------------------------------------------
// Option combinations
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backing {
    Qcow2,
    Raw,
}

#[derive(Clone, Debug)]
struct Combo {
    compat: &'static str,
    cluster_size: u64,
    refcount_bits: Option<u64>,
    extended_l2: Option<bool>,
    zstd: Option<bool>,
    lazy: bool,
    backing: Option<Backing>,
    prealloc: &'static str,
    /// Write `[0, WRITE_LEN)` with qemu-io, then `qemu-img snapshot -c s1`.
    snapshot: bool,
    /// Write one compressed cluster at `COMP_OFF` with qemu-io.
    compressed: bool,
}

impl Combo {
    fn new(compat: &'static str, cluster_size: u64) -> Combo {
        Combo {
            compat,
            cluster_size,
            refcount_bits: None,
            extended_l2: None,
            zstd: None,
            lazy: false,
            backing: None,
            prealloc: "off",
            snapshot: false,
            compressed: false,
        }
    }
    fn rc(mut self, bits: u64) -> Self {
        self.refcount_bits = Some(bits);
        self
    }
    fn ext(mut self, on: bool) -> Self {
        self.extended_l2 = Some(on);
        self
    }
    fn zstd(mut self, on: bool) -> Self {
        self.zstd = Some(on);
        self
    }
    fn lazy(mut self) -> Self {
        self.lazy = true;
        self
    }
    fn backing(mut self, b: Backing) -> Self {
        self.backing = Some(b);
        self
    }
    fn prealloc(mut self, p: &'static str) -> Self {
        self.prealloc = p;
        self
    }
    fn snapshot(mut self) -> Self {
        self.snapshot = true;
        self
    }
    fn compressed(mut self) -> Self {
        self.compressed = true;
        self
    }

    fn v3(&self) -> bool {
        self.compat == "1.1"
    }
    fn is_ext(&self) -> bool {
        self.extended_l2 == Some(true)
    }
    fn preallocated(&self) -> bool {
        self.prealloc != "off"
    }

    /// The `-o` string for `qemu-img create`.
    fn options(&self) -> String {
        let mut o = vec![
            format!("compat={}", self.compat),
            format!("cluster_size={}", self.cluster_size),
        ];
        if let Some(b) = self.refcount_bits {
            o.push(format!("refcount_bits={b}"));
        }
        if let Some(e) = self.extended_l2 {
            o.push(format!("extended_l2={}", if e { "on" } else { "off" }));
        }
        if let Some(z) = self.zstd {
            o.push(format!(
                "compression_type={}",
                if z { "zstd" } else { "zlib" }
            ));
        }
        if self.lazy {
            o.push("lazy_refcounts=on".into());
        }
        o.push(format!("preallocation={}", self.prealloc));
        o.join(",")
    }

    fn name(&self) -> String {
        let mut n = self.options();
        if let Some(b) = self.backing {
            n.push_str(&format!(" backing={b:?}"));
        }
        if self.snapshot {
            n.push_str(" +write+snapshot");
        }
        if self.compressed {
            n.push_str(" +compressed-write");
        }
        n
    }

    /// Relative backing file name (inside a subdirectory, with a space) and its format.
    fn backing_name(&self) -> Option<(&'static str, &'static str)> {
        self.backing.map(|b| match b {
            Backing::Qcow2 => ("bases/base image.qcow2", "qcow2"),
            Backing::Raw => ("bases/base.raw", "raw"),
        })
    }
}

fn combos() -> Vec<Combo> {
    const K: u64 = 1024;
    let mut v = Vec::new();
    // Cluster sizes, both versions, defaults otherwise.
    for cs in [512, K, 4 * K, 64 * K, 2048 * K] {
        for compat in ["0.10", "1.1"] {
            v.push(Combo::new(compat, cs));
        }
    }
    // Every refcount width (v3), empty and with metadata preallocation (which fills the
    // refcount blocks with thousands of refcount-1 entries at that width).
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        v.push(Combo::new("1.1", 64 * K).rc(bits));
        v.push(Combo::new("1.1", 4 * K).rc(bits).prealloc("metadata"));
    }
    v.push(Combo::new("0.10", 64 * K).rc(16));
    // Extended L2.
    for cs in [16 * K, 32 * K, 64 * K, 2048 * K] {
        v.push(Combo::new("1.1", cs).ext(true));
    }
    v.push(Combo::new("1.1", 64 * K).ext(false));
    v.push(Combo::new("1.1", 32 * K).ext(true).rc(1).zstd(true).lazy());
    // Compression type and lazy refcounts.
    v.push(Combo::new("1.1", 64 * K).zstd(false));
    v.push(Combo::new("1.1", 64 * K).zstd(true));
    v.push(Combo::new("1.1", 64 * K).lazy());
    v.push(Combo::new("1.1", 4 * K).lazy().zstd(true).rc(64));
    // Backing files: qcow2 and raw, relative names.
    for b in [Backing::Qcow2, Backing::Raw] {
        v.push(Combo::new("1.1", 64 * K).backing(b));
        v.push(Combo::new("0.10", 64 * K).backing(b));
        v.push(Combo::new("1.1", 512).backing(b));
        v.push(Combo::new("1.1", 16 * K).ext(true).backing(b));
    }
    v.push(
        Combo::new("1.1", 2048 * K)
            .zstd(true)
            .lazy()
            .backing(Backing::Qcow2),
    );
    // Preallocation.
    for cs in [512, 4 * K, 64 * K, 2048 * K] {
        v.push(Combo::new("1.1", cs).prealloc("metadata"));
    }
    v.push(Combo::new("0.10", 64 * K).prealloc("metadata"));
    v.push(Combo::new("1.1", 16 * K).ext(true).prealloc("metadata"));
    v.push(Combo::new("1.1", 64 * K).ext(true).prealloc("metadata"));
    v.push(Combo::new("1.1", 64 * K).prealloc("falloc"));
    v.push(Combo::new("1.1", 64 * K).prealloc("full"));
    v.push(Combo::new("0.10", 64 * K).prealloc("falloc"));
    v.push(Combo::new("1.1", 32 * K).ext(true).prealloc("falloc"));
    // QEMU allows a backing file with preallocation only with extended L2.
    v.push(
        Combo::new("1.1", 64 * K)
            .ext(true)
            .backing(Backing::Qcow2)
            .prealloc("metadata"),
    );
    // Written data, internal snapshots and compressed clusters.
    for cs in [512, 64 * K, 2048 * K] {
        v.push(Combo::new("1.1", cs).snapshot());
    }
    v.push(Combo::new("0.10", 64 * K).snapshot().compressed());
    v.push(Combo::new("1.1", 64 * K).snapshot().compressed().zstd(true));
    v.push(Combo::new("1.1", 4 * K).rc(2).snapshot().compressed());
    v.push(Combo::new("1.1", 16 * K).ext(true).snapshot().compressed());
    v.push(
        Combo::new("1.1", 2048 * K)
            .ext(true)
            .snapshot()
            .compressed(),
    );
    v.push(Combo::new("1.1", 64 * K).backing(Backing::Qcow2).snapshot());
    v.push(Combo::new("1.1", 64 * K).compressed());
    v
}

// ------------------------------------------------------------------------------------------
// Image creation
// ------------------------------------------------------------------------------------------

fn create(dir: &Path, c: &Combo) -> Result<PathBuf, String> {
    let img = dir.join("img.qcow2");
    let img_s = img.to_str().expect("utf-8 temp path");
    let opts = c.options();
    let size = VSIZE.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
    if let Some((name, fmt)) = c.backing_name() {
        std::fs::create_dir_all(dir.join("bases")).map_err(|e| e.to_string())?;
        let base = dir.join(name);
        run(
            dir,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                fmt,
                base.to_str().expect("utf-8"),
                &size,
            ],
        )?;
        args.extend(["-b", name, "-F", fmt]);
    }
    args.extend([img_s, &size]);
    run(dir, "qemu-img", &args)?;
    if c.snapshot {
        let cmd = format!("write -P {WRITE_BYTE:#x} 0 {WRITE_LEN}");
        run(dir, "qemu-io", &["-f", "qcow2", "-c", &cmd, img_s])?;
    }
    if c.compressed {
        let cmd = format!("write -c -P 0x33 {COMP_OFF} {}", c.cluster_size);
        run(dir, "qemu-io", &["-f", "qcow2", "-c", &cmd, img_s])?;
    }
    if c.snapshot {
        run(dir, "qemu-img", &["snapshot", "-c", "s1", img_s])?;
    }
    Ok(img)
}

fn info(dir: &Path, img: &Path) -> Result<Value, String> {
    let out = run(
        dir,
        "qemu-img",
        &[
            "info",
            "-f",
            "qcow2",
            "--output=json",
            img.to_str().expect("utf-8"),
        ],
    )?;
    serde_json::from_slice(&out).map_err(|e| format!("qemu-img info JSON: {e}"))
}

// ------------------------------------------------------------------------------------------
// The checks
// ------------------------------------------------------------------------------------------

/// Refcount lookups through the refcount table, with a block cache.
struct Refcounts<'a> {
    f: &'a File,
    geo: Geometry,
    reftable: Vec<u64>,
    blocks: HashMap<u64, Vec<u8>>,
}

impl Refcounts<'_> {
    fn get(&mut self, host: u64) -> Result<u64, String> {
        let idx = self.geo.reftable_index(host) as usize;
        let Some(&block_off) = self.reftable.get(idx) else {
            return Ok(0);
        };
        if block_off == 0 {
            return Ok(0);
        }
        if !self.blocks.contains_key(&block_off) {
            let b = read_at(self.f, block_off, self.geo.cluster_size())?;
            self.blocks.insert(block_off, b);
        }
        let block = &self.blocks[&block_off];
        Ok(refcount::get(
            block,
            self.geo.refblock_index(host) as usize,
            self.geo.refcount_order(),
        ))
    }

    /// Every cluster of `[off, off + len)` must have refcount exactly 1.
    fn expect_one(&mut self, what: &str, off: u64, len: u64) -> Result<(), String> {
        let cs = self.geo.cluster_size();
        let mut c = self.geo.align_down(off);
        while c < off + len {
            let r = self.get(c)?;
            ensure!(
                r == 1,
                "{what}: refcount of host cluster {c:#x} is {r}, expected 1"
            );
            c += cs;
        }
        Ok(())
    }
}

fn json_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn check_combo(c: &Combo) -> Result<usize, String> {
    let dir = TempDir::new("combo");
    let img = create(&dir.0, c)?;
    let info = info(&dir.0, &img)?;
    let f = File::open(&img).map_err(|e| e.to_string())?;
    let file_len = f.metadata().map_err(|e| e.to_string())?.len();
    let head = read_at(&f, 0, file_len.min(HEAD_MAX))?;

    // --- Cluster 0 ---------------------------------------------------------------------
    let area = HeaderArea::parse(&head).map_err(|e| format!("HeaderArea::parse: {e}"))?;
    let h = &area.header;
    let geo = h.geometry().map_err(|e| e.to_string())?;
    let cs = geo.cluster_size();

    // Against the options requested.
    ensure!(
        cs == c.cluster_size,
        "cluster size {cs}, requested {}",
        c.cluster_size
    );
    ensure!(
        h.version == if c.v3() { 3 } else { 2 },
        "version {}",
        h.version
    );
    let want_rc = c.refcount_bits.unwrap_or(16);
    ensure!(
        u64::from(geo.refcount_bits()) == want_rc,
        "refcount bits {}",
        geo.refcount_bits()
    );
    ensure!(
        h.extended_l2() == c.is_ext(),
        "extended_l2 {}",
        h.extended_l2()
    );
    ensure!(
        h.lazy_refcounts() == c.lazy,
        "lazy_refcounts {}",
        h.lazy_refcounts()
    );
    let comp = h.compression().map_err(|e| e.to_string())?;
    ensure!(
        comp.name() == if c.zstd == Some(true) { "zstd" } else { "zlib" },
        "compression {comp:?}"
    );
    ensure!(h.size == VSIZE, "size {}", h.size);
    ensure!(
        !h.is_dirty() && !h.is_corrupt(),
        "dirty/corrupt bits set: {:#x}",
        h.incompatible_features
    );
    ensure!(
        h.unknown_incompatible() == 0,
        "unknown incompatible bits {:#x}",
        h.unknown_incompatible()
    );
    ensure!(h.crypt_method == 0, "crypt_method {}", h.crypt_method);

    // Against qemu-img info.
    let fs = &info["format-specific"];
    ensure!(fs["type"] == "qcow2", "format-specific type {}", fs["type"]);
    let d = &fs["data"];
    ensure!(
        info["virtual-size"].as_u64() == Some(h.size),
        "virtual-size {} vs {}",
        info["virtual-size"],
        h.size
    );
    ensure!(
        info["cluster-size"].as_u64() == Some(cs),
        "cluster-size {} vs {cs}",
        info["cluster-size"]
    );
    let compat = if h.version == 2 { "0.10" } else { "1.1" };
    ensure!(
        json_str(d, "compat") == Some(compat),
        "compat {} vs {compat}",
        d["compat"]
    );
    ensure!(
        d["refcount-bits"].as_u64() == Some(geo.refcount_bits().into()),
        "refcount-bits {} vs {}",
        d["refcount-bits"],
        geo.refcount_bits()
    );
    ensure!(
        json_str(d, "compression-type") == Some(comp.name()),
        "compression-type {} vs {}",
        d["compression-type"],
        comp.name()
    );
    if h.version == 3 {
        ensure!(
            d["lazy-refcounts"].as_bool() == Some(h.lazy_refcounts()),
            "lazy-refcounts {}",
            d["lazy-refcounts"]
        );
        ensure!(
            d["extended-l2"].as_bool() == Some(h.extended_l2()),
            "extended-l2 {}",
            d["extended-l2"]
        );
        ensure!(
            d["corrupt"].as_bool() == Some(false),
            "corrupt {}",
            d["corrupt"]
        );
    } else {
        for k in ["lazy-refcounts", "extended-l2", "corrupt"] {
            ensure!(d.get(k).is_none(), "v2 image reports {k}");
        }
    }
    let backing = area.backing_file.as_deref().map(String::from_utf8_lossy);
    let backing_fmt = area.backing_format().map(String::from_utf8_lossy);
    ensure!(
        json_str(&info, "backing-filename") == backing.as_deref(),
        "backing-filename {} vs {backing:?}",
        info["backing-filename"]
    );
    ensure!(
        json_str(&info, "backing-filename-format") == backing_fmt.as_deref(),
        "backing-filename-format {} vs {backing_fmt:?}",
        info["backing-filename-format"]
    );
    ensure!(
        backing.as_deref() == c.backing_name().map(|b| b.0)
            && backing_fmt.as_deref() == c.backing_name().map(|b| b.1),
        "backing {backing:?}/{backing_fmt:?}, requested {:?}",
        c.backing_name()
    );
    // QEMU writes the feature name table on v3 only for clusters above 4 KiB (it would
    // crowd out the backing name in small clusters; see qcow2_update_header()).
    let has_table = area
        .extensions
        .iter()
        .any(|e| e.magic() == EXT_FEATURE_NAMES);
    ensure!(
        has_table == (h.version == 3 && cs > 4096),
        "feature name table present: {has_table}"
    );
    if let Some(HeaderExtension::FeatureNames(names)) = area
        .extensions
        .iter()
        .find(|e| e.magic() == EXT_FEATURE_NAMES)
    {
        ensure!(
            names
                .iter()
                .any(|n| n.kind == 0 && n.bit == 0 && n.name == b"dirty bit"),
            "feature table lacks the dirty bit: {names:?}"
        );
    }

    // Byte-exact round trip of the header area; the rest of cluster 0 is zero.
    let ser = area
        .to_bytes()
        .map_err(|e| format!("HeaderArea::to_bytes: {e}"))?;
    if ser[..] != head[..ser.len()] {
        let at = ser
            .iter()
            .zip(&head)
            .position(|(a, b)| a != b)
            .unwrap_or(ser.len());
        return Err(format!(
            "to_bytes differs from the image at byte {at} (serialized {} bytes): ours {:02x?} image {:02x?}",
            ser.len(),
            &ser[at..(at + 16).min(ser.len())],
            &head[at..(at + 16).min(head.len())]
        ));
    }
    ensure!(
        head[ser.len()..cs as usize].iter().all(|&b| b == 0),
        "non-zero bytes in cluster 0 after the {}-byte header area",
        ser.len()
    );
    ensure!(
        HeaderArea::parse(&ser).as_ref() == Ok(&area),
        "parse(to_bytes(area)) != area"
    );

    // --- Refcount table ------------------------------------------------------------------
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    let rt_raw = read_at(&f, h.refcount_table_offset, rt_len)?;
    let mut reftable = Vec::new();
    for (i, raw) in l1::decode_table(&rt_raw).into_iter().enumerate() {
        reftable
            .push(refcount::reftable_entry(raw, &geo).map_err(|e| format!("reftable[{i}]: {e}"))?);
    }
    ensure!(reftable[0] != 0, "no refcount block for cluster 0");
    let first_block = read_at(&f, reftable[0], cs)?;
    let r0 = refcount::get(&first_block, 0, h.refcount_order);
    ensure!(
        r0 == 1,
        "refcount of cluster 0 (header) is {r0}, expected 1"
    );
    let mut rc = Refcounts {
        f: &f,
        geo,
        reftable: reftable.clone(),
        blocks: HashMap::new(),
    };
    rc.expect_one("refcount table", h.refcount_table_offset, rt_len)?;
    for &b in reftable.iter().filter(|&&b| b != 0) {
        rc.expect_one("refcount block", b, cs)?;
    }
    // Past the end of the file nothing is referenced.
    let end = geo.align_up(file_len);
    ensure!(
        rc.get(end)? == 0,
        "cluster {end:#x} past EOF {file_len:#x} has a refcount"
    );

    // --- Snapshots -----------------------------------------------------------------------
    let info_snaps = info
        .get("snapshots")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    ensure!(
        info_snaps.len() == h.nb_snapshots as usize,
        "info lists {} snapshots, header says {}",
        info_snaps.len(),
        h.nb_snapshots
    );
    ensure!(
        h.nb_snapshots == u32::from(c.snapshot),
        "nb_snapshots {}",
        h.nb_snapshots
    );
    let mut snap_l1s = Vec::new();
    if h.nb_snapshots > 0 {
        // Enough for the table: entries are small; read to the end of the cluster run.
        let len = (64 << 10).min(file_len - h.snapshots_offset);
        let raw = read_at(&f, h.snapshots_offset, len)?;
        let snaps = snapshot::parse_snapshot_table(&raw, h.nb_snapshots as usize)
            .map_err(|e| format!("parse_snapshot_table: {e}"))?;
        let ser = snapshot::serialize_snapshot_table(&snaps).map_err(|e| e.to_string())?;
        let table_len = ser.len();
        // QEMU does not pad the last entry when the table ends the file.
        let n = table_len.min(raw.len());
        ensure!(
            ser[..n] == raw[..n] && ser[n..].iter().all(|&b| b == 0),
            "snapshot table does not re-serialize byte-exact"
        );
        rc.expect_one("snapshot table", h.snapshots_offset, table_len as u64)?;
        for (s, j) in snaps.iter().zip(&info_snaps) {
            let id = String::from_utf8_lossy(&s.id);
            let name = String::from_utf8_lossy(&s.name);
            ensure!(
                json_str(j, "id") == Some(&*id),
                "snapshot id {id:?} vs {}",
                j["id"]
            );
            ensure!(
                json_str(j, "name") == Some(&*name),
                "snapshot name {name:?} vs {}",
                j["name"]
            );
            ensure!(name == "s1", "snapshot name {name:?}");
            let vm_state = s.vm_state_size_large.unwrap_or(s.vm_state_size.into());
            ensure!(
                j["vm-state-size"].as_u64() == Some(vm_state),
                "vm-state-size {} vs {vm_state}",
                j["vm-state-size"]
            );
            ensure!(
                j["date-sec"].as_u64() == Some(s.date_sec.into()),
                "date-sec {} vs {}",
                j["date-sec"],
                s.date_sec
            );
            ensure!(
                j["date-nsec"].as_u64() == Some(s.date_nsec.into()),
                "date-nsec {} vs {}",
                j["date-nsec"],
                s.date_nsec
            );
            let clock = j["vm-clock-sec"]
                .as_u64()
                .zip(j["vm-clock-nsec"].as_u64())
                .map(|(a, b)| a * 1_000_000_000 + b);
            ensure!(
                clock == Some(s.vm_clock_nsec),
                "vm-clock {clock:?} vs {}",
                s.vm_clock_nsec
            );
            if let Some(ic) = j.get("icount") {
                ensure!(ic.as_u64() == s.icount, "icount {ic} vs {:?}", s.icount);
            }
            ensure!(
                s.disk_size == Some(VSIZE),
                "snapshot disk size {:?}",
                s.disk_size
            );
            ensure!(
                s.l1_size == h.l1_size,
                "snapshot l1_size {} vs {}",
                s.l1_size,
                h.l1_size
            );
            geo.check_table_offset("snapshot l1_table_offset", s.l1_table_offset)
                .map_err(|e| e.to_string())?;
            rc.expect_one(
                "snapshot L1 table",
                s.l1_table_offset,
                u64::from(s.l1_size) * 8,
            )?;
            let raw = read_at(&f, s.l1_table_offset, u64::from(s.l1_size) * 8)?;
            snap_l1s.push(l1::decode_table(&raw));
        }
    }

    // --- L1 and L2 -----------------------------------------------------------------------
    ensure!(
        u64::from(h.l1_size) == geo.l1_entries_for(VSIZE),
        "l1_size {}",
        h.l1_size
    );
    let l1_raw = read_at(&f, h.l1_table_offset, u64::from(h.l1_size) * 8)?;
    rc.expect_one("active L1 table", h.l1_table_offset, l1_raw.len() as u64)?;
    let l1_table = l1::decode_table(&l1_raw);
    let data_written = c.snapshot || c.compressed;
    let mut entries_checked = 0usize;
    for (i, &raw) in l1_table.iter().enumerate() {
        let e = L1Entry(raw);
        e.validate(&geo).map_err(|err| format!("L1[{i}]: {err}"))?;
        for (k, snap_l1) in snap_l1s.iter().enumerate() {
            // Nothing is written after the snapshot: it shares every L2 table.
            ensure!(
                L1Entry(snap_l1[i]).l2_offset() == e.l2_offset(),
                "snapshot {k} L1[{i}] {:#x} vs active {raw:#x}",
                snap_l1[i]
            );
        }
        if e.is_unallocated() {
            ensure!(!e.copied(), "L1[{i}] unallocated with COPIED");
            let cov = geo.l2_coverage();
            let (lo, hi) = (i as u64 * cov, (i as u64 + 1) * cov);
            let needed = c.preallocated()
                || (c.snapshot && written(lo, cov))
                || (c.compressed && (lo..hi).contains(&COMP_OFF));
            ensure!(
                !needed,
                "L1[{i}] unallocated but guest {lo:#x}..{hi:#x} holds data"
            );
            continue;
        }
        let r = rc.get(e.l2_offset())?;
        ensure!(
            r >= 1 && e.copied() == (r == 1),
            "L1[{i}] {raw:#x}: COPIED {} but L2 refcount {r}",
            e.copied()
        );
        let l2_raw = read_at(&f, e.l2_offset(), cs)?;
        let l2 = L2Entry::decode_table(&l2_raw, &geo);
        ensure!(
            l2.len() as u64 == geo.l2_entries(),
            "L2 table has {} entries",
            l2.len()
        );
        for (j, ent) in l2.iter().enumerate() {
            let guest = (i as u64 * geo.l2_entries() + j as u64) * cs;
            check_l2_entry(c, &f, &geo, &mut rc, guest, ent)
                .map_err(|err| format!("L1[{i}] L2[{j}] {ent:x?}: {err}"))?;
            entries_checked += 1;
        }
    }
    if data_written || c.preallocated() {
        ensure!(entries_checked > 0, "no L2 table allocated");
    }
    Ok(entries_checked)
}

fn written(guest: u64, len: u64) -> bool {
    guest < WRITE_LEN && guest + len > 0
}

fn check_l2_entry(
    c: &Combo,
    f: &File,
    geo: &Geometry,
    rc: &mut Refcounts<'_>,
    guest: u64,
    ent: &L2Entry,
) -> Result<(), String> {
    let cs = geo.cluster_size();
    let kind = ent.kind(geo).map_err(|e| format!("kind(): {e}"))?;
    let in_image = guest < VSIZE;
    let compressed_here = c.compressed && guest == COMP_OFF;
    let data_here = c.snapshot && written(guest, cs);

    // Reference counts agree with COPIED for allocated clusters.
    match kind {
        ClusterKind::Normal { offset } | ClusterKind::ZeroAlloc { offset } => {
            ensure!(
                geo.is_cluster_aligned(offset),
                "unaligned data offset {offset:#x}"
            );
            let r = rc.get(offset)?;
            ensure!(
                r >= 1 && ent.copied() == (r == 1),
                "COPIED {} but refcount {r}",
                ent.copied()
            );
        }
        ClusterKind::Compressed(d) => {
            ensure!(compressed_here, "unexpected compressed cluster");
            ensure!(!ent.copied(), "compressed with COPIED");
            let (start, end) = d.host_range();
            ensure!(
                start >= cs && start < end,
                "compressed range {start:#x}..{end:#x}"
            );
            ensure!(
                d.sectors >= 1 && d.sectors <= cs / 512 + 1,
                "compressed sectors {}",
                d.sectors
            );
            for host in d.host_clusters(geo) {
                let r = rc.get(host)?;
                ensure!(r >= 1, "compressed data cluster {host:#x} has refcount {r}");
            }
            // zlib streams start with raw deflate, zstd frames with their magic.
            let first = read_at(f, start, 4)?;
            if c.zstd == Some(true) {
                ensure!(
                    first == [0x28, 0xb5, 0x2f, 0xfd],
                    "no zstd magic at {start:#x}: {first:02x?}"
                );
            }
            return Ok(());
        }
        ClusterKind::Unallocated | ClusterKind::ZeroPlain => {
            ensure!(!ent.copied(), "COPIED on an entry without a host cluster");
        }
    }
    ensure!(
        !compressed_here,
        "expected a compressed cluster, got {kind:?}"
    );

    if !in_image {
        ensure!(
            kind == ClusterKind::Unallocated && ent.bitmap == 0,
            "entry past the virtual size: {kind:?}"
        );
        return Ok(());
    }
    if !geo.extended_l2() {
        ensure!(ent.bitmap == 0, "bitmap on a standard entry");
        let allocated = matches!(
            kind,
            ClusterKind::Normal { .. } | ClusterKind::ZeroAlloc { .. }
        );
        if data_here {
            ensure!(
                matches!(kind, ClusterKind::Normal { .. }),
                "written cluster is {kind:?}"
            );
        } else if c.preallocated() {
            ensure!(allocated, "preallocated cluster is {kind:?}");
        } else {
            ensure!(
                kind == ClusterKind::Unallocated,
                "untouched cluster is {kind:?}"
            );
        }
        ensure!(
            ent.subcluster_kind(kind, geo, 0)
                == match kind {
                    ClusterKind::Normal { .. } => SubclusterKind::Normal,
                    ClusterKind::ZeroAlloc { .. } => SubclusterKind::ZeroAlloc,
                    ClusterKind::ZeroPlain => SubclusterKind::ZeroPlain,
                    _ => SubclusterKind::UnallocatedPlain,
                },
            "subcluster kind of a standard entry"
        );
    } else {
        let sc = geo.subcluster_size();
        for s in 0..geo.subclusters_per_cluster() {
            let sk = ent.subcluster_kind(kind, geo, s);
            let sub_guest = guest + u64::from(s) * sc;
            if c.snapshot && written(sub_guest, sc) {
                ensure!(
                    sk == SubclusterKind::Normal,
                    "written subcluster {s} is {sk:?}"
                );
            } else if c.preallocated() || data_here {
                ensure!(
                    matches!(
                        sk,
                        SubclusterKind::Normal
                            | SubclusterKind::UnallocatedAlloc
                            | SubclusterKind::ZeroAlloc
                    ),
                    "subcluster {s} of an allocated cluster is {sk:?}"
                );
            } else {
                ensure!(
                    sk == SubclusterKind::UnallocatedPlain,
                    "untouched subcluster {s} is {sk:?}"
                );
            }
        }
        if !c.preallocated() && !data_here {
            ensure!(
                kind == ClusterKind::Unallocated,
                "untouched cluster is {kind:?}"
            );
        } else {
            ensure!(
                matches!(kind, ClusterKind::Normal { .. }),
                "allocated cluster is {kind:?}"
            );
        }
    }
    // The written bytes are where the entry says.
    if let (true, ClusterKind::Normal { offset }) = (data_here, kind) {
        let n = cs.min(WRITE_LEN - guest);
        let data = read_at(f, offset, n)?;
        ensure!(
            data.iter().all(|&b| b == WRITE_BYTE),
            "guest {guest:#x} -> host {offset:#x} does not hold the written pattern"
        );
    }
    Ok(())
}

#[test]
fn qemu_img_images_parse_and_agree_with_qemu_img_info() {
    require_qemu_tools();
    let combos = combos();
    let mut failures = Vec::new();
    let mut entries = 0;
    for c in &combos {
        match check_combo(c) {
            Ok(n) => entries += n,
            Err(e) => failures.push(format!("[{}]: {e}", c.name())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} combinations failed:\n{}",
        failures.len(),
        combos.len(),
        failures.join("\n")
    );
    // The L2 walk must actually have looked at entries (metadata preallocation of a 16 MiB
    // image with 512-byte clusters alone has 32768).
    assert!(entries > 32768, "only {entries} L2 entries checked");
    eprintln!(
        "{} combinations, {entries} L2 entries checked",
        combos.len()
    );
}

#[test]
fn qemu_img_rejects_what_the_crate_rejects() {
    // Sanity for the negative path: qemu-img refuses options the format cannot express, so
    // the combination list above cannot silently test nothing.
    require_qemu_tools();
    let dir = TempDir::new("bad-opts");
    for opts in [
        "compat=0.10,refcount_bits=8",
        "cluster_size=8k,extended_l2=on",
        "cluster_size=4M",
    ] {
        let r = run(
            &dir.0,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", "16M"],
        );
        assert!(r.is_err(), "qemu-img accepted {opts}");
    }
}

// ------------------------------------------------------------------------------------------
// Hand-corrupted headers
// ------------------------------------------------------------------------------------------

type Patch = (&'static str, fn(&mut Vec<u8>), fn(&FormatError) -> bool);

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn corrupted_qemu_img_headers_give_specific_errors() {
    require_qemu_tools();
    let dir = TempDir::new("corrupt");
    let d = &dir.0;
    run(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.raw", "16M"],
    )
    .unwrap();
    run(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=64k",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "img.qcow2",
            "16M",
        ],
    )
    .unwrap();
    let original = std::fs::read(d.join("img.qcow2")).unwrap();
    let area = HeaderArea::parse(&original).expect("pristine image parses");
    // The layout the patches below assume.
    assert_eq!(area.header.version, 3);
    assert_eq!(area.header.header_length, 112);
    assert_eq!(area.extensions[0].magic(), EXT_BACKING_FORMAT);
    assert_eq!(area.backing_file.as_deref(), Some(&b"base.raw"[..]));
    assert!(area.header.backing_file_offset > 0);

    let cases: Vec<Patch> = vec![
        (
            "bad magic",
            |b| put32(b, 0, 0x5146_49fc),
            |e| matches!(e, FormatError::BadMagic { found: 0x5146_49fc }),
        ),
        (
            "version 4",
            |b| put32(b, 4, 4),
            |e| matches!(e, FormatError::UnsupportedVersion { found: 4 }),
        ),
        (
            "cluster_bits 8",
            |b| put32(b, 20, 8),
            |e| {
                matches!(
                    e,
                    FormatError::InvalidField {
                        field: "cluster_bits",
                        value: 8,
                        ..
                    }
                )
            },
        ),
        (
            "cluster_bits 22",
            |b| put32(b, 20, 22),
            |e| {
                matches!(
                    e,
                    FormatError::InvalidField {
                        field: "cluster_bits",
                        value: 22,
                        ..
                    }
                )
            },
        ),
        (
            "l1_size absurd",
            |b| put32(b, 36, 0x1000_0000),
            |e| {
                matches!(
                    e,
                    FormatError::LimitExceeded {
                        field: "l1_size",
                        value: 0x1000_0000,
                        max: 0x40_0000,
                        ..
                    }
                )
            },
        ),
        (
            "l1_size too small",
            |b| put32(b, 36, 0),
            |e| {
                matches!(
                    e,
                    FormatError::InvalidField {
                        field: "l1_size",
                        value: 0,
                        ..
                    }
                )
            },
        ),
        (
            "refcount_table_clusters huge",
            |b| put32(b, 56, 1 << 20),
            |e| {
                matches!(
                    e,
                    FormatError::LimitExceeded {
                        field: "refcount_table_clusters",
                        value: 0x10_0000,
                        max: 128,
                        ..
                    }
                )
            },
        ),
        (
            "refcount_table_clusters 0",
            |b| put32(b, 56, 0),
            |e| {
                matches!(
                    e,
                    FormatError::InvalidField {
                        field: "refcount_table_clusters",
                        value: 0,
                        ..
                    }
                )
            },
        ),
        (
            "unaligned l1_table_offset",
            |b| {
                let v = get64(b, 40) + 512;
                put64(b, 40, v)
            },
            |e| {
                matches!(
                    e,
                    FormatError::Unaligned {
                        what: "l1_table_offset",
                        align: 65536,
                        ..
                    }
                )
            },
        ),
        (
            "unaligned refcount_table_offset",
            |b| {
                let v = get64(b, 48) + 8;
                put64(b, 48, v)
            },
            |e| {
                matches!(
                    e,
                    FormatError::Unaligned {
                        what: "refcount_table_offset",
                        align: 65536,
                        ..
                    }
                )
            },
        ),
        (
            "backing_file_size 2000",
            |b| put32(b, 16, 2000),
            |e| {
                matches!(
                    e,
                    FormatError::LimitExceeded {
                        field: "backing_file_size",
                        value: 2000,
                        max: 1023,
                        ..
                    }
                )
            },
        ),
        (
            "header_length 100",
            |b| put32(b, 100, 100),
            |e| {
                matches!(
                    e,
                    FormatError::InvalidField {
                        field: "header_length",
                        value: 100,
                        ..
                    }
                )
            },
        ),
        (
            "compression_type 2",
            |b| b[104] = 2,
            |e| {
                matches!(
                    e,
                    FormatError::InvalidField {
                        field: "compression_type",
                        value: 2,
                        ..
                    }
                )
            },
        ),
        (
            "refcount_order 7",
            |b| put32(b, 96, 7),
            |e| {
                matches!(
                    e,
                    FormatError::InvalidField {
                        field: "refcount_order",
                        value: 7,
                        ..
                    }
                )
            },
        ),
        (
            "crypt_method 3",
            |b| put32(b, 32, 3),
            |e| {
                matches!(
                    e,
                    FormatError::InvalidField {
                        field: "crypt_method",
                        value: 3,
                        ..
                    }
                )
            },
        ),
        (
            "nb_snapshots huge",
            |b| put32(b, 60, 70_000),
            |e| {
                matches!(
                    e,
                    FormatError::LimitExceeded {
                        field: "nb_snapshots",
                        value: 70_000,
                        ..
                    }
                )
            },
        ),
        (
            "extension length overflowing the cluster",
            |b| put32(b, 116, 0x1_0000),
            |e| matches!(e, FormatError::BadExtension { magic: EXT_BACKING_FORMAT, at: 112, reason } if reason.contains("runs past")),
        ),
        (
            "extension length past the backing name",
            |b| put32(b, 116, 1000),
            |e| matches!(e, FormatError::BadExtension { magic: EXT_BACKING_FORMAT, at: 112, reason } if reason.contains("runs past")),
        ),
        (
            "backing format extension too long for QEMU",
            |b| put32(b, 116, 200),
            |e| matches!(e, FormatError::BadExtension { magic: EXT_BACKING_FORMAT, at: 112, reason } if reason.contains("exceeds 15")),
        ),
    ];

    let mut failures = Vec::new();
    for (name, patch, expected) in &cases {
        let mut bytes = original.clone();
        patch(&mut bytes);
        assert_ne!(bytes, original, "{name}: the patch changed nothing");
        match HeaderArea::parse(&bytes) {
            Ok(_) => failures.push(format!("{name}: parsed without error")),
            Err(e) if expected(&e) => {}
            Err(e) => failures.push(format!("{name}: wrong error {e:?}")),
        }
        // QEMU must refuse the same image, or our error is spurious.
        let path = d.join("patched.qcow2");
        std::fs::write(&path, &bytes).unwrap();
        if run(d, "qemu-img", &["info", "-f", "qcow2", "patched.qcow2"]).is_ok() {
            failures.push(format!("{name}: qemu-img info accepts the patched image"));
        }
    }
    // The unpatched image still opens in QEMU after all that (same directory, same base).
    std::fs::write(d.join("patched.qcow2"), &original).unwrap();
    run(d, "qemu-img", &["info", "-f", "qcow2", "patched.qcow2"]).unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn truncated_qemu_img_headers_are_truncated_errors() {
    require_qemu_tools();
    let dir = TempDir::new("trunc");
    run(
        &dir.0,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "img.qcow2", "16M"],
    )
    .unwrap();
    let bytes = std::fs::read(dir.0.join("img.qcow2")).unwrap();
    for n in [0, 4, 71, 72, 103, 111] {
        match HeaderArea::parse(&bytes[..n]) {
            Err(FormatError::Truncated { need, have, .. }) => {
                assert!(have == n && need > n, "len {n}")
            }
            other => panic!("len {n}: expected Truncated, got {other:?}"),
        }
    }
    // The header itself (112 bytes) is enough; extensions are read as far as given.
    let a = HeaderArea::parse(&bytes[..112]).unwrap();
    assert!(a.extensions.is_empty());
    assert!(HeaderArea::parse(&bytes[..4096]).unwrap().extensions.len() == 1);
}
