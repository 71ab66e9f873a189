#!/bin/sh
# qcowprov-bench: qemu-img bench's output lines, the data it writes (checked with
# qemu-io), qemu-img bench's offset wrapping, raw mode, O_DIRECT, flushes.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io

cd "$T" || exit 1

# bench NAME EXPECTED_FIRST_LINE ARGS...: run, compare the first line, require
# "Run completed in X.XXX seconds." last.
bench() {
    name=$1 first=$2
    shift 2
    if ! "$BENCH" "$@" > out 2> err; then
        if [ -n "${DIRECT_MAY_FAIL:-}" ] && grep -q -i 'invalid argument' err; then
            skip "$name" "O_DIRECT is not supported on this filesystem"
            return 1
        fi
        fail "$name" "exited non-zero" err
        return 1
    fi
    if [ "$(sed -n 1p out)" != "$first" ]; then
        fail "$name" "first line: $(sed -n 1p out)" "expected:   $first"
        return 1
    fi
    if ! tail -1 out | grep -q '^Run completed in [0-9]*\.[0-9][0-9][0-9] seconds\.$'; then
        fail "$name" "last line: $(tail -1 out)"
        return 1
    fi
    return 0
}

qemu-img create -q -f qcow2 b.qcow2 16M

if bench "write 1000 x 4k, depth 4" \
    "Sending 1000 write requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 4096)" \
    -w -c 1000 -d 4 --pattern=0x5a b.qcow2; then
    if qemu-io -c 'read -P 0x5a 0 4096000' -c 'read -P 0 4096000 12681216' b.qcow2 > v.out 2>&1 &&
        qemu-img check b.qcow2 > c.out 2>&1; then
        pass "write 1000 x 4k, depth 4: data and image check out"
    else
        fail "write 1000 x 4k, depth 4: data or check" v.out c.out
    fi
fi

bench "read defaults" \
    "Sending 75000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)" \
    b.qcow2 && pass "read defaults"

bench "read with step and offset" \
    "Sending 300 read requests, 65536 bytes each, 3 in parallel (starting at offset 1048576, step size 131072)" \
    -c 300 -d 3 -s 64k -S 128k -o 1M b.qcow2 && pass "read with step and offset"

# qemu-img bench's wrapping: offset (i * step) % (image size - request size).
# 4M image, 1M requests, 1M step: 0, 1M, 2M, 0, 1M, 2M, ...: the last 1M is never written.
qemu-img create -q -f qcow2 w.qcow2 4M
if bench "wrap at the end (-w -c 10 -s 1M)" \
    "Sending 10 write requests, 1048576 bytes each, 1 in parallel (starting at offset 0, step size 1048576)" \
    -w -c 10 -d 1 -s 1M --pattern=7 w.qcow2; then
    if qemu-io -c 'read -P 7 0 3M' -c 'read -P 0 3M 1M' w.qcow2 > v.out 2>&1; then
        pass "wrap at the end: offsets follow qemu-img bench"
    else
        fail "wrap at the end: offsets follow qemu-img bench" v.out
    fi
fi

qemu-img create -q -f raw r.raw 16M
if bench "raw write" \
    "Sending 500 write requests, 8192 bytes each, 8 in parallel (starting at offset 0, step size 8192)" \
    -f raw -w -c 500 -d 8 -s 8k --pattern=9 r.raw; then
    if qemu-io -f raw -c 'read -P 9 0 4096000' -c 'read -P 0 4096000 12681216' r.raw > v.out 2>&1; then
        pass "raw write: data checks out"
    else
        fail "raw write: data checks out" v.out
    fi
fi

DIRECT_MAY_FAIL=1
bench "raw read, O_DIRECT" \
    "Sending 2000 read requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 4096)" \
    -f raw -t none -c 2000 -d 4 r.raw && pass "raw read, O_DIRECT"
if bench "qcow2 write, O_DIRECT, flushes" \
    "Sending 512 write requests, 65536 bytes each, 4 in parallel (starting at offset 0, step size 65536)" \
    -t none -w -c 512 -d 4 -s 64k --flush-interval=64 --pattern=3 b.qcow2; then
    if sed -n 2p out | grep -q 'flush every 64' && qemu-io -c 'read -P 3 0 16711680' b.qcow2 > v.out 2>&1 &&
        qemu-img check b.qcow2 > c.out 2>&1; then
        pass "qcow2 write, O_DIRECT, flushes: data and image check out"
    else
        fail "qcow2 write, O_DIRECT, flushes" out v.out c.out
    fi
fi
DIRECT_MAY_FAIL=

# The header lines are qemu-img bench's, word for word.
cp b.qcow2 q.qcow2
for args in "-c 300 -d 3 -s 64k -S 128k -o 1M" "-w -c 64 -d 4 --flush-interval=8 --pattern=1"; do
    # shellcheck disable=SC2086
    qemu-img bench $args q.qcow2 2>&1 | sed '$d' > q.head
    # shellcheck disable=SC2086
    "$BENCH" $args q.qcow2 2>&1 | sed '$d' > o.head
    if cmp -s q.head o.head; then
        pass "header lines as qemu-img bench $args"
    else
        fail "header lines as qemu-img bench $args" q.head o.head
    fi
done

if "$BENCH" -q -c 10 b.qcow2 > out 2>&1 && [ ! -s out ]; then
    pass "-q prints nothing"
else
    fail "-q prints nothing" out
fi

finish
