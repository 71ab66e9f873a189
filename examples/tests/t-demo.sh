#!/bin/sh
# The demo runs, verifies every image against its model (its exit status), and
# shows what it claims: the provisioning modes and QEMU's discard-no-unref keep
# the file near the virtual size (here: at most 115%).
. "$(dirname "$0")/lib.sh"

if ! TMPDIR=$T "$DEMO" > "$T/out" 2> "$T/err"; then
    fail "demo exits 0" "$T/out" "$T/err"
    finish
    exit 1
fi
pass "demo exits 0 (all images checked clean and read back as written)"
sed 's/^/      /' "$T/out"
rows=$(grep -c -e '^provision=' -e '^discard=' "$T/out")
if [ "$rows" -eq 7 ]; then
    pass "7 libqcowprov rows"
else
    fail "7 libqcowprov rows" "found $rows"
fi
for mode in provision=off provision=full provision=metadata provision=thin provision=reuse \
    discard=unmap,discard-no-unref=on "qemu-io discard=unmap,discard-no-unref=on"; do
    pct=$(grep "^$mode  " "$T/out" | sed 's/^.\{42\} *\([0-9.]*\)%.*/\1/')
    if [ -z "$pct" ]; then
        case $mode in qemu-io*) continue ;; esac
        fail "$mode: row present"
    elif awk "BEGIN { exit !($pct <= 115.0) }"; then
        pass "$mode: file length $pct% <= 115%"
    else
        fail "$mode: file length $pct% <= 115%"
    fi
done
left=$(ls -A "$T" | grep -v -x -e out -e err)
if [ -n "$left" ]; then
    fail "demo removed its temporary directory" "left: $left"
else
    pass "demo removed its temporary directory"
fi
finish
