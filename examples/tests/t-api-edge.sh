#!/bin/sh
# The C API's edge cases, called directly (tests/api-edge.c).
. "$(dirname "$0")/lib.sh"

"$BIN/api-edge" "$T" > "$T/out" 2>&1
rc=$?
counts_from "$T/out"
if [ "$rc" -ne 0 ] && [ "$FAILS" -eq 0 ]; then
    fail "api-edge exited $rc" "$T/out"
fi
finish
