#!/bin/sh
# Builds what the real-guest test boots, into OUTDIR (examples/build/guest by default):
#   OUTDIR/vmlinux       Debian's stock kernel (linux-image-amd64's current version),
#                        unpacked from its vmlinuz: QEMU boots the ELF through its PVH
#                        entry point, which under TCG saves ~8 s of decompression per boot
#   OUTDIR/initramfs     busybox-static, the virtio and ext4 modules, mke2fs and e2fsck
#                        from the host's e2fsprogs with their libraries, and guest/init
# Nothing is installed on the host: the kernel and busybox-static packages are fetched
# with `apt-get download` into OUTDIR/debs and unpacked with dpkg-deb (so a CI machine
# gets no kernel of its own, no initramfs hooks, no bootloader run). They are kept: a
# second run only repacks the initramfs (a second or two).
#
# Needs: apt-get (with package lists: apt-get update), dpkg-deb, python3, ldd,
# /usr/sbin/mke2fs and /usr/sbin/e2fsck (e2fsprogs).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/../build/guest}
mkdir -p "$OUT/debs"
OUT=$(cd "$OUT" && pwd)

die() {
    echo "build-initramfs: $*" >&2
    exit 1
}

for t in apt-get apt-cache dpkg-deb python3 ldd; do
    command -v "$t" >/dev/null 2>&1 || die "$t not found"
done
for t in /usr/sbin/mke2fs /usr/sbin/e2fsck; do
    [ -x "$t" ] || die "$t not found (apt-get install e2fsprogs)"
done

# ---- fetch and unpack the packages (once) ----
if [ ! -f "$OUT/debs/.done" ]; then
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
    [ -n "$kpkg" ] || die "no linux-image-amd64 in the package lists (run apt-get update)"
    rm -rf "$OUT/debs"
    mkdir -p "$OUT/debs"
    (cd "$OUT/debs" && apt-get download "$kpkg" busybox-static) >&2 ||
        die "apt-get download $kpkg busybox-static failed"
    mkdir -p "$OUT/debs/root"
    for d in "$OUT"/debs/*.deb; do
        dpkg-deb -x "$d" "$OUT/debs/root" || die "dpkg-deb -x $d failed"
    done
    touch "$OUT/debs/.done"
fi
R=$OUT/debs/root
kver=$(ls "$R/lib/modules" | head -1)
[ -n "$kver" ] && [ -f "$R/boot/vmlinuz-$kver" ] || die "no kernel in $R"
[ -x "$R/bin/busybox" ] || die "no busybox in $R"

# ---- the initramfs tree ----
S=$OUT/staging
rm -rf "$S"
mkdir -p "$S/bin" "$S/sbin" "$S/lib/modules" "$S/lib64" "$S/etc" "$S/proc" "$S/sys" \
    "$S/dev" "$S/mnt" "$S/tmp"
cp "$R/bin/busybox" "$S/bin/busybox"
cp "$HERE/init" "$S/init"
chmod 755 "$S/init"

# Modules in load order: each after what its modinfo 'depends=' names. The kernel's
# crc32c for ext4 comes from crc32c_generic (ext4 only has a soft dependency on it, and
# there is no modprobe in the guest to resolve it).
python3 - "$R/lib/modules/$kver" "$S/lib/modules" <<'EOF'
import os, re, shutil, sys
mdir, dest = sys.argv[1], sys.argv[2]
paths = {}
for root, _, files in os.walk(os.path.join(mdir, "kernel")):
    for f in files:
        if f.endswith(".ko"):
            paths[f[:-3].replace("-", "_")] = os.path.join(root, f)
builtin = set()
with open(os.path.join(mdir, "modules.builtin")) as fh:
    for line in fh:
        builtin.add(os.path.basename(line.strip())[:-3].replace("-", "_"))
order = []
def need(name):
    name = name.replace("-", "_")
    if name in order or name in builtin:
        return
    if name not in paths:
        sys.exit("module %s not found in %s" % (name, mdir))
    data = open(paths[name], "rb").read()
    m = re.search(rb"depends=([^\0]*)\0", data)
    for dep in (m.group(1).decode().split(",") if m else []):
        if dep:
            need(dep)
    order.append(name)
for want in ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"]:
    need(want)
for name in order:
    shutil.copy(paths[name], os.path.join(dest, name + ".ko"))
with open(os.path.join(dest, "order"), "w") as fh:
    fh.write("\n".join(order) + "\n")
EOF

# mke2fs and e2fsck with the shared libraries they load, at the host's paths (the loader
# finds them there without a cache).
for prog in /usr/sbin/mke2fs /usr/sbin/e2fsck; do
    cp "$prog" "$S/sbin/"
    ldd "$prog" | awk '/=> \// { print $3 } /^[ \t]*\/[^ ]*ld-linux/ { print $1 }' | while read -r lib; do
        mkdir -p "$S$(dirname "$lib")"
        cp -L "$lib" "$S$lib"
    done
done
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$S/etc/"

python3 - "$R/boot/vmlinuz-$kver" "$OUT/vmlinux" <<'EOF' || die "cannot unpack the kernel"
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")  # Debian builds x86 kernels with CONFIG_KERNEL_XZ
if start < 0:
    sys.exit("no xz stream in " + sys.argv[1])
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
if elf[:4] != b"\x7fELF":
    sys.exit("the xz stream is not an ELF kernel")
open(sys.argv[2], "wb").write(elf)
EOF
(cd "$S" && find . | LC_ALL=C sort | "$R/bin/busybox" cpio -o -H newc -R 0:0) > "$OUT/initramfs.tmp" ||
    die "cpio failed"
mv "$OUT/initramfs.tmp" "$OUT/initramfs"
echo "$kver" > "$OUT/kernel-version"
echo "build-initramfs: $OUT/vmlinux ($kver), $OUT/initramfs ($(wc -c < "$OUT/initramfs") bytes)"
