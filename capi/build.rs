//! Linker settings of `libqcowprov.so`: the soname `libqcowprov.so.1` and a version script
//! that exports only the `qcowprov_*` symbols.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=qcowprov.map");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    // ELF targets with a GNU-compatible linker (GNU ld, gold, lld, mold).
    let elf = matches!(
        os.as_str(),
        "linux" | "android" | "freebsd" | "netbsd" | "openbsd" | "dragonfly" | "illumos"
    );
    if !elf {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libqcowprov.so.1");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={dir}/qcowprov.map");
}
