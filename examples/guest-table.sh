#!/bin/sh
# The real-guest table: file length and host allocation per provisioning mode, beside
# QEMU's own driver, as measured by the real-guest test (tests/t-guest.sh) with a Linux
# guest doing the work. `make demo-guest` runs this.
#
# Contract with the guest test (see README.md): it writes build/guest-results.tsv, a
# tab-separated file whose first line is exactly
#     run<TAB>file_len_pct<TAB>host_alloc_pct<TAB>check
# followed by one row per mode or QEMU configuration: the run's name (e.g.
# "provision=thin", "qemu discard=unmap"), the image's file length and host allocation
# in percent of the virtual size, and the qemu-img check verdict ("clean", ...).
#
# Without a results file this script runs the guest test to make one; without the guest
# test it fails and says so: it never prints numbers it did not read.
# GUEST_RESULTS and GUEST_TEST override the two paths (the tests use them).
set -u
cd "$(dirname "$0")" || exit 1
RESULTS=${GUEST_RESULTS:-build/guest-results.tsv}
GUEST_TEST=${GUEST_TEST:-tests/t-guest.sh}
TAB=$(printf '\t')

die() {
    echo "demo-guest: $*" >&2
    exit 1
}

if [ ! -f "$RESULTS" ]; then
    if [ ! -f "$GUEST_TEST" ]; then
        die "no results ($RESULTS) and no real-guest test ($GUEST_TEST) to make them.
This table needs the real-guest test (issue 14), which boots a Linux guest on each mode;
it is not in this tree yet. Nothing is printed without measured results."
    fi
    echo "demo-guest: no $RESULTS yet; running $GUEST_TEST (boots real guests: takes minutes)" >&2
    sh "$GUEST_TEST" >&2 || die "$GUEST_TEST failed"
    [ -f "$RESULTS" ] || die "$GUEST_TEST passed but wrote no $RESULTS"
fi

header=$(head -n 1 "$RESULTS")
[ "$header" = "run${TAB}file_len_pct${TAB}host_alloc_pct${TAB}check" ] ||
    die "$RESULTS: the first line must be 'run<TAB>file_len_pct<TAB>host_alloc_pct<TAB>check', found '$header'"

# Validate every row before printing any.
awk -F'\t' 'NR > 1 {
        if (NF != 4 || $1 == "" || $4 == "" || $2 !~ /^[0-9]+(\.[0-9]+)?$/ || $3 !~ /^[0-9]+(\.[0-9]+)?$/) {
            printf "demo-guest: %s line %d: want run, two percentages and a check verdict: %s\n",
                FILENAME, NR, $0 > "/dev/stderr"
            bad = 1
        }
        rows++
    }
    END { if (!rows) { printf "demo-guest: %s has no rows\n", FILENAME > "/dev/stderr"; bad = 1 }
          exit bad }' "$RESULTS" || exit 1

echo "Real guests (from $RESULTS, written $(date -r "$RESULTS" '+%Y-%m-%d %H:%M') by the real-guest test):"
echo
printf '%-42s %9s %15s  %s\n' "run" "file len" "host allocated" "check"
awk -F'\t' 'NR > 1 { printf "%-42s %8.1f%% %14.1f%%  %s\n", $1, $2, $3, $4 }' "$RESULTS"
echo
echo "file len, host allocated: percent of the virtual size, after the guest test's workload."
