#!/usr/bin/env bash
# The same qcow2 image served by qemu-nbd and by nbdkit with the qcowprov plugin, driven by
# the same client over a unix socket, in one run. Printed as speed-ups: qemu-nbd's time /
# the plugin's (above 1 means the plugin is faster). Run by hand, not by CI:
#
#   examples/bench-vs-qemu-nbd.sh [WORKDIR]    (needs qemu-img, qemu-io, qemu-nbd, nbdkit)
#
# Cases: `qemu-img bench -f raw nbd+unix://...` at depth 1 and 16 (4 KiB reads of
# allocated data, 4 KiB overwrites, 4 KiB allocating writes one per cluster), and a
# discard-heavy replay (20,000 writes / discards / write-zeroes) through qemu-io over NBD.
# nbdkit's own cost is shown by its file plugin on a raw copy of the same data, beside
# qemu-nbd serving that raw file, and the replay's transport floor by nbdkit's memory plugin.
#
# Environment: COUNT (requests per bench, default 100000), REPS (runs per case, best kept,
# default 3), SIZE_GB (image size, default 1), CASES (all, or replay for the replay only).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
make -s -C "$here" all plugin >/dev/null
PLUGIN=$here/build/nbdkit-qcowprov-plugin.so
COUNT=${COUNT:-100000}
REPS=${REPS:-3}
SIZE=${SIZE_GB:-1}G
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/qcowprov-nbdbench.XXXXXX")}
mkdir -p "$work"
sock=$work/nbd.sock
uri="nbd+unix:///?socket=$sock"
pid=""
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

wait_socket() {
    for _ in $(seq 200); do
        [ -S "$sock" ] && return 0
        sleep 0.05
    done
    echo "server did not start" >&2
    exit 1
}
# serve KIND IMAGE OPTIONS: start a server on $sock (kinds: ours, qemu, nbdkit-file, qemu-raw)
serve() {
    rm -f "$sock"
    case $1 in
        ours) nbdkit -f -U "$sock" "$PLUGIN" file="$2" ${3:+options="$3"} & ;;
        qemu) qemu-nbd -t -k "$sock" --image-opts "driver=qcow2,file.filename=$2${3:+,$3}" & ;;
        nbdkit-file) nbdkit -f -U "$sock" file file="$2" & ;;
        nbdkit-memory) nbdkit -f -U "$sock" memory 256M & ;;
        qemu-raw) qemu-nbd -t -k "$sock" -f raw "$2" & ;;
    esac
    pid=$!
    wait_socket
}
stop() {
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    pid=""
}

. "$here/bench-lib.sh"

# served KIND OPTIONS BENCH_ARGS...: one qemu-img bench run against a server of KIND on
# $work/img (its output; the server lives only for the run).
served() {
    local kind=$1 opts=$2
    shift 2
    serve "$kind" "$work/img" "$opts"
    qemu-img bench -f raw "$@" "$uri"
    stop
}
# bench_one KIND IMAGE_CMD OPTIONS BENCH_ARGS...: best of REPS; IMAGE_CMD prepares $work/img
bench_one() {
    local kind=$1 prep=$2 opts=$3
    shift 3
    best "$prep" served "$kind" "$opts" "$@"
}

row() { # label ours qemu
    awk -v l="$1" -v a="$2" -v b="$3" 'BEGIN{printf "%-46s %9.3f %9.3f %8.2fx\n", l, a, b, b/a}'
}

echo "images in $work, $COUNT requests per bench case, best of $REPS"
make_images "$SIZE"
full='cp "$work/full.qcow2" "$work/img"'
fresh='cp "$work/empty-template.qcow2" "$work/img"'
raw='cp "$work/full.raw" "$work/img"'
n=$((16384 * ${SIZE_GB:-1}))

if [ "${CASES:-all}" = all ]; then
printf '%-46s %9s %9s %9s\n' "case (seconds)" "plugin" "qemu-nbd" "speed-up"
for d in 1 16; do
    row "4K reads, allocated, depth $d" \
        "$(bench_one ours "$full" "" -c "$COUNT" -d "$d" -s 4096)" \
        "$(bench_one qemu "$full" "" -c "$COUNT" -d "$d" -s 4096)"
    row "4K overwrites, allocated, depth $d" \
        "$(bench_one ours "$full" "" -w -c "$COUNT" -d "$d" -s 4096)" \
        "$(bench_one qemu "$full" "" -w -c "$COUNT" -d "$d" -s 4096)"
    row "4K allocating writes (step 64K), depth $d" \
        "$(bench_one ours "$fresh" "" -w -c "$n" -d "$d" -s 4096 -S 65536)" \
        "$(bench_one qemu "$fresh" "" -w -c "$n" -d "$d" -s 4096 -S 65536)"
done

echo
echo "nbdkit's own cost: its file plugin and qemu-nbd -f raw on a raw copy of the data"
printf '%-46s %9s %9s %9s\n' "case (seconds)" "nbdkit" "qemu-nbd" "speed-up"
for d in 1 16; do
    row "4K reads, raw file, depth $d" \
        "$(bench_one nbdkit-file "$raw" "" -c "$COUNT" -d "$d" -s 4096)" \
        "$(bench_one qemu-raw "$raw" "" -c "$COUNT" -d "$d" -s 4096)"
    row "4K overwrites, raw file, depth $d" \
        "$(bench_one nbdkit-file "$raw" "" -w -c "$COUNT" -d "$d" -s 4096)" \
        "$(bench_one qemu-raw "$raw" "" -w -c "$COUNT" -d "$d" -s 4096)"
done
fi

echo
# qemu-io's default cache mode is writethrough: every write would carry FUA and both
# servers would spend the replay in fdatasync. -t writeback measures the servers' work.
echo "discard-heavy replay through qemu-io -t writeback over NBD (seconds, one qemu-io process)"
printf '%-46s %9s %9s %9s\n' "case" "plugin" "qemu-nbd" "speed-up"
python3 - "$work" <<'EOF'
import random, sys
w = sys.argv[1]
K, M = 1024, 1024 * 1024
# 20,000 writes / discards / write-zeroes (with and without unmap) on 256 MiB, as in
# bench-vs-qemu.sh's mixed replay.
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
replay() { # label options (the same for both servers)
    local label=$1 opts=$2 bq="" bo="" s e t
    for _ in $(seq "$REPS"); do
        for kind in qemu ours; do
            qemu-img create -q -f qcow2 "$work/$kind.qcow2" 256M
            serve "$kind" "$work/$kind.qcow2" "$opts"
            s=$(date +%s.%N)
            qemu-io -t writeback -f raw "$uri" < "$work/mixed.cmds" > /dev/null
            e=$(date +%s.%N)
            stop
            t=$(awk -v s="$s" -v e="$e" 'BEGIN{printf "%.3f", e-s}')
            if [ "$kind" = qemu ]; then
                if [ -z "$bq" ] || awk "BEGIN{exit !($t < $bq)}"; then bq=$t; fi
            else
                if [ -z "$bo" ] || awk "BEGIN{exit !($t < $bo)}"; then bo=$t; fi
            fi
        done
    done
    qemu-img compare -q "$work/qemu.qcow2" "$work/ours.qcow2" || { echo "$label: images differ" >&2; exit 1; }
    qemu-img check -q "$work/ours.qcow2" || { echo "$label: check not clean" >&2; exit 1; }
    row "$label" "$bo" "$bq"
}
replay "mixed 20k ops, discard=unmap" discard=unmap
replay "mixed 20k ops, discard-no-unref=on" discard=unmap,discard-no-unref=on

# The replay is one request in flight at a time: its floor is the round trip through
# qemu-io, the socket and nbdkit. nbdkit's memory plugin (RAM, no qcow2, no file) shows it.
b=""
for _ in $(seq "$REPS"); do
    serve nbdkit-memory - ""
    s=$(date +%s.%N)
    qemu-io -t writeback -f raw "$uri" < "$work/mixed.cmds" > /dev/null
    e=$(date +%s.%N)
    stop
    t=$(awk -v s="$s" -v e="$e" 'BEGIN{printf "%.3f", e-s}')
    if [ -z "$b" ] || awk "BEGIN{exit !($t < $b)}"; then b=$t; fi
done
printf '%-46s %9.3f  (nbdkit memory plugin: the transport floor)\n' "mixed 20k ops, no storage" "$b"
