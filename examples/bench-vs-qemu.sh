#!/usr/bin/env bash
# Side-by-side performance of libqcowprov and QEMU on the same fresh images, in one run,
# printed as ratios (ours / QEMU's time; below 1 means faster). Run by hand, not by CI:
#
#   examples/bench-vs-qemu.sh [WORKDIR]        (needs qemu-img, qemu-io, /usr/bin/time)
#
# Environment: COUNT (requests per bench, default 100000), REPS (runs per case, the best
# is kept, default 3), SIZE_GB (image size, default 1).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
make -s -C "$here" >/dev/null
# The synchronous API, one thread per depth (what these rows have always measured; the
# asynchronous queue at depth has its own script, bench-aio.sh).
bench_sync() { "$here/build/qcowprov-bench" -i sync "$@"; }
BENCH=bench_sync
QIO=$here/build/qcowprov-io
COUNT=${COUNT:-100000}
REPS=${REPS:-3}
# Cached raw-limit reads cost ~0.4 µs each: ten times more of them keep the ratio out of
# the timer's and the scheduler's noise (O_DIRECT ones are slow enough with COUNT).
RAWCOUNT=$((COUNT * 10))
SIZE=${SIZE_GB:-1}G
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/qcowprov-bench.XXXXXX")}
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

. "$here/bench-lib.sh"

row() { # label ours qemu
    awk -v l="$1" -v a="$2" -v b="$3" 'BEGIN{printf "%-52s %9.3f %9.3f %7.2f\n", l, a, b, a/b}'
}

echo "images in $work, $COUNT requests per case, best of $REPS"
make_images "$SIZE"
fresh='cp "$work/empty-template.qcow2" "$work/empty.qcow2"'
copy='cp "$work/full.qcow2" "$work/over.qcow2"'

printf '%-52s %9s %9s %7s\n' "case (seconds)" "qcowprov" "qemu" "ratio"
for cache in writeback none; do
    c="-t $cache"
    row "4K seq read, allocated, d1, $cache" \
        "$(best "" "$BENCH" -c "$COUNT" -d 1 -s 4096 $c "$work/full.qcow2")" \
        "$(best "" qemu-img bench -f qcow2 -c "$COUNT" -d 1 -s 4096 $c "$work/full.qcow2")"
    row "4K stepped read (step 1M+4K), allocated, d1, $cache" \
        "$(best "" "$BENCH" -c "$COUNT" -d 1 -s 4096 -S 1052672 $c "$work/full.qcow2")" \
        "$(best "" qemu-img bench -f qcow2 -c "$COUNT" -d 1 -s 4096 -S 1052672 $c "$work/full.qcow2")"
    n=$((16384 * ${SIZE_GB:-1}))
    row "4K allocating write, step 64K, d1, $cache" \
        "$(best "$fresh" "$BENCH" -w -c "$n" -d 1 -s 4096 -S 65536 $c "$work/empty.qcow2")" \
        "$(best "$fresh" qemu-img bench -f qcow2 -w -c "$n" -d 1 -s 4096 -S 65536 $c "$work/empty.qcow2")"
    row "64K overwrite, allocated, d1, $cache" \
        "$(best "$copy" "$BENCH" -w -c "$n" -d 1 -s 65536 $c "$work/over.qcow2")" \
        "$(best "$copy" qemu-img bench -f qcow2 -w -c "$n" -d 1 -s 65536 $c "$work/over.qcow2")"
done

echo
echo "raw-file limit (same request loop, no qcow2 layer)"
printf '%-52s %9s %9s %7s\n' "case (seconds)" "ours" "limit" "ratio"
for cache in writeback none; do
    c="-t $cache"
    rc=$COUNT
    [ "$cache" = writeback ] && rc=$RAWCOUNT
    row "4K seq read: qcowprov qcow2 / qcowprov-bench -f raw, $cache" \
        "$(best "" "$BENCH" -c "$rc" -d 1 -s 4096 $c "$work/full.qcow2")" \
        "$(best "" "$BENCH" -f raw -c "$rc" -d 1 -s 4096 $c "$work/full.raw")"
    row "64K overwrite: qcowprov qcow2 / -f raw, $cache" \
        "$(best "$copy" "$BENCH" -w -c 16384 -d 1 -s 65536 $c "$work/over.qcow2")" \
        "$(best "" "$BENCH" -f raw -w -c 16384 -d 1 -s 65536 $c "$work/full.raw")"
    row "4K seq read: qemu-img bench -f raw / -f raw (ours), $cache" \
        "$(best "" qemu-img bench -f raw -c "$COUNT" -d 1 -s 4096 $c "$work/full.raw")" \
        "$(best "" "$BENCH" -f raw -c "$COUNT" -d 1 -s 4096 $c "$work/full.raw")"
done

echo
echo "scaling: allocated 4K stepped reads, DEPTH threads (ratio = d2 / d1; below 1 scales)"
d1=$(best "" "$BENCH" -c "$COUNT" -d 1 -s 4096 -S 1052672 "$work/full.qcow2")
d2=$(best "" "$BENCH" -c "$COUNT" -d 2 -s 4096 -S 1052672 "$work/full.qcow2")
row "qcowprov-bench d2 / d1" "$d2" "$d1"
r1=$(best "" "$BENCH" -f raw -c "$COUNT" -d 1 -s 4096 -S 1052672 "$work/full.raw")
r2=$(best "" "$BENCH" -f raw -c "$COUNT" -d 2 -s 4096 -S 1052672 "$work/full.raw")
row "qcowprov-bench -f raw d2 / d1 (the raw file's scaling)" "$r2" "$r1"

# qemu-io vs qcowprov-io on one command file.
timed() { # prints seconds of "$@" < stdin file $1
    local in=$1; shift
    local s e
    s=$(date +%s.%N)
    "$@" <"$in" >/dev/null
    e=$(date +%s.%N)
    awk -v s="$s" -v e="$e" 'BEGIN{printf "%.3f", e-s}'
}
# Best of REPS for a command-file replay on a fresh 32 MiB (or given) image.
replay() { # label cmdfile size qemu-opts ours-opts
    local label=$1 f=$2 size=$3 qo=$4 oo=$5 bq="" bo="" t
    for _ in $(seq "$REPS"); do
        qemu-img create -q -f qcow2 "$work/q.qcow2" "$size"
        qemu-img create -q -f qcow2 "$work/o.qcow2" "$size"
        t=$(timed "$f" qemu-io --image-opts "driver=qcow2,file.filename=$work/q.qcow2,$qo")
        if [ -z "$bq" ] || awk "BEGIN{exit !($t < $bq)}"; then bq=$t; fi
        t=$(timed "$f" "$QIO" -o "$oo" "$work/o.qcow2")
        if [ -z "$bo" ] || awk "BEGIN{exit !($t < $bo)}"; then bo=$t; fi
    done
    qemu-img compare -q "$work/q.qcow2" "$work/o.qcow2" || { echo "$label: images differ" >&2; exit 1; }
    row "$label" "$bo" "$bq"
}

echo
echo "command-file replays, qcowprov-io vs qemu-io (seconds, incl. process start)"
printf '%-52s %9s %9s %7s\n' "case" "qcowprov" "qemu-io" "ratio"
python3 - "$work" <<'EOF'
import random, sys
w = sys.argv[1]
K, M = 1024, 1024 * 1024
# Fragmentation workload: shuffled fill of a 32 MiB image, 150 x (discard 1 MiB + rewrite).
r = random.Random(42)
cl = list(range(512)); r.shuffle(cl)
with open(f"{w}/frag.cmds", "w") as f:
    for c in cl:
        f.write(f"write -q -P {c % 250 + 1} {c * 64 * K} {64 * K}\n")
    for i in range(150):
        off = r.randrange(0, 32 * M - M + 1, 64 * K)
        f.write(f"discard -q {off} {M}\nwrite -q -P {i % 250 + 1} {off} {M}\n")
# Mixed replay: 20,000 writes / discards / write-zeroes (with and without unmap) on 256 MiB.
r = random.Random(7)
with open(f"{w}/mixed.cmds", "w") as f:
    for i in range(20000):
        off = r.randrange(0, 256 * M - 256 * K, 4 * K)
        ln = r.choice([4 * K, 16 * K, 64 * K, 256 * K])
        k = r.random()
        if k < 0.55:
            f.write(f"write -q -P {i % 250 + 1} {off} {ln}\n")
        elif k < 0.8:
            f.write(f"discard -q {off} {ln}\n")
        elif k < 0.9:
            f.write(f"write -q -z {off} {ln}\n")
        else:
            f.write(f"write -q -z -u {off} {ln}\n")
EOF
replay "fragmentation, discard=unmap" "$work/frag.cmds" 32M "discard=unmap" "discard=unmap"
replay "fragmentation, discard-no-unref=on" "$work/frag.cmds" 32M \
    "discard=unmap,discard-no-unref=on" "discard=unmap,discard-no-unref=on"
replay "mixed 20k ops, discard=unmap" "$work/mixed.cmds" 256M "discard=unmap" "discard=unmap"
replay "mixed 20k ops, discard-no-unref=on" "$work/mixed.cmds" 256M \
    "discard=unmap,discard-no-unref=on" "discard=unmap,discard-no-unref=on"

echo
echo "peak RSS opening a 1 TiB image and reading across it (KiB)"
qemu-img create -q -f qcow2 "$work/huge.qcow2" 1T
qemu-io -c "write -q 0 64k" -c "write -q 512G 64k" -c "write -q 1023G 64k" "$work/huge.qcow2"
: >"$work/huge.cmds"
for i in $(seq 0 1023); do echo "read -q $((i * 1024 * 1024 * 1024)) 4k" >>"$work/huge.cmds"; done
rss() { /usr/bin/time -v "$@" <"$work/huge.cmds" 2>&1 >/dev/null | sed -n 's/.*Maximum resident set size (kbytes): //p'; }
rq=$(rss qemu-io "$work/huge.qcow2")
ro=$(rss "$QIO" "$work/huge.qcow2")
row "peak RSS qcowprov-io / qemu-io (KiB)" "$ro" "$rq"

echo
echo "open cost: open, read 4K, close; 1 TiB vs 1 GiB image (seconds, best of $REPS; ratio = 1T / 1G)"
qemu-img create -q -f qcow2 "$work/open1g.qcow2" 1G
qemu-img create -q -f qcow2 "$work/open1t.qcow2" 1T
for f in open1g open1t; do qemu-io -c "write -q 0 64k" "$work/$f.qcow2"; done
wall() { # best wall-clock seconds of REPS runs of a command
    local b=""
    for _ in $(seq "$REPS"); do
        local s e t
        s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N)
        t=$(awk -v s="$s" -v e="$e" 'BEGIN{print e - s}')
        if [ -z "$b" ] || awk "BEGIN{exit !($t < $b)}"; then b=$t; fi
    done
    echo "$b"
}
row "qcowprov-io 1T / 1G" "$(wall "$QIO" -c "read -q 0 4k" "$work/open1t.qcow2")" \
    "$(wall "$QIO" -c "read -q 0 4k" "$work/open1g.qcow2")"
row "qemu-io 1T / 1G" "$(wall qemu-io -c "read -q 0 4k" "$work/open1t.qcow2")" \
    "$(wall qemu-io -c "read -q 0 4k" "$work/open1g.qcow2")"

echo
# Thin provisioning without a flush per free: the engine's replay example (20,000 requests,
# 70% 4 KiB writes, 30% 64 KiB discards, 64 MiB image) in every policy, with the host
# flushes it issued, the quarantine releases and the file length; ratio to provision=metadata.
echo "thin-provisioning replay, every policy (qcow2-engine/examples/replay.rs)"
(cd "$(dirname "$0")/.." && cargo run -q --release -p qcow2-engine --example replay "$work" "$REPS")
