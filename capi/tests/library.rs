//! The shared library as a C program links it: only `qcowprov_*` symbols are exported,
//! and the soname is `libqcowprov.so.1`. Skips (with a printed reason) when binutils or
//! the .so are missing.

use std::path::PathBuf;
use std::process::Command;

/// The cdylib cargo built next to this test (target/<profile>/deps or target/<profile>).
fn shared_library() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    [
        deps.join("libqcowprov.so"),
        deps.parent()?.join("libqcowprov.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// Run a binutils tool; None (with a printed reason) when it cannot run.
fn tool(name: &str, args: &[&str]) -> Option<String> {
    let Some(lib) = shared_library() else {
        eprintln!("skipping: libqcowprov.so not found next to the test binary");
        return None;
    };
    match Command::new(name).args(args).arg(&lib).output() {
        Ok(o) => {
            assert!(
                o.status.success(),
                "{name} {args:?} {}: {}",
                lib.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            Some(String::from_utf8_lossy(&o.stdout).into_owned())
        }
        Err(e) => {
            eprintln!("skipping: cannot run {name} ({e})");
            None
        }
    }
}

#[test]
fn exports_only_the_c_api() {
    let Some(out) = tool("nm", &["-D", "--defined-only"]) else {
        return;
    };
    let symbols: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let foreign: Vec<&&str> = symbols
        .iter()
        .filter(|s| !s.starts_with("qcowprov_"))
        .collect();
    assert!(
        foreign.is_empty(),
        "exported beyond qcowprov_*: {foreign:?}"
    );
    for want in [
        "qcowprov_version",
        "qcowprov_strerror",
        "qcowprov_last_error",
        "qcowprov_create",
        "qcowprov_open",
        "qcowprov_close",
        "qcowprov_pread",
        "qcowprov_pwrite",
        "qcowprov_preadv",
        "qcowprov_pwritev",
        "qcowprov_discard",
        "qcowprov_write_zeroes",
        "qcowprov_flush",
        "qcowprov_resize",
        "qcowprov_block_status",
        "qcowprov_block_status_depth",
        "qcowprov_get_info",
        "qcowprov_set_options",
        "qcowprov_check",
        "qcowprov_get_stats",
        "qcowprov_open_fd",
        "qcowprov_format",
        "qcowprov_format_fd",
        "qcowprov_highest_offset",
        "qcowprov_bitmap_count",
        "qcowprov_bitmap_get",
        "qcowprov_bitmap_warning",
        "qcowprov_bitmap_add",
        "qcowprov_bitmap_remove",
        "qcowprov_bitmap_clear",
        "qcowprov_bitmap_enable",
        "qcowprov_bitmap_disable",
        "qcowprov_bitmap_merge",
        "qcowprov_bitmap_dirty",
        "qcowprov_aio_fd",
        "qcowprov_aio_pread",
        "qcowprov_aio_preadv",
        "qcowprov_aio_pwrite",
        "qcowprov_aio_pwritev",
        "qcowprov_aio_discard",
        "qcowprov_aio_write_zeroes",
        "qcowprov_aio_flush",
        "qcowprov_aio_reap",
        "qcowprov_aio_wait",
        "qcowprov_aio_in_flight",
        "qcowprov_aio_set_callback",
    ] {
        assert!(
            symbols.contains(&want),
            "{want} is not exported: {symbols:?}"
        );
    }
    assert_eq!(symbols.len(), 46, "{symbols:?}");
}

#[test]
fn soname_is_versioned() {
    let Some(out) = tool("readelf", &["-d"]) else {
        return;
    };
    assert!(
        out.lines()
            .any(|l| l.contains("(SONAME)") && l.contains("[libqcowprov.so.1]")),
        "no SONAME libqcowprov.so.1 in:\n{out}"
    );
}
