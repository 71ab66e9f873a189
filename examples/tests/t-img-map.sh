#!/bin/sh
# qcowprov-img map against qemu-img map on images made by qemu-img and qemu-io:
# --output=json byte for byte, the human table byte for byte, same exit status.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io

N=0

# mapcase NAME MAKE: MAKE (a function) builds $d/img.qcow2 (and what it needs).
mapcase() {
    name=$1
    N=$((N + 1))
    d=$T/m$N
    mkdir -p "$d"
    : > "$d/why"
    if ! (cd "$d" && $2) > "$d/make.out" 2>&1; then
        fail "$name" "making the image failed" "$d/make.out"
        return
    fi
    for fmt in json human; do
        (cd "$d" && qemu-img map --output=$fmt img.qcow2) > "$d/q.$fmt" 2> "$d/q.$fmt.err"
        q=$?
        (cd "$d" && "$IMG" map --output=$fmt img.qcow2) > "$d/o.$fmt" 2> "$d/o.$fmt.err"
        o=$?
        [ "$q" -eq "$o" ] || echo "--output=$fmt: qemu-img exit $q, qcowprov-img exit $o" >> "$d/why"
        if ! cmp -s "$d/q.$fmt" "$d/o.$fmt"; then
            echo "--output=$fmt differs (< qemu-img, > qcowprov-img):" >> "$d/why"
            diff "$d/q.$fmt" "$d/o.$fmt" | head -24 >> "$d/why"
        fi
    done
    # The same from another directory (relative backing names resolve against the image).
    qemu-img map "$d/img.qcow2" > "$d/q.abs" 2>/dev/null
    q=$?
    "$IMG" map "$d/img.qcow2" > "$d/o.abs" 2>/dev/null
    o=$?
    if [ "$q" -ne "$o" ] || ! cmp -s "$d/q.abs" "$d/o.abs"; then
        echo "human map by absolute path differs:" >> "$d/why"
        diff "$d/q.abs" "$d/o.abs" | head -10 >> "$d/why"
    fi
    if [ -s "$d/why" ]; then
        fail "$name  [$d]" "$d/why" "$d/o.json.err"
    else
        pass "$name"
    fi
}

qio() { qemu-io "$@"; }

mk_empty() { qemu-img create -q -f qcow2 img.qcow2 0; }
mk_fresh() { qemu-img create -q -f qcow2 img.qcow2 64M; }
mk_plain() {
    qemu-img create -q -f qcow2 img.qcow2 16M &&
        qio -c 'write -P 1 0 64k' -c 'write -P 2 1M 200k' -c 'write -P 3 5M 64k' -c 'write -P 4 4M 64k' \
            -c 'write -z 8M 1M' -c 'write -P 5 10M 1M' -c 'write -z 10M 128k' -c 'write -z -u 10747904 64k' \
            -c 'write -P 6 15M 1M' img.qcow2 &&
        qio -c 'write 0 1' img.qcow2
}
mk_discarded() {
    qemu-img create -q -f qcow2 img.qcow2 8M &&
        qio -c 'write -P 1 0 8M' img.qcow2 &&
        qemu-io --image-opts driver=qcow2,file.filename=img.qcow2,discard=unmap,discard-no-unref=on \
            -c 'discard 1M 1M' -c 'write -z -u 3M 64k' > /dev/null &&
        qemu-io --image-opts driver=qcow2,file.filename=img.qcow2,discard=unmap \
            -c 'discard 5M 1M' -c 'write -z -u 7M 64k' -c 'write -z 7471104 64k' > /dev/null
}
mk_prealloc_metadata() { qemu-img create -q -f qcow2 -o preallocation=metadata img.qcow2 4M; }
mk_prealloc_falloc() {
    qemu-img create -q -f qcow2 -o preallocation=falloc img.qcow2 4M && qio -c 'write -P 1 1M 64k' img.qcow2
}
mk_prealloc_full() { qemu-img create -q -f qcow2 -o preallocation=full img.qcow2 4M; }
mk_v2() {
    qemu-img create -q -f qcow2 -o compat=0.10 img.qcow2 4M &&
        qio -c 'write -P 1 0 1M' -c 'write -z 128k 128k' -c 'write -z 2M 64k' img.qcow2
}
mk_backing_qcow2() {
    qemu-img create -q -f qcow2 base.qcow2 4M &&
        qio -c 'write -P 1 0 2M' -c 'write -z 1M 64k' -c 'write -P 2 3M 64k' base.qcow2 &&
        qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 &&
        qio -c 'write -P 3 64k 4k' -c 'write -z 512k 64k' -c 'write -P 4 2M 64k' img.qcow2
}
mk_backing_shorter() {
    qemu-img create -q -f qcow2 base.qcow2 2M &&
        qio -c 'write -P 1 0 2M' base.qcow2 &&
        qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 8M &&
        qio -c 'write -P 3 1M 4k' -c 'write -P 4 5M 64k' img.qcow2
}
mk_chain() {
    qemu-img create -q -f qcow2 base.qcow2 4M &&
        qio -c 'write -P 1 0 4M' base.qcow2 &&
        qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 &&
        qio -c 'write -P 2 1M 1M' -c 'write -z 2M 128k' mid.qcow2 &&
        qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 img.qcow2 6M &&
        qio -c 'write -P 3 0 64k' -c 'write -z 1114112 64k' -c 'write -P 5 5M 64k' img.qcow2
}
mk_backing_raw() {
    qemu-img create -q -f raw base.raw 4M &&
        qio -f raw -c 'write -P 1 0 64k' -c 'write -P 2 1M 100k' -c 'write -P 3 3M 4k' base.raw &&
        qemu-img create -q -f qcow2 -b base.raw -F raw img.qcow2 &&
        qio -c 'write -P 4 2M 64k' img.qcow2
}
mk_backing_raw_shorter() {
    qemu-img create -q -f raw base.raw 1M &&
        qio -f raw -c 'write -P 1 0 512k' base.raw &&
        qemu-img create -q -f qcow2 -b base.raw -F raw img.qcow2 4M &&
        qio -c 'write -P 4 2M 64k' img.qcow2
}
mk_extended_l2() {
    qemu-img create -q -f qcow2 -o extended_l2=on img.qcow2 4M &&
        qio -c 'write -P 1 0 2k' -c 'write -P 2 8k 6k' -c 'write -z 16k 4k' -c 'write -P 3 64k 64k' \
            -c 'write -z 70k 2k' -c 'write -z -u 1M 64k' -c 'write -P 4 2098152 3000' img.qcow2
}
mk_extended_l2_backing() {
    qemu-img create -q -f qcow2 base.qcow2 4M &&
        qio -c 'write -P 1 0 4M' base.qcow2 &&
        qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 img.qcow2 &&
        qio -c 'write -P 2 0 2k' -c 'write -P 3 10k 2k' -c 'write -z 64k 8k' -c 'write -z -u 128k 64k' \
            -c 'write -P 4 1M 64k' -c 'write -z 1050624 2k' img.qcow2
}
mk_compressed() {
    qemu-img create -q -f qcow2 img.qcow2 4M &&
        qio -c 'write -c -P 1 0 64k' -c 'write -c -P 2 64k 64k' -c 'write -P 3 128k 64k' \
            -c 'write -c -P 4 1M 128k' img.qcow2
}
mk_big() {
    qemu-img create -q -f qcow2 img.qcow2 3G &&
        qio -c 'write -P 1 0 64k' -c 'write -P 2 1023M 2M' -c 'write -P 3 2G 512' -c 'write -z 2148532224 64k' \
            -c 'write -P 4 3221159936 64k' img.qcow2
}
mk_small_clusters() {
    qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 1M &&
        qio -c 'write -P 1 0 3000' -c 'write -z 4k 1k' -c 'write -P 2 100k 10k' img.qcow2
}
mk_big_clusters() {
    qemu-img create -q -f qcow2 -o cluster_size=2M img.qcow2 16M &&
        qio -c 'write -P 1 0 2M' -c 'write -P 2 4M 2M' -c 'write -z 8M 2M' img.qcow2
}
mk_unaligned_size() {
    qemu-img create -q -f qcow2 img.qcow2 1000000 &&
        qio -c 'write -P 1 983040 16896' img.qcow2
}

mapcase "empty (0 bytes)" mk_empty
mapcase "fresh 64M" mk_fresh
mapcase "plain data and zero clusters" mk_plain
mapcase "discarded (discard-no-unref on and off)" mk_discarded
mapcase "version 2" mk_v2
mapcase "qcow2 backing" mk_backing_qcow2
mapcase "qcow2 backing shorter than the overlay" mk_backing_shorter
mapcase "chain of three" mk_chain
mapcase "raw backing with holes" mk_backing_raw
mapcase "raw backing shorter than the overlay" mk_backing_raw_shorter
mapcase "extended L2" mk_extended_l2
mapcase "extended L2 over a backing file" mk_extended_l2_backing
mapcase "compressed clusters" mk_compressed
mapcase "3G sparse (1 GiB probes)" mk_big
mapcase "512-byte clusters" mk_small_clusters
mapcase "2M clusters" mk_big_clusters
mapcase "size not a multiple of the cluster size" mk_unaligned_size
mapcase "preallocation=falloc" mk_prealloc_falloc
mapcase "preallocation=full" mk_prealloc_full
mapcase "preallocation=metadata (qemu reports host holes in data clusters as zero)" mk_prealloc_metadata

finish
