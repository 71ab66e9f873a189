#!/bin/sh
# The handle and the hypervisor-facing API, called directly (tests/api-handle.c): closed
# and foreign handles, image locks between handles, open_fd, format, set_options,
# get_info's runtime options, the highest allocated offset, messages.
. "$(dirname "$0")/lib.sh"
need qemu-img

"$BIN/api-handle" "$T" > "$T/out" 2>&1
rc=$?
counts_from "$T/out"
if [ "$rc" -ne 0 ] && [ "$FAILS" -eq 0 ]; then
    fail "api-handle exited $rc" "$T/out"
fi
# Every image it wrote (formatted, written through fds, discarded) passes qemu-img check.
for f in "$T"/*.qcow2; do
    if qemu-img check "$f" > "$T/check.out" 2>&1; then
        pass "qemu-img check $(basename "$f")"
    else
        fail "qemu-img check $(basename "$f")" "$T/check.out"
    fi
done
finish
