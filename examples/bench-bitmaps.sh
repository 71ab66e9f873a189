#!/usr/bin/env bash
# The cost of maintaining a persistent dirty bitmap (issue 17), in one run, as ratios:
# random 4 KiB writes (qcowprov-bench --random, depth 1 and 16, a guest flush every
# FLUSH requests) on an image without bitmaps, on the same image with a freshly cleared
# bitmap (every write-intent chunk is armed on first touch: one durable bitmap write
# before the data), and again once the bits are set (nothing to arm), against a second
# run without bitmaps. Each image is allocated first (preallocation=metadata), so the
# runs time overwrites, not cluster allocation. Run by hand, not by CI:
#
#   examples/bench-bitmaps.sh [WORKDIR]        (needs qemu-img)
#
# Environment: COUNT (requests per run, default 40000), REPS (runs per case, the best is
# kept, default 3), SIZE (image size, default 1G), GRAN (bitmap granularities, default
# "65536 4096"), FLUSH (flush interval, default 256).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
make -s -C "$here" >/dev/null
BENCH=$here/build/qcowprov-bench
IMG=$here/build/qcowprov-img
COUNT=${COUNT:-40000}
REPS=${REPS:-3}
SIZE=${SIZE:-1G}
GRAN=${GRAN:-65536 4096}
FLUSH=${FLUSH:-256}
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/qcowprov-bmbench.XXXXXX")}
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

. "$here/bench-lib.sh"

# run IMAGE DEPTH: one timed bench run (seconds).
run() {
    local t
    t=$("$BENCH" -i sync -w --random -c "$COUNT" -d "$2" --flush-interval="$FLUSH" "$1" | secs)
    [ -n "$t" ] || { echo "no timing from the bench on $1" >&2; exit 1; }
    echo "$t"
}

base=$work/base.qcow2
qemu-img create -q -f qcow2 -o preallocation=metadata "$base" "$SIZE"
printf '%-20s %5s %9s %9s %9s %9s %8s %8s\n' case depth "none 1st" "cleared" "none 2nd" "set" \
    cleared/none set/none
for g in $GRAN; do
    for depth in 1 16; do
        none="" cleared="" none2="" set=""
        for _ in $(seq "$REPS"); do
            # The same image state for both: a copy of the allocated base; the second
            # run writes the same offsets again (the bits are set then).
            cp --sparse=always "$base" "$work/a.qcow2"
            cp --sparse=always "$base" "$work/b.qcow2"
            "$IMG" bitmap --add -g "$g" "$work/b.qcow2" b
            none=$(min "$none" "$(run "$work/a.qcow2" "$depth")")
            cleared=$(min "$cleared" "$(run "$work/b.qcow2" "$depth")")
            none2=$(min "$none2" "$(run "$work/a.qcow2" "$depth")")
            set=$(min "$set" "$(run "$work/b.qcow2" "$depth")")
        done
        qemu-img check -q "$work/b.qcow2"
        printf '%-20s %5d %9.3f %9.3f %9.3f %9.3f %8.3f %8.3f\n' "granularity $g" "$depth" \
            "$none" "$cleared" "$none2" "$set" \
            "$(awk "BEGIN{print $cleared / $none}")" "$(awk "BEGIN{print $set / $none2}")"
    done
done
