#!/bin/sh
# Regenerate the seed corpora of both targets with qemu-img / qemu-io (qemu-utils).
# Every seed is a small valid image (512 B to 16 KiB clusters, tiny virtual sizes: a few
# KiB each) except the one 64 KiB-cluster image, which is the 192 KiB qemu-img makes.
#
#   corpus/open_image/seed-<name>          the image
#   corpus/open_image_options/seed-<name>  4 prefix bytes (options, flags, shift) + image
set -eu
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mk() { # name size opts...
    name=$1 size=$2
    shift 2
    qemu-img create -q -f qcow2 "$@" "$work/$name" "$size"
}
io() { # name qemu-io commands...
    name=$1
    shift
    for c in "$@"; do set -- "$@" -c "$c"; shift; done
    qemu-io -f qcow2 "$@" "$work/$name" >/dev/null
}

mk c512 64k -o cluster_size=512
io c512 "write -P 0x11 0 8k" "write -P 0x22 40k 1k"

mk c4k 256k -o cluster_size=4k
io c4k "write -P 0x11 0 12k" "write -P 0x22 200k 4k" "write -z 128k 8k"

mk c64k 1M -o cluster_size=64k

mk v2 128k -o cluster_size=4k,compat=0.10
io v2 "write -P 0x33 4k 8k" "write -P 0x44 100k 512"

mk ext-l2 256k -o cluster_size=16k,extended_l2=on
io ext-l2 "write -P 0x55 0 2k" "write -P 0x66 20k 3k" "write -z 64k 1k"

mk rc1 64k -o cluster_size=4k,refcount_bits=1
io rc1 "write -P 0x77 0 8k"

mk rc64 64k -o cluster_size=4k,refcount_bits=64
io rc64 "write -P 0x78 8k 8k"

mk lazy 64k -o cluster_size=4k,lazy_refcounts=on
io lazy "write -P 0x79 0 4k"

# Killed with writes after lazy refcounts: the dirty bit is set, open repairs.
mk lazy-dirty 64k -o cluster_size=4k,lazy_refcounts=on
(io lazy-dirty "write -P 0x7a 0 8k" "write -P 0x7b 32k 4k" "abort") 2>/dev/null || true

mk compressed 64k -o cluster_size=4k
io compressed "write -c -P 0x7c 0 4k" "write -c -P 0x7d 16k 4k" "write -P 0x7e 32k 4k"

mk zstd 64k -o cluster_size=4k,compression_type=zstd
io zstd "write -c -P 0x7f 4k 4k"

mk snapshot 64k -o cluster_size=4k
io snapshot "write -P 0x01 0 8k"
qemu-img snapshot -c snap1 "$work/snapshot"
io snapshot "write -P 0x02 4k 4k" "write -P 0x03 40k 4k"

mk backing 64k -o cluster_size=4k,backing_file=does-not-exist.raw,backing_fmt=raw -u
io backing "write -P 0x04 8k 4k" 2>/dev/null || true

mk prealloc 16k -o cluster_size=4k,preallocation=metadata

mk bitmap 64k -o cluster_size=4k
qemu-img bitmap --add "$work/bitmap" bm0
io bitmap "write -P 0x05 0 4k"

mk data-file 64k -o cluster_size=4k,data_file="$work/data.raw"

for t in open_image open_image_options; do
    mkdir -p "corpus/$t"
    rm -f "corpus/$t"/seed-*
done
i=0
for f in c512 c4k c64k v2 ext-l2 rc1 rc64 lazy lazy-dirty compressed zstd snapshot \
         backing prealloc bitmap data-file; do
    cp "$work/$f" "corpus/open_image/seed-$f"
    # Options prefix: a different policy per seed, flags cycling through the knobs.
    sel=$(printf '%03o' $((i % 16)))
    flags=$(printf '%03o' $(((i * 37) % 128)))
    { printf "\\$sel\\$flags\\000\\00$((i % 8))"; cat "$work/$f"; } \
        >"corpus/open_image_options/seed-$f"
    i=$((i + 1))
done
ls -l corpus/*/
