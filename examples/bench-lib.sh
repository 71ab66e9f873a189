# Shared by the side-by-side benchmarks (bench-*.sh). Source it after setting $work and
# $REPS: . "$here/bench-lib.sh"

# "Run completed in X seconds." (qemu-img bench, qcowprov-bench) -> X
secs() { sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p'; }

# min A B: the smaller number (A may be empty).
min() { if [ -z "$1" ] || awk "BEGIN{exit !($2 < $1)}"; then echo "$2"; else echo "$1"; fi; }

# best PREP CMD...: the shortest of $REPS timed runs of CMD (seconds); PREP is evaluated
# before each run ("" for nothing). CMD may be a shell function printing a bench's output.
best() {
    local prep=$1 b="" t
    shift
    for _ in $(seq "$REPS"); do
        [ -n "$prep" ] && eval "$prep"
        t=$("$@" | secs)
        [ -n "$t" ] || { echo "no timing from: $*" >&2; exit 1; }
        b=$(min "$b" "$t")
    done
    echo "$b"
}

# make_images SIZE: in $work, full.qcow2 (every byte written by qemu-io), full.raw (its raw
# copy) and empty-template.qcow2 (a fresh image to copy before allocating runs).
make_images() {
    qemu-img create -q -f qcow2 "$work/full.qcow2" "$1"
    qemu-io -c "write -q -P 0x5a 0 $1" "$work/full.qcow2"
    qemu-img convert -O raw "$work/full.qcow2" "$work/full.raw"
    qemu-img create -q -f qcow2 "$work/empty-template.qcow2" "$1"
}
