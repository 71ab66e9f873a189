#!/bin/sh
# A real guest on the library: Debian's stock kernel boots in qemu-system-x86_64 (KVM when
# it works here, TCG otherwise) with a virtio-blk disk on the nbdkit plugin's export,
# discard on. Inside (examples/guest/init): mkfs.ext4, rounds of filling the filesystem to
# 65%, deleting every other file and fstrim, then md5sum of every file; power off. A second,
# cold boot runs e2fsck -n and checks every checksum.
#
# The disk starts "old": every cluster written once in scrambled order (the layout on
# which QEMU's discard=unmap grows the file). The same old image and the same workload run
# for each provisioning mode through the plugin, and on QEMU's own qcow2 driver with
# discard=unmap, with and without discard-no-unref=on, in this run as the comparison.
# On the host: qemu-img check clean, file length and host allocation per row, written to
# $BIN/guest-results.tsv (run, file_len_pct, host_alloc_pct, check) when the run passed:
# `make demo-guest` (guest-table.sh) prints it.
#
# Knobs: GUEST_SIZE (256M), GUEST_ROUNDS (5), GUEST_JOBS (rows booted at once, 2),
# GUEST_ONLY (a pattern of row names).
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 qemu-img qemu-io nbdkit python3 apt-get dpkg-deb timeout

PLUGIN=$BIN/nbdkit-qcowprov-plugin.so
G=$BIN/guest
SIZE=${GUEST_SIZE:-256M}
ROUNDS=${GUEST_ROUNDS:-5}
JOBS=${GUEST_JOBS:-2}
RESULTS=$BIN/guest-results.tsv
BOOT_TIMEOUT=900

if [ ! -f "$PLUGIN" ]; then
    fail "plugin built" "$PLUGIN missing (make -C examples plugin)"
    finish
    exit 1
fi

# ---- the kernel and initramfs (cached in build/guest) ----
if [ ! -f "$G/initramfs" ] || [ ! -f "$G/vmlinux" ] ||
    [ "$EX/guest/init" -nt "$G/initramfs" ] || [ "$EX/guest/build-initramfs.sh" -nt "$G/initramfs" ]; then
    if ! sh "$EX/guest/build-initramfs.sh" "$G" > "$T/build.log" 2>&1; then
        fail "guest kernel and initramfs built" "$T/build.log"
        finish
        exit 1
    fi
fi
pass "guest kernel $(cat "$G/kernel-version") and initramfs"

# boot LOG MODE DRIVE_OPTS...: one boot; the guest's last "QCP RESULT" line is its verdict.
boot() {
    log=$1 mode=$2
    shift 2
    timeout "$BOOT_TIMEOUT" qemu-system-x86_64 -nodefaults -no-user-config -display none \
        -serial stdio -no-reboot $ACCEL -m 512 -kernel "$G/vmlinux" -initrd "$G/initramfs" \
        -append "console=ttyS0 panic=-1 quiet qcp.mode=$mode qcp.rounds=$ROUNDS" \
        "$@" > "$log" 2>&1 < /dev/null
}

# ---- accelerator: KVM if a stock kernel boots on it, else TCG ----
ACCEL="-accel kvm -cpu host"
BOOT_TIMEOUT=30
if [ -r /dev/kvm ] && boot "$T/kvm.log" probe && grep -a -q 'QCP RESULT ok probe' "$T/kvm.log"; then
    pass "accelerator: KVM"
else
    ACCEL="-accel tcg -cpu max"
    BOOT_TIMEOUT=120
    if boot "$T/tcg.log" probe && grep -a -q 'QCP RESULT ok probe' "$T/tcg.log"; then
        pass "accelerator: TCG (KVM cannot boot the guest here)"
    else
        fail "the guest boots under TCG" "$T/tcg.log"
        finish
        exit 1
    fi
fi

BOOT_TIMEOUT=900

# ---- the old image: every cluster written once, in scrambled order ----
OLD=$T/old.qcow2
qemu-img create -q -f qcow2 "$OLD" "$SIZE"
vsize=$(qemu-img info --output=json "$OLD" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
python3 - "$vsize" > "$T/old.cmds" <<'EOF'
import random, sys
clusters = int(sys.argv[1]) // 65536
order = list(range(clusters))
random.Random(14).shuffle(order)
for i, c in enumerate(order):
    print("write -q -P %d %d 65536" % (1 + i % 250, c * 65536))
EOF
if qemu-io "$OLD" < "$T/old.cmds" > "$T/old.out" 2>&1 && qemu-img check "$OLD" > /dev/null 2>&1; then
    pass "old image: $SIZE, every cluster written once in scrambled order"
else
    fail "old image" "$T/old.out"
    finish
    exit 1
fi

DISK="-device virtio-blk-pci,drive=d0,discard_granularity=65536"

# row NAME KIND OPTIONS: churn boot + verify boot on a copy of the old image; writes
# $T/NAME.row ("name<TAB>len%<TAB>alloc%<TAB>check<TAB>seconds<TAB>files") or $T/NAME.why.
# key NAME: a directory name for a row (QEMU's option syntax splits paths at commas)
key() {
    echo "$1" | tr ' ,=' '_+-'
}

row() {
    name=$1 kind=$2 opts=$3
    d=$T/$(key "$name")
    mkdir -p "$d"
    img=$d/disk.qcow2
    cp --sparse=always "$OLD" "$img"
    start=$(date +%s)
    for mode in churn verify; do
        if [ "$kind" = nbdkit ]; then
            # nbdkit's captive mode: the server lives exactly as long as the guest.
            cat > "$d/run.sh" <<EOF
exec timeout $BOOT_TIMEOUT qemu-system-x86_64 -nodefaults -no-user-config -display none \\
    -serial stdio -no-reboot $ACCEL -m 512 -kernel "$G/vmlinux" -initrd "$G/initramfs" \\
    -append "console=ttyS0 panic=-1 quiet qcp.mode=$mode qcp.rounds=$ROUNDS" \\
    -drive "if=none,id=d0,format=raw,discard=unmap,file.driver=nbd,file.server.type=unix,file.server.path=\$1" \\
    $DISK
EOF
            nbdkit -U - "$PLUGIN" file="$img" options="$opts" --run "sh '$d/run.sh' \"\$unixsocket\"" \
                > "$d/$mode.log" 2>&1 < /dev/null
        else
            boot "$d/$mode.log" "$mode" -drive "if=none,id=d0,format=qcow2,file=$img,$opts" $DISK
        fi
        if ! grep -a -q "QCP RESULT ok $mode" "$d/$mode.log"; then
            echo "$mode boot: $(grep -a 'QCP RESULT' "$d/$mode.log" || echo 'no result')" > "$d.why"
            tail -20 "$d/$mode.log" >> "$d.why"
            return
        fi
    done
    secs=$(( $(date +%s) - start ))
    files=$(grep -a 'QCP RESULT ok verify' "$d/verify.log" | sed 's/.*files //')
    if qemu-img check "$img" > "$d/check.out" 2>&1; then
        check=clean
    else
        check="rc=$? $(grep -E -o '[0-9]+ (leaked clusters|errors)' "$d/check.out" | tr '\n' ' ')"
    fi
    len=$(stat -c %s "$img")
    alloc=$(( $(stat -c %b "$img") * $(stat -c %B "$img") ))
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" \
        "$(awk "BEGIN { printf \"%.1f\", 100 * $len / $vsize }")" \
        "$(awk "BEGIN { printf \"%.1f\", 100 * $alloc / $vsize }")" "$check" "$secs" "$files" > "$d.row"
}

ROWS="provision=off:nbdkit:provision=off
provision=full:nbdkit:provision=full
provision=metadata:nbdkit:provision=metadata
provision=thin:nbdkit:provision=thin
provision=reuse:nbdkit:provision=reuse
qemu discard=unmap:qemu:discard=unmap
qemu discard=unmap,discard-no-unref=on:qemu:discard=unmap,discard-no-unref=on"

# Rows run GUEST_JOBS at a time (each guest is one emulated CPU); layouts vary from run to
# run with guest writeback timing anyway, so only the rows of one run are compared.
names=""
running=0
IFS_SAVE=$IFS
IFS='
'
for r in $ROWS; do
    name=${r%%:*}
    case $name in ${GUEST_ONLY:-*}) ;; *) continue ;; esac
    rest=${r#*:}
    kind=${rest%%:*}
    opts=${rest#*:}
    names="$names$name
"
    IFS=$IFS_SAVE
    row "$name" "$kind" "$opts" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
        wait
        running=0
    fi
    IFS='
'
done
IFS=$IFS_SAVE
wait

printf 'run\tfile_len_pct\thost_alloc_pct\tcheck\n' > "$RESULTS.tmp"
printf '%-40s %9s %11s %7s %6s  %s\n' run "file len" "host alloc" seconds files "qemu-img check"
while IFS= read -r name; do
    [ -n "$name" ] || continue
    k=$(key "$name")
    if [ -f "$T/$k.row" ]; then
        IFS='	' read -r n len alloc check secs files < "$T/$k.row"
        printf '%s\t%s\t%s\t%s\n' "$n" "$len" "$alloc" "$check" >> "$RESULTS.tmp"
        printf '%-40s %8s%% %10s%% %7s %6s  %s\n' "$n" "$len" "$alloc" "$secs" "$files" "$check"
    fi
done <<EOF
$names
EOF
echo "(guest: $SIZE disk, $ROUNDS rounds, $ACCEL)"

# ---- verdicts ----
pct() {
    awk -F'\t' -v n="$1" -v c="$2" '$1 == n { print $c }' "$RESULTS.tmp"
}
while IFS= read -r name; do
    [ -n "$name" ] || continue
    k=$(key "$name")
    if [ -f "$T/$k.why" ]; then
        fail "$name: churn and verify boots" "$T/$k.why"
        continue
    fi
    check=$(pct "$name" 4)
    if [ "$check" = clean ]; then
        pass "$name: guest data verified after a cold boot, qemu-img check clean"
    else
        fail "$name: qemu-img check clean" "$check" "$T/$k/check.out"
    fi
    len=$(pct "$name" 2)
    alloc=$(pct "$name" 3)
    # What each mode promises about the file and the host (the image starts at 100%/100%).
    # Modes that free clusters (thin, reuse) may grow the file by the free quarantine's
    # slack, a sixteenth of the disk (quarantine-slack), before freed clusters are reused.
    case $name in
        provision=off | provision=full) want="$len <= 101 && $alloc >= 99" ;;
        provision=reuse) want="$len <= 107 && $alloc >= 99" ;;
        provision=metadata) want="$len <= 101 && $alloc <= 75" ;;
        provision=thin) want="$len <= 107 && $alloc <= 75" ;;
        *) want="" ;;
    esac
    if [ -n "$want" ]; then
        if awk "BEGIN { exit !($want) }"; then
            pass "$name: file length $len%, host allocation $alloc% ($want)"
        else
            fail "$name: file length $len%, host allocation $alloc% ($want)"
        fi
    fi
done <<EOF
$names
EOF
# The table (make demo-guest prints it) is written only by a run of every row that passed.
if [ -n "${GUEST_ONLY:-}" ]; then
    rm -f "$RESULTS.tmp"
    echo "no table written: GUEST_ONLY ran part of the rows"
elif [ "$FAILS" -eq 0 ]; then
    mv "$RESULTS.tmp" "$RESULTS"
    echo "table in $RESULTS"
else
    rm -f "$RESULTS.tmp"
    echo "no table written: the run failed"
fi
finish
