#!/usr/bin/env python3
"""Hand-edit qcow2 refcounts to make test images with leaks or corruptions.

  qcow2edit.py getref IMAGE HOST_OFFSET        print the refcount of the cluster at HOST_OFFSET
  qcow2edit.py setref IMAGE HOST_OFFSET VALUE  set it (the refblock must exist)
  qcow2edit.py leak IMAGE N                    append N clusters with refcount 1 that nothing uses
  qcow2edit.py l2 IMAGE INDEX                  print the host offset of L1 entry INDEX's L2 table
"""
import struct
import sys


def header(f):
    f.seek(0)
    h = f.read(104)
    magic, version = struct.unpack(">II", h[0:8])
    if magic != 0x514649FB:
        sys.exit("not a qcow2 image")
    cluster_bits = struct.unpack(">I", h[20:24])[0]
    rt_offset = struct.unpack(">Q", h[48:56])[0]
    rt_clusters = struct.unpack(">I", h[56:60])[0]
    order = struct.unpack(">I", h[96:100])[0] if version >= 3 else 4
    return 1 << cluster_bits, rt_offset, rt_clusters, order


def locate(f, host_offset):
    cs, rt_offset, rt_clusters, order = header(f)
    bits = 1 << order
    per_block = cs * 8 // bits
    idx = host_offset // cs
    rt_index = idx // per_block
    if rt_index >= rt_clusters * cs // 8:
        sys.exit("offset beyond the refcount table")
    f.seek(rt_offset + rt_index * 8)
    rb = struct.unpack(">Q", f.read(8))[0] & ~0x1FF
    if rb == 0:
        sys.exit("no refcount block for that offset")
    return rb, idx % per_block, bits


def getref(f, off):
    rb, i, bits = locate(f, off)
    if bits >= 8:
        n = bits // 8
        f.seek(rb + i * n)
        return int.from_bytes(f.read(n), "big")
    f.seek(rb + i * bits // 8)
    byte = f.read(1)[0]
    shift = (i * bits) % 8
    return (byte >> shift) & ((1 << bits) - 1)


def setref(f, off, value):
    rb, i, bits = locate(f, off)
    if bits >= 8:
        n = bits // 8
        f.seek(rb + i * n)
        f.write(value.to_bytes(n, "big"))
        return
    pos = rb + i * bits // 8
    f.seek(pos)
    byte = f.read(1)[0]
    shift = (i * bits) % 8
    mask = ((1 << bits) - 1) << shift
    byte = (byte & ~mask) | ((value << shift) & mask)
    f.seek(pos)
    f.write(bytes([byte]))


def main():
    cmd, path = sys.argv[1], sys.argv[2]
    with open(path, "r+b") as f:
        if cmd == "getref":
            print(getref(f, int(sys.argv[3], 0)))
        elif cmd == "setref":
            setref(f, int(sys.argv[3], 0), int(sys.argv[4], 0))
        elif cmd == "l2":
            f.seek(40)
            l1 = struct.unpack(">Q", f.read(8))[0]
            f.seek(l1 + 8 * int(sys.argv[3], 0))
            print(struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00)
        elif cmd == "leak":
            cs = header(f)[0]
            f.seek(0, 2)
            end = (f.tell() + cs - 1) // cs * cs
            n = int(sys.argv[3])
            f.truncate(end + n * cs)
            for k in range(n):
                setref(f, end + k * cs, 1)
        else:
            sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
