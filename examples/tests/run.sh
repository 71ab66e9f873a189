#!/bin/sh
# Runs every test script (t-*.sh), prints how many checks ran, and exits non-zero if any
# check failed, if a script did not report its counts (it crashed or exited early), or if
# no check ran at all. A tool a script needs that is missing fails that script.
#
# The real-guest test (t-guest.sh) is one long single-threaded emulator run: it runs in a
# second lane beside the other scripts (its output printed when it ends), so that on two
# cores the suite takes about as long as the longer lane instead of their sum.
# QCOWPROV_SERIAL=1 runs everything in one lane.
cd "$(dirname "$0")" || exit 1
QCOWPROV_COUNTS=$(mktemp "${TMPDIR:-/tmp}/qcowprov-counts.XXXXXX") || exit 1
export QCOWPROV_COUNTS
lane_out=$(mktemp "${TMPDIR:-/tmp}/qcowprov-lane.XXXXXX") || exit 1
trap 'rm -f "$QCOWPROV_COUNTS" "$lane_out" "$lane_out.rc"' EXIT
failed=""
scripts=0
# $1: script; records its failure, or its missing counts, in $failed.
settle() {
    if ! grep -q "^$1 " "$QCOWPROV_COUNTS"; then
        echo "FAIL  $1 reported no counts (it stopped before finishing)"
        case " $failed " in *" $1 "*) ;; *) failed="$failed $1" ;; esac
    fi
}
lane=""
if [ "${QCOWPROV_SERIAL:-0}" != 1 ] && [ -f t-guest.sh ]; then
    lane=t-guest.sh
    scripts=$((scripts + 1))
    (
        s=$(date +%s)
        sh ./t-guest.sh >"$lane_out" 2>&1
        echo "$? $(($(date +%s) - s))" >"$lane_out.rc"
    ) &
    lane_pid=$!
    echo "==== $lane (running beside the others; its output follows at the end)"
fi
for t in t-*.sh; do
    [ "$t" = "$lane" ] && continue
    scripts=$((scripts + 1))
    echo "==== $t"
    s=$(date +%s)
    sh "./$t" || failed="$failed $t"
    echo "---- $t: $(($(date +%s) - s)) s"
    settle "$t"
done
if [ -n "$lane" ]; then
    wait "$lane_pid"
    echo "==== $lane"
    cat "$lane_out"
    read -r rc secs <"$lane_out.rc" || rc=1
    echo "---- $lane: ${secs:-?} s"
    [ "$rc" = 0 ] || failed="$failed $lane"
    settle "$lane"
fi
passed=$(awk '{ p += $2 } END { print p + 0 }' "$QCOWPROV_COUNTS")
nfail=$(awk '{ f += $3 } END { print f + 0 }' "$QCOWPROV_COUNTS")
skipped=$(awk '{ s += $4 } END { print s + 0 }' "$QCOWPROV_COUNTS")
echo "===="
echo "$scripts scripts, $((passed + nfail)) checks ran: $passed passed, $nfail failed, $skipped skipped"
if [ -n "$failed" ]; then
    echo "FAILED:$failed"
    exit 1
fi
if [ "$passed" -eq 0 ]; then
    echo "FAILED: no check ran"
    exit 1
fi
echo "all tests passed"
