#!/bin/sh
# The handle and the hypervisor-facing API, called directly (tests/api-handle.c): closed
# and foreign handles, image locks between handles, open_fd, format, set_options,
# get_info's runtime options, the highest allocated offset, messages.
. "$(dirname "$0")/lib.sh"

"$BIN/api-handle" "$T" > "$T/out" 2>&1
rc=$?
counts_from "$T/out"
if [ "$rc" -ne 0 ] && [ "$FAILS" -eq 0 ]; then
    fail "api-handle exited $rc" "$T/out"
fi
finish
