#!/bin/sh
# The demo runs, verifies every image against its model after every phase (its exit
# status), and shows what it claims:
# - phase 1: the provisioning modes and QEMU's discard-no-unref keep the file near the
#   virtual size (here: at most 115%);
# - phase 2: each row's numbers are what the mode table (qcow2 layer / host layer) says,
#   the five modes differ from each other, QEMU's options match their equivalent mode,
#   and qemu-io's rows match ours;
# - one line per mode says what it is for.
# Needs qemu-img, qemu-io and strace (fails without them; .ci/run installs them).
. "$(dirname "$0")/lib.sh"

for pkg in qemu-img:qemu-utils qemu-io:qemu-utils strace:strace; do
    if ! command -v "${pkg%%:*}" > /dev/null 2>&1; then
        fail "${pkg%%:*} is installed (apt-get install -y ${pkg#*:})"
        finish
        exit 1
    fi
done

if ! TMPDIR=$T "$DEMO" > "$T/out" 2> "$T/err"; then
    fail "demo exits 0" "$T/out" "$T/err"
    finish
    exit 1
fi
pass "demo exits 0 (all images checked clean and read back as written after every phase)"
sed 's/^/      /' "$T/out"

# The tables as "table|label|fields": 1 phase 1, 2 after the discard, 3 the rewrite.
awk '/^run  /{t=1; next} /^after the discard/{t=2; next} /^rewriting the discarded/{t=3; next}
     /^$/ || /^\(/{t=0; next}
     t { l = substr($0, 1, 42); sub(/ +$/, "", l); r = substr($0, 43); gsub(/ +/, " ", r);
         sub(/^ /, "", r); print t "|" l "|" r }' "$T/out" > "$T/rows"

# field TABLE LABEL N: the N-th field of LABEL's row in TABLE ("" if absent).
field() {
    awk -F'|' -v t="$1" -v l="$2" -v n="$3" '$1 == t && $2 == l { split($3, f, " "); print f[n] }' "$T/rows"
}

# near A B TOL: |A - B| <= TOL.
near() {
    awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= t) }'
}

ROWS="provision=off provision=full provision=metadata provision=thin provision=reuse discard=unmap
discard=unmap,discard-no-unref=on"
QROWS="discard=unmap discard=unmap,discard-no-unref=on"

# The mode table (README): qcow2 layer and host layer of each row.
layers() {
    case $1 in
    provision=off) echo full full ;;
    provision=full) echo anchor anchor ;;
    provision=metadata | *discard-no-unref=on) echo anchor unmap ;;
    provision=thin | *discard=unmap) echo unmap unmap ;;
    provision=reuse) echo unmap full ;;
    esac
}

for t in 1 2 3; do
    n=$(grep -c "^$t|" "$T/rows")
    if [ "$n" -eq 9 ]; then
        pass "table $t: 9 rows (7 libqcowprov, 2 qemu-io)"
    else
        fail "table $t: 9 rows (7 libqcowprov, 2 qemu-io)" "found $n" "$T/rows"
    fi
done

# Phase 1.
for mode in provision=off provision=full provision=metadata provision=thin provision=reuse \
    discard=unmap,discard-no-unref=on "qemu-io discard=unmap,discard-no-unref=on"; do
    pct=$(field 1 "$mode" 1 | tr -d %)
    if [ -z "$pct" ]; then
        fail "$mode: phase 1 row present"
    elif awk "BEGIN { exit !($pct <= 115.0) }"; then
        pass "$mode: file length $pct% <= 115%"
    else
        fail "$mode: file length $pct% <= 115%"
    fi
done

# Phase 2.
gone=$(sed -n 's/^Phase 2.* discard \([0-9]*\) MiB (\([0-9]*\) clusters).*/\2/p' "$T/out")
gone_mib=$(sed -n 's/^Phase 2.* discard \([0-9]*\) MiB (.*/\1/p' "$T/out")
if [ -z "$gone" ] || [ "$gone" -eq 0 ]; then
    fail "phase 2 says how many clusters it discards"
    finish
    exit 1
fi

# check_row LABEL: phase 2 numbers as the row's layers say.
check_row() {
    label=$1
    mode=${label#qemu-io }
    set -- $(layers "$mode")
    q=$1 h=$2
    alloc=$(field 2 "$label" 1) zero=$(field 2 "$label" 2) stale=$(field 2 "$label" 3)
    change=$(field 2 "$label" 6) dlen=$(field 2 "$label" 8 | tr -d %) len1=$(field 1 "$label" 1 | tr -d %)
    flushes=$(field 3 "$label" 3) fgrow=$(field 3 "$label" 4) hgrow=$(field 3 "$label" 6)
    check=$(field 3 "$label" 8) data=$(field 3 "$label" 9)
    if [ -z "$alloc" ] || [ -z "$flushes" ]; then
        fail "$label: phase 2 rows present"
        return
    fi
    case $q in
    full) want_alloc=$gone want_zero=0 ;;
    anchor) want_alloc=$gone want_zero=$gone ;;
    unmap) want_alloc=0 want_zero=$gone ;;
    esac
    # Old bytes stay on the host unless the host layer zeroes or releases them.
    if [ "$h" = full ]; then want_stale=$gone; else want_stale=0; fi
    if [ "$alloc $zero $stale" = "$want_alloc $want_zero $want_stale" ]; then
        pass "$label ($q/$h): alloc $alloc, zero $zero, stale $stale of $gone"
    else
        fail "$label ($q/$h): alloc $alloc, zero $zero, stale $stale of $gone" \
            "want $want_alloc $want_zero $want_stale"
    fi
    # Host space: released by the discard and allocated again by the rewrite only when
    # the host layer unmaps.
    if [ "$h" = unmap ]; then want_change=-$gone_mib; else want_change=0; fi
    if near "$change" "$want_change" 0.5 && near "$hgrow" "${want_change#-}" 0.5; then
        pass "$label: host allocation $change MiB after the discard, $hgrow MiB after the rewrite"
    else
        fail "$label: host allocation $change MiB after the discard, $hgrow MiB after the rewrite" \
            "want $want_change and ${want_change#-} (within 0.5 MiB)"
    fi
    if near "$dlen" "$len1" 0; then
        pass "$label: the discard leaves the file length ($dlen%)"
    else
        fail "$label: the discard leaves the file length ($dlen%, was $len1%)"
    fi
    case $label in
    qemu-io*) ;;
    *)
        # This library fills holes: the rewrite never grows the file.
        if near "$fgrow" 0 0; then
            pass "$label: the rewrite does not grow the file"
        else
            fail "$label: the rewrite does not grow the file ($fgrow MiB)"
        fi
        ;;
    esac
    # A rewrite of data that stayed allocated changes no metadata: one flush, the last.
    if [ "$q" = full ] && [ "$flushes" != 1 ]; then
        fail "$label: rewrite in place: 1 host flush (got $flushes)"
    elif [ "$flushes" -ge 1 ] 2> /dev/null; then
        pass "$label: rewrite: $flushes host flushes counted"
    else
        fail "$label: rewrite: host flushes counted (got '$flushes')"
    fi
    if [ "$check $data" = "clean ok" ] && [ "$(field 1 "$label" 8) $(field 1 "$label" 9)" = "clean ok" ]; then
        pass "$label: check clean, data ok in both phases"
    else
        fail "$label: check clean, data ok in both phases"
    fi
}

for r in $ROWS; do
    check_row "$r"
done
for r in $QROWS; do
    check_row "qemu-io $r"
done

# The five modes differ from each other; QEMU's options and qemu-io match their equal.
# sig LABEL: alloc, zero, stale, and the host allocation change (MiB, rounded) after the
# discard and after the rewrite.
sig() {
    echo "$(field 2 "$1" 1) $(field 2 "$1" 2) $(field 2 "$1" 3)" \
        "$(awk -v a="$(field 2 "$1" 6)" -v b="$(field 3 "$1" 6)" 'BEGIN { printf "%.0f %.0f", a, b }')"
}
sigs=""
for m in provision=off provision=full provision=metadata provision=thin provision=reuse; do
    sigs="$sigs$(sig "$m")
"
done
distinct=$(printf '%s' "$sigs" | sort -u | grep -c .)
if [ "$distinct" -eq 5 ]; then
    pass "the five modes' phase-2 rows all differ"
else
    fail "the five modes' phase-2 rows all differ" "$sigs"
fi
for pair in "discard=unmap provision=thin" "discard=unmap,discard-no-unref=on provision=metadata" \
    "qemu-io_discard=unmap discard=unmap" \
    "qemu-io_discard=unmap,discard-no-unref=on discard=unmap,discard-no-unref=on"; do
    a=$(echo "${pair% *}" | tr _ ' ') b=${pair#* }
    if [ "$(sig "$a")" = "$(sig "$b")" ]; then
        pass "$a: phase 2 as $b ($(sig "$a"))"
    else
        fail "$a: phase 2 as $b" "$(sig "$a") vs $(sig "$b")"
    fi
done

# One line per mode saying what it is for, with the mode table's layers.
for m in provision=off provision=full provision=metadata provision=thin provision=reuse \
    discard=unmap discard=unmap,discard-no-unref=on; do
    set -- $(layers "$m")
    if grep -q "^  $m  *$1/$2  *[a-zA-Z']" "$T/out"; then
        pass "$m: a line says what it is for ($1/$2)"
    else
        fail "$m: a line says what it is for ($1/$2)"
    fi
done

if grep -q '^takes [0-9]* ms and 0 flushes here' "$T/out"; then
    pass "a qemu-io run that only flushes makes no host flush (qemu-io's counts need no correction)"
else
    fail "a qemu-io run that only flushes makes no host flush" "$T/out"
fi

left=$(ls -A "$T" | grep -v -x -e out -e err -e rows)
if [ -n "$left" ]; then
    fail "demo removed its temporary directory" "left: $left"
else
    pass "demo removed its temporary directory"
fi

# The real-guest table (make demo-guest): prints only what the guest test measured.
GT="sh $EX/guest-table.sh"
if GUEST_RESULTS=$T/none.tsv GUEST_TEST=$T/none.sh $GT > "$T/g.out" 2> "$T/g.err"; then
    fail "demo-guest without results or guest test fails" "$T/g.out"
elif grep -q 'needs the real-guest test' "$T/g.err" && [ ! -s "$T/g.out" ]; then
    pass "demo-guest without results or guest test fails, saying it needs the guest test"
else
    fail "demo-guest without results or guest test says it needs the guest test" "$T/g.err" "$T/g.out"
fi
# A stand-in guest test that writes results: run when there are none, its rows printed.
cat > "$T/g.sh" << EOF
printf 'run\tfile_len_pct\thost_alloc_pct\tcheck\nprovision=thin\t101.5\t62.4\tclean\n' > "$T/g.tsv"
EOF
if GUEST_RESULTS=$T/g.tsv GUEST_TEST=$T/g.sh $GT > "$T/g.out" 2> "$T/g.err" &&
    grep -q '^provision=thin  *101.5%  *62.4%  *clean$' "$T/g.out"; then
    pass "demo-guest runs the guest test when there are no results and prints its rows"
else
    fail "demo-guest runs the guest test when there are no results and prints its rows" "$T/g.out" "$T/g.err"
fi
printf 'run\tfile_len\thost_alloc_pct\tcheck\nprovision=thin\t1\t2\tclean\n' > "$T/g.tsv"
printf 'run\tfile_len_pct\thost_alloc_pct\tcheck\nprovision=thin\tmany\t2\tclean\n' > "$T/h.tsv"
for f in g h; do
    if GUEST_RESULTS=$T/$f.tsv GUEST_TEST=$T/none.sh $GT > "$T/g.out" 2> "$T/g.err"; then
        fail "demo-guest refuses a malformed results file ($f)" "$T/g.out"
    elif grep -q "^demo-guest: $T/$f.tsv" "$T/g.err" && [ ! -s "$T/g.out" ]; then
        pass "demo-guest refuses a malformed results file ($f), naming it"
    else
        fail "demo-guest refuses a malformed results file ($f), naming it" "$T/g.err" "$T/g.out"
    fi
done
rm -f "$T"/g.* "$T"/h.tsv
finish
