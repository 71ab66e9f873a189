# Shared by the test scripts: paths, a temporary directory, PASS/FAIL bookkeeping.
# Source it from a test script: . "$(dirname "$0")/lib.sh"

set -u

TESTS=$(cd "$(dirname "$0")" && pwd)
EX=$(dirname "$TESTS")
BIN=$EX/build
IO=$BIN/qcowprov-io
IMG=$BIN/qcowprov-img
BENCH=$BIN/qcowprov-bench
DEMO=$BIN/demo
EDIT="python3 $TESTS/qcow2edit.py"
MAPNORM="python3 $TESTS/mapnorm.py"

T=$(mktemp -d "${TMPDIR:-/tmp}/qcowprov-test.XXXXXX") || exit 1
# KEEP=1 keeps the temporary directory for a post-mortem.
if [ -n "${KEEP:-}" ]; then
    trap 'echo "kept $T"' EXIT
else
    trap 'rm -rf "$T"' EXIT
fi
trap 'exit 130' INT TERM

PASSES=0
FAILS=0
SKIPS=0

pass() {
    echo "PASS  $1"
    PASSES=$((PASSES + 1))
}

# fail NAME [DETAIL FILE]...: report and show the files that explain it.
fail() {
    echo "FAIL  $1"
    FAILS=$((FAILS + 1))
    shift
    for f in "$@"; do
        if [ -f "$f" ]; then
            echo "      --- $f"
            sed -n '1,40s/^/      | /p' "$f"
        else
            echo "      $f"
        fi
    done
}

# skip NAME WHY: a check that cannot run here for a reason other than a missing tool
# (e.g. no O_DIRECT on this filesystem). Counted and shown, never as a pass.
skip() {
    echo "SKIP  $1: $2"
    SKIPS=$((SKIPS + 1))
}

# twins_differ DIR A B LABEL_A LABEL_B [GREP_ARGS...]: append to DIR/why every way twin
# images A (the oracle's) and B (ours) and their runs' stdout (DIR/qemu.out, DIR/ours.out)
# differ: stdout without timing and error lines (and lines GREP_ARGS match), content
# (qemu-img compare), B's qemu-img check, and qemu-img map of both, normalized.
twins_differ() {
    local d=$1 a=$2 b=$3 la=$4 lb=$5 f
    shift 5
    for f in qemu ours; do
        grep -v -e ' ops; ' -e ' failed: ' "$@" "$d/$f.out" > "$d/$f.f"
    done
    if ! cmp -s "$d/qemu.f" "$d/ours.f"; then
        echo "stdout differs (< $la, > $lb):" >> "$d/why"
        diff "$d/qemu.f" "$d/ours.f" | head -20 >> "$d/why"
    fi
    if ! qemu-img compare "$a" "$b" > "$d/compare.out" 2>&1; then
        echo "qemu-img compare: $(cat "$d/compare.out")" >> "$d/why"
    fi
    if ! qemu-img check "$b" > "$d/check.out" 2>&1; then
        echo "qemu-img check of ours is not clean:" >> "$d/why"
        cat "$d/check.out" >> "$d/why"
    fi
    qemu-img map --output=json "$a" > "$d/mapA.json" 2>> "$d/why"
    qemu-img map --output=json "$b" > "$d/mapB.json" 2>> "$d/why"
    $MAPNORM "$d/mapA.json" > "$d/mapA.norm" 2>> "$d/why"
    $MAPNORM "$d/mapB.json" > "$d/mapB.norm" 2>> "$d/why"
    if ! cmp -s "$d/mapA.norm" "$d/mapB.norm"; then
        echo "qemu-img map (normalized) differs (< $la's image, > $lb's):" >> "$d/why"
        diff "$d/mapA.norm" "$d/mapB.norm" | head -20 >> "$d/why"
    fi
}

# counts_from FILE: add a C test program's "NAME: N checks, M failed" line to the counts.
counts_from() {
    line=$(grep -E '^[a-z-]+: [0-9]+ checks, [0-9]+ failed$' "$1" | tail -1)
    if [ -z "$line" ]; then
        fail "$(basename "$0"): the program printed no summary line" "$1"
        return
    fi
    n=$(echo "$line" | sed 's/^[^:]*: \([0-9]*\) checks.*/\1/')
    m=$(echo "$line" | sed 's/.* \([0-9]*\) failed$/\1/')
    PASSES=$((PASSES + n - m))
    FAILS=$((FAILS + m))
    echo "      $line"
}

# need CMD...: fail the whole script, naming the tool, when a tool the tests need is
# missing (a test that cannot run must not pass; .ci/run installs them all).
need() {
    for c in "$@"; do
        if ! command -v "$c" >/dev/null 2>&1; then
            echo "FAIL  $(basename "$0"): '$c' is not installed and this script needs it" \
                "(.ci/run installs what the tests need)"
            FAILS=$((FAILS + 1))
            finish
            exit 1
        fi
    done
}

# finish: print this script's counts (and record them for run.sh); exit status 0 only
# when every check passed.
finish() {
    echo "$(basename "$0"): $PASSES passed, $FAILS failed, $SKIPS skipped"
    if [ -n "${QCOWPROV_COUNTS:-}" ]; then
        echo "$(basename "$0") $PASSES $FAILS $SKIPS" >> "$QCOWPROV_COUNTS"
    fi
    [ "$FAILS" -eq 0 ]
}
