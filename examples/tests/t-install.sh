#!/bin/sh
# Installing like a library: `make install` into a temporary prefix, then, as a new user
# would, build a C program and the nbdkit plugin with pkg-config alone (dynamic, and
# static with --static), run them, and check the installed tools and plugin run from the
# prefix without LD_LIBRARY_PATH. Also a DESTDIR staging install and uninstall.
. "$(dirname "$0")/lib.sh"
need make cc pkg-config readelf qemu-img qemu-io nbdkit nbdinfo

P=$T/prefix
PD=$P/lib/nbdkit/plugins
if make -s -C "$EX" install PREFIX="$P" NBDKIT_PLUGINDIR="$PD" > "$T/install.log" 2>&1; then
    pass "make install PREFIX=$P"
else
    fail "make install PREFIX=..." "$T/install.log"
    finish
    exit 1
fi

# ---- the installed files ----
missing=""
for f in lib/libqcowprov.so.1.0.0 lib/libqcowprov.so.1 lib/libqcowprov.so lib/libqcowprov.a \
    include/qcowprov.h lib/pkgconfig/qcowprov.pc bin/qcowprov-img bin/qcowprov-io bin/qcowprov-bench \
    lib/nbdkit/plugins/nbdkit-qcowprov-plugin.so; do
    [ -e "$P/$f" ] || missing="$missing $f"
done
if [ -z "$missing" ] && [ "$(readlink "$P/lib/libqcowprov.so.1")" = libqcowprov.so.1.0.0 ] &&
    [ "$(readlink "$P/lib/libqcowprov.so")" = libqcowprov.so.1 ]; then
    pass "library with its symlinks, static library, header, qcowprov.pc, tools, plugin"
else
    fail "installed files" "missing:$missing" "$(ls -lR "$P" 2>&1 | head -30)"
fi
soname=$(readelf -d "$P/lib/libqcowprov.so.1.0.0" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
if [ "$soname" = libqcowprov.so.1 ]; then
    pass "installed library's soname: $soname"
else
    fail "installed library's soname is libqcowprov.so.1" "got '$soname'"
fi

export PKG_CONFIG_PATH="$P/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
want=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$EX/../Cargo.toml" | head -1)
got=$(pkg-config --modversion qcowprov 2>&1)
if [ "$got" = "$want" ]; then
    pass "pkg-config --modversion qcowprov: $got"
else
    fail "pkg-config finds qcowprov $want" "$got"
fi

# ---- a C program built with pkg-config alone ----
cat > "$T/prog.c" <<'EOF'
#include <qcowprov.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    qcowprov_image *img;
    char buf[65536], back[65536];
    uint64_t pnum, host;
    uint32_t flags;

    if (argc != 2)
        return 2;
    if (qcowprov_create(argv[1], "cluster_size=65536", 16 << 20) < 0 ||
        qcowprov_open(argv[1], "provision=thin", 0, &img) < 0) {
        fprintf(stderr, "%s\n", qcowprov_last_error());
        return 1;
    }
    memset(buf, 0x5a, sizeof buf);
    if (qcowprov_pwrite(img, buf, sizeof buf, 1 << 20, QCOWPROV_WRITE_FUA) != (int64_t) sizeof buf ||
        qcowprov_pread(img, back, sizeof back, 1 << 20) != (int64_t) sizeof back ||
        memcmp(buf, back, sizeof buf) != 0 ||
        qcowprov_discard(img, 1 << 20, sizeof buf) < 0 ||
        qcowprov_block_status(img, 1 << 20, sizeof buf, &pnum, &flags, &host) < 0 ||
        (flags & QCOWPROV_STATUS_DATA) || qcowprov_close(img) < 0) {
        fprintf(stderr, "%s\n", qcowprov_last_error());
        return 1;
    }
    printf("libqcowprov %s ok\n", qcowprov_version());
    return 0;
}
EOF
# shellcheck disable=SC2046
if cc -std=c99 -o "$T/prog" "$T/prog.c" $(pkg-config --cflags --libs qcowprov) > "$T/cc.log" 2>&1 &&
    LD_LIBRARY_PATH=$P/lib "$T/prog" "$T/a.qcow2" > "$T/run.out" 2>&1 &&
    grep -q "libqcowprov $want ok" "$T/run.out" && qemu-img check "$T/a.qcow2" > /dev/null 2>&1 &&
    LD_LIBRARY_PATH=$P/lib ldd "$T/prog" | grep -q "libqcowprov.so.1 => $P/lib/libqcowprov.so.1"; then
    pass "cc prog.c \$(pkg-config --cflags --libs qcowprov): runs on the installed libqcowprov.so.1"
else
    fail "C program with pkg-config (dynamic)" "$T/cc.log" "$T/run.out"
fi
# shellcheck disable=SC2046
if cc -std=c99 -static -o "$T/prog-static" "$T/prog.c" $(pkg-config --static --cflags --libs qcowprov) \
    > "$T/cc-static.log" 2>&1 && "$T/prog-static" "$T/b.qcow2" > "$T/run-static.out" 2>&1 &&
    grep -q "libqcowprov $want ok" "$T/run-static.out" && qemu-img check "$T/b.qcow2" > /dev/null 2>&1 &&
    ! readelf -d "$T/prog-static" 2>/dev/null | grep -q NEEDED; then
    pass "cc -static prog.c \$(pkg-config --static --cflags --libs qcowprov): self-contained, runs"
else
    fail "C program with pkg-config --static" "$T/cc-static.log" "$T/run-static.out"
fi

# ---- the plugin built from its source with pkg-config alone ----
qemu-img create -q -f qcow2 "$T/c.qcow2" 8M
qemu-io -c 'write -P 7 0 1M' "$T/c.qcow2" > /dev/null
# shellcheck disable=SC2046
if cc -std=c99 -fPIC -shared -o "$T/plugin.so" "$EX/servers/nbdkit-qcowprov/nbdkit-qcowprov-plugin.c" \
    $(pkg-config --cflags --libs qcowprov nbdkit) > "$T/cc-plugin.log" 2>&1 &&
    LD_LIBRARY_PATH=$P/lib nbdkit -U - "$T/plugin.so" file="$T/c.qcow2" readonly=true \
        --run 'qemu-io -r -f raw "$uri" -c "read -P 7 0 1M"' > "$T/plugin.out" 2>&1 < /dev/null; then
    pass "plugin built with \$(pkg-config --cflags --libs qcowprov nbdkit) serves the image"
else
    fail "plugin built with pkg-config" "$T/cc-plugin.log" "$T/plugin.out"
fi

# ---- installed tools and plugin run from the prefix as they are ----
if env -u LD_LIBRARY_PATH "$P/bin/qcowprov-img" check "$T/c.qcow2" > "$T/tool.out" 2>&1 &&
    env -u LD_LIBRARY_PATH nbdkit -U - "$PD/nbdkit-qcowprov-plugin.so" file="$T/c.qcow2" \
        --run 'qemu-io -f raw "$uri" -c "read -P 7 0 1M" -c "discard 0 1M"' > "$T/iplugin.out" 2>&1 < /dev/null &&
    qemu-img check "$T/c.qcow2" > /dev/null 2>&1; then
    pass "installed qcowprov-img and plugin find the library in the prefix (RUNPATH)"
else
    fail "installed tools and plugin run from the prefix" "$T/tool.out" "$T/iplugin.out"
fi

# ---- staging with DESTDIR, then uninstall ----
S=$T/stage
PLUGINDIR=$(pkg-config --variable=plugindir nbdkit)
if make -s -C "$EX" install DESTDIR="$S" PREFIX=/usr/local > "$T/stage.log" 2>&1 &&
    [ -f "$S/usr/local/lib/libqcowprov.so.1.0.0" ] && [ -f "$S/usr/local/include/qcowprov.h" ] &&
    [ -f "$S$PLUGINDIR/nbdkit-qcowprov-plugin.so" ] &&
    grep -q '^prefix=/usr/local$' "$S/usr/local/lib/pkgconfig/qcowprov.pc"; then
    pass "make install DESTDIR=... PREFIX=/usr/local: staged, plugin in nbdkit's $PLUGINDIR, .pc names /usr/local"
else
    fail "DESTDIR install" "$T/stage.log"
fi
make -s -C "$EX" uninstall PREFIX="$P" NBDKIT_PLUGINDIR="$PD" > "$T/uninstall.log" 2>&1
left=$(find "$P" -type f -o -type l)
if [ -z "$left" ]; then
    pass "make uninstall removes every installed file"
else
    fail "make uninstall" "left: $left"
fi
finish
