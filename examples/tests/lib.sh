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

# need CMD...: fail the whole script when a tool it needs is missing (a test that cannot
# run is not a pass; .ci/run installs them all).
need() {
    for c in "$@"; do
        if ! command -v "$c" >/dev/null 2>&1; then
            echo "FAIL  $(basename "$0"): $c not installed (see .ci/run for the packages)"
            exit 1
        fi
    done
}

finish() {
    echo "$(basename "$0"): $PASSES passed, $FAILS failed"
    [ "$FAILS" -eq 0 ]
}
