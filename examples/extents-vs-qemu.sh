#!/usr/bin/env bash
# What new clusters look like on the host file (issue 12, item 6): the same random 4 KiB
# writes go to a fresh image through qemu-io and through qcowprov-io in each policy, then
# each file is measured: its length, its blocks, its extents (filefrag), how many clusters
# the qcow2 layer calls allocated, and how many of those have a hole on the host (QEMU
# allocates a new cluster whole; host-`unmap` modes may keep the holes). Also iotest 033's
# case: the file length after one 512-byte write into a new cluster. Run by hand:
#
#   examples/extents-vs-qemu.sh [WORKDIR]   (needs qemu-img, qemu-io, filefrag, python3)
#
# Environment: WRITES (default 6000), SIZE_MB (default 256), SEED (default 12).
# Columns: "extents" is filefrag's count (physically discontiguous runs of the file);
# "with holes" counts clusters the qcow2 layer calls allocated that are not wholly
# allocated on the host. Default policy is provision=metadata (host layer unmap).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
make -s -C "$here" >/dev/null 2>&1 || { echo "$0: make -C examples failed" >&2; exit 1; }
QIO=$here/build/qcowprov-io
WRITES=${WRITES:-6000}
SIZE_MB=${SIZE_MB:-256}
SEED=${SEED:-12}
for t in qemu-img qemu-io filefrag python3; do
    command -v "$t" >/dev/null || { echo "$0: needs $t" >&2; exit 1; }
done
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/qcowprov-extents.XXXXXX")}
mkdir -p "$work"
[ -n "${1:-}" ] || trap 'rm -rf "$work"' EXIT

# The write commands, 4 KiB aligned, seeded (the same list for every run).
python3 - "$WRITES" "$SIZE_MB" "$SEED" > "$work/cmds" <<'EOF'
import random, sys
n, size_mb, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
for i in range(n):
    print("write -q -P %d %d 4096" % (i % 251 + 1, r.randrange(size_mb * 256) * 4096))
EOF

# Allocated clusters (qemu-img map) and how many of them are not wholly allocated on the
# host (FIEMAP through filefrag -v: written or unwritten extents count as allocated).
holes() {
    python3 - "$1" <<'EOF'
import json, re, subprocess, sys
img = sys.argv[1]
m = json.loads(subprocess.check_output(["qemu-img", "map", "--output=json", img]))
info = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", img]))
cs = info["cluster-size"]
out = subprocess.check_output(["filefrag", "-v", "-b4096", img], text=True)
have = set()
for line in out.splitlines():
    e = re.match(r"\s*\d+:\s+(\d+)\.\.\s*(\d+):", line)
    if e:
        have.update(range(int(e.group(1)), int(e.group(2)) + 1))
clusters = set()
for e in m:
    if "offset" in e:
        for k in range(max(1, e["length"] // cs)):
            clusters.add((e["offset"] + k * cs) // cs * cs)
holey = [c for c in clusters if any(b not in have for b in range(c // 4096, (c + cs) // 4096))]
print(len(clusters), len(holey))
EOF
}

row() { # NAME IMAGE
    local len blocks ext ch
    len=$(stat -c %s "$2")
    blocks=$(( $(stat -c %b "$2") * 512 / 1024 ))
    ext=$(filefrag "$2" | sed -n 's/.*: \([0-9]*\) extents\{0,1\} found/\1/p')
    ch=$(holes "$2")
    qemu-img check -q "$2" || { echo "$1: qemu-img check failed" >&2; exit 1; }
    printf '%-22s %12s %10s %8s %10s %12s %s\n' "$1" "$len" "$blocks" "$ext" "${ch% *}" "${ch#* }" \
        "$( [ $((len % 65536)) -eq 0 ] && echo yes || echo no)"
}

echo "$WRITES random 4 KiB writes on a ${SIZE_MB} MiB image (64 KiB clusters), seed $SEED; $(uname -r), $(df -T "$work" | awk 'NR==2{print $2}')"
printf '%-22s %12s %10s %8s %10s %12s %s\n' "writer" "file bytes" "KiB used" "extents" "clusters" "with holes" "cluster-aligned end"
run() { # NAME OPTIONS(or "qemu")
    local img=$work/$1.qcow2
    rm -f "$img"
    qemu-img create -q -f qcow2 "$img" "${SIZE_MB}M"
    if [ "$2" = qemu ]; then
        qemu-io -f qcow2 "$img" < "$work/cmds" >/dev/null
    elif [ -z "$2" ]; then
        "$QIO" "$img" < "$work/cmds" >/dev/null
    else
        "$QIO" -o "$2" "$img" < "$work/cmds" >/dev/null
    fi
    row "$1" "$img"
}
run qemu-io qemu
run default ""
run discard=unmap "discard=unmap"
for p in off full metadata thin reuse; do
    run "provision=$p" "provision=$p"
done

echo
echo "iotest 033: file length after a 512-byte write at offset 0 of a fresh 128 MiB image"
for w in qemu-io default provision=off provision=full provision=metadata provision=thin provision=reuse; do
    img=$work/w33.qcow2
    rm -f "$img"
    qemu-img create -q -f qcow2 "$img" 128M
    case $w in
        qemu-io) echo "write -q 0 512" | qemu-io -f qcow2 "$img" >/dev/null ;;
        default) "$QIO" -c "write -q 0 512" "$img" >/dev/null ;;
        *) "$QIO" -o "$w" -c "write -q 0 512" "$img" >/dev/null ;;
    esac
    printf '%-22s %8s\n' "$w" "$(stat -c %s "$img")"
done
