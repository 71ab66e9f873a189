#!/bin/sh
# Bad input through the programs: every case must exit with a status in 1..125
# (no signal, no crash), print a message on stderr, and not hit a library panic
# ("internal error"). A few edge cases that must succeed are checked as well.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io

N=0

# bad NAME CMD...: CMD must fail cleanly.
bad() {
    name=$1
    shift
    N=$((N + 1))
    "$@" > "$T/out.$N" 2> "$T/err.$N" < /dev/null
    rc=$?
    if [ "$rc" -eq 0 ]; then
        fail "$name" "exited 0" "$T/out.$N"
    elif [ "$rc" -ge 126 ]; then
        fail "$name" "exited $rc (signal or exec failure)" "$T/err.$N"
    elif [ ! -s "$T/err.$N" ]; then
        fail "$name" "no message on stderr" "$T/out.$N"
    elif grep -q -i -e 'internal error' -e 'panicked' "$T/err.$N"; then
        fail "$name" "the library panicked" "$T/err.$N"
    else
        pass "$name: $(head -1 "$T/err.$N")"
    fi
}

# nocrash NAME CMD...: CMD may succeed or fail, but cleanly.
nocrash() {
    name=$1
    shift
    N=$((N + 1))
    "$@" > "$T/out.$N" 2> "$T/err.$N" < /dev/null
    rc=$?
    if [ "$rc" -ge 126 ]; then
        fail "$name" "exited $rc (signal or exec failure)" "$T/err.$N"
    elif grep -q -i -e 'internal error' -e 'panicked' "$T/err.$N"; then
        fail "$name" "the library panicked" "$T/err.$N"
    else
        pass "$name (exit $rc)"
    fi
}

# good NAME CMD...: CMD must succeed.
good() {
    name=$1
    shift
    N=$((N + 1))
    if "$@" > "$T/out.$N" 2> "$T/err.$N" < /dev/null; then
        pass "$name"
    else
        fail "$name" "exited $?" "$T/err.$N"
    fi
}

cd "$T" || exit 1
qemu-img create -q -f qcow2 ok.qcow2 4M
qemu-io -c 'write -P 1 0 1M' ok.qcow2 > /dev/null
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 4M
head -c 100 ok.qcow2 > header-cut.qcow2
head -c 300000 ok.qcow2 > data-cut.qcow2
: > empty.qcow2
head -c 65536 /dev/urandom > garbage.qcow2
qemu-img create -q -f raw plain.raw 4M
mkdir adir
qemu-img create -q -f qcow2 -o backing_file=missing.qcow2,backing_fmt=qcow2 orphan.qcow2 4M 2> /dev/null ||
    qemu-img create -q -f qcow2 -u -o backing_file=missing.qcow2,backing_fmt=qcow2 orphan.qcow2 4M
# an image whose header claims a huge L1 table
cp ok.qcow2 bigl1.qcow2
printf '\377\377\377\377' | dd of=bigl1.qcow2 bs=1 seek=36 conv=notrunc 2> /dev/null
# an image with an unknown incompatible feature bit
cp ok.qcow2 feature.qcow2
printf '\200' | dd of=feature.qcow2 bs=1 seek=72 conv=notrunc 2> /dev/null

# ---- qcowprov-io ----
bad "io: no arguments" "$IO"
bad "io: two images" "$IO" ok.qcow2 ok.qcow2
bad "io: unknown flag" "$IO" -x ok.qcow2
bad "io: unknown open option" "$IO" -o bogus=1 -c flush ok.qcow2
bad "io: bad provision mode" "$IO" -o provision=nope -c flush ok.qcow2
bad "io: provision with discard" "$IO" -o provision=thin,discard=unmap -c flush ok.qcow2
bad "io: option without a value" "$IO" -o =x -c flush ok.qcow2
bad "io: discard-no-unref on version 2" "$IO" -o discard=unmap,discard-no-unref=on -c flush v2.qcow2
bad "io: detect-zeroes=unmap without discard=unmap" "$IO" -o detect-zeroes=unmap -c flush ok.qcow2
bad "io: a directory" "$IO" -c flush adir
bad "io: a missing file" "$IO" -c flush missing.qcow2
bad "io: empty path" "$IO" -c flush ""
bad "io: empty file" "$IO" -c flush empty.qcow2
bad "io: header cut short" "$IO" -c flush header-cut.qcow2
bad "io: garbage" "$IO" -c flush garbage.qcow2
bad "io: a raw file" "$IO" -c flush plain.raw
bad "io: huge L1 size in the header" "$IO" -c 'read 0 64k' bigl1.qcow2
bad "io: unknown incompatible feature" "$IO" -c 'read 0 64k' feature.qcow2
bad "io: missing backing file" "$IO" -c 'read 0 64k' orphan.qcow2
nocrash "io: data cut short" "$IO" -c 'read 0 4M' -c 'write -P 3 2M 64k' -c map data-cut.qcow2
nocrash "img: check of data cut short" "$IMG" check data-cut.qcow2
nocrash "img: map of data cut short" "$IMG" map --output=json data-cut.qcow2
bad "io: unknown command" "$IO" -c bogus ok.qcow2
bad "io: read without arguments" "$IO" -c read ok.qcow2
bad "io: read with one argument" "$IO" -c 'read 0' ok.qcow2
bad "io: non-numeric offset" "$IO" -c 'read x 1' ok.qcow2
bad "io: bad suffix" "$IO" -c 'read 0 1Q' ok.qcow2
bad "io: negative offset" "$IO" -c 'read -1 5' ok.qcow2
bad "io: overflowing length" "$IO" -c 'read 0 99999999999999999999999' ok.qcow2
bad "io: length of 16 EiB" "$IO" -c 'write -z 0 16E' ok.qcow2
bad "io: huge length" "$IO" -c 'read 0 8E' ok.qcow2
bad "io: offset beyond the end" "$IO" -c 'read 4M 1' ok.qcow2
bad "io: range beyond the end" "$IO" -c 'write 4193792 1024' ok.qcow2
bad "io: offset near 2^64" "$IO" -c 'discard 0xffffffffffffff00 0x100' ok.qcow2
bad "io: bad pattern" "$IO" -c 'write -P 256 0 1' ok.qcow2
bad "io: non-numeric pattern" "$IO" -c 'write -P x 0 1' ok.qcow2
bad "io: -P without a value" "$IO" -c 'read -P' ok.qcow2
bad "io: unknown command flag" "$IO" -c 'read -x 0 1' ok.qcow2
bad "io: -z with -P" "$IO" -c 'write -z -P 1 0 1' ok.qcow2
bad "io: -u without -z" "$IO" -c 'write -u 0 1' ok.qcow2
bad "io: flush with an argument" "$IO" -c 'flush now' ok.qcow2
bad "io: pattern mismatch" "$IO" -c 'read -P 2 0 64k' ok.qcow2
bad "io: write on a read-only open" "$IO" -r -c 'write 0 1' ok.qcow2
bad "io: discard on a read-only open" "$IO" -r -c 'discard 0 64k' ok.qcow2
bad "io: a failing command among good ones" "$IO" -c 'read 0 1' -c 'read 8M 1' -c 'flush' ok.qcow2
good "io: empty option string" "$IO" -o "" -c 'read -P 1 0 64k' ok.qcow2
good "io: empty command" "$IO" -c "" ok.qcow2
good "io: zero-length requests" "$IO" -c 'read 0 0' -c 'write 4M 0' -c 'write -z 0 0' -c 'discard 4M 0' ok.qcow2
good "io: commands on stdin, then quit" sh -c "printf 'read -q 0 1\nquit\nbogus\n' | \"$IO\" ok.qcow2"

# ---- qcowprov-img ----
bad "img: no arguments" "$IMG"
bad "img: unknown subcommand" "$IMG" frobnicate ok.qcow2
bad "img: create over an existing file" "$IMG" create ok.qcow2 1M
bad "img: create without a size" "$IMG" create nosize.qcow2
bad "img: create with a bad size" "$IMG" create badsize.qcow2 abc
bad "img: create with a negative size" "$IMG" create negsize.qcow2 -5
bad "img: create with an absurd size" "$IMG" create hugesize.qcow2 8E
bad "img: create with an unknown option" "$IMG" create -o bogus=1 bogus.qcow2 1M
bad "img: create with a bad cluster size" "$IMG" create -o cluster_size=1000 cs.qcow2 1M
bad "img: create with a too large cluster size" "$IMG" create -o cluster_size=4M cs4.qcow2 1M
bad "img: create compat=0.10 with extended_l2" "$IMG" create -o compat=0.10,extended_l2=on v2x.qcow2 1M
bad "img: create with refcount_bits=3" "$IMG" create -o refcount_bits=3 rb.qcow2 1M
bad "img: create with a backing file but no format" "$IMG" create -b ok.qcow2 nofmt.qcow2
bad "img: create with a missing backing file" "$IMG" create -b missing.qcow2 -F qcow2 nob.qcow2
bad "img: create with format vmdk" "$IMG" create -f vmdk x.vmdk 1M
bad "img: create in a missing directory" "$IMG" create nodir/x.qcow2 1M
bad "img: create with an empty path" "$IMG" create "" 1M
bad "img: create with an extra argument" "$IMG" create extra.qcow2 1M 2M
bad "img: info of a directory" "$IMG" info adir
bad "img: info of a missing file" "$IMG" info missing.qcow2
bad "img: info of garbage" "$IMG" info garbage.qcow2
bad "img: info of a cut header" "$IMG" info header-cut.qcow2
bad "img: info --output=xml" "$IMG" info --output=xml ok.qcow2
bad "img: info with two files" "$IMG" info ok.qcow2 ok.qcow2
bad "img: check -r bogus" "$IMG" check -r bogus ok.qcow2
bad "img: check of a directory" "$IMG" check adir
bad "img: check of an empty file" "$IMG" check empty.qcow2
bad "img: check of a cut header" "$IMG" check header-cut.qcow2
bad "img: check -r all of a read-only file" sh -c "cp ok.qcow2 ro.qcow2 && chmod 0444 ro.qcow2 &&
    if [ \$(id -u) -eq 0 ]; then echo 'running as root: forcing the failure with a directory' >&2; \"$IMG\" check -r all adir; else \"$IMG\" check -r all ro.qcow2; fi"
bad "img: map of a missing file" "$IMG" map missing.qcow2
bad "img: map of garbage" "$IMG" map garbage.qcow2
bad "img: map with a missing backing file" "$IMG" map orphan.qcow2
bad "img: map --output without a value" "$IMG" map --output
good "img: info of an image whose backing file is missing" "$IMG" info orphan.qcow2
# As qemu-img check: it opens the backing chain, so a missing backing file fails it (issue 12, item 7).
bad "img: check of an image whose backing file is missing" "$IMG" check orphan.qcow2
good "img: --help" "$IMG" --help

# ---- qcowprov-bench ----
bad "bench: count 0" "$BENCH" -c 0 ok.qcow2
bad "bench: count x" "$BENCH" -c x ok.qcow2
bad "bench: depth 0" "$BENCH" -d 0 ok.qcow2
bad "bench: size 0" "$BENCH" -s 0 ok.qcow2
bad "bench: bad cache mode" "$BENCH" -t bogus ok.qcow2
bad "bench: format vmdk" "$BENCH" -f vmdk ok.qcow2
bad "bench: a missing file" "$BENCH" -c 1 missing.qcow2
bad "bench: a directory" "$BENCH" -c 1 adir
bad "bench: raw directory" "$BENCH" -f raw -c 1 adir
bad "bench: garbage" "$BENCH" -c 1 garbage.qcow2
bad "bench: flush interval without -w" "$BENCH" --flush-interval=64 ok.qcow2
bad "bench: flush interval below depth" "$BENCH" -w -d 8 --flush-interval=4 ok.qcow2
bad "bench: bad pattern" "$BENCH" --pattern=300 ok.qcow2
bad "bench: requests larger than the image" "$BENCH" -c 2 -s 8M ok.qcow2
bad "bench: offset beyond the end" "$BENCH" -c 1 -o 8M ok.qcow2
bad "bench: no file" "$BENCH" -c 1

# ---- demo ----
bad "demo: bad size" "$DEMO" --size 0
bad "demo: bad rounds" "$DEMO" --rounds x
bad "demo: unexpected argument" "$DEMO" extra

finish
