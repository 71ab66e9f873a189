#!/bin/sh
# The asynchronous API from C (tests/api-aio.c) on both backends: an event loop with 32
# requests in flight, bad submissions, O_DIRECT alignment, a callback, close with
# requests in flight. The image it leaves passes qemu-img check, and reads as a twin
# that qemu-io wrote with the same requests (those of the close test excepted: they
# may have been cancelled, so that range is compared separately against 0x11 or the
# twin). The event loop and the callback also run under valgrind (threads backend:
# valgrind does not see io_uring's kernel writes).
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io valgrind

for aio in io_uring threads; do
    mkdir -p "$T/$aio"
    "$BIN/api-aio" "$T/$aio" "$aio" > "$T/$aio.out" 2>&1
    rc=$?
    counts_from "$T/$aio.out"
    if [ "$rc" -ne 0 ] && [ "$FAILS" -eq 0 ]; then
        fail "api-aio $aio exited $rc" "$T/$aio.out"
    fi
    img="$T/$aio/aio.qcow2"
    if qemu-img check "$img" > "$T/check.out" 2>&1; then
        pass "$aio: qemu-img check after the async run"
    else
        fail "$aio: qemu-img check after the async run" "$T/check.out"
    fi
    twin="$T/$aio/twin.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$twin" 8M
    if qemu-io --image-opts "driver=qcow2,discard=unmap,file.filename=$twin" < "$T/$aio/cmds" > "$T/qio.out" 2>&1 &&
        ! grep -q failed "$T/qio.out"; then
        pass "$aio: qemu-io replays the requests"
    else
        fail "$aio: qemu-io replays the requests" "$T/qio.out"
    fi
    # The last 256 KiB took the close test's writes (done or cancelled): compare the rest.
    if qemu-img compare -U "$T/$aio/aio.qcow2" "$twin" > "$T/cmp.out" 2>&1 ||
        python3 - "$img" "$twin" > "$T/cmp.out" 2>&1 <<'PY'
import subprocess, sys
def raw(p):
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", p, p + ".raw"], check=True)
    return open(p + ".raw", "rb").read()
a, b = raw(sys.argv[1]), raw(sys.argv[2])
cut = len(a) - 64 * 4096
assert a[:cut] == b[:cut], "the images differ before the close test's range"
for i in range(64):
    x, y = a[cut + i * 4096: cut + (i + 1) * 4096], b[cut + i * 4096: cut + (i + 1) * 4096]
    assert x == y or x == b"\x11" * 4096, f"block {i} of the close test holds neither its old data nor the write"
PY
    then
        pass "$aio: the image reads as qemu-io's twin"
    else
        fail "$aio: the image reads as qemu-io's twin" "$T/cmp.out"
    fi
done

mkdir -p "$T/vg"
if valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
    --show-leak-kinds=definite,indirect --log-file="$T/vg.log" "$BIN/api-aio" "$T/vg" threads \
    > "$T/vg.out" 2>&1 && [ ! -s "$T/vg.log" ]; then
    pass "api-aio threads under valgrind"
else
    fail "api-aio threads under valgrind" "$T/vg.log" "$T/vg.out"
fi
finish
