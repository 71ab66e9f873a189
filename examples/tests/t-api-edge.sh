#!/bin/sh
# The C API's edge cases, called directly (tests/api-edge.c).
. "$(dirname "$0")/lib.sh"

if "$BIN/api-edge" "$T" > "$T/out" 2>&1; then
    pass "$(tail -1 "$T/out")"
else
    fail "api-edge" "$T/out"
fi
finish
