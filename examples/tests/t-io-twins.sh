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
    twins_differ "$d" "$A" "$B" qemu-io qcowprov-io \
        -e 'can be specified at the same time' -e 'requires -z'
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

. "$TESTS/scenarios.sh"
scenarios

echo "($IDENTICAL scenarios also had the same host layout as qemu)"
finish
