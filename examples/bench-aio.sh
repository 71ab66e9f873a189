#!/usr/bin/env bash
# Asynchronous I/O at queue depth, side by side in one run (run by hand, not by CI):
#
#   examples/bench-aio.sh [WORKDIR]     (needs qemu-img, qemu-io, fio, /usr/bin/time)
#
# - the limit: fio (ioengine=io_uring, direct=1), 4 KiB random reads at depth 32, on the
#   raw copy of the image and on the image file itself, against qcowprov-bench -t none
#   -i io_uring -d 32 --random on the qcow2 image (all allocated);
# - the peer: qemu-img bench -t none -i io_uring -d 32 on the same images (offsets
#   scattered by a large prime step, as qemu-img bench takes them): reads,
#   overwrites of allocated data, allocating writes on a fresh image (4 KiB into every
#   64 KiB cluster);
# - depth scaling 1, 4, 16, 32, 64 for reads and allocating writes, with CPU time per
#   request (user+sys of the whole process / requests).
# Figures are IOPS; ratios are ours / theirs (above 1: we are faster).
# Environment: COUNT (requests per case, default 50000), SIZE_GB (default 1).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
make -s -C "$here" >/dev/null
BENCH=$here/build/qcowprov-bench
COUNT=${COUNT:-50000}
SIZE=${SIZE_GB:-1}G
STEP=$((4096 * 7919))
# Allocating writes: 4 KiB at every 64 KiB cluster, each allocating one, never wrapping.
ACOUNT=$((${SIZE_GB:-1} * 16384 - 1))
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/qcowprov-aio.XXXXXX")}
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
. "$here/bench-lib.sh"
for t in qemu-img qemu-io fio; do
    command -v $t >/dev/null || { echo "bench-aio: $t is required" >&2; exit 1; }
done

# run CMD...: "IOPS CPU_US_PER_REQUEST" from "Run completed in X seconds." and time(1).
run() {
    local out t cpu
    out=$(/usr/bin/time -f 'CPU %U %S' "$@" 2>&1)
    t=$(echo "$out" | secs)
    cpu=$(echo "$out" | awk '/^CPU/ {print $2 + $3}')
    [ -n "$t" ] || { echo "no timing from: $* ($out)" >&2; exit 1; }
    awk -v n="${N:-$COUNT}" -v t="$t" -v c="$cpu" 'BEGIN{printf "%.0f %.2f", n / t, c * 1e6 / n}'
}

row() { # label ours theirs (IOPS first fields)
    awk -v l="$1" -v a="${2%% *}" -v b="${3%% *}" \
        'BEGIN{printf "%-48s %9d %9d %6.2f\n", l, a, b, a / b}'
}

echo "images in $work, $COUNT requests per case, one run"
make_images "$SIZE"
# sync: O_DIRECT runs right after a copy would pay for its dirty page cache.
fresh() { cp "$work/empty-template.qcow2" "$work/empty.qcow2"; sync; }
sync

# pair LABEL: ours() against theirs(), alternating, three times each; the best of each
# (the machine is shared: the best run is the one least disturbed).
pair() {
    local a b ba=0 bb=0
    for _ in 1 2 3; do
        a=$(ours) && b=$(theirs)
        ba=$(awk -v x="${a%% *}" -v y="$ba" 'BEGIN{print (x > y ? x : y)}')
        bb=$(awk -v x="${b%% *}" -v y="$bb" 'BEGIN{print (x > y ? x : y)}')
    done
    row "$1" "$ba" "$bb"
}
fio_read() { # FILE: IOPS of fio's 4 KiB random reads at depth 32, O_DIRECT, io_uring
    fio --name=r --filename="$1" --ioengine=io_uring --direct=1 --rw=randread --bs=4k \
        --iodepth=32 --number_ios="$COUNT" --size="$SIZE" --output-format=terse \
        --terse-version=3 | awk -F';' '{print $8}'
}

printf '%-48s %9s %9s %6s\n' "case (IOPS, best of 3 alternating)" "qcowprov" "other" "ratio"
# fio reads random offsets: ours too (--random) for this pair. Two limits: the raw copy
# (as asked), and the qcow2 file itself read as raw (the same blocks of the same file:
# a copy can sit on faster or slower parts of the host's storage, by 1.5x here).
ours() { run "$BENCH" -t none -i io_uring -d 32 -c "$COUNT" --random "$work/full.qcow2"; }
theirs() { fio_read "$work/full.raw"; }
pair "4K random read d32 O_DIRECT vs fio, raw copy"
theirs() { fio_read "$work/full.qcow2"; }
pair "4K random read d32 O_DIRECT vs fio, same file"
ours() { run "$BENCH" -t none -i io_uring -d 32 -c "$COUNT" -S "$STEP" "$work/full.qcow2"; }
theirs() { run qemu-img bench -f qcow2 -t none -i io_uring -d 32 -c "$COUNT" -S "$STEP" "$work/full.qcow2"; }
pair "4K read d32 vs qemu-img bench"
cp "$work/full.qcow2" "$work/over.qcow2"
sync
ours() { run "$BENCH" -w -t none -i io_uring -d 32 -c "$COUNT" -S "$STEP" "$work/over.qcow2"; }
theirs() { run qemu-img bench -w -f qcow2 -t none -i io_uring -d 32 -c "$COUNT" -S "$STEP" "$work/over.qcow2"; }
pair "4K overwrite d32 vs qemu-img bench"
ours() {
    fresh
    N=$ACOUNT run "$BENCH" -w -t none -i io_uring -d 32 -c "$ACOUNT" -S 65536 "$work/empty.qcow2"
    qemu-img check -q "$work/empty.qcow2" >&2
}
theirs() {
    fresh
    N=$ACOUNT run qemu-img bench -w -f qcow2 -t none -i io_uring -d 32 -c "$ACOUNT" -S 65536 "$work/empty.qcow2"
}
pair "4K allocating write d32 vs qemu-img bench"
rm -f "$work/empty.qcow2"
qemu-img check -q "$work/over.qcow2"

echo
printf '%-6s %-10s %9s %9s %6s %12s %12s\n' depth case ours qemu ratio "us CPU/req" "qemu us/req"
for d in 1 4 16 32 64; do
    o=$(run "$BENCH" -t none -i io_uring -d "$d" -c "$COUNT" -S "$STEP" "$work/full.qcow2")
    q=$(run qemu-img bench -f qcow2 -t none -i io_uring -d "$d" -c "$COUNT" -S "$STEP" "$work/full.qcow2")
    awk -v d="$d" -v o="$o" -v q="$q" 'BEGIN{split(o,a," "); split(q,b," ");
        printf "%-6s %-10s %9d %9d %6.2f %12.2f %12.2f\n", d, "read", a[1], b[1], a[1]/b[1], a[2], b[2]}'
    fresh
    o=$(N=$ACOUNT run "$BENCH" -w -t none -i io_uring -d "$d" -c "$ACOUNT" -S 65536 "$work/empty.qcow2")
    fresh
    q=$(N=$ACOUNT run qemu-img bench -w -f qcow2 -t none -i io_uring -d "$d" -c "$ACOUNT" -S 65536 "$work/empty.qcow2")
    awk -v d="$d" -v o="$o" -v q="$q" 'BEGIN{split(o,a," "); split(q,b," ");
        printf "%-6s %-10s %9d %9d %6.2f %12.2f %12.2f\n", d, "alloc 4K", a[1], b[1], a[1]/b[1], a[2], b[2]}'
done
