# The differential scenarios, shared by t-io-twins.sh (qemu-io vs qcowprov-io) and
# t-nbdkit.sh (qemu-io on QEMU's qcow2 driver vs qemu-io over NBD on the nbdkit plugin).
# Source it, define twin() and call scenarios:
#   twin NAME SIZE CREATE_OPTS OPEN_OPTS PRE POST COMMANDS
# with EXPECT_RC (exit status both runs must return), STDIN_MODE (1: commands from stdin)
# and IO_FLAGS (-r: read-only) set around the calls.

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

scenarios() {

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
}
