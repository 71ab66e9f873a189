#!/bin/sh
# Runs every test script (t-*.sh), prints how many checks ran, and exits non-zero if any
# check failed, if a script did not report its counts (it crashed or exited early), or if
# no check ran at all. A tool a script needs that is missing fails that script.
cd "$(dirname "$0")" || exit 1
QCOWPROV_COUNTS=$(mktemp "${TMPDIR:-/tmp}/qcowprov-counts.XXXXXX") || exit 1
export QCOWPROV_COUNTS
trap 'rm -f "$QCOWPROV_COUNTS"' EXIT
failed=""
scripts=0
for t in t-*.sh; do
    scripts=$((scripts + 1))
    echo "==== $t"
    sh "./$t" || failed="$failed $t"
    if ! grep -q "^$t " "$QCOWPROV_COUNTS"; then
        echo "FAIL  $t reported no counts (it stopped before finishing)"
        case " $failed " in *" $t "*) ;; *) failed="$failed $t" ;; esac
    fi
done
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
