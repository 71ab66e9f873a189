#!/bin/sh
# qcowprov-img check against qemu-img check: the same exit status (0 clean,
# 2 corruptions, 3 leaks, 1 check failed) and the same output, human and JSON
# (leaks, corruptions, cluster counts, image end offset), on clean, leaking and
# hand-corrupted images (some from QEMU's iotests 060, 108, 138, 271); and after
# repairs (-r leaks, -r all) the same repaired image as qemu-img's. Where qemu-img
# needs two runs or grows the file, one run of ours ends where its two end.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io python3

N=0

# Host offset of the first data cluster qemu-img map reports.
first_data() {
    qemu-img map --output=json "$1" |
        python3 -c 'import json,sys; print(next(e["offset"] for e in json.load(sys.stdin) if e["data"] and "offset" in e))'
}

# checkcase NAME EXPECTED_RC MAKE [CHECK_ARGS]: MAKE builds $d/img.qcow2; both tools
# check copies of it with CHECK_ARGS, in human and JSON output.
checkcase() {
    name=$1 want=$2 make=$3 args=${4:-}
    N=$((N + 1))
    d=$T/c$N
    mkdir -p "$d"
    : > "$d/why"
    if ! (cd "$d" && $make) > "$d/make.out" 2>&1; then
        fail "$name" "making the image failed" "$d/make.out"
        return
    fi
    for fmt in human json; do
        cp "$d/img.qcow2" "$d/q.qcow2"
        cp "$d/img.qcow2" "$d/o.qcow2"
        # same file name in both outputs ("filename" in JSON)
        (cd "$d" && mv q.qcow2 x.qcow2 && qemu-img check $args --output=$fmt x.qcow2 > q.$fmt 2> q.$fmt.err;
            echo $? > q.rc; mv x.qcow2 q.qcow2)
        (cd "$d" && mv o.qcow2 x.qcow2 && "$IMG" check $args --output=$fmt x.qcow2 > o.$fmt 2> o.$fmt.err;
            echo $? > o.rc; mv x.qcow2 o.qcow2)
        q=$(cat "$d/q.rc") o=$(cat "$d/o.rc")
        [ "$q" -eq "$want" ] || echo "--output=$fmt: qemu-img check exited $q, the case expects $want" >> "$d/why"
        [ "$q" -eq "$o" ] || echo "--output=$fmt: exit status qemu-img $q, qcowprov-img $o" >> "$d/why"
        if ! cmp -s "$d/q.$fmt" "$d/o.$fmt"; then
            echo "--output=$fmt differs (< qemu-img, > qcowprov-img):" >> "$d/why"
            diff "$d/q.$fmt" "$d/o.$fmt" | head -30 >> "$d/why"
        fi
        if [ -n "$args" ]; then
            # after a repair: both images check the same way now and hold the same data
            qemu-img check "$d/q.qcow2" > "$d/q.after" 2>&1
            qa=$?
            qemu-img check "$d/o.qcow2" > "$d/o.after" 2>&1
            oa=$?
            if [ "$qa" -ne "$oa" ]; then
                echo "after repair ($fmt): qemu-img check of qemu's image $qa, of ours $oa:" >> "$d/why"
                cat "$d/o.after" >> "$d/why"
            fi
            qc=$(qemu-img info -U "$d/q.qcow2" | grep -c 'corrupt: true')
            oc=$(qemu-img info -U "$d/o.qcow2" | grep -c 'corrupt: true')
            [ "$qc" = "$oc" ] || echo "after repair ($fmt): corrupt bit set: qemu's $qc, ours $oc" >> "$d/why"
            if ! qemu-img compare "$d/q.qcow2" "$d/o.qcow2" > "$d/cmp.out" 2>&1; then
                echo "after repair ($fmt): qemu-img compare: $(cat "$d/cmp.out")" >> "$d/why"
            fi
        fi
    done
    if [ -s "$d/why" ]; then
        fail "$name  [$d]" "$d/why" "$d/o.human.err" "$d/q.human.err"
    else
        pass "$name"
    fi
}

qio() { qemu-io "$@"; }

mk_clean() {
    qemu-img create -q -f qcow2 img.qcow2 16M &&
        qio -c 'write -P 1 0 1M' -c 'write -P 2 8M 64k' -c 'write -P 3 2M 64k' -c 'write -c -P 4 4M 128k' \
            -c 'write -z 5M 64k' -c 'write -P 5 1088k 64k' img.qcow2
}
mk_fresh() { qemu-img create -q -f qcow2 img.qcow2 1G; }
mk_leaks() { mk_clean && $EDIT leak img.qcow2 3; }
mk_refcount_zero() {
    mk_clean && off=$(first_data img.qcow2) && $EDIT setref img.qcow2 "$off" 0
}
mk_refcount_two() {
    mk_clean && off=$(first_data img.qcow2) && $EDIT setref img.qcow2 "$off" 2
}
mk_l2_refcount_zero() {
    mk_clean && l2=$($EDIT l2 img.qcow2 0) && $EDIT setref img.qcow2 "$l2" 0
}
mk_leaks_and_corruption() { mk_refcount_zero && $EDIT leak img.qcow2 2; }
mk_v2_leaks() {
    qemu-img create -q -f qcow2 -o compat=0.10 img.qcow2 4M &&
        qio -c 'write -P 1 0 256k' img.qcow2 && $EDIT leak img.qcow2 1
}
mk_refcount1_leaks() {
    qemu-img create -q -f qcow2 -o refcount_bits=1 img.qcow2 4M &&
        qio -c 'write -P 1 0 256k' -c 'write -P 2 1M 64k' img.qcow2 && $EDIT leak img.qcow2 5
}
mk_refcount64_leaks() {
    qemu-img create -q -f qcow2 -o refcount_bits=64 img.qcow2 4M &&
        qio -c 'write -P 1 0 256k' img.qcow2 && $EDIT leak img.qcow2 2
}
mk_extended_l2_leaks() {
    qemu-img create -q -f qcow2 -o extended_l2=on img.qcow2 4M &&
        qio -c 'write -P 1 0 6k' -c 'write -P 1 1M 64k' img.qcow2 && $EDIT leak img.qcow2 2
}
mk_overlay_leaks() {
    qemu-img create -q -f qcow2 base.qcow2 4M && qio -c 'write -P 1 0 4M' base.qcow2 &&
        qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 &&
        qio -c 'write -P 2 64k 4k' img.qcow2 && $EDIT leak img.qcow2 1
}
mk_cut_data() {
    qemu-img create -q -f qcow2 img.qcow2 4M && qio -c 'write -P 1 0 1M' img.qcow2 && truncate -s 300000 img.qcow2
}
mk_cut_l2() {
    qemu-img create -q -f qcow2 img.qcow2 4M && qio -c 'write -P 1 0 1M' img.qcow2 && truncate -s 200000 img.qcow2
}
# Incompatible feature bit 1: the corrupt bit (qemu-img check -r opens it anyway).
mk_corrupt_bit() {
    mk_clean && python3 -c 'import sys
f = open(sys.argv[1], "r+b"); f.seek(72); v = int.from_bytes(f.read(8), "big") | 2
f.seek(72); f.write(v.to_bytes(8, "big"))' img.qcow2
}
mk_fragmented() {
    qemu-img create -q -f qcow2 img.qcow2 8M &&
        qio -c 'write -P 1 3M 64k' -c 'write -P 2 0 64k' -c 'write -P 3 7M 64k' -c 'write -P 4 1M 64k' \
            -c 'write -P 5 64k 64k' img.qcow2
}

# Byte pokes for the iotest images below: poke FILE OFFSET HEX.
poke() {
    python3 -c 'import sys
f = open(sys.argv[1], "r+b"); f.seek(int(sys.argv[2], 0)); f.write(bytes.fromhex(sys.argv[3]))' "$@"
}
# QEMU's iotests 060, 108, 138 and 271 (their check and repair cases; 64 MiB images with
# the refcount table at 0x10000, its block at 0x20000, L1 at 0x30000, L2 at 0x40000).
mk_no_reftable() { # 108: no refcount table at all
    qemu-img create -q -f qcow2 img.qcow2 64M && qio -c 'write -P 42 0 64k' img.qcow2 &&
        poke img.qcow2 48 0000000000000000 && poke img.qcow2 56 00000000
}
mk_zero_reftable_size() { qemu-img create -q -f qcow2 img.qcow2 64M && poke img.qcow2 56 00000000; } # 060
mk_empty_reftable() { qemu-img create -q -f qcow2 img.qcow2 64M && qio -c 'write 0 64k' img.qcow2 && poke img.qcow2 0x10000 0000000000000000; } # 060
mk_data_into_refblock() { # 060: 2 errors (the block's count and the cluster's)
    qemu-img create -q -f qcow2 img.qcow2 64M && truncate -s $((0x50000)) img.qcow2 &&
        poke img.qcow2 0x30000 8000000000040000 && poke img.qcow2 0x20008 0001 &&
        poke img.qcow2 0x40000 8000000000020000
}
mk_unaligned_prealloc_zero() { qemu-img create -q -f qcow2 img.qcow2 64M && qio -c 'write 0 64k' img.qcow2 && poke img.qcow2 0x40000 8000000000052a01; } # 060
mk_data_at_32_pib() { qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 512 && qio -c 'write 0 512' img.qcow2 && poke img.qcow2 2048 8080000000000000; } # 138
mk_ext_l2_unaligned_no_data() { # 271: qemu-img repairs it, the backing file shows through
    qemu-img create -q -f raw base.raw 128k && qemu-io -f raw -c 'write -q -P 0xff 0 128k' base.raw &&
        qemu-img create -q -f qcow2 -o extended_l2=on -F raw -b base.raw img.qcow2 &&
        qio -c 'write -q -P 1 4k 2k' -c 'write -q -z 4k 2k' img.qcow2 && poke img.qcow2 $((0x40006)) 02
}

checkcase "clean (data, compressed, zero clusters)" 0 mk_clean
checkcase "fresh 1G" 0 mk_fresh
checkcase "fragmented" 0 mk_fragmented
checkcase "3 leaked clusters" 3 mk_leaks
checkcase "refcount 0 on a data cluster" 2 mk_refcount_zero
checkcase "refcount 2 on a data cluster" 2 mk_refcount_two
checkcase "refcount 0 on an L2 table" 2 mk_l2_refcount_zero
checkcase "leaks and a corruption" 2 mk_leaks_and_corruption
checkcase "version 2 with a leak" 3 mk_v2_leaks
checkcase "refcount_bits=1 with leaks" 3 mk_refcount1_leaks
checkcase "refcount_bits=64 with leaks" 3 mk_refcount64_leaks
checkcase "extended L2 with leaks" 3 mk_extended_l2_leaks
checkcase "overlay with a leak (backing not needed)" 3 mk_overlay_leaks
checkcase "file cut short inside the data (clusters beyond the end)" 2 mk_cut_data
checkcase "file cut short before the L2 table" 2 mk_cut_l2

checkcase "-r leaks on leaks" 0 mk_leaks "-r leaks"
checkcase "-r all on leaks" 0 mk_leaks "-r all"
checkcase "-r all on refcount 0" 0 mk_refcount_zero "-r all"
checkcase "-r all on refcount 2" 0 mk_refcount_two "-r all"
checkcase "-r all on leaks and a corruption" 0 mk_leaks_and_corruption "-r all"
checkcase "-r leaks on leaks and a corruption" 1 mk_leaks_and_corruption "-r leaks"
checkcase "-r all on refcount_bits=1 leaks" 0 mk_refcount1_leaks "-r all"
checkcase "corrupt bit set" 0 mk_corrupt_bit
checkcase "-r all on the corrupt bit" 0 mk_corrupt_bit "-r all"
checkcase "-r leaks on the corrupt bit" 0 mk_corrupt_bit "-r leaks"

checkcase "108: no refcount table" 2 mk_no_reftable
checkcase "108: -r all without a refcount table" 0 mk_no_reftable "-r all"
checkcase "060: zero refcount table size" 2 mk_zero_reftable_size
checkcase "060: -r all on a zero refcount table size" 0 mk_zero_reftable_size "-r all"
checkcase "060: -r all on an empty refcount table" 0 mk_empty_reftable "-r all"
checkcase "060: data cluster in a refcount block" 2 mk_data_into_refblock
checkcase "060: -r all on a data cluster in a refcount block" 0 mk_data_into_refblock "-r all"
checkcase "060: -r all on an unaligned preallocated zero cluster" 0 mk_unaligned_prealloc_zero "-r all"
checkcase "138: a data cluster at 32 PiB" 2 mk_data_at_32_pib
checkcase "271: -r all on an unaligned entry without data" 0 mk_ext_l2_unaligned_no_data "-r all"

# ourcase NAME MAKE: qemu-img cannot repair in one run (its own overlap check stops it
# half-way, or it grows the file to where a damaged entry points): ours repairs in one
# run to what qemu-img ends with, in a file no longer than qemu-img's.
ourcase() {
    name=$1 make=$2
    N=$((N + 1))
    d=$T/c$N
    mkdir -p "$d"
    : > "$d/why"
    if ! (cd "$d" && $make) > "$d/make.out" 2>&1; then
        fail "$name" "making the image failed" "$d/make.out"
        return
    fi
    cp "$d/img.qcow2" "$d/q.qcow2"
    cp "$d/img.qcow2" "$d/o.qcow2"
    qemu-img check -r all "$d/q.qcow2" > "$d/q.1" 2>&1
    qemu-img check -r all "$d/q.qcow2" > "$d/q.2" 2>&1
    "$IMG" check -r all "$d/o.qcow2" > "$d/o.1" 2>&1
    o=$?
    [ "$o" -eq 0 ] || echo "qcowprov-img check -r all exited $o" >> "$d/why"
    qemu-img check "$d/o.qcow2" > "$d/o.after" 2>&1 || echo "qemu-img check of our repair: $(cat "$d/o.after")" >> "$d/why"
    qemu-img check "$d/q.qcow2" > /dev/null 2>&1 || echo "qemu-img's own image is not clean after two runs" >> "$d/why"
    qemu-img compare "$d/q.qcow2" "$d/o.qcow2" > "$d/cmp.out" 2>&1 || echo "compare: $(cat "$d/cmp.out")" >> "$d/why"
    ql=$(stat -c %s "$d/q.qcow2") ol=$(stat -c %s "$d/o.qcow2")
    [ "$ol" -le "$ql" ] || echo "our file is $ol bytes, qemu-img's $ql" >> "$d/why"
    if [ -s "$d/why" ]; then
        fail "$name  [$d]" "$d/why" "$d/o.1"
    else
        pass "$name"
    fi
}
mk_dirty_corrupt() { qemu-img create -q -f qcow2 img.qcow2 64M && poke img.qcow2 0x10000 00000000ffff2a00 && poke img.qcow2 72 0000000000000001; } # 060
mk_unaligned_refblock() { qemu-img create -q -f qcow2 img.qcow2 64M && qio -c 'write -P 3 0 128k' img.qcow2 && poke img.qcow2 0x10000 0000000000002a00; } # 060
mk_refblock_beyond_end() { qemu-img create -q -f qcow2 img.qcow2 64M && poke img.qcow2 0x10008 0000000000100000; } # 108
mk_refblock_far_out() { qemu-img create -q -f qcow2 img.qcow2 64M && poke img.qcow2 0x10008 00ffffff00000000; } # 060
ourcase "060: -r all on a dirty image with an unaligned refcount block" mk_dirty_corrupt
ourcase "060: -r all on an unaligned refcount block" mk_unaligned_refblock
ourcase "108: -r all on a refcount block past the end (qemu-img grows the file to it)" mk_refblock_beyond_end
ourcase "060: -r all on a refcount block far past the end" mk_refblock_far_out

# A missing backing file: qemu-img check opens the chain and fails (exit 1), naming it.
N=$((N + 1))
d=$T/c$N
mkdir -p "$d"
(cd "$d" && qemu-img create -q -f qcow2 base.qcow2 1M && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && rm base.qcow2)
(cd "$d" && qemu-img check top.qcow2 > q.out 2> q.err; echo $? > q.rc)
(cd "$d" && "$IMG" check top.qcow2 > o.out 2> o.err; echo $? > o.rc)
if [ "$(cat "$d/q.rc")" = 1 ] && [ "$(cat "$d/o.rc")" = 1 ] && [ ! -s "$d/o.out" ] &&
    grep -q "^qcowprov-img: Could not open 'top.qcow2': Could not open backing file: Could not open '.*base.qcow2': No such file or directory" "$d/o.err"; then
    pass "missing backing file: exit 1 and qemu-img's message"
else
    fail "missing backing file [$d]" "$d/q.err" "$d/o.err" "$d/o.out"
fi

finish
