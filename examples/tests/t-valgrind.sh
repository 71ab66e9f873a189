#!/bin/sh
# The programs under valgrind: no memory errors and no definite or indirect
# leaks (Rust's std may keep "still reachable" memory; that is allowed).
. "$(dirname "$0")/lib.sh"
need valgrind qemu-img qemu-io

# A hang fails the check (timeout) instead of stalling the run.
VG="timeout 300 valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect
    --show-leak-kinds=definite,indirect"
N=0

# vg NAME EXPECTED_RC CMD...
vg() {
    name=$1 want=$2
    shift 2
    N=$((N + 1))
    # shellcheck disable=SC2086
    $VG --log-file="$T/vg.$N" "$@" > "$T/out.$N" 2> "$T/err.$N" < "${STDIN:-/dev/null}"
    rc=$?
    if [ "$rc" -eq 99 ] || [ -s "$T/vg.$N" ]; then
        fail "$name" "valgrind reported errors or leaks (exit $rc)" "$T/vg.$N"
    elif [ "$rc" -ne "$want" ]; then
        fail "$name" "exited $rc, expected $want" "$T/err.$N"
    else
        pass "$name"
    fi
}

cd "$T" || exit 1
qemu-img create -q -f qcow2 a.qcow2 4M
qemu-img create -q -f qcow2 base.qcow2 4M
qemu-io -c 'write -c -P 2 1M 64k' -c 'write -P 1 0 1M' -c 'write -P 1 2M 2M' base.qcow2 > /dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
qemu-img create -q -f qcow2 leak.qcow2 4M
qemu-io -c 'write 0 64k' leak.qcow2 > /dev/null
python3 "$TESTS/qcow2edit.py" leak leak.qcow2 2
qemu-img create -q -f raw r.raw 4M
printf 'write -P 5 0 64k\nread -P 5 0 64k\nmap\nbogus\n' > cmds

vg "io: commands" 0 "$IO" -o discard=unmap,discard-no-unref=on -c 'write -P 1 0 256k' -c 'read -P 1 0 256k' \
    -c 'discard 64k 64k' -c 'write -z -u 128k 64k' -c 'write -z 1000 3000' -c 'write -f 2M 4k' -c map -c info \
    -c policy -c flush a.qcow2
vg "io: over a backing file with compressed clusters" 0 "$IO" -o provision=thin -c 'read -P 2 1M 64k' \
    -c 'write -P 3 1M 4k' -c 'discard 0 1M' -c 'write -z 2M 1M' -c map top.qcow2
vg "io: failing commands" 1 "$IO" -c 'read 8M 1' -c 'read -P 9 0 1' -c bogus -c 'write -z -P 1 0 1' a.qcow2
vg "io: open failure" 1 "$IO" -o bogus=1 a.qcow2
STDIN=cmds vg "io: commands from stdin" 1 "$IO" -r top.qcow2
vg "img: create" 0 "$IMG" create -o cluster_size=16k,extended_l2=on,lazy_refcounts=on c.qcow2 8M
vg "img: create over a backing file" 0 "$IMG" create -b base.qcow2 -F qcow2 c2.qcow2
vg "img: create failure" 1 "$IMG" create c.qcow2 8M
vg "img: info" 0 "$IMG" info top.qcow2
vg "img: info --output=json" 0 "$IMG" info --output=json top.qcow2
vg "img: check" 0 "$IMG" check base.qcow2
vg "img: check --output=json with leaks" 3 "$IMG" check --output=json leak.qcow2
vg "img: check -r all" 0 "$IMG" check -r all leak.qcow2
vg "img: map" 0 "$IMG" map top.qcow2
vg "img: map --output=json" 0 "$IMG" map --output=json top.qcow2
vg "img: map of compressed clusters (fails as qemu-img)" 1 "$IMG" map base.qcow2
# valgrind does not emulate io_uring (the kernel's writes into buffers and its waits are
# invisible to it): the asynchronous runs use the thread-pool backend here; t-aio.sh and
# t-bench.sh run io_uring natively.
vg "bench: qcow2 writes, 4 in flight (threads backend)" 0 "$BENCH" -i threads -w -c 300 -d 4 -s 8k a.qcow2
vg "bench: qcow2 reads, 2 in flight (threads backend)" 0 "$BENCH" -i threads -c 300 -d 2 top.qcow2
vg "bench: qcow2 writes, 4 threads (synchronous API)" 0 "$BENCH" -i sync -w -c 300 -d 4 -s 8k a.qcow2
vg "bench: raw" 0 "$BENCH" -f raw -w -c 100 -d 2 r.raw
# aio=auto (the default) takes the thread pool under valgrind: io_uring's waits deadlock it.
vg "bench: failure, aio=auto" 1 "$BENCH" -c 1 -o 8M a.qcow2
vg "bench: reads, aio=auto, 8 in flight" 0 "$BENCH" -c 300 -d 8 top.qcow2
TMPDIR=$T vg "demo (4 MiB, 10 rounds, no qemu)" 0 "$DEMO" --no-qemu --size 4 --rounds 10
mkdir edge handle
vg "api-edge" 0 "$BIN/api-edge" edge
vg "api-handle (closed, foreign and double-closed handles, locks, fds)" 0 "$BIN/api-handle" handle
finish
