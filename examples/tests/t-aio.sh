#!/bin/sh
# The asynchronous API from C on both backends: tests/api-aio.c (an event loop with 32
# requests in flight, bad submissions, O_DIRECT alignment, a callback, close with
# requests in flight) and tests/api-aio-bad.c (every bad or edge-case submission the
# header documents: NULL arguments, past-end and overflowing ranges, zero-length
# requests, a full queue, unaligned O_DIRECT, a closed handle, close with requests
# unreaped or a callback resubmitting). The images they leave pass qemu-img check;
# api-aio's reads as a twin that qemu-io wrote with the same requests (those of the
# close test excepted: they may have been cancelled, so that range is compared
# separately against 0x11 or the twin).
#
# Memory checking: both programs run under valgrind on the threads backend, and, built
# with -fsanitize=address against the same libqcowprov.so, under AddressSanitizer on
# the io_uring backend. Valgrind cannot run the io_uring backend: valgrind 3.19
# (Debian 12) passes io_uring_enter through as a syscall that does not block, so the
# queue's thread keeps valgrind's big lock while it waits in the kernel for
# completions (its wchan: io_cqring_wait) and every other thread waits for that lock
# (anon_pipe_read) - including the submitter whose wake-up it waits for: a hang. And
# memcheck would not see the kernel's writes into read buffers either. ASAN checks the
# C side and every libc memory call the library makes (memcpy, memset: intercepted);
# what it cannot see is the kernel writing a buffer through io_uring, which the close
# tests check by content instead (no read buffer changes after qcowprov_close).
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io valgrind cc

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

for aio in io_uring threads; do
    mkdir -p "$T/bad-$aio"
    "$BIN/api-aio-bad" "$T/bad-$aio" "$aio" > "$T/bad-$aio.out" 2>&1
    rc=$?
    counts_from "$T/bad-$aio.out"
    if [ "$rc" -ne 0 ] && [ "$FAILS" -eq 0 ]; then
        fail "api-aio-bad $aio exited $rc" "$T/bad-$aio.out"
    fi
    if qemu-img check "$T/bad-$aio/bad.qcow2" > "$T/check.out" 2>&1; then
        pass "$aio: qemu-img check after the bad submissions"
    else
        fail "$aio: qemu-img check after the bad submissions" "$T/check.out"
    fi
done

for prog in api-aio api-aio-bad; do
    mkdir -p "$T/vg-$prog"
    if valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
        --show-leak-kinds=definite,indirect --log-file="$T/vg-$prog.log" "$BIN/$prog" \
        "$T/vg-$prog" threads > "$T/vg-$prog.out" 2>&1 && [ ! -s "$T/vg-$prog.log" ]; then
        pass "$prog threads under valgrind"
    else
        fail "$prog threads under valgrind" "$T/vg-$prog.log" "$T/vg-$prog.out"
    fi
done

# AddressSanitizer on io_uring: the test programs instrumented, the library as shipped.
for prog in api-aio api-aio-bad; do
    mkdir -p "$T/asan-$prog"
    if ! cc -fsanitize=address -fno-omit-frame-pointer -g -O1 -std=c99 -Wall -Wextra -Werror \
        -D_GNU_SOURCE -I"$EX/../include" -I"$EX" -o "$T/$prog-asan" "$TESTS/$prog.c" "$EX/common.c" \
        -L"$BIN" -Wl,-rpath,"$BIN" -lqcowprov -lpthread -lm > "$T/asan-cc.out" 2>&1; then
        fail "$prog: build with -fsanitize=address" "$T/asan-cc.out"
        continue
    fi
    ASAN_OPTIONS="log_path=$T/asan-$prog.log:exitcode=98:detect_leaks=1" \
        "$T/$prog-asan" "$T/asan-$prog" io_uring > "$T/asan-$prog.out" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ] && ! ls "$T/asan-$prog.log".* > /dev/null 2>&1; then
        pass "$prog io_uring under AddressSanitizer"
    else
        fail "$prog io_uring under AddressSanitizer (exit $rc)" "$T/asan-$prog.out" \
            $(ls "$T/asan-$prog.log".* 2>/dev/null)
    fi
done
finish
