#!/bin/sh
# Twin images: run the same command script through qemu-io (QEMU's options via
# --image-opts) and through qcowprov-io (the same options via -o) on two images
# created alike by qemu-img, then require:
#   - the same exit status (and the one the scenario expects),
#   - the same stdout (qemu-io's timing lines dropped),
#   - qemu-img compare: identical,
#   - qemu-img check of ours: clean,
#   - qemu-img map --output=json of both equal once host offsets are normalized,
#   - qcowprov-img map/check --output=json of ours byte-equal to qemu-img's.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io python3

EXPECT_RC=0     # exit status both programs must return
STDIN_MODE=0    # 1: qcowprov-io reads the commands from stdin instead of -c
IO_FLAGS=""     # extra flags for both programs (e.g. -r)
IDENTICAL=0     # scenarios whose layout (host offsets) also matched exactly
N=0

# twin NAME SIZE CREATE_OPTS OPEN_OPTS PRE POST COMMANDS
#   PRE runs before the images are created, POST after (functions, or -);
#   both see $d, $A and $B. COMMANDS: one command per line.
twin() {
    name=$1 size=$2 create=$3 opts=$4 pre=$5 post=$6
    case $name in ${ONLY:-*}) ;; *) return ;; esac
    N=$((N + 1))
    d=$T/s$N        # names hold commas, which QEMU's option syntax would split
    mkdir -p "$d"
    printf '%s\n' "$7" > "$d/cmds"
    A=$d/a.qcow2
    B=$d/b.qcow2
    : > "$d/why"
    if [ "$pre" != - ]; then $pre; fi
    for img in "$A" "$B"; do
        if ! qemu-img create -q -f qcow2 ${create:+-o "$create"} "$img" $size > "$d/create.err" 2>&1; then
            fail "$name" "qemu-img create failed" "$d/create.err"
            return
        fi
    done
    if [ "$post" != - ]; then $post; fi

    set --
    while IFS= read -r line; do
        [ -n "$line" ] && set -- "$@" -c "$line"
    done < "$d/cmds"

    qemu-io $IO_FLAGS --image-opts "driver=qcow2,file.filename=$A${opts:+,$opts}" "$@" \
        > "$d/qemu.out" 2> "$d/qemu.err"
    qrc=$?
    if [ "$STDIN_MODE" = 1 ]; then
        "$IO" $IO_FLAGS ${opts:+-o "$opts"} "$B" < "$d/cmds" > "$d/ours.out" 2> "$d/ours.err"
    else
        "$IO" $IO_FLAGS ${opts:+-o "$opts"} "$@" "$B" > "$d/ours.out" 2> "$d/ours.err"
    fi
    orc=$?

    [ "$qrc" -eq "$EXPECT_RC" ] || echo "qemu-io exited $qrc, the scenario expects $EXPECT_RC" >> "$d/why"
    [ "$orc" -eq "$qrc" ] || echo "exit status: qemu-io $qrc, qcowprov-io $orc" >> "$d/why"
    # qemu-io prints timing lines (optional for qcowprov-io) and prints I/O and
    # argument errors on stdout (qcowprov-io prints them on stderr).
    for f in qemu ours; do
        grep -v -e ' ops; ' -e ' failed: ' -e 'can be specified at the same time' -e 'requires -z' \
            "$d/$f.out" > "$d/$f.f"
    done
    if ! cmp -s "$d/qemu.f" "$d/ours.f"; then
        echo "stdout differs (< qemu-io, > qcowprov-io):" >> "$d/why"
        diff "$d/qemu.f" "$d/ours.f" | head -20 >> "$d/why"
    fi
    if ! qemu-img compare "$A" "$B" > "$d/compare.out" 2>&1; then
        echo "qemu-img compare: $(cat "$d/compare.out")" >> "$d/why"
    fi
    if ! qemu-img check "$B" > "$d/check.out" 2>&1; then
        echo "qemu-img check of ours is not clean:" >> "$d/why"
        cat "$d/check.out" >> "$d/why"
    fi
    qemu-img map --output=json "$A" > "$d/mapA.json" 2>> "$d/why"
    qemu-img map --output=json "$B" > "$d/mapB.json" 2>> "$d/why"
    $MAPNORM "$d/mapA.json" > "$d/mapA.norm" 2>> "$d/why"
    $MAPNORM "$d/mapB.json" > "$d/mapB.norm" 2>> "$d/why"
    if ! cmp -s "$d/mapA.norm" "$d/mapB.norm"; then
        echo "qemu-img map (normalized) differs (< qemu's image, > ours):" >> "$d/why"
        diff "$d/mapA.norm" "$d/mapB.norm" | head -20 >> "$d/why"
    fi
    "$IMG" map --output=json "$B" > "$d/ourmapB.json" 2>> "$d/why"
    if ! cmp -s "$d/mapB.json" "$d/ourmapB.json"; then
        echo "qcowprov-img map differs from qemu-img map on our image (< qemu-img, > qcowprov-img):" >> "$d/why"
        diff "$d/mapB.json" "$d/ourmapB.json" | head -20 >> "$d/why"
    fi
    qemu-img check --output=json "$B" > "$d/qchk.json" 2>/dev/null
    qchk=$?
    "$IMG" check --output=json "$B" > "$d/ochk.json" 2>> "$d/why"
    ochk=$?
    if [ "$qchk" -ne "$ochk" ] || ! cmp -s "$d/qchk.json" "$d/ochk.json"; then
        echo "check --output=json: qemu-img exit $qchk, qcowprov-img exit $ochk (< qemu-img, > qcowprov-img):" >> "$d/why"
        diff "$d/qchk.json" "$d/ochk.json" | head -20 >> "$d/why"
    fi
    if [ -s "$d/why" ]; then
        fail "$name  [$d]" "$d/why" "$d/qemu.err" "$d/ours.err"
    else
        if cmp -s "$d/mapA.json" "$d/mapB.json"; then
            IDENTICAL=$((IDENTICAL + 1))
            pass "$name (same host layout as qemu)"
        else
            pass "$name"
        fi
    fi
}

# ---- command scripts ----

BASIC='write -P 1 0 1M
write -P 2 2M 512k
write -f -P 5 1536k 64k
read -P 1 64k 64k
discard 64k 192k
discard 1000 70000
write -z 3000 5000
read -P 0 3000 5000
write -z -u 128k 128k
write -z 1M 128k
write -z -u 1200k 100k
discard 0 64k
flush
write -P 3 300k 10k
discard 2M 1M
write -P 4 3M 1M
discard 3M 64k
write -z -u 3200k 200k
write -z 3500k 4k
discard 3900k 124k
write 0 0
discard 0 0
write -z 0 0
read 0 4M
map
info'

ZEROES='write -P 1 0 4M
write -z 0 64k
write -z -u 64k 64k
write -z 128k 1k
write -z -u 192k 1k
write -z 65000 1000
write -z -u 300k 200k
write -z 1M 1M
write -z -u 2M 1M
read -P 0 2M 1M
write -P 2 2M 64k
write -z -u 3M 64k
write -z 3M 64k
discard 3M 128k
write -z 3M 64k
map'

UNALIGNED='write -P 9 0 4M
discard 1000 70000
write -z 3000 5000
discard 65535 65538
write -z -u 131071 3
discard 4194000 304
write -z -u 4193000 1304
write -P 3 70000 100000
discard 100000 200000
read -P 9 0 1000
read -P 0 3000 5000
write -z -u 500000 1000000
discard 1500001 1048575
map'

ERRORS='read -P 0 0 64k
read 4M 1
write -P 1 4194303 2
discard 4M 64k
write -z 4193792 1024
write -z -P 1 0 1
write -u 0 1
read 0
bogus 1 2
read -P 0 64k 64k'

BACKING='read -P 17 0 64k
write -P 1 64k 64k
write -P 2 100000 5000
read -P 17 0 64k
discard 0 256k
discard 1000 70000
write -z 512k 64k
write -z -u 640k 64k
write -z 800k 3000
write -z -u 1M 512k
discard 2M 512k
read -P 17 1900k 64k
write -P 3 3500k 100k
discard 3500k 64k
write -z -u 3700k 64k
map'

COMPRESSED='read -P 7 0 64k
discard 0 64k
write -P 1 128k 4k
read -P 8 132k 60k
write -z 1M 64k
write -z -u 1088k 64k
discard 2M 64k
discard 3M 1000
read -P 11 3M 64k
read -P 0 1M 64k
write -z 3M 1000
map'

SUBCLUSTERS='write -P 1 0 64k
write -P 2 70000 3000
write -z 2048 4096
write -z -u 10000 5000
write -z -u 16k 16k
discard 0 64k
discard 65536 2048
write -P 3 200k 2k
write -z -u 256k 64k
write -z 320k 2k
write -P 4 400k 64k
write -z -u 400k 32k
discard 430k 100k
map'

DETECT='write -P 1 0 1M
write -P 0 0 64k
write -P 0 100k 10k
write -P 0 192k 128k
write -P 0 2M 64k
map'

READONLY='read -P 1 0 64k
read -P 1 64k 64k
map
info'

# ---- preparation hooks ----

mkbase_qcow2() {
    qemu-img create -q -f qcow2 "$d/base.qcow2" 4M &&
        qemu-io -c 'write -P 17 0 4M' -c 'write -z 1536k 64k' "$d/base.qcow2" > /dev/null
}
mkbase_raw() {
    qemu-img create -q -f raw "$d/base.raw" 4M &&
        qemu-io -f raw -c 'write -P 17 0 3M' "$d/base.raw" > /dev/null
}
mkbase_raw_short() {
    qemu-img create -q -f raw "$d/base.raw" 2M &&
        qemu-io -f raw -c 'write -P 17 0 2M' "$d/base.raw" > /dev/null
}
mkchain() {
    mkbase_qcow2 &&
        qemu-img create -q -f qcow2 -o backing_file=base.qcow2,backing_fmt=qcow2 "$d/mid.qcow2" &&
        qemu-io -c 'write -P 18 2M 512k' -c 'write -z 3M 64k' "$d/mid.qcow2" > /dev/null
}
compress_both() {
    for f in "$A" "$B"; do
        qemu-io -c 'write -c -P 7 0 64k' -c 'write -c -P 8 128k 64k' -c 'write -c -P 9 1M 128k' \
            -c 'write -c -P 10 2M 64k' -c 'write -c -P 11 3M 64k' "$f" > /dev/null
    done
}
fill_both() {
    for f in "$A" "$B"; do
        qemu-io -c 'write -P 1 0 4M' "$f" > /dev/null
    done
}

DNU_ON=discard=unmap,discard-no-unref=on
DNU_OFF=discard=unmap,discard-no-unref=off

# ---- scenarios ----

# QEMU's discard knobs on a default image
for o in "$DNU_ON" "$DNU_OFF" discard=unmap discard=ignore discard=ignore,discard-no-unref=on \
    discard=unmap,pass-discard-request=off discard=unmap,pass-discard-request=off,discard-no-unref=on \
    discard=unmap,pass-discard-other=on; do
    twin "basic[$o]" 4M "" "$o" - - "$BASIC"
done
for o in "$DNU_ON" "$DNU_OFF" discard=ignore discard=unmap,pass-discard-request=off; do
    twin "write-zeroes[$o]" 4M "" "$o" - - "$ZEROES"
    twin "unaligned[$o]" 4M "" "$o" - - "$UNALIGNED"
done

# creation options
for c in extended_l2=on cluster_size=4096 cluster_size=2M refcount_bits=1 refcount_bits=64 lazy_refcounts=on \
    preallocation=metadata; do
    for o in "$DNU_ON" "$DNU_OFF"; do
        twin "basic[$c][$o]" 4M "$c" "$o" - - "$BASIC"
    done
done
for o in "$DNU_ON" "$DNU_OFF" discard=ignore; do
    twin "subclusters[extended_l2=on][$o]" 4M extended_l2=on "$o" - - "$SUBCLUSTERS"
    twin "subclusters-16k[extended_l2=on,cluster_size=16k][$o]" 4M \
        extended_l2=on,cluster_size=16k "$o" - - "$SUBCLUSTERS"
    twin "write-zeroes[extended_l2=on][$o]" 4M extended_l2=on "$o" - - "$ZEROES"
    twin "subclusters-filled[extended_l2=on][$o]" 4M extended_l2=on "$o" - fill_both "$SUBCLUSTERS"
done

# version 2 images
for o in "$DNU_OFF" discard=ignore discard=unmap,pass-discard-request=off; do
    twin "basic[compat=0.10][$o]" 4M compat=0.10 "$o" - - "$BASIC"
    twin "write-zeroes[compat=0.10][$o]" 4M compat=0.10 "$o" - - "$ZEROES"
done
EXPECT_RC=1
twin "dnu-refused-on-v2[compat=0.10][$DNU_ON]" 4M compat=0.10 "$DNU_ON" - - "$BASIC"
twin "detect-zeroes-unmap-refused[discard=ignore,detect-zeroes=unmap]" 4M "" \
    discard=ignore,detect-zeroes=unmap - - "$DETECT"
twin "errors[$DNU_ON]" 4M "" "$DNU_ON" - - "$ERRORS"
EXPECT_RC=0

# detect-zeroes
for o in discard=unmap,detect-zeroes=unmap discard=unmap,detect-zeroes=on discard=ignore,detect-zeroes=on \
    "$DNU_ON,detect-zeroes=unmap"; do
    twin "detect-zeroes[$o]" 4M "" "$o" - - "$DETECT"
done

# backing files
for o in "$DNU_ON" "$DNU_OFF" discard=ignore discard=unmap,pass-discard-request=off; do
    twin "backing-qcow2[$o]" 4M backing_file=base.qcow2,backing_fmt=qcow2 "$o" mkbase_qcow2 - "$BACKING"
    twin "backing-raw[$o]" 4M backing_file=base.raw,backing_fmt=raw "$o" mkbase_raw - "$BACKING"
    twin "backing-raw-shorter[$o]" 4M backing_file=base.raw,backing_fmt=raw "$o" \
        mkbase_raw_short - "$BACKING"
    twin "backing-chain[$o]" 4M backing_file=mid.qcow2,backing_fmt=qcow2 "$o" mkchain - "$BACKING"
    twin "backing-qcow2[extended_l2=on][$o]" 4M \
        extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2 "$o" mkbase_qcow2 - "$BACKING"
    twin "subclusters-backing[extended_l2=on][$o]" 4M \
        extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2 "$o" mkbase_qcow2 - "$SUBCLUSTERS"
done
for o in "$DNU_OFF" discard=ignore; do
    twin "backing-qcow2[compat=0.10][$o]" 4M compat=0.10,backing_file=base.qcow2,backing_fmt=qcow2 \
        "$o" mkbase_qcow2 - "$BACKING"
done

# compressed clusters (written by qemu-io on both twins first)
for o in "$DNU_ON" "$DNU_OFF" discard=ignore; do
    twin "compressed[$o]" 4M "" "$o" - compress_both "$COMPRESSED"
    twin "compressed[extended_l2=on][$o]" 4M extended_l2=on "$o" - compress_both "$COMPRESSED"
done
twin "compressed[compression_type=zstd][$DNU_ON]" 4M compression_type=zstd "$DNU_ON" - \
    compress_both "$COMPRESSED"

# commands from stdin, read-only
STDIN_MODE=1
twin "stdin[$DNU_ON]" 4M "" "$DNU_ON" - - "$BASIC"
STDIN_MODE=0
IO_FLAGS=-r
twin "read-only" 4M "" "" - fill_both "$READONLY"
EXPECT_RC=1
twin "read-only-refuses-writes" 4M "" "" - - "$BASIC"
EXPECT_RC=0
IO_FLAGS=

echo "($IDENTICAL scenarios also had the same host layout as qemu)"
finish
