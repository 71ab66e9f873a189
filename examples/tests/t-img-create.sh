#!/bin/sh
# qcowprov-img create: the image passes qemu-img check, qemu-img info shows what
# was asked for (compared with a twin made by qemu-img create with the same
# arguments), qemu-io can write and read it, and qcowprov-img info agrees with
# qemu-img info.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io python3

N=0

# Fields of qemu-img info --output=json that must agree.
infodiff() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
keys = ["virtual-size", "cluster-size", "format", "backing-filename", "backing-filename-format",
        "full-backing-filename"]
bad = [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
fa, fb = a["format-specific"]["data"], b["format-specific"]["data"]
bad += [f"format-specific {k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
        if fa.get(k) != fb.get(k)]
print("\n".join(bad))
sys.exit(1 if bad else 0)
EOF
}

# createcase NAME PRE ARGS...: PRE (function or -) runs first in $d; ARGS are the
# create arguments after the subcommand, with FILE standing for the image name.
createcase() {
    name=$1 pre=$2
    shift 2
    N=$((N + 1))
    d=$T/c$N
    mkdir -p "$d"
    : > "$d/why"
    if [ "$pre" != - ] && ! (cd "$d" && $pre) > "$d/pre.out" 2>&1; then
        fail "$name" "preparing failed" "$d/pre.out"
        return
    fi
    ours="" theirs=""
    for a in "$@"; do
        if [ "$a" = FILE ]; then
            ours="$ours ours.qcow2" theirs="$theirs theirs.qcow2"
        else
            ours="$ours $a" theirs="$theirs $a"
        fi
    done
    # shellcheck disable=SC2086 # the arguments hold no blanks
    if ! (cd "$d" && "$IMG" create $ours) > "$d/create.out" 2>&1; then
        fail "$name" "qcowprov-img create$ours failed" "$d/create.out"
        return
    fi
    # shellcheck disable=SC2086
    if ! (cd "$d" && qemu-img create -q -f qcow2 $theirs) > "$d/qcreate.out" 2>&1; then
        fail "$name" "qemu-img create$theirs failed" "$d/qcreate.out"
        return
    fi
    (cd "$d" && qemu-img check ours.qcow2) > "$d/check.out" 2>&1 ||
        { echo "qemu-img check:"; cat "$d/check.out"; } >> "$d/why"
    (cd "$d" && qemu-img info --output=json ours.qcow2) > "$d/ours.info" 2>> "$d/why"
    (cd "$d" && qemu-img info --output=json theirs.qcow2) > "$d/theirs.info" 2>> "$d/why"
    infodiff "$d/theirs.info" "$d/ours.info" > "$d/info.diff" ||
        { echo "qemu-img info, qemu-img's image vs ours:"; cat "$d/info.diff"; } >> "$d/why"
    (cd "$d" && "$IMG" info --output=json ours.qcow2) > "$d/ours.oinfo" 2>> "$d/why"
    infodiff "$d/ours.info" "$d/ours.oinfo" > "$d/oinfo.diff" ||
        { echo "info of our image, qemu-img vs qcowprov-img:"; cat "$d/oinfo.diff"; } >> "$d/why"
    (cd "$d" && qemu-img map --output=json ours.qcow2) > "$d/ours.map" 2>> "$d/why"
    (cd "$d" && qemu-img map --output=json theirs.qcow2) > "$d/theirs.map" 2>> "$d/why"
    $MAPNORM "$d/ours.map" > "$d/ours.norm" && $MAPNORM "$d/theirs.map" > "$d/theirs.norm"
    cmp -s "$d/ours.norm" "$d/theirs.norm" ||
        { echo "qemu-img map (normalized), < qemu-img's image, > ours:"; diff "$d/theirs.norm" "$d/ours.norm"; } >> "$d/why"
    if ! grep -q '"virtual-size": 0,' "$d/ours.info" &&
        ! (cd "$d" && qemu-io -c 'write -P 7 0 64k' -c 'read -P 7 0 64k' ours.qcow2 &&
        qemu-img check ours.qcow2) > "$d/use.out" 2>&1; then
        { echo "qemu-io write/read or the check after it failed:"; cat "$d/use.out"; } >> "$d/why"
    fi
    if [ -s "$d/why" ]; then
        fail "$name  [$d]" "$d/why"
    else
        pass "$name"
    fi
}

mkbase_qcow2() { qemu-img create -q -f qcow2 base.qcow2 24M && qemu-io -c 'write -P 1 0 1M' base.qcow2; }
mkbase_raw() { qemu-img create -q -f raw base.raw 8M; }

createcase "defaults" - FILE 64M
createcase "size with a fraction (1.5G)" - FILE 1.5G
createcase "hex size" - FILE 0x100000
createcase "size rounded up to 512" - FILE 1000000
createcase "size 0" - FILE 0
createcase "size in -o" - -o size=8M FILE
createcase "cluster_size=512" - -o cluster_size=512 FILE 4M
createcase "cluster_size=4096" - -o cluster_size=4096 FILE 64M
createcase "cluster_size=2M" - -o cluster_size=2M FILE 1G
createcase "compat=0.10" - -o compat=0.10 FILE 64M
createcase "compat=1.1" - -o compat=1.1 FILE 64M
createcase "extended_l2=on" - -o extended_l2=on FILE 64M
createcase "extended_l2=on,cluster_size=16k" - -o extended_l2=on,cluster_size=16k FILE 64M
createcase "lazy_refcounts=on" - -o lazy_refcounts=on FILE 64M
createcase "refcount_bits=1" - -o refcount_bits=1 FILE 64M
createcase "refcount_bits=8" - -o refcount_bits=8 FILE 64M
createcase "refcount_bits=64" - -o refcount_bits=64 FILE 64M
createcase "compression_type=zstd" - -o compression_type=zstd FILE 64M
createcase "preallocation=metadata" - -o preallocation=metadata FILE 8M
createcase "preallocation=falloc" - -o preallocation=falloc FILE 8M
createcase "preallocation=full" - -o preallocation=full FILE 8M
createcase "many options" - -o cluster_size=128k,extended_l2=on,lazy_refcounts=on,refcount_bits=32 FILE 3G
createcase "qcow2 backing, size from the backing file" mkbase_qcow2 -b base.qcow2 -F qcow2 FILE
createcase "qcow2 backing, larger overlay" mkbase_qcow2 -b base.qcow2 -F qcow2 FILE 64M
createcase "raw backing" mkbase_raw -b base.raw -F raw FILE
createcase "backing in -o" mkbase_raw -o backing_file=base.raw,backing_fmt=raw,cluster_size=1M FILE

finish
