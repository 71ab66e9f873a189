//! The committed header `include/qcowprov.h` must be what cbindgen generates from the
//! sources with `cbindgen.toml`; and it must compile on its own as C99 and as C++.
//!
//! `QCOWPROV_BLESS=1 cargo test -p qcowprov --test header` rewrites the header.

use std::path::{Path, PathBuf};
use std::process::Command;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn header_path() -> PathBuf {
    crate_dir().join("../include/qcowprov.h")
}

/// The header cbindgen generates now.
fn generate() -> String {
    let dir = crate_dir();
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("reading capi/cbindgen.toml: {e}"));
    let bindings = cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen failed: {e}"));
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("cbindgen writes UTF-8")
}

#[test]
fn header_is_up_to_date() {
    let want = generate();
    let path = header_path();
    if std::env::var_os("QCOWPROV_BLESS").is_some_and(|v| v == "1") {
        // Write beside it and rename, so the compile tests running in parallel never see
        // a half-written header.
        let tmp = path.with_extension(format!("h.tmp{}", std::process::id()));
        std::fs::write(&tmp, &want).unwrap_or_else(|e| panic!("writing {tmp:?}: {e}"));
        std::fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("renaming to {path:?}: {e}"));
        eprintln!("QCOWPROV_BLESS=1: wrote {}", path.display());
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != want {
        let line = have
            .lines()
            .zip(want.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| have.lines().count().min(want.lines().count()))
            + 1;
        panic!(
            "include/qcowprov.h is out of date with capi/src (first difference at line \
             {line}).\nThe C API changed: review the change, then regenerate the header \
             with\n    QCOWPROV_BLESS=1 cargo test -p qcowprov --test header\nand commit it."
        );
    }
}

/// Run a compiler on `file`; None (with a printed reason) when it is not installed.
fn compile(compiler: &str, args: &[&str], file: &Path) -> Option<()> {
    let out = match Command::new(compiler).args(args).arg(file).output() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipping: cannot run {compiler} ({e})");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "{compiler} {args:?} {} failed:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

/// A scratch directory for the compile checks.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qcowprov-header-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

#[test]
fn header_compiles_as_c99() {
    let h = header_path();
    compile(
        "cc",
        &[
            "-Wall",
            "-Wextra",
            "-Werror",
            "-std=c99",
            "-fsyntax-only",
            "-x",
            "c",
        ],
        &h,
    );
}

#[test]
fn header_compiles_as_cxx() {
    let h = header_path();
    compile(
        "c++",
        &["-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-x", "c++"],
        &h,
    );
}

/// The C compiler agrees with the Rust layouts and constants (C11 for _Static_assert).
#[test]
fn c_layouts_match() {
    let dir = scratch("layout");
    let src = dir.join("layout.c");
    let include = crate_dir().join("../include");
    let checks = r#"
#include <qcowprov.h>
#include <stddef.h>
#define SA(c) _Static_assert(c, #c)

SA(offsetof(struct qcowprov_info, virtual_size) == 8);
SA(offsetof(struct qcowprov_info, refcount_bits) == 48);
SA(offsetof(struct qcowprov_info, incompatible_features) == 56);
SA(offsetof(struct qcowprov_info, snapshots) == 80);
SA(offsetof(struct qcowprov_info, provision) == 84);
SA(offsetof(struct qcowprov_info, policy) == 88);
SA(offsetof(struct qcowprov_info, backing_file) == 216);
SA(offsetof(struct qcowprov_info, backing_format) == 1240);
SA(offsetof(struct qcowprov_info, detect_zeroes) == 1272);
SA(offsetof(struct qcowprov_info, options) == 1280);
SA(offsetof(struct qcowprov_info, aio) == 1792);
SA(offsetof(struct qcowprov_info, aio_alignment) == 1800);
SA(sizeof(struct qcowprov_info) == 1808);
SA(sizeof(struct qcowprov_aio_completion) == 16);
SA(offsetof(struct qcowprov_aio_completion, result) == 8);
SA(QCOWPROV_AIO_IO_URING == 1 && QCOWPROV_AIO_THREADS == 2);
SA(sizeof(struct qcowprov_status) == 32);
SA(offsetof(struct qcowprov_status, host_offset) == 16);
SA(offsetof(struct qcowprov_status, depth) == 24);
SA(sizeof(struct qcowprov_check_result) == 88);
SA(offsetof(struct qcowprov_check_result, image_end_offset) == 80);
SA(sizeof(struct qcowprov_stats) == 64);
SA(offsetof(struct qcowprov_stats, host_flushes) == 8);
SA(offsetof(struct qcowprov_stats, host_zeroes) == 24);
SA(offsetof(struct qcowprov_stats, allocation_end) == 56);
SA(QCOWPROV_OPEN_RDONLY == 1 && QCOWPROV_OPEN_DIRECT == 2 && QCOWPROV_OPEN_NO_BACKING == 4 &&
   QCOWPROV_OPEN_CHECK == 8 && QCOWPROV_OPEN_FORCE_SHARE == 16);
SA(QCOWPROV_WRITE_FUA == 1 && QCOWPROV_ZERO_MAY_UNMAP == 1);
SA(QCOWPROV_CHECK_FIX_LEAKS == 1 && QCOWPROV_CHECK_FIX_ALL == 2);
SA(QCOWPROV_STATUS_DATA == 1 && QCOWPROV_STATUS_ZERO == 2 && QCOWPROV_STATUS_ALLOCATED == 4);
SA(QCOWPROV_STATUS_COMPRESSED == 8 && QCOWPROV_STATUS_BACKING == 16);
SA(QCOWPROV_STATUS_OFFSET_VALID == 32);
SA(QCOWPROV_INFO_EXTENDED_L2 == 1 && QCOWPROV_INFO_LAZY_REFCOUNTS == 2);
SA(QCOWPROV_INFO_READ_ONLY == 4 && QCOWPROV_INFO_HAS_BACKING == 8);
SA(QCOWPROV_INFO_COMPRESSION_ZSTD == 16 && QCOWPROV_INFO_LOCKED == 32);
SA(QCOWPROV_INFO_FORCE_SHARE == 64);
SA(QCOWPROV_DETECT_ZEROES_OFF == 0 && QCOWPROV_DETECT_ZEROES_ON == 1 && QCOWPROV_DETECT_ZEROES_UNMAP == 2);
SA(QCOWPROV_PROVISION_OFF == 0 && QCOWPROV_PROVISION_FULL == 1);
SA(QCOWPROV_PROVISION_METADATA == 2 && QCOWPROV_PROVISION_THIN == 3);
SA(QCOWPROV_PROVISION_REUSE == 4 && QCOWPROV_PROVISION_QEMU == 5);
/* The contract's signatures, as function pointer types. */
static const char *(*f_version)(void) = qcowprov_version;
static const char *(*f_strerror)(int) = qcowprov_strerror;
static const char *(*f_last_error)(void) = qcowprov_last_error;
static int (*f_create)(const char *, const char *, uint64_t) = qcowprov_create;
static int (*f_open)(const char *, const char *, uint32_t, qcowprov_image **) = qcowprov_open;
static int (*f_close)(qcowprov_image *) = qcowprov_close;
static int64_t (*f_pread)(qcowprov_image *, void *, size_t, uint64_t) = qcowprov_pread;
static int64_t (*f_pwrite)(qcowprov_image *, const void *, size_t, uint64_t, uint32_t) = qcowprov_pwrite;
static int64_t (*f_preadv)(qcowprov_image *, const struct iovec *, int, uint64_t) = qcowprov_preadv;
static int64_t (*f_pwritev)(qcowprov_image *, const struct iovec *, int, uint64_t, uint32_t) = qcowprov_pwritev;
static int (*f_discard)(qcowprov_image *, uint64_t, uint64_t) = qcowprov_discard;
static int (*f_write_zeroes)(qcowprov_image *, uint64_t, uint64_t, uint32_t) = qcowprov_write_zeroes;
static int (*f_flush)(qcowprov_image *) = qcowprov_flush;
static int (*f_resize)(qcowprov_image *, uint64_t) = qcowprov_resize;
static int (*f_block_status)(qcowprov_image *, uint64_t, uint64_t, uint64_t *, uint32_t *, uint64_t *) = qcowprov_block_status;
static int (*f_block_status_depth)(qcowprov_image *, uint64_t, uint64_t, struct qcowprov_status *) = qcowprov_block_status_depth;
static int (*f_get_info)(qcowprov_image *, struct qcowprov_info *) = qcowprov_get_info;
static int (*f_set_options)(qcowprov_image *, const char *) = qcowprov_set_options;
static int (*f_open_fd)(int, const char *, uint32_t, qcowprov_image **) = qcowprov_open_fd;
static int (*f_format)(const char *, const char *, uint64_t) = qcowprov_format;
static int (*f_format_fd)(int, const char *, uint64_t) = qcowprov_format_fd;
static int (*f_highest)(qcowprov_image *, uint64_t *) = qcowprov_highest_offset;
static void (*f_cb)(double, void *);
static qcowprov_progress_cb *f_cb_check = &f_cb;
static int (*f_check)(qcowprov_image *, uint32_t, struct qcowprov_check_result *, qcowprov_progress_cb, void *) = qcowprov_check;
static int (*f_get_stats)(qcowprov_image *, struct qcowprov_stats *) = qcowprov_get_stats;
static int (*f_aio_fd)(qcowprov_image *) = qcowprov_aio_fd;
static int (*f_aio_pread)(qcowprov_image *, void *, size_t, uint64_t, uint64_t) = qcowprov_aio_pread;
static int (*f_aio_pwrite)(qcowprov_image *, const void *, size_t, uint64_t, uint32_t, uint64_t) = qcowprov_aio_pwrite;
static int (*f_aio_preadv)(qcowprov_image *, const struct iovec *, int, uint64_t, uint64_t) = qcowprov_aio_preadv;
static int (*f_aio_pwritev)(qcowprov_image *, const struct iovec *, int, uint64_t, uint32_t, uint64_t) = qcowprov_aio_pwritev;
static int (*f_aio_discard)(qcowprov_image *, uint64_t, uint64_t, uint64_t) = qcowprov_aio_discard;
static int (*f_aio_zero)(qcowprov_image *, uint64_t, uint64_t, uint32_t, uint64_t) = qcowprov_aio_write_zeroes;
static int (*f_aio_flush)(qcowprov_image *, uint64_t) = qcowprov_aio_flush;
static int (*f_aio_reap)(qcowprov_image *, struct qcowprov_aio_completion *, uint32_t) = qcowprov_aio_reap;
static int (*f_aio_wait)(qcowprov_image *, uint32_t, int) = qcowprov_aio_wait;
static int64_t (*f_aio_in_flight)(qcowprov_image *) = qcowprov_aio_in_flight;
static int (*f_aio_cb)(qcowprov_image *, qcowprov_aio_cb, void *) = qcowprov_aio_set_callback;
int use_them(void);
int use_them(void) {
    return f_version != 0 && f_strerror != 0 && f_last_error != 0 && f_create != 0 && f_open != 0
        && f_close != 0 && f_pread != 0 && f_pwrite != 0 && f_preadv != 0 && f_pwritev != 0
        && f_discard != 0 && f_write_zeroes != 0 && f_flush != 0 && f_resize != 0
        && f_block_status != 0 && f_block_status_depth != 0 && f_get_info != 0
        && f_set_options != 0 && f_cb_check != 0 && f_check != 0 && f_get_stats != 0
        && f_open_fd != 0 && f_format != 0 && f_format_fd != 0 && f_highest != 0
        && f_aio_fd != 0 && f_aio_pread != 0 && f_aio_pwrite != 0 && f_aio_preadv != 0
        && f_aio_pwritev != 0 && f_aio_discard != 0 && f_aio_zero != 0 && f_aio_flush != 0
        && f_aio_reap != 0 && f_aio_wait != 0 && f_aio_in_flight != 0 && f_aio_cb != 0;
}
"#;
    std::fs::write(&src, checks).expect("write layout.c");
    let inc = format!("-I{}", include.display());
    compile(
        "cc",
        &[
            "-Wall",
            "-Wextra",
            "-Werror",
            "-std=c11",
            "-fsyntax-only",
            &inc,
        ],
        &src,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
