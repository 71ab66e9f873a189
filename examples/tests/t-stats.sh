#!/bin/sh
# qcowprov_get_stats against strace: a program runs a small workload, prints the
# library's host request counters and exits without closing; every fdatasync/fsync
# strace saw must be one the counters report, and every hole punched one discard.
# Needs strace and qemu-img (fails without them; .ci/run installs them).
. "$(dirname "$0")/lib.sh"

for pkg in strace:strace qemu-img:qemu-utils; do
    if ! command -v "${pkg%%:*}" > /dev/null 2>&1; then
        fail "${pkg%%:*} is installed (apt-get install -y ${pkg#*:})"
        finish
        exit 1
    fi
done

# count PATTERN FILE: lines of FILE matching PATTERN.
count() {
    grep -c -e "$1" "$2" || true
}

for opts in provision=off provision=full provision=metadata provision=thin provision=reuse \
    discard=unmap discard=unmap,discard-no-unref=on; do
    img=$T/$opts.qcow2
    qemu-img create -q -f qcow2 "$img" 8M
    if ! strace -f -qq -o "$T/trace" -e trace=fdatasync,fsync,fallocate,exit_group \
        "$BIN/stats-strace" "$img" "$opts" > "$T/out" 2> "$T/err"; then
        fail "$opts: stats-strace runs under strace" "$T/err"
        continue
    fi
    if ! grep -q 'exit_group(' "$T/trace"; then
        fail "$opts: strace traced the program to its end" "$T/trace"
        continue
    fi
    eval "$(sed 's/ /; /g' "$T/out")"
    traced_flushes=$(count 'fsync(\|fdatasync(' "$T/trace")
    punches=$(count 'fallocate(.*PUNCH_HOLE' "$T/trace")
    zero_calls=$(grep 'fallocate(' "$T/trace" | grep -v -c PUNCH_HOLE || true)
    # shellcheck disable=SC2154 # set by the eval
    if [ "$flushes" -gt 0 ] && [ "$flushes" -eq "$traced_flushes" ]; then
        pass "$opts: host_flushes $flushes = fdatasync/fsync calls"
    else
        fail "$opts: host_flushes $flushes = fdatasync/fsync calls ($traced_flushes)" "$T/trace"
    fi
    # shellcheck disable=SC2154
    if [ "$discards" -eq "$punches" ]; then
        pass "$opts: host_discards $discards = holes punched"
    else
        fail "$opts: host_discards $discards = holes punched ($punches)" "$T/trace"
    fi
    # Only an anchoring host layer zeroes; each request is at least one fallocate (the
    # first may probe FALLOC_FL_WRITE_ZEROES and fall back to ZERO_RANGE).
    want=0 got=0
    [ "$opts" = provision=full ] && want=1
    # shellcheck disable=SC2154
    [ "$zeroes" -gt 0 ] && got=1
    if [ "$zero_calls" -ge "$zeroes" ] && [ "$got" -eq "$want" ]; then
        pass "$opts: host_zeroes $zeroes (zeroing fallocate calls: $zero_calls)"
    else
        fail "$opts: host_zeroes $zeroes (zeroing fallocate calls: $zero_calls)" "$T/trace"
    fi
    if qemu-img check -q "$img" > "$T/check" 2>&1; then
        pass "$opts: qemu-img check clean"
    else
        fail "$opts: qemu-img check clean" "$T/check"
    fi
done
finish
