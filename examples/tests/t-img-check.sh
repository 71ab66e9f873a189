#!/bin/sh
# qcowprov-img check against qemu-img check: the same exit status (0 clean,
# 2 corruptions, 3 leaks, 1 check failed) and the same output, human and JSON
# (leaks, corruptions, cluster counts, image end offset), on clean, leaking and
# hand-corrupted images; and after repairs (-r leaks, -r all) the same repaired
# image as qemu-img's.
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

finish
