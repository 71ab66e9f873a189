#!/bin/sh
# Persistent dirty bitmaps, QEMU as the oracle:
#   - twins: the same command script through qemu-io and through qcowprov-io on images
#     whose bitmaps qemu-img made (several granularities, enabled and disabled, cluster
#     sizes 4 KiB to 2 MiB, extended L2, discard=unmap and ignore); every bitmap is then
#     read through `qemu-nbd -B NAME` with `nbdinfo --map=qemu:dirty-bitmap:NAME`: the
#     maps must be equal, `qemu-img info` must list the same bitmaps, ours must check
#     clean;
#   - qcowprov-img bitmap against qemu-img bitmap: the same verbs on twins (add with -g
#     and --disable, enable, disable, clear, merge in the image and from another image
#     with -b, remove, several actions at once), same exit status, same bitmaps and maps;
#     the errors (duplicate, unknown, bad granularity, granularity without --add, -b
#     without --merge, no action, a name too long) exit 1 as qemu-img's;
#   - qcowprov-img info lists bitmaps as qemu-img info does (JSON and human);
#   - incremental-backup: a full backup, writes, an incremental backup that copies only
#     the dirty extents (checked against the map before), to a raw and a qcow2 target,
#     verified by qemu-img compare; the bitmap is clean afterwards.
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io qemu-nbd nbdinfo
BACKUP=$BIN/incremental-backup

# dirty_map IMAGE NAME: the bitmap's extents as QEMU exports them (offset length type).
dirty_map() {
    nbdinfo --map=qemu:dirty-bitmap:"$2" -- [ qemu-nbd -r -f qcow2 -B "$2" "$1" ] |
        awk '{ print $1, $2, $3 }'
}

# bitmaps_of IMAGE: qemu-img info's bitmaps section (JSON), or nothing.
bitmaps_of() {
    qemu-img info --output=json "$1" | python3 -c '
import json, sys
v = json.load(sys.stdin)
print(json.dumps(v["format-specific"]["data"].get("bitmaps", []), sort_keys=True))'
}

N=0

# twin NAME SIZE CREATE_OPTS OPEN_OPTS BITMAPS COMMANDS
#   BITMAPS: "name:granularity:on|off ..." added by qemu-img to both images.
twin() {
    name=$1 size=$2 create=$3 opts=$4 bms=$5 cmds=$6
    N=$((N + 1))
    d=$T/t$N
    mkdir -p "$d"
    : > "$d/why"
    A=$d/a.qcow2
    B=$d/b.qcow2
    for img in "$A" "$B"; do
        qemu-img create -q -f qcow2 ${create:+-o "$create"} "$img" "$size" || { fail "$name: create"; return; }
        for bm in $bms; do
            n=${bm%%:*} rest=${bm#*:} g=${rest%%:*} on=${rest#*:}
            dis=""
            [ "$on" = off ] && dis=--disable
            qemu-img bitmap --add -g "$g" $dis "$img" "$n" || { fail "$name: bitmap --add $bm"; return; }
        done
    done
    set --
    printf '%s\n' "$cmds" > "$d/cmds"
    while IFS= read -r line; do
        [ -n "$line" ] && set -- "$@" -c "$line"
    done < "$d/cmds"
    qemu-io --image-opts "driver=qcow2,file.filename=$A${opts:+,$opts}" "$@" > "$d/q.out" 2>&1 ||
        echo "qemu-io failed" >> "$d/why"
    "$IO" ${opts:+-o "$opts"} "$@" "$B" > "$d/o.out" 2>&1 || echo "qcowprov-io failed" >> "$d/why"
    for bm in $bms; do
        n=${bm%%:*}
        dirty_map "$A" "$n" > "$d/qa.$n" 2>> "$d/why"
        dirty_map "$B" "$n" > "$d/qb.$n" 2>> "$d/why"
        if ! cmp -s "$d/qa.$n" "$d/qb.$n"; then
            echo "bitmap $n differs (< qemu-io, > qcowprov-io):" >> "$d/why"
            diff "$d/qa.$n" "$d/qb.$n" | head -12 >> "$d/why"
        fi
    done
    [ "$(bitmaps_of "$A")" = "$(bitmaps_of "$B")" ] || echo "qemu-img info bitmaps differ" >> "$d/why"
    qemu-img check -q "$B" > "$d/check" 2>&1 || { echo "qemu-img check of ours:" >> "$d/why"; cat "$d/check" >> "$d/why"; }
    qemu-img compare -q "$A" "$B" || echo "contents differ" >> "$d/why"
    if [ -s "$d/why" ]; then fail "$name  [$d]" "$d/why" "$d/o.out"; else pass "$name"; fi
}

SCRIPT='write -P 1 0 100
write -P 2 70000 200000
write -z 1M 70000
write -z -u 2M 300000
discard 3M 123456
discard 3500000 1000
write -P 3 4095 2
flush
write -z 5M 512
discard 6M 2M'

BMS="b512:512:on b4k:4096:on b64k:65536:on b1m:1048576:on off:4096:off"
twin "64k clusters, discard=unmap" 8M "" "discard=unmap" "$BMS" "$SCRIPT"
twin "64k clusters, discard=ignore" 8M "" "discard=ignore" "$BMS" "$SCRIPT"
twin "4k clusters" 8M "cluster_size=4k" "discard=unmap" "$BMS" "$SCRIPT"
twin "2M clusters" 16M "cluster_size=2M" "discard=unmap" "$BMS" "$SCRIPT"
twin "extended L2 32k" 8M "cluster_size=32k,extended_l2=on" "discard=unmap" "$BMS" "$SCRIPT"
twin "512-byte clusters, table grows with truncate" 6M "cluster_size=512" "discard=unmap" \
    "b512:512:on b64k:65536:on" "write -P 7 1M 4k
truncate 40M
write -P 8 39M 64k
discard 39M 64k"
twin "growth within the table" 8M "" "discard=unmap" "$BMS" "write -P 7 1M 4k
truncate 12M
write -P 8 11M 64k"

# ---- qcowprov-img bitmap against qemu-img bitmap ----
# verbs NAME ARGS...: run `bitmap ARGS` on both twins (FILE is substituted).
vcase() {
    vname=$1
    shift
    qemu-img bitmap $(echo "$@" | sed "s|FILE|$VA|; s|SRC|$VSRC|") > "$VD/q.out" 2>&1
    q=$?
    "$IMG" bitmap $(echo "$@" | sed "s|FILE|$VB|; s|SRC|$VSRC|") > "$VD/o.out" 2>&1
    o=$?
    : > "$VD/why"
    [ "$q" = "$o" ] || echo "exit: qemu-img $q, qcowprov-img $o" >> "$VD/why"
    [ "$(bitmaps_of "$VA")" = "$(bitmaps_of "$VB")" ] ||
        { echo "bitmaps differ:" >> "$VD/why"; bitmaps_of "$VA" >> "$VD/why"; bitmaps_of "$VB" >> "$VD/why"; }
    for n in $(bitmaps_of "$VA" | python3 -c 'import json,sys; print(" ".join(b["name"] for b in json.load(sys.stdin)))'); do
        [ "$(dirty_map "$VA" "$n")" = "$(dirty_map "$VB" "$n")" ] || echo "map of $n differs" >> "$VD/why"
    done
    if [ -s "$VD/why" ]; then fail "bitmap $vname" "$VD/why" "$VD/q.out" "$VD/o.out"; else pass "bitmap $vname (exit $q)"; fi
}

VD=$T/verbs
mkdir -p "$VD"
VA=$VD/a.qcow2 VB=$VD/b.qcow2 VSRC=$VD/src.qcow2
for img in "$VA" "$VB" "$VSRC"; do qemu-img create -q -f qcow2 "$img" 32M; done
qemu-img bitmap --add -g 4k "$VSRC" s
qemu-io -c 'write 5M 1M' -c 'write 20M 64k' "$VSRC" > /dev/null
vcase "--add" --add FILE b0
vcase "--add -g 4096 --disable" --add -g 4096 --disable FILE b1
vcase "--add -g 2M" --add -g 2M FILE b2
vcase "duplicate --add" --add FILE b0
for img in "$VA" "$VB"; do qemu-io -c 'write 0 100k' -c 'write 10M 3M' "$img" > /dev/null; done
vcase "--enable" --enable FILE b1
for img in "$VA" "$VB"; do qemu-io -c 'write 30M 128k' "$img" > /dev/null; done
vcase "--merge in the image" --merge b0 FILE b1
vcase "--merge -b" --merge s -b SRC FILE b2
vcase "--merge -b -F qcow2" --merge s -b SRC -F qcow2 FILE b0
vcase "--disable" --disable FILE b0
vcase "--clear" --clear FILE b1
vcase "--remove unknown" --remove FILE nope
vcase "--clear unknown" --clear FILE nope
vcase "-g 3000" --add -g 3000 FILE b3
vcase "-g 256" --add -g 256 FILE b3
vcase "-g without --add" --clear -g 64k FILE b1
vcase "-b without --merge" --clear -b SRC FILE b1
vcase "no action" FILE b1
vcase "--add --clear --disable at once" --add --clear --disable FILE b4
vcase "name too long" --add FILE "$(printf 'x%.0s' $(seq 1 1024))"
vcase "--remove" --remove FILE b2

# ---- info ----
for fmt in json human; do
    qemu-img info --output=$fmt "$VB" | sed -n '/bitmaps/,/refcount.bits/p' > "$VD/qi.$fmt"
    "$IMG" info --output=$fmt "$VB" | sed -n '/bitmaps/,/refcount.bits/p' > "$VD/oi.$fmt"
    if [ -s "$VD/qi.$fmt" ] && cmp -s "$VD/qi.$fmt" "$VD/oi.$fmt"; then
        pass "info --output=$fmt lists the bitmaps as qemu-img"
    else
        diff "$VD/qi.$fmt" "$VD/oi.$fmt" > "$VD/diff.$fmt"
        fail "info --output=$fmt bitmaps" "$VD/diff.$fmt"
    fi
done

# ---- incremental backup ----
for tfmt in raw qcow2; do
    d=$T/backup-$tfmt
    mkdir -p "$d"
    : > "$d/why"
    qemu-img create -q -f qcow2 "$d/vm.qcow2" 64M
    qemu-io -c 'write -P 1 0 5M' -c 'write -P 2 30M 1M' "$d/vm.qcow2" > /dev/null
    "$BACKUP" -f "$tfmt" "$d/vm.qcow2" backup "$d/backup" > "$d/full.out" 2>&1 || echo "full backup failed" >> "$d/why"
    grep -q '^full: copied 6291456 of 67108864 bytes' "$d/full.out" || echo "full backup: $(cat "$d/full.out")" >> "$d/why"
    "$IO" -o discard=unmap -c 'write -P 3 1M 100k' -c 'write -z 31M 4k' -c 'discard 40M 1M' \
        -c 'write -P 4 63M 1M' "$d/vm.qcow2" > /dev/null || echo "writes failed" >> "$d/why"
    dirty=$(dirty_map "$d/vm.qcow2" backup | awk '$3 == 1 { s += $2 } END { print s + 0 }')
    "$BACKUP" -f "$tfmt" "$d/vm.qcow2" backup "$d/backup" > "$d/inc.out" 2>&1 || echo "incremental backup failed" >> "$d/why"
    grep -q "^incremental: copied $dirty of 67108864 bytes in 4 extents, verified" "$d/inc.out" ||
        echo "incremental backup copied other than the $dirty dirty bytes: $(cat "$d/inc.out")" >> "$d/why"
    qemu-img compare -q -f qcow2 -F "$tfmt" "$d/vm.qcow2" "$d/backup" || echo "backup differs" >> "$d/why"
    [ "$(dirty_map "$d/vm.qcow2" backup)" = "0 67108864 0" ] || echo "bitmap not clear after the backup" >> "$d/why"
    qemu-img check -q "$d/vm.qcow2" || echo "image not clean" >> "$d/why"
    if [ -s "$d/why" ]; then fail "incremental backup to $tfmt" "$d/why"; else pass "incremental backup to $tfmt ($dirty dirty bytes copied)"; fi
done

finish
