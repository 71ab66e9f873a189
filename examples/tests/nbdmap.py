#!/usr/bin/env python3
"""Normalize a block-status map to NBD base:allocation extents, one per line:
"OFFSET LENGTH TYPE" with TYPE = 1 (hole) | 2 (zero), adjacent extents of one type merged.

  nbdmap.py nbdinfo FILE   FILE holds `nbdinfo --map` output ("offset length type desc")
  nbdmap.py json FILE      FILE holds `qemu-img map --output=json` (or qcowprov-img's):
                           hole = not data, zero = zero, as qemu-nbd reports them

Servers split replies at different points (request sizes, extent limits); merging makes
two maps of the same image comparable line by line.
"""
import json
import sys


def from_nbdinfo(text):
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 3:
            out.append((int(f[0]), int(f[1]), int(f[2])))
    return out


def from_json(text):
    out = []
    for e in json.loads(text):
        t = (0 if e["data"] else 1) | (2 if e["zero"] else 0)
        out.append((e["start"], e["length"], t))
    return out


def merge(extents):
    merged = []
    for off, length, t in extents:
        if merged and merged[-1][2] == t and merged[-1][0] + merged[-1][1] == off:
            merged[-1][1] += length
        else:
            if merged and merged[-1][0] + merged[-1][1] != off:
                sys.exit("extents not contiguous at %d" % off)
            merged.append([off, length, t])
    return merged


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("nbdinfo", "json"):
        sys.exit(__doc__)
    text = open(sys.argv[2]).read()
    extents = from_nbdinfo(text) if sys.argv[1] == "nbdinfo" else from_json(text)
    for off, length, t in merge(extents):
        print(off, length, t)


main()
