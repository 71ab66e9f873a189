#!/usr/bin/env python3
"""Normalize `qemu-img map --output=json` for comparing two images whose data
sit at different host offsets: keep start, length, depth, present, zero, data,
compressed and whether an offset is given (not its value), then merge adjacent
entries that became equal. One entry per line on stdout.

"zero" of a data entry ("data": true) is dropped too: qcow2 never reports data
and zero together; QEMU adds "zero" to data clusters from the host file's holes
(SEEK_HOLE), which is host layout like the offset."""
import json
import sys

entries = json.load(open(sys.argv[1]))
out = []
for e in entries:
    n = {k: e[k] for k in ("start", "length", "depth", "present", "zero", "data", "compressed")}
    n["has_offset"] = "offset" in e
    if n["data"]:
        n["zero"] = "host"
    if out:
        p = out[-1]
        if p["start"] + p["length"] == n["start"] and all(
            p[k] == n[k] for k in n if k not in ("start", "length")
        ):
            p["length"] += n["length"]
            continue
    out.append(n)
for n in out:
    print(json.dumps(n, sort_keys=True))
