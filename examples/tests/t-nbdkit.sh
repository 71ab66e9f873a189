#!/bin/sh
# The nbdkit plugin (examples/servers/nbdkit-qcowprov) under real NBD clients:
#   - the differential scenarios of t-io-twins.sh again, as qemu-io over NBD on the plugin
#     (twin B) against qemu-io on QEMU's own qcow2 driver (twin A), same options: same
#     output, qemu-img compare identical, qemu-img check clean, same normalized map;
#     then `nbdinfo --map` of the plugin's export = qemu-nbd's export of the same image =
#     qcowprov-img map, as NBD extents
#   - startup: bad parameters refused with a message naming the problem
#   - what the export advertises (block sizes from the image, multi-conn, FUA, ...)
#   - read-only exports, library errors reaching the client as errno with their message
#   - qemu-img convert from and to the export; nbdcopy over several connections
. "$(dirname "$0")/lib.sh"
need qemu-img qemu-io qemu-nbd nbdkit nbdinfo nbdcopy python3

PLUGIN=$BIN/nbdkit-qcowprov-plugin.so
NBDMAP="python3 $TESTS/nbdmap.py"
if [ ! -f "$PLUGIN" ]; then
    fail "plugin built" "$PLUGIN missing (make -C examples plugin)"
    finish
    exit 1
fi

EXPECT_RC=0
STDIN_MODE=0    # the NBD runs always pass commands with -c
IO_FLAGS=""
N=0

# nbdmaps D IMAGE: nbdinfo --map through the plugin and through qemu-nbd, and
# qcowprov-img map, normalized to NBD extents; differences go to $D/why.
nbdmaps() {
    dd=$1 im=$2
    nbdinfo --map -- [ nbdkit "$PLUGIN" file="$im" readonly=true ] > "$dd/nbd-ours.map" 2>> "$dd/why" ||
        echo "nbdinfo --map on the plugin failed" >> "$dd/why"
    nbdinfo --map -- [ qemu-nbd -r -f qcow2 "$im" ] > "$dd/nbd-qemu.map" 2>> "$dd/why" ||
        echo "nbdinfo --map on qemu-nbd failed" >> "$dd/why"
    "$IMG" map --output=json "$im" > "$dd/img.json" 2>> "$dd/why"
    $NBDMAP nbdinfo "$dd/nbd-ours.map" > "$dd/nbd-ours.norm" 2>> "$dd/why"
    $NBDMAP nbdinfo "$dd/nbd-qemu.map" > "$dd/nbd-qemu.norm" 2>> "$dd/why"
    $NBDMAP json "$dd/img.json" > "$dd/img.norm" 2>> "$dd/why"
    if ! cmp -s "$dd/nbd-qemu.norm" "$dd/nbd-ours.norm"; then
        echo "nbdinfo --map differs (< qemu-nbd, > plugin):" >> "$dd/why"
        diff "$dd/nbd-qemu.norm" "$dd/nbd-ours.norm" | head -20 >> "$dd/why"
    fi
    if ! cmp -s "$dd/img.norm" "$dd/nbd-ours.norm"; then
        echo "nbdinfo --map of the plugin differs from qcowprov-img map (< map, > nbdinfo):" >> "$dd/why"
        diff "$dd/img.norm" "$dd/nbd-ours.norm" | head -20 >> "$dd/why"
    fi
}

# twin NAME SIZE CREATE_OPTS OPEN_OPTS PRE POST COMMANDS (see scenarios.sh)
twin() {
    name=$1 size=$2 create=$3 opts=$4 pre=$5 post=$6
    case $name in ${ONLY:-*}) ;; *) return ;; esac
    N=$((N + 1))
    d=$T/s$N
    mkdir -p "$d"
    # map and info describe the NBD layer over NBD, not the image: compared separately.
    printf '%s\n' "$7" | grep -v -E '^(map|info|policy)( |$)' > "$d/cmds"
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
    printf 'exec qemu-io -f raw %s "$1"' "$IO_FLAGS" > "$d/run.sh"
    while IFS= read -r line; do
        [ -n "$line" ] || continue
        set -- "$@" -c "$line"
        printf " -c '%s'" "$line" >> "$d/run.sh"
    done < "$d/cmds"
    echo >> "$d/run.sh"

    qemu-io $IO_FLAGS --image-opts "driver=qcow2,file.filename=$A${opts:+,$opts}" "$@" \
        > "$d/qemu.out" 2> "$d/qemu.err"
    qrc=$?
    ro=
    [ "$IO_FLAGS" = -r ] && ro=readonly=true
    nbdkit -U - "$PLUGIN" file="$B" ${opts:+options="$opts"} $ro --run "sh '$d/run.sh' \"\$uri\"" \
        > "$d/ours.out" 2> "$d/ours.err" < /dev/null
    orc=$?

    [ "$qrc" -eq "$EXPECT_RC" ] || echo "qemu-io exited $qrc, the scenario expects $EXPECT_RC" >> "$d/why"
    [ "$orc" -eq "$qrc" ] || echo "exit status: qemu-io on qcow2 $qrc, qemu-io over the plugin $orc" >> "$d/why"
    twins_differ "$d" "$A" "$B" "the qcow2 driver" "the plugin"
    nbdmaps "$d" "$B"
    if [ -s "$d/why" ]; then
        fail "$name  [$d]" "$d/why" "$d/qemu.err" "$d/ours.err"
    else
        pass "$name"
    fi
}

. "$TESTS/scenarios.sh"
scenarios

# ---- startup: bad parameters are refused, naming the problem ----
qemu-img create -q -f qcow2 "$T/ok.qcow2" 8M
head -c 1M /dev/zero > "$T/raw.img"
# refused EXPECTED_MESSAGE PARAMS...
refused() {
    want=$1
    shift
    if nbdkit -U - "$PLUGIN" "$@" --run true > "$T/r.out" 2> "$T/r.err" < /dev/null; then
        fail "refused at startup: $*" "nbdkit started"
    elif grep -q -e "$want" "$T/r.err"; then
        pass "refused at startup: $* ($(head -1 "$T/r.err"))"
    else
        fail "refused at startup: $*: message mentions '$want'" "$T/r.err"
    fi
}
refused "file=IMAGE parameter is required"
refused "No such file" file="$T/missing.qcow2"
refused "$T/raw.img" file="$T/raw.img"
refused "provision" file="$T/ok.qcow2" options=provision=bogus
refused "discard" file="$T/ok.qcow2" options=provision=thin,discard=unmap
refused "no-such-key" file="$T/ok.qcow2" options=no-such-key=1
refused "maybe" file="$T/ok.qcow2" readonly=maybe
refused "unknown parameter 'colour'" file="$T/ok.qcow2" colour=blue
refused "given twice" file="$T/ok.qcow2" file="$T/ok.qcow2"
if nbdkit "$PLUGIN" --help 2>&1 | grep -q 'provision=off|full|metadata|thin|reuse'; then
    pass "nbdkit qcowprov --help explains file=, options= and readonly="
else
    fail "nbdkit qcowprov --help explains the parameters"
fi

# ---- what the export advertises ----
# advertises CREATE_OPTS PLUGIN_PARAMS EXPECTED: EXPECTED is "key=value ..." of nbdinfo --json
advertises() {
    rm -f "$T/adv.qcow2"
    qemu-img create -q -f qcow2 ${1:+-o "$1"} "$T/adv.qcow2" 16M
    if ! nbdinfo --json -- [ nbdkit "$PLUGIN" file="$T/adv.qcow2" $2 ] > "$T/adv.json" 2> "$T/adv.err"; then
        fail "nbdinfo on [$1] $2" "$T/adv.err"
        return
    fi
    got=$(python3 - "$T/adv.json" $3 <<'EOF'
import json, sys
e = json.load(open(sys.argv[1]))["exports"][0]
bad = []
for kv in sys.argv[2:]:
    k, v = kv.split("=")
    have = e.get(k)
    have = str(have).lower() if isinstance(have, bool) else str(have)
    if have != v:
        bad.append("%s=%s (want %s)" % (k, have, v))
print(" ".join(bad))
EOF
)
    if [ -z "$got" ]; then
        pass "export of [$1] $2: $3"
    else
        fail "export of [$1] $2: $got" "$T/adv.json"
    fi
}
# Fast zero is advertised exactly when the library has a no-fallback write-zeroes.
FAST=false
grep -q 'define QCOWPROV_ZERO_NO_FALLBACK' "$EX/../include/qcowprov.h" && FAST=true
COMMON="export-size=16777216 block_size_minimum=1 block_size_maximum=33554432 can_multi_conn=true \
can_fua=true can_flush=true can_trim=true can_zero=true can_fast_zero=$FAST can_cache=false is_rotational=false"
advertises "" "" "$COMMON is_read_only=false block_size_preferred=65536"
advertises "" readonly=true "is_read_only=true block_size_preferred=65536 can_multi_conn=true"
advertises cluster_size=2M "" "$COMMON block_size_preferred=2097152"
advertises cluster_size=512 "" "$COMMON block_size_preferred=4096"
advertises extended_l2=on,cluster_size=128k "" "$COMMON block_size_preferred=131072"

# ---- read-only exports refuse writes and leave the image alone ----
qemu-io -c 'write -P 5 0 1M' "$T/ok.qcow2" > /dev/null
before=$(md5sum < "$T/ok.qcow2")
if nbdkit -U - "$PLUGIN" file="$T/ok.qcow2" readonly=true \
    --run 'qemu-io -f raw "$uri" -c "write -P 6 0 64k"' > "$T/ro.out" 2>&1 < /dev/null; then
    fail "readonly=true: a write fails" "$T/ro.out"
elif [ "$(md5sum < "$T/ok.qcow2")" != "$before" ]; then
    fail "readonly=true: the image is unchanged"
else
    pass "readonly=true: writes refused, image unchanged ($(grep -o 'Could not open.*\|failed.*' "$T/ro.out" | head -1))"
fi

# ---- a library error reaches the client as errno, with its message in nbdkit's log ----
qemu-img create -q -f qcow2 "$T/bad.qcow2" 8M
qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 1M 64k' "$T/bad.qcow2" > /dev/null
l2=$($EDIT l2 "$T/bad.qcow2" 0)
# L2 entry 0 -> an offset that is not cluster aligned (QEMU: "unaligned", a corruption).
python3 - "$T/bad.qcow2" "$l2" <<'EOF'
import struct, sys
f = open(sys.argv[1], "r+b")
f.seek(int(sys.argv[2]))
e = struct.unpack(">Q", f.read(8))[0]
f.seek(int(sys.argv[2]))
f.write(struct.pack(">Q", e + 512))
EOF
nbdkit -U - "$PLUGIN" file="$T/bad.qcow2" readonly=true \
    --run 'qemu-io -r -f raw "$uri" -c "read -P 2 1M 64k" -c "read 0 64k"' > "$T/err.out" 2> "$T/err.log" < /dev/null
rc=$?
if [ $rc -ne 0 ] && grep -q 'read failed: Input/output error' "$T/err.out" &&
    grep -q 'qcowprov: read: ' "$T/err.log" && grep -q 'read 65536/65536 bytes at offset 1048576' "$T/err.out"; then
    pass "corrupt L2 entry: EIO to the client, '$(grep -o 'qcowprov: read: .*' "$T/err.log" | head -1 | cut -c1-90)' in the log; other clusters still read"
else
    fail "corrupt L2 entry: EIO to the client with the library's message" "$T/err.out" "$T/err.log"
fi

# ---- qemu-img convert from and to the export ----
SRC=$T/src.qcow2
qemu-img create -q -f qcow2 "$SRC" 32M
qemu-io -c 'write -P 1 0 3M' -c 'write -z 1M 512k' -c 'write -z -u 2M 256k' -c 'discard 2560k 128k' \
    -c 'write -P 2 9M 100k' -c 'write -P 3 31M 1M' -c 'write -z 20M 4M' "$SRC" > /dev/null
rm -f "$T/from.qcow2"
if nbdkit -U - "$PLUGIN" file="$SRC" readonly=true \
    --run "qemu-img convert -f raw \"\$uri\" -O qcow2 '$T/from.qcow2'" > "$T/conv.out" 2>&1 < /dev/null &&
    qemu-img compare -f qcow2 -F qcow2 "$SRC" "$T/from.qcow2" > "$T/cmp.out" 2>&1 &&
    qemu-img check "$T/from.qcow2" > /dev/null 2>&1; then
    qemu-img map --output=json "$SRC" > "$T/src.json"
    qemu-img map --output=json "$T/from.qcow2" > "$T/from.json"
    $NBDMAP json "$T/src.json" > "$T/src.norm"
    $NBDMAP json "$T/from.json" > "$T/from.norm"
    if cmp -s "$T/src.norm" "$T/from.norm"; then
        pass "qemu-img convert from the export: identical, holes and zeros kept as holes"
    else
        fail "qemu-img convert from the export: same extents" "$T/src.norm" "$T/from.norm"
    fi
else
    fail "qemu-img convert from the export" "$T/conv.out" "$T/cmp.out"
fi
for o in provision=thin provision=full discard=unmap,discard-no-unref=on; do
    dst=$T/to-$o.qcow2
    qemu-img create -q -f qcow2 "$dst" 32M
    qemu-io -c 'write -P 9 0 32M' "$dst" > /dev/null    # old content the convert must replace
    if nbdkit -U - "$PLUGIN" file="$dst" options="$o" \
        --run "qemu-img convert -n -f qcow2 '$SRC' -O raw \"\$uri\"" > "$T/conv.out" 2>&1 < /dev/null &&
        qemu-img compare -f qcow2 -F qcow2 "$SRC" "$dst" > "$T/cmp.out" 2>&1 &&
        qemu-img check "$dst" > "$T/chk.out" 2>&1; then
        pass "qemu-img convert -n to the export [$o]: identical, check clean"
    else
        fail "qemu-img convert -n to the export [$o]" "$T/conv.out" "$T/cmp.out" "$T/chk.out"
    fi
done

# ---- nbdcopy over several connections (multi-conn) ----
RAW=$T/data.raw
head -c 24M /dev/urandom > "$RAW"
truncate -s 64M "$RAW"
dd if=/dev/urandom of="$RAW" bs=1M seek=40 count=8 conv=notrunc status=none
dst=$T/copy.qcow2
qemu-img create -q -f qcow2 "$dst" 64M
if nbdkit -v -U - "$PLUGIN" file="$dst" \
    --run "nbdcopy --connections=4 --threads=4 --requests=16 --flush '$RAW' \"\$uri\"" > "$T/copy.out" 2> "$T/copy.log" < /dev/null; then
    conns=$(grep -c 'handshake complete' "$T/copy.log")
    if nbdkit -U - "$PLUGIN" file="$dst" readonly=true \
        --run "nbdcopy --connections=4 --threads=4 \"\$uri\" '$T/back.raw'" > "$T/copy2.out" 2>&1 < /dev/null &&
        cmp "$RAW" "$T/back.raw" > "$T/cmp.out" 2>&1 && qemu-img check "$dst" > "$T/chk.out" 2>&1; then
        if [ "$conns" -ge 4 ]; then
            pass "nbdcopy, $conns connections to one handle: copied back identical, check clean"
        else
            fail "nbdcopy used several connections" "handshakes: $conns" "$T/copy.log"
        fi
    else
        fail "nbdcopy round trip" "$T/copy2.out" "$T/cmp.out" "$T/chk.out"
    fi
else
    fail "nbdcopy to the export" "$T/copy.out" "$T/copy.log"
fi

finish
