#!/bin/sh
# Image locks against QEMU's tools, live, in both directions: while one program holds an
# image open (qemu-io or qcowprov-io in the background, reading commands from a fifo),
# the other's opens are refused or allowed exactly as QEMU refuses or allows them;
# read-only opens share; -U looks anyway; locking=off takes and tests nothing; a killed
# holder leaves no lock; backing files are locked as readers; a loop block device is
# locked like a file. Every image ends clean under qemu-img check.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io losetup mkfifo

cd "$T" || exit 1
N=0
HOLDER=""

# hold CMD...: run CMD (qemu-io or qcowprov-io, reading commands from stdin) in the
# background on an image, and return once it has answered a read: it holds the image.
hold() {
    rm -f fifo holder.out holder.err
    mkfifo fifo
    "$@" < fifo > holder.out 2> holder.err &
    HOLDER=$!
    exec 7> fifo
    echo "read 0 512" >&7
    i=0
    while ! grep -q "read 512/512 bytes" holder.out 2> /dev/null; do
        if ! kill -0 "$HOLDER" 2> /dev/null || [ "$i" -ge 100 ]; then
            fail "holder started: $*" holder.err holder.out
            exec 7>&-
            HOLDER=""
            return 1
        fi
        sleep 0.1
        i=$((i + 1))
    done
}

# say CMD: send a command to the holder.
say() {
    echo "$1" >&7
}

# sync_holder: wait until the holder has run every command sent so far (it answers a
# read after them).
sync_holder() {
    n=$(grep -c "read 512/512 bytes" holder.out)
    echo "read 0 512" >&7
    i=0
    while [ "$(grep -c "read 512/512 bytes" holder.out)" -le "$n" ] && [ "$i" -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
}

# release: tell the holder to quit and wait for it.
release() {
    [ -n "$HOLDER" ] || return 0
    echo quit >&7
    exec 7>&-
    wait "$HOLDER"
    HOLDER=""
}

# refused NAME WANT CMD...: CMD fails, and its stderr says WANT.
refused() {
    name=$1 want=$2
    shift 2
    N=$((N + 1))
    if "$@" > "out.$N" 2> "err.$N" < /dev/null; then
        fail "$name: refused" "exited 0" "out.$N"
    elif ! grep -q -F -e "$want" "err.$N"; then
        fail "$name: refused saying '$want'" "err.$N"
    else
        pass "$name: refused ($(head -1 "err.$N" | cut -c1-110))"
    fi
}

# allowed NAME CMD...: CMD succeeds.
allowed() {
    name=$1
    shift
    N=$((N + 1))
    if "$@" > "out.$N" 2> "err.$N" < /dev/null; then
        pass "$name: allowed"
    else
        fail "$name: allowed" "exited $?" "err.$N"
    fi
}

# clean NAME IMAGE: qemu-img check finds no corruption and no leak.
clean() {
    N=$((N + 1))
    if qemu-img check "$2" > "out.$N" 2>&1; then
        pass "$1: qemu-img check clean"
    else
        fail "$1: qemu-img check clean" "out.$N"
    fi
}

# lockbytes FILE: the lock ranges anyone holds on FILE ("100-101 103 201 203"), probed with
# F_OFD_GETLK (lockbytes.py says why not /proc/locks).
lockbytes() {
    python3 "$TESTS/lockbytes.py" "$1"
}

qemu-img create -q -f qcow2 a.qcow2 16M
qemu-io -c 'write -P 1 0 1M' a.qcow2 > /dev/null

W='Failed to get "write" lock'
S='Failed to get shared "write" lock'

# ---- we hold it, QEMU tries ----
hold "$IO" a.qcow2 || exit 1
N=$((N + 1))
b=$(lockbytes a.qcow2)
if [ "$b" = "100-101 103 201 203" ]; then
    pass "qcowprov-io (read/write) holds QEMU's writer bytes: $b"
else
    fail "qcowprov-io (read/write) holds QEMU's writer bytes" "got '$b', want '100-101 103 201 203'"
fi
say "write -P 2 0 64k"
say "flush"
sync_holder
refused "qemu-io write while qcowprov-io writes" "$W" qemu-io -c 'write -P 9 0 64k' a.qcow2
refused "qemu-io -r while qcowprov-io writes" "$S" qemu-io -r -c 'read 0 1' a.qcow2
refused "qemu-img info while qcowprov-io writes" "$S" qemu-img info a.qcow2
refused "qemu-img check while qcowprov-io writes" "$S" qemu-img check a.qcow2
refused "qemu-img create over it while qcowprov-io writes" "$W" qemu-img create -f qcow2 a.qcow2 1M
allowed "qemu-img info -U while qcowprov-io writes" qemu-img info -U a.qcow2
allowed "qemu-io -r -U while qcowprov-io writes" qemu-io -r -U -c 'read -P 2 0 64k' a.qcow2
refused "a second qcowprov-io while qcowprov-io writes" "$W" "$IO" -c 'read 0 1' a.qcow2
release
allowed "qemu-io after qcowprov-io quit" qemu-io -c 'read -P 2 0 64k' -c 'read -P 1 64k 960k' a.qcow2
clean "after qcowprov-io wrote, qemu-io was refused" a.qcow2

# ---- QEMU holds it, we try ----
hold qemu-io a.qcow2 || exit 1
say "write -P 3 0 64k"
say "flush"
sync_holder
refused "qcowprov-io write while qemu-io writes" "$W" "$IO" -c 'write -P 9 0 64k' a.qcow2
N=$((N + 1))
if grep -q -F "a.qcow2" "err.$((N - 1))" && grep -q -F -e "-U" "err.$((N - 1))" &&
    ! grep -q -e 'os error' -e corrupt "err.$((N - 1))"; then
    pass "the refusal names the image and -U, not 'os error' or 'corrupt'"
else
    fail "the refusal names the image and -U" "err.$((N - 1))"
fi
refused "qcowprov-io -r while qemu-io writes" "$S" "$IO" -r -c 'read 0 1' a.qcow2
refused "qcowprov-img info while qemu-io writes" "$S" "$IMG" info a.qcow2
refused "qcowprov-img check while qemu-io writes" "$S" "$IMG" check a.qcow2
refused "qcowprov-img map while qemu-io writes" "$S" "$IMG" map --output=json a.qcow2
allowed "qcowprov-io -r -U while qemu-io writes" "$IO" -r -U -c 'read -P 3 0 64k' a.qcow2
allowed "qcowprov-img info -U while qemu-io writes" "$IMG" info -U a.qcow2
allowed "qcowprov-img map -U while qemu-io writes" "$IMG" map -U --output=json a.qcow2
refused "qcowprov-io -U without -r" "read-only" "$IO" -U -c 'read 0 1' a.qcow2
release
allowed "qcowprov-io after qemu-io quit" "$IO" -c 'read -P 3 0 64k' a.qcow2
clean "after qemu-io wrote, qcowprov-io was refused" a.qcow2

# ---- read-only opens share, in both directions ----
hold qemu-io -r a.qcow2 || exit 1
allowed "qcowprov-io -r while qemu-io -r reads" "$IO" -r -c 'read -P 3 0 64k' a.qcow2
allowed "qcowprov-img check while qemu-io -r reads" "$IMG" check a.qcow2
refused "qcowprov-io write while qemu-io -r reads" "$W" "$IO" -c 'write 0 1' a.qcow2
release
hold "$IO" -r a.qcow2 || exit 1
N=$((N + 1))
b=$(lockbytes a.qcow2)
if [ "$b" = "100 201 203" ]; then
    pass "qcowprov-io -r holds QEMU's reader bytes: $b"
else
    fail "qcowprov-io -r holds QEMU's reader bytes" "got '$b', want '100 201 203'"
fi
allowed "qemu-io -r while qcowprov-io -r reads" qemu-io -r -c 'read -P 3 0 64k' a.qcow2
allowed "qemu-img info while qcowprov-io -r reads" qemu-img info a.qcow2
refused "qemu-io write while qcowprov-io -r reads" "$W" qemu-io -c 'write 0 1' a.qcow2
release

# ---- -U (force-share) shares with a writer, in both directions ----
hold "$IO" -r -U a.qcow2 || exit 1
N=$((N + 1))
b=$(lockbytes a.qcow2)
if [ "$b" = "100" ]; then
    pass "qcowprov-io -r -U holds QEMU's force-share bytes: $b"
else
    fail "qcowprov-io -r -U holds QEMU's force-share bytes" "got '$b', want '100'"
fi
allowed "qemu-io write while qcowprov-io -r -U reads" qemu-io -c 'write -P 4 0 64k' a.qcow2
release
hold qemu-io -r -U a.qcow2 || exit 1
allowed "qcowprov-io write while qemu-io -r -U reads" "$IO" -c 'write -P 5 0 64k' a.qcow2
release
clean "after writes beside force-share readers" a.qcow2

# ---- locking=off takes and tests nothing ----
hold "$IO" -o locking=off a.qcow2 || exit 1
N=$((N + 1))
b=$(lockbytes a.qcow2)
if [ -z "$b" ]; then
    pass "qcowprov-io -o locking=off holds no lock"
else
    fail "qcowprov-io -o locking=off holds no lock" "got '$b'"
fi
allowed "qemu-io -r beside qcowprov-io locking=off" qemu-io -r -c 'read -P 5 0 64k' a.qcow2
release
hold qemu-io a.qcow2 || exit 1
allowed "qcowprov-io -r -o file.locking=off beside qemu-io" "$IO" -r -o file.locking=off -c 'read -P 5 0 64k' a.qcow2
release

# ---- a killed holder leaves no lock behind ----
hold "$IO" a.qcow2 || exit 1
say "write -P 6 0 64k"
say "flush"
sync_holder
kill -9 "$HOLDER"
wait "$HOLDER" 2> /dev/null
exec 7>&-
HOLDER=""
allowed "qemu-io write after qcowprov-io was killed" qemu-io -c 'read -P 6 0 64k' -c 'write -P 7 0 64k' a.qcow2
clean "after a killed qcowprov-io" a.qcow2
hold qemu-io a.qcow2 || exit 1
kill -9 "$HOLDER"
wait "$HOLDER" 2> /dev/null
exec 7>&-
HOLDER=""
allowed "qcowprov-io write after qemu-io was killed" "$IO" -c 'read -P 7 0 64k' -c 'write -P 8 0 64k' a.qcow2
clean "after a killed qemu-io" a.qcow2

# ---- backing chain: backing files are locked as readers ----
qemu-img create -q -f qcow2 base.qcow2 16M
qemu-io -c 'write -P 1 0 1M' base.qcow2 > /dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
hold "$IO" top.qcow2 || exit 1
N=$((N + 1))
b=$(lockbytes base.qcow2)
if [ "$b" = "100 201 203" ]; then
    pass "qcowprov-io holds QEMU's reader bytes on the backing file: $b"
else
    fail "qcowprov-io holds QEMU's reader bytes on the backing file" "got '$b', want '100 201 203'"
fi
refused "qemu-io write to the base under qcowprov-io" "$W" qemu-io -c 'write 0 1' base.qcow2
allowed "qemu-io -r of the base under qcowprov-io" qemu-io -r -c 'read -P 1 0 64k' base.qcow2
allowed "qemu-img create of a second overlay over the base" qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top2.qcow2
release
hold qemu-io top.qcow2 || exit 1
refused "qcowprov-io write to the base under qemu-io" "$W" "$IO" -c 'write 0 1' base.qcow2
allowed "qcowprov-io -r of the base under qemu-io" "$IO" -r -c 'read -P 1 0 64k' base.qcow2
allowed "qcowprov-img create of an overlay over the base under qemu-io" "$IMG" create -b base.qcow2 -F qcow2 top3.qcow2
release
hold qemu-io base.qcow2 || exit 1
refused "qcowprov-io of an overlay while qemu-io writes its base" "$S" "$IO" -r -c 'read 0 1' top.qcow2
allowed "qcowprov-io -r -U of the overlay" "$IO" -r -U -c 'read -P 1 0 64k' top.qcow2
release
clean "the base" base.qcow2
clean "the overlay" top.qcow2
clean "the overlay made by qcowprov-img over a base in use" top3.qcow2

# ---- a block device (loop) ----
truncate -s 64M loop.img
N=$((N + 1))
if ! LOOP=$(losetup -f --show loop.img 2> "err.$N"); then
    fail "losetup: a loop device for the block-device case" "err.$N"
    finish
    exit 1
fi
trap 'losetup -d "$LOOP" 2> /dev/null; rm -rf "$T"' EXIT
pass "loop device $LOOP"
# A raw user shares writes (qemu-img create would write a qcow2 header over the device
# before its own open fails); formatting shares nothing, so it is refused.
hold qemu-io -f raw "$LOOP" || exit 1
refused "qcowprov-img create on a device qemu-io -f raw has open" "Failed to get shared" \
    "$IMG" create "$LOOP" 32M
N=$((N + 1))
if cmp -s -n 4096 "$LOOP" /dev/zero; then
    pass "nothing was written to the device in use"
else
    fail "nothing was written to the device in use" "the device does not start with zeros"
fi
release
allowed "qcowprov-img create on a block device" "$IMG" create "$LOOP" 32M
clean "the image on $LOOP" "$LOOP"
hold "$IO" "$LOOP" || exit 1
say "write -P 9 0 1M"
say "flush"
sync_holder
refused "qemu-io write to the device qcowprov-io has open" "$W" qemu-io -c 'write 0 1' "$LOOP"
refused "qemu-img check of the device qcowprov-io has open" "$S" qemu-img check "$LOOP"
allowed "qemu-img check -U of the device qcowprov-io has open (flushed)" qemu-img check -U "$LOOP"
release
hold qemu-io "$LOOP" || exit 1
refused "qcowprov-io write to the device qemu-io has open" "$W" "$IO" -c 'write 0 1' "$LOOP"
refused "qcowprov-img create on the device qemu-io has open" "$W" "$IMG" create "$LOOP" 32M
allowed "qcowprov-io -r -U of the device qemu-io has open" "$IO" -r -U -c 'read -P 9 0 1M' "$LOOP"
release
N=$((N + 1))
want=$(qemu-img check --output=json "$LOOP" | sed -n 's/.*"image-end-offset": \([0-9]*\).*/\1/p')
got=$("$IO" -r -c highest "$LOOP" | sed -n 's/^highest offset: \([0-9]*\)$/\1/p')
if [ -n "$want" ] && [ "$got" = "$want" ]; then
    pass "highest offset on the device = qemu-img check's image end offset ($got)"
else
    fail "highest offset on the device = qemu-img check's image end offset" "got '$got', want '$want'"
fi
clean "the image on $LOOP after both wrote" "$LOOP"
losetup -d "$LOOP"
trap 'rm -rf "$T"' EXIT
finish
